"""CPU quickstart: the paper's encoder story in minutes with all-MiniLM-L6-v2.

Example:
    python quickstart.py --glue_dir ../shared/data/glue   # a local <task>/{train,validation}.jsonl folder
    python quickstart.py                                  # data from the hub (nyu-mll/glue)

Steps (each is one of the project's scripts): ``train_plms_glue.py`` on SST-2 and STS-B (3,000 train examples,
2 epochs: both learn well above their majority-class score), ``inference_plms_glue.py`` with DARE and with
DropOnly (no rescale) over drop rates (the paper's headline contrast), ``merge_plms_glue.py`` on the pair with the
five methods without and with DARE (``--grid quick``, selected on validation), ``summarize_results.py`` for the
tables and plots, then one sentence of what the numbers show. Test scores use the first ``--max_eval_samples``
examples of each GLUE dev set. About 7 minutes on 2 CPU cores; the full reproduction is
``scripts/reproduce_encoder_results.sh``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import inference_plms_glue
import merge_plms_glue
import summarize_results
import train_plms_glue
from common.logging_setup import setup_logging
from glue.glue_data import GLUE_TASK_NAMES
from glue.glue_tables import mean_of
from model_merging_methods import merge_method_names

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language_model_name", default="all-MiniLM-L6-v2")
    parser.add_argument("--dataset_names", nargs="+", default=["sst2", "stsb"], choices=GLUE_TASK_NAMES)
    parser.add_argument("--glue_dir", default=None, help="local GLUE folder (default: $MERGELM_GLUE_DIR, else hub)")
    parser.add_argument("--output_dir", default="results/quickstart")
    parser.add_argument("--max_train_samples", type=int, default=3000)
    parser.add_argument("--max_eval_samples", type=int, default=500)
    parser.add_argument("--max_validation_samples", type=int, default=200, help="merge selection only")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--num_epochs", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--weight_mask_rates", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.9, 0.99],
                        help="drop rates of the DARE / DropOnly sweeps; 0.0 (the fine-tuned model, one test "
                             "evaluation per task) is added when missing, so the summary can always state the "
                             "fine-tuned score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="DARE / DropOnly mask seeds")
    parser.add_argument("--merging_methods", nargs="+", default=list(merge_method_names()),
                        choices=merge_method_names())
    parser.add_argument("--grid", default="quick", choices=["quick", "reduced", "paper", "none"])
    parser.add_argument("--skip_merging", action="store_true")
    args = parser.parse_args(argv)
    if 0.0 not in args.weight_mask_rates:  # the fine-tuned score the headline starts from (cheap: no drop)
        args.weight_mask_rates = [0.0, *args.weight_mask_rates]
    return args


def run_pipeline(args: argparse.Namespace) -> None:
    """Train, sweep and merge by calling each script's ``main`` (finished runs are reused)."""
    common = ["--language_model_name", args.language_model_name, "--output_dir", args.output_dir,
              "--max_seq_length", str(args.max_seq_length), "--batch_size", str(args.batch_size),
              "--learning_rate", str(args.learning_rate), "--max_train_samples", str(args.max_train_samples),
              *(["--glue_dir", args.glue_dir] if args.glue_dir else [])]
    evaluation = ["--max_eval_samples", str(args.max_eval_samples)]
    started = time.time()
    for task in args.dataset_names:
        train_plms_glue.main([*common, *evaluation, "--dataset_name", task, "--num_runs", "1", "--group_by_length",
                              "--num_epochs", str(args.num_epochs)])
        logger.info("quickstart: %s fine-tuned (%.0f s so far)", task, time.time() - started)
    for rescale in (["--use_weight_rescale"], []):
        inference_plms_glue.main([*common, *evaluation, "--dataset_names", *args.dataset_names, *rescale,
                                  "--weight_mask_rate", *map(str, args.weight_mask_rates),
                                  "--seeds", *map(str, args.seeds), "--resume"])
    logger.info("quickstart: DARE and DropOnly sweeps done (%.0f s so far)", time.time() - started)
    if args.skip_merging or len(args.dataset_names) < 2:
        return
    merge_plms_glue.main([*common, *evaluation, "--max_validation_samples", str(args.max_validation_samples),
                          "--dataset_names", *args.dataset_names, "--grid", args.grid,
                          "--merging_method_name", *args.merging_methods, "mask_merging",
                          "--mask_apply_method", *args.merging_methods, "--use_weight_rescale", "--seed",
                          str(args.seeds[0]), "--resume"])
    logger.info("quickstart: merging done (%.0f s so far)", time.time() - started)


def headline(tables: Mapping[str, Any]) -> str:
    """One sentence from the numbers: DARE vs DropOnly at the highest rate below 0.99, and DARE in merging.

    The fine-tuned score (``p=0.0``) starts each task's part when the sweep has it; without it the part gives only
    DARE and DropOnly."""
    header, rows = tables.get("dare_sweep", ([], []))
    rates = [float(h[2:]) for h in header[2:]]
    high = max([r for r in rates if 0.0 < r < 0.99], default=None)
    parts = []
    if high is not None:
        for task in sorted({row[0] for row in rows}):
            series = {re.sub(r"-n\d+$", "", row[1]): row[2:] for row in rows if row[0] == task}  # test-cap suffix
            if {"DARE", "DropOnly"} <= set(series):
                start = mean_of(series["DARE"][rates.index(0.0)]) if 0.0 in rates else None
                dare, drop = (mean_of(series[v][rates.index(high)]) for v in ("DARE", "DropOnly"))
                if None not in (dare, drop):
                    parts.append(f"{task} {'' if start is None else f'{start:.1f} -> '}"
                                 f"DARE {dare:.1f} / DropOnly {drop:.1f}")
    sentence = f"At drop rate {high}, " + "; ".join(parts) + "." if parts else "No drop-rate sweep to compare."
    effect = tables.get("dare_effect", ([], []))[1]
    if effect:
        changes = ", ".join(f"{row[0]} {row[2]:+.2f}" for row in effect)
        sentence += f" DARE before merging changed the merged test scores by (mean over cells, points) {changes}."
    return sentence


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_logging()
    started = time.time()
    run_pipeline(args)
    summary = summarize_results.summarize(args.output_dir)
    sys.stdout.write(summary["markdown"])
    sys.stdout.write(f"\nplots: {', '.join(str(p) for p in summary['plots'])}\n")
    sys.stdout.write(f"tables: {Path(summary['output_dir']) / 'summary.md'}; took {time.time() - started:.0f} s\n")
    summary["headline"] = headline(summary["tables"])
    sys.stdout.write(f"\nWhat it shows: {summary['headline']}\n")
    return summary


if __name__ == "__main__":
    main()
