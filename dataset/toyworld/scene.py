"""The toy world's things and how to pick them: shapes, colours, sizes, descriptions by attributes, and the
sampling of 1-4 non-overlapping objects per image."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

# Images are drawn once and split into these disjoint pools.
POOLS = ('train', 'val', 'test')
SHAPES = ('circle', 'square', 'triangle', 'diamond')
CATEGORY_ID = {s: i + 1 for i, s in enumerate(SHAPES)}
# Well separated saturated colours; the background is a light low-saturation tint, so no colour hides in it.
COLOURS = {
    'red': (215, 35, 35),
    'green': (40, 165, 55),
    'blue': (40, 75, 220),
    'yellow': (235, 210, 30),
    'purple': (140, 55, 190),
    'orange': (245, 135, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ('small', 'big')
SIZE_FRACTION = {'small': (0.15, 0.19), 'big': (0.27, 0.33)}  # side length / image side
ATTRS = ('size', 'colour', 'shape')


class Obj(NamedTuple):
    """One drawn object (ground truth)."""
    shape: str
    colour: str
    size: str
    box: tuple  # (x, y, w, h) in pixels, inclusive of x .. x+w-1

    @property
    def cx(self) -> float:
        return self.box[0] + self.box[2] / 2.0


class Desc(NamedTuple):
    """A description by attributes; None = not mentioned."""
    size: str | None = None
    colour: str | None = None
    shape: str | None = None


def pick(rng: np.random.Generator, seq: Sequence):
    """A uniformly drawn element of `seq`."""
    return seq[int(rng.integers(len(seq)))]


def matches(o: Obj, d: Desc) -> bool:
    """Whether the object fits every attribute the description mentions."""
    return ((d.size is None or o.size == d.size) and (d.colour is None or o.colour == d.colour)
            and (d.shape is None or o.shape == d.shape))


def count_matching(objs: Sequence[Obj], d: Desc) -> int:
    """How many of the objects fit the description."""
    return sum(matches(o, d) for o in objs)


def desc_of(o: Obj, attrs: Sequence[str]) -> Desc:
    """The description of `o` by the given attributes only."""
    return Desc(**{a: getattr(o, a) for a in attrs})


# All attribute subsets, smallest first (empty = "the object").
ATTRIBUTE_SUBSETS = ((), ('size',), ('colour',), ('shape',), ('size', 'colour'), ('size', 'shape'), ('colour', 'shape'),
                     ('size', 'colour', 'shape'))


def random_desc(rng: np.random.Generator, allowed: Sequence[str]) -> Desc:
    """A random non-empty description over the `allowed` attributes."""
    masks = [m for m in ATTRIBUTE_SUBSETS if m and set(m) <= set(allowed)]
    mask = pick(rng, masks)
    values = {'size': pick(rng, SIZES), 'colour': pick(rng, COLOUR_NAMES), 'shape': pick(rng, SHAPES)}
    return Desc(**{a: values[a] for a in mask})


def absent_desc(rng: np.random.Generator, objs: Sequence[Obj], allowed: Sequence[str]) -> Desc | None:
    """A random description that matches no object of the image (None if none found quickly)."""
    for _ in range(40):
        d = random_desc(rng, allowed)
        if count_matching(objs, d) == 0:
            return d
    return None


def refs_for(o: Obj, objs: Sequence[Obj], exclude: Sequence[str] = (), locations: bool = True) -> list:
    """Every way to single out `o`: (Desc, None) if the description is unique, (Desc, 'left'|'right') if `o` is
    the leftmost / rightmost of several matching objects. Descriptions never use the `exclude` attributes."""
    refs = []
    for mask in ATTRIBUTE_SUBSETS:
        if set(mask) & set(exclude):
            continue
        d = desc_of(o, mask)
        group = [p for p in objs if matches(p, d)]
        if len(group) == 1:
            refs.append((d, None))
        elif locations:
            xs = sorted(p.cx for p in group)
            if o.cx == xs[0]:
                refs.append((d, 'left'))
            elif o.cx == xs[-1]:
                refs.append((d, 'right'))
    return refs


def _apart(b, c, gap: int, min_dx: float) -> bool:
    """Boxes disjoint with `gap` pixels between them and centres at least `min_dx` apart horizontally."""
    x, y, w, h = b
    X, Y, W, H = c
    disjoint = x + w + gap <= X or X + W + gap <= x or y + h + gap <= Y or Y + H + gap <= y
    return disjoint and abs((x + w / 2) - (X + W / 2)) >= min_dx


def sample_objects(rng: np.random.Generator, side: int) -> list[Obj]:
    """1-4 non-overlapping objects inside the image, sorted left to right."""
    n = int(rng.integers(1, 5))
    margin, gap, min_dx = 2, 3, 0.1 * side
    for attempt in range(60):
        if attempt and attempt % 15 == 0 and n > 1:
            n -= 1  # crowded draw: fall back to fewer objects rather than loop forever
        objs: list[Obj] = []
        for _ in range(n):
            size = pick(rng, SIZES)
            lo, hi = SIZE_FRACTION[size]
            s = int(round(side * rng.uniform(lo, hi)))
            # Repeat an attribute of an earlier object now and then, so counts >= 2 and look-alikes (that need
            # a position to be told apart) are common.
            colour = objs[-1].colour if objs and rng.random() < 0.3 else pick(rng, COLOUR_NAMES)
            shape = objs[-1].shape if objs and rng.random() < 0.3 else pick(rng, SHAPES)
            for _ in range(60):
                x = int(rng.integers(margin, side - s - margin + 1))
                y = int(rng.integers(margin, side - s - margin + 1))
                box = (x, y, s, s)
                if all(_apart(box, o.box, gap, min_dx) for o in objs):
                    objs.append(Obj(shape, colour, size, box))
                    break
            else:
                break
        if len(objs) == n:
            return sorted(objs, key=lambda o: o.cx)
    raise RuntimeError('could not place objects')  # unreachable for n = 1 at any supported image size
