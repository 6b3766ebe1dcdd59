"""|ΔW| of LoRA adapters against the paper's SFT range, next to DARE's safety argument.

    python scripts/lora_delta_ranges.py --adapters A B ... --output_dir results/lora_reproduction/delta_ranges

For each adapter folder: the percentiles of |ΔW| = |scale·B·A| over every adapted weight (exact, computed one module
at a time), the share above 0.002 / 0.005 / 0.01, and the largest value; written as ``summary.md`` and
``delta_ranges.json``. The paper (Yu et al., arXiv:2311.03099) finds DARE safe for SFT deltas within about 0.002
(0.005 in its first version) and failing for deltas often above 0.01.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.run_dir import atomic_write_json, atomic_write_text  # noqa: E402
from model_merging_methods.lora import read_lora_adapter  # noqa: E402

PERCENTILES = (0.5, 0.9, 0.99)
THRESHOLDS = (0.002, 0.005, 0.01)


def delta_ranges(folder: str | Path) -> dict:
    """Percentiles (exact: from the sorted values), shares above the thresholds and the maximum of |ΔW|."""
    adapter = read_lora_adapter(folder)
    values = torch.cat([adapter.delta(name).abs().reshape(-1) for name in sorted(adapter.parameter_names())])
    ordered = values.sort().values
    record = {"adapter": str(folder), "numel": values.numel(), "max": float(ordered[-1])}
    for q in PERCENTILES:
        record[f"p{q * 100:g}"] = float(ordered[min(values.numel() - 1, int(q * values.numel()))])
    for t in THRESHOLDS:
        record[f"share > {t:g}"] = float((values > t).double().mean())
    return record


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", nargs="+", required=True)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    records = [delta_ranges(folder) for folder in args.adapters]
    keys = [k for k in records[0] if k != "adapter"]
    lines = ["# |ΔW| of the LoRA adapters", "", "| adapter | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + " | ".join([r["adapter"], *[f"{r[k]:.4g}" for k in keys]]) + " |" for r in records]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "delta_ranges.json", records)
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return records


if __name__ == "__main__":
    main()
