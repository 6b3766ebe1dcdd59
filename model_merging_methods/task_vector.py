"""Task vectors: delta = finetuned - pretrained over the parameters selected for merging.

MergeLM (``model_merging_methods/task_vector.py``, ``utils/utils.py: get_param_names_to_merge``) keeps a
parameter unless ``re.match`` (anchored at the start) of any exclude pattern succeeds; GLUE runs exclude
``[".*classifier.*"]``, LLM runs exclude nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def compile_exclude_patterns(exclude_param_names_regex: Sequence[str] | str) -> list[re.Pattern[str]]:
    """Compile the exclude patterns, with a clear error for an invalid one."""
    if isinstance(exclude_param_names_regex, str):
        exclude_param_names_regex = [exclude_param_names_regex]
    patterns = []
    for pattern in exclude_param_names_regex:
        try:
            patterns.append(re.compile(pattern))
        except re.error as error:
            message = f"exclude_param_names_regex must be valid regular expressions, got {pattern!r}: {error}"
            raise ValueError(message) from error
    return patterns


def get_param_names_to_merge(param_names: Iterable[str], exclude_param_names_regex: Sequence[str] | str) -> list[str]:
    """Names not matched (``re.match``, anchored at the start, as MergeLM) by any exclude pattern, in input order.

    Args:
        param_names: candidate parameter names.
        exclude_param_names_regex: patterns; MergeLM flag ``exclude_param_names_regex`` (GLUE: ``.*classifier.*``).
    """
    patterns = compile_exclude_patterns(exclude_param_names_regex)
    return [name for name in param_names if not any(p.match(name) for p in patterns)]


def is_mergeable(tensor: Tensor) -> bool:
    """Only floating-point tensors are merged; integer buffers (position ids, counters) are copied."""
    return torch.is_floating_point(tensor)
