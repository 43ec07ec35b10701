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


def test_the_readme_headline_matches_utility_json_at_epsilon_3():
    results = json.loads((ROOT / "benchmarks/results/utility.json").read_text())["test_accuracy"]
    checked = 0
    for header, cells in _headline_rows():
        if cells[0] not in TASKS:
            continue
        task = results[TASKS[cells[0]]]
        for name, cell in zip(header[1:], cells[1:]):
            method = COLUMNS[name]
            summary = task[method]["inf" if method == "nonprivate" else "3"]
            expected = (round(100 * summary["mean"], 1), round(100 * summary["std"], 1))
            assert _mean_std(cell) == expected, (cells[0], name)
            checked += 1
    assert checked == len(TASKS) * len(COLUMNS)


def test_the_readme_language_model_row_matches_llm_summary_json_at_epsilon_3():
    results = json.loads((ROOT / "benchmarks/results/llm_summary.json").read_text())["results"]
    checked = 0
    for header, cells in _headline_rows():
        if cells[0] not in LLM_TASKS:
            continue
        task = results[LLM_TASKS[cells[0]]]
        for name, cell in zip(header[1:], cells[1:]):
            if name not in LLM_COLUMNS:
                assert cell == "–", (cells[0], name)
                continue
            method = LLM_COLUMNS[name]
            summary = task[method]["inf" if method == "nonprivate" else "3"]
            assert _mean_std(cell) == (round(summary["mean"], 1), round(summary["std"], 1)), (cells[0], name)
            checked += 1
    assert checked == len(LLM_TASKS) * len(LLM_COLUMNS)
