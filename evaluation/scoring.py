"""Score completions for a task: metrics plus one prediction record per example.

Metrics (full precision, fractions in [0, 1]):

* gsm8k: ``accuracy`` (paper extraction, MergeLM ``test_gsm8k``), ``accuracy_flexible`` (extra, see
  ``evaluation.answer_extraction``), ``num_invalid`` (no "The answer is: " marker), ``num_examples``;
* MATH: ``accuracy`` (MergeLM ``test_hendrycks_math``), ``accuracy_flexible`` (extra), ``num_invalid``,
  ``num_examples``;
* human_eval / mbpp: ``pass@1`` (one greedy sample per problem), ``num_examples``. HumanEval runs
  ``prompt + completion + test + check(entry_point)`` (openai/human-eval); MBPP runs
  ``completion + "\\n" + "\\n".join(test_list)`` (bigcode-evaluation-harness ``mbpp``).

Prediction records: ``id``, ``prompt``, ``completion`` (raw), ``extracted``, ``target``, ``correct`` and, for
code, ``result`` ("passed" / "failed: ..." / "timed out").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from evaluation.answer_extraction import (
    extract_answer_number,
    extract_answer_number_flexible,
    extract_math_answer,
    extract_math_answer_flexible,
    gsm8k_gold_answer,
    math_gold_answer,
    math_gold_answer_flexible,
)
from evaluation.code_execution import DEFAULT_TIMEOUT_S, PASSED, execute_programs
from evaluation.math_equivalence import is_equiv
from evaluation.pass_at_k import mean_pass_at_k
from evaluation.tasks import TaskSpec, build_prompt, get_task

logger = logging.getLogger(__name__)

# more programs than this fail to compile -> the completions are probably in another format (loud warning)
NOT_COMPILING_WARNING_RATE = 0.9
_NOT_COMPILING = ("failed: SyntaxError", "failed: IndentationError", "failed: TabError")


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program openai/human-eval executes: ``prompt + completion + "\\n" + test + "\\n" + check(entry)``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def mbpp_tests(record: Mapping[str, Any]) -> str:
    """MBPP test code as bigcode-evaluation-harness builds it: the three asserts, one per line."""
    return "\n".join(record["test_list"])


def mbpp_program(record: Mapping[str, Any], completion: str) -> str:
    """The program bigcode-evaluation-harness executes for MBPP: ``completion + "\\n" + tests``."""
    return completion + "\n" + mbpp_tests(record)


def _fraction(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _gsm8k_record(record: Mapping[str, Any], completion: str) -> dict[str, Any]:
    target = gsm8k_gold_answer(record["answer"])
    extracted = extract_answer_number(completion)
    flexible = extract_answer_number_flexible(completion)
    return {
        "extracted": extracted, "target": target,
        "correct": extracted is not None and float(extracted) == float(target),
        "extracted_flexible": flexible, "correct_flexible": flexible is not None and flexible == float(target),
    }


def _math_record(record: Mapping[str, Any], completion: str) -> dict[str, Any]:
    target = math_gold_answer(record["solution"])
    extracted = extract_math_answer(completion)
    flexible = extract_math_answer_flexible(completion)
    target_flexible = math_gold_answer_flexible(record["solution"])
    return {
        # MergeLM: no marker -> invalid and wrong; otherwise is_equiv (None gold never matches a string)
        "extracted": extracted, "target": target, "correct": extracted is not None and is_equiv(extracted, target),
        "extracted_flexible": flexible,
        "correct_flexible": (
            flexible is not None and target_flexible is not None and is_equiv(flexible, target_flexible)
        ),
    }


def _score_answers(
    task: TaskSpec, records: Sequence[Mapping[str, Any]], completions: Sequence[str], ids: Sequence[Any],
    show_progress: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    score_one = _gsm8k_record if task.name == "gsm8k" else _math_record
    predictions = []
    rows = list(zip(ids, records, completions, strict=True))
    for id_, record, completion in tqdm(rows, desc=f"scoring {task.name}", disable=not show_progress):
        fields = score_one(record, completion)
        predictions.append({"id": id_, "prompt": build_prompt(task, record), "completion": completion, **fields})
    metrics = {
        "accuracy": _fraction([p["correct"] for p in predictions]),
        "accuracy_flexible": _fraction([p["correct_flexible"] for p in predictions]),
        "num_invalid": sum(p["extracted"] is None for p in predictions),
        "num_examples": len(predictions),
    }
    if metrics["num_invalid"]:
        logger.info("%s: %d completions without 'The answer is: '", task.name, metrics["num_invalid"])
    return metrics, predictions


def warn_if_nothing_compiles(task_name: str, results: Sequence[str], *, apply_postprocessing: bool) -> bool:
    """Warn loudly when more than ``NOT_COMPILING_WARNING_RATE`` of the programs fail with a SyntaxError or an
    IndentationError: the completions are then almost surely in another format than the one scored.

    Returns:
        True when the warning was emitted.
    """
    not_compiling = sum(r.startswith(_NOT_COMPILING) for r in results)
    if not results or not_compiling <= NOT_COMPILING_WARNING_RATE * len(results):
        return False
    if task_name == "human_eval" and apply_postprocessing:
        hint = ("they were cleaned with the paper's post-processing, which strips a completion's leading "
                "indentation; a standard human-eval samples file (function bodies appended to the prompt as they "
                "are) is scored with --completion_format human_eval")
    elif task_name == "human_eval":
        hint = ("they were appended to the prompt unchanged, as human-eval does; raw model generations (code "
                "fences, whole functions, '### Response:') are scored with --completion_format paper")
    else:
        hint = "check that each completion is a whole program, as the paper's MBPP generations are"
    logger.warning("%d of %d %s programs do not compile (SyntaxError/IndentationError): the completions are "
                   "probably in another format; %s", not_compiling, len(results), task_name, hint)
    return True


def _score_code(
    task: TaskSpec, records: Sequence[Mapping[str, Any]], completions: Sequence[str], ids: Sequence[Any],
    execution_kwargs: dict[str, Any], apply_postprocessing: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    cleaned = [task.extract(c) for c in completions] if apply_postprocessing else list(completions)
    if task.name == "human_eval":
        programs = [humaneval_program(r, c) for r, c in zip(records, cleaned, strict=True)]
        targets = [r["test"] for r in records]
    else:
        programs = [mbpp_program(r, c) for r, c in zip(records, cleaned, strict=True)]
        targets = [mbpp_tests(r) for r in records]
    results = execute_programs(programs, **execution_kwargs)
    warn_if_nothing_compiles(task.name, results, apply_postprocessing=apply_postprocessing)
    predictions = [
        {"id": id_, "prompt": build_prompt(task, r), "completion": raw, "extracted": code, "target": target,
         "correct": result == PASSED, "result": result}
        for id_, r, raw, code, target, result in zip(
            ids, records, completions, cleaned, targets, results, strict=True
        )
    ]
    passed = [int(p["correct"]) for p in predictions]
    metrics = {"pass@1": mean_pass_at_k([1] * len(passed), passed, 1), "num_examples": len(predictions)}
    return metrics, predictions


def score_completions(
    task: TaskSpec | str,
    records: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    *,
    ids: Sequence[Any] | None = None,
    allow_code_execution: bool = False,
    allow_root_code_execution: bool = False,
    num_workers: int = 4,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    show_progress: bool = True,
    apply_postprocessing: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score one completion per record with the paper's post-processing and metric.

    Args:
        task: ``gsm8k``, ``MATH``, ``human_eval`` or ``mbpp`` (AlpacaEval is judged externally).
        records: test records as returned by ``evaluation.data.load_records``.
        completions: raw model text for each record (prompt not included), same length as ``records``.
        ids: example ids for the prediction records (default: position in ``records``).
        allow_code_execution: required for human_eval / mbpp (runs model-generated code).
        allow_root_code_execution: as root, run the programs as root where switching to ``nobody`` is impossible
            (see ``evaluation.code_execution.execution_user``).
        num_workers: parallel processes for code execution.
        timeout_s: per-program wall-clock limit for code execution.
        show_progress: tqdm bars on stderr.
        apply_postprocessing: for code tasks, clean raw generations with MergeLM's rules (default). ``False``
            executes the completions as given (a human-eval samples file, e.g. HumanEval canonical solutions,
            whose leading indentation MergeLM's ``strip`` would remove). When nearly every program fails to
            compile, a warning names the other choice.

    Returns:
        ``(metrics, predictions)``; see the module docstring.
    """
    task = get_task(task) if isinstance(task, str) else task
    if len(records) != len(completions):
        raise ValueError(f"need one completion per record, got {len(completions)} completions for {len(records)}")
    ids = list(range(len(records))) if ids is None else list(ids)
    if task.metric is None:
        raise ValueError(f"dataset_name {task.name!r} has no in-repo metric; write its outputs with "
                         "evaluation.output_formats and score them with the external tool")
    if task.unsafe_code:
        kwargs = dict(allow_code_execution=allow_code_execution, allow_root_code_execution=allow_root_code_execution,
                      num_workers=num_workers, timeout_s=timeout_s, show_progress=show_progress)
        return _score_code(task, records, completions, ids, kwargs, apply_postprocessing)
    return _score_answers(task, records, completions, ids, show_progress)
