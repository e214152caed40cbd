"""The toy world's random streams: every image and every task's text draws from its own numpy Generator seeded by
(seed, task code, index), so changing one task's flags leaves the images and the other tasks unchanged."""
from __future__ import annotations

import numpy as np

# Task codes (never renumber: that would change every world).
IMAGE, CAPTION, VQA, NLVR, VE, REF, DETECTION, CEILING = range(1, 9)


def stream(seed: int, task: int, index: int) -> np.random.Generator:
    """The Generator of one (seed, task, index) triple."""
    return np.random.default_rng([seed, task, index])
