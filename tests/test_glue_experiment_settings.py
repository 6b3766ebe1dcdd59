"""GLUE experiment bookkeeping: run folders named from every setting, NaN grids, seeds, length-grouped batches."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import merge_plms_glue
from glue.glue_data import LengthGroupedBatches
from glue.glue_finetune import checkpoint_tag
from glue.glue_inference import InferenceConfig
from glue.glue_merging import select_on_split
from model_merging_methods import Dare, Recipe


def _tree_checkpoint(root: Path, task: str, run: str) -> Path:
    return root / "train_plms_glue" / task / "all-MiniLM-L6-v2" / run / "model"


def _merge_dir(root: Path, argv: list[str], checkpoints: dict[str, Path], variant_index: int = 0) -> Path:
    args = merge_plms_glue.parse_args(["--language_model_name", "all-MiniLM-L6-v2", "--output_dir", str(root),
                                       *argv])
    search = merge_plms_glue.searches(args)[variant_index]
    return merge_plms_glue.run_dir_of(args, ("rte", "mrpc"), search, checkpoints)


def test_merge_run_folders_differ_for_every_setting_that_changes_results(tmp_path):
    run = "batch_size=16,learning_rate=3e-05,max_seq_length=128,num_epochs=3,seed=0"
    base_ckpt = {"rte": _tree_checkpoint(tmp_path, "rte", run), "mrpc": _tree_checkpoint(tmp_path, "mrpc", run)}
    other = {
        "train seed": {**base_ckpt, "rte": _tree_checkpoint(tmp_path, "rte", run.replace("seed=0", "seed=1"))},
        "learning rate": {**base_ckpt, "mrpc": _tree_checkpoint(tmp_path, "mrpc", run.replace("3e-05", "1e-05"))},
        "train cap": {**base_ckpt, "rte": _tree_checkpoint(tmp_path, "rte", run + ",max_train_samples=100")},
        "--checkpoint override": {**base_ckpt, "rte": tmp_path / "elsewhere" / "model"},
    }
    fisher = ["--merging_method_name", "fisher_merging", "--grid", "none"]
    argvs = {
        "plain": fisher,
        "fisher estimator": [*fisher, "--fisher_estimator", "exact"],
        "fisher normalisation": [*fisher, "--normalize_fisher_weight"],
        "minimal fisher weight": [*fisher, "--minimal_fisher_weight", "1e-4"],
        "fisher examples (grid none)": [*fisher, "--nums_fisher_examples", "512"],
        "fisher coefficient (grid none)": [*fisher, "--fisher_scaling_coefficients", "0.5"],
        "validation cap": [*fisher, "--max_validation_samples", "100"],
        "selection split": [*fisher, "--select_on", "test"],
    }
    folders = {name: _merge_dir(tmp_path, argv, base_ckpt) for name, argv in argvs.items()}
    folders.update({name: _merge_dir(tmp_path, fisher, ckpt) for name, ckpt in other.items()})
    ta = ["--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic", "--grid", "none"]
    for name, argv in {"ta": ta, "ta lambda": [*ta, "--scaling_coefficient", "0.5"],
                       "ta dare rate": [*ta, "--weight_mask_rate", "0.9"], "ta seed": [*ta, "--seed", "3"],
                       "ta rescale": [*ta, "--use_weight_rescale"]}.items():
        folders[name] = _merge_dir(tmp_path, argv, base_ckpt)
    assert len(set(folders.values())) == len(folders), folders
    # --seeds gives one folder per seed, the same folder as --seed for that seed
    seeds = [_merge_dir(tmp_path, [*ta, "--seeds", "0", "3"], base_ckpt, i) for i in range(2)]
    assert seeds == [folders["ta"], folders["ta seed"]]
    # the same settings always land in the same folder (resume finds it)
    assert _merge_dir(tmp_path, fisher, dict(base_ckpt)) == folders["plain"]


def test_inference_run_folders_name_the_checkpoint_and_seed(tmp_path):
    config = InferenceConfig(language_model_name="all-MiniLM-L6-v2", dataset_names=("rte",),
                             weight_mask_rates=(0.5,), dare=Dare(0.5), seeds=(0, 1))
    run = "learning_rate=3e-05,seed=0"
    in_tree = _tree_checkpoint(tmp_path, "rte", run)
    outside_a, outside_b = tmp_path / "a" / run / "model", tmp_path / "b" / run / "model"
    folders = [config.run_dir(tmp_path, "rte", c, 0.5, s) for c in (in_tree, outside_a, outside_b) for s in (0, 1)]
    assert len(set(folders)) == 6
    assert folders[0].parent.name == run  # a run of the tree is named by its run folder
    assert checkpoint_tag(outside_a, tmp_path).startswith("checkpoint-")
    assert config.mask_seeds == (0, 1)
    magnitude = InferenceConfig(dataset_names=("rte",), dare=Dare(0.5, mask_strategy="magnitude"), seeds=(0, 1, 2))
    assert magnitude.mask_seeds == (0,)  # no randomness: one run


class _FixedScores:
    """An evaluation stand-in whose validation score is read from a table keyed by the recipe's lambda."""

    def __init__(self, scores):
        self.scores = scores

    def score(self, recipe, task, split):
        assert split == "validation"
        value = self.scores[recipe.hyperparameters["scaling_coefficient"]]
        return {"pearson": value, "spearmanr": value, "averaged_scores": value}


def _recipes(n):
    return [Recipe("task_arithmetic", {"scaling_coefficient": 0.1 * (i + 1)}) for i in range(n)]


def test_grid_where_every_setting_scores_nan_selects_the_first(caplog):
    recipes = _recipes(3)
    scores = _FixedScores({r.hyperparameters["scaling_coefficient"]: math.nan for r in recipes})
    assert select_on_split(scores, recipes, "stsb", "validation") == recipes[0]
    assert "every setting scored NaN" in caplog.text
    recipes = _recipes(5)
    values = [math.nan, 0.2, math.nan, 0.5, 0.5]
    scores = _FixedScores({r.hyperparameters["scaling_coefficient"]: v for r, v in zip(recipes, values, strict=True)})
    assert select_on_split(scores, recipes, "stsb", "validation") == recipes[3]  # NaN never wins; ties: the first


def test_length_grouped_batches_cover_every_example_once_per_epoch():
    lengths = [(i * 37) % 101 for i in range(203)]
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=0, chunk_batches=4)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(203))
        assert len(batches) == len(sampler) == 26 and all(1 <= len(b) <= 8 for b in batches)
        # inside a batch the lengths are close: the spread is far below that of random batches
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
        assert spread < 30
    assert epochs[0] != epochs[1]  # a new order every epoch
    assert [list(LengthGroupedBatches(lengths, 8, seed=0, chunk_batches=4)) for _ in range(1)][0] == epochs[0]


def test_group_by_length_is_for_training_loaders_only():
    from glue.glue_data import make_dataloader

    with pytest.raises(ValueError, match="group_by_length needs shuffle=True"):
        make_dataloader([], None, batch_size=2, group_by_length=True)


def test_quickstart_headline_reads_the_numbers():
    import quickstart
    from glue.glue_tables import Stat

    tables = {
        "dare_sweep": (["task", "variant", "p=0.0", "p=0.9", "p=0.99"],
                       [["sst2", "DARE-n500", 88.0, Stat((87.0, 89.0)), 60.0],
                        ["sst2", "DropOnly-n500", 88.0, Stat((50.0, 52.0)), 50.0]]),
        "dare_effect": (["method", "cells", "points", "up", "down", "cells >= 10", "relative", "paper"],
                        [["ties_merging", 2, 1.2, 2, 0, 2, 1.5, 0.84]]),
    }
    assert quickstart.headline(tables) == (
        "At drop rate 0.9, sst2 88.0 -> DARE 88.0 / DropOnly 51.0. DARE before merging changed the merged test "
        "scores by (mean over cells, points) ties_merging +1.20.")


def test_quickstart_headline_without_a_rate_zero_column_says_the_sentence_without_the_start():
    import quickstart

    tables = {"dare_sweep": (["task", "variant", "p=0.5", "p=0.9"],
                             [["sst2", "DARE-n500", 88.0, 87.0], ["sst2", "DropOnly-n500", 80.0, 51.0]])}
    assert quickstart.headline(tables) == "At drop rate 0.9, sst2 DARE 87.0 / DropOnly 51.0."


def test_quickstart_always_evaluates_rate_zero_for_the_fine_tuned_score(monkeypatch, tmp_path):
    import inference_plms_glue
    import quickstart
    import train_plms_glue

    calls = []
    monkeypatch.setattr(train_plms_glue, "main", lambda argv: None)
    monkeypatch.setattr(inference_plms_glue, "main", lambda argv: calls.append(argv))
    args = quickstart.parse_args(["--output_dir", str(tmp_path), "--weight_mask_rates", "0.5", "0.9",
                                  "--skip_merging"])
    assert args.weight_mask_rates == [0.0, 0.5, 0.9]
    quickstart.run_pipeline(args)
    assert len(calls) == 2
    for argv in calls:
        start = argv.index("--weight_mask_rate") + 1
        assert argv[start:start + 3] == ["0.0", "0.5", "0.9"]
    assert quickstart.parse_args(["--weight_mask_rates", "0.9", "0"]).weight_mask_rates == [0.9, 0.0]


def test_dare_in_a_pair_with_a_regression_head_keeps_each_head():
    import torch

    from glue.glue_merging import PairMerger

    torch.manual_seed(0)
    encoder = {"encoder.weight": torch.randn(4, 3)}
    pretrained = {**encoder, "classifier.weight": torch.randn(2, 3)}  # built with the first task's 2 labels
    finetuned = [{"encoder.weight": encoder["encoder.weight"] + 0.01, "classifier.weight": torch.randn(2, 3)},
                 {"encoder.weight": encoder["encoder.weight"] - 0.01, "classifier.weight": torch.randn(1, 3)}]
    merger = PairMerger(["sst2", "stsb"], finetuned, pretrained, [], {})
    dared = merger._dared(Dare(0.5, seed=0))
    for before, after in zip(finetuned, dared, strict=True):
        assert torch.equal(after["classifier.weight"], before["classifier.weight"])  # heads are never dropped
        delta = after["encoder.weight"] - encoder["encoder.weight"]
        kept = delta != 0
        assert 0 < kept.sum() < kept.numel()  # some deltas dropped, the others rescaled by 1 / (1 - 0.5)
        torch.testing.assert_close(delta[kept].abs(), torch.full_like(delta[kept], 0.02))


def test_a_tasks_dare_mask_is_the_same_in_every_pair():
    import torch

    from glue.glue_merging import PairMerger

    torch.manual_seed(0)
    base = {"encoder.weight": torch.randn(8, 8)}
    finetuned = {t: {"encoder.weight": base["encoder.weight"] + 0.01 * torch.randn(8, 8),
                     "classifier.weight": torch.randn(2, 8)} for t in ("rte", "mrpc", "cola")}

    def dared(tasks, seed=0):
        merger = PairMerger(list(tasks), [finetuned[t] for t in tasks], base, [], {})
        return dict(zip(tasks, merger._dared(Dare(0.5, seed=seed)), strict=True))

    first, second, third = dared(("rte", "mrpc")), dared(("mrpc", "cola")), dared(("cola", "rte"))
    assert torch.equal(first["rte"]["encoder.weight"], third["rte"]["encoder.weight"])  # position 0 and 1
    assert torch.equal(first["mrpc"]["encoder.weight"], second["mrpc"]["encoder.weight"])
    # two tasks never share a mask (the drop positions of rte and mrpc differ), and the seed changes the mask
    assert not torch.equal(first["rte"]["encoder.weight"] != base["encoder.weight"],
                           first["mrpc"]["encoder.weight"] != base["encoder.weight"])
    assert not torch.equal(first["rte"]["encoder.weight"], dared(("rte", "mrpc"), seed=1)["rte"]["encoder.weight"])


# --- every flag is applied or refused; every setting keys the caches ---------------------------------------------


def _searches(argv):
    args = merge_plms_glue.parse_args(["--language_model_name", "all-MiniLM-L6-v2", *argv])
    return merge_plms_glue.searches(args)


@pytest.mark.parametrize("flag", [["--scaling_coefficient", "0.5"], ["--param_value_mask_rate", "0.3"],
                                  ["--fisher_scaling_coefficients", "0.5"], ["--reduce_non_diagonal_ratio", "0.5"],
                                  ["--nums_fisher_examples", "512"], ["--weight_mask_rate", "0.3"]])
def test_a_flag_the_paper_grid_searches_is_refused_not_ignored(flag):
    methods = ["--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic", "ties_merging",
               "fisher_merging", "regmean_merging"]
    with pytest.raises(ValueError, match=f"{flag[0]} .* has no effect under --grid paper"):
        _searches([*methods, *flag])


def test_grid_none_searches_every_value_of_a_flag():
    (ta,) = _searches(["--merging_method_name", "task_arithmetic", "--grid", "none", "--scaling_coefficient", "0.3",
                       "0.5"])
    assert ta.grid == {"scaling_coefficient": (0.3, 0.5)}
    assert [r.hyperparameters["scaling_coefficient"] for r in ta.candidates()] == [0.3, 0.5]
    (fisher,) = _searches(["--merging_method_name", "fisher_merging", "--grid", "none", "--nums_fisher_examples",
                           "64", "128"])
    assert fisher.grid["num_fisher_examples"] == (64, 128)
    (dare,) = _searches(["--merging_method_name", "mask_merging", "--grid", "none", "--weight_mask_rate", "0.3",
                         "0.9", "--use_weight_rescale"])
    assert dare.dare_rates == (0.3, 0.9) and dare.recipe.dare.use_weight_rescale


def test_a_fixed_setting_of_the_paper_grid_reaches_the_recipe():
    (fisher,) = _searches(["--merging_method_name", "fisher_merging", "--normalize_fisher_weight",
                           "--minimal_fisher_weight", "1e-4", "--fisher_estimator", "exact"])
    assert fisher.recipe.hyperparameters["normalize_fisher_weight"] is True
    assert fisher.recipe.hyperparameters["minimal_fisher_weight"] == 1e-4
    assert fisher.recipe.hyperparameters["fisher_estimator"] == "exact"
    assert set(fisher.grid) == {"fisher_scaling_coefficients", "num_fisher_examples"}


def test_statistics_beyond_the_loaded_examples_are_refused_and_the_cap_is_named(tmp_path):
    argv = ["--language_model_name", "all-MiniLM-L6-v2", "--output_dir", str(tmp_path), "--merging_method_name",
            "fisher_merging", "--grid", "none", "--nums_fisher_examples", "4096"]
    args = merge_plms_glue.parse_args(argv)
    with pytest.raises(ValueError, match="num_fisher_examples=4096 needs more training examples than "
                                         "--max_statistics_examples 2048"):
        merge_plms_glue.check_statistics_examples(args, merge_plms_glue.searches(args))
    args = merge_plms_glue.parse_args([*argv, "--max_statistics_examples", "4096"])
    merge_plms_glue.check_statistics_examples(args, merge_plms_glue.searches(args))
    checkpoints = {"rte": tmp_path / "a", "mrpc": tmp_path / "b"}
    folder = merge_plms_glue.run_dir_of(args, ("rte", "mrpc"), merge_plms_glue.searches(args)[0], checkpoints)
    assert "max_statistics_examples=4096" in folder.name and "num_fisher_examples=4096" in folder.name


class _Encoder:
    """A model stand-in: holds the loaded state dict; ``evaluate_model`` reads a score off it."""

    def __init__(self):
        self.state = None

    def load_state_dict(self, state):
        self.state = {k: v.clone() for k, v in state.items()}


def _tiny_pair(monkeypatch):
    import torch

    import glue.glue_merging
    from glue.glue_merging import PairMerger

    monkeypatch.setattr(glue.glue_merging, "evaluate_model",
                        lambda model, loader, tasks, **k: dict.fromkeys(("accuracy", "averaged_scores"),
                                                                        float(model.state["encoder.weight"].sum())))
    torch.manual_seed(0)
    base = {"encoder.weight": torch.randn(16, 16)}
    finetuned = [{"encoder.weight": base["encoder.weight"] + 0.1 * torch.randn(16, 16),
                  "classifier.weight": torch.randn(2, 16)} for _ in range(2)]
    loaders = {t: {"validation": None, "test": None} for t in ("rte", "mrpc")}
    return PairMerger(["rte", "mrpc"], finetuned, base, [_Encoder(), _Encoder()], loaders)


def test_every_setting_of_a_recipe_keys_the_score_cache(monkeypatch):
    merger = _tiny_pair(monkeypatch)
    base = Recipe("task_arithmetic", {"scaling_coefficient": 0.5}, Dare(0.5, seed=0))
    neighbours = [base, base.replace(use_weight_rescale=False), base.replace(mask_strategy="magnitude"),
                  base.replace(weight_format="finetuned_weight"), base.replace(seed=1),
                  base.replace(weight_mask_rate=0.3), base.replace(scaling_coefficient=0.7)]
    scores = [merger.score(recipe, "rte", "validation")["accuracy"] for recipe in neighbours]
    assert len(set(scores)) == len(scores), scores  # no setting was served another setting's score


def test_grid_json_lists_the_evaluations_served_from_the_cache(monkeypatch):
    from glue.glue_merging import Search, grid_search_pair

    merger = _tiny_pair(monkeypatch)
    search = Search(Recipe("task_arithmetic", {"scaling_coefficient": 0.5}), {"scaling_coefficient": (0.5, 1.0)})
    _, first = grid_search_pair(merger, search)
    _, again = grid_search_pair(merger, search)  # every score is in the cache now
    assert again == first and len(first) == 2 * 2 + 2  # 2 settings x 2 tasks on validation, + test of the best
    assert {(e["task"], e["split"]) for e in first} == {(t, s) for t in ("rte", "mrpc") for s in ("validation",
                                                                                                   "test")}


def test_rescale_search_picks_the_candidate_with_the_smallest_output_change():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from glue.glue_inference import search_rescale_factor

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    finetuned = {k: v + 0.002 * torch.randn_like(v) if v.is_floating_point() else v.clone()
                 for k, v in pretrained.items()}
    batches = [{"input_ids": torch.randint(0, 99, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long),
                "labels": torch.zeros(8, dtype=torch.long), "dataset_ids": torch.zeros(8, dtype=torch.long)}]
    factor, trace = search_rescale_factor(model, pretrained, finetuned, Dare(0.5, seed=0), batches)
    assert factor == trace["candidates"][int(np.argmin(trace["errors"]))]
    assert 2.0 in trace["candidates"] and trace["dare_error"] == trace["errors"][trace["candidates"].index(2.0)]
    assert min(trace["errors"]) <= trace["dare_error"]
    # independent random deltas: to first order the kept part's output change is (1 - p) of the full one in
    # expectation, with as much variance again, so the least-squares factor is about 1, not 1 / (1 - p) = 2
    # (fine-tuning deltas act together, which moves the optimum towards 1 / (1 - p))
    assert factor < 2.0


def test_rescale_search_needs_the_dare_rescale():
    with pytest.raises(ValueError, match="rescale_search chooses DARE's rescale factor"):
        InferenceConfig(dataset_names=("rte",), weight_mask_rates=(0.9,), rescale_search="last_layer",
                        dare=Dare(0.9, use_weight_rescale=False))


def test_every_dare_flag_reaches_the_glue_merge_recipe():
    (dare,) = _searches(["--merging_method_name", "mask_merging", "--use_weight_rescale", "--rescale_factor", "5",
                         "--mask_strategy", "magnitude", "--weight_format", "finetuned_weight"])
    assert (dare.recipe.dare.rescale_factor, dare.recipe.dare.mask_strategy, dare.recipe.dare.weight_format) == (
        5.0, "magnitude", "finetuned_weight")
