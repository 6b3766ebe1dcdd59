"""Configurations of the three LLM scripts: validation, MergeLM's model-folder names, and run-folder names.

A merge is one :class:`~model_merging_methods.recipe.Recipe` (single-model DARE: a :class:`Dare`), so nothing here
names a method or a hyperparameter: folder names, records and checks are derived from the recipe's declarations.

Every check runs in ``__post_init__``, before any model is read. ``save_model_name`` reproduces MergeLM's
names (specification 4.4 / 4.5), so the temporary and merged model folders sit where the original put them
(``save_models/{dataset}/{name}``, ``save_merge_models/{tasks}/{task}/{name}``) and the README's
``direct_inference_merged_llms_instruct_math_code.py`` command finds them. Results go to a separate folder
named from the configuration (``common.run_dir``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.run_dir import format_value, hyperparameter_dirname, run_dir_for
from llms.llm_pipeline import TASK_DATASETS, EvaluationSettings
from llms.model_names import FINETUNED_TO_BACKBONE, TASK_TO_MODEL, backbone_for
from model_merging_methods import DARE_METHOD_NAME, Dare, Recipe, build_merge_plan, merge_method_names
from model_merging_methods.registry import check_choice

logger = logging.getLogger(__name__)

INFERENCE_SCRIPT = "inference_llms_instruct_math_code"
MERGE_SCRIPT = "merge_llms_instruct_math_code"
DIRECT_SCRIPT = "direct_inference_merged_llms_instruct_math_code"
# --finetuned_model_name choices of MergeLM (WizardLM-7B-V1.0-recovered is internal only)
FINETUNED_MODEL_NAMES: tuple[str, ...] = tuple(n for n in FINETUNED_TO_BACKBONE if not n.endswith("-recovered"))
LLM_DATASET_NAMES = ("alpaca_eval", "gsm8k", "MATH", "human_eval", "mbpp")
MERGE_TASK_ORDER = ("instruct", "math", "code")
SAVE_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_SAVE_DTYPE = "bfloat16"


def llm_merge_methods() -> tuple[str, ...]:
    """The registered methods the LLM scripts can run: those needing no Fisher/Gram statistics (the scripts have
    no training data to compute them from). Read from the registry on each call, so a new method is offered."""
    return merge_method_names(without_statistics=True)


def _check_save_dtype(save_dtype: str) -> None:
    check_choice("save_dtype", save_dtype, SAVE_DTYPES)


def saved_naming(save_dtype: str) -> dict[str, str]:
    """``{"save_dtype": ...}`` for run-folder names of a run that writes a model, when not the default bf16."""
    return {"save_dtype": save_dtype} if save_dtype != DEFAULT_SAVE_DTYPE else {}


def check_homology_settings(homology_check: bool, strict_homology: bool) -> None:
    """The preflight cannot be both skipped and made an error."""
    if strict_homology and not homology_check:
        raise ValueError("strict_homology needs the homology check, got it skipped; pass one of "
                         "--skip_homology_check, --strict_homology_check")


def _check_threads(merge_num_threads: int | None) -> None:
    if merge_num_threads is not None and merge_num_threads < 1:
        raise ValueError(f"merge_num_threads must be >= 1, got {merge_num_threads}; omit it for the CPU count")


def _plain_fields(config: Any, *skip: str) -> dict[str, Any]:
    """``{field: value}`` of a config's JSON-ready fields (``skip``: those the record writes itself)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}


def _dare_suffix(dare: Dare) -> str:
    """MergeLM's DARE settings in a model-folder name: ``_rescale_{bool}[_strategy_magnitude]...``."""
    name = f"_rescale_{dare.use_weight_rescale}"
    if dare.rescale_factor is not None:  # not MergeLM's: a factor other than 1/(1-p) (DAREx)
        name += f"_factor_{format_value(dare.rescale_factor)}"
    if dare.mask_strategy == "magnitude":
        name += "_strategy_magnitude"
    if dare.weight_format == "finetuned_weight":
        name += "_weight_format_finetuned_weight"
    return name


@dataclass(frozen=True)
class LlmInferenceConfig:
    """``inference_llms_instruct_math_code.py``: one fine-tuned LLM (optionally DARE'd) on one dataset.

    ``dare=None`` is plain inference of the fine-tuned model (MergeLM's ``--weight_mask_rate 0.0``); otherwise
    ``backbone + DARE(finetuned - backbone)`` (:attr:`recipe`) is written by the streaming merger into
    ``save_models_dir``.
    """

    finetuned_model_name: str = "WizardLM-13B-V1.2"
    dataset_name: str = "alpaca_eval"
    dare: Dare | None = None
    wizardcoder_use_llama2_as_backbone: bool = False
    model_paths: Mapping[str, str] = field(default_factory=dict)
    save_models_dir: str = "save_models"
    save_dtype: str = DEFAULT_SAVE_DTYPE
    keep_model: bool = False
    merge_num_threads: int | None = None
    homology_check: bool = True
    strict_homology: bool = False
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def __post_init__(self) -> None:
        _check_threads(self.merge_num_threads)
        check_homology_settings(self.homology_check, self.strict_homology)
        check_choice("finetuned_model_name", self.finetuned_model_name, FINETUNED_MODEL_NAMES)
        check_choice("dataset_name", self.dataset_name, LLM_DATASET_NAMES)
        _check_save_dtype(self.save_dtype)
        if self.dare is not None:
            (rate,) = self.dare.rates(1)  # one model: a list of several rates is a ValueError here
            if rate == 0.0:
                raise ValueError("dare needs a drop rate in (0, 1), got weight_mask_rate 0.0, which drops nothing; "
                                 "pass dare=None for plain inference of the fine-tuned model")
            object.__setattr__(self, "dare", dataclasses.replace(self.dare, weight_mask_rate=rate))
        backbone_for(self.finetuned_model_name,
                     wizardcoder_use_llama2_as_backbone=self.wizardcoder_use_llama2_as_backbone)
        if self.dare is None:
            logger.info("no DARE (weight_mask_rate 0): plain inference of %s", self.finetuned_model_name)

    @property
    def weight_mask_rate(self) -> float:
        """The drop rate (0.0 without DARE, as MergeLM's flag)."""
        return self.dare.weight_mask_rate if self.dare is not None else 0.0

    @property
    def recipe(self) -> Recipe | None:
        """Single-model DARE: ``average_merging`` of one DARE'd delta, i.e. ``base + DARE(finetuned - base)``."""
        return Recipe("average_merging", dare=self.dare) if self.dare is not None else None

    @property
    def backbone_name(self) -> str:
        return backbone_for(self.finetuned_model_name,
                            wizardcoder_use_llama2_as_backbone=self.wizardcoder_use_llama2_as_backbone)

    @property
    def save_model_name(self) -> str:
        """MergeLM's name: ``{model}_inference_mask_{rate}[_rescale_{bool}][_strategy_magnitude]...``."""
        name = f"{self.finetuned_model_name}_inference_mask_{self.weight_mask_rate}"
        if self.dare is None:
            return name
        name += _dare_suffix(self.dare)
        if self.wizardcoder_use_llama2_as_backbone:
            name += "_llama_2_as_backbone"
        return name + (f"_seed_{self.dare.seed}" if self.dare.seed else "")

    def dare_model_dir(self) -> Path:
        """MergeLM's temporary model folder ``save_models/{dataset}/{save_model_name}``."""
        return Path(self.save_models_dir, self.dataset_name, self.save_model_name)

    def run_dir(self, results_dir: str) -> Path:
        """``results/inference_llms_instruct_math_code/{model}/{dataset}/{key=value,...}``."""
        hp: dict[str, Any] = {"weight_mask_rate": self.weight_mask_rate, **self.evaluation.naming()}
        if self.dare is not None:
            hp.update(self.dare.settings(), **saved_naming(self.save_dtype))
            if self.wizardcoder_use_llama2_as_backbone:
                hp["backbone"] = self.backbone_name
        return run_dir_for(results_dir, INFERENCE_SCRIPT, self.finetuned_model_name, self.dataset_name,
                           hyperparameter_dirname(hp))

    def record(self) -> dict[str, Any]:
        """``config.json`` content (``script`` first, for ``summarize_results.py``): the fields, DARE's settings
        under MergeLM's flat names (``weight_mask_rate`` 0.0 without DARE) and the recipe."""
        dare = self.dare.settings() if self.dare is not None else {"weight_mask_rate": 0.0}
        return {"script": INFERENCE_SCRIPT, **_plain_fields(self, "dare", "evaluation"), **dare,
                "recipe": self.recipe.record() if self.recipe is not None else None,
                "evaluation": dataclasses.asdict(self.evaluation), "save_model_name": self.save_model_name,
                "backbone_name": self.backbone_name if self.dare is not None else None}


def method_name(recipe: Recipe) -> str:
    """``{method}`` plus ``_{name}_{value}`` for each of its hyperparameters in declaration order (MergeLM's
    ``average_merging``, ``task_arithmetic_scaling_coefficient_1.0``)."""
    return "_".join([recipe.method, *(f"{name}_{format_value(value)}" for name, value in
                                      recipe.hyperparameters.items())])


@dataclass(frozen=True)
class LlmMergeConfig:
    """``merge_llms_instruct_math_code.py``: merge 2-3 of WizardLM-13B / WizardMath-13B / code-alpaca-13B.

    Attributes:
        merge_tasks: two or three of instruct, math, code.
        recipe: the merge (any registered method that needs no Fisher/Gram statistics, with or without DARE);
            its settings are the library's unless given (``Recipe("ties_merging")`` trims globally; the command
            line states per_tensor, see ``llms.llm_cli``).
    """

    merge_tasks: tuple[str, ...] = ()
    recipe: Recipe = field(default_factory=lambda: Recipe("average_merging"))
    model_paths: Mapping[str, str] = field(default_factory=dict)
    save_merge_models_dir: str = "save_merge_models"
    save_dtype: str = DEFAULT_SAVE_DTYPE
    keep_model: bool = False
    merge_num_threads: int | None = None
    homology_check: bool = True
    strict_homology: bool = False
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def __post_init__(self) -> None:
        _check_threads(self.merge_num_threads)
        check_homology_settings(self.homology_check, self.strict_homology)
        if len(self.merge_tasks) < 2 or len(set(self.merge_tasks)) != len(self.merge_tasks):
            raise ValueError(f"merging needs at least two distinct tasks, got {list(self.merge_tasks)}; pass two or "
                             "three of --merge_instruct, --merge_math, --merge_code")
        for task in self.merge_tasks:
            check_choice("merge task", task, MERGE_TASK_ORDER)
        object.__setattr__(self, "merge_tasks", tuple(t for t in MERGE_TASK_ORDER if t in self.merge_tasks))
        if not isinstance(self.recipe, Recipe):
            raise ValueError(f"recipe must be a Recipe, got {self.recipe!r}; e.g. Recipe('task_arithmetic', "
                             "{'scaling_coefficient': 0.5}, dare=Dare(0.9))")
        if self.recipe.spec.statistics:
            raise ValueError(f"{self.recipe.method} needs {self.recipe.spec.statistics} statistics computed on "
                             f"training data, which the LLM scripts do not have; choose one of "
                             f"{', '.join(llm_merge_methods())}")
        _check_save_dtype(self.save_dtype)
        build_merge_plan(self.recipe, len(self.merge_tasks))  # per-model lists against the number of models

    @property
    def finetuned_model_names(self) -> list[str]:
        return [TASK_TO_MODEL[task] for task in self.merge_tasks]

    @property
    def backbone_name(self) -> str:
        backbones = {backbone_for(name) for name in self.finetuned_model_names}
        if len(backbones) != 1:
            raise RuntimeError(f"merged models must share one backbone, got {sorted(backbones)}")
        return backbones.pop()

    @property
    def merge_task_names(self) -> str:
        """``instruct_math`` etc. (MergeLM's folder name of the task combination)."""
        return "_".join(self.merge_tasks)

    @property
    def save_model_name(self) -> str:
        """MergeLM's name (``average_merging``, ``mask_merging/average_merging/mask_0.2_0.2_rescale_True``, ...):
        :func:`method_name`, with DARE under ``mask_merging/`` followed by the DARE settings."""
        name = method_name(self.recipe)
        dare = self.recipe.dare
        if dare is None:
            return name
        rates = "_".join(str(rate) for rate in dare.rates(len(self.merge_tasks)))
        name = f"{DARE_METHOD_NAME}/{name}/mask_{rates}{_dare_suffix(dare)}"
        return name + (f"_seed_{dare.seed}" if dare.seed else "")

    def merged_model_dir(self, task: str) -> Path:
        """``save_merge_models/{tasks}/{task}/{save_model_name}`` (the merged weights with ``task``'s tokenizer)."""
        return Path(self.save_merge_models_dir, self.merge_task_names, task, *self.save_model_name.split("/"))

    def run_dir(self, results_dir: str, script: str = MERGE_SCRIPT, *extra: str) -> Path:
        """``results/{script}/{tasks}/{recipe.method_key}/{key=value,...}[/extra...]``."""
        hp = {**self.recipe.settings(), **self.evaluation.naming(), **saved_naming(self.save_dtype)}
        return run_dir_for(results_dir, script, self.merge_task_names, self.recipe.method_key,
                           hyperparameter_dirname(hp), *extra)

    def record(self) -> dict[str, Any]:
        """``config.json`` content: the fields, MergeLM's flat names of the recipe (``merging_method_name``,
        ``mask_apply_method`` (None without DARE), each hyperparameter and DARE setting) and the recipe."""
        flat = {"merging_method_name": self.recipe.merging_method_name, "mask_apply_method": None,
                **self.recipe.mergelm_hyperparameters()}
        return {"script": MERGE_SCRIPT, "merge_tasks": list(self.merge_tasks), **flat,
                "recipe": self.recipe.record(), **_plain_fields(self, "merge_tasks", "recipe", "evaluation"),
                "evaluation": dataclasses.asdict(self.evaluation),
                "finetuned_model_names": self.finetuned_model_names, "backbone_name": self.backbone_name,
                "save_model_name": self.save_model_name,
                "datasets": [d for t in self.merge_tasks for d in TASK_DATASETS[t]]}


@dataclass(frozen=True)
class DirectInferenceConfig:
    """``direct_inference_merged_llms_instruct_math_code.py``: evaluate one task of an already-merged model.

    The folder is ``merged_model_path`` when given, else located from the merge flags as MergeLM named it.
    """

    evaluate_task: str = "instruct"
    merge: LlmMergeConfig | None = None
    merged_model_path: str | None = None
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def __post_init__(self) -> None:
        check_choice("evaluate_task", self.evaluate_task, MERGE_TASK_ORDER)
        if self.merged_model_path is None:
            if self.merge is None:
                raise ValueError("direct inference needs the merge flags (two or more --merge_*) or "
                                 "--merged_model_path, got neither")
            if self.evaluate_task not in self.merge.merge_tasks:
                raise ValueError(f"evaluate_task {self.evaluate_task!r} must be one of the merged tasks, got "
                                 f"{list(self.merge.merge_tasks)}; add --merge_{self.evaluate_task}")

    @property
    def datasets(self) -> tuple[str, ...]:
        return TASK_DATASETS[self.evaluate_task]

    def model_dir(self) -> Path:
        if self.merged_model_path is not None:
            return Path(self.merged_model_path)
        return self.merge.merged_model_dir(self.evaluate_task)

    def run_dir(self, results_dir: str) -> Path:
        """Under the merge's naming when located from flags, else ``.../merged_model_path/<folder name>/``."""
        if self.merged_model_path is None:
            return self.merge.run_dir(results_dir, DIRECT_SCRIPT, self.evaluate_task)
        folder = Path(self.merged_model_path).resolve()
        hp = hyperparameter_dirname(self.evaluation.naming())
        return run_dir_for(results_dir, DIRECT_SCRIPT, "merged_model_path", folder.name, hp, self.evaluate_task)

    def record(self) -> dict[str, Any]:
        merge = self.merge.record() if self.merge is not None else None
        return {"script": DIRECT_SCRIPT, "evaluate_task": self.evaluate_task, "merge": merge,
                "merged_model_path": str(self.model_dir()), "evaluation": dataclasses.asdict(self.evaluation),
                "datasets": list(self.datasets)}
