"""``merge_config.json``: everything needed to redo a merge (inputs, method, hyperparameters, seed, versions).

The record holds no timestamps, so two runs of the same merge (or a resumed one) write identical folders.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from common.run_dir import git_commit
from merge_engine.lora_source import AdapterIndex, adapter_files
from merge_engine.shard_index import CheckpointIndex
from model_merging_methods.recipe import Recipe

_PACKAGES = ("torch", "safetensors", "numpy", "transformers", "huggingface_hub")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    return {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}, "git_commit": git_commit()}


def describe_input(label: str, folder: Path, index: CheckpointIndex) -> dict[str, Any]:
    """One input of the record: its name, folder, format, tensor count and ``{file: size}`` (what ``resume``
    compares); a LoRA adapter is described by its config and weights files (its index lists the base's names)."""
    paths = adapter_files(folder) if isinstance(index, AdapterIndex) else index.files
    files = {str(f.relative_to(folder)) if f.is_relative_to(folder) else str(f): f.stat().st_size for f in paths}
    return {"name": label, "path": str(folder), "format": index.format, "num_tensors": len(index.tensors),
            "files": files}


def build_merge_record(labels: Sequence[str], dirs: Sequence[Path], indexes: Sequence[CheckpointIndex],
                       recipe: Recipe, exclude: Sequence[str],
                       dtype: str | None, vocab_policy: str, copy_config_from: int, max_shard_bytes: int,
                       statistics_files: Sequence[str] | None, command: str | None = None) -> dict[str, Any]:
    """The ``merge_config.json`` content (also the fingerprint ``--resume`` compares, less ``command``/``versions``).

    ``command`` is the caller's command line that redoes the merge (``merge_checkpoints.py`` builds it from its
    parser); None for a call through the Python API, whose arguments the record holds in full.
    """
    described = [describe_input(lab, d, i) for lab, d, i in zip(labels, dirs, indexes, strict=True)]
    return {
        "inputs": {"pretrained_model": labels[0], "finetuned_models": list(labels[1:]), "models": described},
        "merging_method_name": recipe.merging_method_name,
        "hyperparameters": recipe.mergelm_hyperparameters(),
        "seed": recipe.dare.seed if recipe.dare is not None else None,
        "recipe": recipe.record(statistics=False),  # statistics come from statistics_files
        "exclude_param_names_regex": list(exclude),
        "dtype": dtype or "same as the pretrained model",
        "vocab_policy": vocab_policy,
        "copy_config_from": copy_config_from,
        "max_shard_bytes": max_shard_bytes,
        "statistics_files": [str(Path(f).resolve()) for f in statistics_files or []],
        "command": command,
        "versions": versions(),
    }
