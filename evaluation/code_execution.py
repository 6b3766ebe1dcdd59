"""Run model-generated programs, one process per sample, and report "passed" / "failed: ..." / "timed out".

The layering follows openai/human-eval's ``execution.py`` (Chen et al., 2021, arXiv:2107.03374):

* one fresh ``python -I`` process per program, started in its own session (process group), inside a new
  temporary working directory that is removed afterwards;
* a wall-clock timeout enforced by the parent, which then kills the whole process group;
* started as root, the child switches to the unprivileged user ``nobody`` (no supplementary groups, no
  capabilities) before the program runs; where that is impossible, nothing runs unless the caller passes
  ``allow_root_code_execution=True`` (see :func:`execution_user`);
* resource limits set in the child before the program runs: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
  ``RLIMIT_NPROC`` (no new processes or threads; enforced because the program never runs as root unless
  allowed), ``RLIMIT_FSIZE`` and no core dumps;
* a reliability guard in the child that disables destructive or escaping calls (``os.system``,
  ``os.remove``, ``os.kill``, ``os.fork``, ``shutil.rmtree``, ``subprocess``, sockets, ``ctypes``, ...) and
  refuses writes outside the working directory at the lowest Python level: ``open``/``io.open``/``_io.open``,
  ``io.FileIO``, ``os.open`` (write flags), ``os.mkdir``/``os.makedirs`` and ``os.utime``;
* stdin, stdout and stderr of the program go to ``/dev/null``. The verdict travels on a private descriptor as
  one line tagged with a random per-run nonce that the parent sends on stdin (never in argv or the environment,
  and read before the program runs); the parent accepts a verdict only when exactly one tagged line came and
  the process exited with status 0, so a program that writes "passed" itself and then crashes, exits or closes
  the channel fails;
* many programs in parallel through a ``ThreadPoolExecutor`` whose threads only wait on their process.

WARNING: this is NOT a security sandbox. It stops accidents made by a model that writes plausible code
(deleting files, forking, looping forever); it does not stop deliberately malicious code, which can undo the
guard from inside Python (re-importing ``posix``, reading the nonce from the harness's frames, ...), write with
C extensions (``sqlite3``, ...) wherever ``nobody`` may, read what ``nobody`` may, and use the network. Run
untrusted generations in a disposable container or VM without network access and without mounts you care
about. Nothing is executed unless the caller passes ``allow_code_execution=True``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pwd
import secrets
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
_UNPRIVILEGED_USER = "nobody"
_DROP_FAILED = "cannot drop privileges"

# Source of the child process (the harness). It reads the nonce line and the program from stdin, moves its own
# stdin/stdout/stderr to /dev/null (keeping a private copy of stdout, the verdict channel), switches to the
# unprivileged uid/gid when they are >= 0, sets the limits, installs the guard, runs the program, writes one line,
# "<nonce> <verdict>", and exits with status 0.
_CHILD_SOURCE = r'''
import builtins, os, resource, sys

def _blocked(name):
    def blocked(*args, **kwargs):
        raise PermissionError(name + " is disabled in the sandbox")
    return blocked

_OS_NAMES = """kill killpg system remove removedirs rmdir unlink rename renames replace truncate
ftruncate chmod fchmod lchmod chown fchown lchown chflags lchflags chroot chdir fchdir link symlink mkfifo mknod
setxattr removexattr fork forkpty vfork setsid setpgid setpgrp setuid setgid seteuid setegid setreuid setregid
setresuid setresgid setgroups initgroups popen execl execle execlp execlpe execv execve execvp execvpe spawnl
spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp _exit abort plock
pidfd_open""".split()

def _drop_privileges(uid, gid):
    # For good: no supplementary groups, real = effective = saved ids, no capabilities left. Import-path folders
    # the user cannot reach (an interpreter under /root, mode 0700) stay importable through directory
    # descriptors opened before the switch (/proc/self/fd/N, which a process may always follow for itself).
    folders = {}
    for entry in sys.path:
        try:
            folders[entry] = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            pass
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    with open("/proc/self/status") as status:
        capabilities = [line.split()[1] for line in status if line.startswith(("CapPrm:", "CapEff:"))]
    if (os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups()
            or len(capabilities) != 2 or any(int(c, 16) for c in capabilities)):
        raise PermissionError("still privileged after switching to uid %d" % uid)
    moved = {}
    for entry, fd in folders.items():
        if os.access(entry, os.R_OK | os.X_OK):
            os.close(fd)
        else:
            moved[entry] = "/proc/self/fd/%d" % fd

    def relocate(path):
        for old, new in moved.items():
            if isinstance(path, str) and (path == old or path.startswith(old + os.sep)):
                return new + path[len(old):]
        return path

    sys.path[:] = [relocate(p) for p in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if isinstance(search, list):  # packages imported at start-up (encodings, collections, ...)
            search[:] = [relocate(p) for p in search]
    sys.path_importer_cache.clear()

def _guard(workdir):
    import io, _io, posix, shutil, socket, _socket, subprocess
    real_open, real_os_open, real_file_io = builtins.open, os.open, _io.FileIO
    real_mkdir, real_utime = os.mkdir, os.utime
    realpath, fsdecode, isabs = os.path.realpath, os.fsdecode, os.path.isabs
    root = workdir + os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def check(file, dir_fd=None):
        path = fsdecode(file)
        if dir_fd is not None and not isabs(path):
            raise PermissionError("writing relative to dir_fd is disabled in the sandbox: " + path)
        path = realpath(path)
        if not (path + os.sep).startswith(root):
            raise PermissionError("writing outside the sandbox directory is disabled: " + path)

    def writes(file, mode):
        return isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")

    def guarded_open(file, mode="r", *args, **kwargs):
        if writes(file, mode):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    class FileIO(real_file_io):
        def __init__(self, file, mode="r", closefd=True, opener=None):
            if writes(file, mode):
                check(file)
            super().__init__(file, mode, closefd, opener)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        check(path, dir_fd)
        return real_mkdir(path, mode, dir_fd=dir_fd)

    def guarded_utime(path, *args, dir_fd=None, **kwargs):
        if not isinstance(path, int):
            check(path, dir_fd)
        return real_utime(path, *args, dir_fd=dir_fd, **kwargs)

    for module in (os, posix):
        for name in _OS_NAMES:
            if hasattr(module, name):
                setattr(module, name, _blocked("os." + name))
        module.open, module.mkdir, module.utime = guarded_os_open, guarded_mkdir, guarded_utime
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
    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = FileIO
    builtins.exit = None
    builtins.quit = None
    builtins.help = None

def _main():
    memory_bytes, cpu_seconds, file_bytes, uid, gid = (int(v) for v in sys.argv[1:6])
    nonce, _, program = sys.stdin.read().partition("\n")
    verdict_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    # Held here so that a program that rebinds builtins or os functions cannot change how its verdict is made.
    write, exit_now, text, kind, caught = os.write, os._exit, str, type, BaseException

    def report(verdict):
        line = "\n" + nonce + " " + verdict[:300] + "\n"  # the leading newline keeps junk off the verdict line
        write(verdict_fd, line.encode("utf-8", "replace"))
        exit_now(0)

    workdir = os.path.realpath(os.getcwd())
    if uid >= 0:
        try:
            _drop_privileges(uid, gid)
        except BaseException as error:
            report("cannot drop privileges: " + type(error).__name__ + ": " + str(error))
    limits = [(resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_DATA, memory_bytes),
              (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_FSIZE, file_bytes),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)]
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass
    _guard(workdir)
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__sandbox__"})
        verdict = "passed"
    except caught as error:
        try:
            message = text(error).replace("\n", " ")
        except caught:
            message = "<unprintable>"
        verdict = "failed: " + kind(error).__name__ + (": " + message if message else "")
    report(verdict)

_main()
'''

# Run once per process as the unprivileged user before the first program: the switch must work and the standard
# library must still import (an interpreter under /root stays reachable, see _drop_privileges in the harness).
_PROBE_PROGRAM = ("import os\nassert os.geteuid() != 0 and os.getuid() != 0\n"
                  "import collections.abc, json, math, re\nassert math.isqrt(16) == 4\n")


class RootExecutionError(RuntimeError):
    """Running as root, programs cannot run as an unprivileged user here, and root execution was not allowed."""


def _child_env(workdir: str) -> dict[str, str]:
    env = {"HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"}
    env.update({k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    return env


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _verdict(returncode: int | None, stdout: bytes, nonce: str) -> str:
    """The harness's verdict: the only line tagged with this run's nonce, from a process that exited with 0."""
    tag = nonce + " "
    verdicts = [line[len(tag):] for line in stdout.decode("utf-8", "replace").splitlines() if line.startswith(tag)]
    if len(verdicts) > 1:
        return "failed: more than one verdict on the verdict channel"
    code = returncode
    if verdicts and code == 0:
        return verdicts[0][:_MAX_REASON_CHARS]
    if code is not None and code < 0 and -code in (signal.SIGXCPU, signal.SIGKILL):
        return TIMED_OUT  # CPU limit reached
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"failed: killed by signal {name}"
    return f"failed: process exited with code {code} without a verdict"


def _run(program: str, *, timeout_s: float, memory_limit_bytes: int, file_size_limit_bytes: int,
         drop: tuple[int, int] | None) -> str:
    """One harness process; ``drop``: the ``(uid, gid)`` it switches to before the program runs."""
    uid, gid = drop if drop is not None else (-1, -1)
    cpu_seconds = math.ceil(timeout_s) + 1
    args = [str(memory_limit_bytes), str(cpu_seconds), str(file_size_limit_bytes), str(uid), str(gid)]
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="mergelm_exec_", ignore_cleanup_errors=True) as workdir:
        if drop is not None:
            os.chown(workdir, uid, gid)  # entered as root (Popen's cwd), then written to as uid
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD_SOURCE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=workdir, env=_child_env(workdir), start_new_session=True,
        )
        try:
            stdin = (nonce + "\n" + program).encode("utf-8", "surrogatepass")
            stdout, _ = process.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            return TIMED_OUT
        finally:
            _kill_group(process)  # strays that stayed in the group
        return _verdict(process.returncode, stdout, nonce)


def _unprivileged_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(_UNPRIVILEGED_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534  # the conventional nobody / nogroup


@functools.cache
def _probe_privilege_drop(euid: int) -> tuple[tuple[int, int] | None, str]:
    """``((uid, gid), "")`` when programs started by root can run as the unprivileged user, else
    ``(None, reason)``; one extra interpreter start per process (``euid`` keys the cache)."""
    ids = _unprivileged_ids()
    try:
        verdict = _run(_PROBE_PROGRAM, timeout_s=10.0, memory_limit_bytes=DEFAULT_MEMORY_LIMIT_BYTES,
                       file_size_limit_bytes=DEFAULT_FILE_SIZE_LIMIT_BYTES, drop=ids)
    except (OSError, OverflowError, subprocess.SubprocessError) as error:  # chown, Popen
        verdict = f"{type(error).__name__}: {error}"
    return (ids, "") if verdict == PASSED else (None, verdict)


@functools.cache
def _warn_running_as_root(reason: str) -> None:
    logger.warning("executing model-generated code as root (allow_root_code_execution): the switch to %r is not "
                   "possible here (%s), so RLIMIT_NPROC does not hold and the program may write anywhere root "
                   "can outside the guard", _UNPRIVILEGED_USER, reason)


def execution_user(*, allow_root_code_execution: bool = False) -> tuple[int, int] | None:
    """The ``(uid, gid)`` programs will run as, or ``None`` for this process's own user.

    Not root: ``None``. Root (effective uid 0): the ids of ``nobody`` when the switch works here (tried once per
    process with a probe program); when it does not, ``None`` if ``allow_root_code_execution`` (logged as a
    warning), else an error. Callers may call it at start-up to fail before any heavy work.

    Raises:
        RootExecutionError: running as root, the switch is impossible and root execution was not allowed.
    """
    euid = os.geteuid()
    if euid != 0:
        return None
    ids, reason = _probe_privilege_drop(euid)
    if ids is not None:
        return ids
    if not allow_root_code_execution:
        raise RootExecutionError(
            f"running as root and programs cannot run as the unprivileged user {_UNPRIVILEGED_USER!r} here "
            f"({reason}); run as an unprivileged user or in a container, or pass allow_root_code_execution=True "
            "(CLI: --allow_root_code_execution) to execute model-generated code as root"
        )
    _warn_running_as_root(reason)
    return None


def run_program(
    program: str,
    *,
    allow_code_execution: bool = False,
    allow_root_code_execution: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    file_size_limit_bytes: int = DEFAULT_FILE_SIZE_LIMIT_BYTES,
) -> str:
    """Execute one program in a fresh, limited process (see the module docstring: NOT a security sandbox).

    Args:
        program: Python source; it "passes" when it runs to the end without raising.
        allow_code_execution: must be ``True``; the explicit opt-in to running model-generated code.
        allow_root_code_execution: when running as root where the switch to ``nobody`` is impossible, run the
            program as root instead of raising :class:`RootExecutionError`.
        timeout_s: wall-clock limit in seconds (> 0); the process group is killed when it is reached.
        memory_limit_bytes: ``RLIMIT_AS`` of the child.
        file_size_limit_bytes: ``RLIMIT_FSIZE`` of the child (largest file it may write).

    Returns:
        ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``.

    Raises:
        RootExecutionError: see :func:`execution_user`.
    """
    _check_allowed(allow_code_execution)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    drop = execution_user(allow_root_code_execution=allow_root_code_execution)
    verdict = _run(program, timeout_s=timeout_s, memory_limit_bytes=memory_limit_bytes,
                   file_size_limit_bytes=file_size_limit_bytes, drop=drop)
    if verdict.startswith(_DROP_FAILED):  # it worked for the probe: refuse rather than run anything as root
        raise RootExecutionError(f"{verdict} (uid {drop[0] if drop else '?'}); nothing was executed as root")
    return verdict


def _check_allowed(allow_code_execution: bool) -> None:
    if allow_code_execution is not True:
        raise ValueError(
            f"allow_code_execution must be True to execute model-generated code, got {allow_code_execution!r}; "
            "pass allow_code_execution=True (CLI: --allow_code_execution), preferably inside a container"
        )


def check_sandbox(*, timeout_s: float = DEFAULT_TIMEOUT_S, allow_root_code_execution: bool = False) -> None:
    """Canary run at harness start: a passing program must pass and known-bad ones must fail.

    Raises:
        RuntimeError: when the executor reports a wrong verdict (for example a broken interpreter, a guard that
            no longer blocks ``os.system`` or a forgeable verdict), before any real sample is scored.
        RootExecutionError: see :func:`execution_user`.
    """
    forged = ("import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n"
              "        os.write(fd, b'passed\\n')\n    except OSError:\n        pass\nassert False\n")
    canaries = {"x = 1 + 1\nassert x == 2\n": True, "assert 1 + 1 == 3\n": False,
                "import os\nos.system('true')\n": False, forged: False}
    for program, should_pass in canaries.items():
        verdict = run_program(program, allow_code_execution=True, allow_root_code_execution=allow_root_code_execution,
                              timeout_s=max(timeout_s, 5.0))
        if (verdict == PASSED) != should_pass:
            raise RuntimeError(f"code-execution canary {program!r} gave {verdict!r}; the executor is broken")


def execute_programs(
    programs: Sequence[str],
    *,
    allow_code_execution: bool = False,
    allow_root_code_execution: bool = False,
    num_workers: int = 4,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    show_progress: bool = True,
) -> list[str]:
    """Execute many programs in parallel, one process each, after a canary check.

    Args:
        programs: Python sources (prompt + completion + tests, already assembled).
        allow_code_execution: must be ``True`` (explicit opt-in; see the module docstring).
        allow_root_code_execution: run as root where the switch to ``nobody`` is impossible (see
            :func:`execution_user`); without it such a run raises :class:`RootExecutionError`.
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
    check_sandbox(timeout_s=timeout_s, allow_root_code_execution=allow_root_code_execution)
    results: list[str | None] = [None] * len(programs)
    kwargs = dict(allow_code_execution=True, allow_root_code_execution=allow_root_code_execution,
                  timeout_s=timeout_s, memory_limit_bytes=memory_limit_bytes)
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = {pool.submit(run_program, program, **kwargs): i for i, program in enumerate(programs)}
        bar = tqdm(as_completed(futures), total=len(futures), desc="executing", disable=not show_progress)
        for future in bar:
            results[futures[future]] = future.result()
    logger.info("executed %d programs: %d passed", len(programs), sum(r == PASSED for r in results))
    return [r for r in results if r is not None]
