"""Which model folders can share one loaded model: the same weight files, and tokenizers that decode alike.

A merged grid point has one folder per merged task (``llms.llm_merging.make_task_view``): hard links to the same
weight files plus that task's own tokenizer. Loading the model once per folder costs one cold start per dataset
(1-2 min for a 13B vLLM engine), so the generation drivers load it once for every folder with the same weights:

* same weights (:func:`weights_key`): the folders hold the same weight-side files (``config.json``,
  ``generation_config.json``, the safetensors / bin shards and their index, GGUF files), each the same file on disk
  (same device, inode, size and modification time: a hard link, or a symbolic link to it). A copy with equal bytes
  counts as other weights (nothing is read to compare). A hub id or a file is its own key.
* Hugging Face backend: the model is loaded once per weights and each folder's own tokenizer encodes, batches and
  decodes that folder's prompts, so the texts are those of a model loaded from that folder
  (``evaluation.generation``).
* vLLM: an engine detokenises its output (and matches the stop strings) with the tokenizer of the folder it was
  started from, so another folder joins it only when its tokenizer decodes alike (:func:`decoding_key`: the same
  token for every id, the same special tokens, the same decoder). That folder's prompts are tokenised with its own
  tokenizer and given to the engine as token ids (:func:`engine_prompts`), so the model reads exactly what an
  engine started from that folder would read. A folder with other weights, or with a tokenizer that decodes
  differently, gets its own engine (and, vLLM holding one engine per process, its own process).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: files that carry the model itself (what a view of a merged model hard-links), by suffix and by name
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
WEIGHT_FILE_NAMES = ("config.json", "generation_config.json")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(item for item in folder.iterdir()
                  if item.is_file() and (item.name in WEIGHT_FILE_NAMES or item.name.endswith(WEIGHT_FILE_SUFFIXES)))


def weights_key(model_path: str) -> tuple[Any, ...]:
    """Identity of the weights a model path loads: for a folder, ``(name, device, inode, size, mtime)`` of each
    weight-side file (equal for folders of hard links to the same files); otherwise the resolved path (or the hub
    id)."""
    path = Path(model_path)
    files = _weight_files(path) if path.is_dir() else []
    if not files:
        return ("path", str(path.resolve()) if path.exists() else model_path)
    identities = []
    for item in files:
        status = item.stat()  # follows a symbolic link to the file it names
        # size and modification time too: a deleted model's inode numbers can be reused by the next one's files
        identities.append((item.name, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns))
    return ("files", tuple(identities))


def load_tokenizer(model_path: str) -> Any:
    """The folder's tokenizer as vLLM and ``AutoTokenizer`` load it (no padding changes)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def decoding_key(model_path: str) -> tuple[Any, ...]:
    """What decides how a tokenizer turns generated ids into text: the token of every id, the special ids (skipped
    when decoding), the decoder and the clean-up flag. A path that is not a folder is its own key."""
    if not Path(model_path).is_dir():
        return ("path", model_path)
    tokenizer = load_tokenizer(model_path)
    tokens = tuple(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else type(tokenizer).__name__
    return (tokens, tuple(sorted(tokenizer.all_special_ids)), json.dumps(decoder, sort_keys=True),
            bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)))


def can_share_model(loaded_path: str, model_path: str, *, same_decoding: bool) -> bool:
    """True when the model loaded from ``loaded_path`` can generate for ``model_path``: the same weights and, with
    ``same_decoding`` (vLLM: the engine decodes with its own tokenizer), tokenizers that decode alike."""
    if loaded_path == model_path:
        return True
    if weights_key(loaded_path) != weights_key(model_path):
        return False
    return not same_decoding or decoding_key(loaded_path) == decoding_key(model_path)


def group_by_model(model_paths: Sequence[str], *, same_decoding: bool) -> list[list[int]]:
    """Positions of ``model_paths`` grouped by the model they can share (:func:`can_share_model` with the group's
    first path, the one loaded); groups and their members in order of first appearance."""
    groups: list[list[int]] = []
    decodings: dict[str, tuple[Any, ...]] = {}
    weights = {path: weights_key(path) for path in dict.fromkeys(model_paths)}

    def decoding(path: str) -> tuple[Any, ...]:
        if path not in decodings:
            decodings[path] = decoding_key(path)
        return decodings[path]

    for position, path in enumerate(model_paths):
        for group in groups:
            first = model_paths[group[0]]
            if first == path or (weights[first] == weights[path]
                                 and (not same_decoding or decoding(first) == decoding(path))):
                group.append(position)
                break
        else:
            groups.append([position])
    return groups


def engine_prompts(prompts: Sequence[str], *, model_path: str, engine_path: str) -> list[str | Mapping[str, Any]]:
    """The inputs an engine started from ``engine_path`` gets for ``model_path``'s prompts: the texts themselves
    when the paths agree, else the token ids of ``model_path``'s own tokenizer (``{"prompt_token_ids": [...]}``,
    encoded as vLLM encodes a text prompt: special tokens added)."""
    if model_path == engine_path:
        return list(prompts)
    tokenizer = load_tokenizer(model_path)
    logger.info("%s: %d prompts tokenised with its own tokenizer for the engine of %s", model_path, len(prompts),
                engine_path)
    return [{"prompt_token_ids": tokenizer.encode(prompt)} for prompt in prompts]
