"""RefCOCO+ material: referring expressions that single out one object, and distractor proposal boxes."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dataset.toyworld.scene import Obj, pick, refs_for
from dataset.toyworld.text import ref_text


def iou(a, b) -> float:
    """Intersection over union of two [x, y, w, h] boxes as REFER's computeIoU counts it (inclusive-pixel
    intersection, plain-area union)."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def distractor_boxes(rng: np.random.Generator, objs: Sequence[Obj], side: int) -> list:
    """Per object two jittered boxes and one random box per image, all inside the image, IoU < 0.5 with
    every object, so picking one of them is a grounding error."""
    boxes = []

    def ok(b):
        return (b[2] >= 4 and b[3] >= 4 and b[0] >= 0 and b[1] >= 0 and b[0] + b[2] <= side
                and b[1] + b[3] <= side and all(iou(b, o.box) < 0.5 for o in objs)
                and all(iou(b, c) < 0.9 for c in boxes))

    for o in objs:
        x, y, w, h = o.box
        made = 0
        for _ in range(40):
            if made == 2:
                break
            s = rng.uniform(0.6, 1.6)
            nw, nh = max(4, int(round(w * s * rng.uniform(0.8, 1.25)))), max(4, int(round(h * s)))
            nx = int(round(x + w / 2 - nw / 2 + rng.uniform(-0.6, 0.6) * w))
            ny = int(round(y + h / 2 - nh / 2 + rng.uniform(-0.6, 0.6) * h))
            b = [nx, ny, nw, nh]
            if ok(b):
                boxes.append(b)
                made += 1
    for _ in range(40):
        s = int(rng.integers(max(4, side // 8), max(5, side // 3)))
        b = [int(rng.integers(0, side - s + 1)), int(rng.integers(0, side - s + 1)), s, s]
        if ok(b):
            boxes.append(b)
            break
    return boxes


def ref_expressions(rng: np.random.Generator, o: Obj, objs: Sequence[Obj], k: int) -> list[str]:
    """Up to k distinct expressions that single out `o` among `objs` (none if nothing does)."""
    refs = refs_for(o, objs)
    if not refs:
        return []
    out: list[str] = []
    for _ in range(10 * k):
        if len(out) == k:
            break
        e = ref_text(rng, pick(rng, refs), objs, article=rng.random() < 0.4)
        if e not in out:
            out.append(e)
    return out

