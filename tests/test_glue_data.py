"""GLUE loading from a local folder and from the hub, MergeLM's split, tokenisation and padding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glue import glue_data
from glue.encoder_models import load_tokenizer


def test_local_folder_sizes_match_mergelm_split(shared_data_dir):
    raw = glue_data.load_raw_splits("rte", shared_data_dir / "glue")
    train, validation = glue_data.split_train_validation(raw["train"])
    # 2490 train examples -> int(0.9 * 2490) = 2241 / 249; test = GLUE validation (277)
    assert (len(train), len(validation), len(raw["test"])) == (2241, 249, 277)
    perm = np.random.RandomState(0).permutation(2490)
    assert train[0] == raw["train"][perm[0]] and validation[-1] == raw["train"][perm[-1]]


def test_mnli_test_split_is_validation_matched(shared_data_dir, monkeypatch):
    monkeypatch.setenv(glue_data.GLUE_DIR_ENV, str(shared_data_dir / "glue"))
    raw = glue_data.load_raw_splits("mnli")
    assert len(raw["test"]) == 9815


def test_hub_source_is_used_without_a_folder(monkeypatch):
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        row = {"sentence1": "a b", "sentence2": "c", "label": 1, "idx": 0}
        return {"train": [row] * 10, "validation": [row] * 3}

    import datasets

    monkeypatch.delenv(glue_data.GLUE_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = glue_data.load_raw_splits("rte")
    assert calls == [("nyu-mll/glue", "rte")]
    assert (len(raw["train"]), len(raw["test"])) == (10, 3)


def test_missing_folder_and_unknown_task_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        glue_data.load_raw_splits("rte", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="rte/train.jsonl"):
        glue_data.load_raw_splits("rte", tmp_path)
    with pytest.raises(ValueError, match="dataset_name must be one of"):
        glue_data.get_glue_task("glue")


def test_tokenised_pairs_keep_token_type_ids_and_pad(tmp_path):
    folder = tmp_path / "stsb"
    folder.mkdir()
    rows = [{"sentence1": f"a man plays {i}", "sentence2": "x" * (i + 1), "label": i / 2, "idx": i} for i in range(20)]
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    data = glue_data.load_glue_task("stsb", tokenizer, glue_dir=tmp_path, max_train_samples=5, max_eval_samples=4)
    assert (len(data.train), len(data.validation), len(data.test)) == (5, 2, 4)
    batch = next(iter(glue_data.make_dataloader(data.test, tokenizer, batch_size=4)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "dataset_ids"}
    assert batch["labels"].dtype.is_floating_point and batch["dataset_ids"].tolist() == [3] * 4
    assert batch["token_type_ids"].max().item() == 1  # the second sentence is segment 1
    assert batch["input_ids"].shape == batch["attention_mask"].shape
