"""scripts/check_gpu_requirements.py: vLLM's declared requirements against ours, offline, with fabricated metadata.

No network: the PyPI functions are not called; a "released versions" list stands in for PyPI's.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT
from packaging.specifiers import SpecifierSet
from packaging.version import Version

_SCRIPT = REPO_ROOT / "scripts" / "check_gpu_requirements.py"
_SPEC = importlib.util.spec_from_file_location("check_gpu_requirements", _SCRIPT)
gpu = sys.modules.setdefault("check_gpu_requirements", importlib.util.module_from_spec(_SPEC))
if not hasattr(gpu, "main"):
    _SPEC.loader.exec_module(gpu)

OURS = "torch>=2.1\ntransformers>=5.0\nnumba>=0.60\nnumpy>=1.24\n"
GPU = ("# the GPU extra\n-r requirements.txt\nvllm==0.32.0\ntorch==2.13.0\n"
       "transformers>=5.16.1,<5.20.0  # vLLM's range\n")
VLLM_0_32 = gpu.Declaration("0.32.0", ["numpy", "transformers<5.20.0,>=5.16.1", "numba==0.65.0", "torch==2.13.0",
                                       'scipy; extra == "bench"', 'setuptools<81; python_version > "3.11"'],
                            requires_python="<3.15,>=3.11")
VLLM_0_19 = gpu.Declaration("0.19.0", ["transformers<5,>=4.56.0", "torch==2.10.0", "numba==0.61.2"],
                            requires_python="<3.14,>=3.10")
ENV = gpu.target_environment("3.11.7")


def requirements(tmp_path, ours=OURS, extra=GPU):
    (tmp_path / "requirements.txt").write_text(ours)
    (tmp_path / "requirements-gpu.txt").write_text(extra)
    return gpu.read_requirement_files([tmp_path / "requirements.txt", tmp_path / "requirements-gpu.txt"])


def test_files_are_read_with_includes_once_and_comments_dropped(tmp_path):
    found = requirements(tmp_path)
    assert [str(r) for r, _ in found] == ["torch>=2.1", "transformers>=5.0", "numba>=0.60", "numpy>=1.24",
                                          "vllm==0.32.0", "torch==2.13.0", "transformers<5.20.0,>=5.16.1"]
    assert found[-1][1] == "requirements-gpu.txt:5"
    combined = gpu.combined_specifiers(found, ENV)
    assert combined["transformers"][0] == SpecifierSet(">=5.0,>=5.16.1,<5.20.0")
    assert gpu.pinned_version(combined["vllm"][0]) == "0.32.0"
    assert gpu.pinned_version(SpecifierSet("==5.0.*")) is None


def test_consistent_pins_pass(tmp_path):
    report = gpu.check_declaration(requirements(tmp_path), VLLM_0_32, env=ENV)
    assert report.problems == []
    assert any(n.startswith("transformers:") and "compatible" in n for n in report.notes)
    assert not any(n.startswith(("scipy", "setuptools")) for n in report.notes)  # extras, other Pythons: ignored


def test_vllm_needing_transformers_below_5_is_a_conflict(tmp_path):
    found = requirements(tmp_path, extra="-r requirements.txt\nvllm==0.19.0\ntorch==2.10.0\n")
    report = gpu.check_declaration(found, VLLM_0_19, env=ENV)
    assert len(report.problems) == 1, report.problems  # torch and numba>=0.60 accept vLLM's pins
    assert report.problems[0].startswith("transformers: no version satisfies both vllm 0.19.0's")
    assert "require transformers<5" in report.problems[0]


def test_torch_pin_different_from_vllms_is_a_conflict(tmp_path):
    report = gpu.check_declaration(requirements(tmp_path, extra=GPU.replace("torch==2.13.0", "torch==2.14.0")),
                                   VLLM_0_32, env=ENV)
    assert len(report.problems) == 1 and report.problems[0].startswith("torch: no version")
    assert "pip would replace the torch" in report.problems[0]


def test_unpinned_vllm_and_unpinned_torch_are_reported(tmp_path):
    report = gpu.check_declaration(requirements(tmp_path, extra="-r requirements.txt\nvllm>=0.6\n"), VLLM_0_32,
                                   env=ENV)
    assert any(p.startswith("vllm is not pinned") for p in report.problems)
    assert any("does not pin torch" in p for p in report.problems)


def test_checked_release_must_be_the_pinned_one(tmp_path):
    other = gpu.Declaration("0.31.0", VLLM_0_32.requires_dist, VLLM_0_32.requires_python)
    report = gpu.check_declaration(requirements(tmp_path), other, env=ENV)
    assert report.problems == ["the metadata checked is vllm 0.31.0, but the pin is vllm==0.32.0"]
    assert gpu.check_declaration(requirements(tmp_path), other, env=ENV, compare_pin=False).problems == []


def test_python_outside_requires_python_and_markers_follow_the_target(tmp_path):
    found = requirements(tmp_path, ours=OURS + "setuptools>=82\n")
    report = gpu.check_declaration(found, VLLM_0_32, env=gpu.target_environment("3.10"))
    assert report.problems == ["vllm 0.32.0 needs Python <3.15,>=3.11; the target is Python 3.10.0"]
    # vLLM's setuptools<81 applies on Python > 3.11 only
    assert gpu.check_declaration(found, VLLM_0_32, env=gpu.target_environment("3.11.7")).problems == []
    problems = gpu.check_declaration(found, VLLM_0_32, env=gpu.target_environment("3.12.1")).problems
    assert len(problems) == 1 and problems[0].startswith("setuptools: no version")


def test_released_versions_decide_when_given(tmp_path):
    found = requirements(tmp_path)
    released = {"transformers": ["5.15.0", "5.19.0", "5.25.0"], "torch": ["2.13.0"], "numba": ["0.65.0"],
                "numpy": ["2.3.5"]}
    report = gpu.check_declaration(found, VLLM_0_32, env=ENV, released=released)
    assert report.problems == [] and any("newest: 5.19.0" in n for n in report.notes)
    released["transformers"] = ["5.15.0", "5.25.0"]  # the ranges intersect, but no release lies in both
    problems = gpu.check_declaration(found, VLLM_0_32, env=ENV, released=released).problems
    assert len(problems) == 1 and problems[0].startswith("transformers: no released version")


@pytest.mark.parametrize(("ours", "theirs", "expected"), [
    (">=5.0", "<5,>=4.56.0", False),
    (">=5.0", "!=5.0.*,!=5.1.*,!=5.5.0,>=4.56.0", True),
    (">=5.0,<=5.5.0", "!=5.0.*,!=5.1.*,!=5.2.*,!=5.3.*,!=5.4.*,!=5.5.0,>=4.56.0", False),
    (">2.0,<2.0.1", ">=2.0", True),  # open interval: a point just above the boundary
    ("==2.13.0", "==2.13.0", True),
    ("==2.13.0", "==2.14.0", False),
])
def test_specifier_intersection(ours, theirs, expected):
    candidates = gpu.candidate_versions(SpecifierSet(ours), SpecifierSet(theirs))
    assert bool(gpu.common_versions(SpecifierSet(ours), SpecifierSet(theirs), candidates)) is expected


def test_installed_versions_are_checked(tmp_path):
    found = requirements(tmp_path)
    good = {"torch": "2.13.0", "transformers": "5.19.0", "numba": "0.65.0", "numpy": "2.3.5", "vllm": "0.32.0"}
    assert gpu.check_declaration(found, VLLM_0_32, env=ENV, installed=good).problems == []
    bad = {**good, "torch": "2.13.0+cpu", "transformers": "5.25.0", "vllm": "0.31.0"}
    bad.pop("numpy")
    problems = gpu.check_declaration(found, VLLM_0_32, env=ENV, installed=bad).problems
    assert any(p.startswith("torch 2.13.0+cpu is a CPU build") for p in problems)
    assert any(p.startswith("transformers 5.25.0 is installed; ours") for p in problems)
    assert any(p.startswith("transformers 5.25.0 is installed; vllm 0.32.0 needs") for p in problems)
    assert any(p.startswith("vllm 0.31.0 is installed") for p in problems)
    assert any(p.startswith("numpy is not installed") for p in problems)


def test_metadata_file_and_exit_status(tmp_path, capsys, monkeypatch):
    requirements(tmp_path)
    monkeypatch.setattr(gpu, "installed_declaration", lambda: None)
    files = ["--requirements", str(tmp_path / "requirements.txt"), str(tmp_path / "requirements-gpu.txt")]
    metadata = tmp_path / "METADATA"
    lines = [f"Requires-Dist: {r}" for r in VLLM_0_32.requires_dist]
    metadata.write_text("Metadata-Version: 2.4\nName: vllm\nVersion: 0.32.0\nRequires-Python: <3.15,>=3.11\n"
                        + "\n".join(lines) + "\n\nlong description\n")
    declaration = gpu.parse_metadata(metadata.read_text(), "METADATA")
    assert declaration.requires_dist == VLLM_0_32.requires_dist and declaration.version == "0.32.0"
    assert gpu.main([*files, "--vllm_metadata", str(metadata), "--python", "3.11.7"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("consistent")
    metadata.write_text(metadata.read_text().replace("torch==2.13.0", "torch==2.14.0"))
    assert gpu.main([*files, "--vllm_metadata", str(metadata), "--python", "3.11.7"]) == 1
    assert "CONFLICT  torch" in capsys.readouterr().out
    # offline, no vLLM installed, a release not recorded in the script: nothing to check against
    (tmp_path / "requirements-gpu.txt").write_text(GPU.replace("0.32.0", "0.1.0"))
    assert gpu.main(files) == 2


def test_the_repositorys_files_agree_with_the_recorded_release():
    """requirements.txt + requirements-gpu.txt against the pinned release's recorded metadata, on each Python
    the release accepts."""
    found = gpu.read_requirement_files([REPO_ROOT / f for f in gpu.DEFAULT_FILES])
    pin = gpu.pinned_version(gpu.combined_specifiers(found, ENV)["vllm"][0])
    declaration = gpu.recorded_declaration(pin)
    assert declaration is not None, f"record vllm {pin}'s metadata in RECORDED_RELEASES (--pypi shows it)"
    for python in ("3.11.7", "3.12.1", "3.13.0", "3.14.0"):
        report = gpu.check_declaration(found, declaration, env=gpu.target_environment(python))
        assert report.problems == [], (python, report.problems)
    assert Version(pin) >= Version("0.19.1")  # older releases need transformers<5
