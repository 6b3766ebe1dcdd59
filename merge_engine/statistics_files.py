"""Per-model statistics for Fisher and RegMean merging, read lazily from files.

One file per fine-tuned model, in the order of ``finetuned_models``:

* ``fisher_merging``: ``{parameter name: Fisher diagonal}`` (same shape as the parameter);
* ``regmean_merging``: ``{Linear module name: Gram matrix (in_features, in_features)}``.

``.safetensors`` files are read one tensor at a time (nothing else is loaded); ``.pt``/``.bin`` files are
memory-mapped with ``torch.load(mmap=True, weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from merge_engine.shard_index import CheckpointIndex, load_bin_file, read_safetensors_header
from merge_engine.tensor_reader import TensorReader
from model_merging_methods.merge_plan import MergePlan
from model_merging_methods.registry import MERGE_METHODS


class LazyStatistics(Mapping):
    """A read-only ``{name: tensor}`` view of one statistics file; tensors are read on access."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".safetensors":
            self._reader: TensorReader | None = TensorReader(
                CheckpointIndex(path.parent, "safetensors", read_safetensors_header(path)))
            self._names = list(self._reader.index.tensors)
            self._tensors: dict[str, torch.Tensor] = {}
        else:
            self._reader = None
            self._tensors = {k: v for k, v in load_bin_file(path).items() if isinstance(v, torch.Tensor)}
            self._names = list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of entry ``name`` without reading it (safetensors header)."""
        if self._reader is not None:
            return self._reader.index.tensors[name].shape
        return tuple(self._tensors[name].shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._reader is not None:
            return self._reader.read(name)
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        if self._reader is not None:
            return name in self._reader.index.tensors
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_statistics(
    statistics_files: Sequence[str] | None, *, statistics_kind: str | None, num_models: int, method_name: str
) -> list[LazyStatistics] | None:
    """Check and open the statistics files a method needs (None when it needs none).

    Raises:
        ValueError: files missing for a method that needs them, given for one that does not, or wrong count.
        FileNotFoundError: a listed file does not exist.
    """
    if statistics_kind is None:
        if statistics_files:
            users = " and ".join(m.name for m in MERGE_METHODS.values() if m.statistics is not None)
            raise ValueError(f"statistics_files are only used by {users}, got {len(statistics_files)} for "
                             f"{method_name}; drop them")
        return None
    if not statistics_files or len(statistics_files) != num_models:
        count = len(statistics_files) if statistics_files else 0
        what = "Fisher diagonals" if statistics_kind == "fisher" else "Gram matrices"
        raise ValueError(f"{method_name} needs one statistics file ({what}) per fine-tuned model ({num_models}), "
                         f"got {count}; pass --statistics_files F1 F2 ...")
    paths = [Path(p).expanduser().resolve() for p in statistics_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"statistics file(s) not found: {', '.join(missing)}")
    return [LazyStatistics(p) for p in paths]


def check_statistics(statistics: Sequence[LazyStatistics] | None, plan: MergePlan,
                     merged_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """``MergePlan.check_statistics`` on the files, reading shapes from their headers (no tensor is read).

    Raises:
        ValueError: naming the file, the entry and the shapes.
    """
    if statistics is not None:
        plan.check_statistics(statistics, merged_shapes, [str(stats.path) for stats in statistics],
                              shape_of=lambda stats, key: stats.shape(key))
