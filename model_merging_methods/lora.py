"""PEFT LoRA adapters as task vectors: ``ΔW = scale · B·A`` per target module, computed one module at a time.

DARE (arXiv:2311.03099) drops entries of the *delta* ``ΔW``, not of the LoRA factors. PEFT's
``add_weighted_adapter(combination_type="dare_linear")`` drops entries of ``A`` and ``B`` separately (each weighted
by ``sqrt(weight · scale)``) and multiplies the sums, which is a different operator (``tests/test_lora.py`` shows
the difference). This module turns an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) into
the float32 ``ΔW`` of each base-model parameter it changes, so every DARE variant and merge method applies to
``ΔW`` exactly as to ``finetuned - base``.

Formulas (PEFT 0.22.0, ``peft/tuners/lora/layer.py``):

* ``Linear.get_delta_weight``: ``ΔW = transpose(B @ A, fan_in_fan_out) * scale``, ``A`` is ``(r, in)``,
  ``B`` is ``(out, r)``;
* ``Embedding.get_delta_weight``: ``ΔW = (B @ A).T * scale`` with ``lora_embedding_A`` ``(r, num_embeddings)``
  and ``lora_embedding_B`` ``(embedding_dim, r)``;
* ``LoraLayer.update_layer``: ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``;
  ``r`` and ``lora_alpha`` come from ``rank_pattern`` / ``alpha_pattern`` (``LoraModel._create_and_replace``,
  key chosen by ``peft.utils.other.get_pattern_key``) or default to ``r`` / ``lora_alpha``;
* ``lora_bias=True``: ``Linear.merge`` adds ``lora_B.bias * scale`` to the base layer's bias.

Options that change the forward or the meaning of ``B·A`` are refused by name
(``lora_config.validate_adapter_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from model_merging_methods.lora_config import ADAPTER_CONFIG_NAME, module_scale, read_adapter_config

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."

Factor = Literal["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"]
_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: where its factors are in the file and how its ΔW is scaled.

    ``module`` is the module name in the base model (``model.layers.0.self_attn.q_proj``); the adapted base
    parameters are ``module + ".weight"`` and, with ``bias_key``, ``module + ".bias"``.
    """

    module: str
    kind: Literal["linear", "embedding"]
    a_key: str
    b_key: str
    bias_key: str | None
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str | None:
        return None if self.bias_key is None else f"{self.module}.bias"


@dataclass(frozen=True)
class LoraAdapter:
    """A validated PEFT LoRA adapter folder: its config and its modules, keyed by base-model module name."""

    folder: Path
    config: Mapping[str, Any]
    modules: Mapping[str, LoraModule]
    #: ``{base parameter name: key in the file}`` of the whole trained tensors of ``modules_to_save`` modules
    full_tensors: Mapping[str, str] = field(default_factory=dict)
    #: their shapes
    full_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def full_tensor(self, name: str) -> Tensor:
        """The saved tensor of a ``modules_to_save`` parameter (it replaces the base's), as stored."""
        from safetensors import safe_open

        if name not in self.full_tensors:
            raise KeyError(f"{self.folder}: {name!r} is not a modules_to_save tensor of the adapter; it has "
                           f"{sorted(self.full_tensors)}")
        with safe_open(str(self.folder / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
            return handle.get_tensor(self.full_tensors[name])

    def full_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.full_shapes[name])

    def parameter_names(self) -> dict[str, LoraModule]:
        """``{base parameter name: module}`` for every base parameter the adapter changes (weights and biases)."""
        names = {}
        for module in self.modules.values():
            names[module.weight_name] = module
            if module.bias_name is not None:
                names[module.bias_name] = module
        return names

    def delta(self, name: str) -> Tensor:
        """float32 ΔW of base parameter ``name`` (``module.weight`` or ``module.bias``), read from the file.

        Reads only this module's tensors (safetensors is memory-mapped), so a streaming merge holds one ΔW at a time.
        """
        module = self.parameter_names().get(name)
        if module is None:
            raise KeyError(f"{self.folder}: the adapter does not change {name!r}; it changes "
                           f"{sorted(self.parameter_names())[:5]}...")
        from safetensors import safe_open

        with safe_open(str(self.folder / ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
            if name == module.bias_name:
                return lora_bias_delta(handle.get_tensor(module.bias_key), module.scale)
            return lora_delta(handle.get_tensor(module.a_key), handle.get_tensor(module.b_key), module)


def lora_delta(lora_a: Tensor, lora_b: Tensor, module: LoraModule) -> Tensor:
    """``ΔW = scale · (B @ A)`` of one module in float32, in the base parameter's layout.

    Linear: ``(B @ A)`` is ``(out, in)``, transposed to ``(in, out)`` when ``fan_in_fan_out`` (GPT-2 ``Conv1D``).
    Embedding: ``lora_embedding_A`` is ``(r, num_embeddings)`` and ``lora_embedding_B`` ``(embedding_dim, r)``,
    so ``ΔW = (B @ A).T``. The product is taken before the scale, as PEFT's ``get_delta_weight``, so float32
    factors give PEFT's ΔW bit for bit.
    """
    delta = torch.matmul(lora_b.float(), lora_a.float()).mul_(module.scale)
    transpose = module.kind == "embedding" or module.fan_in_fan_out
    return delta.T.contiguous() if transpose else delta


def lora_bias_delta(lora_b_bias: Tensor, scale: float) -> Tensor:
    """``Δbias = scale · lora_B.bias`` (``lora_bias=True``; PEFT ``Linear.merge``), float32."""
    return lora_b_bias.float() * scale


def parse_lora_key(key: str) -> tuple[str, Factor, str | None, str | None] | None:
    """``(module, factor, adapter_name, parameter)`` of a PEFT LoRA tensor key, or None for any other key.

    Saved files drop the adapter name (``<module>.lora_A.weight``, ``<module>.lora_embedding_A``); keys taken from
    a live model's state dict keep it (``<module>.lora_A.default.weight``, ``<module>.lora_embedding_A.default``).
    ``parameter`` is "weight"/"bias" for Linear factors and None for embedding factors (plain tensors in PEFT).
    """
    parts = key.split(".")
    for index in range(len(parts) - 1, 0, -1):
        factor = parts[index]
        if factor not in _FACTORS:
            continue
        tail = parts[index + 1:]
        if factor.startswith("lora_embedding"):
            if len(tail) > 1:
                return None
            return ".".join(parts[:index]), factor, (tail[0] if tail else None), None
        if not tail or tail[-1] not in ("weight", "bias") or len(tail) > 2:
            return None
        return ".".join(parts[:index]), factor, (tail[0] if len(tail) == 2 else None), tail[-1]
    return None


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    path = folder / ADAPTER_WEIGHTS_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS_NAME} (found {found}); re-save the adapter with "
                                "save_pretrained(..., safe_serialization=True)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _saved_module(name: str, modules_to_save) -> bool:
    """True when parameter ``name`` belongs to a ``modules_to_save`` module (PEFT matches a module whose name is
    the entry or ends with ``.`` + entry)."""
    module = name.rpartition(".")[0]
    return any(module == entry or module.endswith("." + entry) for entry in modules_to_save or ())


def _group_factors(folder: Path, shapes: Mapping[str, tuple[int, ...]], modules_to_save=None,
                   ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``({module: {"lora_A"/"lora_B"/"bias"/...: key}}, {parameter: key of a modules_to_save tensor})``; any other
    tensor is an error."""
    groups: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    adapter_names = set()
    for key in shapes:
        parsed = parse_lora_key(key)
        if parsed is None and key.startswith(PEFT_KEY_PREFIX) and _saved_module(
                key.removeprefix(PEFT_KEY_PREFIX), modules_to_save):
            full[key.removeprefix(PEFT_KEY_PREFIX)] = key
            continue
        if parsed is None or not key.startswith(PEFT_KEY_PREFIX):
            raise ValueError(f"{folder}: tensor {key!r} is not a LoRA factor ({PEFT_KEY_PREFIX}<module>.lora_A/"
                             "lora_B.weight or .lora_embedding_A/B); full tensors (modules_to_save, embeddings saved "
                             "with save_embedding_layers, PEFT's default when an embedding is targeted) are not "
                             "supported; re-save with save_embedding_layers=False if the vocabulary was not resized, "
                             "or merge_and_unload() the adapter and pass the model as a full fine-tune")
        module, factor, adapter_name, parameter = parsed
        adapter_names.add(adapter_name)
        slot = "bias" if parameter == "bias" else factor
        if slot == "bias" and factor != "lora_B":
            raise ValueError(f"{folder}: tensor {key!r}: only lora_B may have a bias (lora_bias=True)")
        groups.setdefault(module.removeprefix(PEFT_KEY_PREFIX), {})[slot] = key
    if len(adapter_names) > 1:
        raise ValueError(f"{folder}: the file mixes adapters {sorted(map(str, adapter_names))}; save one adapter "
                         "per folder (PeftModel.save_pretrained(..., selected_adapters=[name]))")
    return groups, full


def _module_kind(folder: Path, module: str, keys: Mapping[str, str], shapes) -> Literal["linear", "embedding"]:
    kind = "embedding" if "lora_embedding_A" in keys or "lora_embedding_B" in keys else "linear"
    a_slot, b_slot = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
    if set(keys) - {a_slot, b_slot, "bias"} or a_slot not in keys or b_slot not in keys:
        raise ValueError(f"{folder}: module {module!r} must have exactly the factors {a_slot} and {b_slot}, "
                         f"got {sorted(keys)}")
    a_shape, b_shape = shapes[keys[a_slot]], shapes[keys[b_slot]]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise ValueError(f"{folder}: module {module!r} has factor shapes A {a_shape}, B {b_shape}; only Linear and "
                         "Embedding LoRA (2-D A of (r, in) and B of (out, r)) are supported, not Conv or "
                         "MultiheadAttention LoRA")
    return kind


def _lora_module(folder: Path, config, module: str, keys: Mapping[str, str], shapes) -> LoraModule:
    kind = _module_kind(folder, module, keys, shapes)
    a_key = keys["lora_embedding_A" if kind == "embedding" else "lora_A"]
    b_key = keys["lora_embedding_B" if kind == "embedding" else "lora_B"]
    rank, alpha, scale = module_scale(config, module)
    if shapes[a_key][0] != rank:
        raise ValueError(f"{folder}: module {module!r} has rank {shapes[a_key][0]} in the file but r={rank} in "
                         f"{ADAPTER_CONFIG_NAME} (r / rank_pattern); the scale alpha/r would be wrong; fix the "
                         "config or re-save the adapter")
    return LoraModule(module=module, kind=kind, a_key=a_key, b_key=b_key, bias_key=keys.get("bias"), rank=rank,
                      alpha=alpha, scale=scale, fan_in_fan_out=kind == "linear" and bool(config.get("fan_in_fan_out")))


def read_lora_adapter(folder: str | Path, base_shapes: Mapping[str, Any] | None = None) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder without loading its tensors.

    Args:
        folder: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (``PeftModel.save_pretrained``).
        base_shapes: the base model's ``{name: shape or tensor}``; when given, every adapted parameter must exist
            there and ΔW's shape must equal the base parameter's shape.
    Returns:
        The adapter, its modules keyed by base-model module name (adapter keys minus ``base_model.model.``).
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    shapes = _tensor_shapes(folder)
    groups, full = _group_factors(folder, shapes, config.get("modules_to_save"))
    modules = {name: _lora_module(folder, config, name, keys, shapes) for name, keys in sorted(groups.items())}
    if not modules:
        raise ValueError(f"{folder}: {ADAPTER_WEIGHTS_NAME} holds no LoRA factors")
    adapter = LoraAdapter(folder=folder, config=config, modules=modules, full_tensors=dict(sorted(full.items())),
                          full_shapes={name: shapes[key] for name, key in sorted(full.items())})
    if base_shapes is not None:
        _check_against_base(adapter, shapes, base_shapes)
    return adapter


def _delta_shape(module: LoraModule, shapes) -> tuple[int, ...]:
    rows, cols = shapes[module.b_key][0], shapes[module.a_key][1]  # B @ A is (rows, cols)
    return (cols, rows) if module.kind == "embedding" or module.fan_in_fan_out else (rows, cols)


def _check_against_base(adapter: LoraAdapter, shapes, base_shapes: Mapping[str, Any]) -> None:
    for name, shape in adapter.full_shapes.items():
        base = base_shapes.get(name)
        base_shape = None if base is None else tuple(base.shape if hasattr(base, "shape") else base)
        if base_shape != tuple(shape):
            raise ValueError(f"{adapter.folder}: the modules_to_save tensor {name!r} has shape {tuple(shape)}, the "
                             f"base model {'has no such tensor' if base is None else f'has {base_shape}'}; a head "
                             "replaces the base's head of the same shape (load the base with that many labels)")
    for name, module in adapter.parameter_names().items():
        if name not in base_shapes:
            close = [n for n in base_shapes if n.endswith(name.split(".", 1)[-1])][:3]
            raise ValueError(f"{adapter.folder}: the adapter changes {name!r}, which the base model does not have "
                             f"(similar base names: {close}); the adapter was trained on another model or another "
                             "model class (e.g. LlamaModel vs LlamaForCausalLM)")
        base = base_shapes[name]
        base_shape = tuple(base.shape if hasattr(base, "shape") else base)
        expected = (shapes[module.b_key][0],) if name == module.bias_name else _delta_shape(module, shapes)
        if expected != base_shape:
            raise ValueError(f"{adapter.folder}: ΔW of {name!r} has shape {expected}, base model has {base_shape}; "
                             "check fan_in_fan_out and that the adapter belongs to this base model")


def _as_adapter(adapter: LoraAdapter | str | Path, base: Mapping[str, Any]) -> LoraAdapter:
    return adapter if isinstance(adapter, LoraAdapter) else read_lora_adapter(adapter, base)


def adapter_delta_state_dict(adapter: LoraAdapter | str | Path, base: Mapping[str, Any]) -> dict[str, Tensor]:
    """``{parameter name: float32 ΔW}`` for every base parameter the adapter changes (others have ΔW = 0); a
    ``modules_to_save`` tensor's delta is ``saved - base`` in float32, as a full fine-tune's.

    Args:
        adapter: an adapter folder or a ``LoraAdapter``.
        base: the base model's ``{name: tensor or shape}``, used to check names and shapes (tensors are needed
            when the adapter has ``modules_to_save`` tensors).
    """
    adapter = _as_adapter(adapter, base)
    deltas = {name: adapter.delta(name) for name in adapter.parameter_names()}
    for name in adapter.full_tensors:
        if not isinstance(base[name], Tensor):
            raise TypeError(f"{name!r} is a modules_to_save tensor: its delta needs the base tensor, got a shape")
        deltas[name] = adapter.full_tensor(name).float() - base[name].float()
    return deltas


def adapter_finetuned_state_dict(adapter: LoraAdapter | str | Path, base: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The adapter as a fine-tuned model: ``base + ΔW`` (computed in float32, cast to the base dtype) for adapted
    parameters, the base tensors themselves (not copies) for all others.

    ``modules_to_save`` tensors (a trained head) replace the base's. This is what ``merge_and_unload()`` gives,
    so the result can be passed to ``merge_state_dicts`` next to full fine-tunes of the same base.
    ``(base + ΔW) - base`` is ΔW up to the rounding of the addition; the exact ΔW for DARE is
    ``adapter_delta_state_dict``.
    """
    adapter = _as_adapter(adapter, base)
    merged = dict(base)
    for name in adapter.parameter_names():
        merged[name] = (base[name].float() + adapter.delta(name)).to(base[name].dtype)
    for name in adapter.full_tensors:  # modules_to_save: the trained tensor replaces the base's
        merged[name] = adapter.full_tensor(name).to(base[name].dtype)
    return merged
