"""VQA templates: questions about one image (colour, shape, size, count, existence, left / right) and ten
annotator answers each."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dataset.toyworld.scene import (ATTRIBUTE_SUBSETS, ATTRS, COLOUR_NAMES, COLOURS, SHAPES, SIZES, Desc, Obj,
                                    absent_desc, count_matching, desc_of, pick, random_desc, refs_for)
from dataset.toyworld.text import indefinite, phrase, ref_text

# VQA answer noise: synonyms a human annotator might type instead of the canonical answer.
ANSWER_SYNONYMS = {
    'purple': ('violet',), 'orange': ('yellow',), 'circle': ('round', 'ball'), 'square': ('box', 'rectangle'),
    'diamond': ('rhombus',), 'triangle': ('pyramid',), 'big': ('large',), 'small': ('little', 'tiny'),
    'yes': ('yeah',), 'no': ('nope',), '0': ('none', 'zero'), '1': ('one',), '2': ('two',), '3': ('three',),
    '4': ('four',),
}

_QTYPES = ('color', 'color', 'shape', 'size', 'count', 'count', 'exist', 'exist', 'leftright', 'leftright')
_ANSWER_POOLS = {
    'other': tuple(COLOUR_NAMES) + SHAPES + SIZES + ('left', 'right'),
    'number': ('0', '1', '2', '3', '4'),
    'yes/no': ('yes', 'no'),
}


def _vqa_question(rng: np.random.Generator, objs: Sequence[Obj], qtype: str):
    """One question of the given type, or None if the image cannot support it.
    Returns (question, answer, question_type, answer_type)."""
    n = len(objs)
    if qtype in ('color', 'shape', 'size'):
        attr = {'color': 'colour', 'shape': 'shape', 'size': 'size'}[qtype]
        o = objs[int(rng.integers(n))]
        refs = refs_for(o, objs, exclude=(attr,))
        if not refs:
            return None
        ref = pick(rng, refs)
        r = ref_text(rng, ref, objs, generic=('object',) if qtype == 'shape' else ('object', 'object', 'shape'))
        if qtype == 'color':
            form = int(rng.integers(3))
            if form == 0:
                return f'what color is {r}?', o.colour, 'what color is the', 'other'
            if form == 1:
                return f'what is the color of {r}?', o.colour, 'what is the color of the', 'other'
            return f'which color does {r} have?', o.colour, 'which', 'other'
        if qtype == 'shape':
            if rng.random() < 0.5:
                return f'what shape is {r}?', o.shape, 'what shape is the', 'other'
            return f'what is the shape of {r}?', o.shape, 'what is the shape of the', 'other'
        form = int(rng.integers(3))
        if form == 0:
            return f'what size is {r}?', o.size, 'what size is the', 'other'
        if form == 1:
            return f'is {r} big or small?', o.size, 'is the', 'other'
        return f'is {r} small or large?', o.size, 'is the', 'other'
    if qtype == 'count':
        if rng.random() < 0.15:
            d = Desc()
        elif rng.random() < 0.7:
            d = desc_of(objs[int(rng.integers(n))], pick(rng, ATTRIBUTE_SUBSETS[1:]))
        else:
            d = random_desc(rng, ATTRS)
        w = phrase(rng, d, plural=True)
        q = pick(rng, (f'how many {w} are there?', f'how many {w} are in the image?',
                       f'how many {w} can you see?', f'how many {w} are in the picture?'))
        return q, str(count_matching(objs, d)), 'how many', 'number'
    if qtype == 'exist':
        want = bool(rng.random() < 0.5)
        if want:
            d = desc_of(objs[int(rng.integers(n))], pick(rng, ATTRIBUTE_SUBSETS[1:]))
        else:
            d = absent_desc(rng, objs, ATTRS)
            if d is None:
                return None
        if rng.random() < 0.5:
            return f'is there {indefinite(phrase(rng, d))}?', 'yes' if want else 'no', 'is there a', 'yes/no'
        return (f'are there any {phrase(rng, d, plural=True)}?', 'yes' if want else 'no', 'are there any',
                'yes/no')
    # leftright: two objects with attribute-only unique descriptions
    if n < 2:
        return None
    cands = [(o, [r for r in refs_for(o, objs, locations=False) if r[0] != Desc()]) for o in objs]
    cands = [(o, rs) for o, rs in cands if rs]
    if len(cands) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(cands), size=2, replace=False))
    (a, ra), (b, rb) = cands[i], cands[j]
    ta, tb = ref_text(rng, pick(rng, ra), objs), ref_text(rng, pick(rng, rb), objs)
    side = 'left' if a.cx < b.cx else 'right'
    if rng.random() < 0.3:
        return f'is {ta} on the left or the right of {tb}?', side, 'is the', 'other'
    asked = pick(rng, ('left', 'right'))
    return f'is {ta} to the {asked} of {tb}?', 'yes' if asked == side else 'no', 'is the', 'yes/no'



def human_answers(rng: np.random.Generator, answer: str, answer_type: str) -> list[str]:
    """Ten annotator answers: mostly correct, some synonyms or same-type mistakes, shuffled."""
    n_correct = int(rng.choice([10, 9, 8, 7, 6], p=[0.4, 0.25, 0.17, 0.1, 0.08]))
    answers = [answer] * n_correct
    wrong_pool = [a for a in _ANSWER_POOLS[answer_type] if a != answer]
    if answer in SIZES:  # keep wrong answers of the same kind (a size for a size question, ...)
        wrong_pool = [a for a in SIZES if a != answer]
    elif answer in SHAPES:
        wrong_pool = [a for a in SHAPES if a != answer]
    elif answer in COLOURS:
        wrong_pool = [a for a in COLOUR_NAMES if a != answer]
    elif answer in ('left', 'right'):
        wrong_pool = ['right' if answer == 'left' else 'left']
    for _ in range(10 - n_correct):
        if answer in ANSWER_SYNONYMS and rng.random() < 0.6:
            answers.append(pick(rng, ANSWER_SYNONYMS[answer]))
        else:
            answers.append(pick(rng, wrong_pool))
    return [answers[k] for k in rng.permutation(10)]


def vqa_for_image(rng: np.random.Generator, objs: Sequence[Obj], k: int) -> list:
    """Up to k distinct (question, answer, question type, answer type) tuples about one image."""
    out, seen = [], set()
    for _ in range(30 * k):
        if len(out) == k:
            break
        q = _vqa_question(rng, objs, pick(rng, _QTYPES))
        if q is None or q[0] in seen:
            continue
        seen.add(q[0])
        out.append(q)
    return out

