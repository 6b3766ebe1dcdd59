"""LLM evaluation for the paper's benchmarks: task specs, answer extraction, scoring, sandboxed code execution.

Only the task registry is re-exported here; import the other modules directly (``evaluation.scoring``,
``evaluation.data``, ``evaluation.code_execution``, ...). Nothing heavy (torch, vLLM) is imported.
"""

from evaluation.tasks import TASKS, SamplingSpec, TaskSpec, build_prompt, build_prompts, get_task

__all__ = ["TASKS", "SamplingSpec", "TaskSpec", "build_prompt", "build_prompts", "get_task"]
