"""The streaming merge driver: ``merge_checkpoints`` (validate everything, then read -> merge -> write).

Order of work:

1. resolve and index every model (headers only), build the merge plan (the core validates hyperparameters),
   check architectures, names, shapes, vocabularies, statistics files and the output location;
2. run the whole-model statistics passes the plan needs (global TIES trim, Fisher norms);
3. for each output tensor (or row chunk) in the base's storage order: read it from every model, call the
   core's per-tensor step, cast, append it to the current output shard (written as it goes);
4. write the index, config/tokenizer files, ``merge_config.json`` and the model card, then rename the work
   folder to ``output_dir``.

Peak memory is about ``num_threads x (num_models + method temporaries) x`` the largest unit (a tensor, or a row
chunk of ``chunk_numel`` elements) plus up to ``4 x num_threads + 4`` finished units waiting to be written; it
never includes an output shard.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from merge_engine.global_statistics import run_global_passes
from merge_engine.lora_output import check_output_format, lora_output_record, merge_to_lora_adapter
from merge_engine.lora_source import AdapterIndex, index_adapter, is_adapter_argument, open_reader
from merge_engine.merge_record import build_merge_record
from merge_engine.model_source import resolve_model_dir
from merge_engine.output_folder import (
    check_output_location,
    copy_side_files,
    finished_merge_matches,
    prepare_work_dir,
    publish,
    write_model_card,
)
from merge_engine.pipeline import ordered_map
from merge_engine.shard_index import CheckpointIndex, index_checkpoint
from merge_engine.statistics_files import LazyStatistics, check_statistics, open_statistics
from merge_engine.tensor_plan import TensorJob, build_tensor_jobs, check_architectures, parse_dtype, read_config
from merge_engine.tensor_task import UnitRunner, plan_units
from merge_engine.tensor_writer import OutputTensor, ShardedWriter, plan_shards, shard_is_complete, write_index
from merge_engine.vocab import VOCAB_POLICIES
from model_merging_methods import MergePlan, Recipe, build_merge_plan
from model_merging_methods.task_vector import get_param_names_to_merge

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DEFAULT_CHUNK_NUMEL = 1 << 20
# past 4 workers the merge gets no faster: they queue for the interpreter lock between their NumPy/torch calls
# (measurements in benchmarks/README.md)
DEFAULT_MAX_WORKERS = 4


def _check_options(vocab_policy: str, device: str, num_threads: int | None, num_models: int,
                   copy_config_from: int) -> None:
    if vocab_policy not in VOCAB_POLICIES:
        raise ValueError(f"vocab_policy must be one of {VOCAB_POLICIES}, got {vocab_policy!r}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be usable, got {device!r} but torch.cuda.is_available() is False; "
                         "pass --device cpu or install a CUDA build of torch")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if not 0 <= copy_config_from <= num_models:
        raise ValueError(f"copy_config_from must index [pretrained, *finetuned] (0..{num_models}), "
                         f"got {copy_config_from}")


def _index_models(models: Sequence[str]) -> tuple[list[Path], list[CheckpointIndex], list[dict]]:
    """``[base, *finetuned]`` folders, indexes and configs; a local LoRA adapter folder among the fine-tuned models
    is validated against the base and indexed as a source of deltas (``merge_engine.lora_source``)."""
    if is_adapter_argument(models[0]):
        raise ValueError(f"pretrained_model must be a full model, got the LoRA adapter folder {models[0]!r}; pass "
                         "the adapter's base model as pretrained_model and the adapter among finetuned_models")
    dirs = [resolve_model_dir(m) for m in models]
    base = index_checkpoint(dirs[0])
    indexes = [base] + [index_adapter(d, base) if is_adapter_argument(m) else index_checkpoint(d)
                        for m, d in zip(models[1:], dirs[1:], strict=True)]
    configs = [read_config(d) for d in dirs]
    return dirs, indexes, configs


def _check_adapter_options(models: Sequence[str], statistics_kind: str | None, copy_config_from: int) -> None:
    """Refuse the settings a LoRA adapter input cannot serve, before anything is read."""
    adapters = [m for m in models[1:] if is_adapter_argument(m)]
    if not adapters:
        return
    if statistics_kind is not None:
        raise ValueError(f"{statistics_kind} statistics merges need full models, got the LoRA adapter folder(s) "
                         f"{adapters}: the statistics files are computed on a model folder; merge the adapter into "
                         "its base (PEFT merge_and_unload()), compute its statistics on that model, pass that model")
    if is_adapter_argument(models[copy_config_from]):
        raise ValueError(f"copy_config_from must point at a full model (config, tokenizer), got {copy_config_from}, "
                         f"the LoRA adapter folder {models[copy_config_from]!r}; use 0 (the base) or a full fine-tune")


def _check_adapter_vocab(indexes: Sequence[CheckpointIndex], jobs: Sequence[TensorJob], labels: Sequence[str]) -> None:
    """Refuse vocabulary alignment with adapter inputs: ``align_rows`` pads weights, not deltas."""
    aligned = [job.name for job in jobs if job.target_rows is not None]
    adapters = [label for label, index in zip(labels, indexes, strict=True) if isinstance(index, AdapterIndex)]
    if aligned and adapters:
        raise ValueError(f"vocabulary alignment (vocab_policy) is not supported with LoRA adapter inputs "
                         f"{adapters}: an adapter's ΔW has the base's rows, got differing rows in {aligned[:3]}; "
                         "merge fine-tunes with the base's vocabulary, or merge the adapter into its base first")


def _merge_names(index: CheckpointIndex, exclude_param_names_regex: Sequence[str]) -> set[str]:
    floating = [name for name, info in index.tensors.items() if info.dtype.is_floating_point]
    return set(get_param_names_to_merge(floating, exclude_param_names_regex))


def _config_updates(jobs: Sequence[TensorJob], config: dict, dtype: torch.dtype | None) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    vocab_rows = {job.out_shape[0] for job in jobs if job.target_rows is not None}
    if vocab_rows and "vocab_size" in config:
        updates["vocab_size"] = max(vocab_rows)
    if dtype is not None:
        updates["torch_dtype"] = str(dtype).removeprefix("torch.")
    return updates


READAHEAD_UNITS = 16


def _with_readahead(runner: UnitRunner, units: Sequence, ahead: int = READAHEAD_UNITS):
    """Yield ``units`` in order, asking the kernel to read unit ``i + ahead`` when unit ``i`` is handed out."""
    for unit in units[:ahead]:
        runner.prefetch(unit)
    for i, unit in enumerate(units):
        if i + ahead < len(units):
            runner.prefetch(units[i + ahead])
        yield unit


def _stream_tensors(runner: UnitRunner, units, writer: ShardedWriter, done_names: set[str], *,
                    num_workers: int, progress: bool) -> int:
    """Merge and write every unit not already in a completed shard; returns the number of tensors written."""
    todo = [u for u in units if u.job.name not in done_names]
    written = 0
    bar = tqdm(total=sum(1 for u in todo if u.last), desc="merging tensors", unit="tensor", disable=not progress)
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="merge") as pool:
        # results wait here (a few MB each) while a write blocks on the disk, so workers keep computing
        for unit, tensor in ordered_map(runner.run, _with_readahead(runner, todo), pool, depth=4 * num_workers + 4):
            if unit.rows is None:
                writer.write(unit.job.name, tensor)
            else:
                writer.write_chunk(unit.job.name, tensor, last=unit.last)
            if unit.last:
                written += 1
                bar.update(1)
    bar.close()
    writer.close()
    return written


def _open_work(output_dir: Path, record: Mapping[str, Any], jobs: Sequence[TensorJob], max_shard_bytes: int,
               overwrite: bool, resume: bool):
    shards = plan_shards([OutputTensor(j.name, j.out_shape, j.out_dtype) for j in jobs], max_shard_bytes)
    work = prepare_work_dir(output_dir, record, overwrite=overwrite, resume=resume)
    complete = {s.file_name for s in shards if resume and shard_is_complete(work, s)}
    if complete:
        logger.info("resume: %d of %d shard(s) already written", len(complete), len(shards))
    done_names = {t.name for s in shards if s.file_name in complete for t in s.tensors}
    return shards, work, ShardedWriter(work, shards, skip=complete), done_names


def _summary(tensors: int, bytes_written: int, start: float, output_dir: Path) -> dict[str, Any]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary = {"tensors": tensors, "bytes": bytes_written, "seconds": round(time.perf_counter() - start, 3),
               "peak_rss_bytes": peak, "output_dir": str(output_dir)}
    logger.info("merged %d tensors, wrote %.2f GB in %.1f s, peak RSS %.2f GB -> %s", tensors,
                bytes_written / 1e9, summary["seconds"], peak / 1e9, output_dir)
    return summary


@dataclass(frozen=True)
class _Models:
    dirs: list[Path]
    indexes: list[CheckpointIndex]
    configs: list[dict]
    jobs: list[TensorJob]
    output: Path


def _validate_models(labels: Sequence[str], output: Path, plan, exclude: Sequence[str], vocab_policy: str,
                     out_dtype: torch.dtype | None, statistics) -> _Models:
    """Resolve and index every model, then check location, architectures, names, shapes and statistics."""
    dirs, indexes, configs = _index_models(labels)
    check_output_location(output, dirs)
    check_architectures(configs, labels)
    jobs = build_tensor_jobs(indexes, labels, merge_names=_merge_names(indexes[0], exclude),
                             vocab_policy=vocab_policy, dtype=out_dtype)
    _check_adapter_vocab(indexes, jobs, labels)
    check_statistics(statistics, plan, {j.name: j.out_shape for j in jobs if j.merge})
    return _Models(dirs, indexes, configs, jobs, output)


def _run(runner: UnitRunner, units, writer: ShardedWriter, done_names: set[str], num_workers: int,
         progress: bool) -> int:
    """Whole-model passes, then the merge; torch's own threads are off while the workers run."""
    torch_threads = torch.get_num_threads()
    # parallelism comes from the workers; intra-op (OpenMP) teams started from worker threads spin and compete
    torch.set_num_threads(1)
    try:
        run_global_passes(runner, units, progress=progress)
        return _stream_tensors(runner, units, writer, done_names, num_workers=num_workers, progress=progress)
    finally:
        torch.set_num_threads(torch_threads)
        for reader in runner.readers:
            reader.close()


@dataclass(frozen=True)
class _Prepared:
    """A validated merge before any tensor is read: its plan, statistics, models and ``merge_config.json`` record."""

    plan: MergePlan
    statistics: list[LazyStatistics] | None
    setup: _Models
    record: dict[str, Any]


def _prepare(pretrained_model: str, finetuned_models: Sequence[str], output_dir: str, *,
             merging_method_name: str | Recipe, hyperparameters: Mapping[str, Any] | None,
             exclude_param_names_regex: Sequence[str], dtype: str | None, vocab_policy: str, copy_config_from: int,
             max_shard_bytes: int, statistics_files: Sequence[str] | None, command: str | None, device: str = "cpu",
             num_threads: int | None = None, output_format: str = "safetensors",
             lora_rank: int | None = None) -> _Prepared:
    """Validate every argument and model (headers only) and build the record ``merge_checkpoints`` writes."""
    check_output_format(output_format, lora_rank, dtype)
    plan = build_merge_plan(merging_method_name, len(finetuned_models), **dict(hyperparameters or {}))
    _check_options(vocab_policy, device, num_threads, len(finetuned_models), copy_config_from)
    _check_adapter_options([pretrained_model, *finetuned_models], plan.statistics, copy_config_from)
    statistics = open_statistics(statistics_files, statistics_kind=plan.statistics,
                                 num_models=len(finetuned_models), method_name=plan.method.name)
    labels = [pretrained_model, *finetuned_models]
    setup = _validate_models(labels, Path(output_dir).expanduser().resolve(), plan, exclude_param_names_regex,
                             vocab_policy, parse_dtype(dtype), statistics)
    delta_inputs = tuple(isinstance(index, AdapterIndex) for index in setup.indexes[1:])
    if any(delta_inputs):
        plan = dataclasses.replace(plan, delta_inputs=delta_inputs)
    record = build_merge_record(labels, setup.dirs, setup.indexes, plan.recipe,
                                exclude_param_names_regex, dtype, vocab_policy, copy_config_from, max_shard_bytes,
                                statistics_files, command)
    record.update(lora_output_record(output_format, lora_rank))
    return _Prepared(plan, statistics, setup, record)


def holds_finished_merge(
    pretrained_model: str,
    finetuned_models: Sequence[str],
    output_dir: str,
    *,
    merging_method_name: str | Recipe,
    hyperparameters: Mapping[str, Any] | None = None,
    exclude_param_names_regex: Sequence[str] = (),
    dtype: str | None = None,
    vocab_policy: str = "error",
    copy_config_from: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    statistics_files: Sequence[str] | None = None,
) -> bool:
    """True when ``output_dir`` holds a finished merge of exactly these ``merge_checkpoints`` arguments.

    The record is built and compared as ``merge_checkpoints(..., resume=True)`` builds and compares it (inputs
    and their files, recipe, exclude patterns, dtype, vocabulary policy, config source, shard size, statistics
    files), so a caller that skips work for a finished folder (e.g. the homology preflight) never reuses a
    merge made with other arguments. The arguments ``merge_checkpoints`` takes besides these change how it runs,
    not what it writes. Every model is indexed (headers only); nothing is merged or written.
    """
    prepared = _prepare(pretrained_model, finetuned_models, output_dir, merging_method_name=merging_method_name,
                        hyperparameters=hyperparameters, exclude_param_names_regex=exclude_param_names_regex,
                        dtype=dtype, vocab_policy=vocab_policy, copy_config_from=copy_config_from,
                        max_shard_bytes=max_shard_bytes, statistics_files=statistics_files, command=None)
    return finished_merge_matches(prepared.setup.output, prepared.record, overwrite=True)


def merge_checkpoints(
    pretrained_model: str,
    finetuned_models: Sequence[str],
    output_dir: str,
    *,
    merging_method_name: str | Recipe,
    hyperparameters: Mapping[str, Any] | None = None,
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
    statistics_files: Sequence[str] | None = None,
    progress: bool = True,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    command: str | None = None,
    output_format: str = "safetensors",
    lora_rank: int | None = None,
) -> dict[str, Any]:
    """Merge Hugging Face checkpoints tensor by tensor into a sharded safetensors folder (or a LoRA adapter).

    The maths is ``model_merging_methods``' (the result equals ``merge_state_dicts`` on the same inputs, bit for
    bit in float32); this function owns only reading, ordering, memory and writing.

    Args:
        pretrained_model: base model folder or hub id.
        finetuned_models: fine-tuned model folders or hub ids (one model + ``mask_merging`` +
            ``mask_apply_method="average_merging"`` is single-model DARE: ``base + DARE(delta)``). A local PEFT
            LoRA adapter folder of the base may stand in any position: its ``ΔW = scale·B·A`` is the delta
            (``merge_engine.lora_source``); not with Fisher/RegMean statistics or vocabulary alignment.
        output_dir: the merged model's folder (must not exist or be empty, unless ``overwrite``).
        merging_method_name: a ``Recipe``, or a ``MERGING_METHOD_NAMES`` entry (MergeLM names) with
            ``hyperparameters`` (``scaling_coefficient``, ``param_value_mask_rate``, ``ties_trim_scope``,
            ``mask_apply_method``, ``weight_mask_rate``, ``use_weight_rescale``, ``mask_strategy``,
            ``weight_format``, ``seed``, ...), validated by ``Recipe.from_mergelm``.
        exclude_param_names_regex: names matched (``re.match``) are copied from the base, not merged.
        dtype: output dtype of floating tensors (``float32``, ``float16``, ``bfloat16``); None keeps the base's.
        device: where the maths runs (``cpu``, ``cuda``, ``cuda:1``); reads and writes stay on the CPU.
        num_threads: worker threads (default: the CPU count, at most ``DEFAULT_MAX_WORKERS``).
        vocab_policy: ``error``, ``mergelm`` or ``base`` (see ``merge_engine.vocab``).
        copy_config_from: index into ``[pretrained, *finetuned]`` of the model whose config, generation config
            and tokenizer files are copied (0 = the base).
        overwrite: replace a non-empty ``output_dir`` (at the very end) or discard an interrupted run.
        resume: continue an interrupted run from its completed shards (same arguments required).
        strict: NaN/Inf in an input tensor is an error instead of a warning.
        max_shard_bytes: output shard size limit.
        statistics_files: Fisher/RegMean statistics, one file per fine-tuned model.
        progress: show tqdm bars.
        chunk_numel: tensors above this many elements are merged in row chunks when the method allows it.
        command: the command line that redoes the merge, recorded in ``merge_config.json`` (the CLI's own).
        output_format: ``safetensors`` (the merged model) or ``lora``: a PEFT adapter of the base holding
            ``merged - base`` of every changed Linear/Embedding weight, truncated to ``lora_rank`` by SVD
            (``merge_engine.lora_output``; the retained energy of each module is recorded in ``merge_config.json``).
        lora_rank: the adapter's r, with ``output_format="lora"`` only.
    Returns:
        Summary: ``tensors`` written, ``bytes`` written, ``seconds``, ``peak_rss_bytes``, ``output_dir``; with
        ``resume`` on a finished folder of the same merge nothing is written and ``already_complete`` is True.
    """
    start = time.perf_counter()
    prepared = _prepare(pretrained_model, finetuned_models, output_dir, merging_method_name=merging_method_name,
                        hyperparameters=hyperparameters, exclude_param_names_regex=exclude_param_names_regex,
                        dtype=dtype, vocab_policy=vocab_policy, copy_config_from=copy_config_from,
                        max_shard_bytes=max_shard_bytes, statistics_files=statistics_files, command=command,
                        device=device, num_threads=num_threads, output_format=output_format, lora_rank=lora_rank)
    plan, statistics, setup, record = prepared.plan, prepared.statistics, prepared.setup, prepared.record
    labels = [pretrained_model, *finetuned_models]
    if resume and finished_merge_matches(setup.output, record, overwrite=overwrite):
        logger.info("--resume: %s already holds this merge; nothing to do", setup.output)
        return {**_summary(0, 0, start, setup.output), "already_complete": True}
    num_workers = num_threads or min(os.cpu_count() or 1, DEFAULT_MAX_WORKERS)
    if output_format == "lora":
        modules, size = merge_to_lora_adapter(plan, labels, setup.indexes, setup.jobs, setup.dirs[0], setup.output,
                                              record, statistics=statistics, lora_rank=lora_rank,
                                              vocab_policy=vocab_policy, device=device, strict=strict,
                                              overwrite=overwrite, resume=resume, num_workers=num_workers,
                                              progress=progress)
        return _summary(modules, size, start, setup.output)
    runner = UnitRunner(plan, [open_reader(index) for index in setup.indexes], labels, vocab_policy=vocab_policy,
                        statistics=statistics, device=device, strict=strict)
    shards, work, writer, done_names = _open_work(setup.output, record, setup.jobs, max_shard_bytes, overwrite,
                                                  resume)
    units = plan_units(setup.jobs, chunkable=plan.chunkable, chunk_numel=chunk_numel)
    tensors = _run(runner, units, writer, done_names, num_workers, progress)
    write_index(work, shards)
    config_updates = _config_updates(setup.jobs, setup.configs[copy_config_from], parse_dtype(dtype))
    copy_side_files(work, setup.dirs[copy_config_from], config_updates)
    write_model_card(work, record)
    publish(work, setup.output)
    return _summary(tensors, writer.bytes_written, start, setup.output)
