"""summarize_results.py --paper_table1: our Table 1 values next to the paper's, from a hand-made results tree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import summarize_results


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


FULL = {"start_index": 0, "end_index": sys.maxsize, "max_new_tokens": None}  # the paper's evaluation settings
SMOKE = {"start_index": 0, "end_index": 10, "max_new_tokens": 2}  # what a quick test run records


def _inference_run(root: Path, model: str, evaluation: dict, metrics: dict) -> None:
    run = root / "inference_llms_instruct_math_code" / model / "gsm8k" / ("smoke" if evaluation == SMOKE else "full")
    _write(run / "config.json", {"config": {"script": "inference_llms_instruct_math_code", "weight_mask_rate": 0.0,
                                            "finetuned_model_name": model, "evaluation": evaluation}})
    _write(run / "metrics.json", metrics)


def _results_tree(root: Path) -> None:
    _inference_run(root, "WizardMath-13B-V1.0", FULL, {"gsm8k": {"accuracy": 0.65, "num_examples": 1319,
                                                                 "version": 1}})
    # a smoke run: 10 examples, 2 new tokens (was labelled a full "inference" run: max_new_tokens was ignored)
    _inference_run(root, "WizardLM-13B-V1.2", SMOKE, {"gsm8k": {"accuracy": 0.3, "num_examples": 10, "version": 1}})
    grid = root / "grid_search_llms_instruct_math_code" / "instruct_math_code" / "split_seed=0,validation_fraction=0.1"
    _write(grid / "selections" / "table1_lm+math+code_task_arithmetic+dare" / "selection.json", {
        "label": "table1/lm+math+code/task_arithmetic+dare", "config": {"evaluation": FULL},
        "table1_row": ["WizardLM + WizardMath + code-alpaca", "Task Arithmetic + DARE"], "missing_points": [],
        "final": {"alpaca_eval": {"validation": {"num_examples": 81}, "test": {"num_examples": 724},
                                  "full": {"num_examples": 805}},
                  "gsm8k": {"validation": {"accuracy": 0.9}, "test": {"accuracy": 0.45}, "full": {"accuracy": 0.5}}}})
    # selected with --allow_missing over 1 of 2 points: partial, whatever its evaluation settings
    _write(grid / "selections" / "mask_merging+average_merging" / "selection.json", {
        "label": "mask_merging+average_merging", "table1_row": None, "config": {"evaluation": FULL},
        "missing_points": ["mask_merging+average_merging/weight_mask_rate=0.2"], "allow_missing": True,
        "grid_points": 2, "final": {"MATH": {"validation": {"accuracy": 0.2}, "test": {"accuracy": 0.1},
                                             "full": None}}})
    # a hand-written record without evaluation settings: never shown as full
    _write(grid / "selections" / "old" / "selection.json", {
        "label": "old", "table1_row": ["WizardLM + WizardMath", "Task Arithmetic"],
        "final": {"gsm8k": {"validation": {"accuracy": 0.7}, "test": {"accuracy": 0.6}, "full": {"accuracy": 0.61}}}})


TITLE = """\
## Table 1 side by side (ours / paper (ours - paper), x100; ? = one secondary source)

Grid selections: val · test · full = the selected setting's score on the 10 % validation sample it was selected \
on, on the other 90 % (test) and on the full set (what the paper reports; the difference is the full set's). \
Partial runs (fewer examples or new tokens than the paper's, or a selection over part of the grid) are marked \
[partial: ...]; their scores are shown only with --show_partial, without a difference.

"""
HIDDEN = "not shown, pass --show_partial"
EXPECTED = TITLE + f"""\
| models | method | ours from | AlpacaEval | GSM8K | MATH | HumanEval | MBPP |
|---|---|---|---|---|---|---|---|
| WizardLM-13B | — | inference [partial: 10 examples, 2 new tokens; {HIDDEN}] | – / 67.20 | – / 2.20 | – / 0.04? \
| – / 36.59? | – / 34.00? |
| WizardMath-13B | — | inference | – / – | 65.00 / 64.22 (+0.78) | – / 14.02 | – / – | – / – |
| llama-2-13b-code-alpaca | — | not run | – / – | – / – | – / – | – / 23.78 | – / 27.60 |
| WizardLM + WizardMath | Task Arithmetic | grid old [partial: evaluation settings not recorded; {HIDDEN}] \
| – / 67.04 | – / 66.34 | – / 13.40 | – / 28.66? | – / 30.60? |
| WizardLM + WizardMath | Task Arithmetic + DARE | not run | – / 67.45 | – / 66.26 | – / 12.86 | – / 26.83? \
| – / 32.40? |
| WizardLM + WizardMath + code-alpaca | Task Arithmetic | not run | – / 69.03 | – / 58.45 | – / 9.88 | – / 18.29 \
| – / 29.80 |
| WizardLM + WizardMath + code-alpaca | Task Arithmetic + DARE | grid table1/lm+math+code/task_arithmetic+dare \
| files / 69.28 | val 90.00 · test 45.00 · full 50.00 / 56.48 (-6.48) | – / 10.16 | – / 23.17 | – / 31.60 |
| WizardLM + WizardMath + code-alpaca | TIES + DARE | not run | – / 72.50? | – / 58.00? | – / 9.20? | – / 29.27? \
| – / 31.40? |
| (not a Table 1 row) | mask_merging+average_merging | grid mask_merging+average_merging \
[partial: selection over 1 of 2 grid points; {HIDDEN}] | – / – | – / – | – / – | – / – | – / – |
"""


def test_paper_table1_side_by_side_matches_the_hand_written_table(tmp_path, capsys):
    _results_tree(tmp_path / "results")
    summary = summarize_results.main(["--results_dir", str(tmp_path / "results"), "--paper_table1"])
    assert summary["markdown"] == EXPECTED and capsys.readouterr().out == EXPECTED
    written = tmp_path / "results" / "summary"
    assert (written / "table1.md").read_text() == EXPECTED
    rows = (written / "table1.csv").read_text().splitlines()
    assert rows[0] == ("models,method,ours from,evaluation,benchmark,ours,ours validation,ours test,paper,difference,"
                       "paper source")
    assert "WizardMath-13B,—,inference,full,GSM8K,65.0,,,64.22,0.7800000000000011,S" in rows
    assert "WizardLM-13B,—,\"inference [partial: 10 examples, 2 new tokens; not shown, pass --show_partial]\"," \
           "\"partial: 10 examples, 2 new tokens\",MATH,,,,0.04,,S ?" in rows
    # the grid selection's three parts side by side: validation (selected on), test (the other 90 %), full
    assert ("WizardLM + WizardMath + code-alpaca,Task Arithmetic + DARE,grid table1/lm+math+code/task_arithmetic+dare,"
            "full,GSM8K,50.0,90.0,45.0,56.48,-6.479999999999997,\"S, A#37\"") in rows


def test_a_smoke_run_is_never_shown_as_full(tmp_path):
    _results_tree(tmp_path / "results")
    hidden = summarize_results.main(["--results_dir", str(tmp_path / "results"), "--paper_table1"])["markdown"]
    smoke = next(line for line in hidden.splitlines() if line.startswith("| WizardLM-13B |"))
    assert "partial: 10 examples, 2 new tokens" in smoke and "30.00" not in smoke
    shown = summarize_results.main(["--results_dir", str(tmp_path / "results"), "--paper_table1",
                                    "--show_partial"])["markdown"]
    rows = {line.split(" | ")[2]: line for line in shown.splitlines() if line.startswith("| ")}
    # shown with --show_partial, still marked partial, and no difference from the paper's full-set number
    assert rows["inference [partial: 10 examples, 2 new tokens]"].split(" | ")[4] == "30.00 / 2.20"
    assert rows["grid old [partial: evaluation settings not recorded]"].split(" | ")[4] == (
        "val 70.00 · test 60.00 · full 61.00 / 66.34")
    assert rows["grid mask_merging+average_merging [partial: selection over 1 of 2 grid points]"].split(" | ")[5] == (
        "val 20.00 · test 10.00 · full – / –")
    assert rows["inference"].split(" | ")[4] == "65.00 / 64.22 (+0.78)"  # the full run is unchanged


def test_partial_evaluation_names_what_differs_from_the_paper():
    from llms.paper_table1 import partial_evaluation

    assert partial_evaluation(FULL) is None
    assert partial_evaluation({"start_index": 0, "end_index": sys.maxsize}) is None  # older records: no token key
    assert partial_evaluation(SMOKE) == "10 examples, 2 new tokens"
    assert partial_evaluation({**FULL, "max_new_tokens": 64}) == "64 new tokens"
    assert partial_evaluation({**FULL, "start_index": 5}) == "examples from #5 on"
    assert partial_evaluation({**FULL, "start_index": 5, "end_index": 15}) == "10 examples from #5"
    assert partial_evaluation(None) == "evaluation settings not recorded"
