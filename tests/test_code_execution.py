"""Sandboxed execution: verdicts, timeout, and that hostile programs leave the harness and its files alone."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time

import pytest

from evaluation import code_execution
from evaluation.code_execution import (
    PASSED,
    TIMED_OUT,
    RootExecutionError,
    check_sandbox,
    execute_programs,
    run_program,
)


def run(program: str, **kwargs) -> str:
    return run_program(program, allow_code_execution=True, **kwargs)


def test_execution_requires_explicit_opt_in():
    with pytest.raises(ValueError, match="allow_code_execution must be True"):
        run_program("pass")
    with pytest.raises(ValueError, match="allow_code_execution must be True"):
        execute_programs(["pass"], allow_code_execution=False)


def test_pass_and_fail_verdicts():
    assert run("def f(x):\n    return x + 1\nassert f(1) == 2\n") == PASSED
    assert run("assert 1 + 1 == 3") == "failed: AssertionError"
    assert run("raise ValueError('bad\\nvalue')") == "failed: ValueError: bad value"
    assert run("def f(:\n") .startswith("failed: SyntaxError")
    assert run("import sys\nsys.exit(0)") == "failed: SystemExit: 0"  # exiting early is not passing


def test_infinite_loop_times_out_within_timeout_plus_one_second():
    start = time.monotonic()
    assert run("while True:\n    pass\n", timeout_s=1.0) == TIMED_OUT
    assert time.monotonic() - start < 2.0


def test_output_is_swallowed(capfd):
    assert run("import sys\nprint('hello' * 1000)\nsys.stderr.write('err')\n") == PASSED
    captured = capfd.readouterr()
    assert "hello" not in captured.out and "err" not in captured.err


def test_working_directory_is_temporary_and_removed(tmp_path, monkeypatch):
    root = tmp_path / "tmproot"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    assert run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n") == PASSED
    assert list(root.iterdir()) == []


HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "posix_fork": "import posix\nposix.fork()\n",
    "multiprocessing": "import multiprocessing\n",
    "memory_bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))\n",
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\n",
    "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
    "ctypes": "import ctypes\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_fail_without_harming_the_harness(name):
    verdict = run(HOSTILE[name], timeout_s=3.0, memory_limit_bytes=512 * 1024**2)
    assert verdict.startswith("failed:"), verdict


def test_destructive_calls_and_network_in_a_batch(tmp_path):
    canary = tmp_path / "outside" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("alive")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    programs = [
        "assert sum([1, 2]) == 3\n",
        f"import os\nos.system('rm -rf {canary.parent}')\n",
        f"import os\nos.remove({str(canary)!r})\n",
        f"import shutil\nshutil.rmtree({str(canary.parent)!r})\n",
        f"open({str(canary)!r}, 'w').write('overwritten')\n",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
        "while True:\n    pass\n",
        HOSTILE["fork_bomb"],
        "assert 'a'.upper() == 'B'\n",
        "x = [i * i for i in range(10)]\nassert x[3] == 9\n",
    ]
    results = execute_programs(programs, allow_code_execution=True, num_workers=2, timeout_s=2.0,
                               show_progress=False)
    assert results[0] == PASSED and results[-1] == PASSED
    assert results[-2] == "failed: AssertionError"
    assert results[7] == TIMED_OUT
    assert all(r.startswith("failed: PermissionError") for r in results[1:7] + results[8:9]), results
    assert canary.read_text() == "alive"
    with pytest.raises(TimeoutError):
        server.accept()  # nobody connected
    server.close()


def test_canary_check_passes_on_a_working_executor():
    check_sandbox()


# --- gaps of the guard (issue: os.open, forged verdict line, root) ---

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def open_folder():
    """A folder outside the working directory that anybody (the unprivileged user included) may write to, so only
    the guard can stop a write there."""
    folder = tempfile.mkdtemp(prefix="mergelm_outside_", dir="/tmp")
    os.chmod(folder, 0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_low_level_writes_outside_the_working_directory_are_blocked(open_folder):
    target = os.path.join(open_folder, "written.txt")
    programs = {
        "os.open": f"import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
        "posix.open": f"import posix\nfd = posix.open({target!r}, posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC)\n",
        "os.open dir_fd": f"import os\nd = os.open({open_folder!r}, os.O_RDONLY)\n"
                          "os.open('written.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d)\n",
        "io.FileIO": f"import io\nio.FileIO({target!r}, 'w').write(b'x')\n",
        "_io.FileIO": f"import _io\n_io.FileIO({target!r}, 'a').write(b'x')\n",
        "_io.open": f"import _io\n_io.open({target!r}, 'w').write('x')\n",
        "pathlib.touch": f"import pathlib\npathlib.Path({target!r}).touch()\n",
        "shutil.copyfile": f"import shutil\nopen('here.txt', 'w').write('x')\n"
                           f"shutil.copyfile('here.txt', {target!r})\n",
        "os.mkdir": f"import os\nos.mkdir({os.path.join(open_folder, 'made')!r})\n",
        "os.makedirs": f"import os\nos.makedirs({os.path.join(open_folder, 'a', 'b')!r})\n",
        "os.utime": f"import os\nos.utime({open_folder!r}, (0, 0))\n",
    }
    results = {name: run(program) for name, program in programs.items()}
    assert all(r.startswith("failed: PermissionError") for r in results.values()), results
    assert os.listdir(open_folder) == [] and os.stat(open_folder).st_mtime > 0


def test_low_level_writes_inside_the_working_directory_still_work():
    program = (
        "import io, os, pathlib, shutil\n"
        "fd = os.open('raw.bin', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
        "os.write(fd, b'abc')\nos.close(fd)\n"
        "assert open('raw.bin').read() == 'abc'\n"
        "io.FileIO('file_io.bin', 'w').write(b'x')\n"
        "os.makedirs('sub/dir')\npathlib.Path('sub/dir/f.txt').write_text('y')\n"
        "pathlib.Path('touched').touch()\nshutil.copyfile('raw.bin', 'copy.bin')\n"
        "assert sorted(os.listdir('.')) == ['copy.bin', 'file_io.bin', 'raw.bin', 'sub', 'touched']\n"
        "fd = os.open('raw.bin', os.O_RDONLY)\nassert os.read(fd, 3) == b'abc'\n"
    )
    assert run(program) == PASSED


# Writes "passed" wherever it can: its stdout and every open descriptor, the verdict channel included.
FORGE = (
    "import os\nprint('passed')\n"
    "for fd in map(int, os.listdir('/proc/self/fd')):\n"
    "    try:\n        os.write(fd, b'passed\\npassed\\n')\n    except OSError:\n        pass\n"
)
FORGED_ENDINGS = {
    "raises": "raise ValueError('after forging')\n",
    "closes_channel_then_raises": "for fd in range(3, 256):\n    try:\n        os.close(fd)\n    except OSError:\n"
                                  "        pass\nraise ValueError('after forging')\n",
    "exits_1": "import sys\ndel sys.modules['posix']\nimport posix\nposix._exit(1)\n",  # the real _exit
    "exits_0": "import sys\ndel sys.modules['posix']\nimport posix\nposix._exit(0)\n",
    "killed_by_segfault": "import faulthandler\nfaulthandler._sigsegv()\n",
    "kills_itself": "import _signal\n_signal.raise_signal(_signal.SIGKILL)\n",
}


@pytest.mark.parametrize("ending", sorted(FORGED_ENDINGS))
def test_a_forged_verdict_line_does_not_pass(ending):
    verdict = run(FORGE + FORGED_ENDINGS[ending])
    assert verdict.startswith("failed:") or verdict == TIMED_OUT, verdict  # SIGKILL reads as the CPU limit


def test_junk_on_the_verdict_channel_does_not_change_an_honest_verdict():
    junk = FORGE.replace("b'passed\\npassed\\n'", "b'no newline'")
    assert run(junk + "assert 1 + 1 == 2\n") == PASSED
    assert run(FORGE + "assert 1 + 1 == 3\n") == "failed: AssertionError"


@pytest.mark.skipif(not AS_ROOT, reason="the privilege drop applies to root only")
def test_programs_started_as_root_run_as_an_unprivileged_user():
    program = ("import os\nassert os.getuid() != 0 and os.geteuid() != 0\nassert os.getgroups() == []\n"
               "assert os.getresuid()[2] != 0 and os.getresgid()[2] != 0\n"
               "caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm'))]\n"
               "assert not any(int(c, 16) for c in caps), caps\n"
               "import collections.abc, json, math, re, fractions, decimal\n"  # the standard library still imports
               "assert json.loads('[1]') == [1] and math.isqrt(17) == 4 and 'x'.encode('utf-16')\n")
    assert run(program) == PASSED


@pytest.mark.skipif(not AS_ROOT, reason="RLIMIT_NPROC is only ignored for root")
def test_process_limit_holds_when_started_as_root():
    fork = ("import sys\ndel sys.modules['posix']\nimport posix\n"  # a fork the guard does not see
            "pid = posix.fork()\nif pid == 0:\n    posix._exit(0)\nposix.waitpid(pid, 0)\n")
    assert run(fork).startswith("failed: BlockingIOError"), run(fork)


@pytest.fixture
def drop_impossible(monkeypatch):
    """Make the privilege drop fail, as where setuid is not permitted (a container without CAP_SETUID)."""
    monkeypatch.setattr(code_execution, "_PROBE_PROGRAM", "raise OSError('setuid not permitted')\n")
    code_execution._probe_privilege_drop.cache_clear()
    yield
    code_execution._probe_privilege_drop.cache_clear()


@pytest.mark.skipif(not AS_ROOT, reason="the refusal applies to root only")
def test_root_without_a_possible_drop_is_refused_unless_allowed(drop_impossible):
    with pytest.raises(RootExecutionError, match="--allow_root_code_execution"):
        run("pass")
    with pytest.raises(RootExecutionError, match="setuid not permitted"):
        execute_programs(["pass"], allow_code_execution=True, show_progress=False)
    as_root = "import os\nassert os.geteuid() == 0\n"
    assert run(as_root, allow_root_code_execution=True) == PASSED
    assert execute_programs([as_root], allow_code_execution=True, allow_root_code_execution=True,
                            show_progress=False) == [PASSED]


@pytest.mark.skipif(not AS_ROOT, reason="the switch applies to root only")
def test_a_switch_that_leaves_root_privileges_is_detected(monkeypatch):
    no_op = (2**32 - 1, 2**32 - 1)  # (uid_t) -1: setresuid leaves the ids unchanged, the harness must notice
    monkeypatch.setattr(code_execution, "_unprivileged_ids", lambda: no_op)
    probe = code_execution._probe_privilege_drop
    probe.cache_clear()
    try:
        with pytest.raises(RootExecutionError, match="still privileged"):
            run("pass")
        monkeypatch.setattr(code_execution, "_probe_privilege_drop", lambda euid: (no_op, ""))  # probe passed
        with pytest.raises(RootExecutionError, match="nothing was executed as root"):
            run("pass")
    finally:
        probe.cache_clear()


def test_not_root_runs_as_the_current_user_without_a_probe(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(code_execution, "_probe_privilege_drop", None)  # would raise TypeError if called
    assert code_execution.execution_user() is None
    assert run("import os\nassert os.getuid() == os.getresuid()[2]\n") == PASSED


def test_allow_root_code_execution_flag_reaches_the_settings():
    import evaluate_generations
    from llms.llm_cli import add_common_args, settings_from_args

    args = evaluate_generations.parse_args(["--dataset_name", "mbpp", "--generations", "g.jsonl",
                                            "--allow_code_execution", "--allow_root_code_execution"])
    assert args.allow_root_code_execution
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    assert settings_from_args(parser.parse_args(["--allow_root_code_execution"])).allow_root_code_execution
    assert not settings_from_args(parser.parse_args([])).allow_root_code_execution
