"""Prepare and evaluate LLMs for the three LLM scripts: DARE'd, merged or already-merged model folders.

* DARE (``inference_llms_instruct_math_code.py``): ``merge_checkpoints(backbone, [finetuned])`` with
  ``Recipe("average_merging", dare=config.dare)`` writes ``backbone + DARE(finetuned - backbone)`` in bf16 to
  ``save_models/{dataset}/{name}`` (MergeLM wrote a float32 copy after loading both models in float32).
* Merging (``merge_llms_instruct_math_code.py``): ONE streamed merge into
  ``save_merge_models/{tasks}/{first task}/{name}``; every other task gets a folder of hard links to the same
  weight files (no copy; a symbolic link where hard links are impossible). Each folder then receives its
  task's own tokenizer files (WizardLM's for instruct, WizardMath's for math, code-alpaca's for code), as
  MergeLM saved the merged model once per task with that task's tokenizer.
* Vocabulary: ``vocab_policy="mergelm"``: every model is padded to the largest row count with mean rows, the
  result of MergeLM's ``smart_tokenizer_and_embedding_resize`` on the paper's models (trained ``<pad>`` rows are
  kept, where MergeLM reset them to the mean; specification 9.11).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from delta_analysis import check_homology
from evaluation.generation import release_hf_model
from llms.llm_configs import DirectInferenceConfig, LlmInferenceConfig, LlmMergeConfig
from llms.llm_pipeline import (
    TASK_DATASETS,
    EvaluationSettings,
    check_datasets_available,
    run_benchmark,
    run_benchmarks,
    warn_if_unscored,
)
from llms.model_names import TASK_TO_MODEL, WEIGHT_DIFF_MODELS
from llms.model_resolution import resolve_model
from llms.weight_diff import recover_wizardlm_7b
from merge_engine import holds_finished_merge, merge_checkpoints, merge_variants
from merge_engine.lora_source import is_adapter_argument
from merge_engine.model_source import resolve_model_dir
from merge_engine.output_folder import MERGE_CONFIG, TOKENIZER_FILES
from model_merging_methods import Recipe

logger = logging.getLogger(__name__)

RECOVERED_SUFFIX = "-recovered"


def merge_into(
    output_dir: Path, pretrained: str, finetuned: list[str], *, recipe: Recipe, save_dtype: str,
    copy_config_from: int, resume: bool, num_threads: int | None = None, progress: bool = True,
    homology_check: bool = True, strict_homology: bool = False,
) -> Path:
    """Stream-merge into ``output_dir``; with ``resume`` a finished folder of exactly this merge is reused.

    "Exactly this merge" is the merger's own fingerprint (``merge_engine.holds_finished_merge``: inputs and their
    files, recipe, save dtype, vocabulary policy, exclude patterns, ...), so a run resumed with other arguments
    merges again. An existing folder of another run is replaced (these folders are derived from the
    configuration and temporary); an interrupted merge continues from its finished shards with ``resume``.
    Before merging, the homology preflight (``delta_analysis.check_homology``, a few sampled tensors) warns about
    a fine-tune that does not look derived from ``pretrained`` or whose deltas are far outside the SFT range (an
    error with ``strict_homology``; skipped with ``homology_check=False``).
    """
    arguments = {"merging_method_name": recipe, "dtype": save_dtype, "vocab_policy": "mergelm",
                 "copy_config_from": copy_config_from}
    if resume and (output_dir / MERGE_CONFIG).is_file():
        if holds_finished_merge(pretrained, finetuned, str(output_dir), **arguments):
            logger.info("--resume: reusing the finished merge in %s", output_dir)
            return output_dir
        logger.warning("%s holds a merge made with other arguments; merging again", output_dir)
    if homology_check:
        check_homology(pretrained, finetuned, strict=strict_homology)
    logger.info("merging %s into %s (%s)", finetuned, output_dir, recipe.describe())
    summary = merge_checkpoints(pretrained, finetuned, str(output_dir), **arguments, overwrite=True, resume=resume,
                                num_threads=num_threads, progress=progress)
    logger.info("merge summary: %s", summary)
    return output_dir


def merge_variants_into(
    outputs: Sequence[tuple[Path, Recipe]], pretrained: str, finetuned: list[str], *, save_dtype: str,
    copy_config_from: int, num_threads: int | None = None, progress: bool = True, homology_check: bool = True,
    strict_homology: bool = False,
) -> list[Path]:
    """Merge recipes that share their DARE'd deltas (a grid's λ values) into their folders in ONE streamed pass.

    The folders are those :func:`merge_into` would write, with the same merge records, so ``merge_into`` with
    ``resume`` then reuses each of them as it is; a folder already holding its finished merge is left out. The
    homology preflight runs once for the pass. See ``merge_engine.variant_merge`` for why one pass writing several
    models (and the disk it takes: every output until its point is evaluated).

    Returns:
        The folders merged now.
    """
    arguments = {"dtype": save_dtype, "vocab_policy": "mergelm", "copy_config_from": copy_config_from}
    todo = [(folder, recipe) for folder, recipe in outputs
            if not ((folder / MERGE_CONFIG).is_file()
                    and holds_finished_merge(pretrained, finetuned, str(folder), merging_method_name=recipe,
                                             **arguments))]
    if not todo:
        return []
    if homology_check:
        check_homology(pretrained, finetuned, strict=strict_homology)
    logger.info("merging %s in one pass (inputs read once, DARE'd deltas computed once) into %s", finetuned,
                ", ".join(str(folder) for folder, _ in todo))
    summaries = merge_variants(pretrained, finetuned, [(str(folder), recipe) for folder, recipe in todo],
                               **arguments, overwrite=True, resume=True, num_threads=num_threads, progress=progress)
    logger.info("merge pass summary: %s", summaries[0] if len(summaries) == 1 else
                {"outputs": len(summaries), "seconds": summaries[-1]["seconds"]})
    return [folder for folder, _ in todo]


#: a file in a model folder written or reused by a run with ``--keep_model``: no later run's clean-up deletes it
KEPT_MARKER = ".kept_with_keep_model"


def release_model_dirs(folders: Sequence[Path], stop_at: Path, *, keep: bool) -> None:
    """The end of a run's use of its model folders: mark them kept (``keep``), else delete them.

    A folder another run kept is never deleted, even when this run reused it without ``--keep_model``.
    """
    for folder in folders:
        if keep:
            if folder.is_dir():
                (folder / KEPT_MARKER).touch()
        else:
            remove_model_dir(folder, stop_at)


def remove_model_dir(folder: Path, stop_at: Path) -> None:
    """Delete a temporary model folder and the empty parents it leaves, up to (not including) ``stop_at``; a
    folder kept with ``--keep_model`` (``KEPT_MARKER``) stays."""
    if (folder / KEPT_MARKER).is_file():
        logger.info("%s was kept with --keep_model; not deleted", folder)
        return
    if folder.exists():
        shutil.rmtree(folder)
        logger.info("deleted %s", folder)
    parent, stop_at = folder.parent.resolve(), stop_at.resolve()
    while parent != stop_at and stop_at in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Model resolution


def resolve_paths(names: list[str], overrides: Mapping[str, str]) -> dict[str, str]:
    """``{short name: local path or hub id}`` for every name (``--model_path`` overrides first)."""
    return {name: resolve_model(name, overrides) for name in names}


def recovered_wizardlm_7b(overrides: Mapping[str, str], save_models_dir: str) -> str:
    """WizardLM-7B-V1.0 = its published diff + LLaMA-7B, recovered once (float32, like MergeLM) and reused."""
    name = "WizardLM-7B-V1.0"
    recovered_name = name + RECOVERED_SUFFIX
    if recovered_name in overrides:
        return resolve_model(recovered_name, overrides)
    target = Path(save_models_dir, recovered_name)
    if (target / "config.json").is_file():
        logger.info("using the recovered %s in %s", name, target)
        return str(target)
    diff = resolve_model_dir(resolve_model(name, overrides))
    base = resolve_model_dir(resolve_model(WEIGHT_DIFF_MODELS[name], overrides))
    logger.info("recovering %s: %s + %s -> %s", name, diff, base, target)
    return str(recover_wizardlm_7b(diff, base, target, dtype="float32", overwrite=True))


def inference_model_paths(config: LlmInferenceConfig) -> dict[str, str]:
    """Resolve the fine-tuned (and, with DARE, backbone) paths and check the data; fails before any heavy work."""
    names = [config.finetuned_model_name] if config.finetuned_model_name not in WEIGHT_DIFF_MODELS else []
    paths = resolve_paths(names, config.model_paths)
    finetuned = paths.get(config.finetuned_model_name)
    if config.dare is not None or (finetuned is not None and is_adapter_argument(finetuned)):
        paths.update(resolve_paths([config.backbone_name], config.model_paths))  # an adapter is base + ΔW
    if config.finetuned_model_name in WEIGHT_DIFF_MODELS:
        for name in (config.finetuned_model_name, WEIGHT_DIFF_MODELS[config.finetuned_model_name]):
            if name + RECOVERED_SUFFIX not in config.model_paths:
                resolve_model(name, config.model_paths)  # checked now, recovered later
    check_datasets_available([config.dataset_name], config.evaluation)
    return paths


def merge_model_paths(config: LlmMergeConfig) -> dict[str, str]:
    """Resolve the backbone and fine-tuned paths and check the data of every merged task."""
    paths = resolve_paths([config.backbone_name, *config.finetuned_model_names], config.model_paths)
    check_datasets_available([d for t in config.merge_tasks for d in TASK_DATASETS[t]], config.evaluation)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# inference_llms_instruct_math_code.py


def prepare_inference_model(config: LlmInferenceConfig, paths: Mapping[str, str]) -> tuple[str, Path | None]:
    """``(model path to evaluate, temporary folder to delete or None)``."""
    finetuned = paths.get(config.finetuned_model_name)
    if config.finetuned_model_name in WEIGHT_DIFF_MODELS:
        finetuned = recovered_wizardlm_7b(config.model_paths, config.save_models_dir)
    adapter = is_adapter_argument(finetuned)
    if config.recipe is None and not adapter:
        return finetuned, None
    # a LoRA adapter is evaluated as base + ΔW (task arithmetic with lambda 1 of the adapter alone), written by the
    # streaming merger like a DARE'd model; the config and tokenizer then come from the base (the adapter has none)
    recipe = config.recipe or Recipe("task_arithmetic", {"scaling_coefficient": 1.0})
    output_dir = config.dare_model_dir()
    merge_into(output_dir, paths[config.backbone_name], [finetuned], recipe=recipe,
               save_dtype=config.save_dtype, copy_config_from=0 if adapter else 1,
               resume=config.evaluation.resume, num_threads=config.merge_num_threads,
               progress=config.evaluation.progress, homology_check=config.homology_check,
               strict_homology=config.strict_homology)
    if adapter and has_tokenizer_files(Path(finetuned)):
        install_tokenizer(output_dir, Path(finetuned))  # the adapter's own tokenizer (chat template, pad token)
    return str(output_dir), output_dir


def run_inference(config: LlmInferenceConfig, run_dir: Path, paths: Mapping[str, str]) -> dict[str, dict]:
    """Evaluate the (DARE'd) fine-tuned model on ``config.dataset_name``; returns ``{dataset: metrics}``."""
    warn_if_unscored([config.dataset_name], config.evaluation)
    model_path, temporary = prepare_inference_model(config, paths)
    generator = str(temporary) if temporary is not None else config.finetuned_model_name
    metrics = run_benchmark(config.dataset_name, model_path, run_dir, config.evaluation, generator_name=generator,
                            save_dtype=config.save_dtype if temporary is not None else None)
    release_hf_model()
    if temporary is not None:
        release_model_dirs([temporary], Path(config.save_models_dir), keep=config.keep_model)
    logger.info("inference of %s is completed", config.finetuned_model_name)
    return {config.dataset_name: metrics}


# ---------------------------------------------------------------------------------------------------------------
# merge_llms_instruct_math_code.py and direct_inference_merged_llms_instruct_math_code.py


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source.resolve(), target)


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_folder(model: str, backbone: str) -> Path:
    """The folder whose tokenizer a task's model uses: the model's, or the backbone's for a LoRA adapter saved
    without one."""
    if is_adapter_argument(model) and not has_tokenizer_files(Path(model)):
        return resolve_model_dir(backbone)
    return resolve_model_dir(model)


def install_tokenizer(folder: Path, tokenizer_dir: Path) -> list[str]:
    """Replace ``folder``'s tokenizer files by those of ``tokenizer_dir``; returns the copied file names."""
    for name in TOKENIZER_FILES:
        if (folder / name).exists() or (folder / name).is_symlink():
            (folder / name).unlink()
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, folder / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {tokenizer_dir}; looked for {', '.join(TOKENIZER_FILES)}")
    return copied


def make_task_view(weights_dir: Path, view_dir: Path, tokenizer_dir: Path) -> Path:
    """``view_dir`` = the merged weights of ``weights_dir`` (linked, not copied) + ``tokenizer_dir``'s tokenizer."""
    if view_dir.resolve() != weights_dir.resolve():
        if view_dir.exists():
            shutil.rmtree(view_dir)
        view_dir.mkdir(parents=True)
        for item in sorted(weights_dir.iterdir()):
            if item.is_file() and item.name not in TOKENIZER_FILES:
                _link_or_copy(item, view_dir / item.name)
    copied = install_tokenizer(view_dir, tokenizer_dir)
    logger.info("%s: tokenizer from %s (%s)", view_dir, tokenizer_dir, ", ".join(copied))
    return view_dir


def merge_llms(config: LlmMergeConfig, paths: Mapping[str, str]) -> dict[str, Path]:
    """Merge once; ``{task: folder with the merged weights and that task's tokenizer}``."""
    finetuned = [paths[name] for name in config.finetuned_model_names]
    weights_dir = config.merged_model_dir(config.merge_tasks[0])
    merge_into(weights_dir, paths[config.backbone_name], finetuned, recipe=config.recipe,
               save_dtype=config.save_dtype, copy_config_from=0,
               resume=config.evaluation.resume, num_threads=config.merge_num_threads,
               progress=config.evaluation.progress, homology_check=config.homology_check,
               strict_homology=config.strict_homology)
    views = {}
    for task in config.merge_tasks:
        tokenizer_dir = tokenizer_folder(paths[TASK_TO_MODEL[task]], paths[config.backbone_name])
        views[task] = make_task_view(weights_dir, config.merged_model_dir(task), tokenizer_dir)
    return views


def evaluate_task_models(
    models: Mapping[str, Path], run_dir: Path, settings: EvaluationSettings, generator_name: str,
    save_dtype: str | None,
) -> dict[str, dict]:
    """Each task's datasets from its folder (instruct -> alpaca_eval, math -> gsm8k + MATH, code -> both code).

    Every dataset is generated first, the model loaded once for all the folders holding the same weight files
    (``llms.llm_pipeline.run_benchmarks``), then scored. ``save_dtype``: the dtype this run wrote the folders in
    (None: folders it did not write), recorded with the generations.
    """
    benchmarks = [(dataset, str(folder)) for task, folder in models.items() for dataset in TASK_DATASETS[task]]
    metrics = run_benchmarks(benchmarks, run_dir, settings, generator_name=generator_name, save_dtype=save_dtype)
    release_hf_model()
    return metrics


def run_merge(config: LlmMergeConfig, run_dir: Path, paths: Mapping[str, str]) -> dict[str, dict]:
    """Merge, evaluate every merged task, then delete the merged folders (unless ``keep_model``)."""
    warn_if_unscored([d for t in config.merge_tasks for d in TASK_DATASETS[t]], config.evaluation)
    views = merge_llms(config, paths)
    generator = str(config.merged_model_dir(config.merge_tasks[0]))
    metrics = evaluate_task_models(views, run_dir, config.evaluation, generator, config.save_dtype)
    release_model_dirs(list(views.values()), Path(config.save_merge_models_dir), keep=config.keep_model)
    logger.info("inference of %s is completed", config.recipe.describe())
    return metrics


def check_direct_inputs(config: DirectInferenceConfig) -> Path:
    """The merged folder to evaluate, after checking that it and the task's data exist."""
    folder = config.model_dir()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no merged model at {folder} (config.json missing); run merge_llms_instruct_math_code.py with the same "
            "flags and --keep_model, or pass --merged_model_path"
        )
    check_datasets_available(list(config.datasets), config.evaluation)
    return folder


def run_direct_inference(config: DirectInferenceConfig, run_dir: Path) -> dict[str, dict]:
    """Evaluate an existing merged folder on the datasets of ``config.evaluate_task``; nothing is deleted."""
    folder = check_direct_inputs(config)
    warn_if_unscored(list(config.datasets), config.evaluation)
    return evaluate_task_models({config.evaluate_task: folder}, run_dir, config.evaluation, str(folder), None)
