"""The fused per-example op (prism.kernels, compiled) against the reference PyTorch path.

    python -m benchmarks.kernels [--quick] [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N]

For each configuration (b, T, m = n, r) in b {8, 32} x T {128, 512} x m {768, 4096} x r {8, 16, 64}:
the median time of `prism.kernels.tangent_blocks` with the compiled op (Y, W and squared norms in one
call) and with the reference (per_example.tangent_blocks + tangent_sqnorms: batched matmuls, then the
norms), timed alternately so that machine noise hits both alike, and the speed-up. On a GPU also the
achieved bandwidth (bytes that must move: x, h, go read once, Y, W, norms written once) against the
device's copy bandwidth (a large device-to-device copy). Goals: CPU speed-up >= 1.5; GPU >= 70% of
copy bandwidth. With --threads 1 on a CPU the clock is the thread's CPU time, which other processes
on a shared machine disturb far less than wall time. Writes results/kernels[-1thread][-cuda][-bfloat16].json
(--quick: three small configurations, under results/tmp/quick).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import sys
import time

import torch

from prism import kernels
from prism.manifold import TangentBasis, tangent_basis

from . import common

GRID = list(itertools.product((8, 32), (128, 512), (768, 4096), (8, 16, 64)))  # (b, T, m = n, r)
QUICK = [(8, 128, 768, 8), (8, 128, 768, 64), (8, 512, 768, 16)]


def inputs(b, T, m, r, dtype, device):
    g = torch.Generator().manual_seed(0)
    basis = tangent_basis(torch.randn(m, r, generator=g), torch.randn(m, r, generator=g))
    x, go = torch.randn(b, T, m, generator=g), torch.randn(b, T, m, generator=g)
    h = torch.randn(b, T, r, generator=g)
    return [t.to(device, dtype) for t in (x, h, go)] + [TangentBasis(*(t.to(device) for t in basis))]


def timed(fn, device, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def compare(args, config, device) -> dict:
    """Median seconds of the compiled and the reference path, alternating, within about args.seconds."""
    b, T, m, r = config
    x, h, go, basis = inputs(b, T, m, r, getattr(torch, args.dtype), device)

    def fused():
        return kernels.tangent_blocks(x, h, go, basis)

    def reference():
        with kernels.use("reference"):
            return kernels.tangent_blocks(x, h, go, basis)

    first = timed(fused, device) + timed(reference, device)  # also warms up
    reps = max(3, min(50, int(args.seconds / max(first, 1e-6))))
    times = {"fused": [], "reference": []}
    for _ in range(reps):
        times["fused"].append(timed(fused, device, args.clock))
        times["reference"].append(timed(reference, device, args.clock))
    fused_s, reference_s = (statistics.median(times[k]) for k in ("fused", "reference"))
    row = dict(b=b, T=T, m=m, n=m, r=r, reps=reps, reference_s=reference_s, fused_s=fused_s,
               speedup=reference_s / fused_s)
    if device.type == "cuda":
        moved = sum(t.numel() * t.element_size() for t in (x, h, go, *fused()))
        row["bandwidth_GBps"] = moved / fused_s / 1e9
    return row


def processor(device) -> str:
    """The CPU model (from /proc/cpuinfo where there is one), or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def copy_bandwidth(device) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy (best of 5)."""
    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = min(timed(lambda: target.copy_(source), device) for _ in range(5))
    return 2 * source.numel() * source.element_size() / best / 1e9


def main():
    parser = common.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="time budget per configuration (default: 2, with --quick 0.2)")
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else 0.2 if args.quick else 2.0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    single = device.type == "cpu" and torch.get_num_threads() == 1
    args.clock = time.thread_time if single else time.perf_counter
    backend = kernels.backend(device)
    if backend == "reference":
        sys.exit(f"no compiled kernels for {device}: build them with `pip install --no-build-isolation -e .`")
    copy = copy_bandwidth(device) if device.type == "cuda" else None
    header = f"{'b':>3} {'T':>4} {'m=n':>5} {'r':>3} {'reference ms':>13} {'fused ms':>9} {'speed-up':>8}"
    print(f"{backend} kernels on {device}, {args.dtype} inputs, {torch.get_num_threads()} threads, "
          f"{'thread CPU' if single else 'wall'} time"
          + (f", copy bandwidth {copy:.0f} GB/s" if copy else ""))
    print(header + (f" {'GB/s':>6} {'of copy':>7}" if copy else ""))
    load_before, rows = os.getloadavg()[0], []
    for config in QUICK if args.quick else GRID:
        row = compare(args, config, device)
        rows.append(row)
        line = (f"{row['b']:>3} {row['T']:>4} {row['m']:>5} {row['r']:>3} {1e3 * row['reference_s']:>13.2f} "
                f"{1e3 * row['fused_s']:>9.2f} {row['speedup']:>7.2f}x")
        if copy:
            row["copy_fraction"] = row["bandwidth_GBps"] / copy
            line += f" {row['bandwidth_GBps']:>6.0f} {100 * row['copy_fraction']:>6.0f}%"
        print(line, flush=True)
    speedups = [row["speedup"] for row in rows]
    summary = dict(min_speedup=min(speedups), median_speedup=statistics.median(speedups), max_speedup=max(speedups),
                   configs_meeting_cpu_goal=sum(s >= 1.5 for s in speedups), configs=len(rows))
    if copy:
        summary["min_copy_fraction"] = min(row["copy_fraction"] for row in rows)
    print("speed-up min {min_speedup:.2f}x, median {median_speedup:.2f}x, max {max_speedup:.2f}x; "
          "{configs_meeting_cpu_goal}/{configs} configurations >= 1.5x".format(**summary))
    result = dict(**common.provenance(), processor=processor(device), backend=backend, device=str(device),
                  dtype=args.dtype,
                  threads=torch.get_num_threads(), clock="thread CPU time" if single else "wall time",
                  copy_bandwidth_GBps=copy,
                  load_average_1min=dict(before=load_before, after=os.getloadavg()[0]), summary=summary, rows=rows)
    out = common.out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    name = "kernels" + "".join(f"-{part}" for part in (
        "1thread" if single else None, "cuda" if device.type == "cuda" else None,
        args.dtype if args.dtype != "float32" else None) if part)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
