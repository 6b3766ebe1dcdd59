import copy

import pytest
import torch
from torch.testing import assert_close

from model_merging_methods import (
    MERGE_METHODS,
    MERGING_METHOD_NAMES,
    compute_fisher_weights,
    compute_gram_matrices,
    get_merge_method,
    merge_models,
    merge_state_dicts,
)
from model_merging_methods.merge_state_dicts import module_parameters


def _literal_models():
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "classifier.weight": torch.tensor([9.0, 9.0])}
    ft = [
        {"w": torch.tensor([1.5, 2.0, 2.0, 5.0]), "classifier.weight": torch.tensor([1.0, 1.0])},
        {"w": torch.tensor([0.0, 2.5, 3.0, 4.0]), "classifier.weight": torch.tensor([2.0, 2.0])},
    ]
    return base, ft


def test_registry_names_and_unknown_name_error():
    assert MERGING_METHOD_NAMES == ("average_merging", "task_arithmetic", "ties_merging", "fisher_merging",
                                    "regmean_merging", "mask_merging")
    with pytest.raises(ValueError, match="Did you mean: ties_merging\\? Available: average_merging"):
        get_merge_method("ties_mergin")
    with pytest.raises(ValueError, match="unknown merging_method_name 'slerp'"):
        merge_state_dicts("slerp", *_literal_models())


def test_average_merging_hand_computed_and_exclusion_copies_pretrained():
    base, ft = _literal_models()
    out = merge_state_dicts("average_merging", base, ft, exclude_param_names_regex=[".*classifier.*"])
    # mean of [1.5, 2, 2, 5] and [0, 2.5, 3, 4]
    assert_close(out["w"], torch.tensor([0.75, 2.25, 2.5, 4.5]))
    assert torch.equal(out["classifier.weight"], base["classifier.weight"])


def test_task_arithmetic_with_lambda_hand_computed():
    base, ft = _literal_models()
    out = merge_state_dicts("task_arithmetic", base, ft, scaling_coefficient=0.5,
                            exclude_param_names_regex=["classifier"])
    # deltas [0.5, 0, -1, 1] + [-1, 0.5, 0, 0] = [-0.5, 0.5, -1, 1]; base + 0.5 * sum
    assert_close(out["w"], torch.tensor([0.75, 2.25, 2.5, 4.5]))
    single = merge_state_dicts("task_arithmetic", base, ft[:1], scaling_coefficient=2.0,
                               exclude_param_names_regex=["classifier"])
    assert_close(single["w"], torch.tensor([2.0, 2.0, 1.0, 6.0]))  # one model works (MergeLM needed two)


def test_exclusion_regex_is_anchored_at_the_start_like_re_match():
    base = {"classifier.w": torch.zeros(1), "bert.classifier.w": torch.zeros(1)}
    ft = [{"classifier.w": torch.ones(1), "bert.classifier.w": torch.ones(1)}]
    out = merge_state_dicts("task_arithmetic", base, ft, exclude_param_names_regex=["classifier"])
    assert out["classifier.w"].item() == 0.0  # excluded: copied from pretrained
    assert out["bert.classifier.w"].item() == 1.0  # re.match does not find it mid-name


def test_mask_merging_rate_zero_equals_plain_method():
    base, ft = _literal_models()
    plain = merge_state_dicts("ties_merging", base, ft, param_value_mask_rate=0.5, scaling_coefficient=0.7)
    masked = merge_state_dicts("mask_merging", base, ft, mask_apply_method="ties_merging", weight_mask_rate=0.0,
                               param_value_mask_rate=0.5, scaling_coefficient=0.7)
    for name in base:
        assert torch.equal(plain[name], masked[name])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(merging_method_name="task_arithmetic", scaling_coefficent=1.0), "unknown hyperparameter"),
        (dict(merging_method_name="mask_merging", weight_mask_rate=1.0), "weight_mask_rate must be in \\[0, 1\\)"),
        (dict(merging_method_name="mask_merging", weight_mask_rate=[0.1, 0.2, 0.3]), "one value per fine-tuned model"),
        (dict(merging_method_name="mask_merging"), "needs weight_mask_rate"),
        (dict(merging_method_name="ties_merging", param_value_mask_rate=1.2), "param_value_mask_rate must be in"),
        (dict(merging_method_name="ties_merging", ties_trim_scope="layer"), "unknown ties_trim_scope"),
        (dict(merging_method_name="mask_merging", weight_mask_rate=0.1, mask_strategy="topk"), "mask_strategy"),
        (dict(merging_method_name="mask_merging", weight_mask_rate=0.1, mask_apply_method="mask_merging"),
         "unknown mask_apply_method"),
    ],
)
def test_bad_hyperparameters_are_rejected_before_work(kwargs, message):
    base, ft = _literal_models()
    name = kwargs.pop("merging_method_name")
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(name, base, ft, **kwargs)


def test_mismatched_names_and_shapes_are_named_in_the_error():
    base, ft = _literal_models()
    bad = copy.deepcopy(ft)
    bad[1]["w"] = torch.zeros(5)
    message = "fine-tuned model 1: tensor 'w' has shape \\(5,\\), pretrained model has \\(4,\\)"
    with pytest.raises(ValueError, match=message):
        merge_state_dicts("average_merging", base, bad)
    del bad[1]["w"]
    with pytest.raises(ValueError, match="missing \\['w'\\]"):
        merge_state_dicts("average_merging", base, bad)
    with pytest.raises(ValueError, match="at least one fine-tuned"):
        merge_state_dicts("average_merging", base, [])


def test_low_precision_inputs_computed_in_float32_returned_in_pretrained_dtype():
    base = {"w": torch.tensor([1.0, 1.0], dtype=torch.bfloat16)}
    ft = [{"w": torch.tensor([1.0078125, 1.0], dtype=torch.bfloat16)}] * 2
    out = merge_state_dicts("task_arithmetic", base, ft, scaling_coefficient=0.5)
    assert out["w"].dtype == torch.bfloat16
    assert out["w"][0].item() == 1.0078125  # 1 + 0.5 * (2 * 0.0078125): exact in float32, then bf16


def _all_method_kwargs(model_statistics=None):
    fisher, grams = model_statistics or (None, None)
    return {
        "average_merging": {},
        "task_arithmetic": {"scaling_coefficient": 0.3},
        "ties_merging": {"param_value_mask_rate": 0.5, "scaling_coefficient": 0.5},
        "fisher_merging": {"fisher_weights": fisher},
        "regmean_merging": {"gram_matrices": grams, "reduce_non_diagonal_ratio": 0.9},
    }


def test_inputs_are_left_untouched_by_every_method(tiny_bert_family, bert_statistics):
    base_model, models = tiny_bert_family
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    ft = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    originals = copy.deepcopy((base, ft))
    stats = ([{k: v.abs() for k, v in sd.items()} for sd in ft], bert_statistics[1])
    methods = _all_method_kwargs(stats)
    assert set(methods) == set(MERGE_METHODS)  # every registered method, RegMean included
    for name, kwargs in methods.items():
        for weight_format in ("delta_weight", "finetuned_weight"):
            merge_state_dicts("mask_merging", base, ft, mask_apply_method=name, weight_mask_rate=0.5,
                              weight_format=weight_format, **kwargs)
    for a, b in zip([base, *ft], [originals[0], *originals[1]], strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def _batches(num_batches=2, batch_size=4, vocab=99, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch_size, seq), generator=g),
             "attention_mask": torch.ones(batch_size, seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,), generator=g)} for _ in range(num_batches)]


@pytest.fixture(scope="module")
def bert_statistics(tiny_bert_family):
    _, models = tiny_bert_family
    fisher = [compute_fisher_weights(m, _batches(), num_examples=8) for m in models]
    grams = [compute_gram_matrices(m, _batches(), num_examples=8) for m in models]
    return fisher, grams


def _regmean_reference(weights: list, grams: list, ratio: float):
    """RegMean (Jin et al., 2023): W = (sum_i G_i)^-1 sum_i G_i W_i^T with off-diagonals scaled by ``ratio``."""
    grams = [ratio * g + (1 - ratio) * torch.diag(torch.diagonal(g)) for g in grams]
    return (torch.inverse(sum(grams)) @ sum(g @ w.T for g, w in zip(grams, weights, strict=True))).T


def _ties_global_reference(deltas: list[dict], rate: float) -> dict:
    """TIES (Yadav et al., 2023) as MergeLM runs it: trim, sign and majority sign over the whole model."""
    names = list(deltas[0])
    flat = torch.stack([torch.cat([d[n].reshape(-1) for n in names]) for d in deltas])
    thresholds = flat.abs().kthvalue(int(flat.shape[1] * rate), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= thresholds)
    signs = torch.sign(trimmed.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    kept = trimmed * (torch.sign(trimmed) == signs)
    merged = kept.sum(dim=0) / (kept != 0).sum(dim=0).clamp(min=1)
    sizes = [deltas[0][n].numel() for n in names]
    return {n: chunk.view_as(deltas[0][n]) for n, chunk in zip(names, merged.split(sizes), strict=True)}


def _reference_merge(name: str, base: dict, finetuned: list[dict], merged_names: list[str], kwargs: dict) -> dict:
    """Each method from its paper's formula in plain torch (no code of the library's methods)."""
    deltas = [{n: ft[n] - base[n] for n in merged_names} for ft in finetuned]
    if name == "ties_merging":
        mean = _ties_global_reference(deltas, kwargs["param_value_mask_rate"])
        return {n: base[n] + kwargs["scaling_coefficient"] * mean[n] for n in merged_names}
    out = {}
    for n in merged_names:
        weights = [ft[n] for ft in finetuned]
        if name == "task_arithmetic":
            out[n] = base[n] + kwargs["scaling_coefficient"] * sum(d[n] for d in deltas)
        elif name == "fisher_merging":
            fisher = [c * (f[n] + kwargs["minimal_fisher_weight"])
                      for c, f in zip(kwargs["fisher_scaling_coefficients"], kwargs["fisher_weights"], strict=True)]
            out[n] = sum(f * w for f, w in zip(fisher, weights, strict=True)) / sum(fisher)
        elif name == "regmean_merging" and n.endswith(".weight") and n[:-7] in kwargs["gram_matrices"][0]:
            grams = [g[n[:-7]] for g in kwargs["gram_matrices"]]
            out[n] = _regmean_reference(weights, grams, kwargs["reduce_non_diagonal_ratio"])
        else:  # average merging; RegMean's parameters without a Gram matrix
            out[n] = sum(weights) / len(weights)
    return out


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_every_method_merges_a_tiny_bert_module(tiny_bert_family, bert_statistics, name):
    base_model, models = tiny_bert_family
    kwargs = {**_all_method_kwargs(bert_statistics),
              "ties_merging": {"param_value_mask_rate": 0.5, "scaling_coefficient": 0.5, "ties_trim_scope": "global"},
              "fisher_merging": {"fisher_weights": bert_statistics[0], "normalize_fisher_weight": False,
                                 "fisher_scaling_coefficients": [0.3, 0.7], "minimal_fisher_weight": 1e-6}}[name]
    exclude = [".*classifier.*"]
    merged = module_parameters(merge_models(name, base_model, models, exclude_param_names_regex=exclude, **kwargs))
    assert "bert.encoder.layer.0.attention.self.query" in bert_statistics[1][0]
    assert torch.equal(merged["classifier.weight"], base_model.classifier.weight)  # excluded: pretrained's
    key = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(merged[key], module_parameters(base_model)[key])
    base, finetuned = module_parameters(base_model), [module_parameters(m) for m in models]
    merged_names = [n for n in base if not n.startswith("classifier")]
    expected = _reference_merge(name, base, finetuned, merged_names, kwargs)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if name == "regmean_merging" else {"rtol": 1e-5, "atol": 1e-6}
    for n in merged_names:
        assert_close(merged[n], expected[n], **tolerance, msg=f"{name}: {n}")


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_merging_a_model_with_itself_returns_it(tiny_bert_family, bert_statistics, name):
    base_model, models = tiny_bert_family
    fisher, grams = bert_statistics
    kwargs = {
        "average_merging": {},
        "task_arithmetic": {"scaling_coefficient": 0.5},
        "ties_merging": {"param_value_mask_rate": 0.0, "scaling_coefficient": 1.0},
        "fisher_merging": {"fisher_weights": [fisher[0], fisher[0]]},
        "regmean_merging": {"gram_matrices": [grams[0], grams[0]], "reduce_non_diagonal_ratio": 0.8},
    }[name]
    fixed = module_parameters(merge_models(name, base_model, [models[0], models[0]], **kwargs))
    for key, value in module_parameters(models[0]).items():
        assert_close(fixed[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def test_tiny_llama_merge_with_tied_embeddings_keeps_them_tied():
    from transformers import LlamaForCausalLM

    from tests.conftest import make_family, tiny_llama_config

    base_model, models = make_family(LlamaForCausalLM, tiny_llama_config(tie_word_embeddings=True))
    base_sd = base_model.state_dict()
    assert base_sd["lm_head.weight"].data_ptr() == base_sd["model.embed_tokens.weight"].data_ptr()
    merged = merge_state_dicts("mask_merging", base_sd, [m.state_dict() for m in models],
                               mask_apply_method="task_arithmetic", weight_mask_rate=0.9, use_weight_rescale=True)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"])
    untied = LlamaForCausalLM(tiny_llama_config())
    untied.load_state_dict(merged)  # a loadable state dict
