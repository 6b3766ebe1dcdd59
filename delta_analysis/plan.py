"""Which tensors to compare, under which names and shapes: decided from names and shapes only, before any read.

* Names: a fine-tuned model may carry a prefix the base lacks (``bert.encoder...`` against ``encoder...``) or the
  other way round; per model, the mapping (identity, strip a first component, or add the base's first
  component) that matches the most base tensors is used and reported.
* Tensors: floating-point tensors present in the base and in every fine-tuned model; the rest are reported as
  unmatched (e.g. a classifier head) or skipped (integer buffers).
* Shapes: equal, or, for embedding / output-head tensors only, differing in rows (vocabulary 32001 vs 32000),
  analysed over the common rows with a note; any other difference is an error.
* Groups: ``layer.<i>`` from ``layers.<i>.`` / ``layer.<i>.`` / ``h.<i>.`` / ``blocks.<i>.``, else
  ``head``, ``embeddings`` or ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

Catalog = Mapping[str, tuple[tuple[int, ...], torch.dtype]]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|classifier|pooler|score|cls|output_layer)(?:\.|$)")
_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe)\.")
ROW_TOLERANT_GROUPS = ("embeddings", "head")
DEFAULT_CHUNK_NUMEL = 1 << 22


def layer_group(name: str) -> str:
    """``layer.12`` for ``model.layers.12.mlp...``; else ``head``, ``embeddings`` or ``other``."""
    match = _LAYER.search(name)
    if match:
        return f"layer.{int(match.group(1))}"
    if _HEAD.search(name):
        return "head"
    return "embeddings" if _EMBEDDING.search(name) else "other"


def group_order(group: str) -> tuple[int, int]:
    """Sort key: embeddings, layer.0, layer.1, ..., head, other."""
    if group.startswith("layer."):
        return 1, int(group.split(".", 1)[1])
    return {"embeddings": (0, 0), "head": (2, 0)}.get(group, (3, 0))


@dataclass(frozen=True)
class TensorEntry:
    """One analysed tensor: its base name, the name in each model ``[base, *finetuned]``, rows analysed."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    rows: int | None
    group: str


@dataclass(frozen=True)
class AnalysisPlan:
    labels: tuple[str, ...]
    entries: tuple[TensorEntry, ...]
    unmatched: tuple[dict, ...]  # per fine-tuned model: only_in_base, only_in_finetuned, name_mapping
    skipped_non_float: tuple[str, ...]
    notes: tuple[str, ...]


def _candidate_mappings(base: set[str], finetuned: Sequence[str]) -> list[tuple[str | None, dict[str, str]]]:
    """(description, {base name: fine-tuned name}) for identity, stripped and added first components."""
    out: list[tuple[str | None, dict[str, str]]] = [(None, {n: n for n in finetuned if n in base})]
    for prefix in sorted({n.split(".", 1)[0] for n in finetuned if "." in n}):
        mapping = {n[len(prefix) + 1:]: n for n in finetuned if n.startswith(prefix + ".")}
        out.append((f"stripped '{prefix}.' from the fine-tuned names", {k: v for k, v in mapping.items()
                                                                          if k in base}))
    for prefix in sorted({n.split(".", 1)[0] for n in base if "." in n}):
        mapping = {f"{prefix}.{n}": n for n in finetuned}
        out.append((f"added '{prefix}.' to the fine-tuned names", {k: v for k, v in mapping.items() if k in base}))
    return out


def align_names(base: Sequence[str], finetuned: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """The name mapping ``{base name: fine-tuned name}`` matching the most base names, and its description."""
    candidates = _candidate_mappings(set(base), finetuned)
    return max(candidates, key=lambda c: len(c[1]))[::-1]


def _float_names(catalog: Catalog) -> list[str]:
    return [n for n, (_, dtype) in catalog.items() if dtype.is_floating_point]


def _common_rows(name: str, shapes: Sequence[tuple[int, ...]], labels: Sequence[str], group: str) -> int | None:
    """None when every shape equals the base's; common rows for row-only differences of vocabulary tensors."""
    base = shapes[0]
    if all(s == base for s in shapes):
        return None
    rows_only = all(len(s) == len(base) and s[1:] == base[1:] for s in shapes) and len(base) >= 1
    if rows_only and group in ROW_TOLERANT_GROUPS:
        return min(s[0] for s in shapes)
    bad = next(i for i, s in enumerate(shapes) if s != base)
    raise ValueError(f"{labels[bad]}: tensor {name!r} must have the base's shape {tuple(base)}, got "
                     f"{tuple(shapes[bad])}; only embedding / output-head rows may differ (vocabulary size). "
                     "Is it a fine-tune of this base?")


def build_plan(catalogs: Sequence[Catalog], labels: Sequence[str]) -> AnalysisPlan:
    """Match every fine-tuned model's tensors to the base's (``catalogs[0]``) and check shapes; no data read.

    Raises:
        ValueError: fewer than two models, no tensor in common, or a shape mismatch other than vocabulary rows.
    """
    if len(catalogs) < 2:
        raise ValueError(f"delta analysis needs a base and at least one fine-tuned model, got {len(catalogs)} "
                         "model(s); pass --finetuned_models")
    base_names = _float_names(catalogs[0])
    mappings, unmatched = [], []
    for catalog, label in zip(catalogs[1:], labels[1:], strict=True):
        mapping, description = align_names(base_names, _float_names(catalog))
        if not mapping:
            raise ValueError(f"{label} must share tensor names with the base {labels[0]}, got none in common "
                             f"(base e.g. {base_names[:3]}, fine-tuned e.g. {_float_names(catalog)[:3]}); "
                             "pass the base this model was fine-tuned from")
        mappings.append(mapping)
        unmatched.append({"name_mapping": description,
                          "only_in_finetuned": sorted(set(_float_names(catalog)) - set(mapping.values()))})
    common = [n for n in base_names if all(n in m for m in mappings)]
    entries, notes = [], []
    for name in common:
        sources = (name, *(m[name] for m in mappings))
        shapes = [tuple(c[s][0]) for c, s in zip(catalogs, sources, strict=True)]
        group = layer_group(name)
        rows = _common_rows(name, shapes, labels, group)
        if rows is not None:
            counts = ", ".join(f"{lab} {s[0]}" for lab, s in zip(labels, shapes, strict=True))
            notes.append(f"{name}: row counts {counts}; analysed over the {rows} common rows")
        shape = shapes[0] if rows is None else (rows, *shapes[0][1:])
        entries.append(TensorEntry(name, sources, shape, rows, group))
    for record in unmatched:
        record["only_in_base"] = sorted(set(base_names) - set(common))
    skipped = tuple(sorted({n for c in catalogs for n, (_, d) in c.items() if not d.is_floating_point}))
    return AnalysisPlan(tuple(labels), tuple(entries), tuple(unmatched), skipped, tuple(notes))


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, stop)`` of entry ``entry`` (None: the whole tensor); ``last`` closes the tensor."""

    entry: int
    rows: tuple[int, int] | None
    last: bool


def plan_analysis_units(entries: Sequence[TensorEntry], chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> list[Unit]:
    """Row blocks of at most ``chunk_numel`` elements (one row at least); vectors and scalars stay whole."""
    units = []
    for i, entry in enumerate(entries):
        if len(entry.shape) < 2:
            units.append(Unit(i, None, True))
            continue
        rows = entry.shape[0]
        per_row = max(1, torch.Size(entry.shape[1:]).numel())
        step = max(1, chunk_numel // per_row)
        starts = list(range(0, rows, step)) or [0]
        for start in starts:
            units.append(Unit(i, (start, min(rows, start + step)), start == starts[-1]))
    return units
