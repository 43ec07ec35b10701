"""What the benchmark scripts share: result files, resumable run queues with progress, the machine.

Every run writes its own JSON file; a rerun skips the files that exist, so an interrupted sweep
continues where it stopped. Quick runs (`--quick`, for CI) write under results/tmp/quick, which
git ignores, so they never overwrite measured results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
# PRISM_BENCH_RESULTS: write elsewhere, e.g. into the main checkout while running a clean worktree of a commit
RESULTS = Path(os.environ.get("PRISM_BENCH_RESULTS", ROOT / "benchmarks" / "results"))


def quiet() -> None:
    """Offline Hugging Face, no progress bars or known-harmless warnings from transformers/peft."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for message in (".*is_gradient_checkpointing.*", ".*PiSSA.*", ".*Secure RNG.*", ".*Optimal order.*",
                    ".*non-full backward hook.*", ".*torch.nn.Module.register_full_backward_hook.*"):
        warnings.filterwarnings("ignore", message=message)


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with --quick and --out."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for CI: a few steps, no claims; results go to results/tmp/quick")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results, or results/tmp/quick with --quick)")
    return p


def out_dir(args) -> Path:
    return args.out if args.out is not None else RESULTS / "tmp" / "quick" if args.quick else RESULTS


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    return (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}")


def provenance() -> dict:
    """The command (relative to the repository root), the code's commit and the machine, for every result file."""
    main = sys.modules["__main__"]
    program = ["-m", main.__spec__.name] if getattr(main, "__spec__", None) else [sys.argv[0]]
    command = " ".join(shlex.quote(a) for a in ["python", *program, *sys.argv[1:]])
    return dict(command=command, commit=CODE_VERSION, machine=machine(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def _commit() -> str:
    """The checkout's commit, with "+changes" when prism/ or benchmarks/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "prism", "benchmarks",
                                ":(exclude)benchmarks/results"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


CODE_VERSION = _commit()  # at import: the code this process runs, whatever the checkout holds later


def read_json(path: Path):
    with open(path) as handle:
        return json.load(handle)


def write_json(path: Path, data) -> None:
    """Write atomically (a killed run never leaves a truncated file that would count as finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
    os.replace(tmp, path)


def run_queue(jobs: list[tuple[Path, Callable[[], dict]]], label: str = "runs") -> list[dict]:
    """Run the jobs whose result file does not exist yet, one line of progress each; return all results.

    Each job is (result path, function returning a JSON-able dict); the dict is written with the
    provenance added. The time left is the mean time of this session's finished runs times the runs left.
    A run whose file appears meanwhile (another process sweeping the same folder) is skipped.
    """
    pending = [(path, fn) for path, fn in jobs if not path.exists()]
    print(f"{label}: {len(jobs) - len(pending)} of {len(jobs)} already done, {len(pending)} to run", flush=True)
    for path, _ in pending:
        print(f"  pending: {path.parent.name}/{path.name}", flush=True)
    start = time.time()
    for done, (path, fn) in enumerate(pending, 1):
        if path.exists():
            print(f"[{done}/{len(pending)}] {path.stem}: done meanwhile by another process, skipped", flush=True)
            continue
        t0 = time.time()
        result = fn()
        result.update(seconds=round(time.time() - t0, 1), **provenance())
        write_json(path, result)
        elapsed = time.time() - start
        summary = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in result.items() if k in ("val_accuracy", "test_accuracy", "epsilon"))
        print(f"[{done}/{len(pending)}] {path.stem}: {summary} ({time.time() - t0:.0f}s); "
              f"~{elapsed / done * (len(pending) - done) / 60:.1f} min left", flush=True)
    return [read_json(path) for path, _ in jobs if path.exists()]


def maybe_pyplot():
    """matplotlib.pyplot with a file backend, or None (with a message) when the `bench` extra is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'prism-dp[bench]'): skipping the plot")
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write (120 dpi) and name the plot."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def epsilon_tag(epsilon: float | None) -> str:
    """An epsilon as it appears in result file names and summary keys: "inf" for no privacy, else e.g. "3"."""
    return "inf" if epsilon is None else f"{epsilon:g}"
