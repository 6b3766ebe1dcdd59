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
small one (each method declares its values: ``MergeMethod.hyperparameters``); ``none`` searches the values given
by the flags (several values of one flag are searched). A flag of a setting that the chosen grid searches is
refused unless it keeps its default: it would have no effect.
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
from pathlib import Path
from typing import Any

from cli.recipe_flags import add_hyperparameter_flags, add_method_flags, declared_flags, unused_flags
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
from glue.glue_merging import (
    DEFAULT_MAX_STATISTICS_EXAMPLES,
    DEFAULT_STATISTICS_SEED,
    GRID_PROTOCOLS,
    PairMerger,
    Search,
    grid_search_pair,
    load_task_pool,
)
from model_merging_methods import DARE_METHOD_NAME, DARE_SPECS, MERGE_METHODS, Dare, Hyperparameter, Recipe

logger = logging.getLogger(__name__)
SCRIPT_NAME = "merge_plms_glue"


def _searchable(spec: Hyperparameter) -> bool:
    """A setting with a GLUE grid: its flag takes several values (searched under ``--grid none``)."""
    return any(protocol in spec.grids for protocol in GRID_PROTOCOLS.values())


def _several() -> list[str]:
    """Flags taking several values: the searchable settings, and those that are one run per value (but the DARE
    seed: MergeLM's ``--seed`` is one value, ``--seeds`` several)."""
    return [spec.name for spec, _ in declared_flags().values()
            if _searchable(spec) or (spec.run_per_value and spec.name != "seed")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    add_method_flags(parser, several=True)
    parser.add_argument("--dataset_names", nargs="+", default=list(GLUE_TASK_NAMES), choices=GLUE_TASK_NAMES)
    parser.add_argument("--dataset_pairs", nargs="*", default=None, metavar="A,B", help="explicit pairs")
    parser.add_argument("--select_on", default="validation", choices=["validation", "test"])
    parser.add_argument("--grid", default="paper", choices=[*GRID_PROTOCOLS, "none"])
    # every registered method's declared settings and DARE's, with MergeLM's command-line defaults (e.g. Fisher's
    # normalisation off unless --normalize_fisher_weight is given, as its merge_plms_glue.py; its README passes it)
    add_hyperparameter_flags(parser, several=_several())
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="several DARE mask seeds: every mask_merging run is repeated (selection included) per "
                             "seed, one run folder each; overrides --seed")
    parser.add_argument("--max_validation_samples", type=int, default=None,
                        help="cap on the validation split only (selection); test stays whole")
    parser.add_argument("--max_statistics_examples", type=int, default=DEFAULT_MAX_STATISTICS_EXAMPLES,
                        help="training examples loaded per task for the Fisher / Gram statistics; a requested count "
                             f"above it is an error (default: {DEFAULT_MAX_STATISTICS_EXAMPLES})")
    parser.add_argument("--statistics_seed", type=int, default=DEFAULT_STATISTICS_SEED,
                        help="seed of the fixed order of each task's statistics examples: a statistic over n examples "
                             "uses the first n, with and without DARE, whatever ran before (positions recorded in "
                             f"config.json; default: {DEFAULT_STATISTICS_SEED})")
    add_rerun_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _values(args: argparse.Namespace, spec: Hyperparameter) -> list:
    value = getattr(args, spec.name)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _fixed(args: argparse.Namespace, spec: Hyperparameter, grid: str) -> Any:
    """The one value of a setting the grid does not search."""
    values = _values(args, spec)
    if len(values) != 1:
        raise ValueError(f"--{spec.flag} takes one value under --grid {grid} (it does not search "
                         f"{spec.name}), got {values}")
    return values[0]


def _searched(args: argparse.Namespace, parser: argparse.ArgumentParser, spec: Hyperparameter, grid: str
              ) -> tuple | None:
    """The values ``--grid`` searches for a setting (None: not searched); a flag it would ignore is refused."""
    if grid == "none":
        return tuple(_values(args, spec)) if _searchable(spec) else None
    values = spec.grids.get(GRID_PROTOCOLS[grid])
    if values is not None and getattr(args, spec.name) != parser.get_default(spec.name):
        raise ValueError(f"--{spec.flag} {getattr(args, spec.name)} has no effect under --grid {grid}, which "
                         f"searches {spec.name} over {list(values)}; pass --grid none to use the flag's values, or "
                         "drop the flag")
    return values


def searches(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> list[Search]:
    """Every requested run: method x its one-run-per-value settings (e.g. Fisher estimators) x DARE seeds.

    A setting the grid searches takes the grid's values, every other one its flag's value; all of it is checked
    (names, ranges, ignored flags) before any model is read.
    """
    parser = parser or build_parser()
    seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    out = []
    for name in args.merging_method_name:
        dare = name == DARE_METHOD_NAME
        for method in args.mask_apply_method if dare else [name]:
            fixed, grid, per_run = {}, {}, {}
            for spec in MERGE_METHODS[method].hyperparameters:
                values = _searched(args, parser, spec, args.grid)
                if values is not None:
                    grid[spec.name] = values
                elif spec.run_per_value:
                    per_run[spec.name] = list(dict.fromkeys(_values(args, spec)))
                else:
                    fixed[spec.name] = _fixed(args, spec, args.grid)
            rates = _searched(args, parser, DARE_SPECS["weight_mask_rate"], args.grid) if dare else ()
            # DARE's settings other than the searched rate and the per-run seed take their flags' values
            dare_fixed = {n: _fixed(args, spec, args.grid) for n, spec in DARE_SPECS.items()
                          if n not in ("weight_mask_rate", "seed")}
            for values in itertools.product(*per_run.values()):
                settings = {**fixed, **dict(zip(per_run, values, strict=True)), **{k: v[0] for k, v in grid.items()}}
                for seed in seeds if dare else [None]:
                    dare_settings = Dare(rates[0], **dare_fixed, seed=seed) if dare else None
                    out.append(Search(Recipe(method, settings, dare_settings), grid, rates))
    return out


def dataset_pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.dataset_pairs:
        pairs = [tuple(p.split(",")) for p in args.dataset_pairs]
        for pair in pairs:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(GLUE_TASK_NAMES):
                raise ValueError(f"--dataset_pairs entries must be two different GLUE tasks like rte,mrpc, got {pair}")
        return pairs
    return list(itertools.combinations(args.dataset_names, 2))


def check_statistics_examples(args: argparse.Namespace, runs: Sequence[Search]) -> None:
    """A statistics count above ``--max_statistics_examples`` (the training examples loaded) is an error."""
    for search in runs:
        specs = search.recipe.spec.specs
        for recipe in search.candidates():
            for name, count in recipe.statistics_settings().items():
                if specs[name].statistics == "num_examples" and count > args.max_statistics_examples:
                    raise ValueError(f"{name}={count} needs more training examples than --max_statistics_examples "
                                     f"{args.max_statistics_examples} loads per task; raise --max_statistics_examples "
                                     f"or lower --{specs[name].flag}")


def run_dir_of(args: argparse.Namespace, pair: Sequence[str], search: Search, checkpoints: Mapping[str, Any]
               ) -> Path:
    """The run folder, named from every setting that changes the results.

    ``checkpoints=<hash>`` identifies the fine-tuned models (their training runs: seed, learning rate, train
    cap, or a ``--checkpoint`` folder; see ``checkpoint_tag``); then every setting of the recipe that is not
    searched (the DARE settings and seed, Fisher's options, ...); ``--grid none`` names the values it searched;
    caps on the data (and a non-default statistics cap) close the name.
    """
    hyper: dict[str, Any] = {"select_on": args.select_on, "grid": args.grid,
                             "checkpoints": checkpoints_tag(checkpoints, args.output_dir)}
    hyper.update({k: v for k, v in search.recipe.settings().items() if k not in search.searched_names})
    if args.grid == "none":
        hyper.update({k: v[0] if len(v) == 1 else list(v) for k, v in search.grid.items()})
        if search.dare_rates:
            hyper["weight_mask_rate"] = list(search.dare_rates)
    for cap in ("max_eval_samples", "max_validation_samples"):
        if getattr(args, cap) is not None:
            hyper[cap] = getattr(args, cap)
    if search.recipe.spec.statistics:
        # runs before the fixed subsets drew their examples from a shuffled loader: never resume those
        hyper["statistics_seed"] = args.statistics_seed
        if args.max_statistics_examples != DEFAULT_MAX_STATISTICS_EXAMPLES:
            hyper["max_statistics_examples"] = args.max_statistics_examples
    return run_dir_for(args.output_dir, SCRIPT_NAME, "+".join(pair), model_short_name(args.language_model_name),
                       *search.recipe.method_path, hyperparameter_dirname(hyper))


def _plain_search(search: Search) -> Search:
    return Search(Recipe(search.recipe.method, search.recipe.hyperparameters), search.grid)


def _plain_selection(path: Path, search: Search) -> dict[str, Recipe]:
    """``{task: recipe}`` selected by the finished plain run (``metrics.json``); runs written before the recipe
    redesign named Fisher's coefficient ``fisher_scaling_coefficient``."""
    selection = {}
    for task, result in read_json(path).items():
        searched = dict(result["hyperparameters"])
        if "fisher_scaling_coefficient" in searched:
            searched["fisher_scaling_coefficients"] = searched.pop("fisher_scaling_coefficient")
        selection[task] = Recipe(search.recipe.method, search.recipe.hyperparameters).replace(**searched)
    return selection


def _config_record(args: argparse.Namespace, search: Search, pair: Sequence[str], merger: PairMerger
                   ) -> dict[str, Any]:
    """``config.json``: the data and run options, then the recipe; no flag of a setting this run does not use."""
    declared = {spec.name for spec, _ in declared_flags().values()} | {"merging_method_name", "mask_apply_method",
                                                                       "seeds"}
    options = {k: v for k, v in vars(args).items() if k not in declared}
    recipe = search.recipe
    return {"script": SCRIPT_NAME, **options, "merging_method_name": recipe.merging_method_name,
            "applied_method": recipe.method, "seed": recipe.dare.seed if recipe.dare else None,
            "fisher_estimator": recipe.settings().get("fisher_estimator"), "recipe": recipe.record(),
            "dataset_pair": list(pair), "grid_values": dict(search.grid),
            "dare_rates": list(search.dare_rates) or None,
            "checkpoints": {t: str(p) for t, p in merger.checkpoints.items()},
            "statistics_subset": merger.statistics_subset(search.candidates())}


def run_search(args: argparse.Namespace, merger: PairMerger, pair: Sequence[str], search: Search,
               argv: list[str]) -> dict[str, Any]:
    """Grid-search one (pair, run) with a loaded merger and write its run folder."""
    run_dir = prepare_run_dir(run_dir_of(args, pair, search, merger.checkpoints), overwrite=args.overwrite,
                              resume=args.resume)
    setup_logging(run_dir / "run.log")
    logger.info("argv: %s", " ".join(argv))
    write_config(run_dir, _config_record(args, search, pair, merger), argv)
    plain_best = None
    if search.recipe.dare is not None:  # the plain method's selection, when its run is finished (MergeLM reads it)
        plain = run_dir_of(args, pair, _plain_search(search), merger.checkpoints) / "metrics.json"
        if plain.exists():
            plain_best = _plain_selection(plain, search)
            logger.info("plain %s selection from %s: %s", search.recipe.method, plain,
                        {t: r.describe() for t, r in plain_best.items()})
    metrics, evaluations = grid_search_pair(merger, search, select_on=args.select_on, plain_best=plain_best)
    atomic_write_json(run_dir / "grid.json", evaluations)
    write_metrics(run_dir, metrics)
    return metrics


def finished_and_todo(args: argparse.Namespace, pairs: Sequence[tuple[str, str]], runs: Sequence[Search]
                      ) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], list[Search]]]:
    """Per pair: the finished runs' metrics (read back with ``--resume``) and the runs left to compute."""
    results: dict[str, dict[str, Any]] = {}
    todo: dict[tuple[str, str], list[Search]] = {}
    for pair in pairs:
        checkpoints = resolve_checkpoints(args, pair)
        results["+".join(pair)], todo[pair] = {}, []
        for search in runs:
            metrics_path = run_dir_of(args, pair, search, checkpoints) / "metrics.json"
            if args.resume and metrics_path.exists():
                results["+".join(pair)][search.key] = read_json(metrics_path)
            else:
                todo[pair].append(search)
        logger.info("%s: %d runs to compute, %d finished", "+".join(pair), len(todo[pair]),
                    len(results["+".join(pair)]))
    return results, todo


def _dare_seed(search: Search) -> int | None:
    return search.recipe.dare.seed if search.recipe.dare is not None else None


def run_pairs(args: argparse.Namespace, pairs: Sequence[tuple[str, str]], runs: Sequence[Search], tokenizer: Any,
              argv: list[str]) -> dict[str, dict[str, Any]]:
    """Every requested run of every pair, the plain methods first, then one DARE seed at a time.

    Each task is loaded once (``TaskPool``) and its Fisher / Gram statistics are shared by the pairs it is in; a
    DARE seed's statistics are released when all its runs are done. Pairs with nothing left are not loaded.
    """
    results, todo = finished_and_todo(args, pairs, runs)
    tasks = list(dict.fromkeys(t for pair in pairs if todo[pair] for t in pair))
    if not tasks:
        return results
    checkpoints = resolve_checkpoints(args, tasks)
    pool = load_task_pool(
        tasks, checkpoints, tokenizer, language_model_name=args.language_model_name,
        data_options={"glue_dir": args.glue_dir, "max_seq_length": args.max_seq_length,
                      "max_eval_samples": args.max_eval_samples,
                      "max_validation_samples": args.max_validation_samples},
        batch_size=args.batch_size, device=device_for(args.gpu), max_statistics_examples=args.max_statistics_examples,
        statistics_seed=args.statistics_seed)
    mergers = {pair: pool.pair(pair) for pair in pairs if todo[pair]}
    seeds = list(dict.fromkeys(_dare_seed(s) for pair_todo in todo.values() for s in pair_todo))
    for seed in sorted(seeds, key=lambda s: (s is not None, s or 0)):  # plain runs (seed None) first
        for pair, merger in mergers.items():
            for search in (s for s in todo[pair] if _dare_seed(s) == seed):
                results["+".join(pair)][search.key] = run_search(args, merger, pair, search, argv)
            merger.clear_merged()
        if seed is not None:
            pool.release(seed)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Returns ``{"a+b": {Search.key: {target task: result}}}``, e.g. ``"mask_merging/ties_merging/seed=0"``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    runs = searches(args, parser)
    unused = unused_flags(parser, args, [search.recipe for search in runs])
    if unused:  # one command line often serves several method groups (scripts/reproduce_encoder_results.sh)
        logger.warning("%s given, but no requested method uses it", ", ".join(unused))
    check_statistics_examples(args, runs)
    pairs = dataset_pairs(args)
    tokenizer = load_tokenizer(args.language_model_name)
    return run_pairs(args, pairs, runs, tokenizer, argv)


if __name__ == "__main__":
    main()
