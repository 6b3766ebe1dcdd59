"""Time the streaming merger against mergekit and a naive in-memory merge, as whole processes.

Example:
    python benchmarks/merge_speed.py --size 271m --runs 3

The merge is DARE (p = 0.9, rescale) + task arithmetic (lambda = 1) of 2 fine-tunes into the base, bf16 out:

* ours: ``merge_checkpoints.py --merging_method_name mask_merging --mask_apply_method task_arithmetic``;
* mergekit: ``mergekit-yaml`` with ``dare_linear``, density = 1 - p, weight = lambda, normalize false (the same
  merge up to the random masks and mergekit's L1 rescale), run from its own virtualenv (``--mergekit_venv``,
  created on first use with ``pip install torch==2.13.0`` then ``pip install mergekit``);
* naive: every model loaded whole in float32, ``merge_state_dicts`` in memory, then saved (the original
  MergeLM approach, without transformers' model objects).

Runs are interleaved (ours, mergekit, naive, ours, ...) on warm page caches, each into a fresh output folder
(the previous run's output is deleted before the run, untimed; ``--replace_output`` times its replacement
instead) and after an ``os.sync()``; each process's peak RSS comes from ``wait4``. Results go to
``<work_dir>/results_<size>.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


logger = logging.getLogger(__name__)
DROP_RATE, SCALING = 0.9, 1.0
OUTPUT_DIRS = {"ours": "out_ours", "mergekit": "out_mergekit", "naive": "out_naive"}


def ensure_family(family: Path, size: str) -> None:
    """Generate the synthetic family in a child process.

    This process never imports torch: a child's peak RSS (``wait4``) includes the RSS of the parent it was forked
    from, so a lean parent keeps every measured process's figure its own.
    """
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "make_synthetic_llama.py"), "--size", size,
                    "--num_finetuned", "2", "--output_dir", str(family)], check=True)


def ensure_mergekit(venv: Path) -> Path:
    """``mergekit-yaml`` from ``venv``, creating the venv (CPU torch first, then mergekit) when missing."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit"], check=True)
    return exe


def mergekit_config(folders: Sequence[Path], path: Path) -> Path:
    models = "".join(f"  - model: {f}\n    parameters: {{weight: {SCALING}, density: {1 - DROP_RATE:.4g}}}\n"
                     for f in folders[1:])
    path.write_text(f"merge_method: dare_linear\nbase_model: {folders[0]}\nmodels:\n{models}"
                    "parameters: {normalize: false}\ndtype: bfloat16\n")
    return path


def ours_command(folders: Sequence[Path], output_dir: Path, *, device: str = "cpu",
                 threads: int | str | None = None) -> list[str]:
    """``merge_checkpoints.py`` for the benchmark's merge (DARE p, rescale, task arithmetic with lambda)."""
    cmd = [sys.executable, str(REPO_ROOT / "merge_checkpoints.py"), "--pretrained_model", str(folders[0]),
           "--finetuned_models", *map(str, folders[1:]), "--merging_method_name", "mask_merging",
           "--mask_apply_method", "task_arithmetic", "--weight_mask_rate", str(DROP_RATE), "--use_weight_rescale",
           "--scaling_coefficient", str(SCALING), "--device", device, "--output_dir", str(output_dir), "--overwrite",
           "--quiet"]
    return cmd + ["--num_threads", str(threads)] if threads else cmd


def commands(folders: Sequence[Path], work: Path, mergekit_exe: Path, threads: int | None) -> dict[str, list[str]]:
    ours = ours_command(folders, work / OUTPUT_DIRS["ours"], threads=threads)
    mergekit = [str(mergekit_exe), str(mergekit_config(folders, work / "mergekit.yml")),
                str(work / OUTPUT_DIRS["mergekit"]), "--no-copy-tokenizer", "--quiet"]
    naive = [sys.executable, __file__, "--naive_worker", *map(str, folders), str(work / OUTPUT_DIRS["naive"])]
    return {"ours": ours, "mergekit": mergekit, "naive": naive}


def run_process(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process; raises on failure.

    ``os.sync()`` first, so no run pays for writing back the previous run's output.
    """
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def summarize_runs(results: dict[str, list[tuple[float, int]]]) -> dict[str, dict]:
    """Per process name: every run's wall time and peak RSS, and their medians."""
    return {name: {"wall_s": [r[0] for r in runs], "peak_rss_bytes": [r[1] for r in runs],
                   "median_wall_s": statistics.median(r[0] for r in runs),
                   "median_peak_rss_bytes": statistics.median(r[1] for r in runs)} for name, runs in results.items()}


def naive_worker(folders: Sequence[str], output_dir: str) -> None:
    """Load every model whole in float32, merge in memory, save sharded (the original approach)."""
    import torch
    from safetensors.torch import load_file, save_file

    from model_merging_methods import merge_state_dicts

    def load(folder: str) -> dict:
        out = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            out.update({k: v.float() for k, v in load_file(file).items()})
        return out

    models = [load(f) for f in folders]
    merged = merge_state_dicts("mask_merging", models[0], models[1:], mask_apply_method="task_arithmetic",
                               weight_mask_rate=DROP_RATE, use_weight_rescale=True, scaling_coefficient=SCALING)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in merged.items()}, f"{output_dir}/model.safetensors")


def machine_description() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min) at the end")


def benchmark(size: str, runs: int, work: Path, mergekit_venv: Path, tools: Sequence[str],
              threads: int | None, replace_output: bool = False) -> dict:
    family = work / f"llama-{size}"
    folders = [family / "base", family / "ft1", family / "ft2"]
    if not all((f / "model.safetensors.index.json").exists() for f in folders):
        ensure_family(family, size)
    exe = ensure_mergekit(mergekit_venv) if "mergekit" in tools else Path("mergekit-yaml")
    cmds = commands(folders, work, exe, threads)
    results: dict[str, list[tuple[float, int]]] = {tool: [] for tool in tools}
    for run in range(runs):
        for tool in tools:
            if not replace_output:  # a fresh output folder: deleting the last run's output is not timed
                shutil.rmtree(work / OUTPUT_DIRS[tool], ignore_errors=True)
            results[tool].append(run_process(cmds[tool]))
            logger.info("run %d %s: %.1f s, %.2f GB", run + 1, tool, *results[tool][-1][:1],
                        results[tool][-1][1] / 1e9)
    return {"size": size, "runs": runs, "output": "replaced in the timed run" if replace_output else "fresh folder",
            "machine": machine_description(), "results": summarize_runs(results)}


def table(record: dict) -> str:
    res = record["results"]
    ours = res.get("ours")
    lines = ["| tool | median wall (s) | median peak RSS (GB) | wall vs ours | RSS vs ours |", "|---|---|---|---|---|"]
    for tool, r in res.items():
        ratio_wall = f"{r['median_wall_s'] / ours['median_wall_s']:.2f}x" if ours else "-"
        ratio_rss = f"{r['median_peak_rss_bytes'] / ours['median_peak_rss_bytes']:.2f}x" if ours else "-"
        lines.append(f"| {tool} | {r['median_wall_s']:.1f} | {r['median_peak_rss_bytes'] / 1e9:.2f} | {ratio_wall} "
                     f"| {ratio_rss} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="271m", help="271m, 1.1b or tiny (see make_synthetic_llama.py)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tools", nargs="+", default=["ours", "mergekit", "naive"])
    parser.add_argument("--num_threads", type=int, help="passed to ours")
    parser.add_argument("--replace_output", action="store_true",
                        help="each run replaces the previous run's output inside the timed process (ours: "
                             "--overwrite; mergekit: files overwritten in place); default: the previous output is "
                             "deleted, untimed, before each run")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "bench_runs"))
    parser.add_argument("--mergekit_venv", default=str(REPO_ROOT / ".venv-mergekit"))
    parser.add_argument("--naive_worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.naive_worker:
        naive_worker(args.naive_worker[:-1], args.naive_worker[-1])
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    record = benchmark(args.size, args.runs, work, Path(args.mergekit_venv), args.tools, args.num_threads,
                       args.replace_output)
    (work / f"results_{args.size}.json").write_text(json.dumps(record, indent=2))
    print(f"{args.size}, {record['runs']} runs, output {record['output']}, {record['machine']}\n{table(record)}")
    return record


if __name__ == "__main__":
    main()
