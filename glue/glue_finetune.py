"""One GLUE fine-tuning run (single-task or two-task multitask) and the lookup of its checkpoint afterwards."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.run_dir import hyperparameter_dirname, run_dir_for
from common.seeding import set_random_seed
from glue.encoder_models import (
    build_multitask_model,
    load_pretrained_classifier,
    load_tokenizer,
    model_short_name,
    save_lora_classifier,
    save_multitask_model,
    wrap_with_lora,
)
from glue.glue_data import GLUE_TASKS, get_glue_task, load_glue_task, make_dataloader
from glue.glue_training import OptimConfig, evaluate_model, train_model

logger = logging.getLogger(__name__)

# MergeLM's "best checkpoint" learning rate per task for the paper's two encoders (inference_plms_glue.py).
DATASET_MODEL_LEARNING_RATE: dict[str, dict[str, float]] = {
    "cola": {"bert-base-uncased": 5e-5, "roberta-base": 1e-5},
    "sst2": {"bert-base-uncased": 1e-5, "roberta-base": 1e-5},
    "mrpc": {"bert-base-uncased": 5e-5, "roberta-base": 5e-5},
    "stsb": {"bert-base-uncased": 5e-5, "roberta-base": 1e-5},
    "qqp": {"bert-base-uncased": 1e-5, "roberta-base": 1e-5},
    "mnli": {"bert-base-uncased": 1e-5, "roberta-base": 1e-5},
    "qnli": {"bert-base-uncased": 1e-5, "roberta-base": 1e-5},
    "rte": {"bert-base-uncased": 1e-5, "roberta-base": 1e-5},
}


def default_learning_rate(task: str, language_model_name: str) -> float | None:
    """The table's learning rate for the paper's encoders; None (any) for other models."""
    return DATASET_MODEL_LEARNING_RATE.get(task, {}).get(model_short_name(language_model_name))


SCRIPT_NAME = "train_plms_glue"


@dataclass(frozen=True)
class GlueTrainConfig:
    """Everything one fine-tuning run depends on (``train_plms_glue.py`` flags, one run)."""

    dataset_name: str = "cola"
    language_model_name: str = "roberta-base"
    multitask_training: bool = False
    auxiliary_dataset_name: str | None = None
    batch_size: int = 16
    learning_rate: float = 1e-5
    num_epochs: int = 10
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_seq_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 0
    glue_dir: str | None = None
    device: str = "cpu"
    group_by_length: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None

    def __post_init__(self) -> None:
        get_glue_task(self.dataset_name)
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
            if self.multitask_training:
                raise ValueError("--lora_rank trains single-task adapters; drop --multitask_training or --lora_rank")
            if self.lora_alpha is not None and self.lora_alpha <= 0:
                raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        elif self.lora_alpha is not None:
            raise ValueError(f"lora_alpha={self.lora_alpha} is set without --lora_rank; pass --lora_rank R too")
        if self.multitask_training:
            if self.auxiliary_dataset_name is None:
                raise ValueError("auxiliary_dataset_name must be set with --multitask_training, got None")
            get_glue_task(self.auxiliary_dataset_name)
            if self.auxiliary_dataset_name == self.dataset_name:
                raise ValueError(f"auxiliary_dataset_name must differ from dataset_name, got {self.dataset_name!r} "
                                 "for both; pick another --auxiliary_dataset_name")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        OptimConfig(self.learning_rate, self.num_epochs, self.warmup_ratio, self.weight_decay)

    @property
    def effective_lora_alpha(self) -> float | None:
        """LoRA's alpha: the flag, else twice the rank (scale alpha / r = 2); None without LoRA."""
        if self.lora_rank is None:
            return None
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def tasks(self) -> list[str]:
        """Task order: auxiliary first, target last (MergeLM's ``{aux}_{target}`` folder order)."""
        return [self.auxiliary_dataset_name, self.dataset_name] if self.multitask_training else [self.dataset_name]

    def run_dir(self, output_dir: str | os.PathLike) -> Path:
        """``<output_dir>/train_plms_glue/<task or aux_target>/<model>/<hyperparameters>``."""
        hyper = {"learning_rate": self.learning_rate, "num_epochs": self.num_epochs, "batch_size": self.batch_size,
                 "max_seq_length": self.max_seq_length, "seed": self.seed}
        if self.max_train_samples is not None:
            hyper["max_train_samples"] = self.max_train_samples
        if self.group_by_length:
            hyper["group_by_length"] = True
        if self.lora_rank is not None:
            hyper.update(lora_rank=self.lora_rank, lora_alpha=self.effective_lora_alpha)
        folder = "_".join(self.tasks)
        return run_dir_for(output_dir, SCRIPT_NAME, folder, model_short_name(self.language_model_name),
                           hyperparameter_dirname(hyper))


def _load_data(config: GlueTrainConfig, tokenizer: Any) -> dict[str, list]:
    splits = {"train": [], "validation": [], "test": []}
    for name in config.tasks:
        data = load_glue_task(name, tokenizer, glue_dir=config.glue_dir, max_seq_length=config.max_seq_length,
                              max_train_samples=config.max_train_samples, max_eval_samples=config.max_eval_samples)
        for split in splits:
            splits[split].extend(getattr(data, split))
    return splits


def run_glue_training(config: GlueTrainConfig, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Fine-tune, reload the best epoch, evaluate on test, save the checkpoint into ``run_dir/model``.

    Returns:
        ``{task: {"validation": ..., "test": ...}, "best_epoch": n, "history": [...]}`` (multitask adds
        ``averaged_scores`` for both splits).
    """
    set_random_seed(config.seed)
    tokenizer = load_tokenizer(config.language_model_name)
    splits = _load_data(config, tokenizer)
    tasks = config.tasks
    if config.multitask_training:
        num_labels = {t: GLUE_TASKS[t].num_labels for t in tasks}
        task_ids = {t: GLUE_TASKS[t].task_id for t in tasks}
        model = build_multitask_model(config.language_model_name, num_labels, task_ids)
    else:
        model = load_pretrained_classifier(config.language_model_name, GLUE_TASKS[tasks[0]].num_labels)
    set_random_seed(config.seed)
    if config.lora_rank is not None:
        model = wrap_with_lora(model, config.lora_rank, config.effective_lora_alpha)
    loaders = {split: make_dataloader(rows, tokenizer, batch_size=config.batch_size, shuffle=split == "train",
                                      seed=config.seed, sort_by_length=split != "train",
                                      group_by_length=config.group_by_length and split == "train")
               for split, rows in splits.items()}
    optim = OptimConfig(config.learning_rate, config.num_epochs, config.warmup_ratio, config.weight_decay)
    history = train_model(model, loaders["train"], loaders["validation"], tasks, optim, device=config.device)
    best = next(h for h in history if h.get("best"))
    test = evaluate_model(model, loaders["test"], tasks, device=config.device, desc="test")
    model_dir = Path(run_dir) / "model"
    if config.multitask_training:
        save_multitask_model(model.cpu(), model_dir, config.language_model_name, num_labels)
        tokenizer.save_pretrained(str(model_dir))
        metrics = {t: {"validation": best["validation"][t], "test": test[t]} for t in tasks}
        metrics["averaged_scores"] = {"validation": best["validation"]["averaged_scores"],
                                      "test": test["averaged_scores"]}
    elif config.lora_rank is not None:
        save_lora_classifier(model.cpu(), model_dir, config.language_model_name)
        tokenizer.save_pretrained(str(model_dir))
        metrics = {tasks[0]: {"validation": best["validation"], "test": test}}
    else:
        model.cpu().save_pretrained(str(model_dir))
        tokenizer.save_pretrained(str(model_dir))
        metrics = {tasks[0]: {"validation": best["validation"], "test": test}}
    metrics.update(best_epoch=best["epoch"], history=history)
    logger.info("test performance: %s", {k: v for k, v in metrics.items() if k != "history"})
    return metrics


def find_finetuned_checkpoint(
    output_dir: str | os.PathLike, task: str, language_model_name: str, **filters: Any
) -> Path:
    """The ``model`` folder of the single-task run of ``task`` whose config matches every non-None filter.

    Raises:
        FileNotFoundError: when no run matches; ValueError when several do (pass more filters).
    """
    base = Path(output_dir, SCRIPT_NAME, task, model_short_name(language_model_name))
    matches = []
    for config_path in sorted(base.glob("*/config.json")):
        config = json.loads(config_path.read_text(encoding="utf-8"))["config"]
        # lora_rank is always compared: None picks full fine-tunes only, R the rank-R LoRA adapters
        wanted = {k: v for k, v in filters.items() if v is not None or k == "lora_rank"}
        if all(config.get(k) == v for k, v in wanted.items()) and (config_path.parent / "model").is_dir():
            matches.append(config_path.parent / "model")
    if not matches:
        raise FileNotFoundError(f"no fine-tuned {task} checkpoint of {language_model_name} matching {filters} under "
                                f"{base}; run train_plms_glue.py --dataset_name {task} first")
    if len(matches) > 1:
        raise ValueError(f"several {task} checkpoints match {filters}: {[str(m) for m in matches]}; pass "
                         "--learning_rate/--max_train_samples/--seed to pick one, or --checkpoint TASK=PATH")
    return matches[0]


def checkpoint_tag(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """A folder-name part that identifies a fine-tuned checkpoint.

    A run of ``train_plms_glue.py`` under ``output_dir`` is named by its run folder (its hyperparameters, seed and
    train cap); any other folder (``--checkpoint TASK=PATH``) by ``checkpoint-<hash of its resolved path>``, so
    two different checkpoints never share a results folder.
    """
    path = Path(checkpoint).resolve()
    train_root = Path(output_dir, SCRIPT_NAME).resolve()
    if path.name == "model" and train_root in path.parents and len(path.relative_to(train_root).parts) == 4:
        return path.parent.name
    return "checkpoint-" + hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:10]


def checkpoints_tag(checkpoints: Mapping[str, str | os.PathLike], output_dir: str | os.PathLike) -> str:
    """One short tag for several checkpoints (a merge): the hash of their per-task :func:`checkpoint_tag`."""
    text = json.dumps({task: checkpoint_tag(path, output_dir) for task, path in sorted(checkpoints.items())})
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


def config_record(config: GlueTrainConfig) -> dict[str, Any]:
    """The dict stored in ``config.json``."""
    return {"script": SCRIPT_NAME, **asdict(config)}


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """Flags that pick the fine-tuned checkpoints (shared by the inference and merge scripts)."""
    parser.add_argument("--language_model_name", default="roberta-base")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="fine-tuning lr to pick (default: MergeLM's table for bert/roberta, else any)")
    parser.add_argument("--max_train_samples", type=int, default=None, help="pick the run trained with this cap")
    parser.add_argument("--train_seed", type=int, default=0, help="pick the fine-tuning run with this seed")
    parser.add_argument("--lora_rank", type=int, default=None,
                        help="pick the LoRA adapters of this rank (train_plms_glue.py --lora_rank); default: full "
                             "fine-tunes")
    parser.add_argument("--checkpoint", nargs="*", default=[], metavar="TASK=PATH",
                        help="explicit fine-tuned model folders, overriding the lookup")
    parser.add_argument("--output_dir", default="results")
    parser.add_argument("--glue_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_eval_samples", type=int, default=None, help="cap on the validation/test splits")
    parser.add_argument("--gpu", type=int, default=0)


def add_rerun_flags(parser: argparse.ArgumentParser) -> None:
    """``--overwrite`` / ``--resume`` of the inference and merge scripts (exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="recompute runs whose results exist")
    group.add_argument("--resume", action="store_true", help="skip runs whose metrics.json exists, compute the rest")


def resolve_checkpoints(args: argparse.Namespace, tasks: Sequence[str]) -> dict[str, Path]:
    """``--checkpoint TASK=PATH`` entries, else the matching run under ``--output_dir/train_plms_glue``."""
    explicit = {}
    for item in args.checkpoint:
        task, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--checkpoint entries must look like TASK=PATH, got {item!r}")
        explicit[task] = Path(path)
    return {task: explicit.get(task) or find_finetuned_checkpoint(
        args.output_dir, task, args.language_model_name, seed=args.train_seed,
        learning_rate=args.learning_rate or default_learning_rate(task, args.language_model_name),
        max_train_samples=args.max_train_samples, lora_rank=args.lora_rank) for task in tasks}
