#!/usr/bin/env bash
# On a machine with a CUDA GPU and torch, transformers, peft, prv-accountant (and opacus for its
# baselines, bitsandbytes for QLoRA) installed: build the CUDA kernels, run the CUDA tests, then the
# benchmarks on the GPU. Usage: bash benchmarks/gpu.sh [RESULTS_DIR] [PYTHON] [WHAT]
#   RESULTS_DIR  where the benchmarks write (default: benchmarks/results)
#   PYTHON       the interpreter (default: python3)
#   WHAT         kernels: the kernel and speed benchmarks (MiniLM, a Llama classifier; default)
#                llm: the causal-LM cost benchmark (SmolLM2's shape, a 1.1B Llama, bf16 and NF4 bases)
set -euo pipefail
cd "$(dirname "$0")/.."
export PRISM_BENCH_RESULTS="${1:-benchmarks/results}" PRISM_REQUIRE_EXTENSION=1 HF_HUB_OFFLINE=1
python="${2:-python3}"
what="${3:-kernels}"
mkdir -p "$PRISM_BENCH_RESULTS"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
# sm_90 only where the GPU is a Hopper; otherwise torch's default list for the visible GPU
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$python" -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")}" \
    MAX_JOBS="${MAX_JOBS:-8}" "$python" -m pip install -q --no-build-isolation --no-deps -e .
"$python" -c "from prism import kernels; b = kernels.backend('cuda'); print('prism backend on cuda:', b); assert b == 'cuda'"
# every CUDA test: the kernels, prism on the GPU (Trainer, FSDP2 bf16), QLoRA on bitsandbytes' GPU path
# (a failure is reported and the script exits with it at the end, after the benchmarks have measured)
tests=0
"$python" -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_cuda.py tests/test_qlora.py -k cuda || tests=$?
case "$what" in
    kernels)
        "$python" -m benchmarks.kernels --device cuda --seconds 0.5
        "$python" -m benchmarks.kernels --device cuda --seconds 0.5 --dtype bfloat16
        "$python" -m benchmarks.speed --device cuda --random-weights --rounds 1 ;;
    llm)
        "$python" -m benchmarks.llm_cost --device cuda --random-weights ;;
    *) echo "unknown WHAT: $what (kernels or llm)" >&2; exit 2 ;;
esac
exit "$tests"
