"""summarize_results.py --paper_table1: our Table 1 values next to the paper's, from a hand-made results tree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import summarize_results


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _results_tree(root: Path) -> None:
    run = root / "inference_llms_instruct_math_code" / "WizardMath-13B-V1.0" / "gsm8k" / "weight_mask_rate=0.0"
    _write(run / "config.json", {"config": {"script": "inference_llms_instruct_math_code", "weight_mask_rate": 0.0,
                                            "finetuned_model_name": "WizardMath-13B-V1.0",
                                            "evaluation": {"start_index": 0, "end_index": sys.maxsize}}})
    _write(run / "metrics.json", {"gsm8k": {"accuracy": 0.65, "num_examples": 1319, "version": 1}})
    grid = root / "grid_search_llms_instruct_math_code" / "instruct_math_code" / "split_seed=0,validation_fraction=0.1"
    _write(grid / "selections" / "table1_lm+math+code_task_arithmetic+dare" / "selection.json", {
        "label": "table1/lm+math+code/task_arithmetic+dare",
        "table1_row": ["WizardLM + WizardMath + code-alpaca", "Task Arithmetic + DARE"],
        "final": {"alpaca_eval": {"validation": {"num_examples": 81}, "test": {"num_examples": 724},
                                  "full": {"num_examples": 805}},
                  "gsm8k": {"validation": {"accuracy": 0.9}, "test": {"accuracy": 0.45}, "full": {"accuracy": 0.5}}}})
    _write(grid / "selections" / "mask_merging+average_merging" / "selection.json", {
        "label": "mask_merging+average_merging", "table1_row": None,
        "final": {"MATH": {"validation": {"accuracy": 0.2}, "test": {"accuracy": 0.1}, "full": None}}})


EXPECTED = """\
## Table 1 side by side (ours / paper (ours - paper), x100; ? = one secondary source)

| models | method | ours from | AlpacaEval | GSM8K | MATH | HumanEval | MBPP |
|---|---|---|---|---|---|---|---|
| WizardLM-13B | — | not run | – / 67.20 | – / 2.20 | – / 0.04? | – / 36.59? | – / 34.00? |
| WizardMath-13B | — | inference | – / – | 65.00 / 64.22 (+0.78) | – / 14.02 | – / – | – / – |
| llama-2-13b-code-alpaca | — | not run | – / – | – / – | – / – | – / 23.78 | – / 27.60 |
| WizardLM + WizardMath | Task Arithmetic | not run | – / 67.04 | – / 66.34 | – / 13.40 | – / 28.66? | – / 30.60? |
| WizardLM + WizardMath | Task Arithmetic + DARE | not run | – / 67.45 | – / 66.26 | – / 12.86 | – / 26.83? \
| – / 32.40? |
| WizardLM + WizardMath + code-alpaca | Task Arithmetic | not run | – / 69.03 | – / 58.45 | – / 9.88 | – / 18.29 \
| – / 29.80 |
| WizardLM + WizardMath + code-alpaca | Task Arithmetic + DARE | grid table1/lm+math+code/task_arithmetic+dare (full) \
| files / 69.28 | 50.00 / 56.48 (-6.48) | – / 10.16 | – / 23.17 | – / 31.60 |
| WizardLM + WizardMath + code-alpaca | TIES + DARE | not run | – / 72.50? | – / 58.00? | – / 9.20? | – / 29.27? \
| – / 31.40? |
| (not a Table 1 row) | mask_merging+average_merging | grid mask_merging+average_merging (test) | – / – | – / – \
| 10.00 / – | – / – | – / – |
"""


def test_paper_table1_side_by_side_matches_the_hand_written_table(tmp_path, capsys):
    _results_tree(tmp_path / "results")
    summary = summarize_results.main(["--results_dir", str(tmp_path / "results"), "--paper_table1"])
    assert summary["markdown"] == EXPECTED and capsys.readouterr().out == EXPECTED
    written = tmp_path / "results" / "summary"
    assert (written / "table1.md").read_text() == EXPECTED
    rows = (written / "table1.csv").read_text().splitlines()
    assert rows[0] == "models,method,ours from,benchmark,ours,paper,difference,paper source"
    assert "WizardMath-13B,—,inference,GSM8K,65.0,64.22,0.7800000000000011,S" in rows
    assert "WizardLM-13B,—,not run,MATH,,0.04,,S ?" in rows
