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
    assert summary["tables"]["finetune"][1] == [["rte", "m", "a", 2, 60.0, 55.00000000000001]]
    assert "gsm8k/accuracy" in summary["tables"]["other"][1][0][2]


def test_files_written(tree):
    summary = summarize_results.summarize(tree, tree / "out")
    out = Path(summary["output_dir"])
    assert (out / "summary.md").read_text().count("## ") == 4
    with open(out / "merging.csv") as handle:
        assert next(csv.reader(handle)) == ["pair", "target task", "task_arithmetic", "task_arithmetic +DARE"]
    assert sorted(p.name for p in out.glob("*.png")) == ["dare_sweep_DARE.png", "dare_sweep_DropOnly.png"]
    assert "| mrpc+rte | rte | 70.00 | 75.00 |" in summary["markdown"]


def test_empty_tree_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folders"):
        summarize_results.summarize(tmp_path)
