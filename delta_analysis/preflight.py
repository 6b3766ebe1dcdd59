"""Homology preflight: a cheap look at a few tensors before a merge, warning when DARE's premise does not hold.

Reads the first rows (at most ``SAMPLE_NUMEL`` elements) of one weight matrix in the first, a middle and the last
block of every model, runs the delta analysis on them and applies the same verdict rules
(``delta_analysis.verdict``). A fine-tune judged ``not_derived`` or ``large`` is logged as a warning naming the
model and the numbers; with ``strict`` it is an error (``HomologyError``). About 1 MB per model is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from delta_analysis.analysis import index_models, unit_sums
from delta_analysis.plan import AnalysisPlan, Unit, build_plan
from delta_analysis.statistics import Sums, model_summary
from delta_analysis.verdict import Verdict, judge
from merge_engine.tensor_reader import TensorReader

logger = logging.getLogger(__name__)

SAMPLE_NUMEL = 1 << 18
FLAGGED = ("not_derived", "large")


class HomologyError(ValueError):
    """A fine-tuned model does not look derived from the base, or its deltas are far outside the SFT range."""


def sample_units(plan: AnalysisPlan, sample_numel: int = SAMPLE_NUMEL) -> list[Unit]:
    """One matrix of the first, a middle and the last block (else of the whole list), first rows only."""
    matrices = [i for i, e in enumerate(plan.entries) if len(e.shape) >= 2 and e.shape[0] > 0]
    layers = sorted({plan.entries[i].group for i in matrices if plan.entries[i].group.startswith("layer.")},
                    key=lambda g: int(g.split(".")[1]))
    if layers:
        chosen_groups = dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]])
        chosen = [next(i for i in matrices if plan.entries[i].group == g) for g in chosen_groups]
    else:
        chosen = list(dict.fromkeys(matrices[k] for k in (0, len(matrices) // 2, -1))) if matrices else []
    units = []
    for i in chosen:
        shape = plan.entries[i].shape
        rows = max(1, sample_numel // max(1, _numel(shape[1:])))
        units.append(Unit(i, (0, min(shape[0], rows)), True))
    return units


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _sampled_verdicts(plan: AnalysisPlan, readers: Sequence[TensorReader]) -> tuple[dict[str, Verdict], list[str]]:
    units = sample_units(plan)
    total = Sums(len(readers) - 1)
    for unit in units:
        total.add(unit_sums(plan, readers, unit, compiled=False))  # no Numba load for a megabyte
    verdicts = {}
    for j, label in enumerate(plan.labels[1:]):
        summary = model_summary(total, j)
        verdicts[label] = judge(summary, summary)
    return verdicts, [plan.entries[u.entry].name for u in units]


def check_homology(pretrained_model: str, finetuned_models: Sequence[str], *,
                   strict: bool = False) -> dict[str, Verdict]:
    """Sampled verdict per fine-tuned model; warns (or, with ``strict``, raises) for flagged models.

    Args:
        pretrained_model: base folder or hub id.
        finetuned_models: fine-tuned folders or hub ids.
        strict: raise ``HomologyError`` instead of warning; also re-raise when the check cannot run.
    Returns:
        ``{fine-tuned model: Verdict}`` (empty when the check could not run and ``strict`` is False).
    """
    labels = [pretrained_model, *finetuned_models]
    _, indexes = index_models(labels)
    catalogs = [{n: (info.shape, info.dtype) for n, info in index.tensors.items()} for index in indexes]
    try:
        plan = build_plan(catalogs, labels)
    except ValueError as error:
        if strict:
            raise HomologyError(f"homology check cannot compare the models: {error}") from error
        logger.warning("homology check skipped: %s", error)
        return {}
    readers = [TensorReader(index) for index in indexes]
    torch_threads = torch.get_num_threads()
    # a megabyte per model: one thread; OpenMP teams on a busy machine cost up to a second here
    torch.set_num_threads(1)
    try:
        verdicts, sampled = _sampled_verdicts(plan, readers)
    finally:
        torch.set_num_threads(torch_threads)
        for reader in readers:
            reader.close()
    flagged = {name: v for name, v in verdicts.items() if v.code in FLAGGED}
    for name, verdict in verdicts.items():
        message = (f"homology check of {name} against {pretrained_model}: {verdict.label} ({verdict.reason}); "
                   f"sampled the first rows of {', '.join(sampled)}")
        logger.log(logging.WARNING if name in flagged else logging.INFO, message)
    if flagged and strict:
        names = ", ".join(flagged)
        raise HomologyError(f"fine-tuned models must look derived from the base with SFT-range deltas under "
                            f"--strict, got {names} flagged ({'; '.join(v.label for v in flagged.values())}); "
                            "check the base model (python analyze_deltas.py for the full picture) or pass "
                            "--skip_homology_check")
    return verdicts
