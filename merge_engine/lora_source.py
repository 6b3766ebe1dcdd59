"""PEFT LoRA adapter folders as fine-tuned inputs of the streaming merger: sources whose tensors are deltas.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, detected by ``is_lora_adapter_dir``)
stands for ``base + ΔW``. Instead of materialising that model, the engine reads the adapter's ``ΔW`` itself:
``index_adapter`` gives it a ``CheckpointIndex`` with every base tensor's name and shape (format
``ADAPTER_FORMAT``), and ``LoraDeltaReader`` answers reads with the float32 ``ΔW = scale·B·A`` of a parameter the
adapter changes (``LoraAdapter.delta``) and zeros for any other. The merge plan is told which inputs are deltas
(``MergePlan.delta_inputs``), so DARE and the methods see ``ΔW`` exactly, not ``(base + ΔW) - base`` with its
rounding.

Memory: a module's ``ΔW`` is computed once per tensor (a few most recent ones are kept) and row chunks are slices
of it, since ``B[rows] @ A`` need not be bit-identical to rows of ``B @ A`` and an embedding's ``ΔW`` is a
transposed product.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_engine.shard_index import CheckpointIndex, TensorInfo
from merge_engine.tensor_reader import TensorReader
from model_merging_methods.lora import ADAPTER_WEIGHTS_NAME, LoraAdapter, read_lora_adapter
from model_merging_methods.lora_config import ADAPTER_CONFIG_NAME, is_lora_adapter_dir

ADAPTER_FORMAT = "peft_lora"
# whole ΔW tensors kept per adapter: the workers take row chunks in order, so the chunks of one tensor (and the
# first of the next) find theirs; an evicted ΔW is recomputed, with the same values
DELTA_CACHE_SIZE = 2


@dataclass
class AdapterIndex(CheckpointIndex):
    """A ``CheckpointIndex`` for a LoRA adapter: the base's tensor names and shapes, read as deltas."""

    adapter: LoraAdapter | None = None


def is_adapter_argument(name_or_path: str) -> bool:
    """True when a model argument is a local PEFT adapter folder; a hub id always stands for a full model."""
    path = Path(name_or_path).expanduser()
    return path.is_dir() and is_lora_adapter_dir(path)


def adapter_files(folder: Path) -> list[Path]:
    """The files that define an adapter (config and weights), recorded in ``merge_config.json``."""
    return [folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME]


def index_adapter(folder: Path, base: CheckpointIndex) -> AdapterIndex:
    """Validate an adapter against the base (config, names, ΔW shapes) and index it like the base.

    Args:
        folder: the adapter folder.
        base: the base model's index; every adapted parameter must be one of its tensors, with ΔW's shape.
    Returns:
        An ``AdapterIndex`` listing every base tensor (floating ones as float32, the dtype of a delta).
    Raises:
        ValueError: the adapter config is refused (DoRA, ...; ``lora_config.validate_adapter_config``), or a
            targeted module is missing from the base or has another shape (``read_lora_adapter``).
    """
    if full := _full_tensor_names(folder):
        raise ValueError(f"{folder}: the adapter carries whole trained tensors (modules_to_save: {full}); the "
                         "streaming merger reads adapters as ΔW = scale·B·A only; merge_and_unload() the adapter and "
                         "pass the model as a full fine-tune, or re-train without modules_to_save")
    adapter = read_lora_adapter(folder, {name: info.shape for name, info in base.tensors.items()})
    weights = folder / ADAPTER_WEIGHTS_NAME
    tensors = {name: TensorInfo(name, weights, info.shape,
                                torch.float32 if info.dtype.is_floating_point else info.dtype)
               for name, info in base.tensors.items()}
    return AdapterIndex(model_dir=folder, format=ADAPTER_FORMAT, tensors=tensors, adapter=adapter)


def _full_tensor_names(folder: Path) -> list[str]:
    from model_merging_methods.lora_config import read_adapter_config

    return list(read_adapter_config(folder).get("modules_to_save") or [])


class LoraDeltaReader:
    """``TensorReader``'s interface over an adapter: float32 ΔW of an adapted parameter, zeros for any other.

    Every read returns a new tensor (the merge may modify it in place); thread-safe.
    """

    def __init__(self, index: AdapterIndex, cache_size: int = DELTA_CACHE_SIZE) -> None:
        if index.adapter is None:
            raise ValueError(f"{index.model_dir}: LoraDeltaReader needs an index made by index_adapter")
        self.index = index
        self.adapter = index.adapter
        self._adapted = set(self.adapter.parameter_names())
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.index.tensors[name]
        except KeyError:
            raise KeyError(f"{self.index.model_dir} (LoRA adapter) has no base tensor {name!r}") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """ΔW of base tensor ``name`` (rows ``[start, stop)`` of dim 0 when given), float32, new and writable."""
        info = self.info(name)
        if name not in self._adapted:
            shape = list(info.shape)
            if rows is not None:
                shape[0] = rows[1] - rows[0]
            return torch.zeros(shape, dtype=torch.float32)
        delta = self._delta(name)
        return (delta if rows is None else delta[rows[0]:rows[1]]).clone()

    def _delta(self, name: str) -> torch.Tensor:
        with self._lock:  # one computation per tensor, even when several workers ask for its row chunks
            delta = self._cache.get(name)
            if delta is None:
                delta = self.adapter.delta(name)
                self._cache[name] = delta
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(name)
            return delta

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """No-op: the factors are small and read when the ΔW is computed."""

    def close(self) -> None:
        with self._lock:
            self._cache.clear()


def open_reader(index: CheckpointIndex) -> TensorReader | LoraDeltaReader:
    """The reader of one input: ``LoraDeltaReader`` for an adapter's index, ``TensorReader`` otherwise."""
    return LoraDeltaReader(index) if isinstance(index, AdapterIndex) else TensorReader(index)
