"""summarize_results on a hand-written results tree (no models needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import summarize_results


def _run(root: Path, rel: str, config: dict, metrics: dict) -> None:
    folder = root / rel
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": config, "argv": []}))
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "results"
    _run(root, "train_plms_glue/rte/m/a", {"script": "train_plms_glue", "dataset_name": "rte",
                                             "language_model_name": "/x/m", "auxiliary_dataset_name": None},
         {"rte": {"validation": {"accuracy": 0.6}, "test": {"accuracy": 0.55}}, "best_epoch": 2})
    for rate, rescale, acc in ((0.0, True, 0.55), (0.9, True, 0.5), (0.9, False, 0.25)):
        _run(root, f"inference_plms_glue/rte/m/a/r={rate},{rescale}",
             {"script": "inference_plms_glue", "dataset_name": "rte", "weight_mask_rate": rate,
              "dare": {"use_weight_rescale": rescale, "mask_strategy": "random", "weight_format": "delta_weight"}},
             {"rte": {"test": {"accuracy": acc}}})
    for name, score in (("task_arithmetic", 0.7), ("mask_merging", 0.75)):
        method = "task_arithmetic"
        _run(root, f"merge_plms_glue/mrpc+rte/m/{name}/{method}",
             {"script": "merge_plms_glue", "merging_method_name": name, "applied_method": method,
              "dataset_pair": ["mrpc", "rte"]},
             {"rte": {"test": {"accuracy": score}}, "mrpc": {"test": {"accuracy": 0.5, "averaged_scores": score}}})
    _run(root, "merge_llms/x", {"script": "merge_llms_instruct_math_code"}, {"gsm8k": {"accuracy": 0.25}})
    (root / "incomplete").mkdir()
    (root / "incomplete" / "config.json").write_text("{}")
    return root


def test_tables_have_paper_shape_and_values(tree):
    summary = summarize_results.main(["--results_dir", str(tree)])
    header, rows = summary["tables"]["merging"]
    assert header == ["pair", "target task", "task_arithmetic", "task_arithmetic +DARE"]
    assert rows == [["mrpc+rte", "mrpc", 70.0, 75.0], ["mrpc+rte", "rte", 70.0, 75.0]]
    header, rows = summary["tables"]["dare_sweep"]
    # rate 0 (the fine-tuned model) is shared by both drop variants
    assert header == ["task", "variant", "p=0.0", "p=0.9"]
    assert rows == [["rte", "DARE", 55.00000000000001, 50.0], ["rte", "DropOnly", 55.00000000000001, 25.0]]
    assert summary["tables"]["finetune"][1] == [["rte", "m", "a", 2, 60.0, 55.00000000000001, None]]
    assert "gsm8k/accuracy" in summary["tables"]["other"][1][0][2]


def test_files_written(tree):
    summary = summarize_results.summarize(tree, tree / "out")
    out = Path(summary["output_dir"])
    assert (out / "summary.md").read_text().count("## ") == 6  # + DARE's effect per method, DARE vs DropOnly
    with open(out / "merging.csv") as handle:
        assert next(csv.reader(handle)) == ["pair", "target task", "task_arithmetic", "task_arithmetic +DARE"]
    assert sorted(p.name for p in out.glob("*.png")) == ["dare_sweep_DARE.png", "dare_sweep_DropOnly.png",
                                                      "drop_rate_rte.png"]
    assert "| mrpc+rte | rte | 70.00 | 75.00 |" in summary["markdown"]


def test_empty_tree_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folders"):
        summarize_results.summarize(tmp_path)


# --- LLM table: config.json written from the scripts' own records, in the folders the scripts use ---------------

def _llm_run(root: Path, config, metrics: dict) -> Path:
    """A run folder as the LLM scripts leave it (``config.record()`` + ``{dataset: metrics}``)."""
    folder = config.run_dir(str(root))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": config.record(), "argv": []}, default=str))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _acc(value: float) -> dict:
    return {"accuracy": value, "accuracy_flexible": value, "num_invalid": 0, "num_examples": 8, "version": "v1"}


FILES_ONLY = {"num_examples": 8, "version": "v1"}  # alpaca_eval, or code without --allow_code_execution


@pytest.fixture
def llm_tree(tmp_path):
    from llms.llm_configs import DirectInferenceConfig, LlmInferenceConfig, LlmMergeConfig
    from llms.llm_pipeline import EvaluationSettings
    from model_merging_methods import Dare, Recipe

    root = tmp_path / "llm_results"
    math = "WizardMath-7B-V1.0"
    # (model, dataset, rate, rescale, extra config, metrics); one run folder per dataset, as the script writes
    inference = [
        (math, "gsm8k", 0.0, False, {}, _acc(0.5)), (math, "MATH", 0.0, False, {}, _acc(0.125)),
        (math, "gsm8k", 0.9, True, {}, _acc(0.375)), (math, "MATH", 0.9, True, {}, _acc(0.0625)),
        (math, "gsm8k", 0.9, False, {}, _acc(0.25)),
        (math, "gsm8k", 0.5, True, {}, _acc(0.5)),
        (math, "gsm8k", 0.5, True, {"mask_strategy": "magnitude"}, _acc(0.125)),
        (math, "gsm8k", 0.9, True, {"weight_format": "finetuned_weight"}, _acc(0.0)),
        (math, "gsm8k", 0.9, True, {"evaluation": EvaluationSettings(end_index=20)}, _acc(0.75)),
        ("WizardCoder-Python-7B-V1.0", "human_eval", 0.0, False, {}, {"pass@1": 0.375, "num_examples": 8,
                                                                        "version": "v1"}),
        ("WizardCoder-Python-7B-V1.0", "mbpp", 0.0, False, {}, FILES_ONLY),
        ("WizardLM-13B-V1.2", "alpaca_eval", 0.0, False, {}, FILES_ONLY),
    ]
    for model, dataset, rate, rescale, extra, metrics in inference:
        evaluation = extra.pop("evaluation", EvaluationSettings())  # the rest of extra are DARE settings
        dare = Dare(rate, use_weight_rescale=rescale, **extra) if rate else None
        config = LlmInferenceConfig(finetuned_model_name=model, dataset_name=dataset, dare=dare, evaluation=evaluation)
        _llm_run(root, config, {dataset: metrics})
    plain = LlmMergeConfig(merge_tasks=("math", "instruct"), recipe=Recipe("task_arithmetic"))
    _llm_run(root, plain, {"alpaca_eval": FILES_ONLY, "gsm8k": _acc(0.5), "MATH": _acc(0.0625)})
    dare = LlmMergeConfig(merge_tasks=("instruct", "math"), recipe=Recipe("task_arithmetic", dare=Dare(0.2)))
    # the DARE merge evaluated task by task from its kept folder: two runs, one row
    _llm_run(root, DirectInferenceConfig(evaluate_task="math", merge=dare), {"gsm8k": _acc(0.625), "MATH": _acc(0.25)})
    _llm_run(root, DirectInferenceConfig(evaluate_task="instruct", merge=dare), {"alpaca_eval": FILES_ONLY})
    ties = LlmMergeConfig(merge_tasks=("instruct", "code"),
                          recipe=Recipe("ties_merging", {"ties_trim_scope": "per_tensor"}, Dare(0.5)))
    _llm_run(root, ties, {"alpaca_eval": FILES_ONLY, "human_eval": {"pass@1": 0.25, "num_examples": 8,
                                                                   "version": "v1"}, "mbpp": FILES_ONLY})
    by_path = DirectInferenceConfig(evaluate_task="code", merged_model_path=str(tmp_path / "my_merge"))
    _llm_run(root, by_path, {"human_eval": FILES_ONLY, "mbpp": {"pass@1": 0.5, "num_examples": 8,
                                                               "version": "v1"}})
    return root


LLM_HEADER = ["model", "setting", "AlpacaEval", "GSM8K", "MATH", "HumanEval", "MBPP"]
LLM_ROWS = [
    ["WizardCoder-Python-7B-V1.0", "fine-tuned", None, None, None, 37.5, "files"],
    ["WizardLM-13B-V1.2", "fine-tuned", "files", None, None, None, None],
    ["WizardMath-7B-V1.0", "fine-tuned", None, 50.0, 12.5, None, None],
    ["WizardMath-7B-V1.0", "+ DARE p=0.5", None, 50.0, None, None, None],
    ["WizardMath-7B-V1.0", "+ DARE p=0.9", None, 37.5, 6.25, None, None],
    ["WizardMath-7B-V1.0", "+ DARE p=0.9 [end_index=20]", None, 75.0, None, None, None],
    ["WizardMath-7B-V1.0", "+ DropOnly p=0.9", None, 25.0, None, None, None],
    ["WizardMath-7B-V1.0", "+ DARE-magnitude p=0.5", None, 12.5, None, None, None],
    ["WizardMath-7B-V1.0", "+ DARE-finetuned_weight p=0.9", None, 0.0, None, None, None],
    ["instruct+math", "task_arithmetic lambda=1.0", "files", 50.0, 6.25, None, None],
    ["instruct+math", "task_arithmetic lambda=1.0 + DARE p=0.2", "files", 62.5, 25.0, None, None],
    ["instruct+code", "ties_merging lambda=1.0 trim=0.8 ties_trim_scope=per_tensor + DARE p=0.5", "files", None,
     None, 25.0, "files"],
    ["merged_model_path", "my_merge", None, None, None, "files", 50.0],
]


def test_llm_table_one_row_per_model_and_setting(llm_tree):
    summary = summarize_results.summarize(llm_tree, llm_tree / "out")
    assert summary["tables"]["llm"] == (LLM_HEADER, LLM_ROWS)
    assert set(summary["tables"]) == {"llm"}  # no LLM run left in "Other runs"
    with open(Path(summary["output_dir"]) / "llm.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == LLM_HEADER
    assert rows[3] == ["WizardMath-7B-V1.0", "fine-tuned", "", "50.0", "12.5", "", ""]
    assert "| WizardMath-7B-V1.0 | + DARE p=0.9 | – | 37.50 | 6.25 | – | – |" in summary["markdown"]
    assert "| instruct+math | task_arithmetic lambda=1.0 + DARE p=0.2 | files | 62.50 | 25.00 | – | – |" in (
        summary["markdown"])


def test_llm_table_keeps_glue_tables_and_reads_old_records_as_other(tree, llm_tree):
    import shutil

    shutil.copytree(llm_tree, tree / "llm")
    summary = summarize_results.summarize(tree, tree / "out")
    assert list(summary["tables"]) == ["finetune", "dare_sweep", "merging", "dare_effect", "sweep_contrast", "llm",
                                       "other"]
    assert summary["tables"]["llm"][1] == LLM_ROWS
    # the fixture's bare merge_llms record (no merge fields) stays in "Other runs"
    assert [row[0] for row in summary["tables"]["other"][1]] == ["merge_llms_instruct_math_code"]
    assert summary["tables"]["merging"][1] == [["mrpc+rte", "mrpc", 70.0, 75.0], ["mrpc+rte", "rte", 70.0, 75.0]]


def test_llm_cell_a_score_beats_files_and_the_later_score_wins(caplog):
    from llms.results_tables import NOT_SCORED, _put

    row: dict = {}
    _put(row, "mbpp", 25.0, Path("a"))
    _put(row, "mbpp", NOT_SCORED, Path("b"))
    assert row == {"mbpp": 25.0}
    _put(row, "mbpp", 50.0, Path("c"))
    assert row == {"mbpp": 50.0} and "already has 25.0" in caplog.text


# --- seeds, DARE's relative change, majority class --------------------------------------------------------------

@pytest.fixture
def seeded_tree(tmp_path):
    root = tmp_path / "results"
    dare = {"use_weight_rescale": True, "mask_strategy": "random", "weight_format": "delta_weight"}
    for rate, seed, acc in ((0.0, 0, 0.6), (0.0, 1, 0.6), (0.5, 0, 0.5), (0.5, 1, 0.7), (0.5, 2, 0.6)):
        _run(root, f"inference_plms_glue/rte/m/a/r={rate},s={seed}",
             {"script": "inference_plms_glue", "dataset_name": "rte", "weight_mask_rate": rate, "seed": seed,
              "dare": {**dare, "seed": seed}}, {"rte": {"test": {"accuracy": acc}}})
    cells = {("task_arithmetic", None, None): 0.50, ("mask_merging", None, 0): 0.52, ("mask_merging", None, 1): 0.56,
             ("fisher_merging", "mergelm", None): 0.40, ("fisher_merging", "exact", None): 0.44,
             ("mask_merging", "exact", 0): 0.33}
    for (name, estimator, seed), acc in cells.items():
        method = "fisher_merging" if estimator else "task_arithmetic"
        _run(root, f"merge_plms_glue/rte+mrpc/m/{name}/{method}/{estimator},{seed}",
             {"script": "merge_plms_glue", "merging_method_name": name, "applied_method": method,
              "fisher_estimator": estimator, "seed": seed, "dataset_pair": ["rte", "mrpc"]},
             {"rte": {"test": {"accuracy": acc}}})
    return root


def test_seed_cells_are_mean_and_std_and_dare_effect_is_hand_computed(seeded_tree):
    summary = summarize_results.summarize(seeded_tree)
    (row,) = summary["tables"]["dare_sweep"][1]
    assert row[:3] == ["rte", "DARE", pytest.approx(60.0)]  # rate 0 counted once, not per seed
    assert row[3].mean == pytest.approx(60.0) and row[3].std == pytest.approx(10.0)  # 50, 70, 60
    header, rows = summary["tables"]["merging"]
    assert header == ["pair", "target task", "task_arithmetic", "task_arithmetic +DARE", "fisher_merging",
                      "fisher_merging (exact)", "fisher_merging (exact) +DARE"]
    ta_dare = rows[0][3]
    assert ta_dare.mean == pytest.approx(54.0) and ta_dare.std == pytest.approx(2 ** 0.5 * 2)
    assert "| rte+mrpc | rte | 50.00 | 54.00 ± 2.83 | 40.00 | 44.00 | 33.00 |" in summary["markdown"]
    effect = {r[0]: r for r in summary["tables"]["dare_effect"][1]}
    # task arithmetic: (54 - 50) / 50 = +8 %; Fisher (exact): (33 - 44) / 44 = -25 %; paper's TA average +0.36 %.
    # The bootstrap resamples TA's two DARE seeds (52, 56): means 52, 54 or 56, so the interval is [+2, +6]; one
    # non-zero change gives a signed-rank p of 1 (Holm over the two methods: 1)
    ta = effect["task_arithmetic"]
    assert ta[1:3] == [1, pytest.approx(4.0)] and ta[3:5] == [pytest.approx(2.0), pytest.approx(6.0)]
    assert ta[5:] == [1, 0, pytest.approx(1.0), pytest.approx(1.0), 1, pytest.approx(8.0), 0.36, 1]
    assert effect["fisher_merging (exact)"][1:] == [1, pytest.approx(-11.0), pytest.approx(-11.0),
                                                    pytest.approx(-11.0), 0, 1, pytest.approx(1.0),
                                                    pytest.approx(1.0), 1, pytest.approx(-25.0), None, 1]
    assert "fisher_merging" not in effect  # no DARE run of MergeLM's estimator
    out = Path(summary["output_dir"])
    with open(out / "dare_sweep.csv") as handle:
        csv_rows = list(csv.reader(handle))
    assert csv_rows[0] == ["task", "variant", "p=0.0", "p=0.5 mean", "p=0.5 std", "p=0.5 n"]
    assert [float(v) for v in csv_rows[1][3:6]] == [pytest.approx(60.0), pytest.approx(10.0), 3]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["merging"][0]["task_arithmetic +DARE"]["values"] == pytest.approx([52.0, 56.0])


def test_majority_class_score_from_the_local_glue_copy(shared_data_dir):
    from glue.glue_tables import majority_class_score

    # RTE: the train part (90 % of GLUE train, seed-0 permutation) has 1134 label-0 vs 1107 label-1 examples;
    # GLUE dev (our test) has 146 label-0 of 277 -> 52.71
    assert majority_class_score("rte", str(shared_data_dir / "glue")) == pytest.approx(146 / 277 * 100)
    assert majority_class_score("stsb", str(shared_data_dir / "glue")) == 0.0
    # MRPC: label 1 is the majority; accuracy 279/408 and F1 2*279/(2*279+129) averaged
    acc, f1 = 279 / 408, 2 * 279 / (2 * 279 + 129)
    assert majority_class_score("mrpc", str(shared_data_dir / "glue")) == pytest.approx((acc + f1) / 2 * 100)


def test_dare_effect_leaves_scores_near_zero_out_of_the_relative_mean():
    from glue.glue_tables import dare_effect_table

    def run(name, seed, scores):
        return {"config": {"merging_method_name": name, "applied_method": "ties_merging", "seed": seed,
                           "fisher_estimator": None, "dataset_pair": ["cola", "sst2"]},
                "metrics": {t: {"test": {k: v}} for t, k, v in scores}}

    scores = lambda cola, sst2: [("cola", "matthews_correlation", cola), ("sst2", "accuracy", sst2)]
    header, rows = dare_effect_table([run("ties_merging", None, scores(-0.003, 0.80)),
                                      run("mask_merging", 0, scores(0.130, 0.84)),
                                      run("mask_merging", 1, scores(0.110, 0.82))])
    # cola: -0.3 -> 12.0 (+12.3 points; a relative change of +4,100 % left out); sst2: 80 -> 83 (+3, +3.75 %)
    assert header[9:11] == ["cells with plain >= 10", "mean relative change on those (%)"]
    (row,) = rows
    assert row[:3] == ["ties_merging", 2, pytest.approx(7.65)] and row[5:7] == [2, 0]
    assert row[9:] == [1, pytest.approx(3.75), 0.84, 1]


def _ties_run(name, seed, pair, scores):
    return {"config": {"merging_method_name": name, "applied_method": "ties_merging", "seed": seed,
                       "fisher_estimator": None, "dataset_pair": list(pair)},
            "metrics": {t: {"test": {"accuracy": v}} for t, v in scores.items()}}


def test_dare_effect_counts_only_changes_beyond_rounding_and_filters_on_the_plain_score():
    from glue.glue_tables import dare_effect_table

    runs = [_ties_run("ties_merging", None, ("rte", "sst2"), {"rte": 0.5, "sst2": -0.46}),
            _ties_run("mask_merging", 0, ("rte", "sst2"), {"rte": 0.5 + 1e-16, "sst2": -0.40})]
    _, (row,) = dare_effect_table(runs)
    # rte differs by float rounding only: neither higher nor lower; sst2's plain score is -46 (below 10, though
    # |-46| is not): left out of the relative mean as the column states
    assert row[5:7] == [1, 0] and row[9:11] == [1, pytest.approx(0.0)]


def test_sweep_contrast_compares_dare_with_each_other_variant_per_task():
    from glue.glue_tables import sweep_contrast_table

    series = {("rte", "DARE"): {0.9: [60.0, 62.0], 0.99: [55.0]}, ("rte", "DropOnly"): {0.9: [50.0, 52.0]},
              ("sst2", "DARE"): {0.9: [80.0]}, ("sst2", "DropOnly"): {0.9: [81.0]},
              ("sst2", "DARE-finetuned_weight"): {0.9: [50.0]}}
    header, rows = sweep_contrast_table(series)
    assert header[:4] == ["drop rate", "contrast", "tasks", "mean difference (points)"]
    (row,) = rows  # 0.99 has no DropOnly run; DARE-finetuned_weight is not a contrast
    # rte: 61 - 51 = +10; sst2: 80 - 81 = -1 -> mean +4.5; one higher, one lower
    assert row[:4] == ["0.9", "DARE - DropOnly", 2, pytest.approx(4.5)] and row[6:8] == [1, 1]


def test_show_partial_only_goes_with_paper_table1(tmp_path, capsys):
    with pytest.raises(SystemExit):
        summarize_results.parse_args(["--results_dir", str(tmp_path), "--show_partial"])
    assert "--show_partial applies to --paper_table1 only" in capsys.readouterr().err
    assert summarize_results.parse_args(["--paper_table1", "--show_partial"]).show_partial


# --- fine-tuning seeds -------------------------------------------------------------------------------------------

@pytest.fixture
def finetune_seed_tree(tmp_path):
    """RTE fine-tuned with seeds 0 and 1, each swept (DARE with 2 mask seeds, DropOnly) and merged with MRPC."""
    root = tmp_path / "results"
    dare = {"mask_strategy": "random", "weight_format": "delta_weight"}
    for ft, (val, test) in enumerate([(0.60, 0.56), (0.64, 0.60)]):
        _run(root, f"train_plms_glue/rte/m/lr=3e-05,seed={ft}",
             {"script": "train_plms_glue", "dataset_name": "rte", "language_model_name": "m", "seed": ft},
             {"rte": {"validation": {"accuracy": val}, "test": {"accuracy": test}}, "best_epoch": 1})
        checkpoint = f"results/train_plms_glue/rte/m/lr=3e-05,seed={ft}/model"
        sweeps = [(0.0, True, 0, test), (0.9, True, 0, 0.50 + ft / 10), (0.9, True, 1, 0.54 + ft / 10),
                  (0.9, False, 0, 0.30)]
        for rate, rescale, seed, acc in sweeps:
            _run(root, f"inference_plms_glue/rte/m/ft={ft}/r={rate},{rescale},{seed}",
                 {"script": "inference_plms_glue", "dataset_name": "rte", "weight_mask_rate": rate, "seed": seed,
                  "checkpoint": checkpoint, "dare": {**dare, "use_weight_rescale": rescale, "seed": seed}},
                 {"rte": {"test": {"accuracy": acc}}})
        # plain task arithmetic 0.50 / 0.60 (ft 0 / 1); DARE seeds 0 and 1: 0.52, 0.56 / 0.60, 0.60
        merges = [("task_arithmetic", None, 0.50 + ft / 10), ("mask_merging", 0, 0.52 + ft * 0.08),
                  ("mask_merging", 1, 0.56 + ft * 0.04)]
        for name, seed, acc in merges:
            _run(root, f"merge_plms_glue/rte+mrpc/m/ft={ft}/{name},{seed}",
                 {"script": "merge_plms_glue", "merging_method_name": name, "applied_method": "task_arithmetic",
                  "fisher_estimator": None, "seed": seed, "train_seed": ft, "dataset_pair": ["rte", "mrpc"]},
                 {"rte": {"test": {"accuracy": acc}}, "mrpc": {"test": {"averaged_scores": 0.7}}})
    return root


def test_finetune_seed_is_read_from_train_seed_or_the_checkpoint_folder():
    from glue.glue_tables import finetune_seed

    assert finetune_seed({"train_seed": 2, "checkpoint": "x/lr=1,seed=0/model"}) == 2
    assert finetune_seed({"checkpoint": "out/train_plms_glue/rte/m/lr=3e-05,seed=11/model"}) == 11
    assert finetune_seed({"checkpoint": "out/train_plms_glue/rte/m/lr=3e-05,statistics_seed=4/model"}) == 0
    assert finetune_seed({"checkpoint": "/elsewhere/model"}) == 0 and finetune_seed({}) == 0


def test_fine_tuning_seeds_get_their_own_rows_and_are_resampled(finetune_seed_tree):
    summary = summarize_results.summarize(finetune_seed_tree)
    tables = summary["tables"]
    (row,) = tables["finetune_seeds"][1]
    assert row[:3] == ["rte", "lr=3e-05,seed=*", "0, 1"]
    assert (row[3].mean, row[4].mean) == (pytest.approx(62.0), pytest.approx(58.0))
    # the sweep table and figures keep the first fine-tuning seed: DARE at 0.9 is 50 and 54 -> 52 ± 2.83
    header, rows = tables["dare_sweep"]
    dare_row = next(r for r in rows if r[1] == "DARE")
    assert dare_row[2] == pytest.approx(56.0) and dare_row[3].mean == pytest.approx(52.0)
    # over fine-tuning seeds: each seed's mean over mask seeds (52, 62), then mean ± std over the seeds
    header, rows = tables["sweep_seeds"]
    assert header == ["task", "variant", "p=0.0", "p=0.9"]
    seeds_row = {r[1]: r for r in rows}["DARE"]
    assert seeds_row[2].values == pytest.approx((56.0, 60.0)) and seeds_row[3].values == pytest.approx((52.0, 62.0))
    # DARE - DropOnly at 0.9: (52 - 30) and (62 - 30), a task's difference is their mean, 27
    contrast = {r[1]: r for r in tables["sweep_contrast"][1]}["DARE - DropOnly"]
    assert contrast[2:4] == [1, pytest.approx(27.0)] and contrast[-1] == 2
    # one merge row per fine-tuning seed
    header, rows = tables["merging"]
    assert header[:3] == ["pair", "target task", "fine-tuning seed"]
    assert [r[:3] for r in rows] == [["rte+mrpc", "mrpc", 0], ["rte+mrpc", "mrpc", 1], ["rte+mrpc", "rte", 0],
                                     ["rte+mrpc", "rte", 1]]
    # DARE's change on rte: seed 0 (52 + 56) / 2 - 50 = +4, seed 1 60 - 60 = 0 -> +2; on mrpc 0: mean +1 over
    # two cells; pairs, then fine-tuning seeds within them, then DARE seeds are resampled
    (effect,) = tables["dare_effect"][1]
    assert effect[:3] == ["task_arithmetic", 2, pytest.approx(1.0)] and effect[-1] == 2
    assert effect[5:7] == [1, 0]
    # a resample's mean lies between 0 (seed 1 drawn twice) and 3 (seed 0 twice, both DARE draws 56: rte +6)
    assert -1e-9 <= effect[3] <= 1.0 <= effect[4] <= 3.0 + 1e-9
    per_seed = {r[1]: r for r in tables["dare_effect_seeds"][1]}
    assert per_seed[0][2:6] == [2, pytest.approx(60.0), pytest.approx(62.0), pytest.approx(2.0)]
    assert per_seed[1][2:6] == [2, pytest.approx(65.0), pytest.approx(65.0), pytest.approx(0.0)]
    assert "## Fine-tuning seeds" in summary["markdown"] and "fine-tuning seed 0)" in summary["markdown"]


def test_a_single_fine_tuning_seed_adds_no_seed_tables(seeded_tree):
    tables = summarize_results.summarize(seeded_tree)["tables"]
    assert not {"finetune_seeds", "sweep_seeds", "dare_effect_seeds"} & set(tables)
    assert "fine-tuning seed" not in tables["merging"][0]
