"""One merge pass for recipes that differ only in λ (``merge_engine.merge_variants``): the outputs equal separate
merges byte for byte, the inputs are read and the DARE masks drawn once, and a killed pass resumes without ever
leaving a half-written model that looks finished.

On the tiny Llama family of ``test_llm_merging.py`` (a math fine-tune with 65 vocabulary rows, so the ``mergelm``
vocabulary alignment runs too), written in bf16 as the LLM scripts write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_llm_merging import family  # noqa: F401  (module fixture: the tiny base + instruct/math/code family)

from merge_engine import holds_finished_merge, merge_checkpoints, merge_variants
from merge_engine.output_folder import MERGE_CONFIG, work_dir_for
from merge_engine.tensor_reader import TensorReader
from merge_engine.tensor_task import UnitRunner
from model_merging_methods import Dare, Recipe, merge_plan

ARGUMENTS = {"dtype": "bfloat16", "vocab_policy": "mergelm", "progress": False, "num_threads": 2,
             "chunk_numel": 256, "max_shard_bytes": 20_000}
LAMBDAS = (0.5, 0.7, 1.0)
DARE = Dare(0.5, seed=3)


def _inputs(family) -> tuple[str, list[str]]:  # noqa: F811
    return family["Llama-2-13b-hf"], [family["WizardLM-13B-V1.2"], family["WizardMath-13B-V1.0"]]


def _ta(scaling_coefficient: float, dare: Dare | None = DARE) -> Recipe:
    return Recipe("task_arithmetic", {"scaling_coefficient": scaling_coefficient}, dare)


def _ties(scaling_coefficient: float, scope: str) -> Recipe:
    return Recipe("ties_merging", {"scaling_coefficient": scaling_coefficient, "param_value_mask_rate": 0.6,
                                   "ties_trim_scope": scope}, Dare(0.3, seed=1))


def _files(folder: Path) -> dict[str, bytes]:
    """Every weight file's bytes (tensors and headers) and the merge record without the software versions."""
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
    files["model.safetensors.index.json"] = (folder / "model.safetensors.index.json").read_bytes()
    files["config.json"] = (folder / "config.json").read_bytes()
    record = json.loads((folder / MERGE_CONFIG).read_text())
    record.pop("versions")
    files[MERGE_CONFIG] = json.dumps(record, sort_keys=True).encode()
    return files


@pytest.mark.parametrize(
    "recipes",
    [[_ta(value) for value in LAMBDAS], [_ta(value, dare=None) for value in LAMBDAS],
     [_ties(value, "per_tensor") for value in (0.5, 1.0)], [_ties(value, "global") for value in (0.5, 1.0)]],
    ids=["task_arithmetic+dare", "task_arithmetic", "ties+dare_per_tensor", "ties+dare_global"],
)
def test_each_output_equals_its_separate_merge_byte_for_byte(family, tmp_path, recipes):  # noqa: F811
    pretrained, finetuned = _inputs(family)
    together = [(str(tmp_path / "pass" / f"{i}"), recipe) for i, recipe in enumerate(recipes)]
    summaries = merge_variants(pretrained, finetuned, together, **ARGUMENTS)
    assert len(summaries) == len(recipes) and all(s["tensors"] > 0 for s in summaries)
    for i, recipe in enumerate(recipes):
        alone = tmp_path / "alone" / f"{i}"
        merge_checkpoints(pretrained, finetuned, str(alone), merging_method_name=recipe, **ARGUMENTS)
        assert _files(Path(together[i][0])) == _files(alone)
        # the record is the separate merge's: a run resuming that merge reuses this folder
        assert holds_finished_merge(pretrained, finetuned, together[i][0], merging_method_name=recipe,
                                    dtype="bfloat16", vocab_policy="mergelm", max_shard_bytes=20_000)
    first, second = (_files(Path(folder)) for folder, _ in together[:2])
    assert first["model.safetensors.index.json"] == second["model.safetensors.index.json"]
    assert any(first[name] != second[name] for name in first if name.endswith(".safetensors"))  # λ shows


def test_the_inputs_are_read_and_the_masks_drawn_once_per_pass(family, tmp_path, monkeypatch):  # noqa: F811
    pretrained, finetuned = _inputs(family)
    reads, masks = [], []
    real_read, real_dare = TensorReader.read, merge_plan.dare_delta

    def read(self, name, rows=None):
        reads.append((name, rows))
        return real_read(self, name, rows)

    def dare_delta(*args, **kwargs):
        masks.append(kwargs["name"])
        return real_dare(*args, **kwargs)

    monkeypatch.setattr(TensorReader, "read", read)
    monkeypatch.setattr(merge_plan, "dare_delta", dare_delta)
    merge_checkpoints(pretrained, finetuned, str(tmp_path / "alone"), merging_method_name=_ta(0.5), **ARGUMENTS)
    one_merge = (sorted(reads), sorted(masks))
    reads.clear(), masks.clear()
    merge_variants(pretrained, finetuned, [(str(tmp_path / f"{v}"), _ta(v)) for v in LAMBDAS], **ARGUMENTS)
    assert (sorted(reads), sorted(masks)) == one_merge  # 3 models written from the reads and masks of one merge
    assert len(reads) > 0 and len(masks) > 0


class Killed(Exception):
    pass


def test_a_killed_pass_publishes_nothing_and_resumes_to_the_separate_merges(family, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    pretrained, finetuned = _inputs(family)
    outputs = [(str(tmp_path / "pass" / f"{v}"), _ta(v)) for v in LAMBDAS]
    units: list[str] = []
    real_run = UnitRunner.run_variants

    def run_variants(self, unit, variants, tensors=None):
        units.append(unit.job.name)
        if kill_after is not None and len(units) > kill_after:
            raise Killed
        return real_run(self, unit, variants, tensors)

    monkeypatch.setattr(UnitRunner, "run_variants", run_variants)
    kill_after = None
    merge_variants(pretrained, finetuned, [(str(tmp_path / "scratch"), _ta(0.5))], **ARGUMENTS)
    kill_after = 2 * len(units) // 3  # two thirds through the pass
    units.clear()
    with pytest.raises(Killed):
        merge_variants(pretrained, finetuned, outputs, **{**ARGUMENTS, "num_threads": 1})
    for folder, recipe in outputs:
        assert not Path(folder).exists() and work_dir_for(Path(folder)).is_dir()  # nothing looks finished
        assert not holds_finished_merge(pretrained, finetuned, folder, merging_method_name=recipe, dtype="bfloat16",
                                        vocab_policy="mergelm", max_shard_bytes=20_000)
    assert any(work_dir_for(Path(outputs[0][0])).glob("*.safetensors"))  # a completed shard survives the kill
    kill_after, killed_at = None, len(units)
    merge_variants(pretrained, finetuned, outputs, **ARGUMENTS, resume=True)
    resumed = len(units) - killed_at
    units.clear()
    merge_checkpoints(pretrained, finetuned, str(tmp_path / "alone"), merging_method_name=_ta(1.0), **ARGUMENTS)
    assert resumed < len(units)  # the completed shards were not merged again
    assert _files(Path(outputs[2][0])) == _files(tmp_path / "alone")


def test_resume_leaves_finished_outputs_out_of_the_pass(family, tmp_path, monkeypatch):  # noqa: F811
    pretrained, finetuned = _inputs(family)
    outputs = [(str(tmp_path / f"{v}"), _ta(v)) for v in LAMBDAS]
    merge_variants(pretrained, finetuned, outputs, **ARGUMENTS)
    before = {folder: (Path(folder) / MERGE_CONFIG).stat().st_mtime_ns for folder, _ in outputs}
    removed = outputs[1][0]
    expected = _files(Path(removed))
    for item in Path(removed).iterdir():
        item.unlink()
    Path(removed).rmdir()
    summaries = merge_variants(pretrained, finetuned, outputs, **ARGUMENTS, resume=True)
    assert [s.get("already_complete", False) for s in summaries] == [True, False, True]
    assert _files(Path(removed)) == expected
    for folder, _ in (outputs[0], outputs[2]):
        assert (Path(folder) / MERGE_CONFIG).stat().st_mtime_ns == before[folder]  # left as it was


@pytest.mark.parametrize(
    ("recipes", "match"),
    [([_ta(0.5), _ta(1.0, dare=Dare(0.6, seed=3))], "one DARE setting for every recipe"),
     ([_ta(0.5), _ta(1.0, dare=Dare(0.5, seed=4))], "one DARE setting for every recipe"),
     ([Recipe("fisher_merging"), Recipe("fisher_merging")], "without per-model statistics")],
)
def test_recipes_that_do_not_share_their_deltas_are_refused(family, tmp_path, recipes, match):  # noqa: F811
    pretrained, finetuned = _inputs(family)
    with pytest.raises(ValueError, match=match):
        merge_variants(pretrained, finetuned, [(str(tmp_path / f"{i}"), r) for i, r in enumerate(recipes)],
                       **ARGUMENTS)
    assert not any(tmp_path.iterdir())


def test_two_outputs_in_one_folder_are_refused(family, tmp_path):  # noqa: F811
    pretrained, finetuned = _inputs(family)
    with pytest.raises(ValueError, match="one folder per output"):
        merge_variants(pretrained, finetuned, [(str(tmp_path / "x"), _ta(0.5)), (str(tmp_path / "x"), _ta(1.0))],
                       **ARGUMENTS)
