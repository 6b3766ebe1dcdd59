"""PEFT LoRA adapter folders as fine-tuned inputs of the streaming merger (``merge_engine.lora_source``).

The adapter's ΔW = scale·B·A is the delta: DARE and the methods must see it exactly, so the references here are the
library fed with ΔW itself (``adapter_delta_state_dict``), compared bit for bit. Adapters are made by PEFT on a tiny
Llama (``tests/test_lora.make_adapter``: random non-zero factors).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import merge_checkpoints
from merge_engine import merge_checkpoints as merge_api
from model_merging_methods import build_merge_plan, merge_state_dicts
from model_merging_methods.dare import mask_tensor
from model_merging_methods.lora import adapter_delta_state_dict, adapter_finetuned_state_dict
from model_merging_methods.merge_state_dicts import _merge_with_plan
from tests.conftest import tiny_llama_config

pytest.importorskip("peft")
from tests.test_lora import make_adapter  # noqa: E402

# embed_tokens: an embedding's ΔW is (B @ A).T, so its row chunks are slices of the transposed product
TARGETS = ["q_proj", "v_proj", "up_proj", "embed_tokens"]
SEED = 3


def _llama(seed: int = 0, **config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**config)).eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``{"base", "adapter", "full"}`` folders: the base (float32 safetensors), a LoRA adapter of it, and a full
    fine-tune (the base plus seeded noise on every parameter)."""
    root = tmp_path_factory.mktemp("lora_family")
    base = _llama()
    base.save_pretrained(root / "base")
    make_adapter(base, root / "adapter", seed=1, target_modules=TARGETS)
    full = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in full.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    full.save_pretrained(root / "full")
    return {name: str(root / name) for name in ("base", "adapter", "full")}


def _weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(f"{folder}/model.safetensors")


def _merged(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _full_deltas(adapter: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter as a delta state dict: ΔW of every adapted parameter, zeros for every other one."""
    deltas = adapter_delta_state_dict(adapter, base)
    return {name: deltas.get(name, torch.zeros(t.shape, dtype=torch.float32)) for name, t in base.items()}


def _dare_cli(family, out, *extra) -> list[str]:
    return ["--pretrained_model", family["base"], "--finetuned_models", family["adapter"], "--merging_method_name",
            "mask_merging", "--mask_apply_method", "average_merging", "--weight_mask_rate", "0.5",
            "--use_weight_rescale", "--seed", str(SEED), "--output_dir", str(out), "--quiet", *extra]


def test_single_adapter_dare_equals_library_dare_on_delta_bit_for_bit(family, tmp_path):
    merge_checkpoints.main(_dare_cli(family, tmp_path / "out"))
    got = _merged(tmp_path / "out")
    base = _weights(family["base"])
    deltas = adapter_delta_state_dict(family["adapter"], base)
    assert len(deltas) == 2 * 3 + 1  # 3 Linear modules in each of 2 layers, and the embedding
    assert set(got) == set(base)
    for name, tensor in base.items():
        if name not in deltas:
            assert torch.equal(got[name], tensor), name  # ΔW = 0: DARE(0) = 0, base + 0 = base
            continue
        dare = mask_tensor(deltas[name].clone(), drop_rate=0.5, use_weight_rescale=True, mask_strategy="random",
                           seed=SEED, model_index=0, name=name)
        assert torch.equal(got[name], (tensor.float() + dare).to(tensor.dtype)), name
        dropped = (got[name] == tensor).float().mean().item()
        assert 0.3 < dropped < 0.7, (name, dropped)  # half of ΔW dropped, the rest rescaled


def test_row_chunks_slice_the_whole_delta(family, tmp_path):
    """Row chunks (64 elements: two rows of every tensor) give the whole-tensor merge bit for bit."""
    hyperparameters = {"mask_apply_method": "average_merging", "weight_mask_rate": 0.5, "use_weight_rescale": True,
                       "seed": SEED}
    for out, chunk_numel in (("whole", 1 << 20), ("chunked", 64)):
        merge_api(family["base"], [family["adapter"]], str(tmp_path / out), merging_method_name="mask_merging",
                  hyperparameters=hyperparameters, chunk_numel=chunk_numel, progress=False, num_threads=2)
    whole, chunked = _merged(tmp_path / "whole"), _merged(tmp_path / "chunked")
    assert all(torch.equal(whole[name], chunked[name]) for name in whole)


def test_finetuned_weight_format_masks_base_plus_delta(family, tmp_path):
    hyperparameters = {"mask_apply_method": "average_merging", "weight_mask_rate": 0.3, "use_weight_rescale": True,
                       "weight_format": "finetuned_weight", "seed": SEED}
    merge_api(family["base"], [family["adapter"]], str(tmp_path / "out"), merging_method_name="mask_merging",
              hyperparameters=hyperparameters, progress=False)
    got = _merged(tmp_path / "out")
    base = _weights(family["base"])
    for name, delta in _full_deltas(family["adapter"], base).items():
        base32 = base[name].float()
        masked = mask_tensor(base32 + delta, drop_rate=0.3, use_weight_rescale=True, mask_strategy="random",
                             seed=SEED, model_index=0, name=name)
        assert torch.equal(got[name], (base32 + (masked - base32)).to(base[name].dtype)), name


def test_adapter_and_full_finetune_task_arithmetic(family, tmp_path, capsys):
    """Equal to the library fed with ΔW (bit for bit), and to ``merge_state_dicts`` on the materialised adapter
    within the rounding of ``(base + ΔW) - base``; the homology preflight runs on the full fine-tune only."""
    merge_checkpoints.main(["--pretrained_model", family["base"], "--finetuned_models", family["adapter"],
                            family["full"], "--merging_method_name", "task_arithmetic", "--scaling_coefficient",
                            "0.7", "--output_dir", str(tmp_path / "out"), "--quiet"])
    logged = capsys.readouterr().err  # main's logging setup writes to stderr
    assert f"homology check skipped for LoRA adapter folder(s) {family['adapter']}" in logged
    assert f"homology check of {family['full']} against" in logged
    got = _merged(tmp_path / "out")
    base, full = _weights(family["base"]), _weights(family["full"])
    plan = build_merge_plan("task_arithmetic", 2, scaling_coefficient=0.7)
    fed_delta = _merge_with_plan(dataclasses.replace(plan, delta_inputs=(True, False)), base,
                                 [_full_deltas(family["adapter"], base), full], (), None)
    assert all(torch.equal(got[name], fed_delta[name]) for name in base)
    materialised = merge_state_dicts("task_arithmetic", base, [adapter_finetuned_state_dict(family["adapter"], base),
                                                                full], scaling_coefficient=0.7)
    for name, tensor in materialised.items():
        # (base + ΔW) rounds to half an ulp of |base + ΔW|, scaled by λ; the final sums may round one ulp apart
        eps = torch.finfo(torch.float32).eps
        tolerance = eps * (0.7 * (base[name].abs().max().item() + 1.0) + tensor.abs().max().item())
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=tolerance)


@pytest.mark.parametrize("method", ["average_merging", "task_arithmetic", "ties_merging"])
def test_every_method_merges_adapter_deltas_as_the_library(family, tmp_path, method):
    """DARE then each method without statistics (TIES with MergeLM's global trim: the whole-model passes read the
    adapter too) on an adapter and a full fine-tune equals the library fed with ΔW, bit for bit."""
    hyperparameters = {"mask_apply_method": method, "weight_mask_rate": 0.4, "use_weight_rescale": True, "seed": SEED}
    merge_api(family["base"], [family["full"], family["adapter"]], str(tmp_path / "out"),
              merging_method_name="mask_merging", hyperparameters=hyperparameters, progress=False, chunk_numel=64)
    got = _merged(tmp_path / "out")
    base, full = _weights(family["base"]), _weights(family["full"])
    plan = dataclasses.replace(build_merge_plan("mask_merging", 2, **hyperparameters), delta_inputs=(False, True))
    expected = _merge_with_plan(plan, base, [full, _full_deltas(family["adapter"], base)], (), None)
    assert all(torch.equal(got[name], expected[name]) for name in base)


def test_dora_adapter_is_refused_before_any_output(family, tmp_path):
    dora = tmp_path / "dora"
    make_adapter(_llama(), dora, target_modules=["q_proj"], use_dora=True)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"use_dora=True is not supported: DoRA"):
        merge_checkpoints.main(["--pretrained_model", family["base"], "--finetuned_models", str(dora),
                                family["full"], "--merging_method_name", "task_arithmetic", "--output_dir", str(out),
                                "--quiet"])
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_adapter_of_another_model_is_refused_before_any_output(family, tmp_path):
    other = tmp_path / "other"
    make_adapter(_llama(hidden_size=48), other, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"ΔW of 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(48, 48\), "
                                         r"base model has \(32, 32\)"):
        merge_api(family["base"], [str(other)], str(tmp_path / "out"), merging_method_name="task_arithmetic",
                  progress=False)
    assert not list(tmp_path.glob("out*"))


@pytest.mark.parametrize(("arguments", "message"), [
    ({"merging_method_name": "fisher_merging"}, r"fisher statistics merges need full models, got the LoRA adapter"),
    ({"merging_method_name": "task_arithmetic", "copy_config_from": 1},
     r"copy_config_from must point at a full model .* got 1, the LoRA adapter folder"),
])
def test_settings_an_adapter_cannot_serve_are_refused(family, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        merge_api(family["base"], [family["adapter"], family["full"]], str(tmp_path / "out"), progress=False,
                  **arguments)
    assert not list(tmp_path.glob("out*"))


def test_adapter_as_pretrained_model_is_refused(family, tmp_path):
    with pytest.raises(ValueError, match=r"pretrained_model must be a full model, got the LoRA adapter folder"):
        merge_api(family["adapter"], [family["full"]], str(tmp_path / "out"), merging_method_name="task_arithmetic",
                  progress=False)


def test_record_lists_adapter_files_and_resume_compares_them(family, tmp_path):
    adapter = tmp_path / "adapter"
    make_adapter(_llama(), adapter, seed=4, target_modules=["q_proj", "v_proj"])
    args = _dare_cli({**family, "adapter": str(adapter)}, tmp_path / "out")
    merge_checkpoints.main(args)
    record = json.loads((tmp_path / "out" / "merge_config.json").read_text())
    described = record["inputs"]["models"][1]
    assert described["format"] == "peft_lora" and described["path"] == str(adapter.resolve())
    assert described["files"] == {name: (adapter / name).stat().st_size
                                  for name in ("adapter_config.json", "adapter_model.safetensors")}
    assert merge_checkpoints.main([*args, "--resume"])["already_complete"]
    make_adapter(_llama(), adapter, seed=4, target_modules=["q_proj", "v_proj"], r=2)  # another adapter, same folder
    with pytest.raises(FileExistsError, match=r"inputs"):
        merge_checkpoints.main([*args, "--resume"])


def test_lora_output_loads_in_peft_and_matches_the_full_merge_at_full_rank(family, tmp_path):
    from peft import PeftModel

    second = tmp_path / "second"
    make_adapter(_llama(), second, seed=5, target_modules=["q_proj", "k_proj", "down_proj"])
    inputs = (family["base"], [family["adapter"], str(second)])
    arguments = dict(merging_method_name="task_arithmetic", hyperparameters={"scaling_coefficient": 0.6},
                     progress=False)
    merge_api(*inputs, str(tmp_path / "full"), **arguments)
    rank = 32  # min(shape) of every 2-D weight of the tiny Llama: the SVD keeps everything
    merge_api(*inputs, str(tmp_path / "lora"), output_format="lora", lora_rank=rank, **arguments)
    record = json.loads((tmp_path / "lora" / "merge_config.json").read_text())
    assert record["output"] == {"format": "lora", "lora_rank": rank}
    changed = {name.removesuffix(".weight") for name in adapter_delta_state_dict(family["adapter"],
                                                                                  _weights(family["base"]))}
    changed |= {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                       "mlp.down_proj")}
    assert set(record["lora_retained_energy"]) == changed
    assert all(energy > 1 - 1e-6 for energy in record["lora_retained_energy"].values())
    loaded = PeftModel.from_pretrained(_llama(), tmp_path / "lora").merge_and_unload().state_dict()
    full = _merged(tmp_path / "full")
    for name, tensor in full.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=1e-6, msg=name)  # SVD rounding of ~0.1 deltas
    assert merge_api(*inputs, str(tmp_path / "lora"), output_format="lora", lora_rank=rank, resume=True,
                     **arguments)["already_complete"]


def test_lora_output_at_low_rank_records_the_lost_energy(family, tmp_path):
    merge_checkpoints.main(["--pretrained_model", family["base"], "--finetuned_models", family["adapter"],
                            "--merging_method_name", "task_arithmetic", "--output_format", "lora", "--lora_rank", "2",
                            "--output_dir", str(tmp_path / "lora"), "--quiet"])
    record = json.loads((tmp_path / "lora" / "merge_config.json").read_text())
    assert record["command"].endswith("--output_format lora --lora_rank 2")
    energy = record["lora_retained_energy"]
    deltas = adapter_delta_state_dict(family["adapter"], _weights(family["base"]))
    for name, delta in deltas.items():
        module = name.removesuffix(".weight")
        expected = torch.linalg.svdvals(delta.double()).square()
        assert energy[module] == pytest.approx((expected[:2].sum() / expected.sum()).item(), abs=1e-5), module
        assert energy[module] < 0.99, module  # the adapter's rank-4 ΔW loses energy at rank 2
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 2


def test_lora_output_refuses_a_changed_norm_before_publishing(family, tmp_path):
    with pytest.raises(ValueError, match=r"Linear and Embedding weights only, got a change of 'model\.[a-z0-9_.]*"
                                         r"norm\.weight' .*--exclude_param_names_regex"):
        merge_api(family["base"], [family["adapter"], family["full"]], str(tmp_path / "out"),
                  merging_method_name="task_arithmetic", output_format="lora", lora_rank=4, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"output_format": "lora"}, r"output_format='lora' needs lora_rank, a positive integer, got None"),
    ({"output_format": "lora", "lora_rank": 0}, r"needs lora_rank, a positive integer, got 0"),
    ({"lora_rank": 4}, r"lora_rank applies to output_format='lora' only"),
    ({"output_format": "lora", "lora_rank": 4, "dtype": "bfloat16"}, r"writes float32 factors, got dtype='bfloat16'"),
    ({"output_format": "gguf"}, r"output_format must be one of \('safetensors', 'lora'\), got 'gguf'"),
])
def test_output_format_options_are_validated(family, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        merge_api(family["base"], [family["adapter"]], str(tmp_path / "out"), merging_method_name="task_arithmetic",
                  progress=False, **arguments)
    assert not list(tmp_path.glob("*out*"))


def test_variant_merge_reads_adapters_as_one_merge_does(family, tmp_path):
    from merge_engine import merge_variants
    from model_merging_methods import Recipe

    recipes = [Recipe.from_mergelm("mask_merging", mask_apply_method="task_arithmetic", weight_mask_rate=0.5,
                                   use_weight_rescale=True, scaling_coefficient=scale, seed=SEED)
               for scale in (0.5, 1.0)]
    inputs = (family["base"], [family["adapter"], family["full"]])
    merge_variants(*inputs, [(str(tmp_path / f"variant{i}"), r) for i, r in enumerate(recipes)], progress=False,
                   chunk_numel=64)
    for i, recipe in enumerate(recipes):
        merge_api(*inputs, str(tmp_path / f"single{i}"), merging_method_name=recipe, progress=False)
        variant, single = _merged(tmp_path / f"variant{i}"), _merged(tmp_path / f"single{i}")
        assert all(torch.equal(variant[name], single[name]) for name in single)
        assert (json.loads((tmp_path / f"variant{i}" / "merge_config.json").read_text())["inputs"]
                == json.loads((tmp_path / f"single{i}" / "merge_config.json").read_text())["inputs"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adapter_merge_on_cuda_matches_cpu(family, tmp_path):
    hyperparameters = {"mask_apply_method": "task_arithmetic", "weight_mask_rate": 0.3, "use_weight_rescale": True,
                       "scaling_coefficient": 0.7, "seed": SEED}
    for device in ("cpu", "cuda"):
        merge_api(family["base"], [family["adapter"], family["full"]], str(tmp_path / device),
                  merging_method_name="mask_merging", hyperparameters=hyperparameters, device=device, progress=False)
    cpu, cuda = _merged(tmp_path / "cpu"), _merged(tmp_path / "cuda")
    assert all(torch.equal(cuda[name], tensor) for name, tensor in cpu.items())  # same masks, same float32 ops
