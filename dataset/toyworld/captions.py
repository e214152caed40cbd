"""Caption templates (pretraining and retrieval): object lists, left-to-right orderings, relations, groups, totals."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from dataset.toyworld.scene import ATTRS, COLOUR_NAMES, SHAPES, SIZES, Desc, Obj, pick
from dataset.toyworld.text import (SIZE_WORDS, finish, full_indefinite, indefinite, join_list, noun, number_word,
                                   phrase)


def caption(rng: np.random.Generator, objs: Sequence[Obj]) -> str:
    """One caption of a random template kind that the image supports."""
    n = len(objs)
    kinds = ['list', 'list', 'total'] + (['ordered', 'relation', 'group'] if n >= 2 else ['single', 'single'])
    kind = pick(rng, kinds)
    if kind == 'list':
        kinds_here = Counter((o.size, o.colour, o.shape) for o in objs)  # identical objects: "two red circles"
        keys = sorted(kinds_here)
        items = []
        for k in rng.permutation(len(keys)):
            d, c = Desc(*keys[k]), kinds_here[keys[k]]
            items.append(indefinite(phrase(rng, d)) if c == 1 else f'{number_word(c)} {phrase(rng, d, plural=True)}')
        prefix = pick(rng, ('', '', 'an image of ', 'a picture with ', 'a scene containing ', 'there is ',
                            'a picture showing '))
        return prefix + join_list(items)
    if kind == 'ordered':
        items = join_list([full_indefinite(rng, o) for o in objs])
        form = int(rng.integers(3))
        if form == 0:
            return 'from left to right: ' + items
        if form == 1:
            return items + ', from left to right'
        return f'{number_word(n)} objects from left to right: {items}'
    if kind == 'relation':
        i, j = sorted(int(k) for k in rng.choice(n, size=2, replace=False))
        a, b = full_indefinite(rng, objs[i]), full_indefinite(rng, objs[j])
        forms = [f'{a} to the left of {b}', f'{b} to the right of {a}']
        if n == 2:
            forms.append(f'{a} on the left and {b} on the right')
        s = pick(rng, forms)
        if n > 2 and rng.random() < 0.5:
            s += f' and {number_word(n - 2)} other object' + ('s' if n > 3 else '')
        return s
    if kind == 'group':
        attr = pick(rng, ATTRS)
        counts = Counter(getattr(o, attr) for o in objs)
        parts = []
        for value in [v for v in (SHAPES if attr == 'shape' else COLOUR_NAMES if attr == 'colour' else SIZES)
                      if v in counts]:
            c = counts[value]
            if attr == 'shape':
                rest = value + ('s' if c > 1 else '')
            else:
                word = value if attr == 'colour' else pick(rng, SIZE_WORDS[value])
                rest = f'{word} ' + noun(rng, None, c > 1, ('object',))
            parts.append(indefinite(rest) if c == 1 and rng.random() < 0.5 else f'{number_word(c)} {rest}')
        order = rng.permutation(len(parts))
        return join_list([parts[k] for k in order])
    if kind == 'single':
        w = phrase(rng, Desc(objs[0].size, objs[0].colour, objs[0].shape))
        return pick(rng, (f'a single {w}', f'just one {w}', f'a lone {w}', f'one {w} on a plain background',
                          f'only {indefinite(w)} is visible'))
    # total
    o = objs[int(rng.integers(n))]
    if n == 1:
        return f'one object: {full_indefinite(rng, o)}'
    return pick(rng, (f'{number_word(n)} objects, including {full_indefinite(rng, o)}',
                      f'a picture of {number_word(n)} objects', f'{number_word(n)} shapes on a plain background',
                      f'{number_word(n)} objects with {full_indefinite(rng, o)}'))


def image_captions(rng: np.random.Generator, objs: Sequence[Obj], k: int) -> list[str]:
    """k captions, distinct when the templates allow it."""
    out: list[str] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        c = finish(rng, caption(rng, objs))
        if c.lower().rstrip('.') not in {x.lower().rstrip('.') for x in out}:
            out.append(c)
    while len(out) < k:
        out.append(finish(rng, caption(rng, objs)))
    return out

