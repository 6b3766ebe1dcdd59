import os
from pathlib import Path

import pytest

from common.run_dir import atomic_write_json, hyperparameter_dirname, prepare_run_dir, read_json


def test_atomic_write_leaves_no_temporary_and_is_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "metrics.json"
        atomic_write_json(path, {"accuracy": 0.5})
    finally:
        os.umask(old)
    assert read_json(path) == {"accuracy": 0.5}
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_dir_names_come_from_the_configuration():
    assert hyperparameter_dirname({"weight_mask_rate": 0.9, "seed": 0, "rates": [0.1, 0.2]}) == (
        "rates=0.1+0.2,seed=0,weight_mask_rate=0.9"
    )
    assert hyperparameter_dirname({}) == "default"


def test_non_empty_run_dir_needs_overwrite_or_resume(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="pass --overwrite to replace it or --resume"):
        prepare_run_dir(tmp_path)
    assert prepare_run_dir(tmp_path, resume=True) == tmp_path


def test_long_folder_names_stay_within_the_file_name_limit_and_unique():
    from common.run_dir import hyperparameter_dirname

    short = {"a": 1, "b": "x" * 200}
    assert hyperparameter_dirname(short) == "a=1,b=" + "x" * 200  # up to 255 bytes: unchanged
    long_a, long_b = {"a": 1, "b": "x" * 300}, {"a": 1, "b": "x" * 299 + "y"}
    names = [hyperparameter_dirname(h) for h in (long_a, long_b)]
    assert all(len(n.encode()) <= 255 for n in names) and names[0] != names[1]
    assert names[0].startswith("a=1,b=xxx") and names[0] == hyperparameter_dirname(dict(long_a))


def test_overwrite_clears_the_old_files_and_resume_keeps_them(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "grid.json").write_text("{}")
    (run / "model" / "weights.bin").write_text("w")
    assert prepare_run_dir(run, resume=True) == run
    assert sorted(p.name for p in run.iterdir()) == ["grid.json", "metrics.json", "model"]
    assert prepare_run_dir(run, overwrite=True, resume=True) == run  # resume keeps the files
    assert (run / "metrics.json").exists()
    assert prepare_run_dir(run, overwrite=True) == run
    assert run.is_dir() and not any(run.iterdir())  # no stale metrics.json / grid.json left to mistake
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # only that folder's contents


def test_overwrite_unlinks_symlinks_without_touching_their_targets(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("k")
    run = tmp_path / "run"
    run.mkdir()
    (run / "linked").symlink_to(elsewhere, target_is_directory=True)
    (run / "metrics.json").write_text("{}")
    prepare_run_dir(run, overwrite=True)
    assert not any(run.iterdir()) and (elsewhere / "keep.txt").read_text() == "k"
    linked_run = tmp_path / "linked_run"
    linked_run.symlink_to(elsewhere, target_is_directory=True)  # the run folder itself is a link
    assert prepare_run_dir(linked_run, overwrite=True) == linked_run
    assert linked_run.is_dir() and not linked_run.is_symlink() and not any(linked_run.iterdir())
    assert (elsewhere / "keep.txt").read_text() == "k"


def test_a_file_or_the_working_folder_is_never_cleared(tmp_path, monkeypatch):
    path = tmp_path / "run"
    path.write_text("not a folder")
    for kwargs in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(NotADirectoryError, match="is a file"):
            prepare_run_dir(path, **kwargs)
    assert path.read_text() == "not a folder"
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("n")
    (work / "sub" / "notes.txt").write_text("n")
    monkeypatch.chdir(work / "sub")
    for folder in (work, work / "sub", "."):
        with pytest.raises(ValueError, match="refusing to clear"):
            prepare_run_dir(folder, overwrite=True)
    assert (work / "notes.txt").exists() and (work / "sub" / "notes.txt").exists()


def test_git_commit_is_recorded_without_the_git_command(monkeypatch, tmp_path):
    import subprocess

    from common import run_dir

    expected = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(run_dir.__file__).parent).stdout.strip()
    assert run_dir.git_commit() == expected
    monkeypatch.setattr(run_dir.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert run_dir.git_commit() == expected  # read from .git itself
    git = tmp_path / "repo" / ".git"
    git.mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs with: peeled\n" + "ab" * 20 + " refs/heads/main\n")
    assert run_dir._commit_from_files(tmp_path / "repo" / "sub") == "ab" * 20
    assert run_dir._commit_from_files(tmp_path) is None
