"""Configurations of the three LLM scripts: validation, MergeLM's model-folder names, and run-folder names.

Every check runs in ``__post_init__``, before any model is read. ``save_model_name`` reproduces MergeLM's
names (specification 4.4 / 4.5), so the temporary and merged model folders sit where the original put them
(``save_models/{dataset}/{name}``, ``save_merge_models/{tasks}/{task}/{name}``) and the README's
``direct_inference_merged_llms_instruct_math_code.py`` command finds them. Results go to a separate folder
named from the configuration (``common.run_dir``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cli.merge_flags import merge_method_names, merging_method_names
from common.run_dir import hyperparameter_dirname, run_dir_for
from llms.llm_pipeline import TASK_DATASETS, EvaluationSettings
from llms.model_names import FINETUNED_TO_BACKBONE, TASK_TO_MODEL, backbone_for
from model_merging_methods import accepted_hyperparameters, build_merge_plan
from model_merging_methods.registry import check_choice

logger = logging.getLogger(__name__)

INFERENCE_SCRIPT = "inference_llms_instruct_math_code"
MERGE_SCRIPT = "merge_llms_instruct_math_code"
DIRECT_SCRIPT = "direct_inference_merged_llms_instruct_math_code"
# --finetuned_model_name choices of MergeLM (WizardLM-7B-V1.0-recovered is internal only)
FINETUNED_MODEL_NAMES: tuple[str, ...] = tuple(n for n in FINETUNED_TO_BACKBONE if not n.endswith("-recovered"))
LLM_DATASET_NAMES = ("alpaca_eval", "gsm8k", "MATH", "human_eval", "mbpp")
MERGE_TASK_ORDER = ("instruct", "math", "code")
# the registered methods that need no Fisher/Gram statistics: the LLM scripts have no data to compute them from
LLM_MERGING_METHODS: tuple[str, ...] = tuple(merging_method_names(without_statistics=True))
LLM_MASK_APPLY_METHODS: tuple[str, ...] = tuple(merge_method_names(without_statistics=True))
# TIES trims per tensor for LLMs (one streaming pass), not over the whole model as MergeLM's GLUE TIES did (an extra
# pass over every 13B model); docs/llm_pipeline.md ("TIES scope for LLMs") says why
LLM_TIES_TRIM_SCOPE = "per_tensor"
SAVE_DTYPES = ("bfloat16", "float16", "float32")


def _check_save_dtype(save_dtype: str) -> None:
    check_choice("save_dtype", save_dtype, SAVE_DTYPES)


def check_homology_settings(homology_check: bool, strict_homology: bool) -> None:
    """The preflight cannot be both skipped and made an error."""
    if strict_homology and not homology_check:
        raise ValueError("strict_homology needs the homology check, got it skipped; pass one of "
                         "--skip_homology_check, --strict_homology_check")


def _check_threads(merge_num_threads: int | None) -> None:
    if merge_num_threads is not None and merge_num_threads < 1:
        raise ValueError(f"merge_num_threads must be >= 1, got {merge_num_threads}; omit it for the CPU count")


@dataclass(frozen=True)
class LlmInferenceConfig:
    """``inference_llms_instruct_math_code.py``: one fine-tuned LLM (optionally DARE'd) on one dataset.

    ``weight_mask_rate == 0`` is plain inference of the fine-tuned model; otherwise DARE (``use_weight_rescale``)
    or DropOnly is applied to ``finetuned - backbone`` by the streaming merger into ``save_models_dir``.
    """

    finetuned_model_name: str = "WizardLM-13B-V1.2"
    dataset_name: str = "alpaca_eval"
    weight_format: str = "delta_weight"
    weight_mask_rate: float = 0.1
    use_weight_rescale: bool = False
    mask_strategy: str = "random"
    wizardcoder_use_llama2_as_backbone: bool = False
    seed: int = 0
    model_paths: Mapping[str, str] = field(default_factory=dict)
    save_models_dir: str = "save_models"
    save_dtype: str = "bfloat16"
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
        # validates the rate, strategy, format and seed exactly as the merger will
        build_merge_plan("mask_merging", 1, **self.dare_hyperparameters())
        backbone_for(self.finetuned_model_name,
                     wizardcoder_use_llama2_as_backbone=self.wizardcoder_use_llama2_as_backbone)
        if self.weight_mask_rate == 0.0:
            logger.warning("weight_mask_rate is 0: plain inference of %s (no DARE)", self.finetuned_model_name)

    @property
    def uses_dare(self) -> bool:
        return self.weight_mask_rate > 0.0

    @property
    def backbone_name(self) -> str:
        return backbone_for(self.finetuned_model_name,
                            wizardcoder_use_llama2_as_backbone=self.wizardcoder_use_llama2_as_backbone)

    def dare_hyperparameters(self) -> dict[str, Any]:
        """``merge_checkpoints`` hyperparameters for single-model DARE: ``base + DARE(finetuned - base)``."""
        return {"mask_apply_method": "average_merging", "weight_mask_rate": self.weight_mask_rate,
                "use_weight_rescale": self.use_weight_rescale, "mask_strategy": self.mask_strategy,
                "weight_format": self.weight_format, "seed": self.seed}

    @property
    def save_model_name(self) -> str:
        """MergeLM's name: ``{model}_inference_mask_{rate}[_rescale_{bool}][_strategy_magnitude]...``."""
        name = f"{self.finetuned_model_name}_inference_mask_{self.weight_mask_rate}"
        if not self.uses_dare:
            return name
        name += f"_rescale_{self.use_weight_rescale}"
        if self.mask_strategy == "magnitude":
            name += "_strategy_magnitude"
        if self.weight_format == "finetuned_weight":
            name += "_weight_format_finetuned_weight"
        if self.wizardcoder_use_llama2_as_backbone:
            name += "_llama_2_as_backbone"
        return name + (f"_seed_{self.seed}" if self.seed else "")

    def dare_model_dir(self) -> Path:
        """MergeLM's temporary model folder ``save_models/{dataset}/{save_model_name}``."""
        return Path(self.save_models_dir, self.dataset_name, self.save_model_name)

    def run_dir(self, results_dir: str) -> Path:
        """``results/inference_llms_instruct_math_code/{model}/{dataset}/{key=value,...}``."""
        hp: dict[str, Any] = {"weight_mask_rate": self.weight_mask_rate, **self.evaluation.naming()}
        if self.uses_dare:
            hp.update(use_weight_rescale=self.use_weight_rescale, mask_strategy=self.mask_strategy,
                      weight_format=self.weight_format, seed=self.seed)
            if self.wizardcoder_use_llama2_as_backbone:
                hp["backbone"] = self.backbone_name
        return run_dir_for(results_dir, INFERENCE_SCRIPT, self.finetuned_model_name, self.dataset_name,
                           hyperparameter_dirname(hp))

    def record(self) -> dict[str, Any]:
        """``config.json`` content (``script`` first, for ``summarize_results.py``)."""
        return {"script": INFERENCE_SCRIPT, **asdict(self), "save_model_name": self.save_model_name,
                "backbone_name": self.backbone_name if self.uses_dare else None}


@dataclass(frozen=True)
class LlmMergeConfig:
    """``merge_llms_instruct_math_code.py``: merge 2-3 of WizardLM-13B / WizardMath-13B / code-alpaca-13B.

    ``ties_trim_scope`` defaults to ``LLM_TIES_TRIM_SCOPE`` (per tensor).
    """

    merge_tasks: tuple[str, ...] = ()
    merging_method_name: str = "average_merging"
    scaling_coefficient: float = 1.0
    param_value_mask_rate: float = 0.8
    ties_trim_scope: str = LLM_TIES_TRIM_SCOPE
    weight_format: str = "delta_weight"
    weight_mask_rate: float = 0.1
    use_weight_rescale: bool = False
    mask_strategy: str = "random"
    mask_apply_method: str = "average_merging"
    seed: int = 0
    model_paths: Mapping[str, str] = field(default_factory=dict)
    save_merge_models_dir: str = "save_merge_models"
    save_dtype: str = "bfloat16"
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
        check_choice("merging_method_name", self.merging_method_name, LLM_MERGING_METHODS)
        check_choice("mask_apply_method", self.mask_apply_method, LLM_MASK_APPLY_METHODS)
        _check_save_dtype(self.save_dtype)
        build_merge_plan(self.merging_method_name, len(self.merge_tasks), **self.hyperparameters())

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
    def applied_method(self) -> str:
        return self.mask_apply_method if self.merging_method_name == "mask_merging" else self.merging_method_name

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters the method accepts (``merge_checkpoints`` / ``build_merge_plan`` names)."""
        values = {"mask_apply_method": self.mask_apply_method, "scaling_coefficient": self.scaling_coefficient,
                  "param_value_mask_rate": self.param_value_mask_rate, "ties_trim_scope": self.ties_trim_scope,
                  "weight_mask_rate": self.weight_mask_rate, "use_weight_rescale": self.use_weight_rescale,
                  "mask_strategy": self.mask_strategy, "weight_format": self.weight_format, "seed": self.seed}
        accepted = accepted_hyperparameters(self.merging_method_name, self.mask_apply_method)
        return {k: v for k, v in values.items() if k in accepted}

    @property
    def merge_task_names(self) -> str:
        """``instruct_math`` etc. (MergeLM's folder name of the task combination)."""
        return "_".join(self.merge_tasks)

    def _method_name(self, method: str) -> str:
        if method == "task_arithmetic":
            return f"task_arithmetic_scaling_coefficient_{self.scaling_coefficient}"
        if method == "ties_merging":
            return (f"ties_merging_param_value_mask_rate_{self.param_value_mask_rate}_scaling_coefficient_"
                    f"{self.scaling_coefficient}_trim_{self.ties_trim_scope}")
        return method

    @property
    def save_model_name(self) -> str:
        """MergeLM's name (``average_merging``, ``mask_merging/average_merging/mask_0.2_0.2_rescale_True``, ...)."""
        name = self._method_name(self.applied_method)
        if self.merging_method_name == "mask_merging":
            rates = "_".join(str(self.weight_mask_rate) for _ in self.merge_tasks)
            name = f"mask_merging/{name}/mask_{rates}_rescale_{self.use_weight_rescale}"
            if self.mask_strategy == "magnitude":
                name += "_strategy_magnitude"
            if self.weight_format == "finetuned_weight":
                name += "_weight_format_finetuned_weight"
        return name + (f"_seed_{self.seed}" if self.seed and self.merging_method_name == "mask_merging" else "")

    def merged_model_dir(self, task: str) -> Path:
        """``save_merge_models/{tasks}/{task}/{save_model_name}`` (the merged weights with ``task``'s tokenizer)."""
        return Path(self.save_merge_models_dir, self.merge_task_names, task, *self.save_model_name.split("/"))

    def method_dirname(self) -> str:
        if self.merging_method_name == "mask_merging":
            return f"mask_merging+{self.mask_apply_method}"
        return self.merging_method_name

    def run_dir(self, results_dir: str, script: str = MERGE_SCRIPT, *extra: str) -> Path:
        """``results/{script}/{tasks}/{method}/{key=value,...}[/extra...]``."""
        hp = {k: v for k, v in self.hyperparameters().items() if k != "mask_apply_method"}
        hp.update(self.evaluation.naming())
        return run_dir_for(results_dir, script, self.merge_task_names, self.method_dirname(),
                           hyperparameter_dirname(hp), *extra)

    def record(self) -> dict[str, Any]:
        return {"script": MERGE_SCRIPT, **asdict(self),
                "applied_method": self.applied_method, "finetuned_model_names": self.finetuned_model_names,
                "backbone_name": self.backbone_name, "save_model_name": self.save_model_name,
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
                "merged_model_path": str(self.model_dir()), "evaluation": asdict(self.evaluation),
                "datasets": list(self.datasets)}
