"""The homology preflight before merging: warns, errors with --strict, is skipped by --skip_homology_check."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import tiny_llama_config
from test_delta_analysis import llama_state_dict, perturbed
from test_merge_engine import save_sharded

import merge_checkpoints
from delta_analysis import HomologyError, check_homology
from delta_analysis.plan import build_plan
from delta_analysis.preflight import SAMPLE_NUMEL, sample_units
from utils import llm_merging


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("preflight")
    base = llama_state_dict(0)
    states = {"base": base, "sft": perturbed(base, 1e-3, 1), "large": perturbed(base, 0.03, 2),
              "unrelated": llama_state_dict(7)}
    config = tiny_llama_config(num_hidden_layers=3)
    return {name: str(save_sharded(sd, root / name, config=config)) for name, sd in states.items()}


def _merge_args(folders, finetuned: str, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model", folders["base"], "--finetuned_models", folders["sft"], folders[finetuned],
            "--merging_method_name", "task_arithmetic", "--scaling_coefficient", "1.0", "--output_dir", str(out),
            "--quiet", *extra]


def test_samples_first_middle_and_last_block():
    catalog = {f"model.layers.{i}.{k}": ((4096, 4096), __import__("torch").float32) for i in range(8)
               for k in ("input_layernorm.weight", "self_attn.q_proj.weight")}
    catalog = {n: ((s[1],), d) if "norm" in n else (s, d) for n, (s, d) in catalog.items()}
    plan = build_plan([catalog, catalog], ["base", "ft"])
    units = sample_units(plan)
    assert [plan.entries[u.entry].name for u in units] == [f"model.layers.{i}.self_attn.q_proj.weight"
                                                           for i in (0, 4, 7)]
    assert all(u.rows == (0, SAMPLE_NUMEL // 4096) for u in units)


def test_sft_finetune_passes_quietly(folders, caplog):
    with caplog.at_level(logging.INFO):
        verdicts = check_homology(folders["base"], [folders["sft"]], strict=True)
    assert verdicts[folders["sft"]].code == "sft_like"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("finetuned, code", [("unrelated", "not_derived"), ("large", "large")])
def test_flagged_finetune_warns_with_name_and_numbers(folders, caplog, finetuned, code):
    with caplog.at_level(logging.WARNING):
        verdicts = check_homology(folders["base"], [folders["sft"], folders[finetuned]])
    assert verdicts[folders[finetuned]].code == code
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert folders[finetuned] in warning and "90th percentile |delta|" in warning and "weight cosine" in warning
    with pytest.raises(HomologyError, match="--skip_homology_check"):
        check_homology(folders["base"], [folders[finetuned]], strict=True)


def test_merge_cli_warns_then_merges(folders, tmp_path, capsys):
    out = tmp_path / "out"
    merge_checkpoints.main(_merge_args(folders, "unrelated", out))  # logging goes to stderr (setup_logging)
    warnings = [line for line in capsys.readouterr().err.splitlines() if " - WARNING - " in line]
    assert any("not derived from this base" in line and folders["unrelated"] in line for line in warnings)
    assert (out / "model.safetensors.index.json").exists() or any(out.glob("*.safetensors"))


def test_merge_cli_strict_refuses_before_writing(folders, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HomologyError, match="not derived"):
        merge_checkpoints.main(_merge_args(folders, "unrelated", out, "--strict"))
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_merge_cli_skip_flag_skips_the_check(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_checkpoints, "check_homology", lambda *a, **k: pytest.fail("check ran"))
    out = tmp_path / "out"
    merge_checkpoints.main(_merge_args(folders, "unrelated", out, "--strict", "--skip_homology_check"))
    assert any(out.glob("*.safetensors"))


def test_llm_merge_path_runs_the_check(folders, tmp_path, caplog):
    kwargs = dict(method="task_arithmetic", hyperparameters={"scaling_coefficient": 1.0}, save_dtype="float32",
                  copy_config_from=0, resume=False, progress=False)
    with caplog.at_level(logging.WARNING):
        llm_merging.merge_into(tmp_path / "merged", folders["base"], [folders["large"]], **kwargs)
    assert any("large deltas" in r.getMessage() and folders["large"] in r.getMessage() for r in caplog.records)
    with pytest.raises(HomologyError):
        llm_merging.merge_into(tmp_path / "strict", folders["base"], [folders["large"]], strict_homology=True,
                               **kwargs)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        llm_merging.merge_into(tmp_path / "skipped", folders["base"], [folders["large"]], homology_check=False,
                               **kwargs)
    assert not any("homology" in r.getMessage() for r in caplog.records)
