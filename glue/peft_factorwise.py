"""PEFT's own LoRA merges (``add_weighted_adapter``) of GLUE adapters, as the baseline DARE on ΔW is compared with.

PEFT 0.22.0's ``LoraModel.add_weighted_adapter`` with ``combination_type`` ``linear`` / ``ties`` / ``dare_linear`` /
``dare_ties`` combines the *factors*: every adapter's ``A`` is weighted by ``sign(w s) sqrt(|w s|)`` and its ``B`` by
``sqrt(|w s|)`` (``s`` = alpha / r), the ``A``s are combined with each other and so are the ``B``s (``dare_*`` drop
and rescale each factor's entries separately, ``*ties`` elect signs per factor entry), and the new adapter's
``ΔW = B_merged @ A_merged`` (scale 1). The product of sums brings cross terms ``B_i A_j`` (PEFT issue #3004), and a
dropped factor entry removes a whole rank-1 piece of ΔW, so "density" does not mean the share of ΔW's entries kept.

:class:`FactorwiseMerger` loads the adapters' factors into one ``PeftModel`` and returns the merged ΔW of every
adapted weight, computed by PEFT itself (``get_delta_weight`` of the merged adapter); the GLUE scripts then evaluate
``W + ΔW`` with each task's own head, exactly as the project's merges. PEFT draws its masks from torch's global
generator: each call is seeded (``seed``), so a run is reproducible, but its masks are not the project's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from model_merging_methods.lora import read_lora_adapter

#: add_weighted_adapter's combination types compared here (their DARE-free counterparts: linear, ties)
COMBINATION_TYPES = ("linear", "ties", "dare_linear", "dare_ties")
MERGED = "merged"


class FactorwiseMerger:
    """Several LoRA adapters of one base model as named adapters of one ``PeftModel``.

    Args:
        adapters: ``{name: adapter folder}`` (every adapter with the same rank and targets, as PEFT requires for
            these combination types).
        base: the base model the adapters belong to (a ``transformers`` model); it is wrapped in place.
    """

    def __init__(self, adapters: Mapping[str, str | Path], base: torch.nn.Module) -> None:
        from peft import LoraConfig, get_peft_model

        if not adapters:
            raise ValueError("FactorwiseMerger needs at least one adapter, got none")
        self.adapters = {name: read_lora_adapter(folder) for name, folder in adapters.items()}
        names = list(self.adapters)
        first = self.adapters[names[0]]
        for name, adapter in self.adapters.items():
            ranks = {m.rank for m in adapter.modules.values()}
            if ranks != {first.config["r"]} or set(adapter.modules) != set(first.modules):
                raise ValueError(f"adapter {name!r} ({adapter.folder}) has ranks {sorted(ranks)} on "
                                 f"{len(adapter.modules)} modules; PEFT's factor-wise merge needs every adapter with "
                                 f"rank {first.config['r']} on the same {len(first.modules)} modules")
        self.modules = sorted(first.modules)
        model = None
        for name, adapter in self.adapters.items():
            config = LoraConfig(r=adapter.config["r"], lora_alpha=adapter.config["lora_alpha"],
                                target_modules=self.modules, lora_dropout=0.0, bias="none",
                                use_rslora=bool(adapter.config.get("use_rslora")))
            if model is None:
                model = get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            self._load_factors(model, name)
        self.model = model

    def _layer(self, model, module: str):
        return model.base_model.model.get_submodule(module)

    def _load_factors(self, model, name: str) -> None:
        from safetensors import safe_open

        adapter = self.adapters[name]
        with torch.no_grad(), safe_open(str(adapter.folder / "adapter_model.safetensors"), framework="pt") as handle:
            for module_name, module in adapter.modules.items():
                if module.kind != "linear" or module.bias_key is not None:
                    raise ValueError(f"{adapter.folder}: module {module_name!r} is not a bias-free Linear LoRA; "
                                     "the factor-wise baseline handles Linear layers only")
                layer = self._layer(model, module_name)
                layer.lora_A[name].weight.copy_(handle.get_tensor(module.a_key))
                layer.lora_B[name].weight.copy_(handle.get_tensor(module.b_key))
                if not math.isclose(layer.scaling[name], module.scale, rel_tol=1e-12):
                    raise ValueError(f"{module_name}: PEFT's scale {layer.scaling[name]} differs from the adapter's "
                                     f"{module.scale}")

    def delta(self, names: Sequence[str], weights: Sequence[float], combination_type: str, *,
              density: float = 1.0, seed: int = 0) -> dict[str, Tensor]:
        """``{"<module>.weight": ΔW}`` of PEFT's ``add_weighted_adapter(names, weights, combination_type, density)``.

        Args:
            names: adapters to combine; weights: one weight per adapter (PEFT multiplies it by the adapter's scale).
            combination_type: one of :data:`COMBINATION_TYPES`.
            density: the share of each factor's entries kept (``dare_*``) or of its largest entries (``ties``).
            seed: ``torch.manual_seed`` before the call (PEFT's ``dare_*`` draw from the global generator).

        A single adapter with a combination other than ``linear`` goes through :meth:`_single_factorwise`.
        """
        if combination_type not in COMBINATION_TYPES:
            raise ValueError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}, got "
                             f"{combination_type!r}")
        if len(names) != len(weights):
            raise ValueError(f"one weight per adapter: got {len(names)} adapters and {len(weights)} weights")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise KeyError(f"unknown adapters {unknown}; loaded: {list(self.adapters)}")
        if len(names) == 1 and combination_type != "linear":
            return self._single_factorwise(names[0], weights[0], combination_type, density, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kwargs = {} if combination_type == "linear" else {"density": density}
            self.model.add_weighted_adapter(list(names), list(weights), MERGED, combination_type=combination_type,
                                            **kwargs)
        try:
            with torch.no_grad():
                return {f"{m}.weight": self._layer(self.model, m).get_delta_weight(MERGED).detach().clone()
                        for m in self.modules}
        finally:
            self.model.delete_adapter(MERGED)

    def _single_factorwise(self, name: str, weight: float, combination_type: str, density: float,
                           seed: int) -> dict[str, Tensor]:
        """One adapter through PEFT's factor-wise operator. ``add_weighted_adapter`` itself turns a single adapter
        into ``linear`` (PEFT 0.22.0 ``LoraModel.add_weighted_adapter``: "if there is only one adapter, we can only
        use linear merging"), so nothing would be dropped; this calls the method it uses for several adapters,
        ``_generalized_task_arithmetic_weighted_adapter``, module by module: what PEFT does to each adapter's
        factors inside a merge. The merged adapter has scale 1, so ``ΔW = B_merged @ A_merged``."""
        deltas = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for module in self.modules:
                lora_a, lora_b = self.model.base_model._generalized_task_arithmetic_weighted_adapter(
                    combination_type, [name], [weight], self._layer(self.model, module), density, "total")
                deltas[f"{module}.weight"] = (lora_b @ lora_a).detach().clone()
        return deltas

    def single_delta(self, name: str) -> dict[str, Tensor]:
        """``{"<module>.weight": ΔW}`` of one loaded adapter, from PEFT (equals ``LoraAdapter.delta``)."""
        with torch.no_grad():
            return {f"{m}.weight": self._layer(self.model, m).get_delta_weight(name).detach().clone()
                    for m in self.modules}


def with_delta(pretrained: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``pretrained`` with ``W + ΔW`` (float32) for every parameter in ``delta``."""
    state = dict(pretrained)
    for name, value in delta.items():
        if name not in state or state[name].shape != value.shape:
            raise ValueError(f"ΔW of {name!r} ({tuple(value.shape)}) has no matching pretrained tensor "
                             f"({None if name not in state else tuple(state[name].shape)})")
        state[name] = (state[name].float() + value.float()).to(state[name].dtype)
    return state
