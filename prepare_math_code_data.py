"""Fill ``math_code_data/`` with the test sets MergeLM reads, under MergeLM's file names.

Sources: the Hugging Face hub (``openai/gsm8k``, ``EleutherAI/hendrycks_math``, ``google-research-datasets/mbpp``,
``tatsu-lab/alpaca_eval``) or, offline, a ``--data_dir`` laid out like the shared data folder. Files are written
atomically: ``gsm8k_test.jsonl``, ``MATH_test.jsonl``, ``mbpp.test.jsonl``, ``alpaca_eval.json``.

Example:
    python prepare_math_code_data.py                           # from the hub
    python prepare_math_code_data.py --data_dir ../shared/data  # offline copy
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from evaluation.data import DEFAULT_DATA_DIR, find_data_file, load_records, load_records_from_hub
from evaluation.math_code_files import PREPARABLE_DATASETS, write_math_code_file

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="read from this local folder instead of the hub")
    parser.add_argument("--output_dir", default=str(DEFAULT_DATA_DIR), help="where to write (math_code_data/)")
    parser.add_argument("--datasets", nargs="+", default=list(PREPARABLE_DATASETS), choices=PREPARABLE_DATASETS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    written = {}
    for name in args.datasets:
        if args.data_dir is not None:
            source = find_data_file(name, args.data_dir)  # FileNotFoundError naming the paths tried
            if not source.resolve().is_relative_to(Path(args.data_dir).resolve()):
                raise FileNotFoundError(f"no {name} file in --data_dir {args.data_dir} (found only {source})")
            records = load_records(name, args.data_dir)
        else:
            records = load_records_from_hub(name)
        path = write_math_code_file(name, records, Path(args.output_dir))
        logger.info("wrote %d %s records to %s", len(records), name, path)
        written[name] = str(path)
    return written


if __name__ == "__main__":
    from common.logging_setup import setup_logging

    setup_logging()
    main()
