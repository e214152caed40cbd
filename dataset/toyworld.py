"""A synthetic "toy world" in the exact annotation formats of every ALBEF task (spec section 4.2 and 13).

`python -m dataset.toyworld --out data/toyworld --seed 0` draws small RGB images with 1-4 non-overlapping flat
objects (4 shapes x 6 colours x 2 sizes, random background tint, pixel noise) and writes, for the same images,
the annotation files of pretraining, TA (text-assignment) pretraining, retrieval, VQA, NLVR2, SNLI-VE and
RefCOCO+ grounding, a BERT WordPiece `vocab/vocab.txt` that covers every word, `world.json` (ground truth) and
`manifest.json` (generation arguments + file hashes). All text comes from templates over the ground truth, so
every statement is decidable from the pixels (or, for SNLI-VE "neutral", provably not decidable, see below).

Layout under --out (image paths are relative to `<out>/images` except in the two pretraining files, whose
`image` is os.path.join(out, 'images', file) exactly as --out was spelled, because pretraining opens paths as is):

    images/toy_000000.jpg ...      RGB JPEG, quality 95, --image-size square
    vocab/vocab.txt                [PAD] [UNK] [CLS] [SEP] [MASK], punctuation, characters, ##characters, words
    pretrain.json                  [{image, caption: [captions]}]                  (train images)
    nlvr_pretrain.json             [{image, caption: str}]                         (train images)
    retrieval_train.json           [{image, caption: str, image_id: int}]          (one item per caption)
    retrieval_{val,test}.json      [{image, caption: [captions]}]
    vqa_train.json                 [{question_id, question, answer: [10 human answers], image, dataset: 'vqa'}]
    vqa_test.json                  same fields (the answers are kept so the toy can be scored offline)
    answer_list.json               every answer string of train and test (most frequent first)
    vqa_test_questions.json        official VQA API question file of the test split
    vqa_test_annotations.json      official VQA API annotation file of the test split
    nlvr_{train,dev,test}.json     [{images: [file0, file1], sentence, label: 'True'|'False'}]
    ve_{train,dev,test}.json       [{image: id without extension, sentence, label}]
    refcoco+_train.json            [{image, text}]                                 (one item per sentence)
    refcoco+_{val,test}.json       [{image, text, ref_id}]                         (test = testA + testB)
    refcoco+/refs(unc).p           REFER refs (pickle protocol 2)
    refcoco+/instances.json        COCO-style images / annotations / categories
    refcoco+/dets.json             {str(image_id): [[x, y, w, h], ...]} proposals
    refcoco+/cocos.json            {str(image_id): [[x, y, w, h, category_id], ...]} ground-truth boxes
    world.json                     per image: image_id, file, split, size, background, objects[shape, colour, size, box]
    manifest.json                  generator arguments, counts, sha256 of every annotation file

Splits. Images are drawn once and split into disjoint pools train / val / test (--train-images, --val-images,
--test-images). Pretraining, retrieval-train, VQA-train, NLVR-train, VE-train and RefCOCO+-train use only train
images; the val pool feeds retrieval-val, NLVR-dev, VE-dev and RefCOCO+ val; the test pool feeds retrieval-test,
VQA-test, NLVR-test, VE-test and RefCOCO+ testA/testB.

Task design (all geometry uses box centres; object centres differ by >= 10% of the width, so left/right is clear):
  * VQA: colour / shape / size of a uniquely described object, counts (0-4), existence (yes/no balanced),
    left/right (yes/no balanced, or 'left'/'right'). Ten human answers per question: 6-10 correct, the rest
    synonyms ('violet', 'two', 'large', 'yeah', ...) or wrong answers of the same type, so answer weights matter.
  * NLVR2: 9 statement templates about an image pair (counts per image, both/neither/only, more/same, totals,
    relations, leftmost object). For every template the True/False labels are balanced.
  * SNLI-VE: every hypothesis predicates something of a definite description ("the big circle is red",
    "the red square is to the left of the blue triangle", "the purple object is the leftmost object").
    entailment = the described object(s) exist uniquely and the claim holds; contradiction = they exist and the
    claim is false; neutral = a described object is NOT in the image, so the claim about it can be neither
    verified nor refuted. Claimed values are drawn independently of the label, so the text alone cannot tell the
    label; the image decides it. Labels are balanced (one of each per image at the default 3 per image).
  * RefCOCO+: each ref names one object uniquely, by attributes ("red circle", "the big square") or by position
    among look-alikes ("the leftmost triangle", "blue square on the right"). Category = shape. Split of a ref:
    train / val by image pool; in the test pool testA = refs to BIG objects, testB = refs to SMALL objects (the
    small ones are harder to localise, mirroring RefCOCO+'s easier testA / harder testB).
    dets.json holds every object box plus, per object, jittered distractors (IoU < 0.5 with every object) and a
    random background box, shuffled; every box lies inside the image.

Determinism: every image and every task's text comes from its own numpy Generator seeded by (seed, task, index),
JSON is written in a fixed key order, no time stamps: the same arguments give byte-identical files. Changing a
text flag (e.g. --vqa-per-image) leaves the images and the other tasks unchanged.

Safety: the world is written into a temporary sibling folder and renamed into place at the end. An --out that
holds something else is refused with a one-line error (exit code 2) and left untouched: a folder that is not a toy
world, or a toy world made with different arguments (unless --force, which replaces a toy world only). The same
arguments reuse the existing world (after checking the file hashes) unless --force.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import time
from collections import Counter
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

try:  # the team's one-line user errors; fall back so the generator also works stand-alone
    from utils import UserError
except ImportError:  # pragma: no cover - only without the repository root on sys.path
    class UserError(Exception):
        """An error caused by the user's input, printed as one line."""

FORMAT_VERSION = 1
GENERATOR = 'dataset.toyworld'


class ToyWorldError(UserError, ValueError):
    """Bad arguments for the generator or an --out folder that must not be touched (message: one line)."""


# ------------------------------------------------------------------------------------------------------------
# The world's vocabulary of things
# ------------------------------------------------------------------------------------------------------------
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
SIZE_WORDS = {'small': ('small', 'little'), 'big': ('big', 'large')}
SIDE_WORDS = ('left', 'right', 'leftmost', 'rightmost')
NUMBER_WORDS = ('no', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight')
ATTRS = ('size', 'colour', 'shape')

# VQA answer noise: synonyms a human annotator might type instead of the canonical answer.
ANSWER_SYNONYMS = {
    'purple': ('violet',), 'orange': ('yellow',), 'circle': ('round', 'ball'), 'square': ('box', 'rectangle'),
    'diamond': ('rhombus',), 'triangle': ('pyramid',), 'big': ('large',), 'small': ('little', 'tiny'),
    'yes': ('yeah',), 'no': ('nope',), '0': ('none', 'zero'), '1': ('one',), '2': ('two',), '3': ('three',),
    '4': ('four',),
}

# Every word the templates can produce. Fixed (seed-independent) so the vocabulary size is a constant; the
# generator checks every text it writes against it.
WORDS = (
    'a', 'altogether', 'an', 'and', 'any', 'appears', 'are', 'background', 'ball', 'big', 'blue', 'both', 'box',
    'but', 'can', 'circle', 'circles', 'color', 'colored', 'colour', 'containing', 'contain', 'contains',
    'diamond', 'diamonds', 'does', 'each', 'eight', 'either', 'equally', 'exactly', 'five', 'four', 'from',
    'fewer', 'green', 'has', 'have', 'how', 'image', 'images', 'in', 'including', 'is', 'just', 'large',
    'left', 'leftmost', 'little', 'lone', 'many', 'more', 'neither', 'no', 'none', 'nope', 'not',
    'number', 'object', 'objects', 'of', 'on', 'one', 'only', 'or', 'orange', 'other', 'picture', 'plain',
    'purple', 'pyramid', 'rectangle', 'red', 'rhombus', 'right', 'rightmost', 'round', 'same', 'scene', 'see',
    'seven', 'shape', 'shapes', 'showing', 'shows', 'single', 'six', 'size', 'small', 'square',
    'squares', 'than', 'the', 'there', 'three', 'tiny', 'to', 'together', 'total', 'triangle', 'triangles',
    'two', 'violet', 'visible', 'what', 'which', 'with', 'yeah', 'yellow', 'yes', 'you', 'zero',
)
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
# BERT's basic tokenizer splits punctuation into single tokens; keeping them (and single characters plus their
# ## continuations) in the vocabulary means any text, even words outside the world, avoids [UNK].
PUNCTUATION = tuple('.,?!\'"-:;()/')
CHARACTERS = tuple('abcdefghijklmnopqrstuvwxyz0123456789')


def build_vocab() -> list[str]:
    """The fixed vocabulary, in file order (ids = line numbers): specials, punctuation, characters, words."""
    tokens = list(SPECIAL_TOKENS) + list(PUNCTUATION) + list(CHARACTERS) + ['##' + c for c in CHARACTERS]
    seen = set(tokens)
    for w in WORDS:
        if w not in seen:  # single-letter words ('a') are already there as characters
            tokens.append(w)
            seen.add(w)
    return tokens


VOCAB = build_vocab()
VOCAB_SIZE = len(VOCAB)
_VOCAB_SET = frozenset(VOCAB)


# ------------------------------------------------------------------------------------------------------------
# Objects, descriptions, references
# ------------------------------------------------------------------------------------------------------------
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


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _matches(o: Obj, d: Desc) -> bool:
    return ((d.size is None or o.size == d.size) and (d.colour is None or o.colour == d.colour)
            and (d.shape is None or o.shape == d.shape))


def _count(objs: Sequence[Obj], d: Desc) -> int:
    return sum(_matches(o, d) for o in objs)


def _desc_of(o: Obj, attrs: Sequence[str]) -> Desc:
    return Desc(**{a: getattr(o, a) for a in attrs})


# All attribute subsets, smallest first (empty = "the object").
_MASKS = ((), ('size',), ('colour',), ('shape',), ('size', 'colour'), ('size', 'shape'), ('colour', 'shape'),
          ('size', 'colour', 'shape'))


def _random_desc(rng: np.random.Generator, allowed: Sequence[str]) -> Desc:
    """A random non-empty description over the `allowed` attributes."""
    masks = [m for m in _MASKS if m and set(m) <= set(allowed)]
    mask = _pick(rng, masks)
    values = {'size': _pick(rng, SIZES), 'colour': _pick(rng, COLOUR_NAMES), 'shape': _pick(rng, SHAPES)}
    return Desc(**{a: values[a] for a in mask})


def _absent_desc(rng: np.random.Generator, objs: Sequence[Obj], allowed: Sequence[str]) -> Desc | None:
    """A random description that matches no object of the image (None if none found quickly)."""
    for _ in range(40):
        d = _random_desc(rng, allowed)
        if _count(objs, d) == 0:
            return d
    return None


def _refs_for(o: Obj, objs: Sequence[Obj], exclude: Sequence[str] = (), locations: bool = True) -> list:
    """Every way to single out `o`: (Desc, None) if the description is unique, (Desc, 'left'|'right') if `o` is
    the leftmost / rightmost of several matching objects. Descriptions never use the `exclude` attributes."""
    refs = []
    for mask in _MASKS:
        if set(mask) & set(exclude):
            continue
        d = _desc_of(o, mask)
        group = [p for p in objs if _matches(p, d)]
        if len(group) == 1:
            refs.append((d, None))
        elif locations:
            xs = sorted(p.cx for p in group)
            if o.cx == xs[0]:
                refs.append((d, 'left'))
            elif o.cx == xs[-1]:
                refs.append((d, 'right'))
    return refs


def _noun(rng: np.random.Generator, shape: str | None, plural: bool = False,
          generic=('object', 'object', 'shape')) -> str:
    w = shape if shape else _pick(rng, generic)
    return w + 's' if plural else w


def _words(rng: np.random.Generator, d: Desc, plural: bool = False, generic=('object', 'object', 'shape')) -> str:
    """'big red circle', 'little objects', ... (size synonym drawn at random)."""
    ws = []
    if d.size:
        ws.append(_pick(rng, SIZE_WORDS[d.size]))
    if d.colour:
        ws.append(d.colour)
    ws.append(_noun(rng, d.shape, plural, generic))
    return ' '.join(ws)


def _indef(phrase: str) -> str:
    return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def _ref_text(rng: np.random.Generator, ref, objs: Sequence[Obj], article: bool = True,
              generic=('object', 'object', 'shape')) -> str:
    """Render a reference: 'the red circle', 'the leftmost triangle', 'the square on the right', ..."""
    d, loc = ref
    w = _words(rng, d, generic=generic)
    the = 'the ' if article else ''
    if loc is None:
        return the + w
    if _count(objs, d) == 2:
        form = int(rng.integers(3))
        if form == 1:
            return f'{the}{w} on the {loc}'
        if form == 2:
            return f'{the}{loc} {w}'
    return f'{the}{loc}most {w}'


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ', '.join(items[:-1]) + ' and ' + items[-1]


def _num(n: int) -> str:
    return NUMBER_WORDS[n]


def _full(rng: np.random.Generator, o: Obj) -> str:
    return _indef(_words(rng, Desc(o.size, o.colour, o.shape)))


def _finish(rng: np.random.Generator, s: str) -> str:
    """Human-looking surface: capitalised half of the time, a full stop a third of the time."""
    if rng.random() < 0.5:
        s = s[0].upper() + s[1:]
    if rng.random() < 0.3:
        s += '.'
    return s


# ------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------
def _apart(b, c, gap: int, min_dx: float) -> bool:
    """Boxes disjoint with `gap` pixels between them and centres at least `min_dx` apart horizontally."""
    x, y, w, h = b
    X, Y, W, H = c
    disjoint = x + w + gap <= X or X + W + gap <= x or y + h + gap <= Y or Y + H + gap <= y
    return disjoint and abs((x + w / 2) - (X + W / 2)) >= min_dx


def _sample_objects(rng: np.random.Generator, side: int) -> list[Obj]:
    """1-4 non-overlapping objects inside the image, sorted left to right."""
    n = int(rng.integers(1, 5))
    margin, gap, min_dx = 2, 3, 0.1 * side
    for attempt in range(60):
        if attempt and attempt % 15 == 0 and n > 1:
            n -= 1  # crowded draw: fall back to fewer objects rather than loop forever
        objs: list[Obj] = []
        for _ in range(n):
            size = _pick(rng, SIZES)
            lo, hi = SIZE_FRACTION[size]
            s = int(round(side * rng.uniform(lo, hi)))
            # Repeat an attribute of an earlier object now and then, so counts >= 2 and look-alikes (that need
            # a position to be told apart) are common.
            colour = objs[-1].colour if objs and rng.random() < 0.3 else _pick(rng, COLOUR_NAMES)
            shape = objs[-1].shape if objs and rng.random() < 0.3 else _pick(rng, SHAPES)
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


def _render(rng: np.random.Generator, side: int, objs: Sequence[Obj]) -> tuple[np.ndarray, list[int]]:
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


# ------------------------------------------------------------------------------------------------------------
# Captions (pretraining, retrieval)
# ------------------------------------------------------------------------------------------------------------
def _caption(rng: np.random.Generator, objs: Sequence[Obj]) -> str:
    n = len(objs)
    kinds = ['list', 'list', 'total'] + (['ordered', 'relation', 'group'] if n >= 2 else ['single', 'single'])
    kind = _pick(rng, kinds)
    if kind == 'list':
        kinds_here = Counter((o.size, o.colour, o.shape) for o in objs)  # identical objects: "two red circles"
        keys = sorted(kinds_here)
        items = []
        for k in rng.permutation(len(keys)):
            d, c = Desc(*keys[k]), kinds_here[keys[k]]
            items.append(_indef(_words(rng, d)) if c == 1 else f'{_num(c)} {_words(rng, d, plural=True)}')
        prefix = _pick(rng, ('', '', 'an image of ', 'a picture with ', 'a scene containing ', 'there is ',
                             'a picture showing '))
        return prefix + _join(items)
    if kind == 'ordered':
        items = _join([_full(rng, o) for o in objs])
        form = int(rng.integers(3))
        if form == 0:
            return 'from left to right: ' + items
        if form == 1:
            return items + ', from left to right'
        return f'{_num(n)} objects from left to right: {items}'
    if kind == 'relation':
        i, j = sorted(int(k) for k in rng.choice(n, size=2, replace=False))
        a, b = _full(rng, objs[i]), _full(rng, objs[j])
        forms = [f'{a} to the left of {b}', f'{b} to the right of {a}']
        if n == 2:
            forms.append(f'{a} on the left and {b} on the right')
        s = _pick(rng, forms)
        if n > 2 and rng.random() < 0.5:
            s += f' and {_num(n - 2)} other object' + ('s' if n > 3 else '')
        return s
    if kind == 'group':
        attr = _pick(rng, ATTRS)
        counts = Counter(getattr(o, attr) for o in objs)
        parts = []
        for value in [v for v in (SHAPES if attr == 'shape' else COLOUR_NAMES if attr == 'colour' else SIZES)
                      if v in counts]:
            c = counts[value]
            if attr == 'shape':
                rest = value + ('s' if c > 1 else '')
            else:
                word = value if attr == 'colour' else _pick(rng, SIZE_WORDS[value])
                rest = f'{word} ' + _noun(rng, None, c > 1, ('object',))
            parts.append(_indef(rest) if c == 1 and rng.random() < 0.5 else f'{_num(c)} {rest}')
        order = rng.permutation(len(parts))
        return _join([parts[k] for k in order])
    if kind == 'single':
        w = _words(rng, Desc(objs[0].size, objs[0].colour, objs[0].shape))
        return _pick(rng, (f'a single {w}', f'just one {w}', f'a lone {w}', f'one {w} on a plain background',
                           f'only {_indef(w)} is visible'))
    # total
    o = objs[int(rng.integers(n))]
    if n == 1:
        return f'one object: {_full(rng, o)}'
    return _pick(rng, (f'{_num(n)} objects, including {_full(rng, o)}', f'a picture of {_num(n)} objects',
                       f'{_num(n)} shapes on a plain background', f'{_num(n)} objects with {_full(rng, o)}'))


def _captions(rng: np.random.Generator, objs: Sequence[Obj], k: int) -> list[str]:
    """k captions, distinct when the templates allow it."""
    out: list[str] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        c = _finish(rng, _caption(rng, objs))
        if c.lower().rstrip('.') not in {x.lower().rstrip('.') for x in out}:
            out.append(c)
    while len(out) < k:
        out.append(_finish(rng, _caption(rng, objs)))
    return out


# ------------------------------------------------------------------------------------------------------------
# VQA
# ------------------------------------------------------------------------------------------------------------
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
        refs = _refs_for(o, objs, exclude=(attr,))
        if not refs:
            return None
        ref = _pick(rng, refs)
        r = _ref_text(rng, ref, objs, generic=('object',) if qtype == 'shape' else ('object', 'object', 'shape'))
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
            d = _desc_of(objs[int(rng.integers(n))], _pick(rng, _MASKS[1:]))
        else:
            d = _random_desc(rng, ATTRS)
        w = _words(rng, d, plural=True)
        q = _pick(rng, (f'how many {w} are there?', f'how many {w} are in the image?',
                        f'how many {w} can you see?', f'how many {w} are in the picture?'))
        return q, str(_count(objs, d)), 'how many', 'number'
    if qtype == 'exist':
        want = bool(rng.random() < 0.5)
        if want:
            d = _desc_of(objs[int(rng.integers(n))], _pick(rng, _MASKS[1:]))
        else:
            d = _absent_desc(rng, objs, ATTRS)
            if d is None:
                return None
        if rng.random() < 0.5:
            return f'is there {_indef(_words(rng, d))}?', 'yes' if want else 'no', 'is there a', 'yes/no'
        return (f'are there any {_words(rng, d, plural=True)}?', 'yes' if want else 'no', 'are there any',
                'yes/no')
    # leftright: two objects with attribute-only unique descriptions
    if n < 2:
        return None
    cands = [(o, [r for r in _refs_for(o, objs, locations=False) if r[0] != Desc()]) for o in objs]
    cands = [(o, rs) for o, rs in cands if rs]
    if len(cands) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(cands), size=2, replace=False))
    (a, ra), (b, rb) = cands[i], cands[j]
    ta, tb = _ref_text(rng, _pick(rng, ra), objs), _ref_text(rng, _pick(rng, rb), objs)
    side = 'left' if a.cx < b.cx else 'right'
    if rng.random() < 0.3:
        return f'is {ta} on the left or the right of {tb}?', side, 'is the', 'other'
    asked = _pick(rng, ('left', 'right'))
    return f'is {ta} to the {asked} of {tb}?', 'yes' if asked == side else 'no', 'is the', 'yes/no'


VQA_QUESTION_KINDS = ('colour', 'shape', 'size', 'count', 'exist', 'relation', 'side')


def names_a_side(text: str) -> bool:
    """Whether a toy text says left, right, leftmost or rightmost (as a whole word, any case or punctuation)."""
    return not set(re.findall(r'[a-z]+', text.lower())).isdisjoint(SIDE_WORDS)


def vqa_question_kind(question: str) -> str:
    """The kind of a toy VQA question, read back from `_vqa_question`'s templates.

    'count', 'exist', 'relation' ("is A to the left of B?", yes / no), 'side' ("is A on the left or the right of
    B?"), or 'colour' / 'shape' / 'size' of one object, with ' by position' appended when the question names that
    object by its position ("the leftmost triangle"). Raises ValueError on text no template makes.
    """
    q = question.strip().lower()
    if q.startswith('how many '):
        return 'count'
    if q.startswith(('is there ', 'are there any ')):
        return 'exist'
    if ' on the left or the right of ' in q:
        return 'side'
    if ' to the left of ' in q or ' to the right of ' in q:
        return 'relation'
    if q.startswith(('what color is ', 'what is the color of ', 'which color does ')):
        kind = 'colour'
    elif q.startswith(('what shape is ', 'what is the shape of ')):
        kind = 'shape'
    elif q.startswith('what size is ') or q.endswith((' big or small?', ' small or large?')):
        kind = 'size'
    else:
        raise ValueError(f'not a toy VQA question: {question!r}')
    return kind + ' by position' if names_a_side(q) else kind


def _human_answers(rng: np.random.Generator, answer: str, answer_type: str) -> list[str]:
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
            answers.append(_pick(rng, ANSWER_SYNONYMS[answer]))
        else:
            answers.append(_pick(rng, wrong_pool))
    return [answers[k] for k in rng.permutation(10)]


def _vqa_for_image(rng: np.random.Generator, objs: Sequence[Obj], k: int) -> list:
    out, seen = [], set()
    for _ in range(30 * k):
        if len(out) == k:
            break
        q = _vqa_question(rng, objs, _pick(rng, _QTYPES))
        if q is None or q[0] in seen:
            continue
        seen.add(q[0])
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------------------------
# NLVR2 (statements about an image pair)
# ------------------------------------------------------------------------------------------------------------
def _nlvr_desc(rng: np.random.Generator, left: Sequence[Obj], right: Sequence[Obj]) -> Desc:
    objs = list(left) + list(right)
    if objs and rng.random() < 0.7:
        return _desc_of(objs[int(rng.integers(len(objs)))],
                        _pick(rng, (('colour',), ('shape',), ('colour', 'shape'), ('size', 'shape'),
                                    ('size', 'colour'), ('size', 'colour', 'shape'))))
    return _random_desc(rng, ATTRS)


def _nlvr_statement(rng: np.random.Generator, template: int, left: Sequence[Obj], right: Sequence[Obj]):
    """(sentence, truth) for one NLVR template with random parameters."""
    images = {'left': left, 'right': right}
    side = _pick(rng, ('left', 'right'))
    other = 'right' if side == 'left' else 'left'
    d = _nlvr_desc(rng, left, right)
    cl, cr = _count(left, d), _count(right, d)
    cs = cl if side == 'left' else cr
    co = cr if side == 'left' else cl
    if template == 0:  # count in one image
        k = cs if rng.random() < 0.5 else int(rng.integers(0, 5))
        w = _words(rng, d, plural=k != 1)
        verb = _pick(rng, ('has', 'contains', 'shows'))
        exact = 'exactly ' if k > 0 and rng.random() < 0.5 else ''
        return f'the {side} image {verb} {exact}{_num(k)} {w}', cs == k
    if template == 1:  # both
        w = _words(rng, d)
        s = _pick(rng, (f'both images contain {_indef(w)}', f'there is {_indef(w)} in both images',
                        f'each image has {_indef(w)}'))
        return s, cl > 0 and cr > 0
    if template == 2:  # neither
        s = _pick(rng, (f'neither image contains {_indef(_words(rng, d))}',
                        f'there are no {_words(rng, d, plural=True)} in either image',
                        f'no image has any {_words(rng, d, plural=True)}'))
        return s, cl == 0 and cr == 0
    if template == 3:  # only one side
        w = _words(rng, d)
        s = _pick(rng, (f'only the {side} image contains {_indef(w)}',
                        f'{_indef(w)} appears in the {side} image but not in the {other} image'))
        return s, cs > 0 and co == 0
    if template == 4:  # more / fewer
        if rng.random() < 0.3:
            d = Desc()
            cs, co = len(images[side]), len(images[other])
        w = _words(rng, d, plural=True)
        if rng.random() < 0.5:
            return f'the {side} image has more {w} than the {other} image', cs > co
        return f'there are fewer {w} in the {side} image than in the {other} image', cs < co
    if template == 5:  # same number
        if rng.random() < 0.3:
            d = Desc()
            cl, cr = len(left), len(right)
        w = _words(rng, d, plural=True)
        s = _pick(rng, (f'both images have the same number of {w}', f'the two images contain equally many {w}'))
        return s, cl == cr
    if template == 6:  # total
        total = cl + cr
        k = total if rng.random() < 0.5 else int(rng.integers(0, 6))
        w = _words(rng, d, plural=k != 1)
        s = _pick(rng, (f'there are {_num(k)} {w} in total', f'the two images together contain {_num(k)} {w}',
                        f'altogether there are exactly {_num(k)} {w}'))
        if k == 1:
            s = s.replace('there are one', 'there is one').replace('there are exactly one', 'there is exactly one')
        return s, total == k
    if template == 7:  # relation inside one image
        objs = images[side]
        if len(objs) >= 2 and rng.random() < 0.7:
            i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
            da = _desc_of(objs[i], _pick(rng, (('colour',), ('shape',), ('colour', 'shape'))))
            db = _desc_of(objs[j], _pick(rng, (('colour',), ('shape',), ('colour', 'shape'))))
        else:
            da, db = _random_desc(rng, ('colour', 'shape')), _random_desc(rng, ('colour', 'shape'))
        rel = _pick(rng, ('left', 'right'))
        truth = any(_matches(a, da) and _matches(b, db) and a is not b and ((a.cx < b.cx) == (rel == 'left'))
                    for a in objs for b in objs)
        return (f'in the {side} image, {_indef(_words(rng, da))} is to the {rel} of {_indef(_words(rng, db))}',
                truth)
    # template 8: the leftmost / rightmost object of one image
    objs = images[side]
    end = _pick(rng, ('left', 'right'))
    target = objs[0] if end == 'left' else objs[-1]
    if rng.random() < 0.5:
        colour = target.colour if rng.random() < 0.5 else _pick(rng, COLOUR_NAMES)
        return f'the {end}most object in the {side} image is {colour}', target.colour == colour
    shape = target.shape if rng.random() < 0.5 else _pick(rng, SHAPES)
    return f'the {end}most object in the {side} image is {_indef(shape)}', target.shape == shape


NLVR_TEMPLATES = 9
# What each of `_nlvr_statement`'s templates asks, by template number. The first four and 'total' can be told from
# one image at a time (or a sum); 'more / fewer' and 'same number' compare the two images.
NLVR_STATEMENT_KINDS = ('count in one image', 'in both', 'in neither', 'only in one', 'more / fewer', 'same number',
                        'total', 'relation', 'leftmost / rightmost')


def nlvr_statement_kind(sentence: str) -> str:
    """The kind (one of NLVR_STATEMENT_KINDS) of a toy NLVR2 statement, read back from `_nlvr_statement`'s
    templates. Raises ValueError on text no template makes."""
    s = sentence.strip().lower().rstrip('.')
    if ' the same number of ' in s or ' equally many ' in s:
        kind = 5
    elif (' more ' in s and ' than the ' in s) or s.startswith('there are fewer '):
        kind = 4
    elif s.endswith(' in total') or s.startswith(('the two images together contain ', 'altogether there ')):
        kind = 6
    elif s.startswith(('in the left image, ', 'in the right image, ')):
        kind = 7
    elif s.startswith(('the leftmost object in the ', 'the rightmost object in the ')):
        kind = 8
    elif s.startswith('only the ') or ' image but not in the ' in s:
        kind = 3
    elif s.startswith(('neither image contains ', 'there are no ', 'no image has any ')):
        kind = 2
    elif s.startswith('both images contain ') or s.endswith(' in both images') or s.startswith('each image has '):
        kind = 1
    elif re.match(r'the (left|right) image (has|contains|shows) ', s):
        kind = 0
    else:
        raise ValueError(f'not a toy NLVR2 statement: {sentence!r}')
    return NLVR_STATEMENT_KINDS[kind]


def _nlvr_split(rng: np.random.Generator, worlds: Sequence[dict], n_items: int) -> list[dict]:
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
        items.append({'images': [worlds[i]['file'], worlds[j]['file']], 'sentence': _finish(rng, s),
                      'label': 'True' if truth else 'False'})
    order = rng.permutation(len(items))
    return [items[k] for k in order]


# ------------------------------------------------------------------------------------------------------------
# SNLI-VE
# ------------------------------------------------------------------------------------------------------------
VE_LABELS = ('entailment', 'neutral', 'contradiction')


def _ve_hypothesis(rng: np.random.Generator, objs: Sequence[Obj], label: str) -> str | None:
    """A hypothesis with the given label (see the module docstring), or None if this draw failed."""
    kind = _pick(rng, ('size', 'colour', 'shape', 'relation', 'relation', 'extreme'))
    if kind in ('size', 'colour', 'shape', 'extreme'):
        exclude = () if kind == 'extreme' else (kind,)
        generic = ('object',) if kind == 'shape' else ('object', 'object', 'shape')
        if label == 'neutral':
            d = _absent_desc(rng, objs, [a for a in ATTRS if a not in exclude])
            if d is None:
                return None
            # Positions occur in present references too, so they must not give the label away.
            loc = None if kind == 'extreme' or rng.random() < 0.7 else _pick(rng, ('left', 'right'))
            ref = (d, loc)
            value = {'size': _pick(rng, SIZES), 'colour': _pick(rng, COLOUR_NAMES), 'shape': _pick(rng, SHAPES),
                     'extreme': _pick(rng, ('left', 'right'))}[kind]
        else:
            o = objs[int(rng.integers(len(objs)))]
            # Never the bare 'the object' / 'the leftmost object': a missing object cannot be described that
            # way, so such a hypothesis would announce that it is not neutral.
            refs = [r for r in _refs_for(o, objs, exclude=exclude, locations=kind != 'extreme') if r[0] != Desc()]
            if not refs:
                return None
            ref = _pick(rng, refs)
            if kind == 'extreme':
                truth = {'left': o is objs[0], 'right': o is objs[-1]}
                want = label == 'entailment'
                options = [e for e in ('left', 'right') if truth[e] == want]
                if not options:
                    return None
                value = _pick(rng, options)
            else:
                actual = getattr(o, kind)
                pool = {'size': SIZES, 'colour': COLOUR_NAMES, 'shape': SHAPES}[kind]
                value = actual if label == 'entailment' else _pick(rng, [v for v in pool if v != actual])
        r = _ref_text(rng, ref, objs, generic=generic)
        if kind == 'size':
            return f'{r} is {_pick(rng, SIZE_WORDS[value])}'
        if kind == 'colour':
            return _pick(rng, (f'{r} is {value}', f'{r} is colored {value}'))
        if kind == 'shape':
            return _pick(rng, (f'{r} is {_indef(value)}', f'{r} has the shape of {_indef(value)}'))
        return _pick(rng, (f'{r} is the {value}most object', f'{r} is the {value}most shape'))
    # relation between two definite descriptions (attribute-only, so 'left' is not given away by the reference)
    rel = _pick(rng, ('left', 'right'))
    cands = [(o, [r for r in _refs_for(o, objs, locations=False) if r[0] != Desc()]) for o in objs]
    cands = [(o, rs) for o, rs in cands if rs]
    if label == 'neutral':
        absent = _absent_desc(rng, objs, ATTRS)
        if absent is None:
            return None
        if cands and rng.random() < 0.7:  # the other description is present: only one of them is missing
            present = _pick(rng, _pick(rng, cands)[1])
            pair = [(absent, None), present]
            if rng.random() < 0.5:
                pair.reverse()
        else:
            second = _absent_desc(rng, objs, ATTRS)
            if second is None:
                return None
            pair = [(absent, None), (second, None)]
        ta, tb = (_ref_text(rng, p, objs) for p in pair)
    else:
        if len(cands) < 2:
            return None
        i, j = (int(k) for k in rng.choice(len(cands), size=2, replace=False))
        (a, ra), (b, rb) = cands[i], cands[j]
        holds = (a.cx < b.cx) == (rel == 'left')
        if holds != (label == 'entailment'):
            rel = 'right' if rel == 'left' else 'left'
        ta, tb = _ref_text(rng, _pick(rng, ra), objs), _ref_text(rng, _pick(rng, rb), objs)
    return f'{ta} is to the {rel} of {tb}'


def _ve_for_image(rng: np.random.Generator, objs: Sequence[Obj], labels: Sequence[str]) -> list:
    out = []
    for label in labels:
        for _ in range(200):
            h = _ve_hypothesis(rng, objs, label)
            if h is not None:
                out.append((_finish(rng, h), label))
                break
        else:  # pragma: no cover
            raise RuntimeError(f'no VE hypothesis with label {label}')
    return out


# ------------------------------------------------------------------------------------------------------------
# RefCOCO+
# ------------------------------------------------------------------------------------------------------------
def _iou(a, b) -> float:
    """computeIoU of spec 10.8 (inclusive-pixel intersection, plain-area union)."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def _distractors(rng: np.random.Generator, objs: Sequence[Obj], side: int) -> list:
    """Per object two jittered boxes and one random box per image, all inside the image, IoU < 0.5 with
    every object, so picking one of them is a grounding error."""
    boxes = []

    def ok(b):
        return (b[2] >= 4 and b[3] >= 4 and b[0] >= 0 and b[1] >= 0 and b[0] + b[2] <= side
                and b[1] + b[3] <= side and all(_iou(b, o.box) < 0.5 for o in objs)
                and all(_iou(b, c) < 0.9 for c in boxes))

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


def _ref_expressions(rng: np.random.Generator, o: Obj, objs: Sequence[Obj], k: int) -> list[str]:
    refs = _refs_for(o, objs)
    if not refs:
        return []
    out: list[str] = []
    for _ in range(10 * k):
        if len(out) == k:
            break
        e = _ref_text(rng, _pick(rng, refs), objs, article=rng.random() < 0.4)
        if e not in out:
            out.append(e)
    return out


# ------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------
# Task codes for the per-task random streams (never renumber: that would change every world).
_IMG, _CAP, _VQA, _NLVR, _VE, _REF, _DET, _CEILING = range(1, 9)
POOLS = ('train', 'val', 'test')

DEFAULTS = {
    'seed': 0,
    'image_size': 96,
    'train_images': 2400,
    'val_images': 300,
    'test_images': 300,
    'captions_per_image': 5,
    'vqa_per_image': 4,
    'nlvr_per_image': 2,
    've_per_image': 3,
    'refs_per_image': 2,
}
FLAG = {k: '--' + k.replace('_', '-') for k in DEFAULTS}


def _check_args(args: dict) -> None:
    for key, value in args.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ToyWorldError(f'{FLAG[key]} must be an integer, got {value!r}')
    if args['image_size'] < 48:
        raise ToyWorldError(f"--image-size must be >= 48 (4 objects must fit), got {args['image_size']}")
    if args['image_size'] > 1024:
        raise ToyWorldError(f"--image-size must be <= 1024, got {args['image_size']}")
    for key in ('train_images', 'val_images', 'test_images', 'captions_per_image'):
        if args[key] < 2:
            raise ToyWorldError(f'{FLAG[key]} must be >= 2, got {args[key]}')
    for key in ('vqa_per_image', 'nlvr_per_image', 've_per_image', 'refs_per_image'):
        if args[key] < 1:
            raise ToyWorldError(f'{FLAG[key]} must be >= 1, got {args[key]}')
    if args['seed'] < 0:
        raise ToyWorldError(f"--seed must be >= 0, got {args['seed']}")


def _dump_json(path: str, obj) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=True)
        f.write('\n')


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _text_words(text: str) -> list[str]:
    """Words as BERT's basic tokenizer sees them (lower-cased, punctuation split off)."""
    out = []
    for w in text.lower().split():
        cur = ''
        for ch in w:
            if ch in PUNCTUATION:
                if cur:
                    out.append(cur)
                out.append(ch)
                cur = ''
            else:
                cur += ch
        if cur:
            out.append(cur)
    return out


def _check_vocab(texts, where: str) -> None:
    for t in texts:
        for w in _text_words(t):
            if w not in _VOCAB_SET:  # a template bug, not a user error
                raise RuntimeError(f'{where}: word {w!r} of {t!r} is missing from the toy vocabulary')


def _write_world(out: str, prefix: str, args: dict) -> dict:
    """Generate everything into the (empty) folder `out`; `prefix` is the --out spelling used in the
    pretraining image paths. Returns the counts for the summary."""
    seed, side = args['seed'], args['image_size']
    os.makedirs(os.path.join(out, 'images'))
    os.makedirs(os.path.join(out, 'vocab'))
    os.makedirs(os.path.join(out, 'refcoco+'))

    n_pool = {p: args[f'{p}_images'] for p in POOLS}
    worlds = []
    idx = 0
    for pool in POOLS:
        for _ in range(n_pool[pool]):
            rng = np.random.default_rng([seed, _IMG, idx])
            objs = _sample_objects(rng, side)
            pixels, bg = _render(rng, side, objs)
            name = f'toy_{idx:06d}.jpg'
            Image.fromarray(pixels).save(os.path.join(out, 'images', name), quality=95)
            worlds.append({'image_id': idx, 'file': name, 'split': pool, 'objs': objs, 'background': bg})
            idx += 1
    by_pool = {p: [w for w in worlds if w['split'] == p] for p in POOLS}

    with open(os.path.join(out, 'vocab', 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(VOCAB) + '\n')

    _dump_json(os.path.join(out, 'world.json'), [
        {'image_id': w['image_id'], 'file': w['file'], 'split': w['split'], 'size': [side, side],
         'background': w['background'],
         'objects': [{'shape': o.shape, 'colour': o.colour, 'size': o.size, 'box': list(o.box)} for o in w['objs']]}
        for w in worlds])

    counts: dict = {'images': {p: n_pool[p] for p in POOLS}}

    # --- captions: pretraining and retrieval -------------------------------------------------------------
    caps = {w['image_id']: _captions(np.random.default_rng([seed, _CAP, w['image_id']]), w['objs'],
                                     args['captions_per_image']) for w in worlds}
    _check_vocab((c for cs in caps.values() for c in cs), 'captions')
    img_path = lambda w: os.path.join(prefix, 'images', w['file'])  # noqa: E731 (pretraining opens it as is)
    _dump_json(os.path.join(out, 'pretrain.json'),
               [{'image': img_path(w), 'caption': caps[w['image_id']]} for w in by_pool['train']])
    _dump_json(os.path.join(out, 'nlvr_pretrain.json'),
               [{'image': img_path(w), 'caption': caps[w['image_id']][0]} for w in by_pool['train']])
    _dump_json(os.path.join(out, 'retrieval_train.json'),
               [{'image': w['file'], 'caption': c, 'image_id': w['image_id']}
                for w in by_pool['train'] for c in caps[w['image_id']]])
    for pool in ('val', 'test'):
        _dump_json(os.path.join(out, f'retrieval_{pool}.json'),
                   [{'image': w['file'], 'caption': caps[w['image_id']]} for w in by_pool[pool]])
    counts['pretrain'] = {'train': n_pool['train']}
    counts['nlvr_pretrain'] = {'train': n_pool['train']}
    counts['retrieval'] = {p: n_pool[p] * args['captions_per_image'] for p in POOLS}

    # --- VQA -----------------------------------------------------------------------------------------------
    vqa = {}
    qid = 0
    for pool in ('train', 'test'):
        items = []
        for w in by_pool[pool]:
            rng = np.random.default_rng([seed, _VQA, w['image_id']])
            for q, a, qtype, atype in _vqa_for_image(rng, w['objs'], args['vqa_per_image']):
                items.append({'question_id': qid, 'question': q, 'answer': _human_answers(rng, a, atype),
                              'image': w['file'], 'dataset': 'vqa', '_truth': a, '_qtype': qtype,
                              '_atype': atype, '_image_id': w['image_id']})
                qid += 1
        vqa[pool] = items
    _check_vocab((it['question'] for p in vqa.values() for it in p), 'VQA questions')
    _check_vocab((a for p in vqa.values() for it in p for a in it['answer']), 'VQA answers')
    public = ('question_id', 'question', 'answer', 'image', 'dataset')
    for pool in ('train', 'test'):
        _dump_json(os.path.join(out, f'vqa_{pool}.json'), [{k: it[k] for k in public} for it in vqa[pool]])
    freq = Counter(a for p in ('train', 'test') for it in vqa[p] for a in it['answer'])
    answer_list = sorted(freq, key=lambda a: (-freq[a], a))
    _dump_json(os.path.join(out, 'answer_list.json'), answer_list)
    header = {'info': {'description': 'toy world VQA (synthetic)', 'version': str(FORMAT_VERSION)},
              'task_type': 'Open-Ended', 'data_type': 'toyworld', 'data_subtype': 'test',
              'license': {'name': 'synthetic data, no restrictions', 'url': ''}}
    _dump_json(os.path.join(out, 'vqa_test_questions.json'), dict(header, questions=[
        {'question_id': it['question_id'], 'image_id': it['_image_id'], 'question': it['question']}
        for it in vqa['test']]))
    _dump_json(os.path.join(out, 'vqa_test_annotations.json'), dict(header, annotations=[
        {'question_id': it['question_id'], 'image_id': it['_image_id'], 'question_type': it['_qtype'],
         'answer_type': it['_atype'], 'multiple_choice_answer': Counter(it['answer']).most_common(1)[0][0],
         'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': k + 1}
                     for k, a in enumerate(it['answer'])]}
        for it in vqa['test']]))
    counts['vqa'] = {'train': len(vqa['train']), 'test': len(vqa['test'])}
    counts['vqa_answers'] = len(answer_list)

    # --- NLVR2 ---------------------------------------------------------------------------------------------
    counts['nlvr'] = {}
    for code, (pool, name) in enumerate((('train', 'train'), ('val', 'dev'), ('test', 'test'))):
        items = _nlvr_split(np.random.default_rng([seed, _NLVR, code]), by_pool[pool],
                            args['nlvr_per_image'] * n_pool[pool])
        _check_vocab((it['sentence'] for it in items), 'NLVR statements')
        _dump_json(os.path.join(out, f'nlvr_{name}.json'), items)
        counts['nlvr'][pool] = len(items)
        counts.setdefault('nlvr_true', 0)
        counts['nlvr_true'] += sum(it['label'] == 'True' for it in items)

    # --- SNLI-VE -------------------------------------------------------------------------------------------
    counts['ve'] = {}
    label_counts = Counter()
    k = args['ve_per_image']
    for pool, name in (('train', 'train'), ('val', 'dev'), ('test', 'test')):
        items = []
        for n, w in enumerate(by_pool[pool]):
            labels = [VE_LABELS[(n * k + j) % 3] for j in range(k)]  # exact balance over the split
            rng = np.random.default_rng([seed, _VE, w['image_id']])
            for sentence, label in _ve_for_image(rng, w['objs'], labels):
                items.append({'image': os.path.splitext(w['file'])[0], 'sentence': sentence, 'label': label})
        _check_vocab((it['sentence'] for it in items), 'VE hypotheses')
        _dump_json(os.path.join(out, f've_{name}.json'), items)
        counts['ve'][pool] = len(items)
        label_counts.update(it['label'] for it in items)
    counts['ve_labels'] = {lab: label_counts[lab] for lab in VE_LABELS}

    # --- RefCOCO+ ------------------------------------------------------------------------------------------
    refs, images, anns, dets, cocos = [], [], [], {}, {}
    ref_items = {'train': [], 'val': [], 'test': []}
    split_refs = Counter()
    n_sents = Counter()
    sent_id = 0
    for w in worlds:
        rng = np.random.default_rng([seed, _REF, w['image_id']])
        objs = w['objs']
        order = [int(i) for i in rng.permutation(len(objs))]
        made = []
        for i in order:
            if len(made) == args['refs_per_image']:
                break
            sents = _ref_expressions(rng, objs[i], objs, int(rng.integers(1, 4)))
            if sents:
                made.append((i, sents))
        if not made:
            continue
        image_id = w['image_id']
        images.append({'id': image_id, 'file_name': w['file'], 'height': side, 'width': side})
        for i, o in enumerate(objs):
            x, y, bw, bh = o.box
            anns.append({'id': image_id * 10 + i, 'image_id': image_id, 'category_id': CATEGORY_ID[o.shape],
                         'bbox': list(o.box), 'area': bw * bh, 'iscrowd': 0,
                         'segmentation': [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
        drng = np.random.default_rng([seed, _DET, image_id])
        boxes = [list(o.box) for o in objs] + _distractors(drng, objs, side)
        dets[str(image_id)] = [boxes[k] for k in drng.permutation(len(boxes))]
        cocos[str(image_id)] = [list(o.box) + [CATEGORY_ID[o.shape]] for o in objs]
        for i, sents in made:
            o = objs[i]
            if w['split'] == 'test':
                split = 'testA' if o.size == 'big' else 'testB'
            else:
                split = w['split']
            ref_id = len(refs)
            sentences = []
            for s in sents:
                raw = _finish(rng, s)
                sentences.append({'tokens': s.split(), 'raw': raw, 'sent_id': sent_id, 'sent': s})
                item = {'image': w['file'], 'text': raw}
                if w['split'] != 'train':
                    item['ref_id'] = ref_id
                ref_items[w['split']].append(item)
                sent_id += 1
            refs.append({'sent_ids': [s['sent_id'] for s in sentences], 'file_name': w['file'],
                         'ann_id': image_id * 10 + i, 'ref_id': ref_id, 'image_id': image_id, 'split': split,
                         'sentences': sentences, 'category_id': CATEGORY_ID[o.shape]})
            split_refs[split] += 1
            n_sents[split] += len(sentences)
    _check_vocab((it['text'] for p in ref_items.values() for it in p), 'referring expressions')
    for pool in POOLS:
        _dump_json(os.path.join(out, f'refcoco+_{pool}.json'), ref_items[pool])
    with open(os.path.join(out, 'refcoco+', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    _dump_json(os.path.join(out, 'refcoco+', 'instances.json'), {
        'info': {'description': 'toy world RefCOCO+ (synthetic)'}, 'images': images, 'annotations': anns,
        'categories': [{'id': CATEGORY_ID[s], 'name': s, 'supercategory': 'shape'} for s in SHAPES]})
    _dump_json(os.path.join(out, 'refcoco+', 'dets.json'), dets)
    _dump_json(os.path.join(out, 'refcoco+', 'cocos.json'), cocos)
    counts['grounding_refs'] = {s: split_refs[s] for s in ('train', 'val', 'testA', 'testB')}
    counts['grounding_sents'] = {s: n_sents[s] for s in ('train', 'val', 'testA', 'testB')}
    return counts


ANNOTATION_FILES = (
    'vocab/vocab.txt', 'world.json', 'pretrain.json', 'nlvr_pretrain.json', 'retrieval_train.json',
    'retrieval_val.json', 'retrieval_test.json', 'vqa_train.json', 'vqa_test.json', 'answer_list.json',
    'vqa_test_questions.json', 'vqa_test_annotations.json', 'nlvr_train.json', 'nlvr_dev.json', 'nlvr_test.json',
    've_train.json', 've_dev.json', 've_test.json', 'refcoco+_train.json', 'refcoco+_val.json',
    'refcoco+_test.json', 'refcoco+/refs(unc).p', 'refcoco+/instances.json', 'refcoco+/dets.json',
    'refcoco+/cocos.json',
)


def _caption_key(text: str) -> str:
    return text.lower().rstrip('.').strip()


def retrieval_ceiling(out: str, split: str = 'test', draws: int = 3000, seed: int = 0) -> dict:
    """Best expected R@1 any model can reach on the retrieval `split` of the toy world at `out`.

    Many toy captions are true of more than one image ("three shapes on a plain background"); a caption true of
    m gallery images is retrieved at rank 1 with probability 1/m at best (the images are indistinguishable from
    it). Which images a caption is true of is found by sampling each image's caption templates `draws` times
    (the set of strings the generator can say about it; 2000 and 6000 draws give the same numbers on the
    default world), so the result is an upper bound. Returns percentages {'img_r1', 'txt_r1'} under the
    Retrieval.py names' meaning (img_r1: text -> image, txt_r1: image -> text, best own-or-other caption),
    'shared_captions' (captions true of more than one image), and the counts.
    """
    if split not in ('val', 'test'):
        raise ToyWorldError(f"retrieval ceiling: split must be 'val' or 'test', got {split!r}")
    images = [w for w in read_world(out) if w['split'] == split]
    with open(os.path.join(out, f'retrieval_{split}.json'), encoding='utf-8') as f:
        items = json.load(f)
    true_of: dict = {}          # caption key -> the images the templates can say it about
    for i, w in enumerate(images):
        objs = [Obj(o['shape'], o['colour'], o['size'], tuple(o['box'])) for o in w['objects']]
        rng = np.random.default_rng([seed, _CEILING, w['image_id']])
        for key in {_caption_key(_caption(rng, objs)) for _ in range(draws)}:
            true_of.setdefault(key, set()).add(i)
    index = {w['file']: i for i, w in enumerate(images)}
    true_of_count = []          # per gallery caption: how many images it is true of
    best_for_image = [0.0] * len(images)
    for item in items:
        own = index[item['image']]
        for text in item['caption']:
            key = _caption_key(text)
            holders = true_of.get(key, set()) | {own}
            true_of_count.append(len(holders))
            for i in holders:
                best_for_image[i] = max(best_for_image[i], 1.0 / len(holders))
    counts = np.array(true_of_count, dtype=float)
    return {'split': split, 'images': len(images), 'captions': int(counts.size),
            'img_r1': float(100.0 * np.mean(1.0 / counts)), 'txt_r1': float(100.0 * np.mean(best_for_image)),
            'shared_captions': float(100.0 * np.mean(counts > 1))}


def grounding_match_bound(out: str) -> dict:
    """Grounding accuracy (%) per split when the named object is found exactly whenever the expression singles it
    out by its attributes, and among look-alikes at chance when it singles it out by position.

    Weakly supervised grounding learns from whether an expression matches an image. "The leftmost triangle" matches
    every image with two or more triangles, whichever one is meant, so that signal never says which one; a map
    drawn from a match score has no reason to prefer it over its look-alikes. This is the accuracy such a map gets
    with perfect boxes and perfect attribute grounding; a model can exceed it only by learning what left and right
    mean from elsewhere (the pretraining captions). Returns {split: {'expressions', 'positional' (% of them),
    'bound'}} for val, testA and testB.
    """
    from refTools.refer import REFER  # its unpickler builds plain data only
    refs = REFER(out, 'refcoco+', 'unc').Refs.values()
    objects = {w['image_id']: w['objects'] for w in read_world(out)}
    sizes = {syn: size for size, syns in SIZE_WORDS.items() for syn in syns}
    totals: dict = {}
    for ref in refs:
        if ref['split'] not in ('val', 'testA', 'testB'):
            continue
        t = totals.setdefault(ref['split'], {'expressions': 0, 'positional': 0, 'bound': 0.0})
        for sent in ref['sentences']:
            t['expressions'] += 1
            if not names_a_side(sent['sent']):
                t['bound'] += 1.0
                continue
            words = sent['sent'].lower().split()
            look_alikes = [o for o in objects[ref['image_id']]
                           if all(o['colour'] == w for w in words if w in COLOUR_NAMES)
                           and all(o['shape'] == w for w in words if w in SHAPES)
                           and all(o['size'] == sizes[w] for w in words if w in sizes)]
            t['positional'] += 1
            t['bound'] += 1.0 / max(1, len(look_alikes))
    return {split: {'expressions': t['expressions'], 'positional': 100.0 * t['positional'] / t['expressions'],
                    'bound': 100.0 * t['bound'] / t['expressions']}
            for split, t in sorted(totals.items(), key=lambda kv: ('val', 'testA', 'testB').index(kv[0]))}


def read_world(world_dir: str) -> list:
    """The world.json entries of a toy world: per image its file, split, size and objects (shape, colour, size,
    box)."""
    path = os.path.join(world_dir, 'world.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: not found; is {world_dir} a toy world (python -m dataset.toyworld)?')
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def read_manifest(out: str):
    """The manifest of an existing toy world, or None when `out` holds no (readable) toy world."""
    path = os.path.join(out, 'manifest.json')
    try:
        with open(path, encoding='utf-8') as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get('generator') != GENERATOR or not isinstance(m.get('args'), dict):
        return None
    return m


def _verify(out: str, manifest: dict) -> str | None:
    """Name of the first file of the world that is missing or changed, else None."""
    for rel, digest in manifest.get('files', {}).items():
        path = os.path.join(out, rel)
        if not os.path.isfile(path) or _sha256(path) != digest:
            return rel
    n_images = sum(manifest['args'].get(f'{p}_images', 0) for p in POOLS)
    images = os.path.join(out, 'images')
    if not os.path.isdir(images) or len(os.listdir(images)) != n_images:
        return 'images/'
    return None


def format_summary(out: str, manifest: dict) -> str:
    """The summary table (counts per split and task) of a generated world."""
    a, c = manifest['args'], manifest['counts']
    g, gs = c['grounding_refs'], c['grounding_sents']
    total_nlvr = sum(c['nlvr'].values())
    ve = c['ve_labels']
    n_ve = sum(ve.values()) or 1
    rows = [
        ('images', 'image', c['images']['train'], c['images']['val'], c['images']['test'],
         f"{a['image_size']}x{a['image_size']} px, 1-4 objects"),
        ('pretrain', 'image', c['pretrain']['train'], '-', '-', f"{a['captions_per_image']} captions each"),
        ('nlvr_pretrain', 'image', c['nlvr_pretrain']['train'], '-', '-', '1 caption each'),
        ('retrieval', 'caption', c['retrieval']['train'], c['retrieval']['val'], c['retrieval']['test'],
         f"{a['captions_per_image']} per image"),
        ('vqa', 'question', c['vqa']['train'], '-', c['vqa']['test'], f"{c['vqa_answers']} answers in answer_list"),
        ('nlvr', 'statement', c['nlvr']['train'], c['nlvr']['val'], c['nlvr']['test'],
         f"True {100.0 * c['nlvr_true'] / max(total_nlvr, 1):.1f}%"),
        ('ve', 'hypothesis', c['ve']['train'], c['ve']['val'], c['ve']['test'],
         'E/N/C ' + '/'.join(f'{100.0 * ve[k] / n_ve:.1f}' for k in VE_LABELS) + '%'),
        ('grounding', 'ref', g['train'], g['val'], g['testA'] + g['testB'],
         f"test = testA {g['testA']} (big) + testB {g['testB']} (small)"),
        ('grounding', 'sentence', gs['train'], gs['val'], gs['testA'] + gs['testB'], ''),
    ]
    head = ('task', 'unit', 'train', 'val', 'test', 'notes')
    lines = [f"toy world at {out}: seed {a['seed']}, vocab {manifest['vocab_size']} tokens",
             f'{head[0]:<14}{head[1]:<11}{head[2]:>7}{head[3]:>7}{head[4]:>7}  {head[5]}']
    for r in rows:
        lines.append(f'{r[0]:<14}{r[1]:<11}{r[2]!s:>7}{r[3]!s:>7}{r[4]!s:>7}  {r[5]}'.rstrip())
    return '\n'.join(lines)


def generate(out: str, force: bool = False, verbose: bool = True, **kwargs) -> dict:
    """Write a toy world to `out` (see the module docstring) and return its manifest.

    Keyword arguments are the DEFAULTS keys (seed, image_size, train_images, ...). An existing world made with
    the same arguments is reused (unless `force`); anything else already in `out` raises ToyWorldError and is
    left untouched (`force` replaces a toy world made with other arguments, never foreign data).
    """
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise ToyWorldError(f'unknown toy world argument {sorted(unknown)[0]!r}')
    args = dict(DEFAULTS, **kwargs)
    _check_args(args)
    out_norm = os.path.normpath(out)

    if os.path.lexists(out_norm) and not os.path.isdir(out_norm):
        raise ToyWorldError(f'--out {out}: exists and is not a directory; refusing to touch it')
    if os.path.isdir(out_norm) and os.listdir(out_norm):
        manifest = read_manifest(out_norm)
        if manifest is None:
            first = sorted(os.listdir(out_norm))[0]
            raise ToyWorldError(f"--out {out}: not empty and not a toy world (holds '{first}'); refusing to "
                                f'overwrite it, choose another --out')
        old = dict(manifest['args'])
        if manifest.get('format_version') != FORMAT_VERSION:
            diff = 'format version'
            detail = f"format version {manifest.get('format_version')} (this generator writes {FORMAT_VERSION})"
        else:
            diff = next((k for k in DEFAULTS if old.get(k) != args[k]), None)
            detail = f'{FLAG[diff]} {old.get(diff)} (asked for {args[diff]})' if diff else ''
        if diff and not force:
            raise ToyWorldError(f'--out {out}: holds a toy world made with {detail}; choose another --out, '
                                f'delete it, or pass --force to replace it')
        if not diff and not force:
            bad = _verify(out_norm, manifest)
            if bad is not None:
                raise ToyWorldError(f'--out {out}: toy world is incomplete or modified ({bad}); pass --force '
                                    f'to regenerate it')
            if verbose:
                print(f'{out}: up to date (same arguments), nothing regenerated; pass --force to regenerate')
                print(format_summary(out, manifest))
            return manifest

    parent = os.path.dirname(os.path.abspath(out_norm))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f'.{os.path.basename(os.path.abspath(out_norm))}.tmp-{os.getpid()}')
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    start = time.perf_counter()
    try:
        counts = _write_world(tmp, out_norm, args)
        manifest = {'generator': GENERATOR, 'format_version': FORMAT_VERSION, 'args': args,
                    'vocab_size': VOCAB_SIZE, 'image_prefix': os.path.join(out_norm, 'images'),
                    'counts': counts, 'files': {rel: _sha256(os.path.join(tmp, rel)) for rel in ANNOTATION_FILES}}
        _dump_json(os.path.join(tmp, 'manifest.json'), manifest)
        # Swap into place only now: an interrupted run leaves --out as it was.
        if os.path.isdir(out_norm):
            if os.listdir(out_norm):
                old_dir = tmp + '.old'
                os.rename(out_norm, old_dir)
                os.rename(tmp, out_norm)
                shutil.rmtree(old_dir)
            else:
                os.rmdir(out_norm)
                os.rename(tmp, out_norm)
        else:
            os.rename(tmp, out_norm)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if verbose:
        print(format_summary(out, manifest))
        print(f'generated in {time.perf_counter() - start:.1f} s')
    return manifest


def build_parser() -> argparse.ArgumentParser:
    """The command line: --out, --seed, one flag per size (dashes or underscores), --force, --debug."""
    p = argparse.ArgumentParser(prog='python -m dataset.toyworld',
                                description='Write the synthetic toy world (images + annotations of every task).')
    p.add_argument('--out', default='data/toyworld', help='output folder (default data/toyworld)')
    helps = {
        'seed': 'random seed (same seed and sizes => byte-identical files)',
        'image_size': 'image side in pixels',
        'train_images': 'images in the train pool', 'val_images': 'images in the val pool',
        'test_images': 'images in the test pool',
        'captions_per_image': 'captions per image (pretraining, retrieval)',
        'vqa_per_image': 'VQA questions per image (train and test pools)',
        'nlvr_per_image': 'NLVR statements per pool image', 've_per_image': 'SNLI-VE hypotheses per image',
        'refs_per_image': 'at most this many RefCOCO+ refs per image',
    }
    for key, default in DEFAULTS.items():
        names = [FLAG[key]] + (['--' + key] if '_' in key else [])
        p.add_argument(*names, dest=key, type=int, default=default, help=f'{helps[key]} (default {default})')
    p.add_argument('--force', action='store_true',
                   help='regenerate even if --out holds this world, or replace a toy world made with other arguments')
    p.add_argument('--ceiling', action='store_true',
                   help='print the best R@1 any model can reach on the retrieval val/test splits of --out (many '
                        'captions are true of several images) and what a match-score map can reach on grounding, '
                        'instead of generating')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 with a one-line message for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    try:
        if ns.ceiling:
            if read_manifest(ns.out) is None:
                raise ToyWorldError(f'--out {ns.out}: not a toy world; generate it first')
            for split in ('val', 'test'):
                c = retrieval_ceiling(ns.out, split)
                print(f"{ns.out} retrieval {split}: {c['images']} images, {c['captions']} captions, "
                      f"{c['shared_captions']:.1f}% true of more than one image; best possible "
                      f"txt_r1 {c['txt_r1']:.1f}%, img_r1 {c['img_r1']:.1f}%")
            for split, g in grounding_match_bound(ns.out).items():
                print(f"{ns.out} grounding {split}: {g['expressions']} expressions, {g['positional']:.1f}% name "
                      f"the object by position among look-alikes; exact on the others and guessing among the "
                      f"look-alikes gives {g['bound']:.1f}%")
        else:
            generate(ns.out, force=ns.force, **{k: getattr(ns, k) for k in DEFAULTS})
    except ToyWorldError as e:
        if ns.debug:
            raise
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
