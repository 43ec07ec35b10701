"""Step time and peak memory of non-private LoRA, PRISM (compiled and reference), NaiveDPLoRA and Opacus.

    python -m benchmarks.speed            # MiniLM (T=64) and a random-init Llama (8 layers, hidden 1024, T=256)
    python -m benchmarks.speed --quick    # CI: tiny random models, a few steps
    python -m benchmarks.speed --device cuda [--random-weights]   # on a GPU, with larger batches

Methods: nonprivate (AdamW), prism (one-sided moments, as measured before two-sided became the default;
prism.kernels' compiled ops where built), prism_reference
(PRISM_KERNELS=reference: the pure-PyTorch path), naive (NaiveDPLoRA), opacus_hooks and opacus_ghost
(Opacus' DP AdamW, grad_sample_mode "hooks" / "ghost"). Each (model, method) runs in its own fresh
subprocess, so its peak memory is its own: on the CPU the resident memory (getrusage's high-water
mark), on a GPU the memory torch allocated on it. We report the peak and the peak minus the memory
just before the first step (model, optimizer and data built).
The step time is the median of `--steps` timed steps (forward, backward, optimizer step; on a GPU
synchronised before and after) after 2 warm-up steps on one fixed batch, over `--rounds` subprocesses
per method run in alternating order, in wall time and in the process's CPU time (with `--threads 1`,
the fairer measure on a machine loaded by other jobs); ratios are to non-private LoRA of the same
invocation. Private methods use noise multiplier 1 and C = 1 (the cost does not depend on them).
On a GPU the batches are larger (GPU_BATCH). `--random-weights` builds MiniLM's architecture with
random weights instead of loading the pretrained model (the step costs the same; for machines without
the model files). Results: results/speed/<model>.json (one file per model, resumable) and
results/speed.json; on a GPU results/speed-cuda/ and results/speed-cuda.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

from . import common

SPEED_METHODS = ("nonprivate", "prism", "prism_reference", "naive", "opacus_hooks", "opacus_ghost")
MODELS = {  # name: (batch, sequence length, LoRA rank, LoRA targets)
    "minilm": (32, 64, 8, ["query", "value"]),
    "llama": (2, 256, 16, ["q_proj", "v_proj"]),
}
QUICK_MODELS = {"tiny_llama": (2, 32, 4, ["q_proj", "v_proj"])}
GPU_BATCH = {"minilm": 256, "llama": 16, "tiny_llama": 2}
# all-MiniLM-L6-v2's architecture (its config.json), for --random-weights
MINILM_ARCHITECTURE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                           intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, num_labels=2)


def shapes(name: str, device: str) -> tuple[int, int, int, list[str]]:
    """(batch, sequence length, LoRA rank, LoRA targets) of a model on a device type."""
    batch, seq, rank, targets = {**MODELS, **QUICK_MODELS}[name]
    return (GPU_BATCH[name] if device == "cuda" else batch), seq, rank, targets


def build_model(name: str, full_rank: bool, random_weights: bool = False):
    """A peft sequence classifier (2 labels, head trained) of the named model."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    _, seq, rank, targets = {**MODELS, **QUICK_MODELS}[name]
    torch.manual_seed(0)
    if name == "minilm" and not random_weights:
        from .tasks import minilm

        return minilm(full_rank, rank)[1]
    if name == "minilm":
        base = BertForSequenceClassification(BertConfig(**MINILM_ARCHITECTURE))
    elif name == "llama":
        base = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, max_position_embeddings=seq, num_labels=2, pad_token_id=0))
    else:
        base = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=seq, num_labels=2, pad_token_id=0))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, task_type="SEQ_CLS",
                        init_lora_weights="pissa_niter_4" if full_rank else True)
    return get_peft_model(base, config)


def make_stepper(method: str, model, batch: int):
    """A function doing one training step (forward, backward, optimizer step) on (ids, labels)."""
    import prism

    trainable = [p for p in model.parameters() if p.requires_grad]
    if method == "nonprivate":
        opt, criterion = torch.optim.AdamW(trainable, lr=1e-4), lambda logits, y: F.cross_entropy(logits, y)
    elif method in ("prism", "prism_reference", "naive"):
        cls, options = (prism.NaiveDPLoRA, {}) if method == "naive" else (prism.PRISM, dict(preconditioner="one_sided"))
        opt = cls(model, lr=1e-4, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                  loss_reduction="sum", **options)
        criterion = lambda logits, y: F.cross_entropy(logits, y, reduction="sum")  # noqa: E731
    else:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(torch.arange(100 * batch)), batch_size=batch)
        made = PrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4), data_loader=loader,
            criterion=torch.nn.CrossEntropyLoss(), noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
            grad_sample_mode=method.removeprefix("opacus_"))
        model, opt = made[0], made[1]
        criterion = made[2] if method == "opacus_ghost" else (lambda logits, y: F.cross_entropy(logits, y))

    def step(ids, labels):
        criterion(model(input_ids=ids).logits, labels).backward()
        opt.step()
        opt.zero_grad()

    return step


def prepare(model_name: str, method: str, device: str, random_weights: bool):
    """(step function, ids, labels) of one method on one model, built in this process."""
    batch, seq, _, _ = shapes(model_name, device)
    model = build_model(model_name, full_rank=method.startswith("prism"), random_weights=random_weights).to(device)
    model.train()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator).to(device)
    labels = torch.randint(0, 2, (batch,), generator=generator).to(device)
    return make_stepper(method, model, batch), ids, labels


def time_steps(step, steps: int, on_gpu: bool) -> dict:
    """Run `step()` steps + 2 times: the wall and CPU times of the last `steps` (synchronised on a GPU), the
    memory before the first step and the peak (GPU: torch's allocations, its peak counter reset first; CPU:
    the process's peak resident set size)."""
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    memory_before = torch.cuda.memory_allocated() / 2**20 if on_gpu else _rss_mb()
    times, cpu_times = [], []
    for i in range(steps + 2):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if on_gpu:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(step_times_s=times, cpu_times_s=cpu_times, memory_before_steps_mb=memory_before, peak_memory_mb=peak)


def worker(model_name: str, method: str, steps: int, device: str, random_weights: bool) -> dict:
    """Measure one method in this (fresh) process."""
    common.quiet()
    step, ids, labels = prepare(model_name, method, device, random_weights)
    timed = time_steps(lambda: step(ids, labels), steps, device == "cuda")
    return dict(median_step_s=statistics.median(timed["step_times_s"]), threads=torch.get_num_threads(),
                prism_backend=prism_backend_name(device) if method.startswith("prism") else None,
                load_average=os.getloadavg(), **timed)


def profile(model_name: str, method: str, device: str, random_weights: bool, rows: int = 25) -> None:
    """Print torch.profiler's table of 3 steps after 2 warm-up steps, by self device time, then self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    common.quiet()
    step, ids, labels = prepare(model_name, method, device, random_weights)
    for _ in range(2):
        step(ids, labels)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            step(ids, labels)
        if device == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in (["self_device_time_total"] if device == "cuda" else []) + ["self_cpu_time_total"]:
        print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=60))


def prism_backend_name(device: str) -> str:
    try:
        from prism import kernels
    except ImportError:
        return "reference (no prism.kernels)"
    return kernels.backend(device)


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_model(model_name: str, methods, steps: int, rounds: int, threads: int | None, device: str,
                  random_weights: bool) -> dict:
    """Every method in its own subprocess, `rounds` times, in alternating order (so that a drift in the
    machine's load does not favour one method); the median is over all rounds' timed steps."""
    batch, seq, rank, targets = shapes(model_name, device)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for round_ in range(rounds):
        for method in (methods if round_ % 2 == 0 else methods[::-1]):
            command = [sys.executable, "-m", __spec__.name, "--worker", model_name, method, "--steps", str(steps),
                       "--device", device] + (["--random-weights"] if random_weights else [])
            env = dict(os.environ, **({"PRISM_KERNELS": "reference"} if method == "prism_reference" else {}),
                       **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
            out = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=common.ROOT)
            if out.returncode != 0:
                raise RuntimeError(f"{model_name}/{method} failed:\n{out.stderr[-3000:]}")
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[method][-1]
            print(f"  {model_name:10s} {method:15s} median step {r['median_step_s']:.3f}s "
                  f"(CPU {statistics.median(r['cpu_times_s']):.3f}s)  peak memory "
                  f"{r['peak_memory_mb']:.0f} MB (+{r['peak_memory_mb'] - r['memory_before_steps_mb']:.0f} MB in "
                  "training)", flush=True)
    merged = {m: _merge(rs) for m, rs in runs.items()}
    base = merged["nonprivate"]
    for r in merged.values():
        r["time_ratio"] = r["median_step_s"] / base["median_step_s"]
        r["cpu_time_ratio"] = r["median_step_cpu_s"] / base["median_step_cpu_s"]
        r["peak_ratio"] = r["peak_memory_mb"] / base["peak_memory_mb"]
        r["training_memory_ratio"] = r["training_memory_mb"] / max(base["training_memory_mb"], 1e-9)
    memory = "torch's CUDA allocations" if device == "cuda" else "resident set size"
    return dict(model=model_name, batch=batch, seq=seq, rank=rank, targets=targets, steps=steps, rounds=rounds,
                threads=merged["nonprivate"]["threads"], device=device_name(device), memory=memory,
                random_weights=random_weights, runs=merged)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _merge(rounds: list[dict]) -> dict:
    times = [t for r in rounds for t in r["step_times_s"]]
    cpu_times = [t for r in rounds for t in r["cpu_times_s"]]
    return dict(median_step_s=statistics.median(times), step_times_s=times,
                median_step_cpu_s=statistics.median(cpu_times), cpu_times_s=cpu_times, threads=rounds[0]["threads"],
                peak_memory_mb=max(r["peak_memory_mb"] for r in rounds),
                training_memory_mb=max(r["peak_memory_mb"] - r["memory_before_steps_mb"] for r in rounds),
                load_average=[r["load_average"] for r in rounds], prism_backend=rounds[0]["prism_backend"])


def table(summary: dict) -> str:
    lines = ["| model | method | median step (s) | x non-private | CPU time per step (s) | x non-private | "
             "peak memory (MB) | x non-private | training memory (MB) | x non-private |", "|---" * 10 + "|"]
    for name, result in summary.items():
        for method, r in result["runs"].items():
            label = f"{method} ({r['prism_backend']})" if r.get("prism_backend") else method
            lines.append(f"| {name} (b={result['batch']}, T={result['seq']}, r={result['rank']}) | {label} | "
                         f"{r['median_step_s']:.3f} | {r['time_ratio']:.2f} | {r['median_step_cpu_s']:.3f} | "
                         f"{r['cpu_time_ratio']:.2f} | {r['peak_memory_mb']:.0f} | "
                         f"{r['peak_ratio']:.2f} | {r['training_memory_mb']:.0f} | "
                         f"{r['training_memory_ratio']:.2f} |")
    return "\n".join(lines)


def plot(summary: dict, path) -> None:
    plt = common.maybe_pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = list(summary)
    methods = list(next(iter(summary.values()))["runs"])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, [summary[n]["runs"][method]["time_ratio"] for n in names], width, label=method)
        axes[1].bar(xs, [summary[n]["runs"][method]["cpu_time_ratio"] for n in names], width, label=method)
        axes[2].bar(xs, [summary[n]["runs"][method]["training_memory_ratio"] for n in names], width, label=method)
    for ax, label in zip(axes, ("step time (wall) / non-private", "CPU time per step / non-private",
                                "training memory / non-private")):
        ax.axhline(1.1, color="k", linestyle=":", linewidth=1)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(MODELS)}")
    p.add_argument("--methods", nargs="+", choices=SPEED_METHODS, default=list(SPEED_METHODS))
    p.add_argument("--steps", type=int, default=None, help="timed steps after 2 warm-up steps (default: 10)")
    p.add_argument("--rounds", type=int, default=None, help="subprocesses per method, alternating order (default: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: torch's); with 1 the CPU time is fair on a loaded machine")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--random-weights", action="store_true",
                   help="MiniLM's architecture with random weights (no model files needed; same cost)")
    p.add_argument("--profile", nargs=2, metavar=("MODEL", "METHOD"),
                   help="print torch.profiler's tables of a few steps of one method instead of timing")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU")
    if args.profile:
        profile(*args.profile, args.device, args.random_weights)
        return {}
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.device, args.random_weights)))
        return {}
    common.quiet()
    from .methods import opacus_available

    if not opacus_available():
        print("opacus is not installed (pip install 'prism-dp[bench]'): skipping the Opacus baselines")
        args.methods = [m for m in args.methods if not m.startswith("opacus")]
    if "nonprivate" not in args.methods:
        args.methods.insert(0, "nonprivate")
    models = args.models or list(QUICK_MODELS if args.quick else MODELS)
    steps = args.steps or (3 if args.quick else 10)
    folder = common.out_dir(args)
    rounds = args.rounds or (1 if args.quick else 2)
    name_of_results = "speed" if args.device == "cpu" else f"speed-{args.device}"
    jobs = [(folder / name_of_results / f"{name}.json",
             lambda name=name: measure_model(name, args.methods, steps, rounds, args.threads, args.device,
                                             args.random_weights)) for name in models]
    common.run_queue(jobs, "speed")
    summary = {path.stem: common.read_json(path) for path in sorted((folder / name_of_results).glob("*.json"))}
    common.write_json(folder / f"{name_of_results}.json", summary)
    print(table(summary))
    plot(summary, folder / f"{name_of_results}.png")
    return summary


if __name__ == "__main__":
    main()
