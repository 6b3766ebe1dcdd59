"""Vocabulary differences between the models, and tied / missing ``lm_head`` tensors.

The paper's fine-tunes add a pad token, so their embedding and ``lm_head`` matrices have 32001 rows while
the base has 32000. Three explicit policies (``vocab_policy``):

* ``error`` (default): refuse, naming every tensor and its row counts;
* ``mergelm``: MergeLM's ``smart_tokenizer_and_embedding_resize``: every model is padded to the largest row
  count and each new row is the mean of that model's existing rows (computed in float32);
* ``base``: keep the base's rows: fine-tuned rows beyond them are dropped, and rows a fine-tuned model lacks
  are taken from the base (a zero delta).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

VOCAB_POLICIES = ("error", "mergelm", "base")

# Output-embedding names and the input-embedding names they are tied to, per architecture family.
TIED_HEAD_SOURCES: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                       "embed_tokens.weight", "transformer.word_embeddings.weight", "model.embed_in.weight"),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
}


def tied_source(name: str, available: Mapping[str, object]) -> str | None:
    """The input-embedding tensor that stands for a missing output embedding ``name`` (tied weights), if any."""
    for candidate in TIED_HEAD_SOURCES.get(name, ()):
        if candidate in available:
            return candidate
    return None


def is_vocab_mismatch(shapes: Sequence[tuple[int, ...]]) -> bool:
    """True when the shapes differ only in their first dimension (rows = tokens)."""
    first = shapes[0]
    return bool(first) and all(len(s) == len(first) and s[1:] == first[1:] for s in shapes) and len(
        {s[0] for s in shapes}) > 1


def output_rows(policy: str, rows: Sequence[int]) -> int:
    """Row count of the merged tensor under ``policy``; ``rows[0]`` is the base's."""
    if policy == "mergelm":
        return max(rows)
    if policy == "base":
        return rows[0]
    raise ValueError(f"vocab_policy must be one of {VOCAB_POLICIES} to merge tensors with different row counts, "
                     f"got {policy!r}")


def vocab_error(mismatches: Mapping[str, Sequence[int]], model_names: Sequence[str]) -> ValueError:
    """The ``vocab_policy='error'`` message: each tensor with every model's row count and the ways out."""
    lines = []
    for name, rows in mismatches.items():
        sizes = ", ".join(f"{model} {r}" for model, r in zip(model_names, rows, strict=True))
        lines.append(f"{name}: {sizes} rows")
    largest = max(max(rows) for rows in mismatches.values())
    return ValueError(
        "vocabulary sizes must agree across models, got " + "; ".join(lines)
        + f"; pass --vocab_policy mergelm (pad every model to {largest} rows, new rows = mean of the others, as "
        "MergeLM) or --vocab_policy base (keep the base model's rows)"
    )


def pad_with_mean_rows(tensor: torch.Tensor, target_rows: int) -> torch.Tensor:
    """``tensor`` (float32) with rows appended up to ``target_rows``, each the mean of its existing rows.

    MergeLM's (and Alpaca's) ``smart_tokenizer_and_embedding_resize`` rule for new vocabulary rows.
    """
    values = tensor.float()
    mean = values.mean(dim=0, keepdim=True)
    return torch.cat([values, mean.expand(target_rows - values.shape[0], *values.shape[1:])], dim=0)


def align_rows(tensor: torch.Tensor, target_rows: int, policy: str, base: torch.Tensor | None = None) -> torch.Tensor:
    """Bring one model's vocabulary tensor to ``target_rows`` rows under ``policy``.

    Args:
        tensor: the model's tensor (rows = tokens).
        target_rows: from ``output_rows``.
        policy: ``mergelm`` or ``base``.
        base: the base model's tensor, already aligned (``base`` policy: supplies rows the model lacks).
    Returns:
        ``tensor`` itself when it already has ``target_rows`` rows; otherwise a new tensor (float32 when rows
        are added under ``mergelm``, since the mean rows are float32 values).
    """
    rows = tensor.shape[0]
    if rows == target_rows:
        return tensor
    if rows > target_rows:
        return tensor[:target_rows]
    if policy == "mergelm":
        return pad_with_mean_rows(tensor, target_rows)
    if base is None:
        raise RuntimeError("align_rows with policy 'base' needs the base tensor")
    return torch.cat([tensor.to(base.dtype), base[rows:target_rows]], dim=0)
