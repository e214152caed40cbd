"""SNLI-VE templates: hypotheses about one image whose label (entailment / neutral / contradiction) only the image
decides (see the package docstring)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dataset.toyworld.scene import ATTRS, COLOUR_NAMES, SHAPES, SIZES, Desc, Obj, absent_desc, pick, refs_for
from dataset.toyworld.text import SIZE_WORDS, finish, indefinite, ref_text

VE_LABELS = ('entailment', 'neutral', 'contradiction')


def _ve_hypothesis(rng: np.random.Generator, objs: Sequence[Obj], label: str) -> str | None:
    """A hypothesis with the given label (see the package docstring), or None if this draw failed."""
    kind = pick(rng, ('size', 'colour', 'shape', 'relation', 'relation', 'extreme'))
    if kind in ('size', 'colour', 'shape', 'extreme'):
        exclude = () if kind == 'extreme' else (kind,)
        generic = ('object',) if kind == 'shape' else ('object', 'object', 'shape')
        if label == 'neutral':
            d = absent_desc(rng, objs, [a for a in ATTRS if a not in exclude])
            if d is None:
                return None
            # Positions occur in present references too, so they must not give the label away.
            loc = None if kind == 'extreme' or rng.random() < 0.7 else pick(rng, ('left', 'right'))
            ref = (d, loc)
            value = {'size': pick(rng, SIZES), 'colour': pick(rng, COLOUR_NAMES), 'shape': pick(rng, SHAPES),
                     'extreme': pick(rng, ('left', 'right'))}[kind]
        else:
            o = objs[int(rng.integers(len(objs)))]
            # Never the bare 'the object' / 'the leftmost object': a missing object cannot be described that
            # way, so such a hypothesis would announce that it is not neutral.
            refs = [r for r in refs_for(o, objs, exclude=exclude, locations=kind != 'extreme') if r[0] != Desc()]
            if not refs:
                return None
            ref = pick(rng, refs)
            if kind == 'extreme':
                truth = {'left': o is objs[0], 'right': o is objs[-1]}
                want = label == 'entailment'
                options = [e for e in ('left', 'right') if truth[e] == want]
                if not options:
                    return None
                value = pick(rng, options)
            else:
                actual = getattr(o, kind)
                pool = {'size': SIZES, 'colour': COLOUR_NAMES, 'shape': SHAPES}[kind]
                value = actual if label == 'entailment' else pick(rng, [v for v in pool if v != actual])
        r = ref_text(rng, ref, objs, generic=generic)
        if kind == 'size':
            return f'{r} is {pick(rng, SIZE_WORDS[value])}'
        if kind == 'colour':
            return pick(rng, (f'{r} is {value}', f'{r} is colored {value}'))
        if kind == 'shape':
            return pick(rng, (f'{r} is {indefinite(value)}', f'{r} has the shape of {indefinite(value)}'))
        return pick(rng, (f'{r} is the {value}most object', f'{r} is the {value}most shape'))
    # relation between two definite descriptions (attribute-only, so 'left' is not given away by the reference)
    rel = pick(rng, ('left', 'right'))
    cands = [(o, [r for r in refs_for(o, objs, locations=False) if r[0] != Desc()]) for o in objs]
    cands = [(o, rs) for o, rs in cands if rs]
    if label == 'neutral':
        absent = absent_desc(rng, objs, ATTRS)
        if absent is None:
            return None
        if cands and rng.random() < 0.7:  # the other description is present: only one of them is missing
            present = pick(rng, pick(rng, cands)[1])
            pair = [(absent, None), present]
            if rng.random() < 0.5:
                pair.reverse()
        else:
            second = absent_desc(rng, objs, ATTRS)
            if second is None:
                return None
            pair = [(absent, None), (second, None)]
        ta, tb = (ref_text(rng, p, objs) for p in pair)
    else:
        if len(cands) < 2:
            return None
        i, j = (int(k) for k in rng.choice(len(cands), size=2, replace=False))
        (a, ra), (b, rb) = cands[i], cands[j]
        holds = (a.cx < b.cx) == (rel == 'left')
        if holds != (label == 'entailment'):
            rel = 'right' if rel == 'left' else 'left'
        ta, tb = ref_text(rng, pick(rng, ra), objs), ref_text(rng, pick(rng, rb), objs)
    return f'{ta} is to the {rel} of {tb}'


def ve_for_image(rng: np.random.Generator, objs: Sequence[Obj], labels: Sequence[str]) -> list:
    """(hypothesis, label) for each wanted label, finished as a human would write it."""
    out = []
    for label in labels:
        for _ in range(200):
            h = _ve_hypothesis(rng, objs, label)
            if h is not None:
                out.append((finish(rng, h), label))
                break
        else:  # pragma: no cover
            raise RuntimeError(f'no VE hypothesis with label {label}')
    return out

