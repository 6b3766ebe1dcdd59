"""The list of output tensors and, for each, what to read from every model: checked before any weight is read.

Checks (all raise ``ValueError`` naming the model and tensor): same architecture in every ``config.json``,
every base tensor present in every model (a missing ``lm_head`` is read from the tied input embedding),
same shapes (rows of vocabulary tensors may differ under a ``vocab_policy``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_engine.shard_index import CheckpointIndex
from merge_engine.vocab import is_vocab_mismatch, output_rows, tied_source, vocab_error

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class TensorJob:
    """One output tensor.

    Attributes:
        name: output (= base) tensor name.
        sources: the tensor to read from each model, ``[base, *finetuned]`` (differs for tied heads).
        merge: False for tensors copied from the base (non-float buffers, excluded names).
        target_rows: rows every input is aligned to (``vocab_policy``), or None when shapes already agree.
        out_shape: shape written.
        out_dtype: dtype written.
    """

    name: str
    sources: tuple[str, ...]
    merge: bool
    target_rows: int | None
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """``None`` (keep each base tensor's dtype) or one of ``DTYPES``."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def check_architectures(configs: Sequence[dict], labels: Sequence[str]) -> None:
    """Every model with a ``config.json`` must share the base's ``model_type`` and ``architectures``."""
    def key(config: dict) -> tuple:
        return config.get("model_type"), tuple(config.get("architectures") or ())

    base_key = key(configs[0])
    for config, label in zip(configs[1:], labels[1:], strict=True):
        if config and configs[0] and key(config) != base_key:
            raise ValueError(f"all models must share the base's architecture {base_key}, got {key(config)} for "
                             f"{label}; merge models fine-tuned from the same base")


def _sources_for(name: str, indexes: Sequence[CheckpointIndex], labels: Sequence[str]) -> tuple[str, ...]:
    sources = []
    for index, label in zip(indexes, labels, strict=True):
        if name in index.tensors:
            sources.append(name)
            continue
        tied = tied_source(name, index.tensors)
        if tied is None:
            raise ValueError(f"every model must have the base's tensor {name!r}, got none in {label} "
                             f"({index.model_dir}); merge only models of the same architecture and size")
        logger.info("%s has no %s; using its tied input embedding %s", label, name, tied)
        sources.append(tied)
    return tuple(sources)


def _warn_extra(indexes: Sequence[CheckpointIndex], labels: Sequence[str]) -> None:
    base = indexes[0].tensors
    for index, label in zip(indexes[1:], labels[1:], strict=True):
        extra = [name for name in index.tensors if name not in base]
        if extra:
            logger.warning("%s has %d tensor(s) the base lacks, not merged (the output follows the base): %s",
                           label, len(extra), ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))


def build_tensor_jobs(
    indexes: Sequence[CheckpointIndex],
    labels: Sequence[str],
    *,
    merge_names: set[str],
    vocab_policy: str,
    dtype: torch.dtype | None,
) -> list[TensorJob]:
    """One ``TensorJob`` per base tensor, in the base's storage order.

    Args:
        indexes: ``[base, *finetuned]`` checkpoint indexes.
        labels: a printable name per model (for messages).
        merge_names: base names to merge (float tensors not excluded); others are copied from the base.
        vocab_policy: see ``merge_engine.vocab``.
        dtype: output dtype of merged tensors, None for the base's.
    """
    jobs, mismatches = [], {}
    for name, base_info in indexes[0].tensors.items():
        sources = _sources_for(name, indexes, labels)
        shapes = [index.tensors[src].shape for index, src in zip(indexes, sources, strict=True)]
        target_rows = None
        if any(shape != base_info.shape for shape in shapes):
            if not is_vocab_mismatch(shapes):
                bad = next(i for i, s in enumerate(shapes) if s != base_info.shape)
                raise ValueError(f"{labels[bad]}: tensor {name!r} must have the base's shape {base_info.shape}, "
                                 f"got {shapes[bad]}; the models are not fine-tunes of the same base")
            mismatches[name] = [shape[0] for shape in shapes]
            if vocab_policy != "error":
                target_rows = output_rows(vocab_policy, mismatches[name])
        out_shape = base_info.shape if target_rows is None else (target_rows, *base_info.shape[1:])
        merge = name in merge_names
        out_dtype = dtype if (dtype is not None and base_info.dtype.is_floating_point) else base_info.dtype
        jobs.append(TensorJob(name, sources, merge, target_rows, out_shape, out_dtype))
    if mismatches and vocab_policy == "error":
        raise vocab_error(mismatches, labels)
    _warn_extra(indexes, labels)
    return jobs
