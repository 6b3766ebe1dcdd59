"""Table 1 from data to table on the tiny Llama family (HF backend, 10 examples, 2 new tokens): a single-model run,
a Table 1 preset's grid in 2 shards, the selection, AlpacaEval judged by hand-written annotations in the files the
``alpaca_eval`` CLI writes (the judge itself needs an API key and the network), ingested with the printed commands,
then ``summarize_results.py --paper_table1``. A smoke run: no cell may be labelled full.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
from pathlib import Path

import pytest
from test_llm_merging import family  # noqa: F401  (module fixture: the tiny base + instruct/math/code family)

import evaluate_generations
import grid_search_llms_instruct_math_code as grid_script
import inference_llms_instruct_math_code as inference_script
import summarize_results
from evaluation import generation
from llms.llm_grid_search import UnscoredPointsError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRESET = "table1/lm+math/task_arithmetic"  # WizardLM + WizardMath, Task Arithmetic: every cell by the grid
ROW = "| WizardLM + WizardMath | Task Arithmetic |"
SMOKE = ["--end_index", "10", "--max_new_tokens", "2", "--backend", "hf", "--quiet"]


def judge(model_outputs: Path, preference) -> list[dict]:
    """What ``alpaca_eval`` writes to annotations.json for ``model_outputs``, with hand-picked preferences:
    ``preference(position)`` (2 = the model wins, 1 = the reference, 1.5 = a draw)."""
    outputs = json.loads(model_outputs.read_text())
    return [{"instruction": o["instruction"], "output_1": f"reference answer {n}", "generator_1": "text_davinci_003",
             "dataset": o["dataset"], "output_2": o["output"], "generator_2": o["generator"],
             "annotator": "chatgpt_fn", "preference": preference(n), "time_per_example": 0.5,
             "price_per_example": 0.001} for n, o in enumerate(outputs)]


def run_pending(results: Path, capsys, preference_for) -> list[str]:
    """Every printed alpaca_eval call 'run' (its annotations.json written by hand), then its printed ingestion
    command; returns the judged model outputs files."""
    evaluate_generations.main(["--pending_alpaca_eval", str(results)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    assert len(lines) % 2 == 0 and lines, lines
    judged = []
    for call, ingest in zip(lines[::2], lines[1::2], strict=True):
        words = shlex.split(call)
        assert words[:2] == ["IS_ALPACA_EVAL_2=False", "alpaca_eval"] and ingest.startswith("python evaluate_gen")
        model_outputs = Path(words[words.index("--model_outputs") + 1])
        output_path = Path(words[words.index("--output_path") + 1])
        annotators = words[words.index("--annotators_config") + 1]
        written = output_path / annotators / "annotations.json"  # alpaca_eval >= 0.5: a subfolder per judge
        written.parent.mkdir(parents=True)
        written.write_text(json.dumps(judge(model_outputs, preference_for(model_outputs))))
        evaluate_generations.main(shlex.split(ingest)[2:])
        judged.append(str(model_outputs.relative_to(results)))
    capsys.readouterr()
    return judged


def test_table1_from_data_to_table(family, tmp_path, shared_data_dir, capsys):  # noqa: F811
    results = tmp_path / "results"
    models = [arg for name, path in family.items() for arg in ("--model_path", f"{name}={path}")]
    common = [*models, "--data_dir", str(shared_data_dir), "--results_dir", str(results), *SMOKE]
    # a single model's row: WizardLM-13B on AlpacaEval
    inference_script.main([*common, "--finetuned_model_name", "WizardLM-13B-V1.2", "--dataset_name", "alpaca_eval",
                           "--weight_mask_rate", "0.0"])
    generation.release_hf_model()
    # the preset's grid (narrowed to lambda 0.5 / 1.0 and two benchmarks), in 2 shards
    grid = [*common, "--preset", PRESET, "--datasets", "alpaca_eval", "gsm8k", "--scaling_coefficients", "0.5", "1.0",
            "--save_merge_models_dir", str(tmp_path / "merged")]
    for shard in ("0/2", "1/2"):
        assert len(grid_script.main([*grid, "--stage", "grid", "--shard", shard])["finished_points"]) == 1
    with pytest.raises(UnscoredPointsError, match="alpaca_eval: 2 of 2 finished points have no validation score"):
        grid_script.main([*grid, "--stage", "select"])  # AlpacaEval's validation scores come first
    capsys.readouterr()

    def first_round(model_outputs: Path):
        if "validation" in model_outputs.parts:  # a grid point's validation sample: lambda = 1.0 wins
            return lambda n: 2 if "scaling_coefficient=1.0" in str(model_outputs) else 1
        return lambda n: (2, 1, 1.5)[n % 3]  # the single model: 10 instructions

    judged = run_pending(results, capsys, first_round)
    assert len(judged) == 3 and sum("/points/" in j for j in judged) == 2
    selection = grid_script.main([*grid, "--stage", "select"])
    assert selection["selection"]["alpaca_eval"]["key"].endswith("scaling_coefficient=1.0")
    assert selection["validation_scores"]["alpaca_eval"] == {
        k: (100.0 if k.endswith("1.0") else 0.0) for k in selection["validation_scores"]["alpaca_eval"]}
    # the selected point's AlpacaEval parts (validation 1, test 9, full 10 instructions)
    judged = run_pending(results, capsys, lambda model_outputs: lambda n: 2 if n % 2 == 0 else 1)
    assert sorted(Path(j).parts[-3] for j in judged) == ["full", "test", "validation"]
    assert "no AlpacaEval model outputs without a score" in evaluate_generations.main(
        ["--pending_alpaca_eval", str(results)])["pending"]

    hidden = summarize_results.main(["--results_dir", str(results), "--paper_table1"])["markdown"]
    shown = summarize_results.main(["--results_dir", str(results), "--paper_table1", "--show_partial"])["markdown"]
    for markdown, label in ((hidden, "[partial: 10 examples, 2 new tokens; not shown, pass --show_partial]"),
                            (shown, "[partial: 10 examples, 2 new tokens]")):
        ours = {line.split(" | ")[0]: line.split(" | ") for line in markdown.splitlines()
                if line.startswith(("| WizardLM-13B |", ROW))}
        assert len(ours) == 2 and all(cells[2].endswith(label) for cells in ours.values())
    assert ours["| WizardLM-13B"][3] == "55.00 / 67.20"  # 4 wins and 3 draws of 10; no difference: a smoke run
    # the selected point's val (1 instruction, won) · test (5 of 9 won) · full (5 of 10): never 'files'
    assert ours["| WizardLM + WizardMath"][3] == "val 100.00 · test 55.56 · full 50.00 / 67.04"
    gsm8k = ours["| WizardLM + WizardMath"][4]
    assert gsm8k.startswith("val ") and " · test " in gsm8k and gsm8k.endswith(" / 66.34")
    assert "55.00" not in hidden and "val 100.00" not in hidden  # hidden unless --show_partial
    rows = list(csv.DictReader(io.StringIO((results / "summary" / "table1.csv").read_text())))
    ran = [r for r in rows if r["ours from"] != "not run"]
    assert {(r["models"], r["benchmark"]) for r in ran if r["ours"]} == {
        ("WizardLM-13B", "AlpacaEval"), ("WizardLM + WizardMath", "AlpacaEval"), ("WizardLM + WizardMath", "GSM8K")}
    assert all(r["evaluation"] == "partial: 10 examples, 2 new tokens" and r["difference"] == "" for r in ran)
    assert not any(r["evaluation"] == "full" for r in rows)  # no cell of this smoke run is labelled full
