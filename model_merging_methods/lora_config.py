"""PEFT LoRA ``adapter_config.json``: which settings keep ``ΔW = scale · B·A`` exact, and each module's scale.

Facts from PEFT 0.22.0: ``LoraLayer.update_layer`` sets ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), with ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern``
(``LoraModel._create_and_replace`` picks the key with ``peft.utils.other.get_pattern_key``); ``Linear.lora_variants``
lists the LoRA variants whose forward is not ``W x + scale · B A x``; PiSSA-like ``init_lora_weights`` rewrite the
base weights (``pissa_init``, ``olora_init``, ``corda_init``, ``lora_ga_init``, ``astra_init``, ``loftq_init``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ADAPTER_CONFIG_NAME = "adapter_config.json"

# LoraConfig fields whose truthy value replaces vanilla LoRA's forward ``W x + scale · B A x`` (PEFT 0.22.0
# ``Linear.lora_variants``): a merge on ΔW = scale·B·A would silently change the model. ``velora_config`` is not
# here: VeLoRA only changes the backward pass and merges with ``get_delta_weight`` (``VeloraLinearVariant``).
REFUSED_VARIANT_FIELDS: dict[str, str] = {
    "use_dora": "DoRA rescales each column of W + ΔW by a learned magnitude, so the update is not B·A",
    "alora_invocation_tokens": "aLoRA applies the adapter only after the invocation tokens; it cannot be merged",
    "arrow_config": "Arrow routes tokens between several LoRA experts",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "monteclora_config": "MonteCLoRA samples the factors",
    "kasa_config": "KaSA inserts a learned diagonal between A and B and truncates the base weight",
    "use_qalora": "QA-LoRA pools the input before A",
    "target_parameters": "LoRA on nn.Parameters (MoE experts) has its own parametrisation",
    "layer_replication": "the adapter belongs to a model with repeated layers, not to the base model",
}
# init_lora_weights values that modify the base weights at initialisation (PiSSA, OLoRA, CorDA, LoRA-GA, Astra:
# W_res = W - scale·B0·A0; LoftQ: quantised W), so B·A is not the update of the base model. PEFT's
# ``save_pretrained(path_initial_model_for_weight_conversion=...)`` converts such adapters to plain LoRA (and then
# writes init_lora_weights=True), which is accepted.
REFUSED_INIT_PREFIXES = ("pissa", "olora", "corda", "lora_ga", "astra", "loftq")
# Full (not low-rank) trained tensors an adapter can carry that need their own replace-the-base rule.
# ``modules_to_save`` (whole trained modules, e.g. a classification head) is read by ``lora.read_lora_adapter``:
# the saved tensor replaces the base's.
REFUSED_EXTRA_TENSOR_FIELDS = ("trainable_token_indices",)


def pattern_key(patterns: Iterable[str], module_name: str) -> str | None:
    """The first pattern matching ``module_name`` as PEFT's ``get_pattern_key`` does, or None if none matches.

    PEFT tries each key ``k`` in order with ``re.match(rf"(.*\\.)?({k})$", module_name)``: a pattern matches the
    whole name or a dot-separated suffix of it, and may be a regular expression.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def module_scale(config: Mapping[str, Any], module_name: str) -> tuple[int, float, float]:
    """``(r, lora_alpha, scale)`` of one module: ``rank_pattern`` / ``alpha_pattern`` override ``r`` / ``lora_alpha``
    (first matching key, ``pattern_key``); ``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_key, alpha_key = pattern_key(rank_pattern, module_name), pattern_key(alpha_pattern, module_name)
    rank = int(config.get("r", 8) if rank_key is None else rank_pattern[rank_key])
    alpha = config.get("lora_alpha", 8) if alpha_key is None else alpha_pattern[alpha_key]
    # the same Python float expressions as LoraLayer.update_layer, so the scale is PEFT's to the last bit
    scale = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
    return rank, alpha, scale


def _refused(source: str, field: str, value: Any, why: str, fix: str) -> ValueError:
    return ValueError(f"{source}: {field}={value!r} is not supported: {why}; {fix}")


def validate_adapter_config(config: Mapping[str, Any], *, source: str = ADAPTER_CONFIG_NAME) -> None:
    """Refuse every setting under which ``scale · B·A`` is not the adapter's change of the base weights.

    Raises ValueError naming the field and its value: ``peft_type`` other than LORA, the LoRA variants of
    ``REFUSED_VARIANT_FIELDS`` (DoRA, aLoRA, ...), ``init_lora_weights`` that rewrite the base weights (PiSSA, OLoRA,
    CorDA, LoRA-GA, Astra, LoftQ), trained full tensors (``bias`` other than "none",
    ``trainable_token_indices``), and a non-positive ``r``. ``modules_to_save`` tensors are accepted: they replace
    the base's tensors (``lora.read_lora_adapter``). Settings that do not change the merged weights
    (``lora_dropout``, ``layers_to_transform``, ``exclude_modules``, ``init_lora_weights`` True/False/"gaussian"/
    "eva"/"orthogonal"/"nora"/"mica", ``velora_config``) are accepted.
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _refused(source, "peft_type", peft_type, "only LoRA adapters have a ΔW = scale·B·A",
                       "merge the model the adapter was merged into (merge_and_unload) as a full fine-tune")
    for field, why in REFUSED_VARIANT_FIELDS.items():
        if config.get(field):
            raise _refused(source, field, config[field], why,
                           "merge it into its base with PEFT's merge_and_unload() and pass that model instead")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(REFUSED_INIT_PREFIXES):
        raise _refused(source, "init_lora_weights", init, "this initialisation modifies the base weights, so B·A "
                       "is not the change of the base model",
                       "save the adapter with save_pretrained(path_initial_model_for_weight_conversion=...) to "
                       "convert it to plain LoRA")
    if config.get("bias", "none") != "none":
        raise _refused(source, "bias", config["bias"], "the adapter carries fully trained bias tensors",
                       "use bias='none', or merge_and_unload() and pass the model as a full fine-tune")
    for field in REFUSED_EXTRA_TENSOR_FIELDS:
        if config.get(field):
            raise _refused(source, field, config[field], "the adapter carries fully trained tensors besides LoRA",
                           "merge_and_unload() and pass the model as a full fine-tune")
    rank = config.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{source}: r must be a positive integer, got {rank!r}")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter folder, validated (``validate_adapter_config``)."""
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: {path} does not exist")
    config = json.loads(path.read_text())
    validate_adapter_config(config, source=str(path))
    return config


def is_lora_adapter_dir(folder: str | Path) -> bool:
    """True when ``folder`` holds an ``adapter_config.json`` (a PEFT adapter, to be read by ``read_lora_adapter``)."""
    return (Path(folder) / ADAPTER_CONFIG_NAME).is_file()
