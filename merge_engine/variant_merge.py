"""Several merges of the same inputs in one streaming pass: recipes that share their DARE'd deltas.

A grid's points that differ only in a setting applied after DARE (the scaling coefficient λ of Task Arithmetic or
TIES) would each read every input and draw every DARE mask again: about 10 min per merge at 13B (3 x 26 GB read,
26 GB written). :func:`merge_variants` reads each tensor (or row chunk) once, computes its DARE'd float32 deltas
once (the first recipe's ``MergePlan.deltas``), runs each recipe's method on them (``MergePlan.merge_deltas``) and
writes each result into its own output folder. These are the steps of separate ``merge_checkpoints`` calls
(``UnitRunner.run_variants``), so each output is bit for bit the separate merge's, with the same
``merge_config.json`` (``holds_finished_merge`` and ``resume`` cannot tell them apart).

Why one pass writing several models, not the DARE'd deltas saved once and merged per λ: exact deltas are float32,
52 GB per fine-tuned model at 13B, so each later merge would read more (the base plus 2-3 x 52 GB) than a merge
from the bf16 inputs (3 x 26 GB) and the disk would hold them besides. One pass reads the inputs once; the price is
disk: every output exists until its point is evaluated (one model in the output dtype each: 26 GB in bf16 at 13B).

Atomic and resumable like one merge: each output is written in its own ``.incomplete`` work folder and published
(renamed) only when complete, so a killed pass never leaves a folder that looks finished. With ``resume`` a finished
output is left out of the pass and the others continue from their completed shards (a unit is merged when some
output still needs it and written only there).

Limits (ValueError otherwise): every recipe has the same DARE settings and the same number of models, and none
needs per-model statistics (Fisher, RegMean). A method's whole-model state (MergeLM's global TIES trim) is
computed per recipe in shared passes, each reading the inputs once for all. Tensors are merged in row chunks only
when every recipe allows it (a chunkable recipe gives the same result whole or chunked). Memory: up to
``len(outputs)`` output units per unit in flight, so fewer finished units wait for the writers than in one merge.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from merge_engine.global_statistics import run_shared_global_passes
from merge_engine.lora_source import open_reader
from merge_engine.output_folder import copy_side_files, finished_merge_matches, publish, write_model_card
from merge_engine.pipeline import ordered_map
from merge_engine.stream_merge import (
    DEFAULT_CHUNK_NUMEL,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_MAX_WORKERS,
    _config_updates,
    _open_work,
    _prepare,
    _Prepared,
    _summary,
    _with_readahead,
)
from merge_engine.tensor_plan import parse_dtype
from merge_engine.tensor_task import UnitRunner, plan_units
from merge_engine.tensor_writer import ShardedWriter, write_index
from model_merging_methods import Recipe

logger = logging.getLogger(__name__)


@dataclass
class _Output:
    """One output of the pass: its validated merge, runner (sharing the pass's readers), writer and done tensors."""

    prepared: _Prepared
    runner: UnitRunner
    shards: list
    work: Path
    writer: ShardedWriter
    done_names: set[str]


def check_no_statistics(recipes: Sequence[Recipe]) -> None:
    """Refuse a recipe whose method needs per-model statistics (Fisher, RegMean)."""
    for recipe in recipes:
        if recipe.spec.statistics is not None:
            raise ValueError(f"merge_variants merges without per-model statistics, got {recipe.describe()} (needs "
                             f"{recipe.spec.statistics}); merge it with merge_checkpoints")


def check_shared_deltas(recipes: Sequence[Recipe], plans: Sequence[Any]) -> None:
    """Refuse recipes whose deltas differ: other DARE settings (rates, seed, strategy, format, rescale)."""
    first = plans[0]
    for recipe, plan in zip(recipes, plans, strict=True):
        if (plan.dare, plan.dare_rates, plan.model_indices) != (first.dare, first.dare_rates, first.model_indices):
            raise ValueError(f"merge_variants needs one DARE setting for every recipe (the deltas are computed once), "
                             f"got {recipes[0].describe()} and {recipe.describe()}; merge them separately")


def _open_outputs(pending: Sequence[_Prepared], labels: Sequence[str], *, vocab_policy: str, device: str,
                  strict: bool, max_shard_bytes: int, overwrite: bool, resume: bool) -> list[_Output]:
    readers = [open_reader(index) for index in pending[0].setup.indexes]
    outputs = []
    for prepared in pending:
        runner = UnitRunner(prepared.plan, readers, labels, vocab_policy=vocab_policy, device=device, strict=strict)
        shards, work, writer, done_names = _open_work(prepared.setup.output, prepared.record, prepared.setup.jobs,
                                                      max_shard_bytes, overwrite, resume)
        outputs.append(_Output(prepared, runner, shards, work, writer, done_names))
    return outputs


def _stream_outputs(outputs: Sequence[_Output], units, *, num_workers: int, progress: bool) -> list[int]:
    """Merge every unit some output still needs (inputs read once), write it where needed; tensors per output."""
    first = outputs[0].runner
    todo = [u for u in units if any(u.job.name not in o.done_names for o in outputs)]
    written = [0] * len(outputs)

    def run(unit):
        variants = [(o.runner.plan, o.runner.global_state) if unit.job.name not in o.done_names else None
                    for o in outputs]
        return first.run_variants(unit, variants)

    bar = tqdm(total=sum(1 for u in todo if u.last), desc=f"merging tensors ({len(outputs)} outputs)", unit="tensor",
               disable=not progress)
    # each result holds one unit per output: fewer of them wait for the writers than in a single merge
    depth = max(num_workers + 1, (4 * num_workers + 4) // len(outputs))
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="merge") as pool:
        for unit, tensors in ordered_map(run, _with_readahead(first, todo), pool, depth=depth):
            for position, (output, tensor) in enumerate(zip(outputs, tensors, strict=True)):
                if tensor is None:
                    continue
                if unit.rows is None:
                    output.writer.write(unit.job.name, tensor)
                else:
                    output.writer.write_chunk(unit.job.name, tensor, last=unit.last)
                written[position] += unit.last
            bar.update(int(unit.last))
    bar.close()
    for output in outputs:
        output.writer.close()
    return written


def _run_pass(outputs: Sequence[_Output], units, *, num_workers: int, progress: bool) -> list[int]:
    """Whole-model passes, then the merge; torch's own threads are off while the workers run (as in one merge)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_shared_global_passes([o.runner for o in outputs], units, progress=progress)
        return _stream_outputs(outputs, units, num_workers=num_workers, progress=progress)
    finally:
        torch.set_num_threads(torch_threads)
        for reader in outputs[0].runner.readers:
            reader.close()


def _finish(output: _Output, copy_config_from: int, dtype: str | None) -> None:
    setup = output.prepared.setup
    write_index(output.work, output.shards)
    copy_side_files(output.work, setup.dirs[copy_config_from],
                    _config_updates(setup.jobs, setup.configs[copy_config_from], parse_dtype(dtype)))
    write_model_card(output.work, output.prepared.record)
    publish(output.work, setup.output)


def merge_variants(
    pretrained_model: str,
    finetuned_models: Sequence[str],
    outputs: Sequence[tuple[str, Recipe]],
    *,
    exclude_param_names_regex: Sequence[str] = (),
    dtype: str | None = None,
    device: str = "cpu",
    num_threads: int | None = None,
    vocab_policy: str = "error",
    copy_config_from: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    strict: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
) -> list[dict[str, Any]]:
    """Merge the same inputs with several recipes sharing their DARE'd deltas, in one pass (module docstring).

    Args:
        pretrained_model, finetuned_models: as in ``merge_checkpoints``.
        outputs: ``(output_dir, recipe)`` per merge; the folders must differ.
        exclude_param_names_regex, dtype, device, num_threads, vocab_policy, copy_config_from, overwrite, resume,
            strict, max_shard_bytes, progress, chunk_numel: as in ``merge_checkpoints``, for every output.
    Returns:
        Per output, ``merge_checkpoints``' summary (``tensors``, ``bytes``, ``seconds`` of the whole pass, ...);
        ``already_complete`` for an output ``resume`` found finished.
    Raises:
        ValueError: the recipes do not share their deltas (other DARE settings), one needs statistics, or two
            outputs share a folder.
    """
    start = time.perf_counter()
    folders = [Path(folder).expanduser().resolve() for folder, _ in outputs]
    if len(set(folders)) != len(folders):
        raise ValueError(f"merge_variants needs one folder per output, got {[str(f) for f in folders]}")
    check_no_statistics([recipe for _, recipe in outputs])
    common = dict(hyperparameters=None, exclude_param_names_regex=exclude_param_names_regex, dtype=dtype,
                  vocab_policy=vocab_policy, copy_config_from=copy_config_from, max_shard_bytes=max_shard_bytes,
                  statistics_files=None, command=None, device=device, num_threads=num_threads)
    prepared = [_prepare(pretrained_model, finetuned_models, folder, merging_method_name=recipe, **common)
                for folder, recipe in outputs]
    check_shared_deltas([recipe for _, recipe in outputs], [p.plan for p in prepared])
    finished = [resume and finished_merge_matches(p.setup.output, p.record, overwrite=overwrite) for p in prepared]
    pending = [p for p, done in zip(prepared, finished, strict=True) if not done]
    for p in (p for p, done in zip(prepared, finished, strict=True) if done):
        logger.info("--resume: %s already holds %s; left out of the pass", p.setup.output, p.plan.recipe.describe())
    written: dict[int, tuple[int, int]] = {}
    if pending:
        logger.info("one pass for %d merges of the same inputs (read once, DARE'd deltas computed once): %s",
                    len(pending), "; ".join(p.plan.recipe.describe() for p in pending))
        labels = [pretrained_model, *finetuned_models]
        opened = _open_outputs(pending, labels, vocab_policy=vocab_policy, device=device, strict=strict,
                               max_shard_bytes=max_shard_bytes, overwrite=overwrite, resume=resume)
        units = plan_units(pending[0].setup.jobs, chunkable=all(p.plan.chunkable for p in pending),
                           chunk_numel=chunk_numel)
        num_workers = num_threads or min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS)
        tensors = _run_pass(opened, units, num_workers=num_workers, progress=progress)
        for output, count in zip(opened, tensors, strict=True):
            _finish(output, copy_config_from, dtype)
            written[id(output.prepared)] = (count, output.writer.bytes_written)
    summaries = []
    for p in prepared:
        count, size = written.get(id(p), (0, 0))
        summary = _summary(count, size, start, p.setup.output)
        summaries.append(summary if id(p) in written else {**summary, "already_complete": True})
    return summaries
