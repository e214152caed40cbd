"""Phrasing shared by every task's templates: object words, articles, references, number words, the human-looking
surface of a sentence."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dataset.toyworld.scene import Desc, Obj, count_matching, pick

SIZE_WORDS = {'small': ('small', 'little'), 'big': ('big', 'large')}
SIDE_WORDS = ('left', 'right', 'leftmost', 'rightmost')
NUMBER_WORDS = ('no', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight')


def noun(rng: np.random.Generator, shape: str | None, plural: bool = False,
         generic=('object', 'object', 'shape')) -> str:
    """The shape's noun, or a generic one ('object', 'shape') when no shape is given."""
    w = shape if shape else pick(rng, generic)
    return w + 's' if plural else w


def phrase(rng: np.random.Generator, d: Desc, plural: bool = False, generic=('object', 'object', 'shape')) -> str:
    """'big red circle', 'little objects', ... (size synonym drawn at random)."""
    ws = []
    if d.size:
        ws.append(pick(rng, SIZE_WORDS[d.size]))
    if d.colour:
        ws.append(d.colour)
    ws.append(noun(rng, d.shape, plural, generic))
    return ' '.join(ws)


def indefinite(words: str) -> str:
    """'a red circle', 'an orange square'."""
    return ('an ' if words[0] in 'aeiou' else 'a ') + words


def ref_text(rng: np.random.Generator, ref, objs: Sequence[Obj], article: bool = True,
             generic=('object', 'object', 'shape')) -> str:
    """Render a reference: 'the red circle', 'the leftmost triangle', 'the square on the right', ..."""
    d, loc = ref
    w = phrase(rng, d, generic=generic)
    the = 'the ' if article else ''
    if loc is None:
        return the + w
    if count_matching(objs, d) == 2:
        form = int(rng.integers(3))
        if form == 1:
            return f'{the}{w} on the {loc}'
        if form == 2:
            return f'{the}{loc} {w}'
    return f'{the}{loc}most {w}'


def join_list(items: Sequence[str]) -> str:
    """'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ', '.join(items[:-1]) + ' and ' + items[-1]


def number_word(n: int) -> str:
    """'no', 'one', 'two', ..."""
    return NUMBER_WORDS[n]


def full_indefinite(rng: np.random.Generator, o: Obj) -> str:
    """'a big red circle': every attribute of `o`, with its article."""
    return indefinite(phrase(rng, Desc(o.size, o.colour, o.shape)))


def finish(rng: np.random.Generator, s: str) -> str:
    """Human-looking surface: capitalised half of the time, a full stop a third of the time."""
    if rng.random() < 0.5:
        s = s[0].upper() + s[1:]
    if rng.random() < 0.3:
        s += '.'
    return s
