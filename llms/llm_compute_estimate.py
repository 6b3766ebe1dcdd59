"""GPU time of a grid search, before it starts: merges x benchmarks x examples x max new tokens / tokens per second.

The token count is an upper bound (every example runs to ``max_new_tokens``; greedy answers usually stop earlier).
The rate is the user's ``--tokens_per_second`` or, when points of the grid have finished, the measured one
(generated tokens / generation wall time of those points, model loading included, so it is conservative).
The estimate is per stage: ``--stage grid`` (one shard's validation runs) counts no final merge, ``--stage select``
only the final runs, ``--stage all`` both. Each (merged model, benchmark) loads the model once (an engine start,
``DEFAULT_ENGINE_START_SECONDS`` unless given); code execution, AlpacaEval judging and GPU memory are not counted,
and the printout says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MERGE_SECONDS = 600.0  # assumed for a 13B streamed merge (3 x 26 GB read, 26 GB written); measured wins
DEFAULT_ENGINE_START_SECONDS = 90.0  # assumed cold start of a 13B bf16 model (26 GB read, CUDA graphs for vLLM)
STAGES = ("all", "grid", "select")


@dataclass(frozen=True)
class ComputePlan:
    """What a grid search will generate.

    Attributes:
        grid_merges: grid points still to run (this shard).
        final_merges: merges of the selected points (upper bound: one per benchmark).
        examples: ``{dataset: examples to generate}`` over all those merges.
        tokens_upper_bound: ``sum(examples x max_new_tokens)``.
    """

    grid_merges: int
    final_merges: int
    examples: Mapping[str, int]
    tokens_upper_bound: int
    engine_starts: int = 0
    stage: str = "all"


def plan_compute(
    *, grid_points: int, grid_datasets: Sequence[str], final_datasets: Mapping[str, int], final_merges: int,
    validation_sizes: Mapping[str, int], max_new_tokens: Mapping[str, int], stage: str = "all",
) -> ComputePlan:
    """Count the generations and model loads of one stage: ``grid_points`` validation runs (``grid``), the final
    (test or full) runs (``select``), or both (``all``).

    Args:
        grid_points: points to run on the validation samples (this shard's).
        grid_datasets: benchmarks selected on validation.
        final_datasets: ``{dataset: examples generated after selection}`` (test part, or the full set for a
            stated setting).
        final_merges: merges needed after selection (upper bound: one per benchmark).
        validation_sizes: validation examples per benchmark.
        max_new_tokens: generation cap per benchmark.
        stage: ``all``, ``grid`` or ``select``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    grid = stage in ("all", "grid")
    final = stage in ("all", "select")
    examples = {d: grid_points * validation_sizes[d] for d in grid_datasets} if grid else {}
    if final:
        for dataset, count in final_datasets.items():
            examples[dataset] = examples.get(dataset, 0) + count
    tokens = sum(count * max_new_tokens[d] for d, count in examples.items())
    # one model load per (merged model, benchmark): grid points x their benchmarks, and each benchmark's final run
    starts = (grid_points * len(grid_datasets) if grid else 0) + (len(final_datasets) if final else 0)
    return ComputePlan(grid_points if grid else 0, final_merges if final else 0, examples, tokens, starts, stage)


def measured_rates(results: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    """``(tokens/s, seconds per merge)`` measured on finished points (``None`` when nothing was measured)."""
    tokens = sum(r.get("generated_tokens", 0) for r in results)
    seconds = sum(r.get("generation_seconds", 0.0) for r in results)
    merges = [r["merge_seconds"] for r in results if r.get("merge_seconds") is not None]
    rate = tokens / seconds if tokens and seconds > 0 else None
    return rate, (sum(merges) / len(merges) if merges else None)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds:.0f} s"


def describe_plan(plan: ComputePlan, *, tokens_per_second: float | None, tps_source: str, merge_seconds: float,
                  merge_source: str, engine_start_seconds: float = DEFAULT_ENGINE_START_SECONDS,
                  engine_source: str = "assumed for 13B; pass --engine_start_seconds") -> str:
    """Human-readable plan and estimate of one stage (printed by ``--dry_run`` and logged before a stage starts)."""
    lines = [f"stage {plan.stage}: merges: {plan.grid_merges} grid points + up to {plan.final_merges} selected",
             "examples to generate: " + (", ".join(f"{d} {n}" for d, n in plan.examples.items()) or "none"),
             f"generated tokens (upper bound, every example at max_new_tokens): {plan.tokens_upper_bound:,}"]
    merge_total = (plan.grid_merges + plan.final_merges) * merge_seconds
    start_total = plan.engine_starts * engine_start_seconds
    merge_line = f"merging: {_hours(merge_total)} at {merge_seconds:.0f} s per merge ({merge_source})"
    start_line = (f"model loads: {plan.engine_starts} x {engine_start_seconds:.0f} s = {_hours(start_total)} "
                  f"({engine_source})")
    if tokens_per_second is None:
        lines += [merge_line, start_line, "generation time: unknown; pass --tokens_per_second (measured on your "
                  "GPU) or run a first point to measure it"]
    else:
        generation = plan.tokens_upper_bound / tokens_per_second
        lines += [f"generation: at most {_hours(generation)} at {tokens_per_second:,.0f} tokens/s ({tps_source})",
                  merge_line, start_line, f"total: at most {_hours(generation + merge_total + start_total)}"]
    lines.append("not counted: code execution, AlpacaEval judging (outside this repository), GPU memory")
    return "\n".join(lines) + "\n"
