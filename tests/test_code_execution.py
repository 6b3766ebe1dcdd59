"""Sandboxed execution: verdicts, timeout, and that hostile programs leave the harness and its files alone."""

from __future__ import annotations

import socket
import tempfile
import time

import pytest

from evaluation.code_execution import PASSED, TIMED_OUT, check_sandbox, execute_programs, run_program


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
