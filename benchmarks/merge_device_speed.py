"""Time ``merge_checkpoints.py`` on the CPU and on a GPU (``--device cuda``) against reading the inputs once.

Example (on a machine with a CUDA GPU):
    python benchmarks/merge_device_speed.py --size 1.1b --runs 2 --devices cpu cuda --drop_caches

The merge is the one of ``merge_speed.py``: DARE (p = 0.9, rescale) + task arithmetic (lambda = 1) of 2
fine-tunes into the base, bf16 out. For each run the script times, as whole processes:

* ``read``: ``cat`` of every input shard to ``/dev/null``, the floor any merge that reads its inputs has;
* one merge per ``--devices`` entry (with ``--num_threads`` per device when given as ``cuda=8``), each into a
  fresh output folder (the previous run's output is deleted before it, untimed).

With ``--drop_caches`` (root only) the page cache is dropped before every process, so each one reads from the
disk ("cold"); without it inputs come from memory after the first run ("warm"). The outputs of the devices are
then compared tensor by tensor (largest absolute difference, number of differing elements). Results go to
``<work_dir>/device_results_<size>.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.merge_speed import ensure_family, ours_command, run_process, summarize_runs  # noqa: E402

logger = logging.getLogger(__name__)


def drop_page_cache() -> bool:
    """Write dirty pages back and drop the page cache (needs root); False when the kernel refuses."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        logger.warning("could not drop the page cache (%s): timings are warm", error)
        return False
    return True


def device_commands(folders: Sequence[Path], work: Path, devices: Sequence[str]) -> dict[str, list[str]]:
    shards = sorted(str(p) for folder in folders for p in folder.glob("*.safetensors"))
    cmds = {"read": ["cat", *shards]}
    for spec in devices:
        device, _, threads = spec.partition("=")
        output_dir = work / f"out_{spec.replace('=', '_').replace(':', '_')}"
        cmds[spec] = ours_command(folders, output_dir, device=device, threads=threads or None)
    return cmds


def compare_outputs(folders: Sequence[Path]) -> list[dict]:
    """Largest absolute difference and count of differing elements of each output against the first."""
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    reference = load(folders[0])
    rows = []
    for folder in folders[1:]:
        other = load(folder)
        max_diff, differing, total = 0.0, 0, 0
        for name, tensor in reference.items():
            diff = (other[name].float() - tensor.float()).abs()
            max_diff = max(max_diff, float(diff.max())) if diff.numel() else max_diff
            differing += int((diff != 0).sum())
            total += tensor.numel()
        rows.append({"output": folder.name, "against": folders[0].name, "max_abs_diff": max_diff,
                     "differing_elements": differing, "elements": total})
    return rows


def machine_description() -> str:
    description = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    try:
        import torch

        if torch.cuda.is_available():
            description += f", {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return description


def benchmark(size: str, runs: int, work: Path, devices: Sequence[str], cold: bool) -> dict:
    family = work / f"llama-{size}"
    folders = [family / "base", family / "ft1", family / "ft2"]
    if not all((f / "model.safetensors.index.json").exists() for f in folders):
        ensure_family(family, size)
    cmds = device_commands(folders, work, devices)
    input_bytes = sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in cmds}
    for run in range(runs):
        for name, cmd in cmds.items():
            if "--output_dir" in cmd:  # a fresh output folder: deleting the last run's output is not timed
                shutil.rmtree(cmd[cmd.index("--output_dir") + 1], ignore_errors=True)
            if cold:
                cold = drop_page_cache()
            results[name].append(run_process(cmd))
            logger.info("run %d %s: %.1f s, %.2f GB", run + 1, name, results[name][-1][0], results[name][-1][1] / 1e9)
    outputs = [Path(cmds[spec][cmds[spec].index("--output_dir") + 1]) for spec in devices]
    return {"size": size, "runs": runs, "cache": "cold" if cold else "warm", "input_bytes": input_bytes,
            "machine": machine_description(), "results": summarize_runs(results),
            "agreement": compare_outputs(outputs) if len(outputs) > 1 else []}


def table(record: dict) -> str:
    read = record["results"]["read"]["median_wall_s"]
    lines = ["| process | median wall (s) | input GB/s | vs reading the inputs | median peak RSS (GB) |",
             "|---|---|---|---|---|"]
    for name, r in record["results"].items():
        wall = r["median_wall_s"]
        lines.append(f"| {name} | {wall:.1f} | {record['input_bytes'] / wall / 1e9:.2f} | {wall / read:.2f}x "
                     f"| {r['median_peak_rss_bytes'] / 1e9:.2f} |")
    for row in record["agreement"]:
        lines.append(f"\n{row['output']} vs {row['against']}: max |diff| {row['max_abs_diff']:.3g}, "
                     f"{row['differing_elements']} of {row['elements']} elements differ")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.1b", help="271m, 1.1b or tiny (see make_synthetic_llama.py)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"],
                        help="merge devices, each optionally with a worker count: cpu cuda cuda=8")
    parser.add_argument("--drop_caches", action="store_true", help="cold page cache before every process (root)")
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "bench_runs"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.drop_caches and os.geteuid() != 0:
        raise SystemExit("--drop_caches needs root (it writes /proc/sys/vm/drop_caches); run without it for warm "
                         "page-cache timings")
    record = benchmark(args.size, args.runs, work, args.devices, args.drop_caches)
    (work / f"device_results_{args.size}.json").write_text(json.dumps(record, indent=2))
    print(f"{args.size}, {record['runs']} runs, {record['cache']} page cache, {record['machine']}, "
          f"inputs {record['input_bytes'] / 1e9:.2f} GB\n{table(record)}")
    return record


if __name__ == "__main__":
    main()
