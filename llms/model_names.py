"""The paper's model names: short name -> hub id, fine-tuned model -> backbone, merged task -> model.

Short names are MergeLM's (its ``cache_dir/<short name>`` folders); ``llms.model_resolution.resolve_model`` turns
one into a local path or a hub id.
"""

from __future__ import annotations

# Short names used by MergeLM's scripts (section 6.1 of the specification) -> Hugging Face hub ids.
MODEL_HUB_IDS: dict[str, str] = {
    "WizardLM-7B-V1.0": "WizardLMTeam/WizardLM-7B-V1.0",  # a weight DIFF against llama-7b-hf
    "WizardLM-13B-V1.2": "WizardLMTeam/WizardLM-13B-V1.2",
    "WizardLM-70B-V1.0": "WizardLMTeam/WizardLM-70B-V1.0",
    "WizardMath-7B-V1.0": "WizardLMTeam/WizardMath-7B-V1.0",
    "WizardMath-13B-V1.0": "WizardLMTeam/WizardMath-13B-V1.0",
    "WizardMath-70B-V1.0": "WizardLMTeam/WizardMath-70B-V1.0",
    "WizardCoder-Python-7B-V1.0": "WizardLMTeam/WizardCoder-Python-7B-V1.0",
    "WizardCoder-Python-13B-V1.0": "WizardLMTeam/WizardCoder-Python-13B-V1.0",
    "WizardCoder-Python-34B-V1.0": "WizardLMTeam/WizardCoder-Python-34B-V1.0",
    "llama-2-13b-code-alpaca": "layoric/llama-2-13b-code-alpaca",
    "Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "Llama-2-13b-hf": "meta-llama/Llama-2-13b-hf",
    "Llama-2-70b-hf": "meta-llama/Llama-2-70b-hf",
    "llama-7b-hf": "huggyllama/llama-7b",
    "CodeLlama-7b-Python-hf": "codellama/CodeLlama-7b-Python-hf",
    "CodeLlama-13b-Python-hf": "codellama/CodeLlama-13b-Python-hf",
    "CodeLlama-34b-Python-hf": "codellama/CodeLlama-34b-Python-hf",
}

# Fine-tuned model -> the pre-trained backbone its delta is taken against (MergeLM's
# finetuned_model_backbone_mapping_dict, specification section 4.4).
FINETUNED_TO_BACKBONE: dict[str, str] = {
    "WizardLM-7B-V1.0": "llama-7b-hf",
    "WizardLM-7B-V1.0-recovered": "llama-7b-hf",
    "WizardLM-13B-V1.2": "Llama-2-13b-hf",
    "WizardLM-70B-V1.0": "Llama-2-70b-hf",
    "WizardMath-7B-V1.0": "Llama-2-7b-hf",
    "WizardMath-13B-V1.0": "Llama-2-13b-hf",
    "WizardMath-70B-V1.0": "Llama-2-70b-hf",
    "WizardCoder-Python-7B-V1.0": "CodeLlama-7b-Python-hf",
    "WizardCoder-Python-13B-V1.0": "CodeLlama-13b-Python-hf",
    "WizardCoder-Python-34B-V1.0": "CodeLlama-34b-Python-hf",
    "llama-2-13b-code-alpaca": "Llama-2-13b-hf",
}

# --wizardcoder_use_llama2_as_backbone: the paper's "large delta" experiment (DARE fails on it).
WIZARDCODER_LLAMA2_BACKBONE: dict[str, str] = {
    "WizardCoder-Python-7B-V1.0": "Llama-2-7b-hf",
    "WizardCoder-Python-13B-V1.0": "Llama-2-13b-hf",
}

# merge_llms_instruct_math_code.py: task -> fine-tuned model; all three share Llama-2-13b-hf.
TASK_TO_MODEL: dict[str, str] = {
    "instruct": "WizardLM-13B-V1.2",
    "math": "WizardMath-13B-V1.0",
    "code": "llama-2-13b-code-alpaca",
}

# Models published as a weight diff: name -> backbone the diff is added to (see llms.weight_diff).
WEIGHT_DIFF_MODELS: dict[str, str] = {"WizardLM-7B-V1.0": "llama-7b-hf"}


def backbone_for(finetuned_name: str, *, wizardcoder_use_llama2_as_backbone: bool = False) -> str:
    """The backbone short name of a fine-tuned model (MergeLM flag ``--wizardcoder_use_llama2_as_backbone``)."""
    if wizardcoder_use_llama2_as_backbone:
        if finetuned_name not in WIZARDCODER_LLAMA2_BACKBONE:
            raise ValueError(
                f"--wizardcoder_use_llama2_as_backbone applies only to {sorted(WIZARDCODER_LLAMA2_BACKBONE)}, "
                f"got {finetuned_name!r}; drop the flag or pick one of those models"
            )
        return WIZARDCODER_LLAMA2_BACKBONE[finetuned_name]
    if finetuned_name not in FINETUNED_TO_BACKBONE:
        raise ValueError(
            f"finetuned model name must be one of {sorted(FINETUNED_TO_BACKBONE)}, got {finetuned_name!r}"
        )
    return FINETUNED_TO_BACKBONE[finetuned_name]
