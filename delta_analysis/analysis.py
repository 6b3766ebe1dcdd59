"""The analysis driver: plan (names, shapes) -> one pass over row blocks -> per tensor / layer / model summaries.

Works on checkpoint folders or hub ids (``analyze_deltas``: read through the merger's readers, one row block of
at most ``chunk_numel`` elements per model at a time, so memory stays near ``num_threads x (models + 2) x 16 MB``
whatever the model size) and on in-memory state dicts (``analyze_state_dicts``); both run the same units through
the same kernel and add the results in the same order, so they agree bit for bit.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from delta_analysis.histogram import QUANTILE_RELATIVE_ERROR, nonzero_bins
from delta_analysis.plan import DEFAULT_CHUNK_NUMEL, AnalysisPlan, Unit, build_plan, group_order, plan_analysis_units
from delta_analysis.statistics import THRESHOLDS, Sums, model_summary, pair_summary
from delta_analysis.unit_statistics import delta_statistics_torch
from delta_analysis.verdict import Verdict, judge
from merge_engine.model_source import resolve_model_dir
from merge_engine.pipeline import ordered_map
from merge_engine.shard_index import index_checkpoint
from merge_engine.tensor_reader import TensorReader

DEFAULT_MAX_WORKERS = 4
READAHEAD_UNITS = 16
_THRESHOLDS = np.asarray(THRESHOLDS, dtype=np.float32)


class Reader(Protocol):
    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor: ...


class StateDictReader:
    """``TensorReader``'s ``read`` over an in-memory state dict."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = self.state_dict[name].detach()
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        return None


@dataclass(frozen=True)
class ModelDeltas:
    """One fine-tuned model against the base."""

    name: str
    verdict: Verdict
    overall: dict
    matrices: dict
    layers: dict[str, dict]
    tensors: dict[str, dict]
    unmatched: dict
    histogram: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class DeltaAnalysis:
    """Result of ``analyze_deltas`` / ``analyze_state_dicts``; ``to_dict()`` is what ``analysis.json`` holds."""

    pretrained: str
    models: tuple[ModelDeltas, ...]
    pairs: tuple[dict, ...]
    notes: tuple[str, ...]
    skipped_non_float: tuple[str, ...]

    def verdicts(self) -> dict[str, Verdict]:
        return {m.name: m.verdict for m in self.models}

    def to_dict(self) -> dict[str, Any]:
        return {
            "pretrained_model": self.pretrained,
            "finetuned_models": [m.name for m in self.models],
            "definitions": _DEFINITIONS,
            "models": [{"name": m.name, "verdict": m.verdict.to_dict(), "overall": m.overall,
                        "matrices": m.matrices, "layers": m.layers, "tensors": m.tensors, "unmatched": m.unmatched,
                        "histogram_abs_delta": nonzero_bins(m.histogram)} for m in self.models],
            "pairs": list(self.pairs),
            "notes": list(self.notes),
            "skipped_non_float": list(self.skipped_non_float),
        }


_DEFINITIONS = {
    "delta": "float32(finetuned) - float32(base), element-wise, over the tensors common to all models",
    "quantiles_abs": ("order statistic of rank floor(q (n - 1)) of the finite |delta| (torch.quantile "
                      "interpolation='lower'), estimated from an exact histogram with one bin per bfloat16 value; "
                      f"|error| <= half a bin <= {QUANTILE_RELATIVE_ERROR} x the value (exact 0 for zeros)"),
    "count_above": "exact number of |delta| strictly above each threshold",
    "max_abs": "exact largest finite |delta|",
    "relative_change": "||delta|| / ||base|| (L2 over the scope)",
    "weight_cosine": "<finetuned, base> / (||finetuned|| ||base||)",
    "matrices": "the same statistics over tensors of 2 or more dimensions",
    "cosine": "task-vector cosine <delta_i, delta_j> / (||delta_i|| ||delta_j||)",
    "sign_conflict": "coordinate where both deltas are nonzero and of opposite signs; fraction over all "
                     "coordinates and over coordinates where both are nonzero",
    "layers": "layer.<i> = decoder/encoder block i (from names like model.layers.<i>. or encoder.layer.<i>.); "
              "embeddings, head (lm_head, classifier, pooler) and other (e.g. the final norm)",
}


_STACK = threading.local()


def _stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``np.stack(arrays)`` into this thread's reused buffer (no fresh pages per row block)."""
    shape, dtype = (len(arrays), arrays[0].size), arrays[0].dtype
    buffer = getattr(_STACK, "buffer", None)
    if buffer is None or buffer.dtype != dtype or buffer.size < shape[0] * shape[1]:
        buffer = _STACK.buffer = np.empty(shape[0] * shape[1], dtype=dtype)
    out = buffer[:shape[0] * shape[1]].reshape(shape)
    for row, array in zip(out, arrays, strict=True):
        row[:] = array
    return out


def _kernel_inputs(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(base, stacked fine-tuned) as uint16 bfloat16 bits when all are bfloat16, else as float32."""
    flat = [t.reshape(-1) for t in tensors]
    if all(t.dtype == torch.bfloat16 for t in flat):
        arrays = [t.contiguous().view(torch.int16).numpy().view(np.uint16) for t in flat]
    else:
        arrays = [t.to(device="cpu", dtype=torch.float32).contiguous().numpy() for t in flat]
    return arrays[0], _stack(arrays[1:])


def unit_sums(plan: AnalysisPlan, readers: Sequence[Reader], unit: Unit, *, compiled: bool = True) -> Sums:
    """Read one row block from every model and run the kernel (or, not ``compiled``, its torch twin) over it."""
    entry = plan.entries[unit.entry]
    rows = unit.rows if unit.rows is not None else (None if entry.rows is None else (0, entry.rows))
    base, finetuned = _kernel_inputs([r.read(s, rows) for r, s in zip(readers, entry.sources, strict=True)])
    sums = Sums(len(readers) - 1, numel=base.size)
    # the compiled kernel is imported on first use (it loads Numba, 0.5-1 s the preflight must not pay)
    statistics = importlib.import_module("delta_analysis.kernel").delta_statistics if compiled else (
        delta_statistics_torch)
    statistics(base, finetuned, _THRESHOLDS, sums.histogram, sums.counts, sums.sums, sums.pairs)
    return sums


def _with_readahead(readers: Sequence[Reader], plan: AnalysisPlan, units: Sequence[Unit]) -> Iterator[Unit]:
    def prefetch(unit: Unit) -> None:
        entry = plan.entries[unit.entry]
        for reader, source in zip(readers, entry.sources, strict=True):
            reader.prefetch(source, unit.rows)

    for unit in units[:READAHEAD_UNITS]:
        prefetch(unit)
    for i, unit in enumerate(units):
        if i + READAHEAD_UNITS < len(units):
            prefetch(units[i + READAHEAD_UNITS])
        yield unit


@dataclass
class _Totals:
    num_models: int
    overall: Sums = field(init=False)
    matrices: Sums = field(init=False)
    groups: dict[str, Sums] = field(default_factory=dict)
    tensors: list[dict] = field(default_factory=list)  # per model: {tensor name: summary}

    def __post_init__(self) -> None:
        self.overall, self.matrices = Sums(self.num_models), Sums(self.num_models)
        self.tensors = [{} for _ in range(self.num_models)]

    def close_tensor(self, name: str, shape: tuple[int, ...], group: str, sums: Sums) -> None:
        for j in range(self.num_models):
            self.tensors[j][name] = {"group": group, "shape": list(shape), **model_summary(sums, j)}
        self.overall.add(sums)
        if len(shape) >= 2:
            self.matrices.add(sums)
        self.groups.setdefault(group, Sums(self.num_models)).add(sums)


def _stream(plan: AnalysisPlan, readers: Sequence[Reader], *, num_threads: int, progress: bool,
            chunk_numel: int) -> _Totals:
    totals, current = _Totals(len(readers) - 1), None
    units = plan_analysis_units(plan.entries, chunk_numel)
    bar = tqdm(total=len(plan.entries), desc="analysing deltas", unit="tensor", disable=not progress)
    with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="deltas") as pool:
        work = ordered_map(lambda u: unit_sums(plan, readers, u), _with_readahead(readers, plan, units), pool,
                           depth=2 * num_threads + 2)
        for unit, sums in work:
            if current is None:
                current = sums
            else:
                current.add(sums)
            if unit.last:
                entry = plan.entries[unit.entry]
                totals.close_tensor(entry.name, entry.shape, entry.group, current)
                current = None
                bar.update(1)
    bar.close()
    return totals


def _result(plan: AnalysisPlan, totals: _Totals) -> DeltaAnalysis:
    groups = sorted(totals.groups, key=group_order)
    models = []
    for j, label in enumerate(plan.labels[1:]):
        overall, matrices = model_summary(totals.overall, j), model_summary(totals.matrices, j)
        layers = {g: model_summary(totals.groups[g], j) for g in groups}
        tensors = dict(sorted(totals.tensors[j].items(), key=lambda item: (group_order(item[1]["group"]), item[0])))
        models.append(ModelDeltas(label, judge(overall, matrices), overall, matrices, layers, tensors,
                                  plan.unmatched[j], totals.overall.histogram[j].copy()))
    pairs = []
    for i in range(totals.num_models):
        for j in range(i + 1, totals.num_models):
            pairs.append({"models": [plan.labels[1 + i], plan.labels[1 + j]],
                          "overall": pair_summary(totals.overall, i, j),
                          "layers": {g: pair_summary(totals.groups[g], i, j) for g in groups}})
    return DeltaAnalysis(plan.labels[0], tuple(models), tuple(pairs), plan.notes, plan.skipped_non_float)


def _run(plan: AnalysisPlan, readers: Sequence[Reader], num_threads: int | None, progress: bool,
         chunk_numel: int) -> DeltaAnalysis:
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    workers = num_threads or min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallelism comes from the workers (the kernel runs without the GIL)
    try:
        totals = _stream(plan, readers, num_threads=workers, progress=progress, chunk_numel=chunk_numel)
    finally:
        torch.set_num_threads(torch_threads)
    return _result(plan, totals)


def index_models(models: Sequence[str]) -> tuple[list[Path], list]:
    """Resolve (local folder or hub id) and index every model; raises before any weight is read."""
    dirs = [resolve_model_dir(m) for m in models]
    return dirs, [index_checkpoint(d) for d in dirs]


def analyze_deltas(
    pretrained_model: str,
    finetuned_models: Sequence[str],
    *,
    num_threads: int | None = None,
    progress: bool = True,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    labels: Sequence[str] | None = None,
) -> DeltaAnalysis:
    """Delta statistics of each fine-tuned checkpoint against the base, streamed one row block at a time.

    Args:
        pretrained_model: base folder or hub id.
        finetuned_models: fine-tuned folders or hub ids.
        num_threads: worker threads (default: CPU count, at most 4).
        progress: show a tqdm bar over tensors.
        chunk_numel: elements per row block and model.
        labels: the names reported for the base and each fine-tuned model (default: the paths or ids given), e.g.
            the alias a user typed rather than the folder it resolved to.
    Returns:
        A ``DeltaAnalysis`` (per-model statistics and verdicts, pairwise cosine / sign conflicts).
    Raises:
        FileNotFoundError: a model cannot be found (before anything is read).
        ValueError: no common tensors, or shapes that differ beyond vocabulary rows (before anything is read).
    """
    paths = [pretrained_model, *finetuned_models]
    labels = list(labels) if labels is not None else paths
    if len(labels) != len(paths):
        raise ValueError(f"labels must name the base and every fine-tuned model ({len(paths)}), got {len(labels)}")
    _, indexes = index_models(paths)
    catalogs = [{n: (info.shape, info.dtype) for n, info in index.tensors.items()} for index in indexes]
    plan = build_plan(catalogs, labels)
    readers = [TensorReader(index) for index in indexes]
    try:
        return _run(plan, readers, num_threads, progress, chunk_numel)
    finally:
        for reader in readers:
            reader.close()


def analyze_state_dicts(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    pretrained_name: str = "pretrained",
    num_threads: int | None = 1,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> DeltaAnalysis:
    """``analyze_deltas`` on in-memory state dicts (``{model name: state dict}`` for the fine-tuned ones).

    Names may differ by a leading prefix (``bert.`` in a classifier against the bare encoder); tensors only one
    side has (a classifier head) are reported as unmatched.
    """
    labels = [pretrained_name, *finetuned]
    state_dicts = [pretrained, *finetuned.values()]
    catalogs = [{n: (tuple(t.shape), t.dtype) for n, t in sd.items()} for sd in state_dicts]
    plan = build_plan(catalogs, labels)
    return _run(plan, [StateDictReader(sd) for sd in state_dicts], num_threads, False, chunk_numel)
