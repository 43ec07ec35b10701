"""The README's headline table is the results JSONs, not a copy that can drift from them."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = {"PRISM": "prism_two_sided", "PRISM one-sided": "prism", "naive DP-LoRA": "naive",
           "Opacus DP-AdamW": "opacus", "FFA-LoRA": "ffa", "DP head only": "head", "non-private LoRA": "nonprivate"}
TASKS = {"Rotten Tomatoes (sentiment)": "rotten_tomatoes", "SMS spam": "sms_spam"}
# the language-model row (benchmarks.llm_report's llm_summary.json): the methods run there; the other cells are "–"
LLM_TASKS = {"Rotten Tomatoes as text (SmolLM2-135M)": "rotten_tomatoes"}
LLM_COLUMNS = {"PRISM": "prism_two_sided", "naive DP-LoRA": "naive_default", "FFA-LoRA": "ffa",
               "non-private LoRA": "nonprivate"}


def _headline_rows():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| task |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        yield header, cells


def _mean_std(cell):
    mean, std = re.fullmatch(r"([\d.]+) ± ([\d.]+)", cell).groups()
    return float(mean), float(std)


def _check_rows(tasks, columns, results, scale):
    """Every README row named in `tasks` against results[task][method][epsilon 3 or "inf"] (mean, std) x scale;
    columns not in `columns` must be "–". Returns how many cells were compared."""
    checked = 0
    for header, cells in _headline_rows():
        if cells[0] not in tasks:
            continue
        task = results[tasks[cells[0]]]
        for name, cell in zip(header[1:], cells[1:]):
            if name not in columns:
                assert cell == "–", (cells[0], name)
                continue
            summary = task[columns[name]]["inf" if columns[name] == "nonprivate" else "3"]
            expected = (round(scale * summary["mean"], 1), round(scale * summary["std"], 1))
            assert _mean_std(cell) == expected, (cells[0], name)
            checked += 1
    return checked


def test_the_readme_headline_matches_utility_json_at_epsilon_3():
    results = json.loads((ROOT / "benchmarks/results/utility.json").read_text())["test_accuracy"]
    assert _check_rows(TASKS, COLUMNS, results, scale=100) == len(TASKS) * len(COLUMNS)


def test_the_readme_language_model_row_matches_llm_summary_json_at_epsilon_3():
    results = json.loads((ROOT / "benchmarks/results/llm_summary.json").read_text())["results"]  # in percent
    assert _check_rows(LLM_TASKS, LLM_COLUMNS, results, scale=1) == len(LLM_TASKS) * len(LLM_COLUMNS)
