"""NLVR2 templates: statements about an image pair, with True / False balanced for every template."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dataset.toyworld.scene import (ATTRS, COLOUR_NAMES, SHAPES, Desc, Obj, count_matching, desc_of, matches, pick,
                                    random_desc)
from dataset.toyworld.text import finish, indefinite, number_word, phrase


def _nlvr_desc(rng: np.random.Generator, left: Sequence[Obj], right: Sequence[Obj]) -> Desc:
    objs = list(left) + list(right)
    if objs and rng.random() < 0.7:
        return desc_of(objs[int(rng.integers(len(objs)))],
                       pick(rng, (('colour',), ('shape',), ('colour', 'shape'), ('size', 'shape'),
                                  ('size', 'colour'), ('size', 'colour', 'shape'))))
    return random_desc(rng, ATTRS)


def _nlvr_statement(rng: np.random.Generator, template: int, left: Sequence[Obj], right: Sequence[Obj]):
    """(sentence, truth) for one NLVR template with random parameters."""
    images = {'left': left, 'right': right}
    side = pick(rng, ('left', 'right'))
    other = 'right' if side == 'left' else 'left'
    d = _nlvr_desc(rng, left, right)
    cl, cr = count_matching(left, d), count_matching(right, d)
    cs = cl if side == 'left' else cr
    co = cr if side == 'left' else cl
    if template == 0:  # count in one image
        k = cs if rng.random() < 0.5 else int(rng.integers(0, 5))
        w = phrase(rng, d, plural=k != 1)
        verb = pick(rng, ('has', 'contains', 'shows'))
        exact = 'exactly ' if k > 0 and rng.random() < 0.5 else ''
        return f'the {side} image {verb} {exact}{number_word(k)} {w}', cs == k
    if template == 1:  # both
        w = phrase(rng, d)
        s = pick(rng, (f'both images contain {indefinite(w)}', f'there is {indefinite(w)} in both images',
                       f'each image has {indefinite(w)}'))
        return s, cl > 0 and cr > 0
    if template == 2:  # neither
        s = pick(rng, (f'neither image contains {indefinite(phrase(rng, d))}',
                       f'there are no {phrase(rng, d, plural=True)} in either image',
                       f'no image has any {phrase(rng, d, plural=True)}'))
        return s, cl == 0 and cr == 0
    if template == 3:  # only one side
        w = phrase(rng, d)
        s = pick(rng, (f'only the {side} image contains {indefinite(w)}',
                       f'{indefinite(w)} appears in the {side} image but not in the {other} image'))
        return s, cs > 0 and co == 0
    if template == 4:  # more / fewer
        if rng.random() < 0.3:
            d = Desc()
            cs, co = len(images[side]), len(images[other])
        w = phrase(rng, d, plural=True)
        if rng.random() < 0.5:
            return f'the {side} image has more {w} than the {other} image', cs > co
        return f'there are fewer {w} in the {side} image than in the {other} image', cs < co
    if template == 5:  # same number
        if rng.random() < 0.3:
            d = Desc()
            cl, cr = len(left), len(right)
        w = phrase(rng, d, plural=True)
        s = pick(rng, (f'both images have the same number of {w}', f'the two images contain equally many {w}'))
        return s, cl == cr
    if template == 6:  # total
        total = cl + cr
        k = total if rng.random() < 0.5 else int(rng.integers(0, 6))
        w = phrase(rng, d, plural=k != 1)
        s = pick(rng, (f'there are {number_word(k)} {w} in total',
                       f'the two images together contain {number_word(k)} {w}',
                       f'altogether there are exactly {number_word(k)} {w}'))
        if k == 1:
            s = s.replace('there are one', 'there is one').replace('there are exactly one', 'there is exactly one')
        return s, total == k
    if template == 7:  # relation inside one image
        objs = images[side]
        if len(objs) >= 2 and rng.random() < 0.7:
            i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
            da = desc_of(objs[i], pick(rng, (('colour',), ('shape',), ('colour', 'shape'))))
            db = desc_of(objs[j], pick(rng, (('colour',), ('shape',), ('colour', 'shape'))))
        else:
            da, db = random_desc(rng, ('colour', 'shape')), random_desc(rng, ('colour', 'shape'))
        rel = pick(rng, ('left', 'right'))
        truth = any(matches(a, da) and matches(b, db) and a is not b and ((a.cx < b.cx) == (rel == 'left'))
                    for a in objs for b in objs)
        return (f'in the {side} image, {indefinite(phrase(rng, da))} is to the {rel} of {indefinite(phrase(rng, db))}',
                truth)
    # template 8: the leftmost / rightmost object of one image
    objs = images[side]
    end = pick(rng, ('left', 'right'))
    target = objs[0] if end == 'left' else objs[-1]
    if rng.random() < 0.5:
        colour = target.colour if rng.random() < 0.5 else pick(rng, COLOUR_NAMES)
        return f'the {end}most object in the {side} image is {colour}', target.colour == colour
    shape = target.shape if rng.random() < 0.5 else pick(rng, SHAPES)
    return f'the {end}most object in the {side} image is {indefinite(shape)}', target.shape == shape


NLVR_TEMPLATES = 9


def nlvr_split(rng: np.random.Generator, worlds: Sequence[dict], n_items: int) -> list[dict]:
    """n_items statements over random pairs of the pool's images; labels balanced for every template."""
    items = []
    n = len(worlds)
    for k in range(n_items):
        template = k % NLVR_TEMPLATES
        target = (k // NLVR_TEMPLATES) % 2 == 0  # alternate so every template gets both labels equally
        for _ in range(200):
            i, j = (int(x) for x in rng.choice(n, size=2, replace=n < 2))
            left, right = worlds[i]['objs'], worlds[j]['objs']
            s, truth = _nlvr_statement(rng, template, left, right)
            if truth == target:
                break
        else:  # pragma: no cover - every template reaches both labels with overwhelming probability
            raise RuntimeError(f'NLVR template {template} did not reach label {target}')
        items.append({'images': [worlds[i]['file'], worlds[j]['file']], 'sentence': finish(rng, s),
                      'label': 'True' if truth else 'False'})
    order = rng.permutation(len(items))
    return [items[k] for k in order]

