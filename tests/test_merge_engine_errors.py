"""Bad input for the streaming merger: each is refused before any tensor is merged, with a message that helps."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import make_family, tiny_bert_config, tiny_llama_config
from test_merge_engine import read_back, save_bin, save_sharded, state_dicts_of

from merge_engine import merge_checkpoints
from model_merging_methods.dare import random_keep_mask

TA = {"merging_method_name": "task_arithmetic", "progress": False}


@pytest.fixture
def family_sds():
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    base, finetuned = make_family(LlamaForCausalLM, config)
    return state_dicts_of([base, *finetuned]), config


def _save_all(sds, config, tmp_path: Path) -> list[str]:
    return [str(save_sharded(sd, tmp_path / n, config=config)) for sd, n in zip(sds, ["base", "ft1", "ft2"],
                                                                                  strict=True)]


def _nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()


def test_missing_folder_lists_places_tried(family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tried: local folder .*does-not-exist"):
        merge_checkpoints(folders[0], [str(tmp_path / "does-not-exist")], str(tmp_path / "out"), **TA)
    assert _nothing_written(tmp_path)


def test_unknown_hub_id_offline_names_the_hub_attempt(family_sds, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    folders = _save_all(*family_sds, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"hub id 'nobody-xyz/not-a-model'"):
        merge_checkpoints(folders[0], ["nobody-xyz/not-a-model"], str(tmp_path / "out"), **TA)


def test_different_architectures_refused(family_sds, tmp_path):
    from transformers import BertForSequenceClassification

    folders = _save_all(*family_sds, tmp_path)
    bert, _ = make_family(BertForSequenceClassification, tiny_bert_config(), num_finetuned=0)
    bert_dir = save_sharded(state_dicts_of([bert])[0], tmp_path / "bert", config=tiny_bert_config())
    with pytest.raises(ValueError, match=r"architecture"):
        merge_checkpoints(folders[0], [str(bert_dir)], str(tmp_path / "out"), **TA)
    assert _nothing_written(tmp_path)


def test_tensor_missing_in_one_model(family_sds, tmp_path):
    sds, config = family_sds
    del sds[2]["model.layers.1.mlp.up_proj.weight"]
    folders = _save_all(sds, config, tmp_path)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.*ft2"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), **TA)
    assert _nothing_written(tmp_path)


def test_shape_mismatch(family_sds, tmp_path):
    sds, config = family_sds
    sds[1]["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 40)
    folders = _save_all(sds, config, tmp_path)
    with pytest.raises(ValueError, match=r"ft1.*down_proj.weight.*shape \(32, 48\), got \(32, 40\)"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), **TA)


def test_truncated_shard(family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    shard = sorted(Path(folders[1]).glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), **TA)
    assert _nothing_written(tmp_path)


def test_corrupt_bin_file(family_sds, tmp_path):
    sds, config = family_sds
    folders = _save_all(sds, config, tmp_path)
    bin_dir = save_bin(sds[1], tmp_path / "bin_ft1", config)
    (bin_dir / "pytorch_model.bin").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*re-download"):
        merge_checkpoints(folders[0], [str(bin_dir)], str(tmp_path / "out"), **TA)


NAN_CASES = {
    "task_arithmetic": {},
    "average_merging": {},
    "ties_merging": {"param_value_mask_rate": 0.5},
    "dare_task_arithmetic": {"mask_apply_method": "task_arithmetic", "weight_mask_rate": 0.9,
                             "use_weight_rescale": True},
    "dare_magnitude_average": {"mask_apply_method": "average_merging", "weight_mask_rate": 0.9,
                               "mask_strategy": "magnitude"},
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_in_finetuned_warns_with_name(family_sds, tmp_path, caplog, case):
    sds, config = family_sds
    name = "model.layers.0.self_attn.q_proj.weight"
    row, col = 3, 4
    if case.startswith("dare_task"):  # a position DARE drops: NaN * 0 is still NaN in the merged tensor
        keep = random_keep_mask(sds[1][name].numel(), 0.9, seed=0, model_index=0, name=name)
        dropped = int(torch.nonzero(~keep)[0])
        row, col = divmod(dropped, sds[1][name].shape[1])
    sds[1][name][row, col] = float("nan")
    folders = _save_all(sds, config, tmp_path)
    method = "mask_merging" if case.startswith("dare") else case
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), merging_method_name=method,
                          hyperparameters=NAN_CASES[case], progress=False)
    assert name in caplog.text and "ft1" in caplog.text and "1 NaN/Inf" in caplog.text
    assert "ft2" not in caplog.text


@pytest.mark.parametrize("case", ["task_arithmetic", "ties_merging", "dare_task_arithmetic"])
def test_inf_in_finetuned_is_an_error_with_strict(family_sds, tmp_path, case):
    sds, config = family_sds
    sds[2]["model.norm.weight"][0] = float("inf")
    folders = _save_all(sds, config, tmp_path)
    method = "mask_merging" if case.startswith("dare") else case
    with pytest.raises(ValueError, match=r"model.norm.weight.*NaN/Inf"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), strict=True, merging_method_name=method,
                          hyperparameters=NAN_CASES[case], progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_in_base_warns_naming_the_base_model(family_sds, tmp_path, caplog, case):
    sds, config = family_sds
    name = "model.layers.1.mlp.down_proj.weight"
    sds[0][name][2, 5] = float("nan")
    folders = _save_all(sds, config, tmp_path)
    method = "mask_merging" if case.startswith("dare") else case
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), merging_method_name=method,
                          hyperparameters=NAN_CASES[case], progress=False)
    assert f"{folders[0]} (base model): tensor {name!r} has 1 NaN/Inf value(s)" in caplog.text
    assert "ft1" not in caplog.text and "ft2" not in caplog.text and "every input is finite" not in caplog.text


@pytest.mark.parametrize("case", ["task_arithmetic", "ties_merging", "dare_task_arithmetic", "average_merging"])
def test_inf_in_base_is_an_error_with_strict(family_sds, tmp_path, case):
    sds, config = family_sds
    sds[0]["model.norm.weight"][1] = float("-inf")
    folders = _save_all(sds, config, tmp_path)
    method = "mask_merging" if case.startswith("dare") else case
    with pytest.raises(ValueError, match=r"base model\): tensor 'model.norm.weight' has 1 NaN/Inf.*--strict"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), strict=True, merging_method_name=method,
                          hyperparameters=NAN_CASES[case], progress=False)
    assert not (tmp_path / "out").exists()


def test_nan_in_a_copied_base_tensor_warns(family_sds, tmp_path, caplog):
    sds, config = family_sds
    sds[0]["model.norm.weight"][0] = float("nan")
    folders = _save_all(sds, config, tmp_path)
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), exclude_param_names_regex=["model.norm"],
                          **TA)
    assert "(base model): tensor 'model.norm.weight' has 1 NaN/Inf" in caplog.text


def test_overflow_with_finite_inputs_is_named(family_sds, tmp_path, caplog):
    sds, config = family_sds
    for sd in sds:
        sd["model.norm.weight"][0] = 60000.0
    sds[1]["model.norm.weight"][0] = 70000.0  # 60000 + (10000 + 0) = 70000 > float16's largest value (65504)
    folders = _save_all(sds, config, tmp_path)
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), dtype="float16", **TA)
    assert "merged tensor 'model.norm.weight' has NaN/Inf value(s) although every input is finite" in caplog.text
    assert "base model" not in caplog.text


def test_drop_rate_one_with_rescale_refused(family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    hp = {"mask_apply_method": "task_arithmetic", "weight_mask_rate": 1.0, "use_weight_rescale": True}
    with pytest.raises(ValueError, match=r"weight_mask_rate must be in \[0, 1\), got 1.0"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), merging_method_name="mask_merging",
                          hyperparameters=hp, progress=False)
    assert _nothing_written(tmp_path)


def test_output_inside_input_refused(family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    with pytest.raises(ValueError, match=r"must not lie inside an input model folder"):
        merge_checkpoints(folders[0], folders[1:], str(Path(folders[1]) / "merged"), **TA)
    assert not (Path(folders[1]) / "merged").exists()
    with pytest.raises(ValueError, match=r"must not contain an input model folder"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path), overwrite=True, **TA)
    assert all(Path(f).exists() for f in folders)


def test_non_empty_output_needs_overwrite(family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"pass --overwrite"):
        merge_checkpoints(folders[0], folders[1:], str(out), **TA)
    merge_checkpoints(folders[0], folders[1:], str(out), overwrite=True, **TA)
    assert not (out / "keep.txt").exists() and (out / "merge_config.json").exists()


def test_statistics_files_required_for_fisher(family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    with pytest.raises(ValueError, match=r"fisher_merging needs one statistics file"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), merging_method_name="fisher_merging",
                          progress=False)


def test_unknown_vocab_policy_and_dtype(family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    with pytest.raises(ValueError, match=r"vocab_policy must be one of"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), vocab_policy="union", **TA)
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), dtype="int8", **TA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hp", [
    {"mask_apply_method": "task_arithmetic", "weight_mask_rate": 0.3, "use_weight_rescale": True,
     "scaling_coefficient": 0.7},
    {"mask_apply_method": "average_merging", "weight_mask_rate": 0.6, "mask_strategy": "magnitude",
     "use_weight_rescale": True},
])
def test_cuda_device_matches_cpu(hp, family_sds, tmp_path):
    folders = _save_all(*family_sds, tmp_path)
    for device in ("cpu", "cuda"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / device), merging_method_name="mask_merging",
                          hyperparameters=hp, device=device, dtype="float32", progress=False)
    cpu, cuda = read_back(tmp_path / "cpu"), read_back(tmp_path / "cuda")
    for name, tensor in cpu.items():  # same masks, same IEEE float32 operations: bit for bit
        assert torch.equal(cuda[name], tensor), name


def test_cuda_refused_without_gpu(family_sds, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    folders = _save_all(*family_sds, tmp_path)
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False"):
        merge_checkpoints(folders[0], folders[1:], str(tmp_path / "out"), device="cuda", **TA)
