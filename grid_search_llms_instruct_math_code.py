"""The paper's LLM selection protocol: grid over lambda / p / TIES retain ratio on a 10 % validation sample of each
benchmark, the best setting per benchmark, then its scores on the other 90 % and on the full set.

The grid's methods are every registered method without Fisher/Gram statistics and ``mask_merging+<method>``; each
setting declared with a Table 1 grid has a plural flag (``--scaling_coefficients``, ``--weight_mask_rates``,
``--param_value_mask_rates``, and a new method's own) whose default is the declared grid; the methods' other
settings have their singular flags (``--ties_trim_scope``, default per_tensor), and ``--seed`` is DARE's mask seed.

Examples:
    # the author's stated settings for one Table 1 row (no grid needed), on one GPU
    python grid_search_llms_instruct_math_code.py --preset table1/lm+math/task_arithmetic+dare \
        --allow_code_execution --model_path Llama-2-13b-hf=/models/Llama-2-13b-hf ...
    # a grid of Task Arithmetic + DARE (paper ranges: lambda 0.5..1.0, p 0.1..0.9): plan and GPU estimate only
    python grid_search_llms_instruct_math_code.py --merge_instruct --merge_math \
        --merging_methods mask_merging+task_arithmetic --tokens_per_second 2000 --dry_run
    # the same grid on 8 GPUs, one job per GPU, then the selection once every shard has finished
    for i in 0 1 2 3 4 5 6 7; do CUDA_VISIBLE_DEVICES=$i python grid_search_llms_instruct_math_code.py \
        --merge_instruct --merge_math --merging_methods mask_merging+task_arithmetic --stage grid --shard $i/8 & done
    wait; python grid_search_llms_instruct_math_code.py --merge_instruct --merge_math \
        --merging_methods mask_merging+task_arithmetic --stage select

Every grid point is one streamed merge, evaluated on every benchmark's validation sample (all of a point's
benchmarks generated with one model load); points that differ only in λ are merged together, in one pass over the
inputs (``--max_merge_outputs`` caps the models one pass writes). A finished point (``result.json``) is never
redone, so a killed job is simply started again. The selection (``--stage select`` or
the end of ``--stage all``) refuses to run while a grid point is not finished, naming the missing ones, unless
``--allow_missing`` (then ``selection.json`` records them and the tables say the grid was partial). Points tied
for a benchmark's best validation score are listed in ``selection.json`` and the tables; the earlier point in
grid order wins. ``--list_presets`` shows the Table 1 presets and their sources. Folders and files: see
``llms/llm_grid_search.py``.

AlpacaEval is judged outside the repository, so a grid with it runs in four steps: ``--stage grid`` (every shard);
``python evaluate_generations.py --pending_alpaca_eval <results_dir>`` prints an ``alpaca_eval`` call and an
ingestion command for each point's validation outputs: run them; ``--stage select`` (it refuses while a finished
point has no AlpacaEval validation score, naming the points, unless ``--allow_missing``); the same helper again for
the selected point's final parts (validation, test, full), which Table 1 (``summarize_results.py --paper_table1``)
then shows.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from cli.recipe_flags import add_homology_flags, add_hyperparameter_flags, declared_flags
from common.logging_setup import setup_logging
from common.run_dir import write_config
from common.seeding import set_random_seed
from llms.llm_cli import LLM_CLI_DEFAULTS, add_common_args, homology_from_args, settings_from_args
from llms.llm_configs import LLM_DATASET_NAMES, MERGE_TASK_ORDER, llm_merge_methods
from llms.llm_grid import PROTOCOL, expand_points, grid_methods, parse_shard, searched_hyperparameters, with_settings
from llms.llm_grid_search import (
    GridSearchConfig,
    compute_plan_text,
    grid_model_paths,
    run_grid_search,
    selection_folder,
)
from llms.llm_presets import describe_presets, get_preset, table1_row_for
from llms.model_resolution import parse_model_path_overrides

logger = logging.getLogger(__name__)


def _plural(name: str) -> str:
    """The grid flag of a searched setting: ``scaling_coefficient`` -> ``scaling_coefficients``."""
    return f"{name}s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="a Table 1 preset (models, method, stated settings)")
    parser.add_argument("--list_presets", action="store_true", help="print the presets and their sources, then exit")
    for task in MERGE_TASK_ORDER:
        parser.add_argument(f"--merge_{task}", action="store_true", help=f"merge the {task} model")
    parser.add_argument("--merging_methods", nargs="+", default=None, choices=grid_methods(),
                        help="methods of the grid (mask_merging+X = DARE then X)")
    searched = searched_hyperparameters(grid_methods())
    for spec in searched.values():  # one plural flag per setting declared with a Table 1 grid
        declared = " ".join(str(v) for v in spec.grids[PROTOCOL])
        parser.add_argument(f"--{_plural(spec.flag)}", dest=_plural(spec.name), nargs="+", type=spec.python_type(),
                            default=None, help=f"{spec.help}: values searched (default: the declared grid, "
                                               f"{declared})")
    # the methods' settings that are not searched, one value for every point (TIES: per_tensor, as every LLM
    # command line; see llms.llm_cli); DARE in the grid is the paper's (rescaled random drop of deltas), its
    # mask seed the common --seed
    add_hyperparameter_flags(parser, methods=llm_merge_methods(), dare=False, statistics=False,
                             defaults=LLM_CLI_DEFAULTS, skip=tuple(searched))
    parser.add_argument("--datasets", nargs="+", default=None, choices=LLM_DATASET_NAMES,
                        help="benchmarks (default: the merged tasks', or the preset's)")
    parser.add_argument("--validation_fraction", type=float, default=0.1, help="validation sample (paper: 10%%)")
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the validation sample")
    parser.add_argument("--shard", default="0/1",
                        help="i/N: run block i of N consecutive blocks of the grid, the points that differ only in "
                             "λ kept together (with --stage grid)")
    parser.add_argument("--max_merge_outputs", type=int, default=None,
                        help="at most N grid points merged in one pass (points that differ only in λ share one: "
                             "the inputs are read once; each output takes one model's disk, 26 GB in bf16 at 13B, "
                             "until its point is evaluated); 1 = one merge per point; default: every such point of "
                             "the shard")
    parser.add_argument("--stage", default="all", choices=["all", "grid", "select"],
                        help="grid = validation runs only; select = selection + test/full runs of the selected")
    parser.add_argument("--allow_missing", action="store_true",
                        help="select among the finished grid points when some are not finished (recorded in "
                             "selection.json; the Table 1 printout marks it partial); default: refuse")
    parser.add_argument("--tokens_per_second", type=float, default=None,
                        help="generation rate for the estimate (default: measured on finished points)")
    parser.add_argument("--merge_seconds", type=float, default=None, help="seconds per merge for the estimate")
    parser.add_argument("--engine_start_seconds", type=float, default=None,
                        help="seconds to load one merged model for generation (one per point and task folder: "
                             "its benchmarks share it), for the estimate (default: 90, assumed for 13B)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and the estimate, run nothing")
    parser.add_argument("--save_merge_models_dir", default="save_merge_models", help="merged-model folders")
    add_homology_flags(parser)
    add_common_args(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _grid_values(args: argparse.Namespace) -> dict[str, list[Any]]:
    """``{name: values}`` given by the plural flags (the others keep their declared grids)."""
    names = searched_hyperparameters(grid_methods())
    return {name: getattr(args, _plural(name)) for name in names if getattr(args, _plural(name)) is not None}


def _fixed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every point gets: the non-searched method flags and ``--seed`` (DARE's mask seed)."""
    searched = searched_hyperparameters(grid_methods())
    declared = declared_flags(llm_merge_methods(), dare=False, statistics=False).values()
    settings = {spec.name: getattr(args, spec.name) for spec, _ in declared if spec.name not in searched}
    return {**settings, "seed": args.seed}


def _search_definition(args: argparse.Namespace) -> dict[str, Any]:
    """Models, grid, stated settings and label, from ``--preset`` or from the flags."""
    tasks = tuple(t for t in MERGE_TASK_ORDER if getattr(args, f"merge_{t}"))
    values, settings = _grid_values(args), _fixed_settings(args)
    if args.preset is None:
        if not args.merging_methods:
            raise ValueError("a grid needs --merging_methods (or --preset), got neither; see --list_presets")
        return {"merge_tasks": tasks, "points": expand_points(args.merging_methods, values, settings),
                "datasets": tuple(args.datasets or ()), "label": ",".join(args.merging_methods),
                "table1_row": table1_row_for(tasks, args.merging_methods)}
    preset = get_preset(args.preset)
    if tasks or args.merging_methods:
        raise ValueError(f"--preset {preset.name} sets the models and methods, got --merge_* / --merging_methods "
                         "too; drop them or leave out --preset")
    datasets = tuple(d for d in preset.datasets if not args.datasets or d in args.datasets)
    points = tuple(with_settings(p, settings) for p in preset.grid_points) or expand_points(
        preset.methods, values, settings)
    if all(d in preset.fixed for d in datasets):
        points = ()
    fixed = {d: (with_settings(point, settings), source) for d, (point, source) in preset.fixed.items()
             if d in datasets}
    return {"merge_tasks": preset.merge_tasks, "points": points, "datasets": datasets, "fixed": fixed,
            "label": preset.name, "table1_row": preset.table1_row}


def build_config(args: argparse.Namespace) -> GridSearchConfig:
    """Flags -> validated configuration (no model is touched)."""
    if args.overwrite:
        raise ValueError("a grid folder is never replaced (finished points are kept), got --overwrite; delete the "
                         "folder to start over")
    return GridSearchConfig(
        **_search_definition(args), validation_fraction=args.validation_fraction, split_seed=args.split_seed,
        shard=parse_shard(args.shard), model_paths=parse_model_path_overrides(args.model_path),
        save_merge_models_dir=args.save_merge_models_dir,
        save_dtype=args.save_dtype, keep_model=args.keep_model, merge_num_threads=args.merge_num_threads,
        **homology_from_args(args), evaluation=settings_from_args(args), allow_missing=args.allow_missing,
        max_merge_outputs=args.max_merge_outputs,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list_presets:
        sys.stdout.write(describe_presets())
        return {}
    config = build_config(args)
    if config.shard != (0, 1) and args.stage != "grid":
        raise ValueError(f"--shard {args.shard} runs part of the grid, got --stage {args.stage}; pass --stage grid, "
                         "then --stage select once every shard has finished")
    grid_dir = config.grid_dir(args.results_dir)
    plan = compute_plan_text(config, grid_dir, tokens_per_second=args.tokens_per_second,
                             merge_seconds=args.merge_seconds, stage=args.stage,
                             engine_start_seconds=args.engine_start_seconds)
    if args.dry_run:
        sys.stdout.write(plan)
        return {"plan": plan}
    paths = grid_model_paths(config)
    folder = selection_folder(config, grid_dir)
    setup_logging(folder / "logs" / f"{args.stage}_shard{config.shard[0]}of{config.shard[1]}.log")
    logger.info("argv: %s", " ".join(argv))
    logger.info("plan:\n%s", plan)
    set_random_seed(args.seed)
    write_config(folder, {**config.record(), "resolved_model_paths": paths}, argv)
    return run_grid_search(config, grid_dir, paths, args.stage)


if __name__ == "__main__":
    main()
