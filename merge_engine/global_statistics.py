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
    merged_units = [u for u in units if u.job.merge]
    total_numel = sum(torch.Size(u.job.out_shape).numel() for u in merged_units if u.last)
    state = runner.plan.new_global_state(total_numel)
    runner.global_state = state
    if state is None:
        return None
    read = runner.read_inputs if state.uses_model_tensors else (lambda unit: None)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for pass_index in range(state.num_passes):
            start = time.perf_counter()
            stream = ordered_map(read, merged_units, pool, depth=2)
            for unit, tensors in tqdm(stream, total=len(merged_units), desc=f"statistics pass {pass_index + 1}",
                                      disable=not progress, leave=False):
                base, finetuned = (tensors[0], tensors[1:]) if tensors is not None else (None, None)
                runner.plan.global_update(state, pass_index, unit.job.name, base, finetuned,
                                          statistics=runner.statistics_for(unit), element_offset=unit.element_offset)
            state.finish_pass(pass_index)
            logger.info("whole-model statistics pass %d/%d took %.1f s", pass_index + 1, state.num_passes,
                        time.perf_counter() - start)
    return state
