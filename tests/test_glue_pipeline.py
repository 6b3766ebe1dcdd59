"""End-to-end: train_plms_glue, inference_plms_glue, merge_plms_glue and summarize_results via ``main(argv)``.

A tiny BERT (hidden 32, MiniLM's tokenizer) saved in a temporary folder is the "pretrained" encoder; each task
keeps a few dozen rows of ../shared/data/glue.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_bert_config

TASKS = ("rte", "mrpc")
ROWS = {"train": 40, "validation": 24}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_data_dir):
    """A tiny pretrained encoder folder, a tiny GLUE folder, and both tasks fine-tuned with train_plms_glue."""
    from transformers import BertModel

    import train_plms_glue
    from glue.encoder_models import load_tokenizer

    root = tmp_path_factory.mktemp("glue")
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)).save_pretrained(
        root / "tiny-bert")
    tokenizer.save_pretrained(root / "tiny-bert")
    for task in (*TASKS, "stsb"):
        (root / "glue" / task).mkdir(parents=True)
        for split, n in ROWS.items():
            lines = (shared_data_dir / "glue" / task / f"{split}.jsonl").read_text().splitlines()[:n]
            (root / "glue" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    common = ["--language_model_name", str(root / "tiny-bert"), "--glue_dir", str(root / "glue"),
              "--output_dir", str(root / "results"), "--num_runs", "1", "--num_epochs", "2",
              "--learning_rate", "1e-3", "--batch_size", "8", "--max_seq_length", "64"]
    trained = {task: train_plms_glue.main([*common, "--dataset_name", task])[0] for task in TASKS}
    return {"root": root, "trained": trained,
            "common": ["--language_model_name", str(root / "tiny-bert"), "--glue_dir", str(root / "glue"),
                       "--output_dir", str(root / "results"), "--batch_size", "8", "--max_seq_length", "64"]}


def test_training_writes_checkpoint_config_and_metrics(workspace):
    run_dirs = list((workspace["root"] / "results" / "train_plms_glue" / "rte" / "tiny-bert").iterdir())
    assert len(run_dirs) == 1 and "learning_rate=0.001" in run_dirs[0].name and "seed=0" in run_dirs[0].name
    for name in ("config.json", "metrics.json", "run.log", "model/config.json", "model/model.safetensors"):
        assert (run_dirs[0] / name).exists(), name
    metrics = json.loads((run_dirs[0] / "metrics.json").read_text())
    assert metrics["rte"]["test"]["num_examples"] == 24  # GLUE validation = our test
    assert metrics["rte"]["validation"]["num_examples"] == 4  # 10 % of 40 train rows
    assert metrics["best_epoch"] in (1, 2) and len(metrics["history"]) == 2
    best = metrics["history"][metrics["best_epoch"] - 1]
    assert best["best"] and best["validation"] == metrics["rte"]["validation"]


def test_rerun_reuses_the_finished_run(workspace):
    import train_plms_glue

    again = train_plms_glue.main([*workspace["common"], "--dataset_name", "rte", "--num_runs", "1",
                                  "--num_epochs", "2", "--learning_rate", "1e-3"])[0]
    assert again["rte"]["test"] == workspace["trained"]["rte"]["rte"]["test"]


def test_inference_rate_zero_equals_finetuned_and_dare_changes_outputs(workspace, monkeypatch):
    import inference_plms_glue
    from glue import glue_training

    logits = []  # the model outputs the sweep computes, in order: per task, p = 0 then p = 0.99
    real_predict = glue_training.predict
    monkeypatch.setattr(glue_training, "predict", lambda *a, **k: logits.append(real_predict(*a, **k)) or logits[-1])
    results = inference_plms_glue.main([*workspace["common"], "--dataset_names", *TASKS, "--use_weight_rescale",
                                        "--weight_mask_rate", "0.0", "0.99"])
    assert len(logits) == 2 * len(TASKS)
    for i, task in enumerate(TASKS):
        assert results[task][(0.0, 0)] == workspace["trained"][task][task]["test"]
        unmasked, dropped = logits[2 * i]["logits"], logits[2 * i + 1]["logits"]
        assert unmasked.shape == dropped.shape
        assert abs(unmasked - dropped).max() > 1e-3, f"{task}: dropping 99% of the deltas left the outputs"
    sweep = workspace["root"] / "results" / "inference_plms_glue" / "rte" / "tiny-bert"
    assert len(list(sweep.glob("*/*/metrics.json"))) == 2


def test_dare_rate_one_is_rejected(workspace):
    import inference_plms_glue

    with pytest.raises(ValueError, match=r"weight_mask_rate must be in \[0, 1\)"):
        inference_plms_glue.main([*workspace["common"], "--dataset_names", "rte", "--weight_mask_rate", "1.0"])


def _best_in_grid(run_dir: Path, task: str, split: str, primary: str) -> dict:
    grid = json.loads((run_dir / "grid.json").read_text())
    scored = [(e["metrics"][primary], i, e["setting"]) for i, e in enumerate(grid)
              if e["task"] == task and e["split"] == split]
    best = max(score for score, _, _ in scored)
    return next(setting for score, _, setting in sorted(scored, key=lambda s: s[1]) if score == best)


@pytest.mark.parametrize("select_on", ["validation", "test"])
def test_merge_grid_selects_on_the_requested_split(workspace, select_on):
    import merge_plms_glue

    out = merge_plms_glue.main([*workspace["common"], "--dataset_names", *TASKS, "--merging_method_name",
                                "task_arithmetic", "mask_merging", "--mask_apply_method", "task_arithmetic",
                                "--use_weight_rescale", "--grid", "quick", "--select_on", select_on, "--overwrite"])
    base = workspace["root"] / "results" / "merge_plms_glue" / "rte+mrpc" / "tiny-bert"
    plain = next((base / "task_arithmetic").glob(f"*select_on={select_on}"))
    dare = next((base / "mask_merging" / "task_arithmetic").glob(f"*select_on={select_on}*"))
    for task, primary in (("rte", "accuracy"), ("mrpc", "averaged_scores")):
        chosen = out["rte+mrpc"]["task_arithmetic"][task]
        assert chosen["hyperparameters"] == _best_in_grid(plain, task, select_on, primary)
        assert chosen["selected_on"] == select_on
        dare_chosen = out["rte+mrpc"]["mask_merging/task_arithmetic/seed=0"][task]["hyperparameters"]
        assert dare_chosen["weight_mask_rate"] in (0.5, 0.9)
        assert dare_chosen == _best_in_grid(dare, task, select_on, primary)
        assert dare_chosen["scaling_coefficient"] == chosen["hyperparameters"]["scaling_coefficient"]
    assert json.loads((plain / "config.json").read_text())["config"]["select_on"] == select_on


def test_all_five_methods_and_summary(workspace):
    import inference_plms_glue
    import merge_plms_glue
    import summarize_results

    inference_plms_glue.main([*workspace["common"], "--dataset_names", "rte", "--use_weight_rescale",
                              "--weight_mask_rate", "0.0", "0.5", "--overwrite"])

    out = merge_plms_glue.main([*workspace["common"], "--dataset_pairs", "rte,mrpc", "--grid", "none",
                                "--merging_method_name", "average_merging", "task_arithmetic", "fisher_merging",
                                "regmean_merging", "ties_merging", "--nums_fisher_examples", "16",
                                "--nums_regmean_examples", "16", "--overwrite"])
    assert set(out["rte+mrpc"]) == {"average_merging", "task_arithmetic", "fisher_merging/fisher_estimator=mergelm",
                                    "regmean_merging", "ties_merging"}
    summary = summarize_results.main(["--results_dir", str(workspace["root"] / "results")])
    header, rows = summary["tables"]["merging"]
    assert header[:2] == ["pair", "target task"]
    assert {"average_merging", "task_arithmetic", "fisher_merging", "regmean_merging", "ties_merging"} <= set(header)
    assert {row[1] for row in rows} == {"rte", "mrpc"}
    assert [p.name for p in summary["plots"]] == ["dare_sweep_DARE.png"] and summary["plots"][0].stat().st_size > 0
    assert "| rte | DARE |" in summary["markdown"]


def test_multitask_model_uses_token_type_ids():
    from transformers import BertModel

    from glue.encoder_models import MultiTaskModel

    torch.manual_seed(0)
    encoder = BertModel(tiny_bert_config()).eval()
    model = MultiTaskModel(encoder, {"rte": torch.nn.Linear(32, 2), "stsb": torch.nn.Linear(32, 1)},
                           {"rte": 7, "stsb": 3}).eval()
    ids = torch.tensor([[2, 5, 6, 3, 7, 8, 3], [2, 5, 6, 3, 7, 8, 3]])
    mask, dataset_ids = torch.ones_like(ids), torch.tensor([7, 3])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1]] * 2)
    with torch.no_grad():
        without = model(ids, mask, dataset_ids)["logits"]
        with_segments = model(ids, mask, dataset_ids, token_type_ids=segments)["logits"]
    assert not torch.allclose(without, with_segments)
    assert with_segments[1, 1].item() == -1000.0  # STS-B's 1-column head is padded


def test_multitask_training_end_to_end(workspace):
    import train_plms_glue

    metrics = train_plms_glue.main([*workspace["common"], "--dataset_name", "stsb", "--multitask_training",
                                    "--auxiliary_dataset_name", "rte", "--num_runs", "1", "--num_epochs", "1"])[0]
    assert set(metrics["rte"]) == {"validation", "test"} and "pearson" in metrics["stsb"]["test"]
    expected = (metrics["rte"]["test"]["accuracy"] + metrics["stsb"]["test"]["averaged_scores"]) / 2
    assert metrics["averaged_scores"]["test"] == pytest.approx(expected)
    folder = next((workspace["root"] / "results" / "train_plms_glue" / "rte_stsb" / "tiny-bert").iterdir())
    from glue.encoder_models import load_multitask_model

    assert set(load_multitask_model(folder / "model").heads) == {"rte", "stsb"}


def test_statistics_of_a_dared_model_are_computed_once_for_all_its_pairs(workspace, monkeypatch):
    """3 tasks -> 3 pairs, each task in 2 of them: one Fisher per (task, DARE seed), not one per (pair, model)."""
    import merge_plms_glue
    import model_merging_methods
    import train_plms_glue

    train_plms_glue.main([*workspace["common"], "--dataset_name", "stsb", "--num_runs", "1", "--num_epochs", "1",
                          "--learning_rate", "1e-3"])
    import glue.glue_merging

    real, calls = model_merging_methods.compute_fisher_weights, []
    monkeypatch.setitem(model_merging_methods.registry.STATISTICS_FUNCTIONS, "fisher",
                        lambda model, *a, **k: calls.append(model.num_labels) or real(model, *a, **k))
    real_dare, dared = glue.glue_merging.dare_state_dict, []
    monkeypatch.setattr(glue.glue_merging, "dare_state_dict",
                        lambda *a, **k: dared.append(k["model_index"]) or real_dare(*a, **k))
    out = merge_plms_glue.main([*workspace["common"], "--dataset_names", *TASKS, "stsb", "--grid", "none",
                                "--merging_method_name", "fisher_merging", "mask_merging", "--mask_apply_method",
                                "fisher_merging", "--use_weight_rescale", "--weight_mask_rate", "0.5",
                                "--seeds", "0", "1", "--nums_fisher_examples", "8", "--overwrite"])
    assert set(out) == {"rte+mrpc", "rte+stsb", "mrpc+stsb"}
    assert all(len(runs) == 3 for runs in out.values())  # plain + DARE seeds 0 and 1
    # plain, seed 0, seed 1 for each of the 3 tasks; stsb's model is the one with a single output
    assert len(calls) == 9 and calls.count(1) == 3
    # and one DARE'd model per (task, seed), keyed by the task: 6, where one per (pair, model, seed) would be 12
    assert sorted(dared) == sorted([glue.glue_merging.dare_mask_index(t) for t in (*TASKS, "stsb")] * 2)


def test_a_dare_run_takes_the_plain_selection_from_the_finished_plain_run(workspace):
    import merge_plms_glue

    common = [*workspace["common"], "--dataset_names", *TASKS, "--grid", "quick", "--use_weight_rescale"]
    plain = merge_plms_glue.main([*common, "--merging_method_name", "task_arithmetic", "--overwrite"])
    dare = merge_plms_glue.main([*common, "--merging_method_name", "mask_merging", "--mask_apply_method",
                                 "task_arithmetic", "--seeds", "3", "--overwrite"])
    base = workspace["root"] / "results" / "merge_plms_glue" / "rte+mrpc" / "tiny-bert" / "mask_merging"
    grid = json.loads(next((base / "task_arithmetic").glob("*seed=3*/grid.json")).read_text())
    assert grid and all("weight_mask_rate" in e["setting"] for e in grid)  # no plain setting evaluated again
    for task in TASKS:
        chosen = dare["rte+mrpc"]["mask_merging/task_arithmetic/seed=3"][task]["hyperparameters"]
        assert chosen["scaling_coefficient"] == plain["rte+mrpc"]["task_arithmetic"][task]["hyperparameters"][
            "scaling_coefficient"]


def test_inference_with_a_searched_or_given_rescale_factor(workspace):
    import inference_plms_glue
    import summarize_results
    from glue.glue_tables import sweep_series

    common = [*workspace["common"], "--dataset_names", "rte", "--use_weight_rescale", "--weight_mask_rate", "0.9"]
    searched = inference_plms_glue.main([*common, "--rescale_search", "last_layer"])["rte"][(0.9, 0)]
    assert searched["rescale_factor"] in searched["rescale_search"]["candidates"]
    given = inference_plms_glue.main([*common, "--rescale_factor", "3"])["rte"][(0.9, 0)]
    assert "rescale_factor" not in given  # a given factor is a setting, not a result
    root = workspace["root"] / "results" / "inference_plms_glue" / "rte" / "tiny-bert"
    names = {p.name for p in root.glob("*/*")}
    assert any("rescale_search=last_layer" in n for n in names) and any("rescale_factor=3.0" in n for n in names)
    runs = [r for r in summarize_results.load_runs(workspace["root"] / "results")
            if r["config"].get("script") == "inference_plms_glue"]
    variants = {variant for _, variant in sweep_series(runs)}
    assert {"DAREx-last_layer", "DARE-rescale_3"} <= variants


def test_statistics_examples_are_a_fixed_seeded_subset_whatever_ran_before(workspace, monkeypatch):
    """Every Fisher and RegMean pass of a task sees the same examples in the same order: with and without DARE,
    with either estimator, first or last in the process (MergeLM's shuffled loader moved on with every
    statistic); config.json records them, and another --statistics_seed is another run folder and subset."""
    import merge_plms_glue
    import model_merging_methods
    from glue.glue_merging import statistics_order

    seen: list[tuple[int, list]] = []  # (number of labels of the model: rte and mrpc both 2, so by order, batches)

    def recording(kind):
        real = model_merging_methods.registry.STATISTICS_FUNCTIONS[kind]

        def wrapped(model, batches, **kwargs):
            batches = list(batches)
            seen.append((kind, [b["input_ids"].tolist() for b in batches]))
            return real(model, iter(batches), **kwargs)
        return wrapped

    for kind in ("fisher", "gram"):
        monkeypatch.setitem(model_merging_methods.registry.STATISTICS_FUNCTIONS, kind, recording(kind))
    common = [*workspace["common"], "--dataset_names", *TASKS, "--grid", "none", "--nums_fisher_examples", "16",
              "--nums_regmean_examples", "16", "--overwrite"]
    dare = ["--use_weight_rescale", "--weight_mask_rate", "0.5", "--seeds", "0"]
    # one process: Fisher with both estimators, RegMean, then both DARE'd (5 statistics per task)
    merge_plms_glue.main([*common, "--merging_method_name", "fisher_merging", "regmean_merging", "mask_merging",
                          "--mask_apply_method", "fisher_merging", "regmean_merging", "--fisher_estimator",
                          "mergelm", "exact", *dare])
    together = list(seen)
    assert len(together) == 2 * 6  # 2 tasks x (2 Fisher + RegMean) x (plain, DARE)
    first_task = [batches for i, (_, batches) in enumerate(together) if i % 2 == 0]
    second_task = [batches for i, (_, batches) in enumerate(together) if i % 2 == 1]
    assert all(b == first_task[0] for b in first_task) and all(b == second_task[0] for b in second_task)
    assert first_task[0] != second_task[0]
    # alone in its process, the DARE'd RegMean sees what it saw after five other statistics
    seen.clear()
    merge_plms_glue.main([*common, "--merging_method_name", "mask_merging", "--mask_apply_method",
                          "regmean_merging", *dare])
    assert [batches for _, batches in seen] == [first_task[0], second_task[0]]
    run = workspace["root"] / "results" / "merge_plms_glue" / "rte+mrpc" / "tiny-bert" / "fisher_merging"
    config = json.loads(next(run.glob("*estimator=exact*num_fisher_examples=16*statistics_seed=0*/config.json"))
                        .read_text())
    subset = config["config"]["statistics_subset"]
    assert subset["seed"] == 0 and subset["positions"]["rte"] == statistics_order(ROWS["train"] * 9 // 10)[:16]
    seen.clear()
    merge_plms_glue.main([*common, "--merging_method_name", "regmean_merging", "--statistics_seed", "1"])
    assert seen[0][1] != first_task[0]
    assert len(list((run.parent / "regmean_merging").glob("*statistics_seed=1*"))) == 1
