"""Score saved model generations for GSM8K, MATH, HumanEval or MBPP with the paper's post-processing.

The generations file is JSONL, one object per example: ``idx`` (0-based line of the test file) for gsm8k and
MATH, ``task_id`` for human_eval and mbpp, and ``completion`` (raw model text). The metrics are printed as one
JSON object on the last line of stdout (``accuracy`` for gsm8k/MATH, ``pass@1`` for code).

``--completion_format human_eval`` scores a standard human-eval samples file (function bodies, appended to the
prompt unchanged, as human-eval's ``evaluate_functional_correctness`` runs them); the default ``paper`` applies
the paper's post-processing to raw generations, which strips a body's leading indentation.

Example:
    python evaluate_generations.py --dataset_name gsm8k --generations gens.jsonl --data_dir ../shared/data
    python evaluate_generations.py --dataset_name mbpp --generations gens.jsonl --allow_code_execution \
        --num_workers 4 --output predictions.jsonl
    python evaluate_generations.py --dataset_name human_eval --generations samples.jsonl \
        --completion_format human_eval --allow_code_execution
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from common.run_dir import atomic_write_text
from evaluation.code_execution import DEFAULT_TIMEOUT_S, execution_user
from evaluation.data import load_records
from evaluation.generations_file import read_generations
from evaluation.scoring import score_completions
from evaluation.tasks import get_task

logger = logging.getLogger(__name__)
SCORED_DATASETS = ("gsm8k", "MATH", "human_eval", "mbpp")
COMPLETION_FORMATS = ("paper", "human_eval")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", required=True, choices=SCORED_DATASETS)
    parser.add_argument("--generations", required=True, help="JSONL with idx/task_id and completion")
    parser.add_argument("--data_dir", default=None, help="folder with the test files (else $MERGELM_DATA_DIR, "
                        "then math_code_data/)")
    parser.add_argument("--allow_code_execution", action="store_true",
                        help="required for human_eval/mbpp: runs model-generated code (use a container)")
    parser.add_argument("--allow_root_code_execution", action="store_true",
                        help="as root, run the code as root where switching to the user nobody is impossible")
    parser.add_argument("--num_workers", type=int, default=4, help="parallel code-execution processes")
    parser.add_argument("--timeout_s", type=float, default=DEFAULT_TIMEOUT_S, help="per-program time limit")
    parser.add_argument("--completion_format", choices=COMPLETION_FORMATS, default="paper",
                        help="paper: raw generations, cleaned with the paper's post-processing (default); "
                        "human_eval: a human-eval samples file, bodies appended to the prompt unchanged")
    parser.add_argument("--output", default=None, help="write per-example predictions to this JSONL file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    task = get_task(args.dataset_name)
    if task.unsafe_code and not args.allow_code_execution:
        raise ValueError(f"allow_code_execution must be set to score {task.name}, got False; pass "
                         "--allow_code_execution (it runs model-generated code; prefer a container)")
    if task.unsafe_code:
        execution_user(allow_root_code_execution=args.allow_root_code_execution)  # as root: fail before any work
    if args.completion_format == "human_eval" and task.name != "human_eval":
        raise ValueError(f"--completion_format human_eval applies to --dataset_name human_eval only, got "
                         f"{task.name}; drop the flag (the default 'paper' format is used)")
    records = load_records(task, args.data_dir)
    ids, records, completions = read_generations(task, args.generations, records)
    metrics, predictions = score_completions(
        task, records, completions, ids=ids, allow_code_execution=args.allow_code_execution,
        allow_root_code_execution=args.allow_root_code_execution, num_workers=args.num_workers,
        timeout_s=args.timeout_s, show_progress=not args.quiet,
        apply_postprocessing=args.completion_format == "paper",
    )
    if args.output:
        atomic_write_text(args.output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    logger.info("%s metrics: %s", task.name, metrics)
    print(json.dumps(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    from common.logging_setup import setup_logging

    setup_logging()
    main()
