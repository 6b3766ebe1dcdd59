"""One unit of streamed work: read a tensor (or a block of its rows) from every model, merge it, cast it.

The maths is the merging core's (``MergePlan.process_tensor``); this module only reads, aligns vocabulary
rows, checks for non-finite values, moves data to the compute device and back, and casts to the output dtype.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merge_engine.tensor_plan import TensorJob
from merge_engine.tensor_reader import TensorReader
from merge_engine.vocab import align_rows
from model_merging_methods.dare import MASK_BLOCK_SIZE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkUnit:
    """Rows ``[rows[0], rows[1])`` of ``job`` (``rows=None``: the whole tensor); ``last`` ends the tensor."""

    job: TensorJob
    rows: tuple[int, int] | None = None
    last: bool = True

    @property
    def element_offset(self) -> int:
        if self.rows is None:
            return 0
        row_numel = 1
        for dim in self.job.out_shape[1:]:
            row_numel *= dim
        return self.rows[0] * row_numel


def _rows_per_chunk(shape: tuple[int, ...], chunk_numel: int) -> int:
    row_numel = max(1, torch.Size(shape[1:]).numel())
    rows = max(1, chunk_numel // row_numel)
    if row_numel <= MASK_BLOCK_SIZE and MASK_BLOCK_SIZE % row_numel == 0:
        # chunk boundaries on DARE mask blocks: no block is drawn twice
        step = MASK_BLOCK_SIZE // row_numel
        rows = max(step, rows // step * step)
    return rows


def plan_units(jobs: Sequence[TensorJob], *, chunkable: bool, chunk_numel: int) -> list[WorkUnit]:
    """Whole tensors, except merged tensors above ``chunk_numel`` elements when the plan allows row chunks.

    Tensors whose vocabulary rows are aligned are never chunked (the ``mergelm`` policy needs the mean of all
    rows).
    """
    units = []
    for job in jobs:
        numel = torch.Size(job.out_shape).numel()
        if not (chunkable and job.merge and job.target_rows is None and len(job.out_shape) >= 1
                and numel > chunk_numel):
            units.append(WorkUnit(job))
            continue
        step = _rows_per_chunk(job.out_shape, chunk_numel)
        starts = list(range(0, job.out_shape[0], step))
        for start in starts:
            units.append(WorkUnit(job, (start, min(start + step, job.out_shape[0])), start == starts[-1]))
    return units


class UnitRunner:
    """Reads and merges work units; thread-safe (each reader serialises its own file access)."""

    def __init__(self, plan, readers: Sequence[TensorReader], labels: Sequence[str], *, vocab_policy: str,
                 statistics=None, device: str = "cpu", strict: bool = False) -> None:
        self.plan = plan
        self.readers = readers
        self.labels = labels
        self.vocab_policy = vocab_policy
        self.statistics = statistics
        self.device = torch.device(device)
        self.strict = strict
        self.global_state = None
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def read_inputs(self, unit: WorkUnit, *, check_finite: bool = True) -> list[torch.Tensor]:
        """``[base, *finetuned]`` for the unit, vocabulary-aligned, checked for NaN/Inf unless told not to."""
        job = unit.job
        models = len(self.readers) if job.merge else 1  # copied tensors come from the base alone
        sources = zip(self.readers[:models], job.sources[:models], strict=True)
        tensors = [reader.read(src, unit.rows) for reader, src in sources]
        if job.target_rows is not None:
            base = align_rows(tensors[0], job.target_rows, self.vocab_policy)
            tensors = [base] + [align_rows(t, job.target_rows, self.vocab_policy, base) for t in tensors[1:]]
        if check_finite:
            self.check_finite(job.name, tensors)
        return tensors

    def check_finite(self, name: str, tensors: Sequence[torch.Tensor]) -> bool:
        """Warn (or raise with ``strict``) for each tensor of ``[base, *finetuned]`` (a copied tensor: ``[base]``)
        with NaN/Inf; True when one was found."""
        found = False
        for index, (label, tensor) in enumerate(zip(self.labels, tensors, strict=False)):  # copied: [base]
            if not _all_finite(tensor):
                self._report_non_finite(name, f"{label} (base model)" if index == 0 else label, tensor)
                found = True
        return found

    def _report_non_finite(self, name: str, label: str, tensor: torch.Tensor) -> None:
        count = int((~torch.isfinite(tensor)).sum())
        message = f"{label}: tensor {name!r} has {count} NaN/Inf value(s)"
        if self.strict:
            raise ValueError(f"{message}; fix the checkpoint or drop --strict to merge anyway")
        self._warn_once(label, name, f"{message}; they propagate into the output (pass --strict to stop)")

    def _warn_once(self, key: str, name: str, message: str) -> None:
        with self._lock:
            if (key, name) not in self._warned:
                self._warned.add((key, name))
                logger.warning(message)

    def prefetch(self, unit: WorkUnit) -> None:
        """Start the disk reads of ``unit`` in the background (see ``TensorReader.prefetch``)."""
        models = len(self.readers) if unit.job.merge else 1
        for reader, source in zip(self.readers[:models], unit.job.sources[:models], strict=True):
            reader.prefetch(source, unit.rows if unit.job.target_rows is None else None)

    def statistics_for(self, unit: WorkUnit) -> list[torch.Tensor] | None:
        stats = self.plan.statistics_for(unit.job.name, self.statistics)
        if stats is not None and self.device.type != "cpu":
            stats = [s.to(self.device) for s in stats]
        return stats

    def run(self, unit: WorkUnit, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The unit's output tensor, on the CPU, in the job's output dtype."""
        return self.run_variants(unit, [(self.plan, self.global_state)], tensors)[0]

    def run_variants(self, unit: WorkUnit, variants: Sequence[tuple[Any, Any] | None],
                     tensors: list[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """The unit's output for each variant ``(plan, global_state)`` (None: not wanted), on the CPU, in the job's
        output dtype.

        The inputs are read and the DARE'd float32 deltas computed once, by this runner's plan; each variant's method
        then merges them (``MergePlan.merge_deltas``), the steps of ``MergePlan.process_tensor``. Variants must share
        this plan's DARE settings and statistics (``merge_engine.variant_merge`` checks); the methods are pure, so
        one variant never sees another's results.
        """
        job = unit.job
        wanted = [plan for plan, _ in filter(None, variants)]
        # when every non-finite input shows in the output, one check of the output replaces the input checks
        check_output = job.merge and all(plan.propagates_non_finite for plan in wanted)
        tensors = self.read_inputs(unit, check_finite=not check_output) if tensors is None else tensors
        if not job.merge:
            copied = tensors[0].to(job.out_dtype)
            return [copied if variant is not None else None for variant in variants]
        inputs = tensors
        if self.device.type != "cpu":
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        base32 = tensors[0].float()  # once: the steps below would each upcast a low-precision base again
        deltas = self.plan.deltas(job.name, base32, tensors[1:], element_offset=unit.element_offset)
        statistics = self.statistics_for(unit)
        outputs: list[torch.Tensor | None] = []
        for variant in variants:
            if variant is None:
                outputs.append(None)
                continue
            plan, global_state = variant
            merged = plan.merge_deltas(job.name, base32, deltas, statistics=statistics, global_state=global_state)
            merged = merged if job.out_dtype is None else merged.to(job.out_dtype)
            if check_output and not _all_finite(merged) and not self.check_finite(job.name, inputs):
                # on the compute device (a GPU checks its own output); inputs finite: overflow in the maths or cast
                self._warn_once("merged output", job.name, f"merged tensor {job.name!r} has NaN/Inf value(s) although "
                                f"every input is finite: overflow in the maths or in the cast to {job.out_dtype}")
            outputs.append(merged.cpu())
        return outputs


def _all_finite(tensor: torch.Tensor) -> bool:
    # fast path: a sum is finite when every value is (the exact check runs only otherwise)
    return tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
