"""Code-execution throughput on MBPP's 500 reference solutions (samples per second) with 1 and 2 workers.

Every sample is a fresh sandboxed process (see evaluation/code_execution.py), so the number measures process
start-up plus the tests themselves. Prints a markdown table.

Example:
    python benchmarks/code_execution_speed.py --data_dir ../shared/data --workers 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.code_execution import PASSED, execute_programs  # noqa: E402
from evaluation.data import load_records  # noqa: E402
from evaluation.scoring import mbpp_program  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="folder with mbpp/mbpp.test.jsonl")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout_s", type=float, default=10.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    records = load_records("mbpp", args.data_dir)
    programs = [mbpp_program(r, r["code"]) for r in records]
    rows = []
    for workers in args.workers:
        start = time.perf_counter()
        results = execute_programs(programs, allow_code_execution=True, num_workers=workers,
                                   timeout_s=args.timeout_s, show_progress=False)
        seconds = time.perf_counter() - start
        rows.append({"workers": workers, "samples": len(programs), "seconds": seconds,
                     "samples_per_s": len(programs) / seconds, "passed": sum(r == PASSED for r in results)})
    print("| workers | samples | passed | wall time (s) | samples/s |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['workers']} | {row['samples']} | {row['passed']} | {row['seconds']:.1f} | "
              f"{row['samples_per_s']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
