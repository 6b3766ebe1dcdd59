"""A new method is one module plus one registry line: a toy method, registered in the test, is offered with its own
flag, grids and folder names by ``merge_checkpoints.py`` and ``merge_plms_glue.py`` (the LLM scripts:
``test_toy_method_llm.py``), with and without DARE, and merges what its formula says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_glue_pipeline import TASKS, workspace  # noqa: F401  (module fixture: tiny BERT fine-tuned on rte, mrpc)
from test_merge_checkpoints import folders  # noqa: F401  (fixture: a tiny Llama base and two fine-tunes)
from test_merge_engine import load_merged, read_back

from model_merging_methods import MERGE_METHODS, Hyperparameter, MergeMethod, merge_state_dicts
from model_merging_methods.registry import always

TOY = "scaled_mean"


def scaled_mean(base: torch.Tensor, deltas, *, toy_alpha: float = 1.0) -> torch.Tensor:
    """The toy method's module: ``base + toy_alpha * mean_i(delta_i)``."""
    return base + toy_alpha * torch.stack(list(deltas)).mean(dim=0)


TOY_METHOD = MergeMethod(  # its registry line
    TOY, scaled_mean,
    (Hyperparameter("toy_alpha", "number", 1.0, help="scale of the mean delta", why="the plain mean",
                    grids={"glue_paper": (0.5, 1.0), "glue_reduced": (0.5, 1.0), "glue_quick": (0.5, 1.0),
                           "llm_table1": (0.5, 1.0)}),),
    chunkable=always, propagates_non_finite=True, label="Scaled Mean",
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(MERGE_METHODS, TOY, TOY_METHOD)
    return TOY_METHOD


@pytest.mark.parametrize("module_name", ["merge_checkpoints", "merge_plms_glue"])
def test_the_toy_method_and_its_flag_are_offered(registered, module_name):
    import importlib

    parser = importlib.import_module(module_name).build_parser()
    actions = {a.dest: a for a in parser._actions}
    assert TOY in actions["merging_method_name"].choices and TOY in actions["mask_apply_method"].choices
    assert "--toy_alpha" in actions["toy_alpha"].option_strings
    assert actions["toy_alpha"].help.startswith("scale of the mean delta")


def test_merge_checkpoints_runs_the_toy_method_with_and_without_dare(registered, folders, tmp_path):  # noqa: F811
    import merge_checkpoints

    common = ["--pretrained_model", folders[0], "--finetuned_models", *folders[1:], "--quiet",
              "--skip_homology_check"]
    merge_checkpoints.main([*common, "--merging_method_name", TOY, "--toy_alpha", "0.5",
                            "--output_dir", str(tmp_path / "plain")])
    state_dicts = [read_back(Path(folder)) for folder in folders]
    merged = load_merged(tmp_path / "plain")
    name = "model.layers.0.mlp.up_proj.weight"
    base = state_dicts[0][name].float()
    formula = base + 0.5 * (sum(sd[name].float() - base for sd in state_dicts[1:]) / 2)
    torch.testing.assert_close(merged[name].float(), formula.to(merged[name].dtype).float())
    record = json.loads((tmp_path / "plain" / "merge_config.json").read_text())
    assert record["recipe"] == {"merging_method_name": TOY, "method": TOY, "hyperparameters": {"toy_alpha": 0.5},
                                "dare": None}

    merge_checkpoints.main([*common, "--merging_method_name", "mask_merging", "--mask_apply_method", TOY,
                            "--weight_mask_rate", "0.5", "--use_weight_rescale", "--toy_alpha", "0.5", "--seed", "3",
                            "--output_dir", str(tmp_path / "dare")])
    expected = merge_state_dicts("mask_merging", state_dicts[0], state_dicts[1:], mask_apply_method=TOY,
                                 weight_mask_rate=0.5, use_weight_rescale=True, seed=3, toy_alpha=0.5)
    got = load_merged(tmp_path / "dare")
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not torch.equal(got[name], merged[name])  # DARE changed the deltas


def test_merge_plms_glue_searches_the_toy_method_s_grid_with_and_without_dare(registered, workspace):  # noqa: F811
    import merge_plms_glue

    out = merge_plms_glue.main([*workspace["common"], "--dataset_names", *TASKS, "--grid", "quick",
                                "--merging_method_name", TOY, "mask_merging", "--mask_apply_method", TOY,
                                "--use_weight_rescale", "--seeds", "0", "--overwrite"])
    assert set(out["rte+mrpc"]) == {TOY, f"mask_merging/{TOY}/seed=0"}
    root = workspace["root"] / "results" / "merge_plms_glue" / "rte+mrpc" / "tiny-bert"
    (plain_dir,) = (root / TOY).iterdir()
    (dare_dir,) = (root / "mask_merging" / TOY).iterdir()
    assert "seed=0" in dare_dir.name and "use_weight_rescale=True" in dare_dir.name
    grid = json.loads((plain_dir / "grid.json").read_text())
    assert {e["setting"]["toy_alpha"] for e in grid} == {0.5, 1.0}  # the declared glue_quick values
    for task in TASKS:
        assert out["rte+mrpc"][TOY][task]["hyperparameters"]["toy_alpha"] in (0.5, 1.0)
        dare = out["rte+mrpc"][f"mask_merging/{TOY}/seed=0"][task]
        assert dare["hyperparameters"]["weight_mask_rate"] in (0.5, 0.9)
        assert dare["recipe"]["dare"]["use_weight_rescale"] is True
    config = json.loads((plain_dir / "config.json").read_text())["config"]
    assert config["recipe"]["method"] == TOY and config["grid_values"] == {"toy_alpha": [0.5, 1.0]}

    none = merge_plms_glue.main([*workspace["common"], "--dataset_names", *TASKS, "--grid", "none",
                                 "--merging_method_name", TOY, "--toy_alpha", "0.7", "0.9", "--overwrite"])
    assert {none["rte+mrpc"][TOY][t]["hyperparameters"]["toy_alpha"] for t in TASKS} <= {0.7, 0.9}
    with pytest.raises(ValueError, match="--toy_alpha .* has no effect under --grid quick"):
        merge_plms_glue.main([*workspace["common"], "--dataset_names", *TASKS, "--grid", "quick",
                              "--merging_method_name", TOY, "--toy_alpha", "0.7"])
