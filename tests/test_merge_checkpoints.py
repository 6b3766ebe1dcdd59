"""merge_checkpoints.py CLI: end to end, and a kill mid-run followed by --resume (identical output)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, make_family, tiny_llama_config
from test_merge_engine import load_merged, reference_merge, save_sharded, state_dicts_of

import merge_checkpoints


@pytest.fixture
def folders(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    base, finetuned = make_family(LlamaForCausalLM, config)
    return [str(save_sharded(sd, tmp_path / name, config=config))
            for sd, name in zip(state_dicts_of([base, *finetuned]), ["base", "ft1", "ft2"], strict=True)]


def dare_args(folders, out) -> list[str]:
    return ["--pretrained_model", folders[0], "--finetuned_models", *folders[1:], "--merging_method_name",
            "mask_merging", "--mask_apply_method", "task_arithmetic", "--weight_mask_rate", "0.7",
            "--use_weight_rescale", "--scaling_coefficient", "0.8", "--seed", "5", "--max_shard_size", "30KB",
            "--output_dir", str(out), "--quiet"]


def run_cli(args: list[str], *, kill_after_shards: int | None = None) -> subprocess.CompletedProcess:
    """``merge_checkpoints.py args`` in a new process; with ``kill_after_shards`` it is SIGKILLed after that many
    finished shards (tests/kill_after_shards.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [str(REPO_ROOT / "merge_checkpoints.py")]
    if kill_after_shards is not None:
        command = [str(Path(__file__).with_name("kill_after_shards.py")), str(kill_after_shards)]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_main_merges_and_prints_summary(folders, tmp_path, capsys):
    summary = merge_checkpoints.main(dare_args(folders, tmp_path / "out"))
    assert "merged" in capsys.readouterr().out
    assert summary["tensors"] == 21 and summary["bytes"] > 0 and summary["peak_rss_bytes"] > 0
    hp = {"mask_apply_method": "task_arithmetic", "weight_mask_rate": 0.7, "use_weight_rescale": True,
          "scaling_coefficient": 0.8, "seed": 5}
    expected = reference_merge("mask_merging", hp, [Path(f) for f in folders], None)
    got = load_merged(tmp_path / "out")
    assert all((got[n] == t).all() for n, t in expected.items())
    record = json.loads((tmp_path / "out" / "merge_config.json").read_text())
    assert record["seed"] == 5 and record["hyperparameters"]["weight_mask_rate"] == 0.7


def test_missing_rescale_flag_warns_drop_only(folders, tmp_path, capsys):
    args = [a for a in dare_args(folders, tmp_path / "out") if a != "--use_weight_rescale"]
    merge_checkpoints.main(args)
    assert "DropOnly" in capsys.readouterr().err


def test_kill_mid_run_then_resume_is_identical(folders, tmp_path):
    reference = run_cli(dare_args(folders, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    killed = run_cli(dare_args(folders, out), kill_after_shards=2)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave a folder that looks complete"
    work = tmp_path / ".out.incomplete"
    assert len(list(work.glob("model-*.safetensors"))) == 2
    refused = run_cli(dare_args(folders, out))
    assert refused.returncode != 0 and "--resume" in refused.stderr
    resumed = run_cli(dare_args(folders, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: 2 of" in resumed.stderr
    assert folder_bytes(out) == folder_bytes(tmp_path / "reference")
    assert not work.exists()


def test_resume_with_other_settings_refused(folders, tmp_path):
    out = tmp_path / "out"
    killed = run_cli(dare_args(folders, out), kill_after_shards=1)
    assert killed.returncode == -signal.SIGKILL
    args = dare_args(folders, out) + ["--resume"]
    args[args.index("--seed") + 1] = "6"
    with pytest.raises(ValueError, match=r"--resume needs the interrupted run's exact settings"):
        merge_checkpoints.main(args)
