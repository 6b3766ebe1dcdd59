"""Streaming merger (merge_engine): equality with the in-memory merge for every method, vocab, tied heads, I/O."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import make_family, tiny_llama_config
from safetensors.torch import load_file, save_file

from merge_engine import merge_checkpoints
from merge_engine.shard_index import index_checkpoint
from merge_engine.tensor_reader import TensorReader
from merge_engine.vocab import align_rows
from model_merging_methods import MERGING_METHOD_NAMES, merge_state_dicts

# Hyperparameters per registered method; a new method without an entry runs with its defaults.
METHOD_CASES: dict[str, dict] = {
    "average_merging": {},
    "task_arithmetic": {"scaling_coefficient": 0.7},
    "ties_merging": {"param_value_mask_rate": 0.6, "scaling_coefficient": 1.0, "ties_trim_scope": "global"},
    "fisher_merging": {"normalize_fisher_weight": True},
    "regmean_merging": {"reduce_non_diagonal_ratio": 0.5},
    "mask_merging": {"mask_apply_method": "task_arithmetic", "weight_mask_rate": 0.5, "use_weight_rescale": True,
                     "scaling_coefficient": 1.0, "seed": 3},
}
EXTRA_CASES = [
    ("ties_merging", {"param_value_mask_rate": 0.8, "ties_trim_scope": "per_tensor"}),
    ("mask_merging", {"mask_apply_method": "ties_merging", "weight_mask_rate": [0.3, 0.6], "ties_trim_scope": "global",
                      "use_weight_rescale": True}),
    ("mask_merging", {"mask_apply_method": "average_merging", "weight_mask_rate": 0.4, "mask_strategy": "magnitude",
                      "use_weight_rescale": False}),
    ("mask_merging", {"mask_apply_method": "average_merging", "weight_mask_rate": 0.2,
                      "weight_format": "finetuned_weight"}),
]


def save_sharded(state_dict: dict, folder: Path, shard_bytes: int = 20_000, config=None) -> Path:
    """Save as sharded safetensors + index (plus ``config.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for name, tensor in state_dict.items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous().clone()
        size += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        config.save_pretrained(folder)
    return folder


def save_bin(state_dict: dict, folder: Path, config=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in state_dict.items()}, folder / "pytorch_model.bin")
    if config is not None:
        config.save_pretrained(folder)
    return folder


def state_dicts_of(models) -> list[dict]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def read_back(folder: Path) -> dict:
    """A checkpoint's tensors in the engine's order (storage order of the base)."""
    reader = TensorReader(index_checkpoint(folder))
    try:
        return {name: reader.read(name) for name in reader.index.tensors}
    finally:
        reader.close()


@pytest.fixture
def llama_family(tmp_path):
    """Base + 2 fine-tunes of the tiny Llama, saved as sharded safetensors; returns (folders, config)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    base, finetuned = make_family(LlamaForCausalLM, config)
    folders = [save_sharded(sd, tmp_path / name, config=config)
               for sd, name in zip(state_dicts_of([base, *finetuned]), ["base", "ft1", "ft2"], strict=True)]
    return folders, config


def statistics_for(method: str, pretrained: dict, num_models: int, folder: Path):
    """Random Fisher diagonals / Gram matrices, saved one safetensors file per model."""
    if method not in ("fisher_merging", "regmean_merging"):
        return None, None
    generator = torch.Generator().manual_seed(7)
    stats = []
    for _ in range(num_models):
        if method == "fisher_merging":
            stats.append({n: torch.rand(t.shape, generator=generator) for n, t in pretrained.items()
                          if t.is_floating_point()})
        else:
            grams = {}
            for name, tensor in pretrained.items():
                if name.endswith("proj.weight") or name == "lm_head.weight":
                    x = torch.randn(3 * tensor.shape[1], tensor.shape[1], generator=generator)
                    grams[name[: -len(".weight")]] = x.T @ x / x.shape[0]
            stats.append(grams)
    files = []
    for i, stat in enumerate(stats):
        files.append(str(folder / f"stats{i}.safetensors"))
        save_file(stat, files[-1])
    return stats, files


def reference_merge(method: str, hp: dict, folders: list[Path], stats, exclude=(), vocab_policy=None) -> dict:
    state_dicts = [read_back(f) for f in folders]
    if vocab_policy is not None:
        state_dicts = align_state_dicts(state_dicts, vocab_policy)
    key = "fisher_weights" if method == "fisher_merging" else "gram_matrices"
    extra = {key: stats} if stats is not None else {}
    return merge_state_dicts(method, state_dicts[0], state_dicts[1:], exclude_param_names_regex=exclude, **hp,
                             **extra)


def align_state_dicts(state_dicts: list[dict], policy: str) -> list[dict]:
    out = [dict(sd) for sd in state_dicts]
    for name in state_dicts[0]:
        rows = [sd[name].shape[0] for sd in state_dicts]
        if len(set(rows)) > 1:
            target = max(rows) if policy == "mergelm" else rows[0]
            base = align_rows(state_dicts[0][name], target, policy)
            out[0][name] = base
            for sd in out[1:]:
                sd[name] = align_rows(sd[name], target, policy, base)
    return out


def assert_same_tensors(merged_dir: Path, expected: dict) -> None:
    got = load_merged(merged_dir)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), f"{name} differs"


def load_merged(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def cases():
    for name in MERGING_METHOD_NAMES:
        yield pytest.param(name, METHOD_CASES.get(name, {}), id=name)
    for i, (name, hp) in enumerate(EXTRA_CASES):
        yield pytest.param(name, hp, id=f"{name}-{i}")


@pytest.mark.parametrize("method, hp", list(cases()))
def test_streamed_equals_merge_state_dicts_bit_for_bit(method, hp, llama_family, tmp_path):
    folders, _ = llama_family
    stats, files = statistics_for(method, read_back(folders[0]), 2, tmp_path)
    exclude = [".*norm.*"]
    # tiny chunks force the row-chunk path on every tensor the plan allows it for
    summary = merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                                merging_method_name=method, hyperparameters=hp, exclude_param_names_regex=exclude,
                                statistics_files=files, max_shard_bytes=30_000, chunk_numel=600, num_threads=2,
                                progress=False)
    assert summary["tensors"] == len(read_back(folders[0]))
    assert_same_tensors(tmp_path / "out", reference_merge(method, hp, folders, stats, exclude))


def test_bin_checkpoints_equal_safetensors(llama_family, tmp_path):
    folders, config = llama_family
    bins = [save_bin(read_back(f), tmp_path / f"bin_{f.name}", config) for f in folders]
    hp = METHOD_CASES["mask_merging"]
    merge_checkpoints(str(bins[0]), [str(b) for b in bins[1:]], str(tmp_path / "out_bin"),
                      merging_method_name="mask_merging", hyperparameters=hp, progress=False)
    merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out_st"),
                      merging_method_name="mask_merging", hyperparameters=hp, progress=False)
    expected = load_merged(tmp_path / "out_st")
    assert_same_tensors(tmp_path / "out_bin", expected)


def test_output_folder_loads_with_transformers(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    folders, _ = llama_family
    (folders[1] / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    out = tmp_path / "merged"
    merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(out), merging_method_name="task_arithmetic",
                      hyperparameters={"scaling_coefficient": 0.5}, copy_config_from=1, max_shard_bytes=30_000,
                      progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "merge_config.json", "README.md", "model.safetensors.index.json",
            "tokenizer_config.json"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir()), "files must be readable by others"
    assert not (tmp_path / ".merged.incomplete").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    merged = load_merged(out)
    for name, param in model.state_dict().items():
        assert torch.equal(param, merged[name]), name
    record = json.loads((out / "merge_config.json").read_text())
    assert record["merging_method_name"] == "task_arithmetic" and record["seed"] is None  # no DARE, no mask seed
    assert record["hyperparameters"] == {"scaling_coefficient": 0.5}
    assert record["command"] is None  # a Python API call; merge_checkpoints.py records its command line
    assert "Merged through the Python API" in (out / "README.md").read_text()


def test_output_dtype_flag(llama_family, tmp_path):
    folders, _ = llama_family
    merge_checkpoints(str(folders[0]), [str(folders[1])], str(tmp_path / "bf16"),
                      merging_method_name="average_merging", dtype="bfloat16", progress=False)
    expected = reference_merge("average_merging", {}, folders[:2], None)
    got = load_merged(tmp_path / "bf16")
    for name, tensor in expected.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], tensor.to(torch.bfloat16))
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"


def test_single_model_dare_is_base_plus_dropped_delta(llama_family, tmp_path):
    folders, _ = llama_family
    hp = {"mask_apply_method": "average_merging", "weight_mask_rate": 0.9, "use_weight_rescale": True, "seed": 1}
    merge_checkpoints(str(folders[0]), [str(folders[1])], str(tmp_path / "dare"), merging_method_name="mask_merging",
                      hyperparameters=hp, progress=False)
    assert_same_tensors(tmp_path / "dare", reference_merge("mask_merging", hp, folders[:2], None))


def _vocab_family(tmp_path, extra_rows: int = 1):
    """A base with 64 rows and fine-tunes with 64 + extra_rows rows in embed_tokens and lm_head."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    base, finetuned = make_family(LlamaForCausalLM, config)
    sds = state_dicts_of([base, *finetuned])
    generator = torch.Generator().manual_seed(5)
    for sd in sds[1:]:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[name] = torch.cat([sd[name], torch.randn(extra_rows, sd[name].shape[1], generator=generator)])
    big = tiny_llama_config(vocab_size=64 + extra_rows)
    return [save_sharded(sd, tmp_path / n, config=c)
            for sd, n, c in zip(sds, ["base", "ft1", "ft2"], [config, big, big], strict=True)]


def test_vocab_mismatch_error_names_tensors_and_sizes(tmp_path):
    folders = _vocab_family(tmp_path)
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight: .*base 64, .*ft1 65.*vocab_policy mergelm"):
        merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                          merging_method_name="average_merging", progress=False)


@pytest.mark.parametrize("policy", ["mergelm", "base"])
def test_vocab_policies_match_in_memory_alignment(policy, tmp_path):
    folders = _vocab_family(tmp_path)
    hp = METHOD_CASES["mask_merging"]
    merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                      merging_method_name="mask_merging", hyperparameters=hp, vocab_policy=policy,
                      copy_config_from=1, progress=False)
    expected = reference_merge("mask_merging", hp, folders, None, vocab_policy=policy)
    assert_same_tensors(tmp_path / "out", expected)
    rows = 65 if policy == "mergelm" else 64
    assert expected["lm_head.weight"].shape[0] == rows
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == rows


def test_mergelm_policy_pads_with_mean_row():
    base = torch.arange(6, dtype=torch.float32).view(3, 2)
    padded = align_rows(base, 4, "mergelm")
    # mean of rows [0,1], [2,3], [4,5] = [2, 3]
    assert torch.equal(padded[3], torch.tensor([2.0, 3.0]))


def test_missing_lm_head_uses_tied_embedding(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    base, finetuned = make_family(LlamaForCausalLM, config)
    sds = state_dicts_of([base, *finetuned])
    del sds[2]["lm_head.weight"]  # ft2 ties its head to its input embedding
    sds[2]["model.embed_tokens.weight"] = sds[2]["model.embed_tokens.weight"].clone()
    folders = [save_sharded(sd, tmp_path / n, config=config) for sd, n in zip(sds, ["b", "f1", "f2"], strict=True)]
    merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                      merging_method_name="task_arithmetic", progress=False)
    tied = dict(sds[2], **{"lm_head.weight": sds[2]["model.embed_tokens.weight"]})
    expected = merge_state_dicts("task_arithmetic", read_back(folders[0]), [read_back(folders[1]), tied])
    assert_same_tensors(tmp_path / "out", expected)


def test_tied_base_without_lm_head_writes_no_lm_head(tmp_path, caplog):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(tie_word_embeddings=True)
    base, finetuned = make_family(LlamaForCausalLM, config)
    sds = state_dicts_of([base, *finetuned])
    for sd in sds[:2]:
        sd.pop("lm_head.weight", None)
    sds[2]["lm_head.weight"] = sds[2]["model.embed_tokens.weight"].clone()  # an untied fine-tune
    folders = [save_sharded(sd, tmp_path / n, config=config) for sd, n in zip(sds, ["b", "f1", "f2"], strict=True)]
    with caplog.at_level(logging.WARNING):
        merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                          merging_method_name="average_merging", progress=False)
    assert "lm_head.weight" not in load_merged(tmp_path / "out")
    assert "tensor(s) the base lacks" in caplog.text


@pytest.mark.parametrize("hp", [METHOD_CASES["mask_merging"],
                                {"mask_apply_method": "average_merging", "weight_mask_rate": 0.9}])
def test_bf16_output_of_larger_tensors_equals_cast_merge_state_dicts(hp, tmp_path):
    """Tensors above a DARE cache slice (2**16 elements), written as bf16: the cast in-memory result."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(vocab_size=2100, hidden_size=64, intermediate_size=96)  # embeddings: 134,400
    base, finetuned = make_family(LlamaForCausalLM, config)
    folders = [save_sharded(sd, tmp_path / name, shard_bytes=2_000_000, config=config)
               for sd, name in zip(state_dicts_of([base, *finetuned]), ["base", "ft1", "ft2"], strict=True)]
    merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                      merging_method_name="mask_merging", hyperparameters=hp, dtype="bfloat16", progress=False)
    expected = reference_merge("mask_merging", hp, folders, None)
    assert_same_tensors(tmp_path / "out", {k: v.to(torch.bfloat16) for k, v in expected.items()})


# A toy method, written as its own module would be: a pure per-parameter function, a whole-model state and
# its argument builder. Registering it is the one line ``MERGE_METHODS[TOY.name] = TOY`` (done by monkeypatch).
class _LargestDelta:
    """The largest |delta| over every merged tensor and model (one pass over the deltas)."""

    num_passes = 1
    uses_model_tensors = True

    def __init__(self) -> None:
        self.value = 0.0

    def update(self, pass_index: int, stacked_deltas: torch.Tensor) -> None:
        if stacked_deltas.numel():
            self.value = max(self.value, float(stacked_deltas.abs().max()))

    def finish_pass(self, pass_index: int) -> None:
        pass


def normalised_sum(base, deltas, *, scaling_coefficient=1.0, largest_delta=1.0):
    """``base + scaling_coefficient * sum_i delta_i / largest_delta``."""
    return base + scaling_coefficient * torch.stack(list(deltas)).sum(dim=0) / largest_delta


def _toy_method():
    from model_merging_methods import Hyperparameter
    from model_merging_methods.registry import MergeMethod, always

    return MergeMethod(
        "normalised_sum", normalised_sum, (Hyperparameter("scaling_coefficient", "number", 1.0, help="lambda"),),
        merge_arguments=lambda hp, *, global_state, **_: {**hp, "largest_delta": global_state.value},
        global_state=lambda hp, num_models, total_numel: _LargestDelta(), chunkable=always,
    )


@pytest.mark.parametrize("hp", [{"scaling_coefficient": 0.5}, {"weight_mask_rate": 0.5, "seed": 1}],
                         ids=["plain", "dare"])
def test_registered_toy_method_runs_in_memory_and_streamed(hp, llama_family, tmp_path, monkeypatch):
    from model_merging_methods.registry import MERGE_METHODS

    toy = _toy_method()
    monkeypatch.setitem(MERGE_METHODS, toy.name, toy)  # the registry line
    method, hp = ("mask_merging", {"mask_apply_method": toy.name, **hp}) if "seed" in hp else (toy.name, hp)
    folders, _ = llama_family
    expected = reference_merge(method, hp, folders, None)
    state_dicts = [read_back(f) for f in folders]
    largest = max(float((sd[n].float() - state_dicts[0][n].float()).abs().max())
                  for sd in state_dicts[1:] for n in sd if sd[n].is_floating_point())
    if method == toy.name:  # the formula itself, on one tensor
        name = "model.layers.0.mlp.up_proj.weight"
        base = state_dicts[0][name].float()
        formula = base + 0.5 * sum(sd[name].float() - base for sd in state_dicts[1:]) / largest
        torch.testing.assert_close(expected[name].float(), formula.to(expected[name].dtype).float())
    merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                      merging_method_name=method, hyperparameters=hp, chunk_numel=600, num_threads=2, progress=False)
    assert_same_tensors(tmp_path / "out", expected)


class _GramTotal:
    """A whole-model state over Gram statistics: the sum of every Gram entry it is fed (Linear weights only)."""

    num_passes, uses_model_tensors = 1, False

    def __init__(self):
        self.value = 0.0

    def update(self, pass_index, statistics):
        self.value += float(sum(s.double().sum() for s in statistics))

    def finish_pass(self, pass_index):
        pass


def gram_scaled_sum(base, deltas, *, total=1.0):
    """``base + sum_i delta_i / total``: depends on the whole-model Gram total of the pass before merging."""
    return base + torch.stack(list(deltas)).sum(dim=0) / total


def test_the_in_memory_and_streamed_statistics_passes_feed_the_same_parameters(llama_family, tmp_path, monkeypatch):
    """A state over Gram statistics sees only Linear weights (other parameters have no Gram), on both paths."""
    from model_merging_methods.registry import MERGE_METHODS, MergeMethod

    method = MergeMethod("gram_scaled_sum", gram_scaled_sum, statistics="gram",
                         merge_arguments=lambda hp, *, global_state, **_: {"total": global_state.value},
                         global_state=lambda hp, num_models, total_numel: _GramTotal())
    monkeypatch.setitem(MERGE_METHODS, method.name, method)
    folders, _ = llama_family
    stats, files = statistics_for("regmean_merging", read_back(folders[0]), 2, tmp_path)
    merge_checkpoints(str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "out"),
                      merging_method_name=method.name, statistics_files=files, num_threads=2, progress=False)
    expected = merge_state_dicts(method.name, read_back(folders[0]), [read_back(f) for f in folders[1:]],
                                 gram_matrices=stats)
    assert_same_tensors(tmp_path / "out", expected)
