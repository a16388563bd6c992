"""Temporary: train/loop.py still imports from here. Delete this file once it imports tunesmith.models.fast."""

from tunesmith.models.fast import dropout_rows, fast_lora, fast_norm_rope, forget_shared_mask, new_mask_seed  # noqa: F401
