"""WizardLM-7B-V1.0 weight-diff recovery (diff + LLaMA-7B), streamed tensor by tensor.

The published ``WizardLMTeam/WizardLM-7B-V1.0`` is a weight diff against ``llama-7b-hf``
(``llms.model_names.WEIGHT_DIFF_MODELS``); :func:`recover_wizardlm_7b` rebuilds the model as MergeLM's
``recover_from_pretrained_model`` did.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Rows added for a new pad token live in these tensors; all other shapes must match exactly.
_VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")


def _add_diff_to_base(name: str, diff: Any, base: Any, dtype: Any) -> Any:
    """``diff + base`` in float32; a base with fewer vocabulary rows gets mean rows appended first (Alpaca rule)."""
    import torch

    from merge_engine.vocab import pad_with_mean_rows

    diff32, base32 = diff.to(torch.float32), base.to(torch.float32)
    if diff32.shape != base32.shape:
        extra_rows = diff32.shape[0] - base32.shape[0]
        grows_vocab = name.endswith(_VOCAB_TENSOR_SUFFIXES) and diff32.shape[1:] == base32.shape[1:] and extra_rows > 0
        if not grows_vocab:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(diff.shape)} in the diff, base model has {tuple(base.shape)}; "
                "the diff does not belong to this base model"
            )
        # MergeLM / Alpaca's weight_diff: the base gets the [PAD] row(s) via smart_tokenizer_and_embedding_resize,
        # i.e. new rows = mean of the existing rows, before diff + base.
        base32 = pad_with_mean_rows(base32, diff32.shape[0])
    return (diff32 + base32).to(dtype)


def _grouped_by_file(files: Mapping[str, str]) -> Iterator[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name, file in files.items():
        groups.setdefault(file, []).append(name)
    yield from sorted(groups.items())


def recover_wizardlm_7b(
    diff_path: str | os.PathLike,
    base_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Recover WizardLM-7B-V1.0 from its published weight diff: every tensor = diff + LLaMA-7B.

    Mirrors MergeLM's ``recover_from_pretrained_model`` ("add" manner; specification 4.4): the base gets a
    ``[PAD]`` row first, so ``embed_tokens``/``lm_head`` rows the diff has beyond the base's vocabulary are
    recovered as ``diff_row + mean(base rows)`` (the Alpaca ``smart_tokenizer_and_embedding_resize`` rule; the
    WizardLM diff has 32001 rows against LLaMA's 32000). Any other shape mismatch is an error. Rotary
    ``inv_freq`` buffers (old ``.bin`` checkpoints) are dropped: transformers recomputes them.

    Streams one diff shard at a time through ``merge_engine``'s checkpoint index and tensor reader (safetensors
    or memory-mapped ``.bin``), sums in float32,
    writes one safetensors shard per diff shard plus an index, copies the diff's config and tokenizer files
    (they already hold ``[PAD]``), and moves the finished folder into place atomically.

    Args:
        diff_path: local folder of ``WizardLMTeam/WizardLM-7B-V1.0`` (the diff).
        base_path: local folder of ``huggyllama/llama-7b`` (``llama-7b-hf``).
        output_dir: folder to create (MergeLM: ``WizardLM-7B-V1.0-recovered``).
        dtype: dtype of the written tensors: ``float32`` (MergeLM saved fp32), ``float16`` or ``bfloat16``.
        overwrite: replace an existing non-empty ``output_dir``.
    Returns:
        ``output_dir`` as a Path.
    """
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True to replace it")
    from merge_engine.shard_index import index_checkpoint

    diff_index, base_index = index_checkpoint(Path(diff_path)), index_checkpoint(Path(base_path))
    _check_same_tensor_names(diff_index.tensors, base_index.tensors)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        weight_map = _write_recovered_shards(diff_index, base_index, tmp_dir, torch_dtype)
        _write_recovered_metadata(Path(diff_path), tmp_dir, weight_map, dtype)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp_dir, output_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote the recovered model to %s", output_dir)
    return output_dir


def _write_recovered_shards(diff_index: Any, base_index: Any, out_dir: Path, torch_dtype: Any) -> dict[str, str]:
    """One output safetensors shard per diff shard; only one shard's tensors are in memory at a time."""
    from safetensors.torch import save_file

    from merge_engine.tensor_reader import TensorReader

    diff_reader, base_reader = TensorReader(diff_index), TensorReader(base_index)
    files = {name: str(info.file) for name, info in diff_index.tensors.items() if not _is_rotary_buffer(name)}
    groups = list(_grouped_by_file(files))
    weight_map: dict[str, str] = {}
    try:
        for shard_index, (_, names) in enumerate(groups, start=1):
            shard_name = f"model-{shard_index:05d}-of-{len(groups):05d}.safetensors"
            shard = {
                name: _add_diff_to_base(name, diff_reader.read(name), base_reader.read(name), torch_dtype)
                for name in names
            }
            save_file(shard, str(out_dir / shard_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, shard_name))
            logger.info("recovered shard %d/%d (%d tensors)", shard_index, len(groups), len(names))
            del shard
    finally:
        diff_reader.close()
        base_reader.close()
    return weight_map


def _is_rotary_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def _check_same_tensor_names(diff_tensors: Mapping[str, Any], base_tensors: Mapping[str, Any]) -> None:
    diff_names = {n for n in diff_tensors if not _is_rotary_buffer(n)}
    base_names = {n for n in base_tensors if not _is_rotary_buffer(n)}
    if diff_names != base_names:
        only_diff, only_base = sorted(diff_names - base_names)[:5], sorted(base_names - diff_names)[:5]
        raise ValueError(
            f"diff and base must have the same tensor names, got only in diff: {only_diff}, only in base: "
            f"{only_base}; check that the diff belongs to this base model"
        )


def _write_recovered_metadata(diff_dir: Path, out_dir: Path, weight_map: Mapping[str, str], dtype: str) -> None:
    for item in diff_dir.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _INDEX_NAMES:
            shutil.copy2(item, out_dir / item.name)
    config_path = out_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # "torch_dtype" is read by every transformers version (and by vLLM); newer ones also write "dtype"
        config["torch_dtype"] = dtype
        if "dtype" in config:
            config["dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    index = {"metadata": {"recovered_from": str(diff_dir)}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
