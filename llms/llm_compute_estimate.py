"""GPU time of a grid search, before it starts: merges x benchmarks x examples x max new tokens / tokens per second.

The token count is an upper bound (every example runs to ``max_new_tokens``; greedy answers usually stop earlier).
The rate is the user's ``--tokens_per_second`` or, when points of the grid have finished, the measured one
(generated tokens / generation wall time of those points, model loading included, so it is conservative).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MERGE_SECONDS = 600.0  # assumed for a 13B streamed merge (3 x 26 GB read, 26 GB written); measured wins


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


def plan_compute(
    *, grid_points: int, grid_datasets: Sequence[str], final_datasets: Mapping[str, int], final_merges: int,
    validation_sizes: Mapping[str, int], max_new_tokens: Mapping[str, int],
) -> ComputePlan:
    """Count the generations of ``grid_points`` validation runs and of the final (test or full) runs.

    Args:
        grid_points: points to run on the validation samples.
        grid_datasets: benchmarks selected on validation.
        final_datasets: ``{dataset: examples generated after selection}`` (test part, or the full set for a
            stated setting).
        final_merges: merges needed after selection.
        validation_sizes: validation examples per benchmark.
        max_new_tokens: generation cap per benchmark.
    """
    examples = {d: grid_points * validation_sizes[d] for d in grid_datasets}
    for dataset, count in final_datasets.items():
        examples[dataset] = examples.get(dataset, 0) + count
    tokens = sum(count * max_new_tokens[d] for d, count in examples.items())
    return ComputePlan(grid_points, final_merges, examples, tokens)


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
                  merge_source: str) -> str:
    """Human-readable plan and estimate (printed by ``--dry_run`` and logged before a grid starts)."""
    lines = [f"merges: {plan.grid_merges} grid points + up to {plan.final_merges} selected",
             "examples to generate: " + ", ".join(f"{d} {n}" for d, n in plan.examples.items()),
             f"generated tokens (upper bound, every example at max_new_tokens): {plan.tokens_upper_bound:,}"]
    merge_total = (plan.grid_merges + plan.final_merges) * merge_seconds
    merge_line = f"merging: {_hours(merge_total)} at {merge_seconds:.0f} s per merge ({merge_source})"
    if tokens_per_second is None:
        lines += [merge_line, "generation time: unknown; pass --tokens_per_second (measured on your GPU) or run a "
                  "first point to measure it"]
    else:
        generation = plan.tokens_upper_bound / tokens_per_second
        lines += [f"generation: at most {_hours(generation)} at {tokens_per_second:,.0f} tokens/s ({tps_source})",
                  merge_line, f"total: at most {_hours(generation + merge_total)}"]
    return "\n".join(lines) + "\n"
