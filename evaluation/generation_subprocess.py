"""One model per process: run a generation job in a fresh Python process.

vLLM cannot host two engines in one process (see ``evaluation.generation``), so each model is evaluated by
a child ``python -m evaluation.generation_subprocess --request request.json`` that writes the generations
file incrementally (``evaluation.generations_file.generate_to_jsonl``) and exits, freeing its GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluation.generations_file import generate_to_jsonl, load_finished_generations


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
    """:func:`generate_to_jsonl` in a fresh Python process, so each model gets its own vLLM engine and GPUs.

    The child writes the generations file incrementally; when it fails or is killed, what it finished stays in
    the file and a later call with ``resume=True`` continues from there. ``on_result`` cannot cross processes.

    Raises:
        RuntimeError: the child exited with a non-zero status.
    """
    if "on_result" in generate_kwargs:
        raise ValueError("on_result cannot be used with run_in_subprocess; read the generations file instead")
    request = {
        "examples": [dict(e) for e in examples],
        "generations_path": os.path.abspath(generations_path),
        "resume": resume,
        "id_field": id_field,
        "settings": dict(settings) if settings is not None else None,
        "generate": generate_kwargs,
    }
    repo_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="generation-request-") as tmp:
        request_path = Path(tmp, "request.json")
        request_path.write_text(json.dumps(request), encoding="utf-8")
        command = [python, "-m", "evaluation.generation_subprocess", "--request", str(request_path)]
        completed = subprocess.run(command, cwd=repo_root, env=env, timeout=timeout_s, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"generation subprocess for {generate_kwargs.get('model_path')} exited with status {completed.returncode} "
            f"(its log is above); finished examples are kept in {generations_path}, rerun with resume=True"
        )
    records, _ = load_finished_generations(generations_path, id_field=id_field, settings=settings)
    return [records[example[id_field]] for example in examples]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evaluation.generation_subprocess --request request.json``.

    ``request.json`` = ``{"examples": [{"id", "prompt", ...}], "generations_path": str, "resume": bool,
    "id_field": str (default "id"), "settings": {...} or null (see ``generate_to_jsonl``), "generate": {keyword
    arguments of evaluation.generation.generate(): "model_path", "backend", "max_tokens", "stop", ...}}``.
    """
    from common.logging_setup import setup_logging

    parser = argparse.ArgumentParser(description="Generate completions for one model in this process.")
    parser.add_argument(
        "--request", required=True, help="JSON request file (see evaluation.generation_subprocess.main)"
    )
    args = parser.parse_args(argv)
    setup_logging()
    request = json.loads(Path(args.request).read_text(encoding="utf-8"))
    generate_to_jsonl(
        request["examples"],
        request["generations_path"],
        resume=request.get("resume", True),
        id_field=request.get("id_field", "id"),
        settings=request.get("settings"),
        **request["generate"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
