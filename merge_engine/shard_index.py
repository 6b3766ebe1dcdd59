"""Which tensors a checkpoint holds, where they lie, their shapes and dtypes, without reading any weights.

Supported layouts (first match wins):
``model.safetensors.index.json`` (sharded), ``model.safetensors``, a single other ``*.safetensors`` file,
``pytorch_model.bin.index.json`` (sharded), ``pytorch_model.bin``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Location and type of one stored tensor.

    ``offset``/``nbytes`` are absolute byte positions inside a safetensors file; both are -1 for ``.bin``.
    """

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1
    nbytes: int = -1


@dataclass
class CheckpointIndex:
    """Every tensor of one checkpoint folder, in storage order (file, then offset)."""

    model_dir: Path
    format: str  # "safetensors" | "bin"
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(info.file for info in self.tensors.values()))


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that the file is as long as the header says.

    Raises:
        ValueError: the file is truncated, corrupt, or uses an unsupported dtype.
    """
    size = os.path.getsize(file)
    with open(file, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise ValueError(f"{file}: safetensors file must be at least 8 bytes, got {len(raw_len)}; re-download it")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file}: header length {header_len} exceeds the file ({size} bytes); file is corrupt")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file}: safetensors header is not valid JSON ({exc}); file is corrupt") from exc
    header.pop("__metadata__", None)
    base = 8 + header_len
    infos, end = {}, base
    for name, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} dtype must be one of {sorted(SAFETENSORS_DTYPES)}, "
                             f"got {entry['dtype']}")
        start, stop = entry["data_offsets"]
        infos[name] = TensorInfo(name, file, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]], base + start,
                                 stop - start)
        end = max(end, base + stop)
    if end != size:
        raise ValueError(f"{file}: the header describes {end} bytes but the file has {size}; "
                         "the shard is truncated or corrupt, re-download it")
    return dict(sorted(infos.items(), key=lambda item: item[1].offset))


def _read_weight_map(index_file: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{index_file}: not a valid index (needs a 'weight_map'): {exc}") from exc
    files = [index_file.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{index_file} lists shards that do not exist: {', '.join(missing)}")
    return files


def load_bin_file(file: Path) -> dict[str, torch.Tensor]:
    """``torch.load`` a ``pytorch_model*.bin`` lazily (mmap) and safely (``weights_only=True``).

    Raises:
        ValueError: the file is truncated, corrupt, or not a tensor checkpoint.
    """
    try:
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
        # legacy (non-zip) pickles cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # zipfile, pickle and torch errors on truncated or foreign files
        raise ValueError(f"{file}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: "
                         f"{str(exc)[:300]}); the file is truncated or corrupt, re-download it") from exc


def _index_bin_files(files: list[Path]) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in files:
        for name, tensor in load_bin_file(file).items():
            if isinstance(tensor, torch.Tensor):
                infos[name] = TensorInfo(name, file, tuple(tensor.shape), tensor.dtype)
    return infos


def _find_layout(model_dir: Path) -> tuple[str, list[Path]]:
    candidates = [
        ("safetensors", model_dir / "model.safetensors.index.json"),
        ("safetensors", model_dir / "model.safetensors"),
        ("bin", model_dir / "pytorch_model.bin.index.json"),
        ("bin", model_dir / "pytorch_model.bin"),
    ]
    for fmt, path in candidates:
        if path.exists():
            return fmt, (_read_weight_map(path) if path.name.endswith(".json") else [path])
    others = sorted(model_dir.glob("*.safetensors"))
    if len(others) == 1:
        return "safetensors", others
    tried = ", ".join(p.name for _, p in candidates) + ", a single *.safetensors"
    raise FileNotFoundError(f"no weights found in {model_dir}; looked for {tried}")


def index_checkpoint(model_dir: Path) -> CheckpointIndex:
    """Build the tensor index of a checkpoint folder (headers only for safetensors, mmap for ``.bin``).

    Args:
        model_dir: a resolved local folder (see ``model_source.resolve_model_dir``).
    Returns:
        A ``CheckpointIndex`` with tensors in storage order.
    Raises:
        FileNotFoundError: no known weight layout in the folder, or the index names missing shards.
        ValueError: a shard is truncated or corrupt.
    """
    fmt, files = _find_layout(model_dir)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(read_safetensors_header(file) if fmt == "safetensors" else _index_bin_files([file]))
    logger.info("%s: %d tensors in %d %s file(s)", model_dir, len(tensors), len(files), fmt)
    return CheckpointIndex(model_dir=model_dir, format=fmt, tensors=tensors)
