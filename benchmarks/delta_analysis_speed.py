"""Time the delta analysis and the homology preflight against the DARE merge, as whole processes.

Example:
    python benchmarks/delta_analysis_speed.py --size 1.1b --runs 3

On the synthetic family of ``make_synthetic_llama.py`` (base + 2 fine-tunes, bf16, deltas N(0, 0.002)), runs
interleaved, warm page caches, ``os.sync()`` before each, peak RSS of each process from ``wait4``:

* merge: ``merge_checkpoints.py`` DARE p = 0.9 + task arithmetic (``merge_speed.py``'s merge) with
  ``--skip_homology_check``;
* merge+preflight: the same merge with the homology preflight (the CLI's default);
* analysis: ``analyze_deltas.py`` on the same three models (plots and reports included);
* preflight alone: ``check_homology`` timed inside a process, after its imports (reported apart: a fresh
  process imports torch there; inside the merge CLI, which has imported torch already, ``delta_analysis`` adds
  about 0.01 s and the preflight never loads Numba).

Targets: analysis wall <= 1.5 x merge wall, analysis peak RSS < 1 GB, preflight a few percent of a merge.
Results go to ``<work_dir>/delta_analysis_<size>.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.merge_speed import (  # noqa: E402
    ensure_family,
    machine_description,
    ours_command,
    run_process,
    summarize_runs,
)

logger = logging.getLogger(__name__)


def commands(folders: Sequence[Path], work: Path) -> dict[str, list[str]]:
    merge = ours_command(folders, work / "out_merge")
    analysis = [sys.executable, str(REPO_ROOT / "analyze_deltas.py"), "--pretrained_model", str(folders[0]),
                "--finetuned_models", *map(str, folders[1:]), "--output_dir", str(work / "out_analysis"),
                "--overwrite", "--quiet"]
    return {"merge": [*merge, "--skip_homology_check"], "merge+preflight": merge, "analysis": analysis}


def preflight_worker(folders: Sequence[str]) -> None:
    """Print ``{"import_s", "check_s"}``: importing ``delta_analysis`` and one ``check_homology`` call."""
    start = time.perf_counter()
    from delta_analysis import check_homology

    imported = time.perf_counter()
    check_homology(folders[0], list(folders[1:]))
    print(json.dumps({"import_s": imported - start, "check_s": time.perf_counter() - imported}))


def time_preflight(folders: Sequence[Path]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--preflight_worker", *map(str, folders)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def benchmark(size: str, runs: int, work: Path) -> dict:
    family = work / f"llama-{size}"
    folders = [family / "base", family / "ft1", family / "ft2"]
    if not all((f / "model.safetensors.index.json").exists() for f in folders):
        ensure_family(family, size)
    cmds = commands(folders, work)
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in cmds}
    preflight: list[dict[str, float]] = []
    for run in range(runs):
        for name, cmd in cmds.items():
            shutil.rmtree(work / "out_merge", ignore_errors=True)
            results[name].append(run_process(cmd))
            logger.info("run %d %s: %.1f s, %.2f GB", run + 1, name, results[name][-1][0], results[name][-1][1] / 1e9)
        preflight.append(time_preflight(folders))
        logger.info("run %d preflight: %s", run + 1, preflight[-1])
    summary = summarize_runs(results)
    merge = summary["merge"]["median_wall_s"]
    check = statistics.median(p["check_s"] for p in preflight)
    return {"size": size, "runs": runs, "machine": machine_description(), "results": summary,
            "preflight": {"runs": preflight, "median_check_s": check,
                          "median_import_s": statistics.median(p["import_s"] for p in preflight),
                          "check_percent_of_merge": 100 * check / merge,
                          "end_to_end_percent_of_merge": 100 * (summary["merge+preflight"]["median_wall_s"] - merge)
                          / merge},
            "analysis_vs_merge_wall": summary["analysis"]["median_wall_s"] / merge}


def table(record: dict) -> str:
    res, merge = record["results"], record["results"]["merge"]["median_wall_s"]
    lines = ["| process | wall (s), runs | median wall (s) | median peak RSS (GB) | wall vs merge |",
             "|---|---|---|---|---|"]
    for name, r in res.items():
        runs = ", ".join(f"{w:.1f}" for w in r["wall_s"])
        lines.append(f"| {name} | {runs} | {r['median_wall_s']:.1f} | {r['median_peak_rss_bytes'] / 1e9:.2f} | "
                     f"{r['median_wall_s'] / merge:.2f}x |")
    p = record["preflight"]
    lines.append(f"\npreflight alone: {p['median_check_s']:.3f} s = {p['check_percent_of_merge']:.1f} % of the merge "
                 f"(imports in a fresh process: {p['median_import_s']:.2f} s, mostly torch, which the merge imports "
                 "anyway); "
                 f"merge+preflight minus merge: {p['end_to_end_percent_of_merge']:+.1f} %")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.1b", help="271m, 1.1b or tiny (see make_synthetic_llama.py)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "bench_runs"))
    parser.add_argument("--preflight_worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.preflight_worker:
        preflight_worker(args.preflight_worker)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    record = benchmark(args.size, args.runs, work)
    (work / f"delta_analysis_{args.size}.json").write_text(json.dumps(record, indent=2))
    print(f"{args.size}, {record['runs']} runs, {record['machine']}\n{table(record)}")
    return record


if __name__ == "__main__":
    main()
