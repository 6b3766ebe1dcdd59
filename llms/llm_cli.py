"""Command-line pieces shared by the three LLM scripts: flags, their conversion, and run-folder setup."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cli.recipe_flags import add_hyperparameter_flags, add_method_flags, recipe_from_args
from common.logging_setup import setup_logging
from common.run_dir import prepare_run_dir, write_config
from common.seeding import set_random_seed
from evaluation.generation import DEFAULT_GPU_MEMORY_UTILIZATION, DEFAULT_VLLM_CHUNK_SIZE, log_backend_choice
from llms.llm_configs import SAVE_DTYPES, LlmMergeConfig, llm_merge_methods
from llms.llm_pipeline import EvaluationSettings
from llms.model_resolution import parse_model_path_overrides
from model_merging_methods import DARE_SPECS

logger = logging.getLogger(__name__)

# The LLM command lines trim TIES per tensor, not over the whole model as the library (MergeLM's GLUE TIES) does:
# one streaming pass instead of an extra pass over every 13B model, no tensor emptied by one threshold across
# tensors of very different scales, and what the LLM merging toolkits do (docs/llm_pipeline.md, "TIES scope for
# LLMs"). --ties_trim_scope global gives MergeLM's behaviour.
LLM_CLI_DEFAULTS = {"ties_trim_scope": "per_tensor"}


def add_merge_args(parser: argparse.ArgumentParser) -> None:
    """The models to merge, the method (MergeLM's ``--merging_method_name`` / ``--mask_apply_method``) and one flag
    per declared setting of the methods without statistics and of DARE (``--seed`` is the common flag's)."""
    for task in ("instruct", "math", "code"):
        parser.add_argument(f"--merge_{task}", action="store_true", help=f"merge the {task} model")
    add_method_flags(parser, without_statistics=True)  # no data here for Fisher/RegMean statistics
    add_hyperparameter_flags(parser, methods=llm_merge_methods(), statistics=False, defaults=LLM_CLI_DEFAULTS,
                             skip=("seed",))
    parser.add_argument("--save_merge_models_dir", default="save_merge_models",
                        help="merged-model folders: {dir}/{tasks}/{task}/{name} (MergeLM's layout)")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Indices, generation, data, results and model-location flags of every LLM script."""
    parser.add_argument("--start_index", type=int, default=0)
    parser.add_argument("--end_index", type=int, default=sys.maxsize)
    parser.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per vLLM engine")
    parser.add_argument("--model_path", action="append", default=[], metavar="NAME=PATH",
                        help="local folder (or .gguf file) for a model short name; repeatable")
    parser.add_argument("--backend", default="auto", choices=["auto", "vllm", "hf"],
                        help="auto = vLLM when installed with CUDA, else Hugging Face transformers (the choice and "
                             "its reason are logged at start-up); vllm = required, an error up front when vLLM "
                             "or CUDA is missing")
    parser.add_argument("--vllm_chunk_size", type=int, default=DEFAULT_VLLM_CHUNK_SIZE,
                        help="prompts per vLLM generate call; each finished chunk is appended to the generations "
                             "file, so a killed run loses at most one chunk")
    parser.add_argument("--gpu_memory_utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                        help="fraction of GPU memory the vLLM engine may use (vLLM's default 0.9)")
    parser.add_argument("--max_model_len", type=int, default=None,
                        help="vLLM context length (default: the model's); lower it when the KV cache does not fit")
    parser.add_argument("--enforce_eager", action="store_true",
                        help="vLLM without CUDA graphs: less GPU memory, slower")
    parser.add_argument("--data_dir", default=None, help="test files folder (else $MERGELM_DATA_DIR, math_code_data/)")
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--allow_code_execution", action="store_true",
                        help="execute generated code to score human_eval/mbpp (use a container)")
    parser.add_argument("--allow_root_code_execution", action="store_true",
                        help="as root, execute it as root where switching to the user nobody is impossible")
    parser.add_argument("--resume", action="store_true", help="continue: keep finished generations and merges")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per batch (hf backend)")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="override the paper's max tokens")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="generation dtype")
    seed = DARE_SPECS["seed"]  # DARE's declared seed, which also seeds torch, numpy and random here
    parser.add_argument("--seed", type=seed.python_type(), default=seed.command_line_default,
                        help=f"{seed.help}; also seeds torch, numpy and random (default: {seed.command_line_default})")
    parser.add_argument("--save_dtype", default="bfloat16", choices=SAVE_DTYPES, help="dtype of written models")
    parser.add_argument("--keep_model", action="store_true", help="keep the DARE'd / merged model folder")
    parser.add_argument("--merge_num_threads", type=int, default=None,
                        help="streaming-merger worker threads (default: CPU count); fewer threads = less RAM")
    parser.add_argument("--subprocess_per_task", action="store_true",
                        help="generate in child processes, one per model for all of its datasets (always on "
                             "with vLLM)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> EvaluationSettings:
    if args.resume and args.overwrite:
        raise ValueError("resume and overwrite exclude each other, got both; pass one of --resume, --overwrite")
    return EvaluationSettings(
        backend=args.backend, tensor_parallel_size=args.tensor_parallel_size, vllm_chunk_size=args.vllm_chunk_size,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, dtype=args.dtype, data_dir=args.data_dir, start_index=args.start_index,
        end_index=args.end_index, allow_code_execution=args.allow_code_execution,
        allow_root_code_execution=args.allow_root_code_execution, resume=args.resume,
        subprocess_per_task=args.subprocess_per_task, progress=not args.quiet,
    )


def merge_tasks_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(task for task in ("instruct", "math", "code") if getattr(args, f"merge_{task}"))


def homology_from_args(args: argparse.Namespace) -> dict[str, bool]:
    """``--skip_homology_check`` / ``--strict_homology_check`` -> ``homology_check`` / ``strict_homology``."""
    return {"homology_check": not args.skip_homology_check, "strict_homology": args.strict_homology_check}


def merge_config_from_args(args: argparse.Namespace, settings: EvaluationSettings, *,
                           merges: bool = True) -> LlmMergeConfig:
    """``merges=False``: the script only locates an earlier merge (no homology flags, the defaults are recorded)."""
    homology = homology_from_args(args) if merges else {}
    return LlmMergeConfig(
        merge_tasks=merge_tasks_from_args(args),
        recipe=recipe_from_args(args, args.merging_method_name, args.mask_apply_method),
        model_paths=parse_model_path_overrides(args.model_path), save_merge_models_dir=args.save_merge_models_dir,
        save_dtype=args.save_dtype, keep_model=args.keep_model, merge_num_threads=args.merge_num_threads,
        **homology, evaluation=settings,
    )


def start_run(run_dir: Path, args: argparse.Namespace, record: Mapping[str, Any], argv: list[str]) -> Path:
    """Create the run folder (overwrite/resume rule), attach ``run.log``, seed, and write ``config.json``.

    Also logs the generation backend ``--backend`` resolves to and why, and records it in ``config.json`` under
    ``generation_backend`` (``requested``, ``resolved``, ``reason``).
    """
    run_dir = prepare_run_dir(run_dir, overwrite=args.overwrite, resume=args.resume)
    setup_logging(run_dir / "run.log")
    logger.info("argv: %s", " ".join(argv))
    resolved, reason = log_backend_choice(args.backend, logger)
    record = {**record, "generation_backend": {"requested": args.backend, "resolved": resolved, "reason": reason}}
    logger.info("config: %s", dict(record))
    set_random_seed(args.seed)
    write_config(run_dir, record, argv)
    return run_dir
