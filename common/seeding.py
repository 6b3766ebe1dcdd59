"""Global seeding for scripts (random, numpy, torch); DARE masks do not depend on it (see dare.py)."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_random_seed(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices), and make cuDNN deterministic, as MergeLM does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
