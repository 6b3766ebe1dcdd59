import os

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
