"""A newly registered merge method runs through the LLM scripts with no LLM code of its own.

``toy_method`` (``base + toy_alpha * max_i delta_i``, element-wise) is registered for the test only; the merge script
offers it and its ``--toy_alpha`` flag, with and without DARE, and the grid script searches its declared
``llm_table1`` grid through ``--toy_alphas``. Tiny Llama family of ``test_llm_merging.py``, HF backend, one example
per benchmark, a few new tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_llm_merging import _common, _load, family  # noqa: F401  (module fixture: the tiny Llama family)

import grid_search_llms_instruct_math_code as grid_script
import merge_llms_instruct_math_code as merge_script
from evaluation import generation
from model_merging_methods import Hyperparameter
from model_merging_methods.dare import dare_delta
from model_merging_methods.registry import MERGE_METHODS, MergeMethod, always

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOY = "toy_method"
PARAMETER = "model.layers.0.mlp.up_proj.weight"


def toy_merge(base: torch.Tensor, deltas, *, toy_alpha: float) -> torch.Tensor:
    """``base + toy_alpha * max_i delta_i`` (element-wise): a formula no registered method computes."""
    return base + toy_alpha * torch.stack(list(deltas)).amax(dim=0)


@pytest.fixture(autouse=True)
def toy_method(monkeypatch):
    alpha = Hyperparameter("toy_alpha", "number", 1.0, help="scale of the largest delta",
                           grids={"llm_table1": (0.5, 1.0)})
    monkeypatch.setitem(MERGE_METHODS, TOY, MergeMethod(TOY, toy_merge, (alpha,), chunkable=always))
    generation.release_hf_model()
    yield
    generation.release_hf_model()


def _parameter(folder: str | Path) -> torch.Tensor:
    model, _ = _load(Path(folder))
    return model.state_dict()[PARAMETER]


def _expected(family, toy_alpha: float, drop_rate: float | None) -> torch.Tensor:  # noqa: F811
    """The toy formula on the tiny family's instruct and math deltas (DARE'd as the merger does, masks by model)."""
    base = _parameter(family["Llama-2-13b-hf"])
    deltas = []
    for index, name in enumerate(("WizardLM-13B-V1.2", "WizardMath-13B-V1.0")):
        finetuned = _parameter(family[name])
        deltas.append(finetuned - base if drop_rate is None else dare_delta(
            finetuned, base, drop_rate=drop_rate, use_weight_rescale=True, seed=0, model_index=index, name=PARAMETER))
    return base + toy_alpha * torch.maximum(*deltas)


@pytest.mark.parametrize(
    ("method", "folder", "drop_rate"),
    [(["--merging_method_name", TOY], "toy_method_toy_alpha_0.5", None),
     (["--merging_method_name", "mask_merging", "--mask_apply_method", TOY, "--weight_mask_rate", "0.5",
       "--use_weight_rescale"], "mask_merging/toy_method_toy_alpha_0.5/mask_0.5_0.5_rescale_True", 0.5)],
)
def test_merge_script_runs_a_new_method_with_its_flag(family, tmp_path, shared_data_dir, method, folder,  # noqa: F811
                                                      drop_rate):
    store = tmp_path / "merged"
    argv = [*_common(family, tmp_path, shared_data_dir), "--merge_instruct", "--merge_math", *method, "--toy_alpha",
            "0.5", "--save_dtype", "float32", "--save_merge_models_dir", str(store), "--keep_model"]
    metrics = merge_script.main(argv)
    assert set(metrics) == {"alpaca_eval", "gsm8k", "MATH"}
    merged = store / "instruct_math" / "math" / folder
    torch.testing.assert_close(_parameter(merged), _expected(family, 0.5, drop_rate))
    [config] = (tmp_path / "results" / "merge_llms_instruct_math_code").rglob("config.json")
    recorded = json.loads(config.read_text())["config"]
    assert recorded["toy_alpha"] == 0.5 and recorded["recipe"]["method"] == TOY
    assert config.parent.parent.name == ("mask_merging+" if drop_rate else "") + TOY


def test_merge_script_refuses_the_new_flag_for_a_method_without_it(tmp_path):
    with pytest.raises(ValueError, match="--toy_alpha \\(toy_method\\) given, but Task Arithmetic does not use it"):
        merge_script.main(["--merge_instruct", "--merge_math", "--merging_method_name", "task_arithmetic",
                           "--toy_alpha", "0.5", "--results_dir", str(tmp_path)])


def test_grid_script_searches_the_new_method_s_declared_grid(family, tmp_path, shared_data_dir):  # noqa: F811
    overrides = [arg for name, path in family.items() for arg in ("--model_path", f"{name}={path}")]
    argv = [*overrides, "--backend", "hf", "--data_dir", str(shared_data_dir), "--results_dir", str(tmp_path / "r"),
            "--end_index", "10", "--max_new_tokens", "2", "--quiet", "--merge_instruct", "--merge_math",
            "--merging_methods", TOY, f"mask_merging+{TOY}", "--toy_alphas", "0.5", "1.0", "--weight_mask_rates",
            "0.5", "--datasets", "gsm8k", "--save_merge_models_dir", str(tmp_path / "merged")]
    config = grid_script.build_config(grid_script.parse_args(argv))
    assert [(p.method_key, p.settings()["toy_alpha"], p.dare and p.dare.weight_mask_rate) for p in config.points] == [
        (TOY, 0.5, None), (TOY, 1.0, None), (f"mask_merging+{TOY}", 0.5, 0.5), (f"mask_merging+{TOY}", 1.0, 0.5)]
    result = grid_script.main(argv)
    points = config.grid_dir(str(tmp_path / "r")) / "points"
    assert sorted(str(p.parent.relative_to(points)) for p in points.rglob("result.json")) == [
        f"mask_merging+{TOY}/mask_strategy=random,seed=0,toy_alpha=0.5,use_weight_rescale=True,"
        "weight_format=delta_weight,weight_mask_rate=0.5",
        f"mask_merging+{TOY}/mask_strategy=random,seed=0,toy_alpha=1.0,use_weight_rescale=True,"
        "weight_format=delta_weight,weight_mask_rate=0.5",
        f"{TOY}/toy_alpha=0.5", f"{TOY}/toy_alpha=1.0"]
    assert result["selection"]["gsm8k"]["point"]["method"] == TOY
    header = next(line for line in result["markdown"].splitlines() if line.startswith("| method"))
    assert header == "| method | p | toy_alpha | status | gsm8k | selected for |"
