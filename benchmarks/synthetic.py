"""What private synthetic text is worth: generators, downstream accuracy, fidelity, memorisation (issue 23).

    python -m benchmarks.synthetic                        # the headline runs, resumable: rerun to continue
    python -m benchmarks.synthetic --variants prism --epsilons 8 --seeds 0 --stages generate evaluate
    python -m benchmarks.synthetic --stages canary        # canary exposure runs
    python -m benchmarks.synthetic --summary-only         # the table from the result files
    python -m benchmarks.synthetic --quick                # CI: tiny random generator, a few samples, no claims

Generators of 2,000 balanced synthetic reviews (prism.examples.synthetic; private data = the training
sentences of benchmarks.tasks' Rotten Tomatoes split, the same as benchmarks.utility's):
    prism       SmolLM2-135M-Instruct + LoRA fine-tuned by PRISM (preconditioner="two_sided", from PiSSA), at the
                target epsilon
    prism_balanced  the same from prism.init_balanced_lora with metric="balanced" (the configuration that tied naive
                DP-LoRA on the chat task, benchmarks/results/llm_sft)
    naive       the same with naive DP-LoRA (prism.NaiveDPLoRA, peft's default init)
    nonprivate  the same without clipping or noise (AdamW)
    zeroshot    the untuned instruct model, prompted through its chat template (no private data)
    pe          Private Evolution from the untuned model (benchmarks.private_evolution), at the target epsilon
    <g>_judged  generator g's samples kept where the untuned public model, as a zero-shot classifier, agrees
                with their label (prism.examples.synthetic_sampling.judge_filter), balanced by keeping the
                first of each label: a subset of g's samples, at g's epsilon (post-processing)
Stages, one JSON per run under results/synthetic/<stage>/:
    generate    train the generator and sample; the samples go to results/synthetic/samples/*.jsonl
                (git-ignored: they are regenerated, not committed); the JSON keeps a few of them
    evaluate    the downstream classifier (all-MiniLM-L6-v2 + LoRA trained NON-privately on the synthetic
                set with benchmarks.methods' non-private recipe at benchmarks.utility's tuned rate, scored on
                the real test split), the Frechet distance and MAUVE of MiniLM embeddings to the real test sentences,
                length and label statistics, 8-gram copy rates against training and held-out sentences
    canary      generators trained with secret canaries inserted k times; their exposure
    mauve       MAUVE added to evaluate results written before it was measured, from their samples
The summary compares with benchmarks.utility's direct classifiers (results/utility.json).
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from . import common, tasks

# the fine-tuned generators: GeneratorConfig's fields besides epsilon and seed
FINE_TUNED = {"prism": dict(method="prism"), "prism_balanced": dict(method="prism", init="balanced", metric="balanced"),
              "naive": dict(method="naive"), "nonprivate": dict(method="nonprivate")}
GENERATORS = tuple(FINE_TUNED) + ("zeroshot", "pe")
JUDGED = "_judged"  # a generator's samples after the public label judge (post-processing, no new samples)
VARIANTS = GENERATORS + tuple(g + JUDGED for g in GENERATORS)
PRIVATE = tuple(v for v in VARIANTS if v.removesuffix(JUDGED) not in ("nonprivate", "zeroshot"))
EPSILONS = (8.0, 3.0)
SEEDS = (0,)
STAGES = ("generate", "evaluate")
SAMPLES = 2000
MAUVE_SAMPLES, MAUVE_REPEATS = 800, 5  # per side (below the smallest judged set, about 930); draws averaged
QUICK_SAMPLES = 32  # > methods.QUICK.batch_size: the downstream Poisson rate stays below 1
EXAMPLES_KEPT = 3  # synthetic samples per label quoted in each generate JSON
# the zero-shot (and Private Evolution) prompt: public text, the only thing these generators see
INSTRUCTION = ("Write one short sentence (under 30 words) from a {label} movie review, the way a film critic "
               "would put it. Reply with the sentence only.")


def name(variant: str, epsilon: float | None, seed: int) -> str:
    return f"{variant}_eps{'inf' if epsilon is None else f'{epsilon:g}'}_seed{seed}"


def samples_path(folder: Path, run: str) -> Path:
    return folder / "synthetic" / "samples" / f"{run}.jsonl"


def result_path(folder: Path, stage: str, run: str) -> Path:
    return folder / "synthetic" / stage / f"{run}.json"


def private_split(quick: bool) -> tasks.Split:
    """benchmarks.tasks' Rotten Tomatoes split, at benchmarks.utility's batch size (the same training set)."""
    from .methods import QUICK, Setup

    return tasks.load_task("rotten_tomatoes", (QUICK if quick else Setup()).batch_size, quick=quick)


def generator_config(variant: str, epsilon: float | None, seed: int, quick: bool):
    from prism.examples.synthetic import GeneratorConfig

    quick_settings = dict(steps=2, batch_size=16, micro_batch=16, log_every=1) if quick else {}
    return GeneratorConfig(epsilon=epsilon, seed=seed, **FINE_TUNED[variant], **quick_settings)


def sampling_config(quick: bool):
    from prism.examples.synthetic_sampling import SamplingConfig

    return SamplingConfig.quick() if quick else SamplingConfig()


def zero_shot_prompt_ids(tokenizer):
    from prism.examples.synthetic_data import SENTIMENT
    from prism.examples.synthetic_sampling import chat_prompt_ids

    return lambda label: chat_prompt_ids(tokenizer, INSTRUCTION.format(label=SENTIMENT.labels[label]))


def generate_job(variant: str, epsilon: float | None, seed: int, split: tasks.Split, folder: Path, quick: bool):
    """Train the generator (if any), sample, write the samples; the JSON: training and sampling reports."""
    from prism.examples import synthetic
    from prism.examples.synthetic_sampling import sample_balanced

    n = QUICK_SAMPLES if quick else SAMPLES
    run = name(variant, epsilon, seed)

    def fn():
        torch.manual_seed(seed)
        info = dict(variant=variant, target_epsilon=epsilon, seed=seed)
        if variant in FINE_TUNED:
            config = generator_config(variant, epsilon, seed, quick)
            tokenizer, model, generator = synthetic.train_generator(
                split.train_x, split.train_y, config, quick=quick,
                noise_generator=torch.Generator().manual_seed(seed + 1), sampling_seed=seed)
            rows, report = sample_balanced(synthetic.for_sampling(model), tokenizer, synthetic.SENTIMENT.prompt, n,
                                           sampling_config(quick), seed=seed)
            info.update(generator=generator, epsilon=generator["epsilon"])
        elif variant == "zeroshot":
            tokenizer, model = synthetic.load_base(quick)
            rows, report = sample_balanced(model, tokenizer, None, n, sampling_config(quick), seed=seed,
                                           prompt_ids=zero_shot_prompt_ids(tokenizer))
            info.update(epsilon=0.0, instruction=INSTRUCTION)
        elif variant.endswith(JUDGED):
            from prism.examples.synthetic_sampling import PublicLabelJudge, judge_filter

            source = name(variant.removesuffix(JUDGED), epsilon, seed)
            if not samples_path(folder, source).exists():
                raise SystemExit(f"{samples_path(folder, source)} is missing: run the generate stage of "
                                 f"{variant.removesuffix(JUDGED)} first")
            tokenizer, model = synthetic.load_base(quick)
            rows, report = judge_filter(synthetic.read_jsonl(samples_path(folder, source)),
                                        PublicLabelJudge(model, tokenizer))
            report["source"] = source
            info.update(epsilon=common.read_json(result_path(folder, "generate", source))["epsilon"])
        elif variant == "pe":
            from . import private_evolution

            tokenizer, model = synthetic.load_base(quick)
            config = private_evolution.Config.quick(epsilon) if quick else private_evolution.Config(epsilon=epsilon)
            zero_shot = samples_path(folder, name("zeroshot", None, seed))  # S_0: the same public samples
            initial = synthetic.read_jsonl(zero_shot) if zero_shot.exists() else None
            rows, report = private_evolution.run(model, tokenizer, split.train_x, split.train_y, n, config,
                                                 INSTRUCTION, sampling_config(quick), seed=seed, initial=initial)
            report["initial"] = str(zero_shot.relative_to(folder)) if initial is not None else "sampled"
            info.update(epsilon=report["epsilon"], instruction=INSTRUCTION)
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        synthetic.write_jsonl(samples_path(folder, run), rows)
        info.update(sampling=report, samples=len(rows), samples_file=str(samples_path(folder, run).relative_to(folder)),
                    examples=[r for label in (0, 1) for r in [r for r in rows if r["label"] == label][:EXAMPLES_KEPT]])
        return info
    return result_path(folder, "generate", run), fn


def downstream_lr(folder: Path, quick: bool) -> float:
    """benchmarks.utility's tuned rate of the non-private classifier (tuned on the real validation split)."""
    if quick:
        return 3e-3
    path = folder / "utility.json"
    try:
        return common.read_json(path)["test_accuracy"]["rotten_tomatoes"]["nonprivate"]["inf"]["lr"]
    except (OSError, KeyError) as exc:
        raise SystemExit(f"{path} lacks the tuned non-private rate ({exc!r}): run `python -m benchmarks.utility "
                         "--tasks rotten_tomatoes --methods nonprivate` first") from exc


def evaluate_job(variant: str, epsilon: float | None, seed: int, split: tasks.Split, folder: Path, quick: bool):
    """Downstream accuracy, fidelity, statistics and copy rates of one generate run's samples."""
    from dataclasses import replace

    from prism.examples.synthetic import read_jsonl

    from . import methods, synthetic_metrics as metrics

    run = name(variant, epsilon, seed)

    def fn():
        source = samples_path(folder, run)
        if not source.exists():
            raise SystemExit(f"{source} is missing (samples are not committed): delete "
                             f"{result_path(folder, 'generate', run)} and rerun the generate stage")
        rows = read_jsonl(source)
        texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
        setup = replace(methods.QUICK if quick else methods.Setup(), log_every=0 if quick else 20)
        synthetic_split = tasks.Split(texts, labels, split.val_x, split.val_y, split.test_x, split.test_y)
        print(f"  downstream: MiniLM + LoRA on {len(texts)} synthetic reviews, non-private", flush=True)
        downstream = methods.train("nonprivate", synthetic_split, setup, epsilon=None, seed=seed,
                                   lr=downstream_lr(folder, quick))
        result = dict(variant=variant, target_epsilon=epsilon, seed=seed, samples=len(rows),
                      test_accuracy=downstream["test_accuracy"], val_accuracy=downstream["val_accuracy"],
                      downstream={k: downstream[k] for k in ("lr", "setup", "train_seconds", "final_train_loss")},
                      **fidelity(metrics, metrics.Embedder(), texts, split.test_x, seed),
                      stats=metrics.text_stats(texts, labels),
                      copies=metrics.copy_rates(texts, split.train_x, split.val_x + split.test_x, seed=seed))
        print(f"  to the real test sentences: Frechet distance {result['frechet_to_test']:.4f}, MAUVE "
              f"{result['mauve_to_test']:.3f}; copied 8-grams {result['copies']}", flush=True)
        return result
    return result_path(folder, "evaluate", run), fn


def fidelity(metrics, embed, texts: list[str], real: list[str], seed: int) -> dict:
    """Frechet distance and MAUVE between the MiniLM embeddings of `texts` and of the real test sentences."""
    mine, theirs = embed(texts), embed(real)
    return dict(frechet_to_test=metrics.frechet_distance(mine, theirs),
                mauve_to_test=mauve_fixed_size(metrics, mine, theirs, seed))


def mauve_fixed_size(metrics, mine, theirs, seed: int) -> float:
    """The mean MAUVE over MAUVE_REPEATS draws of MAUVE_SAMPLES seeded random rows of each side. Its quantisation
    (k = n / 10 clusters) depends on the sizes, and the judged sets are smaller than the others, so every set is
    measured at the same size. One draw varies by about 0.02 (real against real: 0.945-0.966 over 3 draws), the
    mean of 5 by about 0.01 (synthetic sets: up to 0.02)."""
    size = min(MAUVE_SAMPLES, len(mine), len(theirs))
    pick = lambda rows, rng: rows[sorted(rng.sample(range(len(rows)), size))]  # noqa: E731
    return statistics.mean(metrics.mauve(pick(mine, random.Random(f"{seed}-{r}")),
                                         pick(theirs, random.Random(f"real-{r}")), seed=r)
                           for r in range(MAUVE_REPEATS))


def reference_texts(split: tasks.Split) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels) of SAMPLES random real training sentences, and the other training sentences."""
    order = random.Random(0).sample(range(len(split.train_x)), min(SAMPLES, len(split.train_x)))
    rest = [split.train_x[i] for i in sorted(set(range(len(split.train_x))) - set(order))]
    return [split.train_x[i] for i in order], [split.train_y[i] for i in order], rest


def reference_job(split: tasks.Split, folder: Path):
    """The same measurements on REAL training sentences (as many as the synthetic sets): the floor of the
    Frechet distance and MAUVE at this sample size, the real length statistics and the copy rate of real text."""
    from . import synthetic_metrics as metrics

    def fn():
        texts, labels, rest = reference_texts(split)
        return dict(samples=len(texts), **fidelity(metrics, metrics.Embedder(), texts, split.test_x, 0),
                    stats=metrics.text_stats(texts, labels),
                    copies=metrics.copy_rates(texts, rest, split.val_x + split.test_x, seed=0),
                    note="real training sentences against the OTHER training sentences and the held-out ones")
    return result_path(folder, "evaluate", "real_reference"), fn


def add_mauve(split: tasks.Split, folder: Path) -> None:
    """MAUVE for the evaluate results written before it was measured, from their samples where these still
    exist (they are not committed); the others are listed and left as they are."""
    from . import synthetic_metrics as metrics

    embed, real = None, None
    for path in sorted((folder / "synthetic" / "evaluate").glob("*.json")):
        result = common.read_json(path)
        if "mauve_to_test" in result:
            continue
        if path.stem == "real_reference":
            texts, seed = reference_texts(split)[0], 0
        elif samples_path(folder, path.stem).exists():
            from prism.examples.synthetic import read_jsonl

            texts, seed = [r["text"] for r in read_jsonl(samples_path(folder, path.stem))], result["seed"]
        else:
            print(f"  {path.stem}: no samples left to measure MAUVE on (regenerate them to add it)", flush=True)
            continue
        if embed is None:
            embed = metrics.Embedder()
            real = embed(split.test_x)
        result["mauve_to_test"] = mauve_fixed_size(metrics, embed(texts), real, seed)
        result["mauve_added_by"] = common.provenance()
        common.write_json(path, result)
        print(f"  {path.stem}: MAUVE {result['mauve_to_test']:.3f}", flush=True)


def runs(variants, epsilons, seeds) -> list[tuple[str, float | None, int]]:
    """(variant, epsilon, seed) to run, judged variants last (they read their generator's samples)."""
    variants = sorted(variants, key=lambda v: v.endswith(JUDGED))
    out = []
    for seed in seeds:
        for epsilon in epsilons:
            out += [(v, epsilon, seed) for v in variants if v in PRIVATE]
        out += [(v, None, seed) for v in variants if v not in PRIVATE]
    return list(dict.fromkeys(out))


def summarize(folder: Path, quick: bool = False) -> dict:
    """results/synthetic.json: one row per (variant, epsilon) with the per-seed values and their means."""
    rows = {}
    for path in sorted((folder / "synthetic" / "evaluate").glob("*_seed*.json")):
        r = common.read_json(path)
        gen_path = result_path(folder, "generate", path.stem)
        gen = common.read_json(gen_path) if gen_path.exists() else {}
        key = name(r["variant"], r["target_epsilon"], 0).rsplit("_seed", 1)[0]
        row = rows.setdefault(key, dict(variant=r["variant"], target_epsilon=r["target_epsilon"], seeds=[],
                                        test_accuracy=[], frechet_to_test=[], mauve_to_test=[], epsilon=[],
                                        train_copy=[], heldout_copy=[], mean_words=[]))
        row["seeds"].append(r["seed"])
        row["test_accuracy"].append(r["test_accuracy"])
        row["frechet_to_test"].append(r["frechet_to_test"])
        row["mauve_to_test"].append(r.get("mauve_to_test"))
        row["epsilon"].append(gen.get("epsilon"))
        row["train_copy"].append(r["copies"]["train"])
        row["heldout_copy"].append(r["copies"]["heldout"])
        row["mean_words"].append(r["stats"]["mean_words"])
    for row in rows.values():
        row["mean_test_accuracy"] = statistics.mean(row["test_accuracy"])
    summary = dict(synthetic=rows, direct=_direct(folder), canaries=_canaries(folder))
    ref = result_path(folder, "evaluate", "real_reference")
    summary["real_reference"] = common.read_json(ref) if ref.exists() else None
    common.write_json(folder / "synthetic.json", summary)
    return summary


def _direct(folder: Path) -> dict:
    """benchmarks.utility's test accuracy of classifiers trained on the real data (the comparison rows)."""
    path = folder / "utility.json"
    if not path.exists():
        return {}
    table = common.read_json(path)["test_accuracy"].get("rotten_tomatoes", {})
    return {f"{m}_eps{e}": dict(mean=r["mean"], test_accuracy=r["test_accuracy"], seeds=r["seeds"],
                                epsilon=None if e == "inf" else float(e))
            for m in ("prism", "prism_two_sided", "naive", "nonprivate") for e, r in table.get(m, {}).items()}


def _canaries(folder: Path) -> list[dict]:
    return [common.read_json(p) for p in sorted((folder / "synthetic" / "canary").glob("*.json"))]


def _mean_of_known(values: list[float | None]) -> str:
    """The mean of the measured values ("-" if none), saying how many seeds it covers when not all."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    return f"{statistics.mean(known):.3f}" + ("" if len(known) == len(values) else f" ({len(known)} of {len(values)})")


def table(summary: dict) -> str:
    pct = lambda xs: " / ".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731
    lines = ["| data the classifier was trained on | epsilon spent | test acc. (%) per seed | mean | Frechet to test "
             "| MAUVE to test | 8-gram copies: train / held-out (%) | mean words |", "|---" * 8 + "|"]
    for key, r in sorted(summary["synthetic"].items()):
        eps = ", ".join("-" if e is None else f"{e:.2f}" for e in r["epsilon"])
        copies = ", ".join(f"{100 * a:.1f} / {100 * b:.1f}" for a, b in zip(r["train_copy"], r["heldout_copy"]))
        lines.append(f"| synthetic: {key} | {eps} | {pct(r['test_accuracy'])} | {100 * r['mean_test_accuracy']:.1f} | "
                     f"{statistics.mean(r['frechet_to_test']):.4f} | {_mean_of_known(r['mauve_to_test'])} | {copies} | "
                     f"{statistics.mean(r['mean_words']):.1f} |")
    for key, r in sorted(summary["direct"].items()):
        eps = "-" if r.get("epsilon") is None else f"{r['epsilon']:g}"
        lines.append(f"| real, direct (benchmarks.utility): {key} | {eps} | {pct(r['test_accuracy'])} | {100 * r['mean']:.1f} "
                     "| | | | |")
    ref = summary.get("real_reference")
    if ref:
        lines.append(f"| real training sentences (reference) | | | | {ref['frechet_to_test']:.4f} | "
                     f"{_mean_of_known([ref.get('mauve_to_test')])} | "
                     f"{100 * ref['copies']['train']:.1f} / {100 * ref['copies']['heldout']:.1f} | "
                     f"{ref['stats']['mean_words']:.1f} |")
    if summary["canaries"]:
        lines += ["", "| canary run | epsilon | k | exposures (bits) | mean | chance mean |", "|---|---|---|---|---|---|"]
        for c in summary["canaries"]:
            lines.append(f"| {c['method']} | {c['epsilon']} | {c['k']} | {', '.join(f'{e:.2f}' for e in c['exposures'])} "
                         f"| {c['mean_exposure']:.2f} | {c['chance_mean_exposure']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(GENERATORS))
    p.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--stages", nargs="+", choices=STAGES + ("canary", "mauve"), default=list(STAGES),
                   help="mauve: add MAUVE to evaluate results written before it was measured (from their samples)")
    p.add_argument("--canary-k", nargs="+", type=int, default=[1, 10], help="copies of each canary")
    p.add_argument("--canary-methods", nargs="+", choices=("prism", "naive", "nonprivate"),
                   default=["prism", "nonprivate"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the summary and the table")
    args = p.parse_args(argv)
    common.quiet()
    torch.set_num_threads(args.threads)
    folder = common.out_dir(args)
    if args.quick:
        args.epsilons, args.seeds, args.canary_k = [8.0], [0], [1]
    if not args.summary_only:
        split = private_split(args.quick)
        print(f"private training sentences: {len(split.train_x)}; real test sentences: {len(split.test_x)}", flush=True)
        chosen = runs(args.variants, args.epsilons, args.seeds)
        for stage in ("generate", "evaluate"):
            if stage in args.stages:
                make = generate_job if stage == "generate" else evaluate_job
                jobs = [make(v, e, s, split, folder, args.quick) for v, e, s in chosen]
                if stage == "evaluate":
                    jobs.append(reference_job(split, folder))
                common.run_queue(jobs, f"synthetic {stage}")
        if "mauve" in args.stages:
            add_mauve(split, folder)
        if "canary" in args.stages:
            from . import canaries

            jobs = [canaries.job(m, None if m == "nonprivate" else e, k, s, split, folder, args.quick)
                    for s in args.seeds for e in args.epsilons[:1] for m in args.canary_methods for k in args.canary_k]
            common.run_queue(jobs, "synthetic canaries")
    summary = summarize(folder, args.quick)
    print(table(summary))
    return summary


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"done in {(time.time() - started) / 60:.1f} min")
