"""``merge_checkpoints.py --config`` against mergekit 0.1.5 itself (``requirements-dev.txt``), on tiny Llama families.

Deterministic methods (with gradients and filters, float32 and bfloat16): every output tensor equals mergekit's
within one ulp of its dtype. Random methods (DARE, DELLA): our masks are ours, so the outputs agree in
distribution: kept fraction, the L1 rescale, and DELLA's keep probability by magnitude rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fill_model_paths, save_llama_family

mergekit = pytest.importorskip("mergekit", reason="mergekit 0.1.5 is a test-only dependency (requirements-dev.txt)")

MODELS = ("base", "ft0", "ft1", "ft2")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama base and three fine-tunes (Gaussian deltas, std 0.01) saved as float32 safetensors."""
    return save_llama_family(tmp_path_factory.mktemp("mk_family"), MODELS, num_hidden_layers=4)


def _yaml(text: str, root: Path) -> str:
    return fill_model_paths(text, root, MODELS)


def run_mergekit(text: str, out: Path, seed: int | None = None) -> dict[str, torch.Tensor]:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                                     random_seed=seed))
    return _load(out)


def run_ours(text: str, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    from merge_engine.mergekit_merge import merge_from_config

    merge_from_config(text, out, progress=False, **kwargs)
    return _load(out)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between ``a`` and ``b`` in units of the last place of their dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if torch.equal(a, b):
        return 0
    wide = torch.maximum(a.abs(), b.abs()).to(a.dtype)
    ulp = (torch.nextafter(wide, torch.full_like(wide, float("inf"))) - wide).float()
    return int(((a.float() - b.float()).abs() / ulp).max().ceil())


DETERMINISTIC = {
    "linear_filters": """
        merge_method: linear
        models:
          - model: @ft0
            parameters:
              weight: [{filter: self_attn, value: [0.2, 0.8]}, {filter: mlp, value: 0.7}, {value: 0.5}]
          - model: @ft1
            parameters: {weight: 0.3}
          - model: @ft2
            parameters: {weight: [1, 0.1]}
        dtype: float32
        """,
    "task_arithmetic_gradient": """
        merge_method: task_arithmetic
        base_model: @base
        models:
          - {model: @ft0, parameters: {weight: [0.1, 0.9]}}
          - {model: @ft1, parameters: {weight: [{filter: mlp, value: 0.4}, {value: 1.0}]}}
        parameters: {lambda: [1.0, 0.5, 1.5]}
        dtype: float32
        """,
    "ties": """
        merge_method: ties
        base_model: @base
        models:
          - {model: @ft0, parameters: {weight: 1.0, density: [0.3, 0.7]}}
          - {model: @ft1, parameters: {weight: 0.6, density: 0.5}}
          - {model: @ft2, parameters: {weight: [{filter: self_attn, value: -0.5}, {value: 0.8}], density: 0.9}}
        parameters: {normalize: true}
        dtype: float32
        """,
    # density 1 in bfloat16: an 8-bit mantissa makes many |delta| equal, and which of the entries tied at the
    # trim threshold mergekit keeps depends on its unstable argsort (ours keeps the lower index); the sign
    # election, the weights rounded to bfloat16 and the divisor are compared here, the trim in float32 above
    "ties_bfloat16": """
        merge_method: ties
        base_model: @base
        models:
          - {model: @ft0, parameters: {weight: 0.3}}
          - {model: @ft1, parameters: {weight: 0.7}}
        dtype: bfloat16
        """,
    "breadcrumbs": """
        merge_method: breadcrumbs
        base_model: @base
        models:
          - {model: @ft0, parameters: {weight: 1.0, density: 0.8, gamma: 0.05}}
          - {model: @ft1, parameters: {weight: 0.5, density: 0.9, gamma: 0.02}}
        dtype: float32
        """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: @base
        models:
          - {model: @ft0, parameters: {weight: 1.0, density: 0.8, gamma: 0.05}}
          - {model: @ft1, parameters: {weight: 1.0, density: 0.7, gamma: 0.1}}
        parameters: {normalize: true}
        dtype: float32
        """,
    "slerp_gradients": """
        merge_method: slerp
        base_model: @ft0
        slices:
          - sources:
              - {model: @ft0, layer_range: [0, 4]}
              - {model: @ft1, layer_range: [0, 4]}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
        """,
    "slerp_bfloat16": """
        merge_method: slerp
        base_model: @ft0
        models: [{model: @ft0}, {model: @ft1}]
        parameters: {t: 0.3}
        dtype: bfloat16
        """,
    "nuslerp": """
        merge_method: nuslerp
        base_model: @base
        models:
          - {model: @ft0, parameters: {weight: 0.3}}
          - {model: @ft1, parameters: {weight: 0.7}}
        parameters: {nuslerp_row_wise: true, nuslerp_flatten: false}
        dtype: float32
        """,
    "nuslerp_no_base": """
        merge_method: nuslerp
        models:
          - {model: @ft0, parameters: {weight: [0.2, 0.8]}}
          - {model: @ft1, parameters: {weight: 0.5}}
        dtype: float32
        """,
    "model_stock": """
        merge_method: model_stock
        base_model: @base
        models: [{model: @ft0}, {model: @ft1}, {model: @ft2}]
        dtype: float32
        """,
    "model_stock_filter_wise": """
        merge_method: model_stock
        base_model: @base
        models: [{model: @ft0}, {model: @ft1}, {model: @ft2}]
        parameters: {filter_wise: true}
        dtype: float32
        """,
    "passthrough_frankenmerge": """
        merge_method: passthrough
        slices:
          - sources: [{model: @ft0, layer_range: [0, 3]}]
          - sources: [{model: @ft1, layer_range: [1, 4]}]
        dtype: float32
        """,
    "passthrough_scale_bf16_out": """
        merge_method: passthrough
        slices:
          - sources: [{model: @ft0, layer_range: [0, 2], parameters: {scale: [{filter: o_proj, value: 0.5}]}}]
          - sources: [{model: @ft2, layer_range: [2, 4]}]
        dtype: float32
        out_dtype: bfloat16
        """,
}


def assert_same_as_mergekit(text: str, folder: Path) -> None:
    """Every tensor of ``--config`` equals mergekit's within one ulp of its dtype."""
    theirs = run_mergekit(text, folder / "mergekit")
    ours = run_ours(text, folder / "ours")
    assert sorted(ours) == sorted(theirs)
    worst = {n: ulps(ours[n], theirs[n]) for n in ours}
    assert max(worst.values()) <= 1, {n: u for n, u in worst.items() if u > 1}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_methods_equal_mergekit_within_one_ulp(family, tmp_path, name):
    assert_same_as_mergekit(_yaml(DETERMINISTIC[name], family), tmp_path)
    ours_config = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_config = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    for key in ("num_hidden_layers", "torch_dtype", "dtype"):
        if key in theirs_config:
            assert ours_config.get(key) == theirs_config[key], key


# ---------------------------------------------------------------------------------------------------------------
# Random methods: agreement in distribution


def _deltas(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
    names = sorted(n for n in merged if n.startswith("model.layers."))
    return torch.cat([(merged[n].float() - base[n].float()).flatten() for n in names])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear"])
def test_random_methods_keep_the_same_fraction_and_rescale_as_mergekit(family, tmp_path, method):
    density = 0.3
    extra = ", epsilon: 0.1" if method.startswith("della") else ""
    text = _yaml(f"""
        merge_method: {method}
        base_model: @base
        models:
          - {{model: @ft0, parameters: {{weight: 1.0, density: {density}{extra}}}}}
        dtype: float32
        """, family)
    base = _load(family / "base")
    finetuned = _load(family / "ft0")
    delta = _deltas(finetuned, base)
    theirs = _deltas(run_mergekit(text, tmp_path / "mergekit", seed=0), base)
    ours = _deltas(run_ours(text, tmp_path / "ours", seed=0), base)
    n = delta.numel()
    bound = 5 * (density * (1 - density) / n) ** 0.5
    for merged in (ours, theirs):
        kept = (merged != 0).float().mean().item()
        assert abs(kept - density) < bound, (kept, density, bound)
    # with one model, the merged delta is the rescaled sparsified delta: mergekit's L1 rescale keeps each tensor's
    # L1 norm, so the totals match the input's (and ours = theirs) to rounding
    assert ours.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)
    assert theirs.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)
    # the paper's rescale instead divides the kept entries by the density
    paper = _deltas(run_ours(text, tmp_path / "paper", seed=0, dare_rescale="inverse_keep"), base)
    kept = paper != 0
    if method.startswith("dare"):
        # (base + delta / density) - base in float32: exact up to the rounding of the sum (weights are about 1)
        torch.testing.assert_close(paper[kept], delta[kept] / density, rtol=0, atol=2.5e-7)


def test_della_keeps_large_entries_more_often_like_mergekit(family, tmp_path):
    """DELLA's keep probability rises with the magnitude rank within a row, from density - epsilon to density +
    epsilon: the kept fraction of the top and bottom thirds by |delta| agrees with mergekit's."""
    text = _yaml("""
        merge_method: della_linear
        base_model: @base
        models:
          - {model: @ft0, parameters: {weight: 1.0, density: 0.5, epsilon: 0.3}}
        dtype: float32
        """, family)
    base, finetuned = _load(family / "base"), _load(family / "ft0")
    outputs = {"ours": run_ours(text, tmp_path / "ours", seed=1),
               "mergekit": run_mergekit(text, tmp_path / "mergekit", seed=1)}
    fractions = {}
    for who, merged in outputs.items():
        low = high = low_n = high_n = 0
        for name in (n for n in merged if n.startswith("model.layers.") and merged[n].dim() == 2):
            delta = (finetuned[name] - base[name]).abs()
            ranks = delta.argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
            kept = merged[name] != base[name]
            low += kept[ranks < 1 / 3].sum().item()
            low_n += (ranks < 1 / 3).sum().item()
            high += kept[ranks > 2 / 3].sum().item()
            high_n += (ranks > 2 / 3).sum().item()
        fractions[who] = (low / low_n, high / high_n)
    for who, (low, high) in fractions.items():
        assert low < 0.4 < 0.6 < high, (who, low, high)  # expected about 0.3 and 0.7
    assert fractions["ours"][0] == pytest.approx(fractions["mergekit"][0], abs=0.03)
    assert fractions["ours"][1] == pytest.approx(fractions["mergekit"][1], abs=0.03)


# ---------------------------------------------------------------------------------------------------------------
# mergekit's examples/ (github.com/arcee-ai/mergekit), adapted to the tiny family: the same keys and values,
# models renamed, layer ranges scaled to 4 layers


EXAMPLES = {
    "bio-merge.yml": """
        models:
          - model: @ft0
            parameters:
              density: 0.5
              weight: 0.5
          - model: @ft1
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: @base
        parameters:
          normalize: false
          int8_mask: true
        dtype: float32  # float16 in the example: see "ties_bfloat16" (ties at the trim threshold)
        """,
    "gradient-slerp.yml": """
        slices:
          - sources:
              - model: @ft0
                layer_range: [0, 4]
              - model: @ft1
                layer_range: [0, 4]
        merge_method: slerp
        base_model: @ft0
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float16
        """,
    "linear.yml": """
        models:
          - model: @ft0
            parameters:
              weight: 1.0
          - model: @ft1
            parameters:
              weight: 0.3
          - model: @ft2
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
        """,
    "orcamini-platy-44layer.yml": """
        slices:
          - sources:
            - model: @ft0
              layer_range: [0, 3]
          - sources:
            - model: @ft1
              layer_range: [1, 4]
        merge_method: passthrough
        dtype: float16
        """,
    "gpt2-small.yml": """
        slices:
          - sources:
            - model: @ft2
              layer_range: [0, 2]
        merge_method: passthrough
        dtype: float16
        """,
    "ties.yml (gradients and a filtered weight)": """
        models:
          - model: @ft0
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: @ft1
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: @ft2
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: @base
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32
        """,
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_mergekit_examples_give_mergekit_s_merge(family, tmp_path, name):
    assert_same_as_mergekit(_yaml(EXAMPLES[name], family), tmp_path)


@pytest.mark.parametrize("text, message", [
    # examples/ties.yml today: a method outside this merger
    ("models: [{model: a, parameters: {density: [0.8, 0.3], weight: 1}}]\nmerge_method: ranked_ties\n"
     "base_model: b\n", r"merge_method must be one of .*got 'ranked_ties'"),
    ("models: [{model: a}, {model: b}]\nmerge_method: arcee_fusion\nbase_model: a\n", "got 'arcee_fusion'"),
    # examples/linear_small.yml: a metrics file, not a merge
    ("models: [{model: a}, {model: b}]\nmetric_method: scale\ndtype: float32\n", "unknown key 'metric_method'"),
    # examples/mega.yml: several documents for mergekit-mega
    ("merge_method: linear\nmodels: [a]\n---\nmerge_method: linear\nmodels: [b]\n", "2 YAML documents"),
    # an old examples/gradient-slerp.yml wrote `pattern:`; mergekit 0.1.5 ignores the key, so its first entry then
    # matches every tensor: refused here rather than merged silently otherwise than written
    ("merge_method: slerp\nbase_model: a\nmodels: [a, b]\nparameters:\n  t:\n    - pattern: self_attn\n"
     "      value: [0, 1]\n    - value: 0.5\n", r"unknown key 'pattern'"),
])
def test_configs_outside_this_merger_are_refused_by_name(text, message):
    from merge_engine.mergekit_config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(text)
