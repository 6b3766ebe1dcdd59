"""Streaming checkpoint merger: merge Hugging Face checkpoints tensor by tensor (no maths of its own).

    from merge_engine import merge_checkpoints
    merge_checkpoints("base", ["ft1", "ft2"], "out", merging_method_name="mask_merging",
                      hyperparameters={"mask_apply_method": "task_arithmetic", "weight_mask_rate": 0.9,
                                       "use_weight_rescale": True, "scaling_coefficient": 1.0})
"""

from merge_engine.stream_merge import DEFAULT_MAX_SHARD_BYTES, holds_finished_merge, merge_checkpoints
from merge_engine.variant_merge import merge_variants
from merge_engine.vocab import VOCAB_POLICIES

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "VOCAB_POLICIES", "holds_finished_merge", "merge_checkpoints", "merge_variants"]
