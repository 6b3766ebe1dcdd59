"""Sharded safetensors output, written tensor by tensor (no shard is ever held in memory).

Every output tensor's name, shape and dtype are known before the first one is merged, so the shard layout
is planned up front (``plan_shards``): each shard's header is written first and the tensor bytes follow as
they are produced. A shard is written to ``<name>.tmp`` and renamed when complete, so a file with its final
name is always complete; ``--resume`` relies on that.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_engine.shard_index import DTYPE_TO_SAFETENSORS, read_safetensors_header

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Shard:
    """A planned output file and the tensors it holds, in write order."""

    file_name: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def header_bytes(self) -> bytes:
        """The safetensors header (little-endian length + JSON padded to 8 bytes)."""
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.tensors:
            header[tensor.name] = {"dtype": DTYPE_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape),
                                   "data_offsets": [offset, offset + tensor.nbytes]}
            offset += tensor.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[Shard]:
    """Greedy split in order: a shard closes before the tensor that would push it past ``max_shard_bytes``.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own. One shard is named
    ``model.safetensors``; several are ``model-0000k-of-0000N.safetensors`` (the Hugging Face names).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [Shard("model.safetensors", tuple(groups[0]))]
    total = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{total:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def shard_is_complete(folder: Path, shard: Shard) -> bool:
    """True when ``folder/shard.file_name`` exists with exactly the planned header and length."""
    path = folder / shard.file_name
    if not path.exists():
        return False
    header = shard.header_bytes()
    if os.path.getsize(path) != len(header) + shard.nbytes:
        return False
    with open(path, "rb") as handle:
        if handle.read(len(header)) != header:
            return False
    read_safetensors_header(path)
    return True


def write_index(folder: Path, shards: Sequence[Shard]) -> None:
    """``model.safetensors.index.json`` for sharded output (nothing for a single file)."""
    if len(shards) < 2:
        return
    weight_map = {t.name: s.file_name for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}
    path = folder / "model.safetensors.index.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class ShardedWriter:
    """Writes planned shards in order; call ``write`` once per tensor in plan order, then ``close``."""

    def __init__(self, folder: Path, shards: Sequence[Shard], skip: set[str] = frozenset()) -> None:
        self.folder = folder
        self._queue = [(s, t) for s in shards if s.file_name not in skip for t in s.tensors]
        self._position = 0
        self._handle = None
        self._shards_done = 0
        self.bytes_written = 0
        self._tensor_bytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (already in its output dtype, on the CPU) to the current shard."""
        planned = self._queue[self._position][1]
        if tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"writer expected {planned}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self.write_chunk(name, tensor, last=True)

    def write_chunk(self, name: str, tensor: torch.Tensor, *, last: bool) -> None:
        """Append a block of rows of the current tensor; ``last`` marks its final block."""
        shard, planned = self._queue[self._position]
        if name != planned.name or tensor.dtype != planned.dtype or tuple(tensor.shape[1:]) != planned.shape[1:]:
            raise RuntimeError(f"writer expected {planned}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self._handle is None:
            self._handle = open(self.folder / (shard.file_name + ".tmp"), "wb")
            self._handle.write(shard.header_bytes())
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._tensor_bytes += data.numel()
        if not last:
            return
        if self._tensor_bytes != planned.nbytes:
            raise RuntimeError(f"{name}: wrote {self._tensor_bytes} bytes, planned {planned.nbytes}")
        self._tensor_bytes = 0
        self.bytes_written += planned.nbytes
        self._position += 1
        if self._position == len(self._queue) or self._queue[self._position][0] is not shard:
            self._finish_shard(shard)

    def _finish_shard(self, shard: Shard) -> None:
        self._handle.close()
        self._handle = None
        os.replace(self.folder / (shard.file_name + ".tmp"), self.folder / shard.file_name)
        self._shards_done += 1
        logger.debug("wrote %s (%d bytes)", shard.file_name, shard.nbytes)

    @property
    def pending(self) -> int:
        return len(self._queue) - self._position

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.pending:
            raise RuntimeError(f"writer closed with {self.pending} tensors not written")
