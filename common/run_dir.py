"""Run folders named from their configuration, and atomic result files.

Every script writes into ``<results_root>/<script>/<parts...>/`` where the parts come from the run's
configuration (never a clock), so the same configuration always lands in the same folder and a
results tree can be summarised by walking it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def format_value(value: Any) -> str:
    """Render a hyperparameter value for a folder name (``0.9``, ``True``, ``1e-05``, ``a+b``)."""
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    return str(value).replace(os.sep, "_")


MAX_DIRNAME_BYTES = 255  # the file-name limit of Linux, macOS and Windows file systems


def hyperparameter_dirname(hyperparameters: Mapping[str, Any]) -> str:
    """``key=value`` pairs sorted by key and joined by commas; ``default`` when empty.

    A name longer than a file system allows (255 bytes) keeps its first 230 bytes and ends with ``,sha1=<12 hex
    digits of the whole name>``: still unique per setting, and ``config.json`` holds every value.
    """
    if not hyperparameters:
        return "default"
    name = ",".join(f"{k}={format_value(v)}" for k, v in sorted(hyperparameters.items()))
    if len(name.encode("utf-8")) <= MAX_DIRNAME_BYTES:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:12]
    return name.encode("utf-8")[:230].decode("utf-8", errors="ignore") + f",sha1={digest}"


def run_dir_for(results_root: str | os.PathLike, *parts: str) -> Path:
    """``results_root/part1/part2/...``; each part must be non-empty."""
    for part in parts:
        if not part:
            raise ValueError(f"run folder parts must be non-empty, got {parts!r}")
    return Path(results_root, *parts)


def _check_clearable(path: Path) -> None:
    """Refuse to clear the working folder (or one above it), the home folder or a file system root."""
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() or resolved == Path(
            resolved.anchor):
        raise ValueError(f"refusing to clear {path} (resolves to {resolved}): --overwrite empties a run folder, "
                         f"and this one is the working folder, a folder above it, the home folder or a root; "
                         f"choose a dedicated output folder")


def clear_dir(path: str | os.PathLike) -> None:
    """Remove everything inside the folder ``path``; symlinks are unlinked, never followed."""
    for entry in Path(path).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prepare_run_dir(run_dir: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``run_dir``; a non-empty folder is an error unless ``overwrite`` or ``resume`` is given.

    ``resume`` keeps the folder's files (it wins over ``overwrite``); ``overwrite`` alone empties the folder first,
    so no file of an earlier run (``metrics.json``, ``grid.json``, ...) survives to pass for the new run's. A
    ``run_dir`` that is a symlink is unlinked (its target is left alone) and made a fresh folder; a file is refused.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"run folder {path} is a file; a run folder must be a folder, got a file; move or "
                                 f"delete the file, or choose another output folder")
    if overwrite and not resume:
        if path.is_symlink():
            path.unlink()
        elif path.is_dir() and any(path.iterdir()):
            _check_clearable(path)
            clear_dir(path)
    elif path.exists() and any(path.iterdir()) and not resume:
        raise FileExistsError(f"{path} is not empty; pass --overwrite to replace it or --resume to continue")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indent 2, full-precision floats) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _commit_from_files(start: Path) -> str | None:
    """HEAD's commit read from the ``.git`` folder above ``start`` (loose ref or ``packed-refs``), without git."""
    for folder in (start, *start.parents):
        git = folder / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (folder / git.read_text(encoding="utf-8").split(":", 1)[1].strip()).resolve()
        if not (git / "HEAD").is_file():
            continue
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        common = Path(git / "commondir").read_text(encoding="utf-8").strip() if (git / "commondir").is_file() else ""
        for root in (git, (git / common).resolve() if common else git):
            if (root / ref).is_file():
                return (root / ref).read_text(encoding="utf-8").strip() or None
            if (root / "packed-refs").is_file():
                for line in (root / "packed-refs").read_text(encoding="utf-8").splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
        return None
    return None


def git_commit() -> str | None:
    """The project's checked-out commit, None outside a git checkout.

    ``git rev-parse HEAD`` first; when git is missing, refuses the folder (another owner: "dubious ownership") or
    times out on a loaded machine, the commit is read from the ``.git`` folder itself, so a run in a checkout
    always records it.
    """
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return _commit_from_files(here)


def environment_record() -> dict[str, Any]:
    """Versions and provenance stored next to every result."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": git_commit(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_config(run_dir: str | os.PathLike, config: Mapping[str, Any], argv: list[str] | None = None) -> None:
    """``config.json`` = the resolved configuration + argv + versions."""
    record = {"config": dict(config), "argv": list(sys.argv if argv is None else argv), **environment_record()}
    atomic_write_json(Path(run_dir) / "config.json", record)


def write_metrics(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / "metrics.json", dict(metrics))
