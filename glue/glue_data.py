"""GLUE loading: task table, the hub or a local jsonl folder, MergeLM's 90/10 split, tokenisation, batching.

Sources, in order: an explicit ``glue_dir`` (or the ``MERGELM_GLUE_DIR`` environment variable) holding
``<task>/{train,validation}.jsonl`` (``validation_matched.jsonl`` for MNLI) in the hub's field names; otherwise
the hub dataset ``nyu-mll/glue`` through ``datasets``. As in MergeLM, GLUE's validation split is the test
split, and 10 % of the train split (a seed-0 permutation) is the validation split used for model selection.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

GLUE_DIR_ENV = "MERGELM_GLUE_DIR"
HUB_DATASET_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: text fields, label count (1 = regression), MergeLM task id, metric used for selection."""

    name: str
    text_keys: tuple[str, str | None]
    num_labels: int
    task_id: int
    primary_metric: str
    test_split: str = "validation"


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("sentence", None), 2, 0, "matthews_correlation"),
        GlueTask("sst2", ("sentence", None), 2, 1, "accuracy"),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2, 2, "averaged_scores"),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, 3, "averaged_scores"),
        GlueTask("qqp", ("question1", "question2"), 2, 4, "averaged_scores"),
        GlueTask("mnli", ("premise", "hypothesis"), 3, 5, "accuracy", test_split="validation_matched"),
        GlueTask("qnli", ("question", "sentence"), 2, 6, "accuracy"),
        GlueTask("rte", ("sentence1", "sentence2"), 2, 7, "accuracy"),
    )
}
GLUE_TASK_NAMES: tuple[str, ...] = tuple(GLUE_TASKS)


def get_glue_task(name: str) -> GlueTask:
    """The task record for ``name``; unknown names raise ``ValueError`` listing the choices."""
    if name not in GLUE_TASKS:
        raise ValueError(f"dataset_name must be one of {', '.join(GLUE_TASK_NAMES)}, got {name!r}")
    return GLUE_TASKS[name]


def resolve_glue_dir(glue_dir: str | os.PathLike | None = None) -> Path | None:
    """``glue_dir``, else ``$MERGELM_GLUE_DIR``, else None (load from the hub); a missing folder is an error."""
    candidate = glue_dir if glue_dir else os.environ.get(GLUE_DIR_ENV)
    if not candidate:
        return None
    path = Path(candidate)
    if not path.is_dir():
        raise FileNotFoundError(f"GLUE folder {path} does not exist; pass --glue_dir <folder with <task>/train.jsonl>")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_raw_splits(task_name: str, glue_dir: str | os.PathLike | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "test": [...]}`` records of one task (test = GLUE validation / validation_matched)."""
    task = get_glue_task(task_name)
    folder = resolve_glue_dir(glue_dir)
    if folder is not None:
        paths = {"train": folder / task.name / "train.jsonl", "test": folder / task.name / f"{task.test_split}.jsonl"}
        for path in paths.values():
            if not path.exists():
                raise FileNotFoundError(f"GLUE file {path} is missing; the folder needs <task>/train.jsonl and "
                                        f"<task>/{task.test_split}.jsonl in the hub's field names")
        logger.info("loading %s from %s", task.name, folder / task.name)
        return {split: _read_jsonl(path) for split, path in paths.items()}
    import datasets

    logger.info("loading %s from the hub dataset %s", task.name, HUB_DATASET_ID)
    hub = datasets.load_dataset(HUB_DATASET_ID, task.name)
    return {"train": list(hub["train"]), "test": list(hub[task.test_split])}


def split_train_validation(
    records: Sequence[dict[str, Any]], *, validation_ratio: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """MergeLM's split: ``perm = RandomState(seed).permutation(n)``; first ``int((1 - ratio) n)`` are train."""
    if not 0.0 < validation_ratio < 1.0:
        raise ValueError(f"validation_ratio must be in (0, 1), got {validation_ratio}")
    perm = np.random.RandomState(seed=seed).permutation(len(records))
    num_train = int((1 - validation_ratio) * len(records))
    return [records[i] for i in perm[:num_train]], [records[i] for i in perm[num_train:]]


@dataclass
class GlueSplits:
    """Tokenised features of one task: ``train``, ``validation`` (10 % of GLUE train), ``test`` (GLUE dev)."""

    task: GlueTask
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]


def tokenize_records(
    records: Sequence[dict[str, Any]], tokenizer: Any, task: GlueTask, *, max_seq_length: int = 128
) -> list[dict[str, Any]]:
    """Tokenise without padding; every feature keeps ``labels`` and ``dataset_ids`` (the MergeLM task id)."""
    if not records:
        return []
    key1, key2 = task.text_keys
    first = [r[key1] for r in records]
    second = [r[key2] for r in records] if key2 else None
    encoded = tokenizer(text=first, text_pair=second, max_length=max_seq_length, truncation=True)
    features = []
    for i, record in enumerate(records):
        feature = {name: values[i] for name, values in encoded.items()}
        feature["labels"] = float(record["label"]) if task.num_labels == 1 else int(record["label"])
        feature["dataset_ids"] = task.task_id
        features.append(feature)
    return features


def load_glue_task(
    task_name: str,
    tokenizer: Any,
    *,
    glue_dir: str | os.PathLike | None = None,
    max_seq_length: int = 128,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_validation_samples: int | None = None,
) -> GlueSplits:
    """Load, split (90/10, seed 0), cap and tokenise one task.

    Args:
        max_train_samples: keep the first n examples of the (permuted) train part; None keeps all.
        max_eval_samples: keep the first n examples of the validation part and of the test split; None keeps all.
        max_validation_samples: keep the first n examples of the validation part only (after
            ``max_eval_samples``), so model selection on a large task stays cheap while test stays whole.
    """
    task = get_glue_task(task_name)
    raw = load_raw_splits(task_name, glue_dir)
    train, validation = split_train_validation(raw["train"])
    test = raw["test"]
    if max_train_samples is not None:
        train = train[:max_train_samples]
    if max_eval_samples is not None:
        validation, test = validation[:max_eval_samples], test[:max_eval_samples]
    if max_validation_samples is not None:
        validation = validation[:max_validation_samples]
    logger.info("%s: %d train / %d validation / %d test examples", task_name, len(train), len(validation), len(test))
    tok = lambda rows: tokenize_records(rows, tokenizer, task, max_seq_length=max_seq_length)
    return GlueSplits(task=task, train=tok(train), validation=tok(validation), test=tok(test))


class GlueCollator:
    """Pads a list of features into a batch dict of tensors (``labels`` float for regression tasks)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in features[0]:
                rows = [list(f[key]) + [pad] * (length - len(f[key])) for f in features]
                batch[key] = torch.tensor(rows, dtype=torch.long)
        labels = [f["labels"] for f in features]
        is_float = any(isinstance(v, float) for v in labels)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if is_float else torch.long)
        batch["dataset_ids"] = torch.tensor([f["dataset_ids"] for f in features], dtype=torch.long)
        return batch


class LengthGroupedBatches:
    """Shuffled batches of similar-length examples (``group_by_length`` of the transformers Trainer).

    Every epoch: a fresh permutation, cut into chunks of ``chunk_batches`` batches, each chunk sorted by length
    and cut into batches, the batch order shuffled. Batches stay random while padding (and time) drops: on
    RTE, random batches of 16 pad to 2.4x the mean length.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, chunk_batches: int = 50) -> None:
        self.lengths, self.batch_size, self.chunk = list(lengths), batch_size, batch_size * chunk_batches
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start:start + self.chunk], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        for index in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[index]


def make_dataloader(
    features: Sequence[dict[str, Any]], tokenizer: Any, *, batch_size: int, shuffle: bool = False, seed: int = 0,
    sort_by_length: bool = False, group_by_length: bool = False,
) -> DataLoader:
    """A DataLoader with dynamic padding; shuffling uses its own generator seeded with ``seed``.

    ``sort_by_length`` (evaluation only) batches examples of similar length together, which cuts padding (about
    3x faster on GLUE dev sets on a CPU); the metrics do not depend on example order. ``group_by_length``
    (training, with ``shuffle``) draws random batches of similar-length examples (:class:`LengthGroupedBatches`).
    """
    if shuffle and sort_by_length:
        raise ValueError("shuffle and sort_by_length are exclusive: sort only evaluation loaders")
    if group_by_length and not shuffle:
        raise ValueError("group_by_length needs shuffle=True (it draws random batches); use sort_by_length to "
                         "evaluate")
    rows = sorted(features, key=lambda f: len(f["input_ids"])) if sort_by_length else list(features)
    if group_by_length:
        batches = LengthGroupedBatches([len(f["input_ids"]) for f in rows], batch_size, seed)
        return DataLoader(rows, batch_sampler=batches, collate_fn=GlueCollator(tokenizer))
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=GlueCollator(tokenizer))
