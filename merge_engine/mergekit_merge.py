"""Run a mergekit YAML configuration with the streaming engine: ``merge_from_config``.

Order of work, as for ``merge_checkpoints``: parse and validate the YAML (``mergekit_config``), index every
model (headers only), plan every output tensor and resolve its parameters (so a bad value fails before any
tensor is read), then read -> merge -> write tensor by tensor in worker threads, into a work folder renamed to
``output_dir`` at the end. The maths is ``model_merging_methods.mergekit_methods``; random sparsifiers (DARE,
DELLA) draw this project's masks, keyed by (seed, model, output tensor name), so a merge does not depend on
thread count or order and agrees with mergekit's in distribution, not mask for mask.

The folder is laid out as mergekit lays it out: safetensors shards and index, the base's ``config.json`` (or the
first model's) with ``torch_dtype`` and the layer count updated, tokenizer files, ``mergekit_config.yml`` (the
input, verbatim) and a model card, plus ``merge_config.json`` with the command that rebuilds the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common.run_dir import atomic_write_json, atomic_write_text
from merge_engine.lora_source import is_adapter_argument
from merge_engine.merge_record import describe_input, versions
from merge_engine.mergekit_config import (
    RESCALE_MODES,
    MergekitConfig,
    TensorPlan,
    check_della_bounds,
    load_config,
    num_layers,
    plan_tensors,
    resolve_tensor_parameters,
)
from merge_engine.model_source import resolve_model_dir
from merge_engine.output_folder import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    check_output_location,
    finished_merge_matches,
    prepare_work_dir,
    publish,
)
from merge_engine.pipeline import ordered_map
from merge_engine.shard_index import CheckpointIndex, index_checkpoint
from merge_engine.stream_merge import _summary
from merge_engine.tensor_plan import read_config
from merge_engine.tensor_reader import TensorReader
from merge_engine.tensor_writer import OutputTensor, ShardedWriter, plan_shards, shard_is_complete, write_index
from model_merging_methods import mergekit_fused, mergekit_methods, mergekit_sparsify

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
DEFAULT_SEED = 0
#: 2-D tensors of at least this many elements (2M) are merged in chunks of whole rows of about ``CHUNK_ELEMENTS``
#: where the method allows it (element-wise maths, per-row DELLA ranks, per-tensor L1 norms taken in a first pass)
CHUNK_MIN_ELEMENTS = 2 << 20
CHUNK_ELEMENTS = 1 << 20
_ROW_CHUNKABLE = {"linear", "task_arithmetic", "passthrough", "dare_linear", "dare_ties", "della", "della_linear"}
#: chunked too, after a first pass that finds each model's whole-tensor selection (not with an L1 rescale)
_MAGNITUDE = {"ties", "breadcrumbs", "breadcrumbs_ties"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor with its resolved parameters, shape and output dtype."""

    plan: TensorPlan
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    floating: bool
    method: str = ""
    dare_rescale: str = "l1"
    compute_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class PreparedConfig:
    """A validated configuration with its models indexed and every tensor planned; nothing read yet."""

    config: MergekitConfig
    dirs: dict[str, Path]
    indexes: dict[str, CheckpointIndex]
    configs: dict[str, dict]
    tensors: list[PlannedTensor]
    out_layers: int
    model_indices: dict[str, int]
    seed: int
    dare_rescale: str
    record: dict[str, Any]
    output: Path


def prepare_config(text: str, output_dir: str | os.PathLike, *, seed: int | None = None,
                   dare_rescale: str = "l1", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   command: str | None = None, where: str = "config") -> PreparedConfig:
    """Parse ``text``, index the models and plan every output tensor; every error is raised here.

    Raises:
        ValueError: a bad key, value, method, slice range, layer count, missing tensor or shape mismatch.
    """
    config = load_config(text, where=where)
    if dare_rescale not in RESCALE_MODES:
        raise ValueError(f"dare_rescale must be one of {RESCALE_MODES}, got {dare_rescale!r}")
    seed = DEFAULT_SEED if seed is None else seed
    models = config.referenced_models()
    for model in models:
        if is_adapter_argument(model):
            raise ValueError(f"{where}: model {model!r} is a PEFT LoRA adapter folder; --config takes full models, "
                             "as mergekit does; merge adapters with merge_checkpoints.py without --config (adapters "
                             "go next to full fine-tunes: DARE and the methods run on ΔW = scale·B·A), or "
                             "merge_and_unload() the adapter into its base first")
    dirs = {m: resolve_model_dir(m) for m in models}
    if config.tokenizer_source not in (None, "base", *models):  # a tokenizer donor outside the merge: found now
        dirs[config.tokenizer_source] = resolve_model_dir(config.tokenizer_source)
    output = Path(output_dir).expanduser().resolve()
    check_output_location(output, list(dirs.values()))
    indexes = {m: index_checkpoint(dirs[m]) for m in models}
    configs = {m: read_config(dirs[m]) for m in models}
    layer_counts = {m: num_layers(configs[m], m) for m in models}
    plans, out_layers = plan_tensors(config, {m: list(i.tensors) for m, i in indexes.items()}, layer_counts)
    compute = _TORCH_DTYPES.get(config.dtype) if config.dtype else None
    out = _TORCH_DTYPES.get(config.out_dtype) if config.out_dtype else None
    tensors = []
    for plan in plans:
        infos = [indexes[s.model].tensors[s.name] for s in plan.sources]
        shapes = {tuple(i.shape) for i in infos}
        if len(shapes) > 1:
            listed = ", ".join(f"{s.model} {tuple(i.shape)}" for s, i in zip(plan.sources, infos, strict=True))
            raise ValueError(f"{plan.name}: the inputs' shapes differ ({listed}); models with other vocabularies need "
                             "tokenizer_source: union, which this merger does not support")
        shared, per_input = resolve_tensor_parameters(config, plan)
        if config.method.name.startswith("della"):
            for source, values in zip(plan.sources, per_input, strict=True):
                if "density" in values:
                    check_della_bounds(values["density"], values["epsilon"], f"{source.model}: {source.name}")
        floating = infos[0].dtype.is_floating_point
        base_info = next((i for s, i in zip(plan.sources, infos, strict=True)
                          if s.model == plan.base_model), infos[0])
        dtype = (out or compute or base_info.dtype) if floating else infos[0].dtype
        promoted = infos[0].dtype
        for info in infos[1:]:
            promoted = torch.promote_types(promoted, info.dtype)
        tensors.append(PlannedTensor(plan, shared, per_input, tuple(infos[0].shape), dtype, floating,
                                     config.method.name, dare_rescale, compute or promoted))
    model_indices = {m: i for i, m in enumerate(models)}
    record = {
        "config_file": "mergekit_config.yml",
        "config_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "merge_method": config.method.name,
        # which rescale ran ("l1": mergekit's meaning; "inverse_keep": the paper's 1 / (1 - p)), and the masks
        "semantics": {"dare_rescale": dare_rescale, "masks": "this project's, keyed by (seed, model index, tensor)"},
        "inputs": [describe_input(m, dirs[m], indexes[m]) for m in models],
        "random_seed": seed,  # not "seed": resume compares it (merge_checkpoints' records derive "seed")
        "max_shard_bytes": max_shard_bytes,
        "command": command,
        "versions": versions(),
    }
    return PreparedConfig(config, dirs, indexes, configs, tensors, out_layers, model_indices, seed, dare_rescale,
                          record, output)


def _merge_tensor(prepared: PreparedConfig, planned: PlannedTensor, tensors: list[torch.Tensor], *,
                  element_offset: int = 0, l1_norms: list | None = None, keep_masks: list | None = None
                  ) -> torch.Tensor:
    """The method on one tensor's inputs (already in the compute dtype), or on a chunk of whole rows of them
    (``element_offset``: the chunk's first flat position; ``l1_norms``: the whole tensor's, from ``_l1_norms``)."""
    config, plan = prepared.config, planned.plan
    method = config.method.name
    models = [s.model for s in plan.sources]
    if not planned.floating:
        return tensors[0]
    if method == "passthrough":
        return mergekit_methods.passthrough(tensors[0], planned.per_input[0].get("scale"))
    if method == "linear":
        return mergekit_methods.linear(tensors, [p["weight"] for p in planned.per_input],
                                       normalize=planned.shared["normalize"])
    base_index = models.index(plan.base_model) if plan.base_model in models else None
    if method == "slerp":
        other = 1 - base_index
        return mergekit_methods.slerp(planned.shared["t"], tensors[base_index], tensors[other])
    if method == "nuslerp":
        others = [i for i in range(len(tensors)) if i != base_index]
        return mergekit_methods.nuslerp(
            tensors[others[0]], tensors[others[1]], weights=[planned.per_input[i]["weight"] for i in others],
            base=tensors[base_index] if base_index is not None else None,
            nuslerp_row_wise=planned.shared["nuslerp_row_wise"], nuslerp_flatten=planned.shared["nuslerp_flatten"])
    if method == "model_stock":
        others = [tensors[i] for i in range(len(tensors)) if i != base_index]
        return mergekit_methods.model_stock(tensors[base_index], others, filter_wise=planned.shared["filter_wise"])
    others = [i for i in range(len(tensors)) if i != base_index]
    return mergekit_methods.gta_merge(
        method, tensors[base_index], [tensors[i] for i in others],
        weights=[planned.per_input[i]["weight"] for i in others],
        densities=[planned.per_input[i]["density"] for i in others],
        gammas=[planned.per_input[i].get("gamma") for i in others],
        epsilons=[planned.per_input[i].get("epsilon") for i in others],
        normalize=planned.shared["normalize"],
        rescale=prepared.dare_rescale if planned.shared["rescale"] else "none", lambda_=planned.shared["lambda"],
        seed=prepared.seed, model_indices=[prepared.model_indices[models[i]] for i in others], name=plan.name,
        element_offset=element_offset, l1_norms=l1_norms, keep_masks=keep_masks)


def row_chunks(planned: PlannedTensor) -> list[tuple[int, int]] | None:
    """Row ranges to merge ``planned`` in, or None to merge it whole (small, not 2-D, or a method that needs the
    whole tensor: TIES and breadcrumbs rank it, SLERP-like methods and Model Stock take its norms)."""
    if len(planned.shape) != 2 or planned.shape[0] * planned.shape[1] < CHUNK_MIN_ELEMENTS or not planned.floating:
        return None
    l1 = planned.shared.get("rescale") and planned.dare_rescale == "l1"
    if planned.method not in _ROW_CHUNKABLE and not (planned.method in _MAGNITUDE and not l1):
        return None
    rows = planned.shape[0]
    step = max(1, CHUNK_ELEMENTS // planned.shape[1])
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _chunk_deltas(read, chunks, i: int, base: int):
    """``(x_i - base, first element's flat position)`` of each row chunk, reading only those two inputs."""
    for start, end in chunks:
        model, base_rows = read((start, end), (i, base))
        yield model - base_rows, start * (base_rows.shape[1] if base_rows.dim() == 2 else 1)


def _magnitude_selections(planned: PlannedTensor, read, chunks) -> list | None:
    """For TIES and breadcrumbs in chunks: each non-base model's whole-tensor selection of its largest |delta|
    (``mergekit_sparsify.magnitude_chunk_masks``: histogram passes over the chunks, never the whole tensor)."""
    if planned.method not in _MAGNITUDE:
        return None
    spec = mergekit_methods.GTA_METHODS[planned.method]
    models = [s.model for s in planned.plan.sources]
    base = models.index(planned.plan.base_model)
    selections = []
    for i in (i for i in range(len(models)) if i != base):
        def magnitudes(i=i):
            return (delta.abs().reshape(-1) for delta, _ in _chunk_deltas(read, chunks, i, base))
        values = planned.per_input[i]
        selections.append(mergekit_sparsify.magnitude_chunk_masks(
            magnitudes, planned.shape[0] * planned.shape[1], values["density"], spec.sparsification,
            gamma=values.get("gamma") or 0.01))
    return selections


def _chunk_keep_masks(planned: PlannedTensor, selections: list | None, tensors: list[torch.Tensor]) -> list | None:
    if selections is None:
        return None
    models = [s.model for s in planned.plan.sources]
    base = models.index(planned.plan.base_model)
    dtype = mergekit_methods.compute_dtype(tensors)
    others = [i for i in range(len(models)) if i != base]
    return [mergekit_sparsify.chunk_keep_mask(selection, (tensors[i].to(dtype) - tensors[base].to(dtype)).abs()
                                              .reshape(-1)) for selection, i in zip(selections, others, strict=True)]


def _l1_norms(prepared: PreparedConfig, planned: PlannedTensor, read, chunks) -> list | None:
    """Each non-base model's whole-tensor L1 norms (before and after dropping) when the method rescales by L1."""
    plan = planned.plan
    spec = mergekit_methods.GTA_METHODS.get(planned.method)
    if spec is None or spec.sparsification not in ("random", "della_magprune") or not planned.shared.get("rescale") \
            or prepared.dare_rescale != "l1":
        return None
    models = [s.model for s in plan.sources]
    base = models.index(plan.base_model)
    norms = []
    for i in (i for i in range(len(models)) if i != base):
        values = planned.per_input[i]
        if spec.sparsification == "random":  # compiled: the delta, the mask and both sums in one pass per chunk
            fast = _random_l1_norms(prepared, planned, read, chunks, i, base)
            if fast is not None:
                norms.append(fast)
                continue
        norms.append(mergekit_methods.l1_norms(
            _chunk_deltas(read, chunks, i, base), values["density"], spec.sparsification,
            epsilon=values.get("epsilon") or 0.0, seed=prepared.seed, model_index=prepared.model_indices[models[i]],
            name=plan.name))
    return norms


def _random_l1_norms(prepared: PreparedConfig, planned: PlannedTensor, read, chunks, i: int, base: int
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``mergekit_methods.l1_norms`` of DARE's mask from ``mergekit_fused.random_l1_sums`` on (model, base) row
    chunks (the same float64 sums rounded once); None where the compiled pass does not apply."""
    before = after = 0.0
    models = [s.model for s in planned.plan.sources]
    for start, end in chunks:
        model, base_rows = read((start, end), (i, base))
        sums = mergekit_fused.random_l1_sums(
            model, planned.per_input[i]["density"], seed=prepared.seed, model_index=prepared.model_indices[models[i]],
            name=planned.plan.name, element_offset=start * planned.shape[1], base=base_rows)
        if sums is None:
            return None
        before += sums[0]
        after += sums[1]
    return torch.tensor(before, dtype=model.dtype), torch.tensor(after, dtype=model.dtype)


def _config_json(prepared: PreparedConfig) -> dict[str, Any] | None:
    """The donor's ``config.json`` (the base, else the first model) with ``torch_dtype`` and the layer count."""
    config = prepared.config
    donor = config.base_model or config.referenced_models()[0]
    source = prepared.dirs[donor] / "config.json"
    if not source.is_file():
        return None
    data = json.loads(source.read_text("utf-8"))
    if config.out_dtype or config.dtype:  # transformers 5 writes "dtype", earlier versions "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in data] or ["torch_dtype"]:
            data[key] = config.out_dtype or config.dtype
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(data.get(key), int):
            data[key] = prepared.out_layers
            break
    return data


def _copy_tokenizer(prepared: PreparedConfig, work: Path) -> str:
    """Tokenizer and generation files from ``tokenizer_source`` (``base`` or a model), else from the base (or the
    first model), as mergekit copies them when it builds no tokenizer."""
    config = prepared.config
    source = config.tokenizer_source
    donor = (config.base_model if source in (None, "base") else source) or config.referenced_models()[0]
    for name in (*TOKENIZER_FILES, *[f for f in CONFIG_FILES if f != "config.json"]):
        path = prepared.dirs[donor] / name
        if path.is_file():
            shutil.copyfile(path, work / name)
    return donor


def model_card(prepared: PreparedConfig, title: str) -> str:
    """``README.md`` in mergekit's layout: front matter, method, models merged, the configuration."""
    config = prepared.config
    hub = [m for m in config.referenced_models() if not Path(m).exists() and m.count("/") == 1]
    method = config.method
    link = f"[{method.pretty_name}]({method.reference_url})" if method.reference_url else method.pretty_name
    lines = ["---", *(["base_model:", *[f"- {m}" for m in hub]] if hub else []),
             "library_name: transformers", "tags:", "- mergekit", "- merge", "", "---", f"# {title}", "",
             "This is a merge of pre-trained language models created with this project's streaming merger "
             "(`merge_checkpoints.py --config`), which reads mergekit's configuration format.", "",
             "## Merge Details", "### Merge Method", "",
             f"This model was merged using the {link} merge method"
             + (f" using {config.base_model} as a base." if config.base_model else "."), "",
             "### Models Merged", "", "The following models were included in the merge:",
             *[f"* {m}" for m in config.merged_models()], "",
             "### Configuration", "", "The following YAML configuration was used to produce this model:", "",
             "```yaml", config.text.rstrip("\n"), "```", ""]
    if prepared.record.get("command"):
        lines += ["Rebuild the same bytes with:", "", "```bash", prepared.record["command"], "```", ""]
    return "\n".join(lines)


def merge_from_config(
    config_text: str,
    output_dir: str | os.PathLike,
    *,
    seed: int | None = None,
    dare_rescale: str = "l1",
    overwrite: bool = False,
    resume: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    num_threads: int | None = None,
    progress: bool = True,
    command: str | None = None,
    where: str = "config",
    device: str = "cpu",
) -> dict[str, Any]:
    """Merge the models of a mergekit configuration into ``output_dir`` (see the module docstring).

    Args:
        config_text: the YAML text (written verbatim to ``mergekit_config.yml``).
        output_dir: the merged model's folder (must not exist or be empty, unless ``overwrite``).
        seed: seed of the random sparsifiers (mergekit's ``--random-seed``; default 0, recorded).
        dare_rescale: ``l1`` (mergekit's meaning of ``rescale: true``) or ``inverse_keep`` (the paper's 1 / (1 - p)).
        overwrite, resume: as ``merge_checkpoints`` (``resume`` continues from completed shards).
        max_shard_bytes: output shard size limit.
        num_threads: worker threads (default: the CPU count, at most 4).
        command: the command line that redoes the merge (recorded and shown in the model card).
        device: where the maths runs (``cpu``, ``cuda``, ``cuda:1``); reads and writes stay on the CPU.
    Returns:
        ``{"tensors", "bytes", "seconds", "peak_rss_bytes", "output_dir"}`` (``already_complete`` with ``resume``
        on a finished folder of the same merge).
    """
    start = time.perf_counter()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device must be usable, got {device!r} but torch.cuda.is_available() is False")
    prepared = prepare_config(config_text, output_dir, seed=seed, dare_rescale=dare_rescale,
                              max_shard_bytes=max_shard_bytes, command=command,
                              where=where)
    output, record = prepared.output, prepared.record
    if resume and finished_merge_matches(output, record, overwrite=overwrite):
        logger.info("--resume: %s already holds this merge; nothing to do", output)
        return {**_summary(0, 0, start, output), "already_complete": True}
    shards = plan_shards([OutputTensor(t.plan.name, t.shape, t.out_dtype) for t in prepared.tensors],
                         max_shard_bytes)
    work = prepare_work_dir(output, record, overwrite=overwrite, resume=resume)
    complete = {s.file_name for s in shards if resume and shard_is_complete(work, s)}
    done = {t.name for s in shards if s.file_name in complete for t in s.tensors}
    writer = ShardedWriter(work, shards, skip=complete)
    readers = {m: TensorReader(i) for m, i in prepared.indexes.items()}
    def read(planned: PlannedTensor, rows: tuple[int, int] | None = None, which: tuple[int, ...] | None = None
             ) -> list[torch.Tensor]:
        sources = planned.plan.sources if which is None else [planned.plan.sources[i] for i in which]
        inputs = [readers[s.model].read(s.name, rows).to(device) for s in sources]
        if planned.floating:  # the compute dtype: the config's, else the promotion of every input's
            inputs = [t.to(planned.compute_dtype) for t in inputs]
        return inputs

    def run(planned: PlannedTensor) -> torch.Tensor:
        chunks = row_chunks(planned)
        if chunks is None:
            return _merge_tensor(prepared, planned, read(planned)).to(planned.out_dtype).cpu().contiguous()
        # big tensors in chunks of whole rows: memory stays at a few chunks, the values are the whole tensor's
        def read_rows(rows, which):
            return read(planned, rows, which)
        norms = _l1_norms(prepared, planned, read_rows, chunks)
        selections = _magnitude_selections(planned, read_rows, chunks)
        out = torch.empty(planned.shape, dtype=planned.out_dtype)
        for start, end in chunks:
            tensors = read(planned, (start, end))
            out[start:end] = _merge_tensor(
                prepared, planned, tensors, element_offset=start * planned.shape[1], l1_norms=norms,
                keep_masks=_chunk_keep_masks(planned, selections, tensors)).to(planned.out_dtype).cpu()
        return out

    todo = [t for t in prepared.tensors if t.plan.name not in done]
    workers = num_threads or min(os.cpu_count() or 1, 4)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool, \
                tqdm(total=len(todo), desc="merging tensors", unit="tensor", disable=not progress) as bar:
            for planned, tensor in ordered_map(run, todo, pool, depth=4 * workers + 4):
                writer.write(planned.plan.name, tensor)
                bar.update(1)
        writer.close()
    finally:
        torch.set_num_threads(torch_threads)
        for reader in readers.values():
            reader.close()
    write_index(work, shards)
    config_json = _config_json(prepared)
    if config_json is not None:
        atomic_write_json(work / "config.json", config_json)
    _copy_tokenizer(prepared, work)
    atomic_write_text(work / "mergekit_config.yml", prepared.config.text)
    atomic_write_text(work / "README.md", model_card(prepared, output.name))
    publish(work, output)
    return _summary(len(todo), writer.bytes_written, start, output)


def describe_plan(prepared: PreparedConfig) -> Mapping[str, Any]:
    """What ``--config ... --dry_run`` prints: models, tensors, layers, and a sample of resolved parameters."""
    sample = prepared.tensors[:: max(1, len(prepared.tensors) // 5)][:5]
    return {"merge_method": prepared.config.method.name, "models": prepared.config.referenced_models(),
            "tensors": len(prepared.tensors), "output_layers": prepared.out_layers, "seed": prepared.seed,
            "sample": [{"tensor": t.plan.name, "t": t.plan.t, "shared": t.shared,
                        "inputs": {s.model: p for s, p in zip(t.plan.sources, t.per_input, strict=True)}}
                       for t in sample]}


