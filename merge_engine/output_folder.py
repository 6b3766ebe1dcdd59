"""The merged model's folder: location checks, the temporary work folder, side files, atomic publish.

Everything is written into ``<parent>/.<name>.incomplete/`` and renamed to ``<parent>/<name>`` only when the
last file is done, so a killed run never leaves a folder that looks complete. ``resume`` continues in the
same work folder if its ``merge_config.json`` describes the same merge, and a finished folder of the same merge
is left as it is (so a grid script can pass ``resume`` blindly).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)
MERGE_CONFIG = "merge_config.json"
# neither changes the merged tensors; the method's name, flat hyperparameters and seed are derived from "recipe";
# a LoRA output's retained energies are results, not settings
_UNCOMPARED_KEYS = ("versions", "command", "merging_method_name", "hyperparameters", "seed", "lora_retained_energy")


def work_dir_for(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.incomplete"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(output_dir: Path, input_dirs: Sequence[Path]) -> None:
    """Refuse an output folder inside (or equal to) an input folder, or one that contains an input folder."""
    for folder in input_dirs:
        if _inside(output_dir, folder) or _inside(work_dir_for(output_dir), folder):
            raise ValueError(f"output_dir must not lie inside an input model folder, got {output_dir} inside "
                             f"{folder}; choose a folder outside the inputs")
        if _inside(folder, output_dir):
            raise ValueError(f"output_dir must not contain an input model folder, got {output_dir} containing "
                             f"{folder}; choose another output folder")


def _differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    new = json.loads(json.dumps(new, default=str))
    return sorted(k for k in set(old) | set(new) if k not in _UNCOMPARED_KEYS and old.get(k) != new.get(k))


def _same_merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return not _differing_keys(old, new)


def finished_merge_matches(output_dir: Path, merge_config: Mapping[str, Any], *, overwrite: bool) -> bool:
    """For ``resume``: True when ``output_dir`` holds a finished merge with this record (nothing left to do).

    Raises:
        FileExistsError: ``output_dir`` holds a finished merge with another record, without ``overwrite``.
    """
    record_path = output_dir / MERGE_CONFIG
    if not record_path.is_file():
        return False
    differing = _differing_keys(json.loads(record_path.read_text("utf-8")), merge_config)
    if not differing:
        return True
    if overwrite:
        return False
    raise FileExistsError(f"{output_dir} holds a finished merge with other settings ({', '.join(differing)} differ "
                          f"from {record_path}); --resume only reuses the same merge: pass --overwrite to replace "
                          "it, or choose another output_dir")


def prepare_work_dir(output_dir: Path, merge_config: Mapping[str, Any], *, overwrite: bool, resume: bool) -> Path:
    """Create (or reopen with ``resume``) the work folder and record ``merge_config`` in it.

    Raises:
        FileExistsError: ``output_dir`` is not empty without ``overwrite``, or an interrupted run's work folder
            exists without ``resume``/``overwrite``.
        ValueError: ``resume`` of a work folder that belongs to a different merge.
    """
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass --overwrite to replace it")
    work = work_dir_for(output_dir)
    if work.exists() and resume:
        record_path = work / MERGE_CONFIG
        if not record_path.exists() or not _same_merge(json.loads(record_path.read_text("utf-8")), merge_config):
            raise ValueError(f"--resume needs the interrupted run's exact settings, got different ones than the "
                             f"run recorded in {record_path}; rerun with the same arguments or pass --overwrite")
        logger.info("resuming in %s", work)
        return work
    if work.exists() and not overwrite:
        raise FileExistsError(f"{work} holds an interrupted merge; pass --resume to continue it or --overwrite "
                              "to start again")
    if work.exists():
        shutil.rmtree(work)
    if resume:
        logger.info("--resume: no interrupted run in %s, starting from the first tensor", work)
    work.mkdir(parents=True)
    atomic_write_json(work / MERGE_CONFIG, merge_config)
    return work


def copy_side_files(work: Path, source_dir: Path, config_updates: Mapping[str, Any]) -> list[str]:
    """Copy config, generation config and tokenizer files from ``source_dir``; apply ``config_updates``."""
    copied = []
    for name in CONFIG_FILES + TOKENIZER_FILES:
        source = source_dir / name
        if not source.is_file():
            continue
        if name == "config.json" and config_updates:
            config = json.loads(source.read_text("utf-8"))
            config.update(config_updates)
            atomic_write_json(work / name, config)
        else:
            shutil.copyfile(source, work / name)
        copied.append(name)
    rows = config_updates.get("vocab_size")
    if rows is not None and any(n in copied for n in TOKENIZER_FILES):
        source_rows = json.loads((source_dir / "config.json").read_text("utf-8")).get("vocab_size")
        if source_rows != rows:
            logger.warning("tokenizer copied from %s (vocab_size %s) but the merged embeddings have %d rows; pass "
                           "--copy_config_from with the index of a model that has the added tokens", source_dir,
                           source_rows, rows)
    if "config.json" not in copied:
        logger.warning("%s has no config.json; the merged folder will not load with transformers", source_dir)
    return copied


def write_model_card(work: Path, merge_config: Mapping[str, Any]) -> None:
    """``README.md`` with the recipe: inputs, method, hyperparameters, and the command to redo it."""
    inputs = merge_config["inputs"]
    lines = [
        "---", "tags:", "- merge", "- dare", "---", "",
        f"# Merged model ({merge_config['merging_method_name']})", "",
        "Merged with the streaming DARE/merging engine (`merge_checkpoints.py`), arXiv:2311.03099.", "",
        f"* pretrained: `{inputs['pretrained_model']}`",
        *[f"* fine-tuned: `{name}`" for name in inputs["finetuned_models"]],
        f"* method: `{merge_config['merging_method_name']}`",
        f"* hyperparameters: `{json.dumps(merge_config['hyperparameters'], sort_keys=True)}`",
        f"* excluded parameters (regex): `{merge_config['exclude_param_names_regex']}`",
        f"* output dtype: `{merge_config['dtype']}`; vocabulary policy: `{merge_config['vocab_policy']}`", "",
        "## Reproduce", "",
        *(["```bash", merge_config["command"], "```"] if merge_config.get("command") else
          ["Merged through the Python API (`merge_engine.merge_checkpoints`), with the arguments recorded below."]),
        "", f"`{MERGE_CONFIG}` holds the full recipe and the software versions.", "",
    ]
    atomic_write_text(work / "README.md", "\n".join(lines))


def publish(work: Path, output_dir: Path) -> None:
    """Rename the finished work folder to ``output_dir`` (replacing an old one only at the very end)."""
    for path in work.iterdir():
        path.chmod(0o644)  # atomic writes go through mkstemp (0600); the model must be readable by servers
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old"
        if old.exists():
            shutil.rmtree(old)
        output_dir.rename(old)
    work.rename(output_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
