"""LoRA adapters as task vectors (``model_merging_methods.lora``) and back (``lora_export``), checked against PEFT.

Adapters are made by PEFT itself on a tiny Llama built in the test; PEFT initialises ``B`` to zero, so every
LoRA factor is overwritten with seeded random values before saving.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from torch.testing import assert_close

from model_merging_methods import apply_dare, merge_state_dicts
from model_merging_methods.dare import mask_tensor
from model_merging_methods.lora import (
    adapter_delta_state_dict,
    adapter_finetuned_state_dict,
    parse_lora_key,
    read_lora_adapter,
)
from model_merging_methods.lora_config import REFUSED_VARIANT_FIELDS, is_lora_adapter_dir, module_scale, pattern_key
from model_merging_methods.lora_export import delta_to_lora, save_lora_adapter, use_randomized_svd
from tests.conftest import tiny_llama_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _base_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def base_model():
    """Shared: tests copy it before wrapping it with PEFT (get_peft_model modifies the model in place)."""
    return _base_model()


def _randomize_lora(peft_model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def make_adapter(base_model, folder, *, seed: int = 1, save_embedding_layers=False, **config):
    """Save a PEFT adapter with random non-zero factors; returns the live PeftModel (adapter "default")."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    kwargs.update(config)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(**kwargs)).eval()
    _randomize_lora(model, seed)
    model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    return model


def _peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """``{base parameter name: get_delta_weight("default")}`` from PEFT's live LoRA layers."""
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            deltas[f"{name}.weight"] = module.get_delta_weight("default")
    return deltas


def _state_dict(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_parse_lora_key_saved_and_live_formats():
    assert parse_lora_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight") == (
        "base_model.model.model.layers.0.mlp.up_proj", "lora_A", None, "weight")
    assert parse_lora_key("m.q_proj.lora_B.default.weight") == ("m.q_proj", "lora_B", "default", "weight")
    assert parse_lora_key("m.q_proj.lora_B.bias") == ("m.q_proj", "lora_B", None, "bias")
    assert parse_lora_key("m.embed_tokens.lora_embedding_A") == ("m.embed_tokens", "lora_embedding_A", None, None)
    assert parse_lora_key("m.embed_tokens.lora_embedding_B.other") == ("m.embed_tokens", "lora_embedding_B",
                                                                       "other", None)
    assert parse_lora_key("m.embed_tokens.weight") is None
    assert parse_lora_key("m.lm_head.modules_to_save.default.weight") is None


def test_pattern_key_matches_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key

    patterns = ["layers.1.self_attn.q_proj", "v_proj", r"layers\.[01]\.mlp\.up_proj", "proj"]
    names = ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj",
             "model.layers.11.self_attn.q_proj", "model.norm"]
    for name in names:
        ours = pattern_key(patterns, name)
        assert (name if ours is None else ours) == get_pattern_key(patterns, name), name
    assert pattern_key(patterns, "model.layers.11.self_attn.q_proj") is None  # suffix match is dot-separated
    assert pattern_key(patterns, "model.norm") is None


def test_delta_from_files_equals_peft_get_delta_weight(base_model, tmp_path):
    assert not is_lora_adapter_dir(tmp_path)
    peft_model = make_adapter(base_model, tmp_path)
    assert is_lora_adapter_dir(tmp_path)
    base = _state_dict(base_model)
    deltas = adapter_delta_state_dict(tmp_path, base)
    expected = _peft_deltas(peft_model)
    assert set(deltas) == set(expected) and len(deltas) == 3 * 2  # 3 target modules in each of 2 layers
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32
        assert torch.equal(delta, expected[name]), name  # same product then scale: bit for bit
        assert delta.abs().sum() > 0


def test_finetuned_state_dict_equals_merge_and_unload(base_model, tmp_path):
    peft_model = make_adapter(base_model, tmp_path)
    base = _state_dict(base_model)
    finetuned = adapter_finetuned_state_dict(tmp_path, base)
    merged = _state_dict(peft_model.merge_and_unload())
    assert set(finetuned) == set(merged)
    changed = 0
    for name, tensor in merged.items():
        assert torch.equal(finetuned[name], tensor), name
        changed += not torch.equal(tensor, base[name])
    assert changed == 6


def test_rslora_scale_is_alpha_over_sqrt_r(base_model, tmp_path):
    peft_model = make_adapter(base_model, tmp_path, r=4, lora_alpha=8, use_rslora=True)
    adapter = read_lora_adapter(tmp_path, _state_dict(base_model))
    assert {m.scale for m in adapter.modules.values()} == {8 / math.sqrt(4)}  # 4.0, not 8 / 4
    expected = _peft_deltas(peft_model)
    for name, delta in adapter_delta_state_dict(adapter, _state_dict(base_model)).items():
        assert torch.equal(delta, expected[name]), name


def test_rank_and_alpha_patterns_match_peft(base_model, tmp_path):
    rank_pattern = {"v_proj": 2, "layers.1.mlp.up_proj": 6}
    alpha_pattern = {"layers.0.self_attn.q_proj": 32, "up_proj": 3}
    peft_model = make_adapter(base_model, tmp_path, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    adapter = read_lora_adapter(tmp_path, _state_dict(base_model))
    layers = {name: module for name, module in peft_model.base_model.model.named_modules()
              if isinstance(module, LoraLayer)}
    for name, module in adapter.modules.items():
        assert (module.rank, module.alpha) == (layers[name].r["default"], layers[name].lora_alpha["default"]), name
        assert module.scale == layers[name].scaling["default"], name
    # hand-computed: v_proj r=2 alpha=8 -> 4.0; layer 1 up_proj r=6 alpha=3 -> 0.5; layer 0 q_proj r=4 alpha=32 -> 8
    assert adapter.modules["model.layers.0.self_attn.v_proj"].scale == 4.0
    assert adapter.modules["model.layers.1.mlp.up_proj"].scale == 0.5
    assert adapter.modules["model.layers.0.self_attn.q_proj"].scale == 8.0
    assert adapter.modules["model.layers.1.self_attn.q_proj"].scale == 2.0
    expected = _peft_deltas(peft_model)
    for name, delta in adapter_delta_state_dict(adapter, _state_dict(base_model)).items():
        assert torch.equal(delta, expected[name]), name


def test_module_scale_first_matching_pattern_wins():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4, "layers.0.self_attn.q_proj": 2}}
    assert module_scale(config, "model.layers.0.self_attn.q_proj") == (4, 16, 4.0)  # dict order, as PEFT


def test_embedding_lora_delta_is_transposed_product(base_model, tmp_path):
    peft_model = make_adapter(base_model, tmp_path, target_modules=["embed_tokens", "q_proj"])
    base = _state_dict(base_model)
    adapter = read_lora_adapter(tmp_path, base)
    embedding = adapter.modules["model.embed_tokens"]
    assert embedding.kind == "embedding"
    delta = adapter.delta("model.embed_tokens.weight")
    assert delta.shape == base["model.embed_tokens.weight"].shape  # (vocab, hidden) = (B @ A).T
    layer = peft_model.base_model.model.model.embed_tokens
    assert torch.equal(delta, layer.get_delta_weight("default"))
    merged = _state_dict(peft_model.merge_and_unload())
    assert torch.equal(adapter_finetuned_state_dict(adapter, base)["model.embed_tokens.weight"],
                       merged["model.embed_tokens.weight"])


def test_embedding_base_layer_saved_with_adapter_is_refused(base_model, tmp_path):
    make_adapter(base_model, tmp_path, target_modules=["embed_tokens"], save_embedding_layers=True)
    with pytest.raises(ValueError, match="not a LoRA factor"):
        read_lora_adapter(tmp_path)


def test_lora_bias_delta_is_scaled_b_bias(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base_model = LlamaForCausalLM(tiny_llama_config(attention_bias=True)).eval()
    peft_model = make_adapter(base_model, tmp_path, target_modules=["q_proj"], lora_bias=True)
    base = _state_dict(base_model)
    finetuned = adapter_finetuned_state_dict(tmp_path, base)
    merged = _state_dict(peft_model.merge_and_unload())
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.weight"):
        assert not torch.equal(merged[name], base[name])
        assert_close(finetuned[name], merged[name], rtol=0, atol=1e-6)


def test_dora_is_refused_naming_use_dora(base_model, tmp_path):
    make_adapter(base_model, tmp_path, use_dora=True)
    with pytest.raises(ValueError, match=r"use_dora=True is not supported: DoRA"):
        read_lora_adapter(tmp_path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("peft_type", "IA3", "peft_type='IA3'"),
    ("init_lora_weights", "pissa_niter_4", "init_lora_weights='pissa_niter_4'"),
    ("init_lora_weights", "loftq", "init_lora_weights='loftq'"),
    ("bias", "all", "bias='all'"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices=\\[1, 2\\]"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "target_parameters="),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication="),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens=\\[5, 6\\]"),
    ("use_qalora", True, "use_qalora=True"),
    ("r", 0, "r must be a positive integer, got 0"),
])
def test_config_fields_that_change_the_math_are_refused(base_model, tmp_path, field, value, message):
    make_adapter(base_model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        read_lora_adapter(tmp_path)


def test_every_peft_lora_variant_field_is_refused_or_known_to_merge_as_lora():
    """Fails when a PEFT upgrade adds a LoRA variant that this module has not classified."""
    variant_fields = {field.name for field in dataclasses.fields(LoraConfig) if field.metadata.get("is_lora_variant")}
    merges_as_plain_lora = {"velora_config"}  # VeloraLinearVariant.merge_safe adds get_delta_weight
    assert variant_fields - merges_as_plain_lora <= set(REFUSED_VARIANT_FIELDS)
    init_variants = dict((f.name, f) for f in dataclasses.fields(LoraConfig))["init_lora_weights"].metadata
    assert init_variants["lora_variants"] == ["mica"]  # MiCA: standard forward and merge, B frozen (accepted)


def test_adapter_for_another_model_is_refused(base_model, tmp_path):
    make_adapter(base_model, tmp_path)
    base = {name.removeprefix("model."): t for name, t in _state_dict(base_model).items()}  # a LlamaModel's names
    with pytest.raises(ValueError, match="which the base model does not have"):
        read_lora_adapter(tmp_path, base)


def test_config_rank_disagreeing_with_file_is_refused(base_model, tmp_path):
    make_adapter(base_model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))
    with pytest.raises(ValueError, match="rank 4 in the file but r=8"):
        read_lora_adapter(tmp_path)


def _decaying_matrix(rows: int, cols: int, seed: int, decay: float = 0.9) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=generator))
    s = decay ** torch.arange(min(rows, cols), dtype=torch.float32)
    return (u * s) @ v.T


def test_delta_to_lora_full_rank_reproduces_delta():
    delta = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    a, b, energy = delta_to_lora(delta, 16)
    assert a.shape == (16, 16) and b.shape == (24, 16)
    assert_close(b @ a, delta, rtol=0, atol=1e-5)
    assert energy == pytest.approx(1.0, abs=1e-6)
    a, b, energy = delta_to_lora(delta, 20)  # above min(shape): zero-padded to the requested rank
    assert a.shape == (20, 16) and torch.all(a[16:] == 0) and torch.all(b[:, 16:] == 0)
    assert_close(b @ a, delta, rtol=0, atol=1e-5)


def test_delta_to_lora_low_rank_is_the_best_rank_r_approximation():
    delta = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(delta.double())
    a, b, energy = delta_to_lora(delta, 5)
    assert energy == pytest.approx(float(s[:5].square().sum() / s.square().sum()), rel=1e-6)
    residual = (delta.double() - (b @ a).double()).square().sum()
    assert float(residual) == pytest.approx(float(s[5:].square().sum()), rel=1e-4)  # Eckart-Young optimum
    assert_close(a.square().sum(1), b.square().sum(0))  # balanced factors: |row of A| = |column of B| = s_i


def test_delta_to_lora_transpose_factors_the_transpose():
    delta = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    a, b, _ = delta_to_lora(delta, 6, transpose=True)
    assert a.shape == (6, 10) and b.shape == (6, 6)
    assert_close((b @ a).T, delta, rtol=0, atol=1e-5)


def test_randomized_svd_energy_close_to_exact_and_rule():
    delta = _decaying_matrix(600, 520, seed=3, decay=0.97)
    exact = delta_to_lora(delta, 32, method="exact")
    randomized = delta_to_lora(delta, 32, method="randomized")
    assert use_randomized_svd((600, 520), 32) and not use_randomized_svd((600, 520), 200)
    assert not use_randomized_svd((64, 4096), 8)  # small side: exact is cheap
    assert randomized.retained_energy <= exact.retained_energy + 1e-6
    assert randomized.retained_energy == pytest.approx(exact.retained_energy, abs=1e-4)
    again = delta_to_lora(delta, 32, method="randomized")
    assert torch.equal(again.a, randomized.a)  # seeded: reproducible


def test_saved_adapter_loads_in_peft_and_equals_full_merge(base_model, tmp_path):
    """Two rank-4 adapters merged by task arithmetic give a rank <= 8 ΔW; at rank 8 the exported adapter is exact."""
    base = _state_dict(base_model)
    make_adapter(base_model, tmp_path / "a", seed=1)
    make_adapter(base_model, tmp_path / "b", seed=2)
    finetuned = [adapter_finetuned_state_dict(tmp_path / name, base) for name in ("a", "b")]
    merged = merge_state_dicts("task_arithmetic", base, finetuned, scaling_coefficient=0.5)
    deltas = {n: merged[n] - base[n] for n in base if not torch.equal(merged[n], base[n])}
    factors = {n.removesuffix(".weight"): delta_to_lora(d, 8) for n, d in deltas.items()}
    assert len(factors) == 6 and all(f.retained_energy == pytest.approx(1.0, abs=1e-5) for f in factors.values())
    save_lora_adapter(tmp_path / "out", {m: (f.a, f.b) for m, f in factors.items()}, rank=8,
                      retained_energy={m: f.retained_energy for m, f in factors.items()})
    assert json.loads((tmp_path / "out" / "retained_energy.json").read_text()).keys() == factors.keys()

    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "out").eval()
    full = copy.deepcopy(base_model)
    full.load_state_dict(merged)
    input_ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(loaded(input_ids).logits, full(input_ids).logits, rtol=1e-4, atol=1e-5)
    assert read_lora_adapter(tmp_path / "out", base).modules.keys() == factors.keys()  # and our reader reads it


def test_dare_on_adapter_delta_equals_dare_on_materialised_delta(base_model, tmp_path):
    peft_model = make_adapter(base_model, tmp_path)
    base = _state_dict(base_model)
    adapter = read_lora_adapter(tmp_path, base)
    materialised = _peft_deltas(peft_model)
    finetuned_dare = apply_dare(base, adapter_finetuned_state_dict(adapter, base), weight_mask_rate=0.7, seed=5,
                                model_index=1)
    for strategy in ("random", "magnitude"):
        for name in adapter.parameter_names():
            kwargs = dict(drop_rate=0.7, use_weight_rescale=True, mask_strategy=strategy, seed=5, model_index=1,
                          name=name)
            ours = mask_tensor(adapter.delta(name), **kwargs)
            assert torch.equal(ours, mask_tensor(materialised[name].clone(), **kwargs)), (strategy, name)
            if strategy == "random":  # the fine-tuned-model path draws the same mask for the same key
                assert torch.equal(finetuned_dare[name] != base[name], ours != 0), name


def test_adapter_and_full_finetune_merge_together(base_model, tmp_path):
    from transformers import LlamaForCausalLM

    make_adapter(base_model, tmp_path)
    base = _state_dict(base_model)
    full = LlamaForCausalLM(tiny_llama_config()).eval()
    full.load_state_dict(base)
    with torch.no_grad():
        for param in full.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(9)) * 0.01)
    full_sd = _state_dict(full)
    merged = merge_state_dicts("task_arithmetic", base, [adapter_finetuned_state_dict(tmp_path, base), full_sd],
                               scaling_coefficient=0.5)
    deltas = adapter_delta_state_dict(tmp_path, base)
    for name in base:
        expected = base[name] + 0.5 * (deltas.get(name, 0.0) + (full_sd[name] - base[name]))
        assert_close(merged[name], expected, rtol=0, atol=1e-6)


# --- PEFT's add_weighted_adapter(combination_type="dare_linear") side by side with DARE on ΔW ---------------------


def peft_dare_linear_delta(lora_as, lora_bs, weights, scales, density: float) -> torch.Tensor:
    """One draw of PEFT's ``dare_linear`` LoRA merge of one module, as ``add_weighted_adapter`` computes it.

    PEFT 0.22.0 ``LoraModel._generalized_task_arithmetic_weighted_adapter``: A factors are weighted by
    ``sign · sqrt(|w_i · s_i|)``, B factors by ``sqrt(|w_i · s_i|)``; ``merge_utils.dare_linear`` drops and rescales
    each factor separately and sums; the new adapter has ``lora_alpha = r`` (scale 1), so ``ΔW = B_m @ A_m``.
    """
    from peft.utils.merge_utils import dare_linear

    products = [w * s for w, s in zip(weights, scales, strict=True)]
    weights_a = torch.tensor([math.sqrt(abs(p)) * (1 if p >= 0 else -1) for p in products])
    weights_b = torch.tensor([math.sqrt(abs(p)) for p in products])
    return dare_linear(list(lora_bs), weights_b, density) @ dare_linear(list(lora_as), weights_a, density)


def dare_linear_on_delta(deltas, weights, density: float, *, seed: int, name: str) -> torch.Tensor:
    """DARE on each ΔW_i (this library, mask keyed by ``(seed, i, name)``), then the weighted sum."""
    masked = [mask_tensor(d.clone(), drop_rate=1 - density, use_weight_rescale=True, mask_strategy="random",
                          seed=seed, model_index=i, name=name) for i, d in enumerate(deltas)]
    return sum(w * m for w, m in zip(weights, masked, strict=True))


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")
def test_peft_add_weighted_adapter_dare_linear_formula_has_cross_terms(base_model, tmp_path):
    """At density 1 (nothing dropped) PEFT's merge is ``(sum_i b_i B_i)(sum_j a_j A_j)``, not ``sum_i w_i ΔW_i``."""
    model = make_adapter(base_model, tmp_path / "a", seed=1)
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and name.endswith(".b.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "merged", combination_type="dare_linear", density=1.0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    as_ = [layer.lora_A[n].weight.detach() for n in ("default", "b")]
    bs = [layer.lora_B[n].weight.detach() for n in ("default", "b")]
    scales = [layer.scaling[n] for n in ("default", "b")]
    peft_delta = layer.get_delta_weight("merged")
    assert_close(peft_delta, peft_dare_linear_delta(as_, bs, [0.5, 0.5], scales, 1.0), rtol=1e-5, atol=1e-7)
    target = sum(0.5 * s * (b @ a) for a, b, s in zip(as_, bs, scales, strict=True))
    assert (peft_delta - target).abs().max() > 0.1 * target.abs().max()  # the cross terms B_a A_b + B_b A_a


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")
def test_dare_on_delta_is_unbiased_and_peft_factor_dare_is_not():
    """Averaged over seeds, DARE(ΔW) -> sum_i w_i ΔW_i; PEFT's factor-wise drop -> a different matrix."""
    generator = torch.Generator().manual_seed(0)
    as_ = [torch.randn(2, 6, generator=generator) for _ in range(2)]
    bs = [torch.randn(8, 2, generator=generator) for _ in range(2)]
    weights, scales, density, draws = [0.5, 0.5], [2.0, 2.0], 0.5, 3000
    deltas = [s * (b @ a) for a, b, s in zip(as_, bs, scales, strict=True)]
    target = sum(w * d for w, d in zip(weights, deltas, strict=True))

    ours = torch.stack([dare_linear_on_delta(deltas, weights, density, seed=k, name="q") for k in range(draws)])
    theirs = []
    for k in range(draws):
        torch.manual_seed(k)  # PEFT's random_pruning draws from the global generator
        theirs.append(peft_dare_linear_delta(as_, bs, weights, scales, density))
    theirs = torch.stack(theirs)

    def within_5_sigma(samples, expected):
        standard_error = samples.std(0) / math.sqrt(draws)
        return bool(((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-6).all())

    assert within_5_sigma(ours, target)
    peft_expectation = peft_dare_linear_delta(as_, bs, weights, scales, 1.0)  # independent unbiased factor masks
    assert within_5_sigma(theirs, peft_expectation)
    assert not within_5_sigma(theirs, target)
    # one draw of ours is a DARE sample: each entry of each ΔW_i kept as ΔW_i / density or dropped
    single = mask_tensor(deltas[0].clone(), drop_rate=0.5, use_weight_rescale=True, mask_strategy="random", seed=0,
                         model_index=0, name="q")
    assert bool(((single == 0) | (single == deltas[0] / 0.5)).all())


def test_fan_in_fan_out_conv1d_delta_and_export_round_trip(tmp_path):
    """GPT-2 ``Conv1D`` stores ``(in, out)`` weights: ΔW = (B @ A).T, and the export factors ΔWᵀ."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base_model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    base = _state_dict(base_model)
    peft_model = make_adapter(base_model, tmp_path / "in", target_modules=["c_attn"], fan_in_fan_out=True)
    deltas = adapter_delta_state_dict(tmp_path / "in", base)
    layer = peft_model.base_model.model.transformer.h[0].attn.c_attn
    assert torch.equal(deltas["transformer.h.0.attn.c_attn.weight"], layer.get_delta_weight("default"))
    assert deltas["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # (in, out)

    factors = delta_to_lora(deltas["transformer.h.0.attn.c_attn.weight"], 4, transpose=True)
    save_lora_adapter(tmp_path / "out", {"transformer.h.0.attn.c_attn": factors[:2]}, rank=4, fan_in_fan_out=True)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "out").eval()
    full = copy.deepcopy(base_model)
    full.load_state_dict(adapter_finetuned_state_dict(tmp_path / "in", base))
    input_ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(loaded(input_ids).logits, full(input_ids).logits, rtol=1e-4, atol=1e-5)


def test_adapter_without_safetensors_is_refused(base_model, tmp_path):
    make_adapter(base_model, tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        read_lora_adapter(tmp_path)
