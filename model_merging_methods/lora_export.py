"""A merged ΔW back to a LoRA adapter: truncated SVD per module, saved in PEFT's format with scale 1.

For a module's merged delta ``ΔW = U S Vᵀ`` the best rank-``r`` approximation in Frobenius norm (Eckart–Young) is
``U_r S_r V_rᵀ``; it is stored as ``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_rᵀ`` (balanced factors, so neither
over- nor underflows in half precision), and the adapter is written with ``lora_alpha = r`` (scale 1), so PEFT's
``B @ A`` is the truncated ΔW itself. The retained energy ``sum_{i<r} s_i² / ||ΔW||_F²`` says how much of the
merge the rank keeps (1.0: exact).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from model_merging_methods.lora import ADAPTER_WEIGHTS_NAME, PEFT_KEY_PREFIX
from model_merging_methods.lora_config import ADAPTER_CONFIG_NAME

SvdMethod = Literal["auto", "exact", "randomized"]
RETAINED_ENERGY_NAME = "retained_energy.json"
# randomized SVD (Halko et al. 2011, torch.svd_lowrank) with this many extra columns and power iterations: for
# the slowly decaying spectra of fine-tuning deltas 4 iterations bring the captured energy within ~1e-4 of the
# optimum (tests/test_lora.py checks a case)
RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_NITER = 4
# below this size an exact SVD takes milliseconds, and above this fraction of the full rank the randomized one
# does as much work as the exact one
RANDOMIZED_MIN_DIM = 512
RANDOMIZED_MAX_RANK_FRACTION = 0.25


class LoraFactors(NamedTuple):
    """``B @ A`` approximates the factorised matrix; ``retained_energy`` in [0, 1]."""

    a: Tensor
    b: Tensor
    retained_energy: float


def use_randomized_svd(shape: tuple[int, int], rank: int) -> bool:
    """The ``method="auto"`` rule: randomized SVD when the matrix is large (``min(m, n) >= 512``) and the rank
    plus oversampling is at most a quarter of ``min(m, n)``; exact SVD otherwise."""
    small = min(shape)
    return small >= RANDOMIZED_MIN_DIM and rank + RANDOMIZED_OVERSAMPLE <= RANDOMIZED_MAX_RANK_FRACTION * small


def _svd(matrix: Tensor, rank: int, randomized: bool, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    if not randomized:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # svd_lowrank draws from the global generator
        torch.manual_seed(seed)
        q = min(rank + RANDOMIZED_OVERSAMPLE, *matrix.shape)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=RANDOMIZED_NITER)
    return u[:, :rank], s[:rank], v[:, :rank].T


def delta_to_lora(
    delta: Tensor, rank: int, *, transpose: bool = False, method: SvdMethod = "auto", seed: int = 0
) -> LoraFactors:
    """Rank-``rank`` LoRA factors of one module's ΔW by truncated SVD: ``B @ A ≈ ΔW`` (``ΔWᵀ`` with ``transpose``).

    Args:
        delta: the module's merged ΔW (float32 is used for the SVD), 2-D.
        rank: r >= 1. Above ``min(ΔW.shape)`` the factors are padded with zeros, so every module of an adapter
            can share one ``r`` and ``B @ A`` is still exactly ΔW.
        transpose: factorise ``ΔWᵀ``: True for embeddings (PEFT's ``ΔW = (B @ A)ᵀ``) and ``fan_in_fan_out`` layers.
        method: "exact" (``torch.linalg.svd``), "randomized" (``torch.svd_lowrank``, seeded), or "auto"
            (``use_randomized_svd``).
        seed: seed of the randomized SVD's test matrix.
    Returns:
        ``(A, B, retained_energy)``: A is ``(r, in)``, B is ``(out, r)``, float32; ``retained_energy =
        sum_{i<r} s_i² / ||ΔW||_F²`` (1.0 for ΔW = 0). For the randomized SVD the kept part is the projection of
        ΔW on the found singular vectors, so the ratio is still the exact retained fraction of that approximation.
    """
    if delta.dim() != 2:
        raise ValueError(f"delta_to_lora factorises 2-D deltas, got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    matrix = (delta.T if transpose else delta).float()
    kept = min(rank, *matrix.shape)
    randomized = method == "randomized" or (method == "auto" and use_randomized_svd(tuple(matrix.shape), kept))
    u, s, vh = _svd(matrix, kept, randomized, seed)
    root = s.sqrt()
    b = torch.zeros(matrix.shape[0], rank, dtype=torch.float32, device=matrix.device)
    a = torch.zeros(rank, matrix.shape[1], dtype=torch.float32, device=matrix.device)
    b[:, :kept] = u * root
    a[:kept] = root[:, None] * vh
    total = matrix.double().square().sum().item()  # float64 sums: energies of ~1e-6-sized deltas
    retained = 1.0 if total == 0.0 else min(1.0, s.double().square().sum().item() / total)
    return LoraFactors(a=a, b=b, retained_energy=retained)


def save_lora_adapter(
    folder: str | Path,
    modules: Mapping[str, tuple[Tensor, Tensor]],
    *,
    rank: int,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    embedding_modules: Collection[str] = (),
    fan_in_fan_out: bool = False,
    retained_energy: Mapping[str, float] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a PEFT-loadable LoRA adapter with ``lora_alpha = r`` (scale 1), so that ``B @ A`` is the stored ΔW.

    Args:
        folder: created if missing; gets ``adapter_config.json``, ``adapter_model.safetensors`` and, with
            ``retained_energy``, ``retained_energy.json`` (``{module: energy}``).
        modules: ``{module name in the base model: (A, B)}`` from ``delta_to_lora``; A ``(rank, in)``,
            B ``(out, rank)``. Embedding modules (``embedding_modules``) are saved as ``lora_embedding_A/B``.
        rank: the common r of all modules (``delta_to_lora`` pads to it).
        base_model_name_or_path, task_type: written to the config for ``PeftModel.from_pretrained``.
        fan_in_fan_out: the base layers store ``(in, out)`` weights (GPT-2 ``Conv1D``); their factors must then
            come from ``delta_to_lora(ΔW, r, transpose=True)``, as those of embedding modules.
        dtype: dtype of the saved factors (default float32).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in modules.items():
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"module {module!r}: factors must have rank {rank}, got A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}; pass rank={rank} to delta_to_lora")
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if module in embedding_modules else (
            "lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_KEY_PREFIX}{module}.{a_name}"] = a.to(dtype or torch.float32).contiguous()
        tensors[f"{PEFT_KEY_PREFIX}{module}.{b_name}"] = b.to(dtype or torch.float32).contiguous()
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": rank, "use_rslora": False, "target_modules": sorted(modules),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }
    save_file(tensors, str(folder / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if retained_energy is not None:
        (folder / RETAINED_ENERGY_NAME).write_text(json.dumps(dict(retained_energy), indent=2, sort_keys=True) + "\n")
    return folder
