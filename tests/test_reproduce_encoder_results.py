"""scripts/reproduce_encoder_results.sh --smoke end to end on a tiny BERT, then again: the rerun computes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import save_tiny_glue_workspace

ROOT = Path(__file__).resolve().parents[1]


def _run_script(*args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = ROOT / "scripts" / "reproduce_encoder_results.sh"
    done = subprocess.run(["bash", str(script), "--jobs", "2", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_smoke_reproduction_runs_every_step_and_resumes(tmp_path, shared_data_dir):
    save_tiny_glue_workspace(tmp_path, shared_data_dir)
    args = ("--smoke", "--model", str(tmp_path / "tiny-bert"), "--glue_dir", str(tmp_path / "glue"),
            "--output_dir", str(tmp_path / "out"))
    log = _run_script(*args)
    for step in ("fine-tune rte, mrpc, 2 at a time", "delta analysis", "drop-rate sweeps: DARE, DropOnly",
                 "extreme drop rates: DARE, DAREx-q", "pairwise merges without DARE", "pairwise merges with DARE",
                 "fine-tune every task with seeds 1", "sweeps of the fine-tuning seeds 1 at p = 0.0 0.99",
                 "pairwise merges of the fine-tuning seeds 1: task_arithmetic", "done"):
        assert step in log
    deltas = json.loads((tmp_path / "out" / "delta_analysis" / "analysis.json").read_text())
    assert len(deltas["models"]) == 2 and all(m["verdict"]["code"] for m in deltas["models"])
    summary = json.loads((tmp_path / "out" / "summary" / "summary.json").read_text())
    variants = {(row["task"], row["variant"]) for row in summary["dare_sweep"]}
    assert variants == {(t, v) for t in ("rte", "mrpc") for v in
                        ("DARE-n16", "DropOnly-n16", "DropOnly-magnitude-n16", "DARE-finetuned_weight-n16",
                         "DAREx-last_layer-n16")}
    dare_row = next(r for r in summary["dare_sweep"] if r["variant"] == "DARE-n16")
    assert len(dare_row["p=0.5"]["values"]) == 2  # two mask seeds
    merging = summary["merging"]
    assert {(r["target task"], r["fine-tuning seed"]) for r in merging} == {(t, s) for t in ("rte", "mrpc")
                                                                            for s in (0, 1)}
    columns = set(merging[0]) - {"pair", "target task", "fine-tuning seed"}
    methods = ("average_merging", "task_arithmetic", "fisher_merging", "fisher_merging (exact)", "regmean_merging",
               "ties_merging")
    assert columns == {c for m in methods for c in (m, f"{m} +DARE")}
    first, second = ([r for r in merging if r["fine-tuning seed"] == s] for s in (0, 1))
    assert all(len(r[f"{m} +DARE"]["values"]) == 2 for r in first for m in methods)  # two DARE seeds
    # fine-tuning seed 1: the cut (task arithmetic in the smoke run), plain and with both DARE seeds
    assert all(r["task_arithmetic"] is not None and len(r["task_arithmetic +DARE"]["values"]) == 2 for r in second)
    assert all(r["ties_merging"] is None for r in second)
    # the sweeps of fine-tuning seeds 0 and 1 at the rates both swept; the contrast resamples both
    sweep_seeds = {r["variant"]: r for r in summary["sweep_seeds"] if r["task"] == "rte"}
    assert set(sweep_seeds) == {"DARE-n16", "DropOnly-n16", "DropOnly-magnitude-n16"}
    assert set(sweep_seeds["DARE-n16"]) == {"task", "variant", "p=0.0", "p=0.99"}
    assert len(sweep_seeds["DARE-n16"]["p=0.99"]["values"]) == 2
    assert {r["fine-tuning seeds"] for r in summary["dare_effect"]} == {1, 2}
    metrics = sorted((tmp_path / "out").rglob("metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in metrics}

    rerun = _run_script(*args)
    assert rerun.count("already trained") == 4  # fine-tuning seeds 0 and 1 of two tasks
    # six merge calls (Fisher / the other four methods, each plain and per DARE seed), nothing left in any:
    # 2 Fisher runs (both estimators) and 4 others per call; then fine-tuning seed 1's three (task arithmetic)
    finished = re.findall(r"rte\+mrpc: (\d+) runs to compute, (\d+) finished", rerun)
    assert sorted(finished) == [("0", "1")] * 3 + [("0", "2")] * 3 + [("0", "4")] * 3
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "out").rglob("metrics.json"))} == before
    # the two named parts split the steps between them
    merges = _run_script(*args, "--part", "merges")
    assert "pairwise merges without DARE" in merges and "fine-tune" not in merges and "drop-rate" not in merges
    models = _run_script(*args, "--part", "models")
    assert "fine-tune" in models and "extreme drop rates" in models and "pairwise merges" not in models
    seeds = _run_script(*args, "--part", "seeds")
    assert "fine-tune every task with seeds 1" in seeds and "pairwise merges of the fine-tuning seeds" in seeds
    assert "delta analysis" not in seeds and "pairwise merges without DARE" not in seeds
