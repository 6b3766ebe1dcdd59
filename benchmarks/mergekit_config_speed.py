"""Time ``merge_checkpoints.py --config`` against ``mergekit-yaml`` on the same YAML files, as whole processes.

Example:
    python benchmarks/mergekit_config_speed.py --size 271m --runs 3

Two configurations of a synthetic bfloat16 Llama family (a base and two fine-tunes, ``make_synthetic_llama.py``):

* ``dare_ties``: density 0.3, weights 0.5 and 0.5, mergekit's defaults otherwise (L1 rescale, no normalize);
* ``ties_gradients``: TIES with a density gradient ``[0.2, 0.8]``, a weight gradient and a filtered weight
  (``mlp``), normalize on.

Both run with ``dtype: bfloat16`` and ``--random-seed 0``; mergekit is the one ``requirements-dev.txt`` installs
(``mergekit-yaml`` next to this Python), or ``--mergekit_exe``. Runs are interleaved (ours, mergekit, ours, ...)
on warm page caches, each into a fresh output folder (deleted before the run, untimed) after an ``os.sync()``;
peak RSS comes from ``wait4``. Results go to ``<work_dir>/mergekit_config_<size>.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.merge_speed import ensure_family, machine_description, run_process, summarize_runs  # noqa: E402

logger = logging.getLogger(__name__)

CONFIGS = {
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.3}}
dtype: bfloat16
""",
    "ties_gradients": """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      density: [0.2, 0.8]
      weight: [1.0, 0.5]
  - model: {ft2}
    parameters:
      density: 0.5
      weight: [{{filter: mlp, value: 0.7}}, {{value: 0.3}}]
parameters: {{normalize: true}}
dtype: bfloat16
""",
}


def write_configs(family: Path, work: Path) -> dict[str, Path]:
    paths = {}
    for name, template in CONFIGS.items():
        path = work / f"{name}.yml"
        path.write_text(template.format(base=family / "base", ft1=family / "ft1", ft2=family / "ft2"))
        paths[name] = path
    return paths


def commands(config: Path, work: Path, mergekit_exe: str, threads: int | None, device: str | None
             ) -> dict[str, list[str]]:
    ours = [sys.executable, str(REPO_ROOT / "merge_checkpoints.py"), "--config", str(config), "--output_dir",
            str(work / "out_ours"), "--random-seed", "0", "--quiet"]
    if threads:
        ours += ["--num_threads", str(threads)]
    mergekit = [mergekit_exe, str(config), str(work / "out_mergekit"), "--random-seed", "0", "--quiet",
                "--no-copy-tokenizer"]
    if device:
        ours += ["--device", device]
        mergekit += ["--cuda"] if device.startswith("cuda") else []
    return {"ours": ours, "mergekit": mergekit}


def benchmark(size: str, runs: int, work: Path, mergekit_exe: str, threads: int | None, configs: Sequence[str],
              device: str | None = None) -> dict:
    family = work / f"llama-{size}"
    if not all((family / m / "model.safetensors.index.json").exists() for m in ("base", "ft1", "ft2")):
        ensure_family(family, size)
    paths = write_configs(family, work)
    record = {"size": size, "runs": runs, "device": device or "cpu", "configs": {}}
    for name in configs:
        cmds = commands(paths[name], work, mergekit_exe, threads, device)
        results: dict[str, list[tuple[float, int]]] = {tool: [] for tool in cmds}
        for run in range(runs):
            for tool, cmd in cmds.items():
                shutil.rmtree(work / f"out_{tool}", ignore_errors=True)
                results[tool].append(run_process(cmd))
                logger.info("%s run %d %s: %.1f s, %.2f GB", name, run + 1, tool, results[tool][-1][0],
                            results[tool][-1][1] / 1e9)
                shutil.rmtree(work / f"out_{tool}", ignore_errors=True)  # 7B: two outputs and the inputs do not fit
        record["configs"][name] = summarize_runs(results)
    record["machine"] = machine_description()
    return record


def table(record: dict) -> str:
    lines = ["| config | tool | median wall (s) | median peak RSS (GB) | mergekit / ours, wall | "
             "mergekit / ours, RSS |", "|---|---|---|---|---|---|"]
    for name, res in record["configs"].items():
        ours, theirs = res["ours"], res["mergekit"]
        for tool, r in res.items():
            ratios = ("", "") if tool == "ours" else (
                f"{theirs['median_wall_s'] / ours['median_wall_s']:.2f}x",
                f"{theirs['median_peak_rss_bytes'] / ours['median_peak_rss_bytes']:.2f}x")
            lines.append(f"| {name} | {tool} | {r['median_wall_s']:.1f} | {r['median_peak_rss_bytes'] / 1e9:.2f} | "
                         f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="271m", help="271m, 1.1b, 7b or tiny (see make_synthetic_llama.py)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--num_threads", type=int, help="passed to ours")
    parser.add_argument("--device", help="cuda: ours with --device cuda, mergekit with --cuda")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "bench_runs"))
    parser.add_argument("--mergekit_exe", default=shutil.which("mergekit-yaml") or
                        str(Path(sys.executable).parent / "mergekit-yaml"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    record = benchmark(args.size, args.runs, work, args.mergekit_exe, args.num_threads, args.configs, args.device)
    suffix = f"_{args.device}" if args.device else ""
    (work / f"mergekit_config_{args.size}{suffix}.json").write_text(json.dumps(record, indent=2))
    print(f"{args.size}, {record['runs']} runs, {record['machine']}\n{table(record)}")
    return record


if __name__ == "__main__":
    main()
