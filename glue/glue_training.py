"""Fine-tuning and evaluation loops for GLUE encoders (single-task and multi-task), in plain PyTorch.

Matches MergeLM's Trainer set-up: AdamW (no weight decay on biases and LayerNorm weights), linear warm-up over
``warmup_ratio`` of the steps then linear decay, gradient clipping at 1.0, evaluation on the validation split
after every epoch, and the best epoch (by the task's primary metric) reloaded at the end. Multi-task loss is the
sum of the per-task mean losses in the batch, as in MergeLM.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from glue.glue_data import GLUE_TASKS
from glue.glue_metrics import compute_glue_metrics, primary_score

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings (MergeLM / transformers 4.33 Trainer defaults)."""

    learning_rate: float = 1e-5
    num_epochs: int = 10
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def model_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a single-task HF classifier or a :class:`MultiTaskModel` (which also takes ``dataset_ids``)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "dataset_ids")}
    if hasattr(model, "heads"):
        return model(dataset_ids=batch["dataset_ids"], **inputs)["logits"]
    return model(**inputs).logits


def glue_loss(
    logits: torch.Tensor, labels: torch.Tensor, dataset_ids: torch.Tensor, tasks: Sequence[str]
) -> torch.Tensor:
    """Cross-entropy (or MSE for STS-B) per task present in the batch; the sum of per-task means."""
    total = logits.new_zeros(())
    for name in tasks:
        task = GLUE_TASKS[name]
        rows = dataset_ids == task.task_id
        if not rows.any():
            continue
        if task.num_labels == 1:
            total = total + F.mse_loss(logits[rows, 0], labels[rows].float())
        else:
            total = total + F.cross_entropy(logits[rows, : task.num_labels], labels[rows].long())
    return total


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, *, device: str = "cpu", desc: str = "evaluating"
) -> dict[str, np.ndarray]:
    """Logits, labels and dataset ids over a loader (model in eval mode)."""
    model.eval()
    logits, labels, ids = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits.append(model_logits(model, batch).float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
        ids.append(batch["dataset_ids"].cpu().numpy())
    return {"logits": np.concatenate(logits), "labels": np.concatenate(labels), "dataset_ids": np.concatenate(ids)}


def evaluate_model(model: nn.Module, loader: DataLoader, tasks: Sequence[str], *, device: str = "cpu",
                   desc: str = "evaluating") -> dict[str, Any]:
    """Metrics of one task, or for several tasks ``{task: metrics, "averaged_scores": mean primary score}``."""
    out = predict(model, loader, device=device, desc=desc)
    per_task = {}
    for name in tasks:
        rows = out["dataset_ids"] == GLUE_TASKS[name].task_id
        per_task[name] = compute_glue_metrics(name, out["logits"][rows], out["labels"][rows])
        per_task[name]["num_examples"] = int(rows.sum())
    if len(tasks) == 1:
        return per_task[tasks[0]]
    per_task["averaged_scores"] = float(np.mean([primary_score(t, per_task[t]) for t in tasks]))
    return per_task


def selection_score(metrics: Mapping[str, Any], tasks: Sequence[str]) -> float:
    """The single number epochs are selected on: primary metric, or the multi-task ``averaged_scores``."""
    return primary_score(tasks[0], metrics) if len(tasks) == 1 else float(metrics["averaged_scores"])


def _optimizer_and_schedule(model: nn.Module, optim: OptimConfig, total_steps: int):
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "LayerNorm.bias")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": optim.weight_decay},
        {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    warmup = int(np.ceil(optim.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    validation_loader: DataLoader,
    tasks: Sequence[str],
    optim: OptimConfig,
    *,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Train for ``num_epochs``, evaluate each epoch on validation, reload the best epoch's weights.

    Returns:
        One record per epoch: ``epoch``, ``train_loss``, ``validation`` metrics, and ``best`` on the chosen one.
    """
    model.to(device)
    optimizer, scheduler = _optimizer_and_schedule(model, optim, optim.num_epochs * len(train_loader))
    history, best_score, best_state = [], -float("inf"), None
    for epoch in range(1, optim.num_epochs + 1):
        model.train()
        losses = []
        for batch in tqdm(train_loader, desc=f"epoch {epoch}/{optim.num_epochs}", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = glue_loss(model_logits(model, batch), batch["labels"], batch["dataset_ids"], tasks)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        metrics = evaluate_model(model, validation_loader, tasks, device=device, desc="validation")
        score = selection_score(metrics, tasks)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "validation": metrics})
        logger.info("epoch %d: train loss %.4f, validation %s", epoch, history[-1]["train_loss"], metrics)
        if score > best_score:
            best_score, best_state = score, copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
            best_epoch = epoch
    model.load_state_dict(best_state)
    history[best_epoch - 1]["best"] = True
    logger.info("best epoch %d (validation score %.4f) reloaded", best_epoch, best_score)
    return history
