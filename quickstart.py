"""CPU quickstart: fine-tune all-MiniLM-L6-v2 on small GLUE tasks, sweep DARE drop rates, merge every pair.

Example:
    python quickstart.py                                  # data from the hub (nyu-mll/glue)
    python quickstart.py --glue_dir ../shared/data/glue   # or a local <task>/{train,validation}.jsonl folder

Steps (each is one of the project's scripts, called with capped samples so that the whole run fits in about
15 minutes on 2 CPU cores): ``train_plms_glue.py`` per task, ``inference_plms_glue.py`` with DARE at
``--weight_mask_rates``, ``merge_plms_glue.py`` for each pair with the five methods without and with DARE
(``--grid quick``, selected on validation), then ``summarize_results.py`` prints the tables and writes the plot.
Numbers from capped samples are far below full-data GLUE numbers; they show the pipeline, not the paper's scores.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import inference_plms_glue
import merge_plms_glue
import summarize_results
import train_plms_glue
from utils.glue_data import GLUE_TASK_NAMES
from utils.glue_merging import MERGING_METHODS
from utils.logging_setup import setup_logging

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language_model_name", default="all-MiniLM-L6-v2")
    parser.add_argument("--dataset_names", nargs="+", default=["sst2", "cola", "mrpc"], choices=GLUE_TASK_NAMES)
    parser.add_argument("--glue_dir", default=None, help="local GLUE folder (default: $MERGELM_GLUE_DIR, else hub)")
    parser.add_argument("--output_dir", default="results/quickstart")
    parser.add_argument("--max_train_samples", type=int, default=500)
    parser.add_argument("--max_eval_samples", type=int, default=100)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--num_epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--weight_mask_rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    parser.add_argument("--merging_methods", nargs="+", default=list(MERGING_METHODS), choices=MERGING_METHODS)
    parser.add_argument("--grid", default="quick", choices=["quick", "paper", "none"])
    parser.add_argument("--skip_merging", action="store_true")
    return parser.parse_args(argv)


def _common(args: argparse.Namespace) -> list[str]:
    flags = ["--language_model_name", args.language_model_name, "--output_dir", args.output_dir,
             "--max_eval_samples", str(args.max_eval_samples), "--max_seq_length", str(args.max_seq_length),
             "--batch_size", str(args.batch_size)]
    return flags + (["--glue_dir", args.glue_dir] if args.glue_dir else [])


def run_pipeline(args: argparse.Namespace) -> None:
    """Train, sweep and merge by calling each script's ``main``."""
    common, started = _common(args), time.time()
    pick = ["--learning_rate", str(args.learning_rate), "--max_train_samples", str(args.max_train_samples)]
    for task in args.dataset_names:
        train_plms_glue.main([*common, *pick, "--dataset_name", task, "--num_runs", "1",
                              "--num_epochs", str(args.num_epochs)])
        logger.info("quickstart: %s fine-tuned (%.0f s so far)", task, time.time() - started)
    inference_plms_glue.main([*common, *pick, "--dataset_names", *args.dataset_names, "--use_weight_rescale",
                              "--weight_mask_rate", *map(str, args.weight_mask_rates), "--overwrite"])
    logger.info("quickstart: drop-rate sweep done (%.0f s so far)", time.time() - started)
    if args.skip_merging or len(args.dataset_names) < 2:
        return
    merge_plms_glue.main([*common, *pick, "--dataset_names", *args.dataset_names, "--grid", args.grid,
                          "--merging_method_name", *args.merging_methods, "mask_merging",
                          "--mask_apply_method", *args.merging_methods, "--use_weight_rescale", "--overwrite"])
    logger.info("quickstart: merging done (%.0f s so far)", time.time() - started)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    started = time.time()
    run_pipeline(args)
    summary = summarize_results.summarize(args.output_dir)
    sys.stdout.write(summary["markdown"])
    sys.stdout.write(f"\nplots: {', '.join(str(p) for p in summary['plots'])}\n")
    sys.stdout.write(f"tables: {Path(summary['output_dir']) / 'summary.md'}; took {time.time() - started:.0f} s\n")
    return summary


if __name__ == "__main__":
    main()
