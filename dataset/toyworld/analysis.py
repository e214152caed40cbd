"""Reading a toy world back: the kind of a VQA question or NLVR2 statement (from the templates that made it), and
the best scores any model can reach on retrieval and weakly supervised grounding."""
from __future__ import annotations

import json
import os
import re

import numpy as np

from dataset.toyworld import streams
from dataset.toyworld.captions import caption
from dataset.toyworld.scene import COLOUR_NAMES, SHAPES, Obj
from dataset.toyworld.text import SIDE_WORDS, SIZE_WORDS
from dataset.toyworld.world import ToyWorldError, read_world

VQA_QUESTION_KINDS = ('colour', 'shape', 'size', 'count', 'exist', 'relation', 'side')


def names_a_side(text: str) -> bool:
    """Whether a toy text says left, right, leftmost or rightmost (as a whole word, any case or punctuation)."""
    return not set(re.findall(r'[a-z]+', text.lower())).isdisjoint(SIDE_WORDS)


def vqa_question_kind(question: str) -> str:
    """The kind of a toy VQA question, read back from the templates of dataset/toyworld/vqa.py.

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


# What each of the NLVR2 templates (dataset/toyworld/nlvr.py) asks, by template number. The first four and 'total'
# can be told from one image at a time (or a sum); 'more / fewer' and 'same number' compare the two images.
NLVR_STATEMENT_KINDS = ('count in one image', 'in both', 'in neither', 'only in one', 'more / fewer', 'same number',
                        'total', 'relation', 'leftmost / rightmost')


def nlvr_statement_kind(sentence: str) -> str:
    """The kind (one of NLVR_STATEMENT_KINDS) of a toy NLVR2 statement, read back from the
    templates of dataset/toyworld/nlvr.py. Raises ValueError on text no template makes."""
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
        rng = streams.stream(seed, streams.CEILING, w['image_id'])
        for key in {_caption_key(caption(rng, objs)) for _ in range(draws)}:
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

