"""One model per process: run generation jobs in a fresh Python process.

vLLM cannot host two engines in one process (see ``evaluation.generation``), so each model is evaluated by
a child ``python -m evaluation.generation_subprocess --request request.json`` that writes the generations
files incrementally (``evaluation.generations_file.generate_to_jsonl``) and exits, freeing its GPUs. One child
runs every job of a model, one after the other: the engine started for the first job serves the others when
their folders hold the same weights (``evaluation.model_identity``), so a model with several datasets (or a merged
model's task folders) costs one engine start, not one per dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.generations_file import generate_to_jsonl, load_finished_generations
from evaluation.model_identity import group_by_model

logger = logging.getLogger(__name__)


def generation_job(
    examples: Sequence[Mapping[str, Any]],
    generations_path: str | os.PathLike,
    *,
    resume: bool = True,
    id_field: str = "id",
    settings: Mapping[str, Any] | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """One job of a request: :func:`generate_to_jsonl`'s arguments as JSON (``on_result`` cannot cross processes)."""
    if "on_result" in generate_kwargs:
        raise ValueError("on_result cannot be used with run_in_subprocess; read the generations file instead")
    return {"examples": [dict(e) for e in examples], "generations_path": os.path.abspath(generations_path),
            "resume": resume, "id_field": id_field, "settings": dict(settings) if settings is not None else None,
            "generate": generate_kwargs}


def _run_child(command: Sequence[str], *, cwd: str, env: Mapping[str, str], timeout_s: float | None) -> int:
    """Run the child process; its exit status."""
    return subprocess.run(list(command), cwd=cwd, env=dict(env), timeout=timeout_s, check=False).returncode


def run_jobs_in_subprocess(
    jobs: Sequence[Mapping[str, Any]], *, timeout_s: float | None = None, python: str = sys.executable
) -> list[list[dict[str, Any]]]:
    """Every job (:func:`generation_job`) in ONE fresh Python process, one after the other, so a model gets one
    engine (and its GPUs) for all of its datasets.

    The child writes each generations file incrementally; when it fails or is killed, what it finished stays in
    the files and a later call with ``resume=True`` continues each file from there (a finished job is not redone).

    Returns:
        Per job, the records of its examples in the order of its examples.
    Raises:
        RuntimeError: the child exited with a non-zero status.
    """
    repo_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="generation-request-") as tmp:
        request_path = Path(tmp, "request.json")
        request_path.write_text(json.dumps({"jobs": [dict(job) for job in jobs]}), encoding="utf-8")
        command = [python, "-m", "evaluation.generation_subprocess", "--request", str(request_path)]
        status = _run_child(command, cwd=repo_root, env=env, timeout_s=timeout_s)
    if status != 0:
        models = sorted({str(job["generate"].get("model_path")) for job in jobs})
        files = ", ".join(str(job["generations_path"]) for job in jobs)
        raise RuntimeError(
            f"generation subprocess for {', '.join(models)} exited with status {status} (its log is above); "
            f"finished examples are kept in {files}, rerun with resume=True"
        )
    results = []
    for job in jobs:
        records, _ = load_finished_generations(job["generations_path"], id_field=job["id_field"],
                                               settings=job["settings"])
        results.append([records[example[job["id_field"]]] for example in job["examples"]])
    return results


def run_in_subprocess(
    examples: Sequence[Mapping[str, Any]],
    generations_path: str | os.PathLike,
    *,
    resume: bool = True,
    id_field: str = "id",
    settings: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    python: str = sys.executable,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`generate_to_jsonl` in a fresh Python process, so the model gets its own vLLM engine and GPUs (one job
    of :func:`run_jobs_in_subprocess`).

    Raises:
        RuntimeError: the child exited with a non-zero status.
    """
    job = generation_job(examples, generations_path, resume=resume, id_field=id_field, settings=settings,
                         **generate_kwargs)
    return run_jobs_in_subprocess([job], timeout_s=timeout_s, python=python)[0]


def _finished_records(job: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The job's records when ``resume`` and its generations file already holds every example, else None."""
    if not job["resume"]:
        return None
    done, _ = load_finished_generations(job["generations_path"], id_field=job["id_field"], settings=job["settings"])
    if not all(example[job["id_field"]] in done for example in job["examples"]):
        return None
    logger.info("%s: all %d examples already generated", job["generations_path"], len(job["examples"]))
    return [done[example[job["id_field"]]] for example in job["examples"]]


def run_jobs(
    jobs: Sequence[Mapping[str, Any]], *, isolate: bool, timeout_s: float | None = None
) -> list[list[dict[str, Any]]]:
    """Run generation jobs (:func:`generation_job`), each model loaded once.

    Without ``isolate``: in this process, one after the other (``evaluation.generation`` keeps the last model
    loaded, also for another folder of the same weights). With ``isolate`` (vLLM): jobs whose files are complete
    are read back; the others are grouped by the model they can share (``evaluation.model_identity.group_by_model``:
    the same weight files and, for vLLM, tokenizers that decode alike) and each group runs in ONE child process
    (:func:`run_jobs_in_subprocess`): one engine start per model, not one per dataset.

    Returns:
        Per job, the records of its examples in the order of its examples.
    """
    if not isolate:
        return [generate_to_jsonl(job["examples"], job["generations_path"], resume=job["resume"],
                                  id_field=job["id_field"], settings=job["settings"], **job["generate"])
                for job in jobs]
    results: list[list[dict[str, Any]] | None] = [_finished_records(job) for job in jobs]
    todo = [position for position, records in enumerate(results) if records is None]
    same_decoding = any(jobs[position]["generate"].get("backend") == "vllm" for position in todo)
    groups = group_by_model([str(jobs[position]["generate"]["model_path"]) for position in todo],
                            same_decoding=same_decoding)
    for number, group in enumerate(groups, start=1):
        positions = [todo[member] for member in group]
        logger.info("generation process %d/%d: %d job(s) with the model of %s", number, len(groups), len(positions),
                    jobs[positions[0]]["generate"]["model_path"])
        for position, records in zip(positions, run_jobs_in_subprocess([jobs[p] for p in positions],
                                                                       timeout_s=timeout_s), strict=True):
            results[position] = records
    return results  # type: ignore[return-value]  # the groups partition todo: every position is filled


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evaluation.generation_subprocess --request request.json``.

    ``request.json`` = ``{"jobs": [job, ...]}``, run in order in this process, or a single job. A job =
    ``{"examples": [{"id", "prompt", ...}], "generations_path": str, "resume": bool, "id_field": str (default
    "id"), "settings": {...} or null (see ``generate_to_jsonl``), "generate": {keyword arguments of
    evaluation.generation.generate(): "model_path", "backend", "max_tokens", "stop", ...}}``.
    """
    from common.logging_setup import setup_logging

    parser = argparse.ArgumentParser(description="Generate completions for one model in this process.")
    parser.add_argument(
        "--request", required=True, help="JSON request file (see evaluation.generation_subprocess.main)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    request = json.loads(Path(args.request).read_text(encoding="utf-8"))
    jobs = request["jobs"] if "jobs" in request else [request]
    for number, job in enumerate(jobs, start=1):
        logger.info("generation job %d/%d: %s with %s", number, len(jobs), job["generations_path"],
                    job["generate"].get("model_path"))
        generate_to_jsonl(
            job["examples"],
            job["generations_path"],
            resume=job.get("resume", True),
            id_field=job.get("id_field", "id"),
            settings=job.get("settings"),
            **job["generate"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
