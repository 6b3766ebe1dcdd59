"""Merge Hugging Face checkpoints out of core (streamed tensor by tensor), with MergeLM's flag names.

Example (DARE p=0.9 + task arithmetic of two fine-tunes):
    python merge_checkpoints.py --pretrained_model meta-llama/Llama-2-13b-hf \
        --finetuned_models WizardLMTeam/WizardLM-13B-V1.2 WizardLMTeam/WizardMath-13B-V1.0 \
        --merging_method_name mask_merging --mask_apply_method task_arithmetic \
        --weight_mask_rate 0.9 --use_weight_rescale --scaling_coefficient 1.0 \
        --vocab_policy mergelm --output_dir merged/wizard-lm-math

Single-model DARE: one fine-tuned model with ``--merging_method_name mask_merging --mask_apply_method
average_merging`` gives ``base + DARE(finetuned - base)``. See the README section "Streaming checkpoint merger".

A mergekit configuration, with mergekit's meaning (``docs/mergekit.md``):
    python merge_checkpoints.py --config merge.yml --output_dir OUT [--random-seed 0] [--dare_rescale l1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from cli.native_libraries import limit_blas_threads, tune_malloc_for_merging

limit_blas_threads()  # before NumPy/SciPy are imported

from cli.recipe_flags import (  # noqa: E402
    add_homology_flags,
    add_hyperparameter_flags,
    add_method_flags,
    recipe_from_args,
    refuse_unused_flags,
)
from common.cli_command import command_from_args  # noqa: E402
from common.logging_setup import setup_logging  # noqa: E402
from delta_analysis import check_homology  # noqa: E402
from merge_engine import DEFAULT_MAX_SHARD_BYTES, VOCAB_POLICIES, merge_checkpoints  # noqa: E402
from merge_engine.lora_output import OUTPUT_FORMATS  # noqa: E402
from merge_engine.lora_source import is_adapter_argument  # noqa: E402
from merge_engine.mergekit_config import RESCALE_MODES  # noqa: E402
from merge_engine.tensor_plan import DTYPES  # noqa: E402
from model_merging_methods import Recipe  # noqa: E402

logger = logging.getLogger(__name__)

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_NOT_RECORDED_FLAGS = ("overwrite", "resume", "quiet", "log_file", "skip_homology_check", "config", "random_seed",
                       "dare_rescale", "dry_run")


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"size must look like 5GB, 500MB or 1073741824, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a mergekit YAML configuration (merge_method, base_model, models or slices, "
                   "parameters, dtype, ...), merged with mergekit's meaning; replaces --pretrained_model, "
                   "--finetuned_models and the method flags")
    p.add_argument("--random-seed", "--random_seed", dest="random_seed", type=int, default=None,
                   help="with --config: seed of the random sparsifiers (DARE, DELLA); default 0, recorded")
    p.add_argument("--dare_rescale", choices=RESCALE_MODES, default="l1",
                   help="with --config: how DARE-family methods with rescale: true rescale the kept deltas: l1 "
                        "(mergekit: match each tensor's L1 norm; the default, so a file means what it means in "
                        "mergekit) or inverse_keep (the paper: divide by the keep rate 1 - p = density)")
    p.add_argument("--dry_run", action="store_true",
                   help="with --config: validate the file and the models' headers, print the plan, merge nothing")
    p.add_argument("--pretrained_model", help="base model folder or hub id (required without --config)")
    p.add_argument("--finetuned_models", nargs="+", help="fine-tuned model folders or hub ids, or PEFT LoRA adapter "
                   "folders of the base (adapter_config.json + adapter_model.safetensors; merged as ΔW = scale·B·A); "
                   "required without --config")
    p.add_argument("--output_dir", required=True)
    # library_defaults: an unset flag leaves the method's own declared default (MergeLM's merging_models), e.g.
    # normalize_fisher_weight on and the global TIES trim, and stays out of the recorded command; the statistics
    # settings are not flags here: the statistics come from --statistics_files
    add_method_flags(p, library_defaults=True)
    for action in p._actions:  # required without --config (main checks it)
        if action.dest == "merging_method_name":
            action.required = False
    add_hyperparameter_flags(p, statistics=False, library_defaults=True)
    p.add_argument("--statistics_files", nargs="+", help="Fisher/RegMean statistics, one file per fine-tuned model")
    p.add_argument("--exclude_param_names_regex", nargs="*", default=[])
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the pretrained model's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (where the maths runs)")
    p.add_argument("--num_threads", type=int, help="worker threads (default: CPU count, at most 4)")
    p.add_argument("--vocab_policy", choices=VOCAB_POLICIES, default="error")
    p.add_argument("--copy_config_from", type=int, default=0,
                   help="index into [pretrained, *finetuned] of the model whose config/tokenizer are copied")
    p.add_argument("--max_shard_size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES, help="e.g. 5GB, 500MB")
    p.add_argument("--output_format", choices=OUTPUT_FORMATS, default="safetensors",
                   help="safetensors: the merged model; lora: a PEFT LoRA adapter of the base holding merged - base "
                        "of every changed Linear/Embedding weight, truncated to --lora_rank by SVD (a changed norm "
                        "or bias is an error); each module's retained energy is recorded in merge_config.json")
    p.add_argument("--lora_rank", type=int, help="with --output_format lora: the adapter's rank r")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--strict", action="store_true", help="NaN/Inf in an input tensor, or a fine-tune the homology "
                   "check flags (not derived from the base, or deltas far outside the SFT range), is an error, "
                   "not a warning")
    add_homology_flags(p, strict_flag=False)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log_file", help="also log to this file")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def rerun_command(args: argparse.Namespace) -> str:
    """The command recorded in ``merge_config.json``: every flag that differs from its default, from the parser's
    own definitions (output folder written as ``OUT``; the folder's handling and logging flags left out)."""
    return command_from_args(build_parser(), args, program=("python", "merge_checkpoints.py"),
                             skip=_NOT_RECORDED_FLAGS, replace={"output_dir": "OUT"})


def recipe_of(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Recipe:
    """The recipe of the flags; a flag the chosen method does not read is an error (MergeLM CLI: no rescale)."""
    recipe = recipe_from_args(args, args.merging_method_name, args.mask_apply_method)
    refuse_unused_flags(parser or build_parser(), args, [recipe])
    if args.mask_apply_method is not None and recipe.dare is None:
        raise ValueError(f"--mask_apply_method applies after DARE, got it with --merging_method_name "
                         f"{args.merging_method_name}; pass --merging_method_name mask_merging or drop it")
    dare = recipe.dare
    if dare is not None and not dare.use_weight_rescale and dare.mask_strategy == "random":
        logger.warning("--use_weight_rescale not given: dropping without rescale (DropOnly), not DARE")
    return recipe


_CONFIG_FLAGS = ("config", "random_seed", "dare_rescale", "dry_run")
#: flags that keep their meaning with --config (the output folder, how the merge runs, logging)
_WITH_CONFIG = ("output_dir", "num_threads", "max_shard_size", "overwrite", "resume", "quiet", "log_file", "device")


def config_command(args: argparse.Namespace) -> str:
    """The command that rebuilds a ``--config`` merge from its output folder's ``mergekit_config.yml``."""
    words = ["python", "merge_checkpoints.py", "--config", "mergekit_config.yml", "--output_dir", "OUT",
             "--random-seed", str(0 if args.random_seed is None else args.random_seed)]
    if args.dare_rescale != "l1":
        words += ["--dare_rescale", args.dare_rescale]
    return " ".join(words)


def run_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """``--config``: a mergekit YAML file; every other merge flag is refused (the file says it all)."""
    from merge_engine.mergekit_merge import describe_plan, merge_from_config, prepare_config

    given = [a.dest for a in parser._actions if a.dest not in (*_CONFIG_FLAGS, *_WITH_CONFIG, "help")
             and getattr(args, a.dest, None) not in (None, a.default)]
    if given:
        raise ValueError(f"--config holds the whole merge; got also --{', --'.join(given)}: put those settings in "
                         "the YAML file or drop --config")
    path = os.path.expanduser(args.config)
    if not os.path.isfile(path):
        raise ValueError(f"--config must be a YAML file, got {args.config!r} (not found)")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if args.dry_run:
        prepared = prepare_config(text, args.output_dir, seed=args.random_seed, dare_rescale=args.dare_rescale,
                                  where=args.config)
        print(json.dumps(describe_plan(prepared), indent=1, default=str))
        return {"dry_run": True, "tensors": len(prepared.tensors)}
    summary = merge_from_config(text, args.output_dir, seed=args.random_seed, dare_rescale=args.dare_rescale,
                                overwrite=args.overwrite, resume=args.resume, max_shard_bytes=args.max_shard_size,
                                num_threads=args.num_threads, progress=not args.quiet, command=config_command(args),
                                where=args.config, device=args.device)
    if summary.get("already_complete"):
        print(f"--resume: {summary['output_dir']} already holds this merge; nothing to do")
    else:
        print(f"merged {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB in {summary['seconds']:.1f} s, "
              f"peak RSS {summary['peak_rss_bytes'] / 1e9:.2f} GB -> {summary['output_dir']}")
    return summary


def homology_check(pretrained_model: str, finetuned_models: Sequence[str], *, strict: bool) -> None:
    """The homology preflight (``delta_analysis.check_homology``) of the full fine-tunes.

    LoRA adapter folders are left out, with the reason logged: an adapter holds low-rank factors, not a model to
    compare with the base, and the merge itself checks that every module it targets is in the base with ΔW's shape.
    """
    adapters = [m for m in finetuned_models if is_adapter_argument(m)]
    if adapters:
        logger.info("homology check skipped for LoRA adapter folder(s) %s: an adapter holds low-rank factors, not "
                    "a model; its target modules and shapes are checked against the base before merging",
                    ", ".join(adapters))
    full = [m for m in finetuned_models if m not in adapters]
    if full:
        check_homology(pretrained_model, full, strict=strict)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc_for_merging()
    setup_logging(args.log_file)
    logger.info("config: %s", vars(args))
    if args.config is not None:
        return run_config(parser, args)
    missing = [f"--{name}" for name in ("pretrained_model", "finetuned_models", "merging_method_name")
               if getattr(args, name) is None]
    if missing:
        parser.error(f"{' and '.join(missing)} required (or --config with a mergekit YAML file)")
    unused = [f"--{name}" for name in _CONFIG_FLAGS if name != "config" and getattr(args, name) not in (None, False,
                                                                                                        "l1")]
    if unused:
        parser.error(f"{', '.join(unused)} only apply with --config")
    recipe = recipe_of(args, parser)
    logger.info("recipe: %s", recipe.describe())
    if not args.skip_homology_check:
        homology_check(args.pretrained_model, args.finetuned_models, strict=args.strict)
    summary = merge_checkpoints(
        args.pretrained_model, args.finetuned_models, args.output_dir,
        merging_method_name=recipe,
        exclude_param_names_regex=args.exclude_param_names_regex, dtype=args.dtype, device=args.device,
        num_threads=args.num_threads, vocab_policy=args.vocab_policy, copy_config_from=args.copy_config_from,
        overwrite=args.overwrite, resume=args.resume, strict=args.strict, max_shard_bytes=args.max_shard_size,
        statistics_files=args.statistics_files, progress=not args.quiet, command=rerun_command(args),
        output_format=args.output_format, lora_rank=args.lora_rank,
    )
    if summary.get("already_complete"):
        print(f"--resume: {summary['output_dir']} already holds this merge; nothing to do")
        return summary
    print(f"merged {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB in {summary['seconds']:.1f} s, "
          f"peak RSS {summary['peak_rss_bytes'] / 1e9:.2f} GB -> {summary['output_dir']}")
    return summary


def exit_without_teardown() -> None:
    """End the process at once after a successful run, with status 0.

    Every file is written, closed and renamed by then; the interpreter's teardown would only run torch's
    operator-registry finalizers, about 0.4 s on a 2-core machine (``python -c "import torch"``: 1.9 s, 1.45 s
    with ``os._exit``). Logs and standard streams are flushed first.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_teardown()
