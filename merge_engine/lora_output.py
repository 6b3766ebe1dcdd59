"""``output_format="lora"``: write the merge as a PEFT LoRA adapter of the base instead of a full model.

Each merged tensor is computed as usual (in float32), its change ``merged - base`` is factorised by truncated SVD
(``lora_export.delta_to_lora``, rank ``lora_rank``) when it belongs to a Linear or Embedding module, and the factors
are saved with ``lora_export.save_lora_adapter`` (scale 1). Parameters the merge leaves unchanged are left out of
the adapter. A changed parameter a LoRA adapter cannot hold (a norm, a bias, a non-2-D tensor, a module of
another kind) is an error: the adapter would silently drop that change.

Which module is an Embedding (``ΔW = (B @ A)ᵀ`` in PEFT) is read from the base model's class, built on the meta
device from its ``config.json`` (no weights are allocated). Tensors are merged whole (no row chunks: the SVD needs
the whole matrix); memory is one merged tensor and its delta per worker.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.run_dir import atomic_write_json
from merge_engine.global_statistics import run_global_passes
from merge_engine.lora_source import open_reader
from merge_engine.output_folder import MERGE_CONFIG, prepare_work_dir, publish, write_model_card
from merge_engine.pipeline import ordered_map
from merge_engine.shard_index import CheckpointIndex
from merge_engine.statistics_files import LazyStatistics
from merge_engine.tensor_plan import TensorJob
from merge_engine.tensor_task import UnitRunner, WorkUnit, plan_units
from model_merging_methods import MergePlan
from model_merging_methods.lora_export import LoraFactors, delta_to_lora, save_lora_adapter

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("safetensors", "lora")
FACTORISABLE_KINDS = ("linear", "embedding")


def check_output_format(output_format: str, lora_rank: int | None, dtype: str | None) -> None:
    """Validate the output options before anything is read."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    if output_format == "lora":
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"output_format='lora' needs lora_rank, a positive integer, got {lora_rank!r}; pass "
                             "--lora_rank R")
        if dtype not in (None, "float32", "fp32"):
            raise ValueError(f"output_format='lora' writes float32 factors, got dtype={dtype!r}; drop --dtype")
    elif lora_rank is not None:
        raise ValueError(f"lora_rank applies to output_format='lora' only, got lora_rank={lora_rank} with "
                         f"output_format={output_format!r}; pass --output_format lora or drop --lora_rank")


def module_kinds(base_dir: Path) -> dict[str, str]:
    """``{module name: "linear" | "embedding" | class name}`` of the base model's modules.

    The model class is the first of ``config.json``'s ``architectures``, built on the meta device.
    """
    import transformers
    from torch import nn

    config = transformers.AutoConfig.from_pretrained(base_dir)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(f"output_format='lora' needs the base model's class to tell Linear from Embedding modules, "
                         f"got architectures={architectures} in {base_dir / 'config.json'}; write a full model "
                         "(--output_format safetensors) instead")
    with torch.device("meta"):
        model = model_class(config)
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(module, nn.Linear):
            kinds[name] = "linear"
        else:
            kinds[name] = type(module).__name__
    return kinds


def _factorise(runner: UnitRunner, unit: WorkUnit, kinds: dict[str, str], rank: int) -> LoraFactors | None:
    """The rank-``rank`` factors of ``merged - base`` of one whole tensor, or None when the merge leaves it as is."""
    tensors = runner.read_inputs(unit)
    base32 = tensors[0].float().clone()  # kept apart from the inputs the merge may work on in place
    delta = runner.run(unit, tensors).float() - base32
    if not bool(delta.any()):
        return None
    name = unit.job.name
    module, _, parameter = name.rpartition(".")
    kind = kinds.get(module, "not a module of the base model class")
    if parameter != "weight" or delta.dim() != 2 or kind not in FACTORISABLE_KINDS:
        raise ValueError(f"output_format='lora' can hold changes of Linear and Embedding weights only, got a change "
                         f"of {name!r} (shape {tuple(delta.shape)}, module kind {kind}); exclude it "
                         "(--exclude_param_names_regex) so it keeps the base's values, or write a full model "
                         "(--output_format safetensors)")
    return delta_to_lora(delta, rank, transpose=kind == "embedding")


def write_lora_output(runner: UnitRunner, units: Sequence[WorkUnit], work: Path, *, base_dir: Path, rank: int,
                      base_model_name_or_path: str, num_workers: int, progress: bool) -> dict[str, float]:
    """Merge every tensor, factorise the changed ones into ``work`` as a PEFT adapter; ``{module: retained energy}``.

    Args:
        runner: the merge's runner; its jobs' merged tensors must be float32 (the exact ``merged - base``).
        units: whole-tensor units (``plan_units(..., chunkable=False)``).
        work: the output's work folder.
        base_dir: the base model's folder (its ``config.json`` names the model class).
        rank: the adapter's r.
        base_model_name_or_path: recorded in ``adapter_config.json`` for ``PeftModel.from_pretrained``.

    Raises:
        ValueError: a changed parameter is not a Linear or Embedding weight (``_factorise``), or nothing changed.
    """
    kinds = module_kinds(base_dir)
    merged_units = [u for u in units if u.job.merge]
    factors: dict[str, LoraFactors] = {}
    bar = tqdm(total=len(merged_units), desc="merging and factorising", unit="tensor", disable=not progress)
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="merge") as pool:
        results = ordered_map(lambda u: _factorise(runner, u, kinds, rank), merged_units, pool,
                              depth=2 * num_workers + 2)
        for unit, result in results:
            if result is not None:
                factors[unit.job.name.rpartition(".")[0]] = result
            bar.update(1)
    bar.close()
    if not factors:
        raise ValueError("output_format='lora': the merge leaves every parameter of the base unchanged, so there is "
                         "no adapter to write; check the inputs and the method's settings")
    embeddings = [module for module in factors if kinds[module] == "embedding"]
    energy = {module: f.retained_energy for module, f in sorted(factors.items())}
    save_lora_adapter(work, {module: (f.a, f.b) for module, f in factors.items()}, rank=rank,
                      base_model_name_or_path=base_model_name_or_path, embedding_modules=embeddings,
                      retained_energy=energy)
    logger.info("wrote a rank-%d LoRA adapter of %d module(s); lowest retained energy %.6f (%s)", rank, len(energy),
                min(energy.values()), min(energy, key=energy.get))
    return energy


def lora_output_record(output_format: str, lora_rank: int | None) -> dict[str, Any]:
    """The record's ``output`` entry of a LoRA output (empty for a full model, so older records stay valid)."""
    return {"output": {"format": output_format, "lora_rank": lora_rank}} if output_format == "lora" else {}


def merge_to_lora_adapter(plan: MergePlan, labels: Sequence[str], indexes: Sequence[CheckpointIndex],
                          jobs: Sequence[TensorJob], base_dir: Path, output: Path, record: Mapping[str, Any], *,
                          statistics: Sequence[LazyStatistics] | None, lora_rank: int, vocab_policy: str,
                          device: str, strict: bool, overwrite: bool, resume: bool, num_workers: int,
                          progress: bool) -> tuple[int, int]:
    """``merge_checkpoints(..., output_format="lora")`` after validation: merge, factorise, publish the adapter.

    Merged tensors are kept in float32 (the exact ``merged - base``) and merged whole; the adapter files,
    ``merge_config.json`` (``record`` plus each module's retained energy under ``lora_retained_energy``) and the
    model card are written in the work folder and published atomically, as a full merge is.

    Args:
        plan, labels, indexes, jobs, statistics: the validated merge (``stream_merge._prepare``).
        base_dir: the base model's folder; output: the adapter's folder.

    Returns:
        ``(modules written, bytes written)``.
    """
    jobs = [dataclasses.replace(job, out_dtype=torch.float32) if job.merge else job for job in jobs]
    runner = UnitRunner(plan, [open_reader(index) for index in indexes], labels, vocab_policy=vocab_policy,
                        statistics=statistics, device=device, strict=strict)
    work = prepare_work_dir(output, record, overwrite=overwrite, resume=resume)
    units = plan_units(jobs, chunkable=False, chunk_numel=0)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a full merge: the workers are the parallelism
    try:
        run_global_passes(runner, units, progress=progress)
        energy = write_lora_output(runner, units, work, base_dir=base_dir, rank=lora_rank,
                                   base_model_name_or_path=labels[0], num_workers=num_workers, progress=progress)
    finally:
        torch.set_num_threads(torch_threads)
        for reader in runner.readers:
            reader.close()
    record = {**record, "lora_retained_energy": energy}
    atomic_write_json(work / MERGE_CONFIG, record)
    write_model_card(work, record)
    size = sum(path.stat().st_size for path in work.iterdir())
    publish(work, output)
    return len(energy), size
