"""evaluate_generations.main end to end on small generation files for each dataset."""

from __future__ import annotations

import json

import pytest

import evaluate_generations
from evaluation.data import load_records


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_gsm8k_end_to_end(shared_data_dir, tmp_path, capsys):
    gens = write_jsonl(tmp_path / "g.jsonl", [
        {"idx": 0, "completion": "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\nThe answer is: 18"},
        {"idx": 1, "completion": "The answer is: 4"},  # gold is 3
        {"idx": 2, "completion": "She made 70000 dollars"},  # gold 70000; flexible only
    ])
    out = tmp_path / "pred.jsonl"
    metrics = evaluate_generations.main(["--dataset_name", "gsm8k", "--generations", gens, "--data_dir",
                                         str(shared_data_dir), "--output", str(out), "--quiet"])
    printed = last_json_line(capsys)
    assert printed == metrics
    assert printed["accuracy"] == pytest.approx(1 / 3) and printed["accuracy_flexible"] == pytest.approx(2 / 3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["correct"] for r in rows] == [True, False, False]


def test_math_end_to_end(shared_data_dir, tmp_path, capsys):
    gens = write_jsonl(tmp_path / "g.jsonl", [{"idx": 0, "completion": "x = 2 and x = -3.\nThe answer is: 2."}])
    evaluate_generations.main(["--dataset_name", "MATH", "--generations", gens, "--data_dir", str(shared_data_dir),
                               "--quiet"])
    assert last_json_line(capsys)["accuracy"] == 1.0


def test_human_eval_end_to_end(tmp_path, capsys):
    problems = {p["task_id"]: p for p in load_records("human_eval")}
    good = problems["HumanEval/0"]
    fenced = "Here is the code:\n```python\n" + good["prompt"] + good["canonical_solution"] + "```\nDone."
    gens = write_jsonl(tmp_path / "g.jsonl", [
        {"task_id": "HumanEval/0", "completion": fenced},
        {"task_id": "HumanEval/1", "completion": "```python\ndef separate_paren_groups(s):\n    return []\n```"},
    ])
    evaluate_generations.main(["--dataset_name", "human_eval", "--generations", gens, "--allow_code_execution",
                               "--num_workers", "2", "--quiet"])
    assert last_json_line(capsys) == {"pass@1": 0.5, "num_examples": 2}


def test_mbpp_end_to_end(shared_data_dir, tmp_path, capsys):
    records = {r["task_id"]: r for r in load_records("mbpp", shared_data_dir)}
    gens = write_jsonl(tmp_path / "g.jsonl", [
        {"task_id": 11, "completion": "```python\n" + records[11]["code"] + "\n```"},
        {"task_id": 12, "completion": "def sort_matrix(m):\n    return m"},
    ])
    evaluate_generations.main(["--dataset_name", "mbpp", "--generations", gens, "--data_dir", str(shared_data_dir),
                               "--allow_code_execution", "--quiet"])
    assert last_json_line(capsys) == {"pass@1": 0.5, "num_examples": 2}


def test_code_without_opt_in_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--allow_code_execution"):
        evaluate_generations.main(["--dataset_name", "mbpp", "--generations", str(tmp_path / "missing.jsonl")])


def test_bad_generation_files(shared_data_dir, tmp_path):
    base = ["--dataset_name", "gsm8k", "--data_dir", str(shared_data_dir), "--quiet", "--generations"]
    with pytest.raises(ValueError, match="appears twice"):
        evaluate_generations.main(base + [write_jsonl(tmp_path / "a.jsonl", [{"idx": 0, "completion": "x"}] * 2)])
    with pytest.raises(ValueError, match="not in the gsm8k test set"):
        evaluate_generations.main(base + [write_jsonl(tmp_path / "b.jsonl", [{"idx": 5000, "completion": "x"}])])
    with pytest.raises(ValueError, match="must have 'idx' and 'completion'"):
        evaluate_generations.main(base + [write_jsonl(tmp_path / "c.jsonl", [{"task_id": 0, "completion": "x"}])])
