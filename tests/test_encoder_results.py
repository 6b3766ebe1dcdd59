"""The published encoder results (``reproductions/glue_minilm``) regenerate unchanged from their run folders."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT

import summarize_results

PUBLISHED = REPO_ROOT / "reproductions" / "glue_minilm"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("published_summary")
    summarize_results.main(["--results_dir", str(PUBLISHED / "runs"), "--output_dir", str(out)])
    return out


@pytest.mark.parametrize("name", ["summary.md", "summary.json", "dare_effect.csv", "sweep_contrast.csv",
                                  "dare_sweep.csv", "finetune.csv", "merging.csv", "finetune_seeds.csv",
                                  "sweep_seeds.csv", "dare_effect_seeds.csv"])
def test_summary_of_the_published_runs_is_the_published_table(name, regenerated):
    assert (regenerated / name).read_bytes() == (PUBLISHED / "tables" / name).read_bytes(), name
