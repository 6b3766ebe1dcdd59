"""Resolve a model argument (a local folder or a Hugging Face hub id) to a local folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.hub import hub_offline

logger = logging.getLogger(__name__)

# What a merge needs from a hub repository: weights, configs and tokenizer files.
HUB_ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja")
HUB_BIN_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and os.sep == "/"


def _snapshot(repo_id: str, allow_patterns: tuple[str, ...], offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns), local_files_only=offline))


def _download_hub_model(repo_id: str) -> Path:
    """Fetch configs, tokenizer and weights; ``.bin`` weights only when the repo has no safetensors."""
    offline = hub_offline()
    folder = _snapshot(repo_id, HUB_ALLOW_PATTERNS, offline)
    if not any(folder.glob("*.safetensors")):
        folder = _snapshot(repo_id, HUB_ALLOW_PATTERNS + HUB_BIN_PATTERNS, offline)
    return folder


def resolve_model_dir(name_or_path: str) -> Path:
    """Return the local folder holding ``name_or_path``.

    A path that exists is used as is. Otherwise a ``owner/name`` string is looked up on the Hugging Face hub
    (the local cache only when ``HF_HUB_OFFLINE`` is set, see ``common.hub.hub_offline``).

    Args:
        name_or_path: a folder with ``config.json`` and weights, or a hub id such as ``meta-llama/Llama-2-7b-hf``.
    Returns:
        The resolved folder (absolute).
    Raises:
        FileNotFoundError: listing the local path and the hub id that were tried.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    tried = [f"local folder {path.resolve()} (does not exist)"]
    if path.exists():
        tried = [f"local path {path.resolve()} (is a file, not a folder)"]
    elif _looks_like_hub_id(name_or_path):
        try:
            folder = _download_hub_model(name_or_path)
            logger.info("resolved hub id %s to %s", name_or_path, folder)
            return folder.resolve()
        except Exception as exc:  # huggingface_hub raises many types (offline, 404, gated, network)
            tried.append(f"hub id {name_or_path!r} ({type(exc).__name__}: {exc})")
    raise FileNotFoundError(f"model {name_or_path!r} not found; tried: " + "; ".join(tried))
