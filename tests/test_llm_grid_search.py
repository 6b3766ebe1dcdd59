"""The paper's LLM selection protocol: split, grid, sharding, selection on validation only, resume, presets, estimate.

End to end on the tiny Llama family of ``test_llm_merging.py`` (HF backend, 10 examples, 2 new tokens); the
selection logic is also checked with a fake evaluation whose validation and test scores disagree.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
from test_generation_subprocess import token_vllm  # noqa: F401  (fake vLLM, child processes run and counted here)
from test_llm_merging import _fail, family  # noqa: F401  (module fixture: the tiny base + instruct/math/code family)

import grid_search_llms_instruct_math_code as grid_script
import summarize_results
from evaluation import generation
from evaluation.alpaca_eval import pending
from evaluation.tasks import get_task
from llms import llm_grid_search, llm_merging, llm_pipeline
from llms.llm_compute_estimate import describe_plan, plan_compute
from llms.llm_grid import (
    describe_point,
    expand_points,
    grid_methods,
    merge_pass_groups,
    parse_shard,
    shard_points,
)
from llms.llm_grid_search import (
    GridSearchConfig,
    IncompleteGridError,
    UnscoredPointsError,
    point_lock,
    run_grid_search,
)
from llms.llm_pipeline import EvaluationSettings
from llms.llm_validation_split import split_positions
from merge_engine.output_folder import MERGE_CONFIG
from model_merging_methods import Dare, Recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TA = "task_arithmetic"


# --- validation / test split ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 10, 20, 1319])
def test_split_is_disjoint_covers_the_set_and_takes_ten_percent(n):
    split = split_positions(n, dataset_name="gsm8k")
    assert not set(split.validation) & set(split.test)
    assert sorted(split.validation + split.test) == list(range(n))
    assert len(split.validation) == min(n - 1, max(1, round(0.1 * n)))
    assert list(split.validation) == sorted(split.validation) and list(split.test) == sorted(split.test)


def test_split_is_seeded_and_stable():
    assert split_positions(20, dataset_name="gsm8k") == split_positions(20, dataset_name="gsm8k")
    # pinned: a change of the sampling rule would silently change every published validation sample
    assert split_positions(20, dataset_name="gsm8k").validation == (13, 14)
    assert split_positions(20, dataset_name="gsm8k", seed=1).validation == (0, 8)
    assert split_positions(1319, dataset_name="gsm8k").validation[:5] == (13, 14, 15, 20, 23)
    assert split_positions(20, dataset_name="MATH").validation != (13, 14)  # each benchmark its own sample


def test_split_rejects_what_cannot_be_split():
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_positions(1, dataset_name="gsm8k")
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        split_positions(10, dataset_name="gsm8k", fraction=1.0)


# --- grid and shards --------------------------------------------------------------------------------------------


def _ta(scaling_coefficient: float) -> Recipe:
    return Recipe(TA, {"scaling_coefficient": scaling_coefficient})


def test_grid_expands_the_paper_ranges():
    assert grid_methods() == ("average_merging", TA, "ties_merging", "mask_merging+average_merging",
                              "mask_merging+task_arithmetic", "mask_merging+ties_merging")
    assert len(expand_points(["mask_merging+task_arithmetic"])) == 6 * 9
    ties_dare = expand_points(["mask_merging+ties_merging"], settings={"ties_trim_scope": "per_tensor", "seed": 3})
    assert len(ties_dare) == 6 * 9 * 3
    assert ties_dare[0] == Recipe("ties_merging", {"scaling_coefficient": 0.5, "param_value_mask_rate": 0.5,
                                                   "ties_trim_scope": "per_tensor"}, Dare(0.1, seed=3))
    assert describe_point(ties_dare[0]) == "TIES + DARE, λ=0.5, p=0.1, retain=0.5"
    assert expand_points([TA, "average_merging"], {"scaling_coefficient": [0.5, 1.0]}, {"seed": 3}) == (
        _ta(0.5), _ta(1.0), Recipe("average_merging"))
    with pytest.raises(ValueError, match="unknown grid method 'mask_merging\\+fisher_merging'"):
        expand_points(["mask_merging+fisher_merging"])


@pytest.mark.parametrize("count", [1, 2, 3, 7, 9])
def test_shards_partition_the_points_disjointly_and_completely(count):
    points = expand_points([TA], {"scaling_coefficient": [0.1 * i for i in range(1, 8)]})
    shards = [shard_points(points, parse_shard(f"{i}/{count}")) for i in range(count)]
    flat = [p for shard in shards for p in shard]
    assert len(flat) == len(set(flat)) == len(points) and set(flat) == set(points)


def test_shards_keep_the_points_that_differ_only_in_lambda_together():
    points = expand_points(["mask_merging+task_arithmetic"])  # 6 λ (slowest in grid order) x 9 drop rates
    shards = [shard_points(points, (i, 9)) for i in range(9)]
    # 9 shards of 6: each holds the 6 λ values of one drop rate, so one merge pass writes all its models
    assert [len({p.dare.weight_mask_rate for p in shard}) for shard in shards] == [1] * 9
    assert [len(merge_pass_groups(shard)) for shard in shards] == [1] * 9
    eight = [shard_points(points, (i, 8)) for i in range(8)]
    assert [len(shard) for shard in eight] == [7, 7, 7, 6, 7, 7, 7, 6]  # balanced to one point
    assert max(len(merge_pass_groups(shard)) for shard in eight) == 2  # a drop rate split over two shards at most
    assert [len(g) for g in merge_pass_groups(shards[0], max_outputs=4)] == [4, 2]
    ties = expand_points(["ties_merging"], settings={"ties_trim_scope": "per_tensor"})  # λ x retain ratio
    assert [len(g) for g in merge_pass_groups(shard_points(ties, (0, 1)))] == [6, 6, 6]


@pytest.mark.parametrize("text", ["3/3", "-1/2", "a/2", "1"])
def test_bad_shard_is_a_clear_error(text):
    with pytest.raises(ValueError, match="shard must be i/N"):
        parse_shard(text)


# --- selection looks at validation only --------------------------------------------------------------------------


# validation favours lambda=0.5, test favours lambda=1.0
FAKE_SCORES = {"0.5": {"validation": 0.6, "test": 0.1, "full": 0.15}, "1.0": {"validation": 0.4, "test": 0.9,
                                                                              "full": 0.85}}


def _fake_config(tmp_path, **overrides) -> GridSearchConfig:
    kwargs = dict(merge_tasks=("instruct", "math"), points=expand_points([TA], {"scaling_coefficient": [0.5, 1.0]}),
                  datasets=("gsm8k",), save_merge_models_dir=str(tmp_path / "merged"),
                  evaluation=EvaluationSettings(backend="hf"))
    return GridSearchConfig(**{**kwargs, **overrides})


FAKE_INSTRUCTIONS = ["Name three primary colors.", "What is 2 + 2?", "Write a haiku about rain."]
FAKE_ALPACA_PARTS = {"validation": (0,), "test": (1, 2), "full": (0, 1, 2)}


def _fake_output(value: str, i: int) -> str:
    return f"answer {i} of the merge with lambda={value}"


@pytest.fixture
def fake_evaluation(monkeypatch):
    calls: list[tuple[str, tuple[str, ...]]] = []

    @contextlib.contextmanager
    def merged_point(config, point, paths):
        calls.append((f"merge {point.hyperparameters['scaling_coefficient']}", ()))
        yield {task: Path("unused") for task in config.merge_tasks}, 0.0

    def generate_parts(config, views, datasets, folder, parts):
        return {"generation_seconds": 1.0, "generated_tokens": 10}

    def evaluate_parts(config, dataset, folder, parts, out):
        value = folder.name.split("scaling_coefficient=")[1].split(",")[0]
        calls.append((value, tuple(parts)))
        if dataset == "alpaca_eval":  # judged outside: only the model outputs file for alpaca_eval is written
            metrics = {}
            for part in parts:
                ids = FAKE_ALPACA_PARTS[part]
                records = [{"instruction": FAKE_INSTRUCTIONS[i], "dataset": "helpful_base"} for i in ids]
                predictions = [{"id": i, "completion": _fake_output(value, i)} for i in ids]
                llm_pipeline.write_external_file(get_task("alpaca_eval"), folder / out / part, records, predictions,
                                                 str(folder))
                metrics[part] = {"num_examples": len(ids), "version": 1, "ids": list(ids)}
            return metrics
        return {part: {"accuracy": FAKE_SCORES[value][part], "num_examples": 1, "ids": [0]} for part in parts}

    monkeypatch.setattr(llm_grid_search, "merged_point", merged_point)
    monkeypatch.setattr(llm_grid_search, "merge_shared_pass", lambda *args: {})  # each point merged by merged_point
    monkeypatch.setattr(llm_grid_search, "generate_parts", generate_parts)
    monkeypatch.setattr(llm_grid_search, "evaluate_parts", evaluate_parts)
    return calls


def test_selection_uses_validation_and_never_peeks_at_test(fake_evaluation, tmp_path):
    config = _fake_config(tmp_path)
    result = run_grid_search(config, tmp_path / "grid", {})
    assert result["selection"]["gsm8k"]["point"] == _ta(0.5).record()
    # grid: validation parts only; afterwards only the selected point is merged again and scored on the rest
    assert fake_evaluation == [("merge 0.5", ()), ("0.5", ("validation",)), ("merge 1.0", ()),
                               ("1.0", ("validation",)), ("merge 0.5", ()), ("0.5", ("validation", "test", "full"))]
    assert result["final"]["gsm8k"]["test"]["accuracy"] == 0.1  # the selected point's test score, not the best test
    folder = tmp_path / "grid" / "selections" / "custom"
    grid_md = (folder / "grid.md").read_text()
    assert "| task_arithmetic | 0.5 | finished | 60.00 | gsm8k |" in grid_md
    assert "| task_arithmetic | 1.0 | finished | 40.00 |  |" in grid_md
    assert (folder / "grid.csv").read_text().splitlines()[0] == "method,λ,status,gsm8k,selected for"
    record = json.loads((folder / "selection.json").read_text())
    assert record["missing_points"] == [] and record["allow_missing"] is False
    assert record["selection"]["gsm8k"]["tied"] == [] and record["tie_break"] == "the earlier point in grid order wins"


def test_a_nan_validation_score_never_wins(fake_evaluation, tmp_path, monkeypatch):
    monkeypatch.setitem(FAKE_SCORES["0.5"], "validation", float("nan"))  # the first point: NaN > x is never True
    result = run_grid_search(_fake_config(tmp_path), tmp_path / "grid", {})
    assert result["selection"]["gsm8k"]["point"] == _ta(1.0).record()
    assert result["selection"]["gsm8k"]["validation_score"] == 40.0


def test_generation_and_save_settings_name_the_grid_and_point_folders(tmp_path, monkeypatch):
    config = _fake_config(tmp_path)
    point = config.points[0]
    assert config.grid_dir("r").name == "backend=hf,split_seed=0,validation_fraction=0.1"
    float16 = _fake_config(tmp_path, evaluation=EvaluationSettings(backend="hf", dtype="float16"))
    assert float16.grid_dir("r").name == "backend=hf,dtype=float16,split_seed=0,validation_fraction=0.1"
    assert config.point_key(point) == "task_arithmetic/scaling_coefficient=0.5"
    float32 = _fake_config(tmp_path, save_dtype="float32")
    assert float32.point_key(point) == "task_arithmetic/save_dtype=float32,scaling_coefficient=0.5"
    monkeypatch.setattr(llm_pipeline, "resolve_backend", lambda backend: "vllm")  # auto on a vLLM machine
    assert EvaluationSettings().naming() == {}  # the paper's backend and dtype: left out of the names


def test_selection_refuses_while_a_point_is_missing(fake_evaluation, tmp_path):
    config = _fake_config(tmp_path)
    held = tmp_path / "grid" / "points" / config.point_key(config.points[1])
    with point_lock(held) as acquired:  # a concurrent --stage all job works on the second point
        assert acquired
        with pytest.raises(IncompleteGridError) as error:
            run_grid_search(config, tmp_path / "grid", {})
    message = str(error.value)
    assert "1 of 2 grid points are not finished" in message and config.point_key(config.points[1]) in message
    assert "--stage select" in message and "--allow_missing" in message
    # refused before any final merge, and no selection.json for the summary to trust
    assert fake_evaluation == [("merge 0.5", ()), ("0.5", ("validation",))]
    assert not (tmp_path / "grid" / "selections" / "custom" / "selection.json").exists()


def test_allow_missing_selects_among_the_finished_points_and_records_the_missing(fake_evaluation, tmp_path):
    config = _fake_config(tmp_path, allow_missing=True)
    missing = config.point_key(config.points[1])
    with point_lock(tmp_path / "grid" / "points" / missing) as acquired:
        assert acquired
        result = run_grid_search(config, tmp_path / "grid", {})
    assert result["missing_points"] == [missing] and result["allow_missing"] is True
    assert ("1.0", ("validation",)) not in fake_evaluation
    record = json.loads((tmp_path / "grid" / "selections" / "custom" / "selection.json").read_text())
    assert record["missing_points"] == [missing] and record["allow_missing"] is True
    assert record["grid_points"] == 2 and record["finished_points"] == 1
    assert "**Selection over a partial grid** (--allow_missing): 1 of 2 points not finished. Missing points (1)" in (
        result["markdown"])
    selected = "| gsm8k | Task Arithmetic, λ=0.5 | validation grid | 60.00 | 10.00 | 15.00 | 1 | 1 |"
    assert f"{selected} 1 of 2 (partial grid) |  |" in result["markdown"]


def test_allow_missing_flag_reaches_the_configuration():
    argv = ["--merge_instruct", "--merge_math", "--merging_methods", TA]
    assert not grid_script.build_config(grid_script.parse_args(argv)).allow_missing
    config = grid_script.build_config(grid_script.parse_args([*argv, "--allow_missing"]))
    assert config.allow_missing and config.record()["allow_missing"] is True


def test_tied_points_are_listed_logged_and_the_rule_stated(fake_evaluation, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(FAKE_SCORES["1.0"], "validation", 0.6)  # both points score 60.00 on validation
    config = _fake_config(tmp_path)
    keys = [config.point_key(p) for p in config.points]
    with caplog.at_level("WARNING", logger="llms.llm_grid_search"):
        result = run_grid_search(config, tmp_path / "grid", {})
    assert result["selection"]["gsm8k"]["point"] == _ta(0.5).record()  # the earlier point in grid order wins
    record = json.loads((tmp_path / "grid" / "selections" / "custom" / "selection.json").read_text())
    assert record["selection"]["gsm8k"]["tied"] == keys
    assert record["tie_break"] == "the earlier point in grid order wins"
    assert f"gsm8k: 2 points share the best validation score 60.00 ({', '.join(keys)})" in caplog.text
    assert "| tied (the earlier point in grid order wins) |" in result["markdown"]
    assert "| 2 of 2 | Task Arithmetic, λ=0.5; Task Arithmetic, λ=1.0 |" in result["markdown"]
    assert "Ties for the best validation score: the earlier point in grid order wins" in result["markdown"]


def _table1_row(tmp_path, *flags: str) -> str:
    markdown = summarize_results.main(["--results_dir", str(tmp_path / "grid"), "--output_dir", str(tmp_path / "out"),
                                       "--paper_table1", *flags])["markdown"]
    return next(line for line in markdown.splitlines()
                if line.startswith("| WizardLM + WizardMath | Task Arithmetic |"))


def test_table1_shows_the_three_parts_and_never_calls_a_smoke_run_full(fake_evaluation, tmp_path):
    row = ("WizardLM + WizardMath", "Task Arithmetic")
    smoke = _fake_config(tmp_path, table1_row=row, evaluation=EvaluationSettings(backend="hf", end_index=10,
                                                                               max_new_tokens=2))
    run_grid_search(smoke, tmp_path / "grid", {})
    line = _table1_row(tmp_path)
    assert "grid custom [partial: 10 examples, 2 new tokens; not shown, pass --show_partial]" in line
    assert "15.00" not in line and "| – / 66.34 |" in line
    line = _table1_row(tmp_path, "--show_partial")
    # still marked partial, and no difference from the paper's full-set number
    assert ("grid custom [partial: 10 examples, 2 new tokens] | – / 67.04 | val 60.00 · test 10.00 · full 15.00 "
            "/ 66.34 |") in line
    # the same selection with the paper's evaluation settings: full, the difference is the full set's
    full_dir = tmp_path / "grid" / "selections" / "custom" / "selection.json"
    record = json.loads(full_dir.read_text())
    record["config"]["evaluation"].update(end_index=llm_pipeline.EvaluationSettings().end_index, max_new_tokens=None)
    full_dir.write_text(json.dumps(record))
    line = _table1_row(tmp_path)
    assert f"| grid custom | – / 67.04 | val 60.00 · test 10.00 · full 15.00 / 66.34 ({15.0 - 66.34:+.2f}) |" in line


def _judge(target, preferences: dict[int, float], folder: Path) -> Path:
    """A hand-made alpaca_eval annotations.json for the target's model outputs: ``{example: preference}``."""
    outputs = json.loads(target.model_outputs.read_text())
    ids = [FAKE_INSTRUCTIONS.index(o["instruction"]) for o in outputs]
    records = [{"instruction": o["instruction"], "output_1": "reference", "generator_1": "text_davinci_003",
                "output_2": o["output"], "generator_2": o["generator"], "annotator": "chatgpt_fn",
                "preference": preferences[i]} for o, i in zip(outputs, ids, strict=True)]
    path = folder / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def test_alpaca_eval_grid_ingest_select_final_and_table1(fake_evaluation, tmp_path, capsys):
    import evaluate_generations

    row = ("WizardLM + WizardMath", "Task Arithmetic")
    config = _fake_config(tmp_path, datasets=("alpaca_eval", "gsm8k"), table1_row=row)
    grid = tmp_path / "grid"
    run_grid_search(config, grid, {}, stage="grid")
    # the selection needs the AlpacaEval validation scores: refused, naming the points and the command
    with pytest.raises(UnscoredPointsError) as error:
        run_grid_search(config, grid, {}, stage="select")
    message = str(error.value)
    keys = [config.point_key(p) for p in config.points]
    assert f"alpaca_eval: 2 of 2 finished points have no validation score ({', '.join(keys)})" in message
    assert f"--pending_alpaca_eval {grid}" in message and "--allow_missing" in message
    assert not (grid / "selections" / "custom" / "selection.json").exists()
    waiting = pending(grid)
    assert [(t["target"].kind, t["target"].point_key) for t in waiting] == [("grid validation", k) for k in keys]
    # the judge prefers lambda=1.0 on validation (gsm8k's validation favours 0.5)
    for item, preference in zip(waiting, (1, 2), strict=True):
        annotations = _judge(item["target"], {0: preference}, tmp_path / "judged" / str(preference))
        evaluate_generations.main(["--dataset_name", "alpaca_eval", "--run_dir", str(item["target"].folder),
                                   "--alpaca_eval_annotations", str(annotations)])
    stored = json.loads((grid / "external_scores" / "alpaca_eval.json").read_text())
    assert {k: v["win_rate"] for k, v in stored.items()} == {keys[0]: 0.0, keys[1]: 100.0}
    fake_evaluation.clear()
    result = run_grid_search(config, grid, {}, stage="select")
    assert result["selection"]["alpaca_eval"]["key"] == keys[1] and result["selection"]["gsm8k"]["key"] == keys[0]
    assert result["selection"]["alpaca_eval"]["validation_score"] == 100.0 and result["unscored_points"] == {}
    assert ("1.0", ("validation", "test", "full")) in fake_evaluation
    assert "| task_arithmetic | 1.0 | finished | 100.00 | 40.00 | alpaca_eval |" in result["markdown"]
    # the selected point's final parts wait for their judge; Table 1 says 'files' until then
    line = _table1_row(tmp_path)
    assert "| grid custom | files / 67.04 |" in line
    waiting = pending(grid)
    assert [(t["target"].kind, t["target"].part) for t in waiting] == [
        ("grid final", "full"), ("grid final", "test"), ("grid final", "validation")]
    judged = {0: 2, 1: 2, 2: 1}
    for item in waiting:
        annotations = _judge(item["target"], judged, tmp_path / "final" / item["target"].part)
        evaluate_generations.main(["--dataset_name", "alpaca_eval", "--run_dir", str(item["target"].folder),
                                   "--alpaca_eval_annotations", str(annotations)])
    assert pending(grid) == []
    line = _table1_row(tmp_path)  # read from the point's final/alpaca_eval.json, no new selection needed
    assert f"| grid custom | val 100.00 · test 50.00 · full 66.67 / 67.04 ({200 / 3 - 67.04:+.2f}) |" in line
    again = run_grid_search(config, grid, {}, stage="select")  # refreshes the selection's own tables, no generation
    assert "| alpaca_eval | Task Arithmetic, λ=1.0 | validation grid | 100.00 | 50.00 | 66.67 | 1 | 2 |" in (
        again["markdown"])


def test_allow_missing_selects_among_the_scored_points_and_marks_table1_partial(fake_evaluation, tmp_path):
    row = ("WizardLM + WizardMath", "Task Arithmetic")
    config = _fake_config(tmp_path, datasets=("alpaca_eval", "gsm8k"), table1_row=row, allow_missing=True)
    key = config.point_key(config.points[1])
    scores = tmp_path / "grid" / "external_scores" / "alpaca_eval.json"
    scores.parent.mkdir(parents=True)
    scores.write_text(json.dumps({key: 55.0}))  # the plain {point key: percent} format is still read
    result = run_grid_search(config, tmp_path / "grid", {})
    assert result["selection"]["alpaca_eval"]["key"] == key
    assert result["unscored_points"] == {"alpaca_eval": [config.point_key(config.points[0])]}
    line = _table1_row(tmp_path)
    assert "[partial: alpaca_eval selected without 1 unscored points; not shown, pass --show_partial]" in line


def test_a_benchmark_added_later_is_evaluated_alone_on_finished_points(fake_evaluation, tmp_path):
    run_grid_search(_fake_config(tmp_path), tmp_path / "grid", {}, stage="grid")
    fake_evaluation.clear()
    run_grid_search(_fake_config(tmp_path, datasets=("gsm8k", "MATH")), tmp_path / "grid", {}, stage="grid")
    assert [c for c in fake_evaluation if c[1]] == [("0.5", ("validation",)), ("1.0", ("validation",))]
    result = json.loads(next((tmp_path / "grid" / "points").rglob("result.json")).read_text())
    assert set(result["validation"]) == {"gsm8k", "MATH"}


def test_stated_settings_skip_the_grid(fake_evaluation, tmp_path):
    stated = _ta(1.0)
    config = _fake_config(tmp_path, points=(), fixed={"gsm8k": (stated, "A#39")})
    result = run_grid_search(config, tmp_path / "grid", {})
    assert fake_evaluation == [("merge 1.0", ()), ("1.0", ("validation", "test", "full"))]
    assert result["selection"]["gsm8k"]["selected_by"] == "A#39"


# --- presets ----------------------------------------------------------------------------------------------------


def _lambda_p(point: Recipe) -> tuple[float, float]:
    return point.hyperparameters["scaling_coefficient"], point.dare.weight_mask_rate


def _preset_config(name: str, *flags: str) -> GridSearchConfig:
    return grid_script.build_config(grid_script.parse_args(["--preset", name, *flags]))


def test_presets_expand_to_the_stated_settings():
    config = _preset_config("table1/lm+math/task_arithmetic+dare")
    ta_dare = "mask_merging+task_arithmetic"
    assert config.merge_tasks == ("instruct", "math") and config.points == ()
    assert {d: _lambda_p(p) for d, (p, _) in config.fixed.items()} == {
        "alpaca_eval": (1.0, 0.2), "gsm8k": (0.5, 0.6), "MATH": (0.5, 0.6), "human_eval": (0.5, 0.6),
        "mbpp": (0.5, 0.6)}
    assert all(p.method_key == ta_dare and "A#39" in source for p, source in config.fixed.values())
    merge = config.merge_config(config.fixed["gsm8k"][0])
    assert (merge.recipe.merging_method_name, merge.recipe.method, merge.recipe.dare.use_weight_rescale) == (
        "mask_merging", "task_arithmetic", True)
    assert _preset_config("table1/lm+math/task_arithmetic+dare", "--seed", "2").fixed["gsm8k"][0].dare.seed == 2
    code = _preset_config("table1/math+code/task_arithmetic+dare")
    assert {d: _lambda_p(p) for d, (p, _) in code.fixed.items()} == {
        "gsm8k": (1.0, 0.5), "MATH": (1.0, 0.5), "human_eval": (0.5, 0.9), "mbpp": (0.5, 0.9)}
    lm_code = _preset_config("table1/lm+code/task_arithmetic+dare")
    assert {d: _lambda_p(p) for d, (p, _) in lm_code.fixed.items()} == {
        "alpaca_eval": (1.0, 0.3), "human_eval": (1.0, 0.3), "mbpp": (0.5, 0.4)}


def test_unknown_preset_cells_fall_back_to_the_grid():
    config = _preset_config("table1/lm+math+code/task_arithmetic+dare")
    assert set(config.fixed) == {"alpaca_eval", "gsm8k", "MATH"}
    assert config.grid_datasets == ("human_eval", "mbpp") and len(config.points) == 54
    a21 = _preset_config("table1/lm+math+code/average_or_task_arithmetic+dare")
    assert [describe_point(p) for p in a21.points] == ["Average Merging + DARE, p=0.5",
                                                       "Task Arithmetic + DARE, λ=1.0, p=0.1"]
    ties = _preset_config("table1/lm+math+code/ties_merging+dare")
    assert len(ties.points) == 162 and {p.hyperparameters["ties_trim_scope"] for p in ties.points} == {"per_tensor"}
    assert _preset_config("table1/lm+math/task_arithmetic+dare", "--datasets", "gsm8k").datasets == ("gsm8k",)


@pytest.mark.parametrize(
    ("argv", "match"),
    [(["--preset", "table1/lm+math/task_arithmetc+dare"], "Did you mean: table1/lm\\+math/task_arithmetic\\+dare"),
     (["--preset", "table1/lm+math/task_arithmetic", "--merge_code"], "sets the models"),
     (["--merge_instruct", "--merge_math"], "--merging_methods"),
     (["--merge_instruct", "--merge_math", "--merging_methods", TA, "--overwrite"], "never replaced"),
     (["--merge_instruct", "--merge_math", "--merging_methods", "mask_merging+task_arithmetic",
       "--weight_mask_rates", "1.0"], "weight_mask_rate"),
     (["--merge_instruct", "--merge_math", "--merging_methods", TA, "--shard", "0/2"], "--stage grid")],
)
def test_bad_flags_fail_before_any_work(argv, match, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_merging, "merge_checkpoints", None)
    with pytest.raises(ValueError, match=match):
        grid_script.main([*argv, "--results_dir", str(tmp_path)])


def test_list_presets_names_every_source(capsys):
    grid_script.main(["--list_presets"])
    out = capsys.readouterr().out
    assert "table1/lm+math/task_arithmetic+dare" in out and "λ=0.5, p=0.6" in out and "A#39" in out
    assert "unknown (A#39 is cut off here)" in out


# --- compute estimate -------------------------------------------------------------------------------------------


def test_estimate_counts_merges_examples_and_tokens():
    plan = plan_compute(grid_points=3, grid_datasets=["gsm8k"], final_datasets={"gsm8k": 18, "MATH": 20},
                        final_merges=2, validation_sizes={"gsm8k": 2}, max_new_tokens={"gsm8k": 10, "MATH": 100})
    # 3 points x 2 validation examples + 18 test examples of gsm8k at 10 tokens; 20 MATH examples at 100 tokens
    assert plan.examples == {"gsm8k": 24, "MATH": 20} and plan.tokens_upper_bound == 24 * 10 + 20 * 100
    # model loads: 3 points x gsm8k, then one final run per benchmark (gsm8k, MATH) = 5
    assert plan.engine_starts == 5
    text = describe_plan(plan, tokens_per_second=56.0, tps_source="given", merge_seconds=10.0, merge_source="given",
                         engine_start_seconds=2.0, engine_source="given")
    assert "merges: 3 grid points + up to 2 selected" in text
    assert "generation: at most 40 s at 56 tokens/s" in text and "share one pass): 50 s" in text
    assert "a folder's benchmarks share one engine; at most): 5 x 2 s = 10 s" in text
    assert "total: at most 100 s" in text
    assert "not counted: code execution, AlpacaEval judging" in text


def test_estimate_counts_one_model_load_per_merge_and_task_folder():
    sizes = {"gsm8k": 2, "MATH": 2, "alpaca_eval": 2}
    kwargs = dict(grid_points=3, grid_datasets=["alpaca_eval"], final_datasets={"gsm8k": 10, "MATH": 10,
                                                                                  "alpaca_eval": 9},
                  final_merges=2, validation_sizes=sizes, max_new_tokens={d: 4 for d in sizes},
                  dataset_folders={"gsm8k": "math", "MATH": "math", "alpaca_eval": "instruct"},
                  stated_points={"gsm8k": _ta(0.5), "MATH": _ta(0.5)})
    # grid: 3 points x 1 folder; final: gsm8k + MATH share the stated point's math folder, alpaca_eval its own
    assert plan_compute(**kwargs, stage="grid").engine_starts == 3
    assert plan_compute(**kwargs, stage="select").engine_starts == 2
    three = {**kwargs, "grid_datasets": ["gsm8k", "MATH", "alpaca_eval"], "stated_points": {}}
    # 3 benchmarks from 2 folders: 2 loads per point (one per (point, benchmark) would be 3); each selected
    # benchmark's final run counts as its own merge
    assert plan_compute(**three, stage="grid").engine_starts == 3 * 2
    assert plan_compute(**three, stage="select").engine_starts == 3


def test_estimate_of_a_grid_shard_counts_no_final_stage():
    kwargs = dict(grid_points=3, grid_datasets=["gsm8k"], final_datasets={"gsm8k": 18, "MATH": 20}, final_merges=2,
                  validation_sizes={"gsm8k": 2}, max_new_tokens={"gsm8k": 10, "MATH": 100})
    grid, select = plan_compute(**kwargs, stage="grid"), plan_compute(**kwargs, stage="select")
    assert (grid.grid_merges, grid.final_merges, grid.examples, grid.engine_starts) == (3, 0, {"gsm8k": 6}, 3)
    assert (select.grid_merges, select.final_merges, select.engine_starts) == (0, 2, 2)
    assert select.examples == {"gsm8k": 18, "MATH": 20}
    everything = plan_compute(**kwargs)
    assert everything.tokens_upper_bound == grid.tokens_upper_bound + select.tokens_upper_bound


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, shared_data_dir, capsys, monkeypatch):
    monkeypatch.setattr(llm_merging, "merge_checkpoints", None)
    grid_script.main(["--merge_instruct", "--merge_math", "--merging_methods", "mask_merging+task_arithmetic",
                      "--datasets", "gsm8k", "--tokens_per_second", "1000", "--dry_run", "--data_dir",
                      str(shared_data_dir), "--results_dir", str(tmp_path)])
    out = capsys.readouterr().out
    # 54 points x 132 validation examples + 1187 test examples, 1024 tokens each
    assert "examples to generate: gsm8k 8315" in out and f"{8315 * 1024:,}" in out
    assert not any(tmp_path.iterdir())
    grid_script.main(["--merge_instruct", "--merge_math", "--merging_methods", "mask_merging+task_arithmetic",
                      "--datasets", "gsm8k", "--tokens_per_second", "1000", "--dry_run", "--data_dir",
                      str(shared_data_dir), "--results_dir", str(tmp_path), "--stage", "grid", "--shard", "0/8"])
    out = capsys.readouterr().out
    # shard 0 of 8: the first 7 points of the grid (the λ values of p = 0.1, then λ = 0.5 of p = 0.2) x 132
    # validation examples; no final run in a grid shard
    assert "stage grid: merges: 7 grid points + up to 0 selected" in out and "gsm8k 924" in out


# --- end to end on the tiny family: one merge per point, kill and resume ------------------------------------------


class Killed(Exception):
    pass


def test_tiny_grid_merges_the_lambda_values_in_one_pass_and_resumes_after_a_kill(family, tmp_path,  # noqa: F811
                                                                                 shared_data_dir, monkeypatch):
    overrides = [arg for name, path in family.items() for arg in ("--model_path", f"{name}={path}")]
    argv = [*overrides, "--backend", "hf", "--data_dir", str(shared_data_dir), "--results_dir", str(tmp_path / "r"),
            "--end_index", "10", "--max_new_tokens", "2", "--quiet", "--merge_instruct", "--merge_math",
            "--merging_methods", TA, "--scaling_coefficients", "0.5", "1.0", "--datasets", "gsm8k", "MATH",
            "--save_merge_models_dir", str(tmp_path / "merged")]
    merges: list[str] = []  # folders merged alone
    passes: list[list[str]] = []  # folders merged together, one list per pass
    prompts: list[tuple[str, int]] = []
    real_merge, real_pass = llm_merging.merge_checkpoints, llm_merging.merge_variants
    real_generate = generation.generate

    def merge(*args, **kwargs):
        merges.append(args[2])
        return real_merge(*args, **kwargs)

    def merge_pass(pretrained, finetuned, outputs, **kwargs):
        passes.append([folder for folder, _ in outputs])
        return real_pass(pretrained, finetuned, outputs, **kwargs)

    def generate(batch, **kwargs):
        if kill_at in kwargs["model_path"]:
            raise Killed
        prompts.append((kwargs["model_path"], len(batch)))
        return real_generate(batch, **kwargs)

    monkeypatch.setattr(llm_merging, "merge_checkpoints", merge)
    monkeypatch.setattr(llm_merging, "merge_variants", merge_pass)
    monkeypatch.setattr(generation, "generate", generate)
    kill_at = "scaling_coefficient_1.0"  # the second point is killed during its first generation
    with pytest.raises(Killed):
        grid_script.main([*argv, "--stage", "grid"])
    # λ 0.5 and 1.0 differ only in λ: one pass wrote both models; point 1: gsm8k + MATH (1 example each)
    assert merges == [] and len(passes) == 1 and len(passes[0]) == 2 and len(prompts) == 2
    kill_at = "never"
    merges.clear(), passes.clear(), prompts.clear()
    grid_script.main([*argv, "--stage", "grid"])
    # point 2's folders went with the kill; it is merged again alone, point 1 is not redone
    assert len(merges) == 1 and passes == [] and all("scaling_coefficient_1.0" in path for path, _ in prompts)
    merges.clear(), prompts.clear()
    assert grid_script.main([*argv, "--stage", "grid"])["finished_points"] and merges == [] and prompts == []
    result = grid_script.main([*argv, "--stage", "select"])
    selected = {s["key"] for s in result["selection"].values()}
    assert len(merges) == len(selected)  # one merge per selected point, shared by the benchmarks it won
    assert sum(n for _, n in prompts) == 9 + 9  # only the test parts are generated; validation is reused
    final = result["final"]
    assert {d: [final[d][p]["num_examples"] for p in ("validation", "test", "full")] for d in final} == {
        "gsm8k": [1, 9, 10], "MATH": [1, 9, 10]}
    assert not any((tmp_path / "merged").rglob("*.safetensors"))  # merged folders are temporary
    merges.clear()
    grid_script.main([*argv, "--stage", "grid", "--results_dir", str(tmp_path / "r2"), "--max_merge_outputs", "1"])
    assert len(merges) == 2 and passes == []  # one merge per point, as before the shared passes


def test_a_point_whose_generations_are_complete_is_scored_without_merging(family, tmp_path, shared_data_dir,  # noqa: F811
                                                                          monkeypatch):
    """Killed after generating, before result.json: the resumed point reads its generations, no 13B re-merge."""
    overrides = [arg for name, path in family.items() for arg in ("--model_path", f"{name}={path}")]
    argv = [*overrides, "--backend", "hf", "--data_dir", str(shared_data_dir), "--results_dir", str(tmp_path / "r"),
            "--end_index", "10", "--max_new_tokens", "2", "--quiet", "--merge_instruct", "--merge_math",
            "--merging_methods", TA, "--scaling_coefficients", "0.5", "--datasets", "gsm8k",
            "--save_merge_models_dir", str(tmp_path / "merged"), "--stage", "grid"]
    grid_script.main(argv)
    (result_file,) = (tmp_path / "r").rglob(llm_grid_search.RESULT_FILE)
    finished = json.loads(result_file.read_text())
    result_file.unlink()  # as if killed between the last generation and result.json
    monkeypatch.setattr(llm_merging, "merge_checkpoints", _fail("merge_checkpoints"))
    monkeypatch.setattr(generation, "generate", _fail("generate"))
    grid_script.main(argv)
    again = json.loads(result_file.read_text())
    assert again["validation"] == finished["validation"]


def test_a_point_s_benchmarks_share_one_generation_process_and_engine(family, token_vllm, tmp_path,  # noqa: F811
                                                                      shared_data_dir):
    """vLLM (fake): the 3 benchmarks of a point, all generated from its math folder, take one child process and one
    engine start, give the texts of one process per benchmark, and a kill during the second resumes per file."""
    settings = EvaluationSettings(backend="vllm", data_dir=str(shared_data_dir), end_index=10, max_new_tokens=2,
                                  progress=False)
    config = GridSearchConfig(merge_tasks=("math", "code"), points=(_ta(0.5),), datasets=("gsm8k", "MATH",
                                                                                          "alpaca_eval"),
                              model_paths=family, save_merge_models_dir=str(tmp_path / "merged"), keep_model=True,
                              evaluation=settings)
    grid_dir, paths = tmp_path / "grid", llm_grid_search.grid_model_paths(config)
    token_vllm.fail_on_call = 2  # gsm8k's validation example is generated, then the child dies in MATH's
    with pytest.raises(RuntimeError, match="exited with status 1"):
        run_grid_search(config, grid_dir, paths, stage="grid")
    assert token_vllm.children == 1 and len(token_vllm.engines) == 1
    token_vllm.fail_on_call = None
    run_grid_search(config, grid_dir, paths, stage="grid")
    assert token_vllm.children == 2 and len(token_vllm.engines) == 2  # one more process for the 2 benchmarks left
    math_folder = config.merge_config(_ta(0.5)).merged_model_dir("math")
    assert {engine.kwargs["model"] for engine in token_vllm.engines} == {str(math_folder)}
    assert [len(call) for call in token_vllm.engines[1].calls] == [1, 1]  # MATH, alpaca_eval; gsm8k was kept
    folder = grid_dir / "points" / config.point_key(_ta(0.5))
    result = json.loads((folder / llm_grid_search.RESULT_FILE).read_text())
    assert set(result["validation"]) == {"gsm8k", "MATH", "alpaca_eval"}
    for dataset in config.datasets:  # the texts of one process and one engine per benchmark
        task = get_task(dataset)
        _, examples, split = llm_grid_search.dataset_split(dataset, settings, config.validation_fraction,
                                                           config.split_seed)
        chosen = [examples[i] for i in split.validation]
        single = llm_pipeline.generate_examples(task, chosen, str(math_folder), tmp_path / "single" / dataset,
                                                settings, save_dtype=config.save_dtype)
        point = json.loads((folder / "generations" / f"{task.name}.jsonl").read_text().splitlines()[0])
        assert [point["completion"]] == [row["completion"] for row in single]
    assert token_vllm.children == 2 + 3


def test_a_job_killed_between_lambda_values_reuses_the_models_of_its_pass(family, tmp_path,  # noqa: F811
                                                                          shared_data_dir, monkeypatch):
    """The pass wrote three models; the job dies after evaluating the first: the rerun merges nothing."""
    overrides = [arg for name, path in family.items() for arg in ("--model_path", f"{name}={path}")]
    argv = [*overrides, "--backend", "hf", "--data_dir", str(shared_data_dir), "--results_dir", str(tmp_path / "r"),
            "--end_index", "10", "--max_new_tokens", "2", "--quiet", "--merge_instruct", "--merge_math",
            "--merging_methods", TA, "--scaling_coefficients", "0.5", "0.7", "1.0", "--datasets", "gsm8k",
            "--save_merge_models_dir", str(tmp_path / "merged"), "--stage", "grid"]
    merges, passes = [], []
    real_merge, real_pass, real_run_point = llm_merging.merge_checkpoints, llm_merging.merge_variants, \
        llm_grid_search.run_point
    monkeypatch.setattr(llm_merging, "merge_checkpoints",
                        lambda *args, **kwargs: merges.append(args[2]) or real_merge(*args, **kwargs))
    monkeypatch.setattr(llm_merging, "merge_variants", lambda pretrained, finetuned, outputs, **kwargs: passes.append(
        len(outputs)) or real_pass(pretrained, finetuned, outputs, **kwargs))

    def run_point(config, grid_dir, point, paths, **kwargs):
        if killed and point.hyperparameters["scaling_coefficient"] == 0.7:
            raise Killed  # the job dies before the second λ is evaluated (its model stays on disk)
        return real_run_point(config, grid_dir, point, paths, **kwargs)

    monkeypatch.setattr(llm_grid_search, "run_point", run_point)
    killed = True
    with pytest.raises(Killed):
        grid_script.main(argv)
    assert passes == [3] and merges == []
    assert len(list((tmp_path / "r").rglob(llm_grid_search.RESULT_FILE))) == 1
    kept = sorted(p.name for p in (tmp_path / "merged").rglob("task_arithmetic_*") if (p / MERGE_CONFIG).is_file())
    assert kept == ["task_arithmetic_scaling_coefficient_0.7", "task_arithmetic_scaling_coefficient_1.0"]
    killed = False
    assert len(grid_script.main(argv)["finished_points"]) == 3
    assert passes == [3] and merges == []  # the finished models of the pass are reused, nothing is merged again
    results = [json.loads(p.read_text()) for p in (tmp_path / "r").rglob(llm_grid_search.RESULT_FILE)]
    assert all(r["merge_seconds"] >= 0 for r in results) and len(results) == 3
    assert not any((tmp_path / "merged").rglob("*.safetensors"))
