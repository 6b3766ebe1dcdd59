"""merge_config.json: its command parses back to the run's arguments and redoes the merge byte for byte; --resume
on a finished folder of the same merge does nothing, and refuses one of another merge."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from conftest import make_family, tiny_llama_config
from test_merge_engine import read_back, save_sharded, state_dicts_of, statistics_for

import merge_checkpoints
from common.cli_command import command_from_args

CASES = {
    # DropOnly: no --use_weight_rescale (the CLI has no --no_use_weight_rescale flag)
    "drop_only": ["--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic",
                  "--weight_mask_rate", "0.6", "--scaling_coefficient", "0.9", "--seed", "4"],
    "dare": ["--merging_method_name", "mask_merging", "--mask_apply_method", "ties_merging", "--weight_mask_rate",
             "0.3", "0.5", "--use_weight_rescale", "--param_value_mask_rate", "0.4", "--dtype", "bfloat16",
             "--exclude_param_names_regex", "model.norm.*", ".*layernorm.*"],
    "global_ties": ["--merging_method_name", "ties_merging", "--param_value_mask_rate", "0.6", "--ties_trim_scope",
                    "global", "--scaling_coefficient", "0.7", "--copy_config_from", "2"],
    "fisher": ["--merging_method_name", "fisher_merging", "--no-normalize_fisher_weight",
               "--minimal_fisher_weight", "1e-05", "--fisher_scaling_coefficients", "0.3", "0.7"],
}


@pytest.fixture
def folders(tmp_path) -> list[str]:
    from transformers import LlamaForCausalLM

    config = tiny_llama_config()
    base, finetuned = make_family(LlamaForCausalLM, config)
    return [str(save_sharded(sd, tmp_path / name, config=config))
            for sd, name in zip(state_dicts_of([base, *finetuned]), ["base", "ft1", "ft2"], strict=True)]


def cli_args(case: str, folders: list[str], out: Path, statistics_files: list[str] | None = None) -> list[str]:
    args = ["--pretrained_model", folders[0], "--finetuned_models", *folders[1:], *CASES[case],
            "--max_shard_size", "30KB", "--output_dir", str(out), "--quiet"]
    if case == "fisher":
        if statistics_files is None:
            _, statistics_files = statistics_for("fisher_merging", read_back(Path(folders[0])), 2, out.parent)
        args += ["--statistics_files", *statistics_files]
    return args


def recorded_argv(out: Path, new_out: Path) -> list[str]:
    """The recorded command's arguments, with its ``OUT`` placeholder replaced."""
    words = shlex.split(json.loads((out / "merge_config.json").read_text())["command"])
    assert words[:2] == ["python", "merge_checkpoints.py"]
    return [str(new_out) if w == "OUT" else w for w in words[2:]]


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_command_parses_back_to_the_same_arguments(case, tmp_path):
    folders = [str(tmp_path / n) for n in ("base", "ft1", "ft2")]  # parsing only: the folders need not exist
    args = merge_checkpoints.parse_args(cli_args(case, folders, tmp_path / "out", ["s0.pt", "s1.pt"]))
    command = merge_checkpoints.rerun_command(args)
    assert "--no_use_weight_rescale" not in command
    reparsed = merge_checkpoints.parse_args(shlex.split(command)[2:])
    expected = {**vars(args), "output_dir": "OUT", "quiet": False}
    assert vars(reparsed) == expected


def test_recorded_command_keeps_non_default_flags_the_old_record_dropped(tmp_path):
    args = merge_checkpoints.parse_args(
        ["--pretrained_model", "b", "--finetuned_models", "f1", "f2", "--merging_method_name", "fisher_merging",
         "--no-normalize_fisher_weight", "--statistics_files", "s0.pt", "s1.pt", "--copy_config_from", "1",
         "--max_shard_size", "2GB", "--output_dir", "o", "--overwrite", "--resume", "--log_file", "x.log"])
    words = shlex.split(merge_checkpoints.rerun_command(args))
    assert "--no-normalize_fisher_weight" in words
    assert words[words.index("--statistics_files") + 1:][:2] == ["s0.pt", "s1.pt"]
    assert words[words.index("--copy_config_from") + 1] == "1"
    assert words[words.index("--max_shard_size") + 1] == "2000000000"
    assert words[words.index("--output_dir") + 1] == "OUT"
    assert not {"--overwrite", "--resume", "--log_file"} & set(words)  # the folder's handling, not the merge


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_command_redoes_the_merge_byte_for_byte(case, folders, tmp_path):
    merge_checkpoints.main(cli_args(case, folders, tmp_path / "first"))
    merge_checkpoints.main(recorded_argv(tmp_path / "first", tmp_path / "again"))
    first = safetensors_bytes(tmp_path / "first")
    assert first and first == safetensors_bytes(tmp_path / "again")


def test_command_writer_rejects_a_value_that_does_not_parse_back():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=lambda text: int(text) * 1000, default=0)
    with pytest.raises(RuntimeError, match="parses to other values for \\['size'\\]"):
        command_from_args(parser, parser.parse_args(["--size", "3"]), program=("python", "x.py"))


def test_resume_on_a_finished_folder_of_the_same_merge_does_nothing(folders, tmp_path, capsys):
    out = tmp_path / "out"
    merge_checkpoints.main(cli_args("dare", folders, out))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    summary = merge_checkpoints.main(cli_args("dare", folders, out) + ["--resume"])
    assert summary["already_complete"] and summary["tensors"] == 0
    assert "already holds this merge; nothing to do" in capsys.readouterr().out
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_resume_on_a_finished_folder_of_another_merge_is_refused(folders, tmp_path):
    out = tmp_path / "out"
    merge_checkpoints.main(cli_args("drop_only", folders, out))
    args = cli_args("drop_only", folders, out) + ["--resume"]
    args[args.index("--seed") + 1] = "5"
    with pytest.raises(FileExistsError, match=r"holds a finished merge with other settings \(recipe "
                                              r"differ from .*pass --overwrite to replace it"):
        merge_checkpoints.main(args)
    summary = merge_checkpoints.main(args + ["--overwrite"])  # --overwrite --resume: merged again
    assert summary["tensors"] > 0 and not summary.get("already_complete")
    assert json.loads((out / "merge_config.json").read_text())["seed"] == 5
