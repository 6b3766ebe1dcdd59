"""The homology preflight before merging: warns, errors with --strict (--strict_homology_check in the LLM scripts),
is skipped by --skip_homology_check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import make_family, tiny_llama_config
from test_delta_analysis import llama_state_dict, perturbed
from test_merge_engine import save_sharded

import grid_search_llms_instruct_math_code as grid_script
import inference_llms_instruct_math_code as inference_script
import merge_checkpoints
import merge_llms_instruct_math_code as merge_script
from delta_analysis import HomologyError, check_homology
from delta_analysis.plan import build_plan
from delta_analysis.preflight import SAMPLE_NUMEL, sample_units
from llms import llm_merging
from model_merging_methods import Recipe


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
    kwargs = dict(recipe=Recipe("task_arithmetic"), save_dtype="float32", copy_config_from=0, resume=False,
                  progress=False)
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


# --- the LLM scripts' --skip_homology_check / --strict_homology_check ---------------------------------------------


@pytest.fixture(scope="module")
def llm_family(tmp_path_factory) -> dict[str, str]:
    """The paper's short names: a base, a math fine-tune of it, and an "instruct" model of another initialisation."""
    from test_llm_merging import _tokenizer
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("unrelated_family")
    config = tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    base, (math,) = make_family(LlamaForCausalLM, config, num_finetuned=1, delta_std=0.001)
    torch.manual_seed(123)
    unrelated = LlamaForCausalLM(config).eval()
    paths = {}
    for name, model in {"Llama-2-13b-hf": base, "WizardMath-13B-V1.0": math, "WizardLM-13B-V1.2": unrelated}.items():
        model.save_pretrained(root / name)
        _tokenizer(None).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def _llm_argv(llm_family, tmp_path, script, *extra: str) -> list[str]:
    overrides = [arg for name, path in llm_family.items() for arg in ("--model_path", f"{name}={path}")]
    if script is inference_script:
        task = ["--finetuned_model_name", "WizardLM-13B-V1.2", "--dataset_name", "alpaca_eval",
                "--weight_mask_rate", "0.5", "--save_models_dir", str(tmp_path / "save_models")]
    else:
        task = ["--merge_instruct", "--merge_math", "--merging_method_name", "task_arithmetic",
                "--save_merge_models_dir", str(tmp_path / "save_merge_models")]
    return [*overrides, *task, "--backend", "hf", "--results_dir", str(tmp_path / "results"), "--end_index", "1",
            "--save_dtype", "float32", "--quiet", *extra]


@pytest.fixture
def no_generation(monkeypatch, shared_data_dir):
    """Generation is stubbed (counted), the test files come from the shared data folder."""
    calls = []
    monkeypatch.setenv("MERGELM_DATA_DIR", str(shared_data_dir))
    monkeypatch.setattr(llm_merging, "run_benchmark", lambda dataset, *a, **k: calls.append(dataset) or {})
    monkeypatch.setattr(llm_merging, "run_benchmarks",
                        lambda benchmarks, *a, **k: {d: calls.append(d) or {} for d, _ in benchmarks})
    return calls


def _recorded(tmp_path, script) -> dict:
    [config] = (tmp_path / "results" / script.__name__).rglob("config.json")
    return json.loads(config.read_text())["config"]


def _run_log_warnings(tmp_path, script) -> list[str]:
    [log] = (tmp_path / "results" / script.__name__).rglob("run.log")  # main() replaces caplog's handler
    return [line for line in log.read_text().splitlines() if " - WARNING - " in line]


@pytest.mark.parametrize("script", [merge_script, inference_script])
def test_llm_script_warns_about_an_unrelated_finetune_by_default(llm_family, tmp_path, script, no_generation):
    script.main(_llm_argv(llm_family, tmp_path, script))
    assert any("not derived from this base" in line and llm_family["WizardLM-13B-V1.2"] in line
               for line in _run_log_warnings(tmp_path, script))
    assert no_generation
    recorded = _recorded(tmp_path, script)
    assert recorded["homology_check"] is True and recorded["strict_homology"] is False


@pytest.mark.parametrize("script", [merge_script, inference_script])
def test_llm_script_strict_flag_refuses_before_any_generation(llm_family, tmp_path, script, no_generation):
    with pytest.raises(HomologyError, match="not derived"):
        script.main(_llm_argv(llm_family, tmp_path, script, "--strict_homology_check"))
    assert not no_generation and not any((tmp_path / "save_merge_models").rglob("*.safetensors"))
    assert _recorded(tmp_path, script)["strict_homology"] is True


@pytest.mark.parametrize("script", [merge_script, inference_script])
def test_llm_script_skip_flag_skips_the_check(llm_family, tmp_path, script, no_generation, monkeypatch):
    monkeypatch.setattr(llm_merging, "check_homology", lambda *a, **k: pytest.fail("check ran"))
    script.main(_llm_argv(llm_family, tmp_path, script, "--skip_homology_check"))
    assert no_generation and _recorded(tmp_path, script)["homology_check"] is False
    assert not any("homology check" in line for line in _run_log_warnings(tmp_path, script))


def test_llm_skip_and_strict_homology_flags_exclude_each_other(tmp_path):
    argv = ["--merge_instruct", "--merge_math", "--skip_homology_check", "--strict_homology_check"]
    with pytest.raises(ValueError, match="--skip_homology_check, --strict_homology_check"):
        merge_script.main([*argv, "--results_dir", str(tmp_path)])


def test_grid_search_passes_the_homology_flags_to_every_merge():
    args = grid_script.parse_args(["--merge_instruct", "--merge_math", "--merging_methods", "task_arithmetic",
                                   "--strict_homology_check"])
    config = grid_script.build_config(args)
    merge = config.merge_config(config.points[0])
    assert (merge.homology_check, merge.strict_homology) == (True, True)
    assert config.record()["strict_homology"] is True
