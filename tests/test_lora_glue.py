"""LoRA adapters in the GLUE scripts: training with ``--lora_rank``, the classifier head saved whole
(``modules_to_save``), loading an adapter as a classifier, picking adapters by rank, and PEFT's factor-wise merges
(``glue.peft_factorwise``) that DARE on ΔW is compared with."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from glue.encoder_models import load_finetuned_classifier, save_lora_classifier, wrap_with_lora
from glue.glue_finetune import GlueTrainConfig, find_finetuned_checkpoint
from model_merging_methods.lora import adapter_delta_state_dict, read_lora_adapter
from tests.conftest import tiny_bert_config

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny pretrained encoder folder (the "base model" of the adapters)."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(folder)
    return folder


def _adapter(tiny_bert, folder, seed: int, num_labels: int = 3):
    """A trained-looking GLUE adapter: random LoRA factors and head, saved by save_lora_classifier."""
    from glue.encoder_models import load_pretrained_classifier

    model = wrap_with_lora(load_pretrained_classifier(str(tiny_bert), num_labels), rank=4, alpha=8.0).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # lora factors and the head's modules_to_save copy
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    save_lora_classifier(model, folder, str(tiny_bert))
    return model


def test_adapter_with_its_head_loads_as_the_classifier_peft_computes(tiny_bert, tmp_path):
    live = _adapter(tiny_bert, tmp_path / "a", seed=1)
    adapter = read_lora_adapter(tmp_path / "a")
    assert set(adapter.full_tensors) == {"classifier.weight", "classifier.bias"}
    assert adapter.config["base_model_name_or_path"] == str(tiny_bert)
    # the pooler and every attention / FFN Linear carry LoRA; nothing else
    assert all(m.rsplit(".", 1)[-1] in ("query", "key", "value", "dense") for m in adapter.modules)
    ours = load_finetuned_classifier(tmp_path / "a").eval()
    inputs = torch.randint(0, 99, (4, 12))
    with torch.no_grad():
        assert_close(ours(input_ids=inputs).logits, live(input_ids=inputs).logits, rtol=0, atol=1e-5)
        assert_close(ours.classifier.weight, live.base_model.model.classifier.modules_to_save["default"].weight)


def test_a_head_delta_is_saved_minus_base_and_a_missing_head_is_refused(tiny_bert, tmp_path):
    from glue.encoder_models import load_pretrained_classifier

    _adapter(tiny_bert, tmp_path / "a", seed=1)
    base = load_pretrained_classifier(str(tiny_bert), 3).state_dict()
    deltas = adapter_delta_state_dict(tmp_path / "a", base)
    saved = read_lora_adapter(tmp_path / "a").full_tensor("classifier.weight")
    assert torch.equal(deltas["classifier.weight"], saved.float() - base["classifier.weight"].float())
    wrong = load_pretrained_classifier(str(tiny_bert), 2).state_dict()  # a 2-label head cannot be replaced by 3
    with pytest.raises(ValueError, match=r"modules_to_save tensor 'classifier\.(weight|bias)' has shape"):
        read_lora_adapter(tmp_path / "a", wrong)


def test_streaming_merger_refuses_modules_to_save_by_name(tiny_bert, tmp_path):
    from merge_engine.lora_source import index_adapter
    from merge_engine.shard_index import index_checkpoint

    _adapter(tiny_bert, tmp_path / "a", seed=1)
    with pytest.raises(ValueError, match=r"modules_to_save: \['classifier'\]"):
        index_adapter(tmp_path / "a", index_checkpoint(tiny_bert))


def test_lora_runs_are_named_and_picked_by_rank(tmp_path):
    full = GlueTrainConfig(dataset_name="rte", language_model_name="m", learning_rate=1e-3)
    lora = GlueTrainConfig(dataset_name="rte", language_model_name="m", learning_rate=1e-3, lora_rank=8)
    assert "lora" not in full.run_dir(tmp_path).name
    assert "lora_alpha=16.0,lora_rank=8" in lora.run_dir(tmp_path).name
    for config in (full, lora):
        (config.run_dir(tmp_path) / "model").mkdir(parents=True)
        record = {"config": {k: v for k, v in vars(config).items() if k != "lora_rank" or v is not None}}
        (config.run_dir(tmp_path) / "config.json").write_text(json.dumps(record))
    assert find_finetuned_checkpoint(tmp_path, "rte", "m", lora_rank=None).parent == full.run_dir(tmp_path)
    assert find_finetuned_checkpoint(tmp_path, "rte", "m", lora_rank=8).parent == lora.run_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        find_finetuned_checkpoint(tmp_path, "rte", "m", lora_rank=4)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lora_rank=0), "lora_rank must be >= 1, got 0"),
    (dict(lora_alpha=8.0), "lora_alpha=8.0 is set without --lora_rank"),
    (dict(lora_rank=8, multitask_training=True, auxiliary_dataset_name="mrpc"), "single-task adapters"),
])
def test_bad_lora_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlueTrainConfig(dataset_name="rte", **kwargs)


@pytest.fixture()
def merger(tiny_bert, tmp_path):
    from glue.encoder_models import load_pretrained_classifier
    from glue.peft_factorwise import FactorwiseMerger

    for name, seed in (("a", 1), ("b", 2)):
        _adapter(tiny_bert, tmp_path / name, seed=seed)
    return FactorwiseMerger({"a": tmp_path / "a", "b": tmp_path / "b"}, load_pretrained_classifier(str(tiny_bert), 3))


def test_factorwise_merger_holds_each_adapter_exactly(merger):
    for name in ("a", "b"):
        adapter = merger.adapters[name]
        ours = {n: adapter.delta(n) for n in adapter.parameter_names()}
        assert merger.single_delta(name).keys() == ours.keys()
        for key, value in merger.single_delta(name).items():
            assert torch.equal(value, ours[key])  # PEFT's get_delta_weight, bit for bit


def test_factorwise_linear_merge_has_peft_cross_terms(merger):
    """``linear`` with weights w: ``(sum_i sqrt(w s) B_i)(sum_j sqrt(w s) A_j)`` = w s (B_a A_a + B_b A_b + B_a A_b +
    B_b A_a), not ``w (ΔW_a + ΔW_b)``."""
    weight = 0.5
    merged = merger.delta(["a", "b"], [weight, weight], "linear")
    module = sorted(merger.adapters["a"].modules)[0]
    factors = {}
    for name in ("a", "b"):
        m = merger.adapters[name].modules[module]
        from safetensors import safe_open

        with safe_open(str(merger.adapters[name].folder / "adapter_model.safetensors"), framework="pt") as handle:
            factors[name] = (handle.get_tensor(m.a_key), handle.get_tensor(m.b_key), m.scale)
    root = math.sqrt(weight * factors["a"][2])
    expected = (root * factors["a"][1] + root * factors["b"][1]) @ (root * factors["a"][0] + root * factors["b"][0])
    assert_close(merged[f"{module}.weight"], expected, rtol=1e-5, atol=1e-7)
    task_arithmetic = weight * (merger.adapters["a"].delta(f"{module}.weight") +
                                merger.adapters["b"].delta(f"{module}.weight"))
    assert (merged[f"{module}.weight"] - task_arithmetic).abs().max() > 0.05 * task_arithmetic.abs().max()


def test_factorwise_dare_is_seeded_and_drops_factor_entries(merger):
    """One adapter: PEFT's add_weighted_adapter would silently turn dare_linear into linear; the merger applies
    PEFT's factor-wise operator instead (A and B each dropped and rescaled by 1 / density)."""
    from peft.utils.merge_utils import dare_linear

    module = sorted(merger.adapters["a"].modules)[0]
    m = merger.adapters["a"].modules[module]
    layer = merger._layer(merger.model, module)
    lora_a, lora_b = layer.lora_A["a"].weight.detach(), layer.lora_B["a"].weight.detach()
    root = torch.tensor([math.sqrt(m.scale)])
    torch.manual_seed(3)
    expected_a = dare_linear([lora_a], root, 0.5)  # PEFT draws A's mask first, then B's
    expected_b = dare_linear([lora_b], root, 0.5)
    first = merger.delta(["a"], [1.0], "dare_linear", density=0.5, seed=3)
    assert_close(first[f"{module}.weight"], expected_b @ expected_a, rtol=0, atol=0)
    again = merger.delta(["a"], [1.0], "dare_linear", density=0.5, seed=3)
    other = merger.delta(["a"], [1.0], "dare_linear", density=0.5, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    # a ΔW entry is zero when every one of its r rank-1 terms lost its A or its B entry: (1 - density²)^r of them
    # (0.316 at r = 4), although DARE on ΔW at the same drop rate zeroes half of the entries
    zero = (first[f"{module}.weight"] == 0).float().mean().item()
    assert abs(zero - (1 - 0.5 ** 2) ** m.rank) < 0.1
    with pytest.raises(ValueError, match="combination_type must be one of"):
        merger.delta(["a"], [1.0], "svd")


@pytest.mark.parametrize(("argv", "message"), [
    (["sweep", "--learning_rate", "1e-3"], "pass --lora_rank R"),
    (["sweep", "--lora_rank", "8", "--weight_mask_rate", "1.0"], r"must be in \(0, 1\)"),
    (["sweep", "--lora_rank", "8", "--seeds"], "sweep needs at least one mask seed"),
    (["merge", "--lora_rank", "8", "--weight_mask_rate", "0.0"], r"must be in \(0, 1\)"),
])
def test_peft_baseline_flags_are_checked_before_any_model_is_loaded(argv, message, tmp_path):
    import peft_lora_glue

    with pytest.raises(ValueError, match=message):
        peft_lora_glue.main([*argv, "--output_dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
