"""The LLM benchmark's headline (issue 22): test results over seeds, one table and one plot.

    python -m benchmarks.llm_report

Reads the test stages of benchmarks.llm (classification accuracy: results/llm/test/ for Rotten Tomatoes,
results/llm/<task>-test/ for the check tasks) and benchmarks.llm_sft (completion perplexity:
results/llm_sft/test/), and writes results/llm_summary.json (per task, method and epsilon: the mean, the
sample standard deviation over seeds, the values, the seeds and the learning rate), prints the markdown
table and draws results/llm.png (accuracy and perplexity against epsilon; zero-shot and non-private as
horizontal lines). Runs of one (task, method, epsilon) at different learning rates are refused: the test
stage runs each method at its one tuned rate. A second table pairs PRISM with each private baseline seed by
seed (the same seed draws the same Poisson batches; the test split is shared): the mean and sample std of
the per-seed difference, which is what "PRISM is x points above" means. llm_summary.json holds both:
{"results": {task: {method: {epsilon: ...}}}, "paired": {task: {epsilon: {method: ...}}}}.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import NamedTuple

from . import common


class Source(NamedTuple):
    task: str
    folder: Path  # the test stage's results, under the results folder
    key: str  # the metric in each result file
    label: str
    higher_is_better: bool
    prism: str  # the benchmark's name for PRISM as the library recommends it for the task: the paired reference


SOURCES = (
    Source("rotten_tomatoes", Path("llm") / "test", "test_accuracy", "test accuracy (%)", True, "prism_two_sided"),
    Source("sms_spam", Path("llm") / "sms_spam-test", "test_accuracy", "test accuracy (%)", True, "prism_two_sided"),
    # next-token fine-tuning: balanced init and metric (docs/usage.md section 1)
    Source("chat (SFT)", Path("llm_sft") / "test", "test_perplexity", "test perplexity", False, "prism_balanced_fm"),
)
REFERENCES = ("zeroshot", "nonprivate")  # no epsilon: drawn as horizontal lines


def summarize(folder: Path) -> dict:
    """{task: {method: {epsilon tag: {mean, std, values, seeds, lr}}}} from the test-stage result files."""
    summary = {}
    for task, sub, key, *_ in SOURCES:
        runs = {}
        for path in sorted((folder / sub).glob("*.json")):
            r = common.read_json(path)
            if key not in r:  # e.g. a run scored on validation only (--no-test)
                continue
            runs.setdefault((r["method"], common.epsilon_tag(r["target_epsilon"])), []).append(r)
        rows = summary.setdefault(task, {})
        for (method, eps), group in sorted(runs.items()):
            rates = {r["lr"] for r in group}
            if len(rates) > 1:
                raise ValueError(f"{task}: {method} at epsilon {eps} has test runs at several learning rates "
                                 f"{sorted(rates, key=str)}; keep the tuned rate's only")
            values = [r[key] for r in group]
            if key == "test_accuracy":
                values = [100 * v for v in values]
            rows.setdefault(method, {})[eps] = dict(
                mean=statistics.mean(values), std=statistics.stdev(values) if len(values) > 1 else None,
                values=values, seeds=[r["seed"] for r in group], lr=group[0]["lr"])
    return summary


def paired(summary: dict) -> dict:
    """{task: {epsilon: {method: {mean, std, seeds}}}}: the task's PRISM run minus method on the seeds both have,
    for every private method tested at an epsilon PRISM was tested at (accuracy: > 0 is PRISM ahead; perplexity:
    < 0 is)."""
    out = {}
    for source in SOURCES:
        task, reference = source.task, source.prism
        by_method = summary.get(task, {})
        if reference not in by_method:
            continue
        for eps, ref in by_method[reference].items():
            mine = dict(zip(ref["seeds"], ref["values"]))
            for method, rows in by_method.items():
                if method in (reference, *REFERENCES) or eps not in rows:
                    continue
                theirs = dict(zip(rows[eps]["seeds"], rows[eps]["values"]))
                seeds = sorted(set(mine) & set(theirs))
                if not seeds:
                    continue
                diffs = [mine[s] - theirs[s] for s in seeds]
                out.setdefault(task, {}).setdefault(eps, {})[method] = dict(
                    mean=statistics.mean(diffs), std=statistics.stdev(diffs) if len(diffs) > 1 else None,
                    differences=diffs, seeds=seeds)
    return out


def paired_table(pairs: dict) -> str:
    """Markdown: one row per (task, epsilon, baseline): PRISM minus baseline, mean ± std over paired seeds."""
    lines = ["| task | eps | PRISM | minus | difference (mean ± std over seeds) | per seed |", "|---" * 6 + "|"]
    for source in SOURCES:
        best_first = -1 if source.higher_is_better else 1
        for eps, by_method in sorted(pairs.get(source.task, {}).items(), key=lambda x: float(x[0])):
            for method, row in sorted(by_method.items(), key=lambda x: best_first * x[1]["mean"]):
                per_seed = ", ".join(f"{d:+.2f}" for d in row["differences"])
                lines.append(f"| {source.task} | {eps} | {source.prism} | {method} | {_signed(row)} | {per_seed} |")
    return "\n".join(lines)


def _signed(row) -> str:
    spread = "" if row["std"] is None else f" ± {row['std']:.2f}"
    return f"{row['mean']:+.2f}{spread} (n={len(row['seeds'])})"


def _cell(row) -> str:
    if row is None:
        return ""
    spread = "" if row["std"] is None else f" ± {row['std']:.1f}"
    return f"{row['mean']:.1f}{spread} (n={len(row['seeds'])})"


def table(summary: dict) -> str:
    """Markdown: one row per (task, method), a column per epsilon found, then no privacy."""
    found = {e for by_method in summary.values() for rows in by_method.values() for e in rows if e != "inf"}
    columns = sorted(found, key=float) + ["inf"]
    lines = ["| task | metric | method | lr | " + " | ".join(f"eps {e}" for e in columns[:-1]) + " | no DP |",
             "|---" * (len(columns) + 4) + "|"]
    for task, label in ((s.task, s.label) for s in SOURCES):
        for method, rows in summary.get(task, {}).items():
            lr = next(iter(rows.values()))["lr"]
            lines.append(f"| {task} | {label} | {method} | {'-' if lr is None else f'{lr:g}'} | "
                         + " | ".join(_cell(rows.get(e)) for e in columns) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    plt = common.maybe_pyplot()
    if plt is None:
        return
    shown = [s for s in SOURCES if summary.get(s.task)]
    if not shown:
        print("no test-stage results yet: no plot")
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4), squeeze=False)
    for ax, (task, _, _, label, higher, _) in zip(axes[0], shown):
        for method, rows in summary[task].items():
            if method in REFERENCES and "inf" in rows:
                ax.axhline(rows["inf"]["mean"], linestyle="--" if method == "nonprivate" else ":",
                           color="k" if method == "nonprivate" else "grey", label=method)
                continue
            points = sorted((float(e), r) for e, r in rows.items() if e != "inf")
            ax.errorbar([e for e, _ in points], [r["mean"] for _, r in points],
                        yerr=[r["std"] or 0.0 for _, r in points], marker="o", capsize=3, label=method)
        ax.set(xlabel="epsilon (delta = 1e-5)", ylabel=label + ("" if higher else ", lower is better"), title=task)
        ax.legend(fontsize=8)
    common.save_figure(fig, path)


def main(argv=None) -> str:
    p = common.parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    folder = common.out_dir(args)
    summary = summarize(folder)
    pairs = paired(summary)
    common.write_json(folder / "llm_summary.json", dict(results=summary, paired=pairs))
    plot(summary, folder / "llm.png")
    text = table(summary) + "\n\n" + paired_table(pairs)
    print(text)
    return text


if __name__ == "__main__":
    main()
