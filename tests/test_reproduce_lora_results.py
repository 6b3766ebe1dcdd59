"""scripts/reproduce_lora_results.sh --smoke end to end on a tiny BERT: LoRA adapters trained with PEFT, DARE sweeps on
their ΔW, PEFT's factor-wise sweeps and merges, our merges, and the tables; then again: the rerun computes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import save_tiny_glue_workspace

ROOT = Path(__file__).resolve().parents[1]


def _run_script(*args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_lora_results.sh"), "--jobs", "2", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_smoke_lora_reproduction_runs_every_step_and_resumes(tmp_path, shared_data_dir):
    save_tiny_glue_workspace(tmp_path, shared_data_dir)
    out = tmp_path / "out"
    args = ("--smoke", "--model", str(tmp_path / "tiny-bert"), "--glue_dir", str(tmp_path / "glue"),
            "--output_dir", str(out))
    log = _run_script(*args)
    for step in ("LoRA adapters (rank 8) for rte, mrpc", "|delta W| of the adapters",
                 "drop-rate sweeps on each adapter", "PEFT's factor-wise DARE",
                 "pairwise merges of the adapters without DARE", "pairwise merges with DARE", "tables", "done"):
        assert step in log
    adapters = sorted(out.glob("train_plms_glue/*/tiny-bert/*lora_rank=8*/model/adapter_config.json"))
    assert len(adapters) == 2
    ranges = json.loads((out / "delta_ranges" / "delta_ranges.json").read_text())
    assert len(ranges) == 2 and all(0 < r["p50"] <= r["p90"] <= r["p99"] <= r["max"] for r in ranges)
    summary = json.loads((out / "summary" / "summary.json").read_text())
    variants = {row["variant"] for row in summary["dare_sweep"]}
    assert variants == {"DARE-n16", "DropOnly-n16", "DropOnly-magnitude-n16", "PEFT dare_linear (factors)-n16"}
    columns = set(summary["merging"][0])
    assert {"average_merging", "task_arithmetic +DARE", "ties_merging +DARE", "PEFT linear", "PEFT dare_linear",
            "PEFT ties", "PEFT dare_ties"} <= columns
    contrasts = {row["contrast"] for row in summary["factorwise_contrast"]}
    assert contrasts == {"task_arithmetic +DARE - PEFT dare_linear", "ties_merging +DARE - PEFT dare_ties"}
    dare_row = next(r for r in summary["dare_sweep"] if r["variant"] == "DARE-n16")
    assert len(dare_row["p=0.5"]["values"]) == 2  # two mask seeds

    before = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    _run_script(*args, "--steps", "sweep merge")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == before
