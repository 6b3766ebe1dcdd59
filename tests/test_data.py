"""Local data resolution (both layouts, both MATH formats), the missing-data error and data preparation."""

from __future__ import annotations

import json

import pytest

import evaluation.data as data
import prepare_math_code_data
from evaluation.data import load_records, normalize_math_record


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "math_code_data")


def test_missing_data_lists_the_paths_tried(tmp_path, no_default_data):
    with pytest.raises(FileNotFoundError) as info:
        load_records("gsm8k", tmp_path / "elsewhere")
    message = str(info.value)
    assert str(tmp_path / "elsewhere" / "gsm8k" / "gsm8k_test.jsonl") in message
    assert str(tmp_path / "math_code_data" / "gsm8k_test.jsonl") in message
    assert "prepare_math_code_data.py" in message and "MERGELM_DATA_DIR" in message


def test_flat_mergelm_layout_and_env_var(tmp_path, no_default_data, monkeypatch):
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"question": "q", "answer": "a\n#### 3"}) + "\n")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert load_records("gsm8k") == [{"question": "q", "answer": "a\n#### 3"}]


def test_both_math_formats_are_normalised():
    hendrycks = {"problem": "p", "solution": "s", "type": "Algebra"}
    mergelm = {"idx": "hendrycks_math_1", "instruction": "p", "output": "s", "input": "", "type": "Algebra"}
    assert normalize_math_record(hendrycks) == hendrycks
    assert normalize_math_record(mergelm) == {"idx": "hendrycks_math_1", "problem": "p", "solution": "s",
                                              "input": "", "type": "Algebra"}
    with pytest.raises(ValueError, match="problem/solution"):
        normalize_math_record({"question": "q"})


def test_bad_records_are_rejected(tmp_path, no_default_data):
    (tmp_path / "mbpp.test.jsonl").write_text('{"task_id": 11}\n')
    with pytest.raises(ValueError, match="must have fields"):
        load_records("mbpp", tmp_path)


def test_prepare_from_data_dir_writes_mergelm_files(shared_data_dir, tmp_path, no_default_data):
    out = tmp_path / "math_code_data"
    written = prepare_math_code_data.main(["--data_dir", str(shared_data_dir), "--output_dir", str(out)])
    assert sorted(p.split("/")[-1] for p in written.values()) == [
        "MATH_test.jsonl", "alpaca_eval.json", "gsm8k_test.jsonl", "mbpp.test.jsonl"]
    # the GSM8K file round-trips byte for byte
    assert (out / "gsm8k_test.jsonl").read_bytes() == (shared_data_dir / "gsm8k" / "gsm8k_test.jsonl").read_bytes()
    first = json.loads((out / "MATH_test.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"idx", "instruction", "output", "input", "type"} and first["idx"] == "hendrycks_math_1"
    assert [r["problem"] for r in load_records("MATH", out)] == [
        r["problem"] for r in load_records("MATH", shared_data_dir)]
    assert len(load_records("alpaca_eval", out)) == 805
    assert load_records("mbpp", out) == load_records("mbpp", shared_data_dir)
