"""Whole-model passes before merging: MergeLM's global TIES trim and majority sign, Fisher norms.

The accumulator comes from the merging core (``MergePlan.new_global_state``) and is fed by
``MergePlan.global_update`` exactly as ``merge_state_dicts`` feeds it; this module only streams the tensors
(reads prefetched in a thread, so the model is never held).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from merge_engine.pipeline import ordered_map
from merge_engine.tensor_task import UnitRunner, WorkUnit

logger = logging.getLogger(__name__)


def run_global_passes(runner: UnitRunner, units: Sequence[WorkUnit], *, progress: bool = True):
    """Build and fill the plan's whole-model state (None when the plan needs none); sets ``runner.global_state``.

    Returns:
        The finished state object.
    """
    return run_shared_global_passes([runner], units, progress=progress)[0]


def run_shared_global_passes(runners: Sequence[UnitRunner], units: Sequence[WorkUnit], *, progress: bool = True):
    """:func:`run_global_passes` for several runners over the same inputs (``merge_engine.variant_merge``): pass
    ``i`` reads every merged unit once and feeds it to each state that has a pass ``i``; sets each runner's
    ``global_state``.

    Returns:
        Each runner's finished state (None where its plan needs none).
    """
    merged_units = [u for u in units if u.job.merge]
    total_numel = sum(torch.Size(u.job.out_shape).numel() for u in merged_units if u.last)
    states = []
    for runner in runners:
        runner.global_state = runner.plan.new_global_state(total_numel)
        states.append(runner.global_state)
    active = [(runner, state) for runner, state in zip(runners, states, strict=True) if state is not None]
    num_passes = max((state.num_passes for _, state in active), default=0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for pass_index in range(num_passes):
            start = time.perf_counter()
            current = [(runner, state) for runner, state in active if pass_index < state.num_passes]
            reader = next((r for r, state in current if state.uses_model_tensors), None)
            read = reader.read_inputs if reader is not None else (lambda unit: None)
            stream = ordered_map(read, merged_units, pool, depth=2)
            for unit, tensors in tqdm(stream, total=len(merged_units), desc=f"statistics pass {pass_index + 1}",
                                      disable=not progress, leave=False):
                base, finetuned = (tensors[0], tensors[1:]) if tensors is not None else (None, None)
                for runner, state in current:
                    runner.plan.global_update(state, pass_index, unit.job.name, base, finetuned,
                                              statistics=runner.statistics_for(unit),
                                              element_offset=unit.element_offset)
            for _, state in current:
                state.finish_pass(pass_index)
            logger.info("whole-model statistics pass %d/%d took %.1f s", pass_index + 1, num_passes,
                        time.perf_counter() - start)
    return states
