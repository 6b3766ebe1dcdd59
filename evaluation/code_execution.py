"""Run model-generated programs, one process per sample, and report "passed" / "failed: ..." / "timed out".

The layering follows openai/human-eval's ``execution.py`` (Chen et al., 2021, arXiv:2107.03374):

* one fresh ``python -I`` process per program, started in its own session (process group), inside a new
  temporary working directory that is removed afterwards;
* a wall-clock timeout enforced by the parent, which then kills the whole process group;
* resource limits set in the child before the program runs: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
  ``RLIMIT_NPROC`` (no new processes; not enforced for root), ``RLIMIT_FSIZE`` and no core dumps;
* a reliability guard in the child that disables destructive or escaping calls (``os.system``,
  ``os.remove``, ``os.kill``, ``os.fork``, ``shutil.rmtree``, ``subprocess``, sockets, ``ctypes``, writes
  with ``open`` outside the working directory, ...);
* stdin, stdout and stderr of the program go to ``/dev/null``; the verdict travels on a private descriptor;
* many programs in parallel through a ``ThreadPoolExecutor`` whose threads only wait on their process.

WARNING: this is NOT a security sandbox. It stops accidents made by a model that writes plausible code
(deleting files, forking, looping forever); it does not stop deliberately malicious code, which can undo the
guard from inside Python. Run untrusted generations in a disposable container or VM without network access
and without mounts you care about. Nothing is executed unless the caller passes ``allow_code_execution=True``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

PASSED = "passed"
TIMED_OUT = "timed out"
DEFAULT_TIMEOUT_S = 3.0  # human-eval and bigcode-evaluation-harness default
DEFAULT_MEMORY_LIMIT_BYTES = 2 * 1024**3
DEFAULT_FILE_SIZE_LIMIT_BYTES = 64 * 1024**2
_MAX_REASON_CHARS = 300

# Source of the child process. It reads the program from stdin, moves its own stdin/stdout/stderr to
# /dev/null (keeping a private copy of stdout for the verdict), sets the limits, installs the guard, runs
# the program and writes one line: the verdict.
_CHILD_SOURCE = r'''
import builtins, os, resource, sys

def _blocked(name):
    def blocked(*args, **kwargs):
        raise PermissionError(name + " is disabled in the sandbox")
    return blocked

_OS_NAMES = """kill killpg system remove removedirs rmdir unlink rename renames replace truncate
ftruncate chmod fchmod lchmod chown fchown lchown chflags lchflags chroot chdir fchdir link symlink mkfifo mknod
fork forkpty vfork setsid setpgid setpgrp setuid setgid seteuid setegid setreuid setregid setresuid setresgid
popen execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve
spawnvp spawnvpe posix_spawn posix_spawnp _exit abort plock pidfd_open""".split()

def _guard(workdir):
    import posix, shutil, socket, _socket, subprocess
    for module in (os, posix):
        for name in _OS_NAMES:
            if hasattr(module, name):
                setattr(module, name, _blocked("os." + name))
    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, _blocked("shutil." + name))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _blocked("subprocess." + name))
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server"):
            if hasattr(module, name):
                setattr(module, name, _blocked("socket." + name))
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "resource", "psutil", "joblib", "tkinter", "pty",
                 "multiprocessing", "_multiprocessing", "ipdb", "pdb", "signal"):
        sys.modules[name] = None
    real_open = builtins.open
    root = os.path.realpath(workdir) + os.sep
    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            path = os.path.realpath(os.fsdecode(file))
            if not path.startswith(root):
                raise PermissionError("writing outside the sandbox directory is disabled: " + path)
        return real_open(file, mode, *args, **kwargs)
    builtins.open = guarded_open
    import io
    io.open = guarded_open
    builtins.exit = None
    builtins.quit = None
    builtins.help = None

def _main():
    memory_bytes, cpu_seconds, file_bytes = (int(v) for v in sys.argv[1:4])
    program = sys.stdin.read()
    verdict_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    limits = [(resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_DATA, memory_bytes),
              (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)]
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    write, exit_now, workdir = os.write, os._exit, os.getcwd()
    _guard(workdir)
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__sandbox__"})
        verdict = "passed"
    except BaseException as error:
        message = str(error).replace("\n", " ")
        verdict = "failed: " + type(error).__name__ + (": " + message if message else "")
    write(verdict_fd, (verdict[:300] + "\n").encode("utf-8", "replace"))
    exit_now(0)

_main()
'''


def _child_env(workdir: str) -> dict[str, str]:
    env = {"HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _verdict(process: subprocess.Popen, stdout: bytes) -> str:
    line = stdout.decode("utf-8", "replace").strip().splitlines()
    if line:
        return line[-1][:_MAX_REASON_CHARS]
    code = process.returncode
    if code is not None and code < 0 and -code in (signal.SIGXCPU, signal.SIGKILL):
        return TIMED_OUT  # CPU limit reached
    if code is not None and code < 0:
        return f"failed: killed by signal {signal.Signals(-code).name}"
    return f"failed: process exited with code {code} without a verdict"


def run_program(
    program: str,
    *,
    allow_code_execution: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    file_size_limit_bytes: int = DEFAULT_FILE_SIZE_LIMIT_BYTES,
) -> str:
    """Execute one program in a fresh, limited process (see the module docstring: NOT a security sandbox).

    Args:
        program: Python source; it "passes" when it runs to the end without raising.
        allow_code_execution: must be ``True``; the explicit opt-in to running model-generated code.
        timeout_s: wall-clock limit in seconds (> 0); the process group is killed when it is reached.
        memory_limit_bytes: ``RLIMIT_AS`` of the child.
        file_size_limit_bytes: ``RLIMIT_FSIZE`` of the child (largest file it may write).

    Returns:
        ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``.
    """
    _check_allowed(allow_code_execution)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    cpu_seconds = math.ceil(timeout_s) + 1
    limits = [str(memory_limit_bytes), str(cpu_seconds), str(file_size_limit_bytes)]
    with tempfile.TemporaryDirectory(prefix="mergelm_exec_", ignore_cleanup_errors=True) as workdir:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD_SOURCE, *limits], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=workdir, env=_child_env(workdir), start_new_session=True,
        )
        try:
            stdout, _ = process.communicate(program.encode("utf-8", "surrogatepass"), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return TIMED_OUT
        finally:
            _kill_group(process)  # strays that stayed in the group
        return _verdict(process, stdout)


def _check_allowed(allow_code_execution: bool) -> None:
    if allow_code_execution is not True:
        raise ValueError(
            f"allow_code_execution must be True to execute model-generated code, got {allow_code_execution!r}; "
            "pass allow_code_execution=True (CLI: --allow_code_execution), preferably inside a container"
        )


def check_sandbox(*, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Canary run at harness start: a passing program must pass and known-bad ones must fail.

    Raises:
        RuntimeError: when the executor reports a wrong verdict (for example a broken interpreter or a
            guard that no longer blocks ``os.system``), before any real sample is scored.
    """
    canaries = {"x = 1 + 1\nassert x == 2\n": True, "assert 1 + 1 == 3\n": False,
                "import os\nos.system('true')\n": False}
    for program, should_pass in canaries.items():
        verdict = run_program(program, allow_code_execution=True, timeout_s=max(timeout_s, 5.0))
        if (verdict == PASSED) != should_pass:
            raise RuntimeError(f"code-execution canary {program!r} gave {verdict!r}; the executor is broken")


def execute_programs(
    programs: Sequence[str],
    *,
    allow_code_execution: bool = False,
    num_workers: int = 4,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    show_progress: bool = True,
) -> list[str]:
    """Execute many programs in parallel, one process each, after a canary check.

    Args:
        programs: Python sources (prompt + completion + tests, already assembled).
        allow_code_execution: must be ``True`` (explicit opt-in; see the module docstring).
        num_workers: processes running at the same time (>= 1).
        timeout_s: wall-clock limit per program in seconds.
        memory_limit_bytes: ``RLIMIT_AS`` per program.
        show_progress: show a tqdm bar on stderr.

    Returns:
        One verdict per program, in input order: ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``.
    """
    _check_allowed(allow_code_execution)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    check_sandbox(timeout_s=timeout_s)
    results: list[str | None] = [None] * len(programs)
    kwargs = dict(allow_code_execution=True, timeout_s=timeout_s, memory_limit_bytes=memory_limit_bytes)
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = {pool.submit(run_program, program, **kwargs): i for i, program in enumerate(programs)}
        bar = tqdm(as_completed(futures), total=len(futures), desc="executing", disable=not show_progress)
        for future in bar:
            results[futures[future]] = future.result()
    logger.info("executed %d programs: %d passed", len(programs), sum(r == PASSED for r in results))
    return [r for r in results if r is not None]
