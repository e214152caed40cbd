"""Drawing a toy image: flat objects on a tinted background, plus pixel noise."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dataset.toyworld.scene import COLOURS, Obj


def render(rng: np.random.Generator, side: int, objs: Sequence[Obj]) -> tuple[np.ndarray, list[int]]:
    """Draw the objects on a tinted background and add pixel noise; returns (H x W x 3 uint8, background)."""
    grey = rng.uniform(165, 235)
    bg = [int(np.clip(grey + rng.uniform(-20, 20), 0, 255)) for _ in range(3)]
    img = Image.new('RGB', (side, side), tuple(bg))
    draw = ImageDraw.Draw(img)
    for o in objs:
        x, y, w, h = o.box
        col = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[o.colour])
        x2, y2, xm, ym = x + w - 1, y + h - 1, x + (w - 1) / 2, y + (h - 1) / 2
        if o.shape == 'circle':
            draw.ellipse([x, y, x2, y2], fill=col)
        elif o.shape == 'square':
            draw.rectangle([x, y, x2, y2], fill=col)
        elif o.shape == 'triangle':
            draw.polygon([(xm, y), (x2, y2), (x, y2)], fill=col)
        else:  # diamond
            draw.polygon([(xm, y), (x2, ym), (xm, y2), (x, ym)], fill=col)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(2.0, 8.0), arr.shape).astype(np.float32)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8), bg
