"""Read one tensor (or a block of its rows) at a time from a checkpoint.

Safetensors are read with ``os.preadv`` straight into a fresh tensor: no memory map, so pages of the
input files never count towards the process's resident memory and only the tensor being merged is held.
``.bin`` files are memory-mapped by ``torch.load(mmap=True)``; one file per model is kept open.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from merge_engine.shard_index import CheckpointIndex, TensorInfo, load_bin_file

logger = logging.getLogger(__name__)

_MAX_READ = 1 << 30  # Linux caps a single read near 2 GiB


def _pread_into(fd: int, view: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:done + _MAX_READ]], offset + done)
        if count <= 0:
            raise ValueError(f"{file}: unexpected end of file at byte {offset + done}; the shard is truncated")
        done += count


class TensorReader:
    """Lazy tensor access for one checkpoint; thread-safe (safetensors reads run concurrently)."""

    def __init__(self, index: CheckpointIndex) -> None:
        self.index = index
        self._fds: dict[Path, int] = {}
        self._bin_file: Path | None = None
        self._bin_tensors: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.index.tensors[name]
        except KeyError:
            raise KeyError(f"{self.index.model_dir} has no tensor {name!r}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Return tensor ``name`` (rows ``[start, stop)`` of dim 0 when given) as a new, writable CPU tensor."""
        info = self.info(name)
        if self.index.format == "safetensors":
            return self._read_safetensors(info, rows)  # positional reads: no lock around the copy
        with self._lock:
            return self._read_bin(info, rows)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Ask the kernel to start reading ``name`` (rows ``[start, stop)``) into the page cache, without waiting.

        Disk reads of upcoming tensors then overlap with the merge of the current one. No-op for ``.bin``.
        """
        info = self.index.tensors.get(name)
        if info is None or self.index.format != "safetensors" or not hasattr(os, "posix_fadvise"):
            return
        offset, nbytes = info.offset, info.nbytes
        if rows is not None and info.shape and info.shape[0]:
            row_bytes = nbytes // info.shape[0]
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        if nbytes:
            os.posix_fadvise(self._fd(info.file), offset, nbytes, os.POSIX_FADV_WILLNEED)

    def _read_safetensors(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        shape, offset, nbytes = list(info.shape), info.offset, info.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            offset += rows[0] * row_bytes
            shape[0] = rows[1] - rows[0]
            nbytes = shape[0] * row_bytes
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            _pread_into(self._fd(info.file), memoryview(buffer.numpy()), offset, info.file)
        return buffer.view(info.dtype).reshape(shape)

    def _read_bin(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        if self._bin_file != info.file:
            self._bin_tensors = {}  # drop the previous mapping before opening the next file
            self._bin_tensors = load_bin_file(info.file)
            self._bin_file = info.file
        tensor = self._bin_tensors[info.name]
        if rows is not None:
            tensor = tensor[rows[0]:rows[1]]
        return tensor.clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin_tensors, self._bin_file = {}, None
