"""The cost of private fine-tuning on causal language models: step time, tokens/s and peak memory (issue 22).

    python -m benchmarks.llm_cost                          # CPU: SmolLM2-135M-Instruct, T = 128 and 512
    python -m benchmarks.llm_cost --device cuda --random-weights   # GPU, bf16: SmolLM2's shape and a 1.1B Llama
    python -m benchmarks.llm_cost --quick                  # CI: a tiny random Llama, a few steps, no claims

The workload is supervised fine-tuning: next-token cross-entropy on every position of fixed random token
sequences (batch b, length T), through the model's own LM head (no new head); LoRA r = 8 on q_proj and
v_proj. Each example's loss is the mean over its own tokens; private methods backpropagate the sum over
the examples (noise multiplier 1, C = 1: the cost does not depend on them), the non-private one the mean.
Every configuration (model, T, gradient checkpointing off/on, base precision) is measured for

    nonprivate        AdamW (the reference of every ratio)
    prism             prism.PRISM(preconditioner="one_sided"): the paper's r x r moments
    prism_two_sided   prism.PRISM(preconditioner="two_sided")
    naive             prism.NaiveDPLoRA (DP-AdamW on both factors)
    ffa               FFA-LoRA: lora_A frozen, lora_B trained by NaiveDPLoRA
    opacus            Opacus' DP-AdamW (PrivacyEngine, grad_sample_mode="hooks"), when opacus is installed

all from peft's PiSSA adapter (a 4-bit base cannot be rewritten by PiSSA: there, prism.init_balanced_lora
without compensation). A method that fails is recorded with its error, not dropped.
On the CPU each (configuration, method) runs in its own subprocess (its peak resident memory is its own;
`--threads 1` makes the CPU time fair on a loaded machine); on a GPU one subprocess per configuration runs
the methods one after another, each on a freshly built model, with torch's peak-allocation counter reset in
between. Step time: the median of `--steps` timed steps after 2 warm-ups (synchronised on a GPU).
Results: results/llm_cost[-cuda]/<configuration>.json (resumable) and results/llm_cost[-cuda].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from . import common, methods
from .speed import device_name, prism_backend_name, time_steps

METHODS = ("nonprivate", "prism", "prism_two_sided", "naive", "ffa", "opacus")
TARGETS = ["q_proj", "v_proj"]
RANK = 8
# Llama shapes: SmolLM2-135M-Instruct's config.json, and TinyLlama-1.1B's (a common ~1B Llama)
SHAPES = dict(
    smollm2=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    llama1b=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
    tiny=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True),
)


@dataclass(frozen=True)
class Config:
    model: str
    batch: int
    seq: int
    checkpointing: bool = False
    base: str = "bf16"  # "fp32", "bf16" or "nf4" (bitsandbytes 4-bit, bf16 compute: QLoRA)

    @property
    def name(self) -> str:
        return f"{self.model}_{self.base}_b{self.batch}_T{self.seq}" + ("_ckpt" if self.checkpointing else "")


CPU_CONFIGS = [Config("smollm2", 4, seq, ckpt, "fp32") for seq in (128, 512) for ckpt in (False, True)]
GPU_CONFIGS = ([Config("smollm2", 16, seq, ckpt) for seq in (256, 1024) for ckpt in (False, True)]
               + [Config("llama1b", 8, 512, ckpt) for ckpt in (False, True)] + [Config("llama1b", 8, 512, base="nf4")])
QUICK_CONFIGS = [Config("tiny", 2, 32, ckpt, "fp32") for ckpt in (False, True)]


def build_model(cfg: Config, method: str, device: str, random_weights: bool):
    """A peft causal LM with LoRA r = 8 on q_proj and v_proj, in training mode, on `device`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if cfg.base == "fp32" else torch.bfloat16
    if cfg.model == "smollm2" and not random_weights:
        from prism.pretrained import smollm2

        base = AutoModelForCausalLM.from_pretrained(smollm2(), dtype=dtype).to(device)
    else:
        config = LlamaConfig(**SHAPES[cfg.model], max_position_embeddings=max(cfg.seq, 2048), pad_token_id=0)
        with torch.device(device):
            base = LlamaForCausalLM(config).to(dtype)
    if cfg.base == "nf4":
        base = _quantized(base, cfg.model, device)
    init = True if cfg.base == "nf4" else "pissa_niter_4"
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS,
                                            init_lora_weights=init))
    if cfg.base == "nf4":
        import prism

        prism.init_balanced_lora(model, compensate_base=False, generator=torch.Generator().manual_seed(0))
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "ffa":
        methods.freeze(model, ".lora_A.")
    model.train()
    return model


_SAVED: dict[str, str] = {}  # model name -> a temporary checkpoint of its random base, saved once per process


def _quantized(base, name: str, device: str):
    """The same model reloaded with a bitsandbytes NF4 base (bf16 compute), through a temporary checkpoint."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if name not in _SAVED:
        _SAVED[name] = tempfile.mkdtemp(prefix=f"prism-{name}-")
        base.save_pretrained(_SAVED[name])
    del base
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(_SAVED[name], quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map={"": device})


def per_example_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """(b,) each sequence's mean next-token cross-entropy."""
    logits = model(input_ids=ids).logits[:, :-1]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return losses.view(ids.shape[0], -1).mean(1)


def make_stepper(method: str, model, batch: int):
    """A function doing one training step (forward, backward, optimizer step) on a batch of token ids."""
    import prism

    trainable = [p for p in model.parameters() if p.requires_grad]
    if method == "nonprivate":
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        loss_of = lambda ids: per_example_loss(model, ids).mean()  # noqa: E731
    elif method == "opacus":
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(torch.arange(100 * batch)), batch_size=batch)
        model, opt, _ = PrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode="hooks")
        loss_of = lambda ids: per_example_loss(model, ids).mean()  # noqa: E731
    else:
        cls = prism.NaiveDPLoRA if method in ("naive", "ffa") else prism.PRISM
        options = {} if cls is prism.NaiveDPLoRA else \
            dict(preconditioner="two_sided" if method == "prism_two_sided" else "one_sided")
        opt = cls(model, lr=1e-4, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                  loss_reduction="sum", **options)
        loss_of = lambda ids: per_example_loss(model, ids).sum()  # noqa: E731

    def step(ids):
        loss_of(ids).backward()
        opt.step()
        opt.zero_grad()

    return step


def measure(cfg: Config, method: str, steps: int, device: str, random_weights: bool) -> dict:
    """Time one method on one configuration in this process (after freeing whatever came before)."""
    on_gpu = device == "cuda"
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    try:
        model = build_model(cfg, method, device, random_weights)
        ids = torch.randint(1, model.config.vocab_size, (cfg.batch, cfg.seq),
                            generator=torch.Generator().manual_seed(0)).to(device)
        step = make_stepper(method, model, cfg.batch)
        timed = time_steps(lambda: step(ids), steps, on_gpu)
    except Exception as exc:  # recorded: the table says which method could not run and why
        return dict(error=f"{type(exc).__name__}: {str(exc)[:500]}")
    median = statistics.median(timed["step_times_s"])
    return dict(median_step_s=median, median_step_cpu_s=statistics.median(timed["cpu_times_s"]),
                tokens_per_s=cfg.batch * cfg.seq / median,
                training_memory_mb=timed["peak_memory_mb"] - timed["memory_before_steps_mb"],
                threads=torch.get_num_threads(), load_average=os.getloadavg(),
                prism_backend=prism_backend_name(device) if method.startswith("prism") else None, **timed)


def measure_config(cfg: Config, methods, steps: int, threads: int | None, device: str,
                   random_weights: bool) -> dict:
    """Every method of one configuration, in subprocesses (one per method on the CPU, one for all on a GPU)."""
    groups = [list(methods)] if device == "cuda" else [[m] for m in methods]
    runs = {}
    for group in groups:
        command = [sys.executable, "-m", __spec__.name, "--worker", json.dumps(asdict(cfg)), *group,
                   "--steps", str(steps), "--device", device] + (["--random-weights"] if random_weights else [])
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        out = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=common.ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"{cfg.name} {group} failed:\n{out.stderr[-3000:]}")
        runs.update(json.loads(out.stdout.strip().splitlines()[-1]))
    if all("error" in r for r in runs.values()):  # a broken setup, not a measurement: no result file
        raise RuntimeError(f"{cfg.name}: every method failed, e.g. {runs['nonprivate']['error']}")
    base = runs["nonprivate"]
    for method, r in runs.items():
        if "error" in base:  # without the reference there are no ratios
            r.setdefault("error", f"the non-private reference failed: {base['error']}")
        if "error" in r:
            print(f"  {cfg.name:32s} {method:16s} FAILED: {r['error'][:200]}", flush=True)
            continue
        r.update(time_ratio=r["median_step_s"] / base["median_step_s"],
                 cpu_time_ratio=r["median_step_cpu_s"] / base["median_step_cpu_s"],
                 peak_ratio=r["peak_memory_mb"] / base["peak_memory_mb"],
                 training_memory_ratio=r["training_memory_mb"] / max(base["training_memory_mb"], 1e-9))
        print(f"  {cfg.name:32s} {method:16s} step {r['median_step_s']:.3f}s (x{r['time_ratio']:.2f}), "
              f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak_memory_mb']:.0f} MB (x{r['peak_ratio']:.2f})",
              flush=True)
    return dict(config=asdict(cfg), rank=RANK, targets=TARGETS, steps=steps, device=device_name(device),
                memory="torch's CUDA allocations" if device == "cuda" else "resident set size",
                random_weights=random_weights or cfg.model != "smollm2", runs=runs)


def table(summary: dict) -> str:
    lines = ["| configuration | method | step (s) | x non-private | tokens/s | peak memory (MB) | x non-private |",
             "|---" * 7 + "|"]
    for name, result in summary.items():
        for method, r in result["runs"].items():
            if "error" in r:
                lines.append(f"| {name} | {method} | failed: {r['error'][:120]} | | | | |")
                continue
            label = f"{method} ({r['prism_backend']})" if r.get("prism_backend") else method
            lines.append(f"| {name} | {label} | {r['median_step_s']:.3f} | {r['time_ratio']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {r['peak_memory_mb']:.0f} | {r['peak_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None, help="configuration names to run (default: all)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="timed steps after 2 warm-ups (default: 5)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per CPU worker (default: torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--random-weights", action="store_true", help="SmolLM2's shape with random weights (same cost)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    steps = args.steps or (2 if args.quick else 5)
    common.quiet()
    if args.worker:
        cfg = Config(**json.loads(args.worker[0]))
        print(json.dumps({m: measure(cfg, m, steps, args.device, args.random_weights) for m in args.worker[1:]}))
        return {}
    from .methods import opacus_available

    methods = [m for m in args.methods if m != "opacus" or opacus_available()]
    if len(methods) < len(args.methods):
        print("opacus is not installed (pip install 'prism-dp[bench]'): skipping the Opacus baseline")
    methods = ["nonprivate"] + [m for m in methods if m != "nonprivate"]
    configs = QUICK_CONFIGS if args.quick else GPU_CONFIGS if args.device == "cuda" else CPU_CONFIGS
    configs = [c for c in configs if args.configs is None or c.name in args.configs]
    folder = common.out_dir(args)
    name = "llm_cost" if args.device == "cpu" else f"llm_cost-{args.device}"
    jobs = [(folder / name / f"{cfg.name}.json",
             lambda cfg=cfg: measure_config(cfg, methods, steps, args.threads, args.device, args.random_weights))
            for cfg in configs]
    common.run_queue(jobs, "llm cost")
    summary = {path.stem: common.read_json(path) for path in sorted((folder / name).glob("*.json"))}
    common.write_json(folder / f"{name}.json", summary)
    print(table(summary))
    return summary


if __name__ == "__main__":
    main()
