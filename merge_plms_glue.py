"""Merge pairs of fine-tuned GLUE encoders with average / task arithmetic / Fisher / RegMean / TIES, +- DARE.

Example:
    python merge_plms_glue.py --merging_method_name average_merging --language_model_name roberta-base
    python merge_plms_glue.py --merging_method_name fisher_merging --normalize_fisher_weight
    python merge_plms_glue.py --merging_method_name mask_merging --use_weight_rescale \
        --mask_apply_method average_merging --language_model_name roberta-base

Every pair of ``--dataset_names`` (default: all eight tasks, 28 pairs) is merged; the merged encoder is evaluated
on each task of the pair with that task's own head, and hyperparameters are grid-searched per target task on
the validation split (10 % of GLUE train). ``--select_on test`` reproduces MergeLM, which selected on the split it
reported. ``--grid paper`` is MergeLM's grid, ``reduced`` a subset of it (the CPU reproduction's), ``quick`` a
small one, ``none`` uses the flag values as given.
Each (pair, method) writes ``<output_dir>/merge_plms_glue/<a+b>/<model>/<method>[/<apply method>]/<settings>/``
with ``config.json``, ``metrics.json`` (per target: hyperparameters, validation and test metrics) and
``grid.json`` (every evaluated setting).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cli.merge_flags import (
    add_dare_flags,
    add_fisher_flags,
    add_method_flags,
    add_regmean_flags,
    add_statistics_flags,
    add_ties_flags,
)
from common.logging_setup import setup_logging
from common.run_dir import (
    atomic_write_json,
    hyperparameter_dirname,
    prepare_run_dir,
    read_json,
    run_dir_for,
    write_config,
    write_metrics,
)
from glue.encoder_models import device_for, load_tokenizer, model_short_name
from glue.glue_data import GLUE_TASK_NAMES
from glue.glue_finetune import add_checkpoint_args, add_rerun_flags, checkpoints_tag, resolve_checkpoints
from glue.glue_inference import DareSettings, check_drop_rates
from glue.glue_merging import GRIDS, grid_search_pair, load_task_pool

logger = logging.getLogger(__name__)
SCRIPT_NAME = "merge_plms_glue"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    add_method_flags(parser, several=True)
    parser.add_argument("--dataset_names", nargs="+", default=list(GLUE_TASK_NAMES), choices=GLUE_TASK_NAMES)
    parser.add_argument("--dataset_pairs", nargs="*", default=None, metavar="A,B", help="explicit pairs")
    parser.add_argument("--select_on", default="validation", choices=["validation", "test"])
    parser.add_argument("--grid", default="paper", choices=["paper", "reduced", "quick", "none"])
    add_ties_flags(parser)
    add_statistics_flags(parser)
    # MergeLM's merge_plms_glue.py: off unless --normalize_fisher_weight is given (its README passes it)
    add_fisher_flags(parser, normalize_fisher_weight=False)
    add_regmean_flags(parser)
    add_dare_flags(parser, rates="grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="several DARE mask seeds: every mask_merging run is repeated (selection included) per "
                             "seed, one run folder each; overrides --seed")
    parser.add_argument("--max_validation_samples", type=int, default=None,
                        help="cap on the validation split only (selection); test stays whole")
    add_rerun_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def flag_grid(args: argparse.Namespace, method: str) -> dict[str, list]:
    """``--grid none``: the single setting given by the flags."""
    return {"average_merging": {}, "task_arithmetic": {"scaling_coefficient": [args.scaling_coefficient]},
            "fisher_merging": {"fisher_scaling_coefficient": [args.fisher_scaling_coefficients[0]],
                               "num_fisher_examples": [args.nums_fisher_examples[0]]},
            "regmean_merging": {"num_regmean_examples": [args.nums_regmean_examples[0]],
                                "reduce_non_diagonal_ratio": [args.reduce_non_diagonal_ratio]},
            "ties_merging": {"scaling_coefficient": [args.scaling_coefficient],
                             "param_value_mask_rate": [args.param_value_mask_rate]}}[method]


@dataclass(frozen=True)
class Variant:
    """One run of a pair: the method, the applied method (after DARE), the DARE seed, the Fisher estimator."""

    name: str
    method: str
    seed: int | None = None
    fisher_estimator: str | None = None

    @property
    def key(self) -> str:
        key = f"{self.name}/{self.method}" if self.name == "mask_merging" else self.name
        key += f"/fisher_estimator={self.fisher_estimator}" if self.fisher_estimator else ""
        return key + (f"/seed={self.seed}" if self.seed is not None else "")


def variants(args: argparse.Namespace) -> list[Variant]:
    """Every requested run: method x (DARE seeds for mask_merging) x (Fisher estimators for Fisher merging)."""
    seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    out = []
    for name in args.merging_method_name:
        for method in args.mask_apply_method if name == "mask_merging" else [name]:
            for estimator in args.fisher_estimator if method == "fisher_merging" else [None]:
                out += [Variant(name, method, seed, estimator) for seed in (seeds if name == "mask_merging" else
                                                                            [None])]
    return out


def search_space(args: argparse.Namespace, name: str, method: str) -> tuple[dict[str, list], list[float] | None]:
    """(grid of the applied method, DARE rates or None) from the flags."""
    dare = name == "mask_merging"
    if method not in GRIDS["paper"][0]:
        raise ValueError(f"merge_plms_glue.py has no grid for merging method {method!r}, got it from the registry; "
                         "add its values to GRIDS in glue/glue_merging.py and to flag_grid")
    if args.grid == "none":
        return flag_grid(args, method), check_drop_rates(args.weight_mask_rate) if dare else None
    grids, rates = GRIDS[args.grid]
    return grids[method], list(rates) if dare else None


def dataset_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.dataset_pairs:
        pairs = [tuple(p.split(",")) for p in args.dataset_pairs]
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(GLUE_TASK_NAMES):
                raise ValueError(f"--dataset_pairs entries must be two different GLUE tasks like rte,mrpc, got {pair}")
        return pairs
    return list(itertools.combinations(args.dataset_names, 2))


def run_dir_of(args: argparse.Namespace, pair: Sequence[str], variant: Variant, checkpoints: Mapping[str, Any]
               ) -> Path:
    """The run folder, named from every setting that changes the results.

    ``checkpoints=<hash>`` identifies the fine-tuned models (their training runs: seed, learning rate, train
    cap, or a ``--checkpoint`` folder; see ``checkpoint_tag``); Fisher options name Fisher runs; ``--grid none``
    names its values; the DARE settings and seed name mask_merging runs.
    """
    methods = [variant.name, variant.method] if variant.name == "mask_merging" else [variant.name]
    hyper: dict[str, Any] = {"select_on": args.select_on, "grid": args.grid,
                             "checkpoints": checkpoints_tag(checkpoints, args.output_dir)}
    if variant.name == "mask_merging":
        hyper.update(use_weight_rescale=args.use_weight_rescale, mask_strategy=args.mask_strategy,
                     weight_format=args.weight_format, seed=variant.seed)
    if variant.method == "fisher_merging":
        hyper.update(fisher_estimator=variant.fisher_estimator, normalize_fisher_weight=args.normalize_fisher_weight,
                     minimal_fisher_weight=args.minimal_fisher_weight)
    if args.grid == "none":
        hyper.update({k: v[0] for k, v in flag_grid(args, variant.method).items()})
        if variant.name == "mask_merging":
            hyper["weight_mask_rate"] = args.weight_mask_rate
    for cap in ("max_eval_samples", "max_validation_samples"):
        if getattr(args, cap) is not None:
            hyper[cap] = getattr(args, cap)
    return run_dir_for(args.output_dir, SCRIPT_NAME, "+".join(pair), model_short_name(args.language_model_name),
                       *methods, hyperparameter_dirname(hyper))


def run_variant(args: argparse.Namespace, merger: Any, pair: Sequence[str], variant: Variant,
                argv: list[str]) -> dict[str, Any]:
    """Grid-search one (pair, method) with a loaded merger and write its run folder."""
    run_dir = prepare_run_dir(run_dir_of(args, pair, variant, merger.checkpoints), overwrite=args.overwrite,
                              resume=args.resume)
    setup_logging(run_dir / "run.log")
    logger.info("argv: %s", " ".join(argv))
    name, method = variant.name, variant.method
    grid, rates = search_space(args, name, method)
    merger.dare = replace(merger.dare, seed=variant.seed if variant.seed is not None else args.seed)
    merger.fisher_estimator = variant.fisher_estimator or "mergelm"
    config = {"script": SCRIPT_NAME, **vars(args), "merging_method_name": name, "applied_method": method,
              "seed": variant.seed, "fisher_estimator": variant.fisher_estimator,
              "dataset_pair": list(pair), "grid_values": grid, "dare_rates": rates,
              "checkpoints": {t: str(p) for t, p in merger.checkpoints.items()}}
    for key in ("mask_apply_method", "seeds"):
        config.pop(key)
    write_config(run_dir, config, argv)
    plain_best = None
    if name == "mask_merging":  # the plain method's selection, when its run is finished (MergeLM reads it too)
        plain = run_dir_of(args, pair, Variant(method, method, None, variant.fisher_estimator), merger.checkpoints)
        if (plain / "metrics.json").exists():
            plain_best = {task: result["hyperparameters"] for task, result in
                          read_json(plain / "metrics.json").items()}
            logger.info("plain %s hyperparameters from %s: %s", method, plain, plain_best)
    first = len(merger.evaluations)
    metrics = grid_search_pair(merger, method, grid, dare_rates=rates, select_on=args.select_on,
                               plain_best=plain_best)
    atomic_write_json(run_dir / "grid.json", merger.evaluations[first:])
    write_metrics(run_dir, metrics)
    return metrics


def finished_and_todo(args: argparse.Namespace, pairs: Sequence[tuple[str, str]]
                      ) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], list[Variant]]]:
    """Per pair: the finished runs' metrics (read back with ``--resume``) and the variants left to run."""
    results: dict[str, dict[str, Any]] = {}
    todo: dict[tuple[str, str], list[Variant]] = {}
    for pair in pairs:
        checkpoints = resolve_checkpoints(args, pair)
        results["+".join(pair)], todo[pair] = {}, []
        for variant in variants(args):
            metrics_path = run_dir_of(args, pair, variant, checkpoints) / "metrics.json"
            if args.resume and metrics_path.exists():
                results["+".join(pair)][variant.key] = read_json(metrics_path)
            else:
                todo[pair].append(variant)
        logger.info("%s: %d runs to compute, %d finished", "+".join(pair), len(todo[pair]),
                    len(results["+".join(pair)]))
    return results, todo


def run_pairs(args: argparse.Namespace, pairs: Sequence[tuple[str, str]], tokenizer: Any, argv: list[str]
              ) -> dict[str, dict[str, Any]]:
    """Every requested run of every pair, the plain methods first, then one DARE seed at a time.

    Each task is loaded once (``TaskPool``) and its Fisher / Gram statistics are shared by the pairs it is in; a
    DARE seed's statistics are released when all its runs are done. Pairs with nothing left are not loaded.
    """
    results, todo = finished_and_todo(args, pairs)
    tasks = list(dict.fromkeys(t for pair in pairs if todo[pair] for t in pair))
    if not tasks:
        return results
    checkpoints = resolve_checkpoints(args, tasks)
    pool = load_task_pool(
        tasks, checkpoints, tokenizer, language_model_name=args.language_model_name,
        data_options={"glue_dir": args.glue_dir, "max_seq_length": args.max_seq_length,
                      "max_eval_samples": args.max_eval_samples,
                      "max_validation_samples": args.max_validation_samples},
        batch_size=args.batch_size, device=device_for(args.gpu))
    dare = DareSettings(args.use_weight_rescale, args.mask_strategy, args.weight_format, args.seed)
    fisher_options = {"normalize_fisher_weight": args.normalize_fisher_weight,
                      "minimal_fisher_weight": args.minimal_fisher_weight}
    mergers = {pair: pool.pair(pair, dare, fisher_options) for pair in pairs if todo[pair]}
    seeds = list(dict.fromkeys(v.seed for pair_todo in todo.values() for v in pair_todo))
    for seed in sorted(seeds, key=lambda s: (s is not None, s or 0)):  # plain runs (seed None) first
        for pair, merger in mergers.items():
            for variant in (v for v in todo[pair] if v.seed == seed):
                results["+".join(pair)][variant.key] = run_variant(args, merger, pair, variant, argv)
            merger.clear_merged()
        if seed is not None:
            pool.release(seed)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Returns ``{"a+b": {Variant.key: {target task: result}}}``, e.g. ``"mask_merging/ties_merging/seed=0"``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup_logging()
    for variant in variants(args):
        search_space(args, variant.name, variant.method)
    tokenizer = load_tokenizer(args.language_model_name)
    return run_pairs(args, dataset_pairs(args), tokenizer, argv)


if __name__ == "__main__":
    main()
