"""The Hugging Face hub's offline switch, read the way huggingface_hub reads it."""

from __future__ import annotations

import os


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to 1, true, yes or on (any case), the values huggingface_hub accepts."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
