"""Tests of the toy-world generator (the dataset/toyworld package): annotation formats, determinism, splits, label
balance, geometry, decidability of the text from the ground truth, vocabulary coverage, refusal of foreign --out."""
import glob
import json
import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dataset import toyworld as tw
from dataset.toyworld.refcoco import iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(image_size=64, train_images=30, val_images=10, test_images=10, captions_per_image=5,
             vqa_per_image=4, nlvr_per_image=2, ve_per_image=3, refs_per_image=2)
SMALL_FLAGS = ['--image-size', '64', '--train-images', '30', '--val-images', '10', '--test-images', '10']


def _load(root, name):
    with open(os.path.join(root, name), encoding='utf-8') as f:
        return json.load(f)


def _tree_bytes(root):
    out = {}
    for path in sorted(glob.glob(os.path.join(root, '**', '*'), recursive=True)):
        if os.path.isfile(path) and os.path.basename(path) != 'manifest.json':
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope='module')
def worlds(tmp_path_factory):
    """The same small world generated twice (same relative --out, different cwd) and once with another seed."""
    base = tmp_path_factory.mktemp('toyworld')
    cwd = os.getcwd()
    roots = {}
    try:
        for name, seed in (('a', 0), ('b', 0), ('c', 1)):
            os.makedirs(base / name)
            os.chdir(base / name)
            tw.generate('world', seed=seed, verbose=False, **SMALL)
            roots[name] = str(base / name / 'world')
    finally:
        os.chdir(cwd)
    return roots


@pytest.fixture(scope='module')
def world(worlds):
    return worlds['a']


# ------------------------------------------------------------------------------------------------------------
def test_deterministic_for_a_seed(worlds):
    a, b, c = (_tree_bytes(worlds[k]) for k in 'abc')
    assert set(a) == set(b)
    assert len([k for k in a if k.startswith('images')]) == 50
    for rel in tw.ANNOTATION_FILES:
        assert rel in a, rel
    assert [k for k in a if a[k] != b[k]] == []  # byte-identical, images included
    assert a['world.json'] != c['world.json'] and a['vqa_train.json'] != c['vqa_train.json']
    assert a['vocab/vocab.txt'] == c['vocab/vocab.txt']  # the vocabulary does not depend on the seed


def test_text_flags_leave_images_and_other_tasks_alone(tmp_path):
    tw.generate(str(tmp_path / 'x'), verbose=False, **SMALL)
    tw.generate(str(tmp_path / 'y'), verbose=False, **dict(SMALL, vqa_per_image=2))
    x, y = _tree_bytes(str(tmp_path / 'x')), _tree_bytes(str(tmp_path / 'y'))
    assert all(x[k] == y[k] for k in x if k.startswith('images'))
    assert x['ve_train.json'] == y['ve_train.json'] and x['vqa_train.json'] != y['vqa_train.json']


def test_formats_follow_spec_4_2(world):
    files = {os.path.basename(p) for p in glob.glob(os.path.join(world, 'images', '*'))}
    assert all(f.endswith('.jpg') for f in files)
    im = Image.open(os.path.join(world, 'images', sorted(files)[0]))
    assert im.format == 'JPEG' and im.mode == 'RGB' and im.size == (64, 64)

    for name in ('pretrain.json', 'nlvr_pretrain.json'):
        for it in _load(world, name):
            assert set(it) == {'image', 'caption'}
            assert it['image'] == os.path.join('world', 'images', os.path.basename(it['image']))
            assert os.path.basename(it['image']) in files
            cap = it['caption']
            assert (isinstance(cap, list) and len(cap) == 5 and all(isinstance(c, str) for c in cap)
                    if name == 'pretrain.json' else isinstance(cap, str))
    for it in _load(world, 'retrieval_train.json'):
        assert set(it) == {'image', 'caption', 'image_id'} and it['image'] in files
        assert isinstance(it['caption'], str) and isinstance(it['image_id'], int)
    for split in ('val', 'test'):
        items = _load(world, f'retrieval_{split}.json')
        assert len(items) == 10
        for it in items:
            assert set(it) == {'image', 'caption'} and it['image'] in files and len(it['caption']) == 5

    answer_list = _load(world, 'answer_list.json')
    assert all(isinstance(a, str) for a in answer_list) and len(set(answer_list)) == len(answer_list)
    qids = []
    for split in ('train', 'test'):
        for it in _load(world, f'vqa_{split}.json'):
            assert set(it) == {'question_id', 'question', 'answer', 'image', 'dataset'}
            assert it['dataset'] == 'vqa' and it['image'] in files and isinstance(it['question_id'], int)
            assert len(it['answer']) == 10 and set(it['answer']) <= set(answer_list)
            qids.append(it['question_id'])
    assert len(set(qids)) == len(qids)
    test = _load(world, 'vqa_test.json')
    ques, anns = _load(world, 'vqa_test_questions.json'), _load(world, 'vqa_test_annotations.json')
    for d in (ques, anns):
        assert {'info', 'task_type', 'data_type', 'data_subtype', 'license'} <= set(d)
    assert [q['question_id'] for q in ques['questions']] == [t['question_id'] for t in test]
    assert all(set(q) == {'question_id', 'image_id', 'question'} for q in ques['questions'])
    for a, t in zip(anns['annotations'], test):
        assert a['question_id'] == t['question_id'] and a['answer_type'] in ('yes/no', 'number', 'other')
        assert [x['answer'] for x in a['answers']] == t['answer']
        assert [x['answer_id'] for x in a['answers']] == list(range(1, 11))
        assert all(x['answer_confidence'] == 'yes' for x in a['answers'])
        assert a['multiple_choice_answer'] == Counter(t['answer']).most_common(1)[0][0]
        assert isinstance(a['question_type'], str) and isinstance(a['image_id'], int)

    for split in ('train', 'dev', 'test'):
        for it in _load(world, f'nlvr_{split}.json'):
            assert set(it) == {'images', 'sentence', 'label'} and it['label'] in ('True', 'False')
            assert len(it['images']) == 2 and set(it['images']) <= files
        for it in _load(world, f've_{split}.json'):
            assert set(it) == {'image', 'sentence', 'label'}
            assert it['image'] + '.jpg' in files and it['label'] in tw.VE_LABELS

    for it in _load(world, 'refcoco+_train.json'):
        assert set(it) == {'image', 'text'} and it['image'] in files
    for split in ('val', 'test'):
        for it in _load(world, f'refcoco+_{split}.json'):
            assert set(it) == {'image', 'text', 'ref_id'} and isinstance(it['ref_id'], int)


def test_refer_files(world):
    with open(os.path.join(world, 'refcoco+', 'refs(unc).p'), 'rb') as f:
        refs = pickle.load(f)
    inst = _load(world, 'refcoco+/instances.json')
    dets = _load(world, 'refcoco+/dets.json')
    cocos = _load(world, 'refcoco+/cocos.json')
    imgs = {im['id']: im for im in inst['images']}
    anns = {a['id']: a for a in inst['annotations']}
    assert {c['name'] for c in inst['categories']} == set(tw.SHAPES)
    assert set(dets) == set(cocos) == {str(i) for i in imgs}
    assert {r['split'] for r in refs} == {'train', 'val', 'testA', 'testB'}
    sent_ids = [s['sent_id'] for r in refs for s in r['sentences']]
    assert len(set(sent_ids)) == len(sent_ids) and len({r['ref_id'] for r in refs}) == len(refs)
    for r in refs:
        assert {'ref_id', 'ann_id', 'image_id', 'category_id', 'split', 'sentences', 'file_name'} <= set(r)
        ann = anns[r['ann_id']]
        assert ann['image_id'] == r['image_id'] and ann['category_id'] == r['category_id']
        assert imgs[r['image_id']]['file_name'] == r['file_name']
        for s in r['sentences']:
            assert {'sent_id', 'sent', 'raw', 'tokens'} <= set(s) and s['tokens'] == s['sent'].split()
        # every ground-truth box is among the proposals, so grounding can be solved exactly
        assert ann['bbox'] in dets[str(r['image_id'])]
        # testA = refs to big objects, testB = small ones
        if r['split'].startswith('test'):
            assert (ann['bbox'][2] > 0.24 * imgs[r['image_id']]['width']) == (r['split'] == 'testA')
    by_ref = {r['ref_id']: r for r in refs}
    for split, want in (('val', {'val'}), ('test', {'testA', 'testB'})):
        items = _load(world, f'refcoco+_{split}.json')
        assert {by_ref[it['ref_id']]['split'] for it in items} == want
    for image_id, boxes in dets.items():
        side = imgs[int(image_id)]['width']
        gts = [a['bbox'] for a in inst['annotations'] if a['image_id'] == int(image_id)]
        assert len(boxes) > len(gts)  # distractors present
        for b in boxes:
            assert b[0] >= 0 and b[1] >= 0 and b[0] + b[2] <= side and b[1] + b[3] <= side
            if b not in gts:
                assert all(iou(b, g) < 0.5 for g in gts)


def test_splits_disjoint(world):
    pools = {w['split']: set() for w in _load(world, 'world.json')}
    for w in _load(world, 'world.json'):
        pools[w['split']].add(w['file'])
    assert [len(pools[p]) for p in ('train', 'val', 'test')] == [30, 10, 10]
    assert {os.path.basename(it['image']) for it in _load(world, 'pretrain.json')} == pools['train']
    assert {it['image'] for it in _load(world, 'retrieval_train.json')} == pools['train']
    assert {it['image'] for it in _load(world, 'retrieval_val.json')} == pools['val']
    assert {it['image'] for it in _load(world, 'retrieval_test.json')} == pools['test']
    assert {it['image'] for it in _load(world, 'vqa_train.json')} <= pools['train']
    assert {it['image'] for it in _load(world, 'vqa_test.json')} <= pools['test']
    for split, pool in (('train', 'train'), ('dev', 'val'), ('test', 'test')):
        assert {f for it in _load(world, f'nlvr_{split}.json') for f in it['images']} <= pools[pool]
        assert {it['image'] + '.jpg' for it in _load(world, f've_{split}.json')} <= pools[pool]
    for split, pool in (('train', 'train'), ('val', 'val'), ('test', 'test')):
        assert {it['image'] for it in _load(world, f'refcoco+_{split}.json')} <= pools[pool]


def test_label_balance(world):
    for split in ('train', 'dev', 'test'):
        labels = Counter(it['label'] for it in _load(world, f'nlvr_{split}.json'))
        assert abs(labels['True'] - labels['False']) <= tw.NLVR_TEMPLATES
        labels = Counter(it['label'] for it in _load(world, f've_{split}.json'))
        assert len(set(labels.values())) == 1 and set(labels) == set(tw.VE_LABELS)
    yesno = Counter(Counter(it['answer']).most_common(1)[0][0] for it in _load(world, 'vqa_train.json'))
    assert 0.3 < yesno['yes'] / (yesno['yes'] + yesno['no']) < 0.7
    # answer weights matter: some questions have disagreeing annotators
    assert any(len(set(it['answer'])) > 1 for it in _load(world, 'vqa_train.json'))


def test_geometry_and_pixels(world):
    nearest = lambda rgb: min(tw.COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(tw.COLOURS[c], rgb)))
    counts = Counter()
    for w in _load(world, 'world.json'):
        side = w['size'][0]
        objs = w['objects']
        assert 1 <= len(objs) <= 4 and w['size'] == [64, 64]
        counts[len(objs)] += 1
        pixels = np.asarray(Image.open(os.path.join(world, 'images', w['file'])).convert('RGB'), dtype=float)
        for i, o in enumerate(objs):
            x, y, bw, bh = o['box']
            assert x >= 0 and y >= 0 and x + bw <= side and y + bh <= side
            assert o['shape'] in tw.SHAPES and o['colour'] in tw.COLOURS and o['size'] in tw.SIZES
            for p in objs[i + 1:]:
                assert iou(o['box'], p['box']) == 0
                # centres well apart horizontally, so left/right is decidable
                assert abs((x + bw / 2) - (p['box'][0] + p['box'][2] / 2)) >= 0.1 * side
            cx, cy = x + bw // 2, y + bh // 2
            assert nearest(pixels[cy - 1:cy + 2, cx - 1:cx + 2].mean(axis=(0, 1))) == o['colour']
        assert [o['box'][0] + o['box'][2] / 2 for o in objs] == sorted(o['box'][0] + o['box'][2] / 2 for o in objs)
    assert len(counts) == 4  # 1, 2, 3 and 4 objects all occur


# --- the text is decided by the ground truth ----------------------------------------------------------------
_SIZE_WORD = {'small': 'small', 'little': 'small', 'big': 'big', 'large': 'big'}


def _parse_desc(words):
    d = {}
    for w in words:
        if w in _SIZE_WORD:
            d['size'] = _SIZE_WORD[w]
        elif w in tw.COLOURS:
            d['colour'] = w
        elif w.rstrip('s') in tw.SHAPES:
            d['shape'] = w.rstrip('s')
        else:
            assert w in ('object', 'objects', 'shape', 'shapes'), w
    return d


def _match(o, d):
    return all(o[k] == v for k, v in d.items())


def _clean(text):
    return text.lower().rstrip('.?').replace(',', '').split()


def test_vqa_counts_and_existence_match_the_world(world):
    objs = {w['file']: w['objects'] for w in _load(world, 'world.json')}
    checked = 0
    for it in _load(world, 'vqa_train.json') + _load(world, 'vqa_test.json'):
        words = _clean(it['question'])
        truth = Counter(it['answer']).most_common(1)[0][0]
        if words[:2] == ['how', 'many']:
            end = words.index('are') if 'are' in words else words.index('can')
            n = sum(_match(o, _parse_desc(words[2:end])) for o in objs[it['image']])
            assert truth == str(n), it
            checked += 1
        elif words[:2] in (['is', 'there'], ['are', 'there']):
            n = sum(_match(o, _parse_desc(words[3:])) for o in objs[it['image']])
            assert truth == ('yes' if n else 'no'), it
            checked += 1
    assert checked > 20


def test_nlvr_counts_match_the_world(world):
    objs = {w['file']: w['objects'] for w in _load(world, 'world.json')}
    checked = 0
    for split in ('train', 'dev', 'test'):
        for it in _load(world, f'nlvr_{split}.json'):
            words = _clean(it['sentence'])
            if words[0] == 'the' and words[2] == 'image' and words[3] in ('has', 'contains', 'shows'):
                rest = words[4:]
                rest = rest[1:] if rest[0] == 'exactly' else rest
                if rest[0] not in tw.NUMBER_WORDS:  # 'the left image has more ... than ...'
                    continue
                k = tw.NUMBER_WORDS.index(rest[0])
                image = it['images'][0 if words[1] == 'left' else 1]
                n = sum(_match(o, _parse_desc(rest[1:])) for o in objs[image])
                assert (n == k) == (it['label'] == 'True'), it
                checked += 1
    assert checked > 5


def test_nlvr_statement_kinds_recover_each_statements_template(worlds):
    # _nlvr_split makes item k from template k % 9 with labels alternating per round, so a reading that gives every
    # statement its template finds each kind within one item of the others, with both labels within one.
    for root in (worlds['a'], worlds['c']):
        for split in ('train', 'dev', 'test'):
            items = _load(root, f'nlvr_{split}.json')
            item_kinds = [tw.nlvr_statement_kind(it['sentence']) for it in items]
            kinds = Counter(item_kinds)
            assert set(kinds) == set(tw.NLVR_STATEMENT_KINDS), (split, kinds)
            assert max(kinds.values()) - min(kinds.values()) <= 1, (split, kinds)
            for kind in kinds:
                labels = Counter(it['label'] for it, k in zip(items, item_kinds) if k == kind)
                assert abs(labels['True'] - labels['False']) <= 1, (split, kind, labels)
    assert tw.nlvr_statement_kind('The left image has more red squares than the right image.') == 'more / fewer'
    assert tw.nlvr_statement_kind('the left image shows exactly two circles') == 'count in one image'
    with pytest.raises(ValueError, match='not a toy NLVR2 statement'):
        tw.nlvr_statement_kind('the sky is blue')


def _resolve(words, objs):
    """The object a definite description picks out ('the leftmost red circle', 'the square on the right'),
    None when nothing matches; asserts that it is unambiguous."""
    words = words[1:] if words and words[0] == 'the' else list(words)
    loc = None
    if words[0] in ('leftmost', 'rightmost', 'left', 'right'):
        loc, words = words[0].replace('most', ''), words[1:]
    elif words[-3:-1] == ['on', 'the']:
        loc, words = words[-1], words[:-3]
    group = [o for o in objs if _match(o, _parse_desc(words))]  # objects are stored left to right
    if not group:
        return None
    if loc is None:
        assert len(group) == 1, words
        return group[0]
    assert len(group) >= 2, words
    return group[0] if loc == 'left' else group[-1]


def _cx(o):
    return o['box'][0] + o['box'][2] / 2


def test_ve_labels_match_the_world(world):
    """entailment / contradiction: the described objects exist and the claim holds / fails; neutral: a described
    object is missing, so the claim cannot be decided."""
    objs = {w['file']: w['objects'] for w in _load(world, 'world.json')}
    seen = Counter()
    for split in ('train', 'dev', 'test'):
        for it in _load(world, f've_{split}.json'):
            sent = ' '.join(_clean(it['sentence']))
            image = objs[it['image'] + '.jpg']
            if ' is to the ' in sent:
                a, rest = sent.split(' is to the ')
                rel, b = rest.split(' of ', 1)
                oa, ob = _resolve(a.split(), image), _resolve(b.split(), image)
                truth = None if oa is None or ob is None else (_cx(oa) < _cx(ob)) == (rel == 'left')
            elif ' has the shape of ' in sent:
                ref, value = sent.split(' has the shape of ')
                o = _resolve(ref.split(), image)
                truth = None if o is None else o['shape'] == value.split()[-1]
            elif ' is colored ' in sent:
                ref, value = sent.split(' is colored ')
                o = _resolve(ref.split(), image)
                truth = None if o is None else o['colour'] == value
            else:
                ref, value = sent.rsplit(' is ', 1)
                o = _resolve(ref.split(), image)
                value = value.split()
                if o is None:
                    truth = None
                elif value[0] == 'the':  # 'is the leftmost object'
                    truth = o is (image[0] if value[1] == 'leftmost' else image[-1])
                elif value[-1] in tw.SHAPES:
                    truth = o['shape'] == value[-1]
                elif value[0] in tw.COLOURS:
                    truth = o['colour'] == value[0]
                else:
                    truth = o['size'] == _SIZE_WORD[value[0]]
            want = {None: 'neutral', True: 'entailment', False: 'contradiction'}[truth]
            assert it['label'] == want, it
            seen[want] += 1
    assert len(seen) == 3


def test_vqa_attribute_questions_match_the_world(world):
    objs = {w['file']: w['objects'] for w in _load(world, 'world.json')}
    checked = 0
    for it in _load(world, 'vqa_train.json') + _load(world, 'vqa_test.json'):
        q = ' '.join(_clean(it['question']))
        truth = Counter(it['answer']).most_common(1)[0][0]
        image = objs[it['image']]
        for prefix, attr in (('what color is ', 'colour'), ('what is the color of ', 'colour'),
                             ('what shape is ', 'shape'), ('what is the shape of ', 'shape'),
                             ('what size is ', 'size')):
            if q.startswith(prefix):
                assert _resolve(q[len(prefix):].split(), image)[attr] == truth, it
                checked += 1
        if ' to the left of ' in q or ' to the right of ' in q:
            a, rest = q[3:].split(' to the ')
            rel, b = rest.split(' of ', 1)
            oa, ob = _resolve(a.split(), image), _resolve(b.split(), image)
            assert ((_cx(oa) < _cx(ob)) == (rel == 'left')) == (truth == 'yes'), it
            checked += 1
    assert checked > 20


def test_vqa_question_kinds_cover_every_question_and_fit_its_answer(world):
    kinds = Counter()
    for it in _load(world, 'vqa_train.json') + _load(world, 'vqa_test.json'):
        kind = tw.vqa_question_kind(it['question'])
        truth = Counter(it['answer']).most_common(1)[0][0]
        kinds[kind] += 1
        expected = {'count': [str(n) for n in range(5)], 'exist': ['yes', 'no'],
                    'relation': ['yes', 'no'], 'side': ['left', 'right']}.get(kind)
        base = kind.replace(' by position', '')
        if base in ('colour', 'shape', 'size'):
            expected = {'colour': tw.COLOUR_NAMES, 'shape': tw.SHAPES, 'size': tw.SIZES}[base]
            assert (base != kind) == bool(set(_clean(it['question'])) & set(tw.SIDE_WORDS)), it
        assert truth in expected, (kind, it)
    assert {k.replace(' by position', '') for k in kinds} == set(tw.VQA_QUESTION_KINDS)
    with pytest.raises(ValueError, match='not a toy VQA question'):
        tw.vqa_question_kind('why is the sky blue?')


def test_referring_expressions_are_unique(world):
    with open(os.path.join(world, 'refcoco+', 'refs(unc).p'), 'rb') as f:
        refs = pickle.load(f)
    anns = {a['id']: a for a in _load(world, 'refcoco+/instances.json')['annotations']}
    objs = {w['image_id']: w['objects'] for w in _load(world, 'world.json')}
    for r in refs:
        for s in r['sentences']:
            words = _clean(s['sent'])
            words = words[1:] if words[0] == 'the' else words
            loc = None
            if words[0] in ('leftmost', 'rightmost', 'left', 'right'):
                loc, words = words[0].replace('most', ''), words[1:]
            elif words[-3:-1] == ['on', 'the']:
                loc, words = words[-1], words[:-3]
            d = _parse_desc(words)
            group = [o for o in objs[r['image_id']] if _match(o, d)]
            if loc is None:
                assert len(group) == 1, s
                target = group[0]
            else:
                assert len(group) >= 2, s
                target = group[0] if loc == 'left' else group[-1]  # objects are stored left to right
            assert target['box'] == anns[r['ann_id']]['bbox'], s


def test_vocab_covers_all_text_and_matches_config(world):
    from transformers import BertTokenizerFast
    tok = BertTokenizerFast.from_pretrained(os.path.join(world, 'vocab'), model_max_length=512)
    assert len(tok) == tw.VOCAB_SIZE
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == \
        (0, 1, 2, 3, 4)
    texts = []
    for it in _load(world, 'pretrain.json'):
        texts += it['caption']
    for name in ('vqa_train.json', 'vqa_test.json'):
        for it in _load(world, name):
            texts.append(it['question'])
            texts += [a + '[SEP]' for a in it['answer']]
    texts += [a + '[SEP]' for a in _load(world, 'answer_list.json')]
    for name in glob.glob(os.path.join(world, 'nlvr_*.json')) + glob.glob(os.path.join(world, 've_*.json')):
        texts += [it['sentence'] for it in _load(world, os.path.basename(name)) if 'sentence' in it]
    for name in glob.glob(os.path.join(world, 'refcoco+_*.json')):
        texts += [it['text'] for it in _load(world, os.path.basename(name))]
    ids = tok(texts, add_special_tokens=False).input_ids
    assert not any(tok.unk_token_id in x for x in ids)
    assert max(len(x) for x in ids) < 60  # fits the toy BERT's 64 positions
    with open(os.path.join(ROOT, 'configs', 'toy', 'config_bert_toy.json')) as f:
        cfg = json.load(f)
    assert cfg['vocab_size'] == tw.VOCAB_SIZE and cfg['pad_token_id'] == 0


def test_refuses_foreign_or_different_data(tmp_path):
    out = str(tmp_path / 'w')
    tw.generate(out, verbose=False, **SMALL)
    before = _tree_bytes(out)
    with pytest.raises(tw.ToyWorldError) as e:
        tw.generate(out, verbose=False, **dict(SMALL, seed=3))
    msg = str(e.value)
    assert '\n' not in msg and out in msg and '--seed' in msg
    with pytest.raises(tw.ToyWorldError, match='--train-images'):
        tw.generate(out, verbose=False, **dict(SMALL, train_images=31))
    assert _tree_bytes(out) == before
    assert sorted(os.listdir(tmp_path)) == ['w']  # no temporary folder left behind

    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')
    with pytest.raises(tw.ToyWorldError, match='notes.txt'):
        tw.generate(str(foreign), verbose=False, force=True, **SMALL)
    assert os.listdir(foreign) == ['notes.txt']

    # a modified world is reported, not silently reused
    with open(os.path.join(out, 've_dev.json'), 'a') as f:
        f.write(' ')
    with pytest.raises(tw.ToyWorldError, match='ve_dev.json'):
        tw.generate(out, verbose=False, **SMALL)
    # --force replaces a toy world (here one made with other arguments)
    m = tw.generate(out, verbose=False, force=True, **dict(SMALL, seed=3))
    assert m['args']['seed'] == 3 and _load(out, 'manifest.json')['args']['seed'] == 3
    with pytest.raises(tw.ToyWorldError, match='--image-size'):
        tw.generate(str(tmp_path / 'tiny'), verbose=False, **dict(SMALL, image_size=20))
    assert not os.path.exists(tmp_path / 'tiny')


def test_cli_summary_reuse_and_refusal(tmp_path):
    out = str(tmp_path / 'toy')
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'dataset.toyworld']
    r = subprocess.run(cmd + ['--out', out, '--seed', '0'] + SMALL_FLAGS, capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ('task', 'train', 'val', 'test', 'pretrain', 'retrieval', 'vqa', 'nlvr', 've', 'grounding'):
        assert word in r.stdout
    assert 'testA' in r.stdout and 'vocab %d tokens' % tw.VOCAB_SIZE in r.stdout
    # the same arguments: reused, nothing regenerated
    stamp = os.path.getmtime(os.path.join(out, 'world.json'))
    assert tw.main(['--out', out, '--seed', '0'] + SMALL_FLAGS) == 0
    assert os.path.getmtime(os.path.join(out, 'world.json')) == stamp
    # different data: one line on stderr, exit code 2, nothing touched
    before = _tree_bytes(out)
    r = subprocess.run(cmd + ['--out', out, '--seed', '1'] + SMALL_FLAGS, capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and out in lines[0] and '--seed' in lines[0]
    assert _tree_bytes(out) == before


# ------------------------------------------------------------------------------------------------------------
def _write_retrieval_split(root, images, captions):
    os.makedirs(root, exist_ok=True)
    world = [{'image_id': i, 'file': f'toy_{i:06d}.jpg', 'split': 'test', 'size': [96, 96], 'background': [0, 0, 0],
              'objects': [{'shape': s, 'colour': c, 'size': z, 'box': list(b)} for s, c, z, b in objs]}
             for i, objs in enumerate(images)]
    with open(os.path.join(root, 'world.json'), 'w') as f:
        json.dump(world, f)
    with open(os.path.join(root, 'retrieval_test.json'), 'w') as f:
        json.dump([{'image': w['file'], 'caption': caps} for w, caps in zip(world, captions)], f)


def test_retrieval_ceiling_counts_captions_true_of_several_images(tmp_path):
    red = [('circle', 'red', 'big', (10, 10, 30, 30))]
    blue = [('square', 'blue', 'small', (50, 50, 15, 15))]
    # images 0 and 1 look the same to every template: each of their captions is true of both
    _write_retrieval_split(str(tmp_path), [red, red, blue],
                           [['A big red circle.'], ['just one large red circle'], ['a small blue square']])
    c = tw.retrieval_ceiling(str(tmp_path), 'test', draws=400)
    assert (c['images'], c['captions']) == (3, 3)
    assert c['img_r1'] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    assert c['txt_r1'] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    assert c['shared_captions'] == pytest.approx(100 * 2 / 3)
    # a count caption is true of every two-object image, a relation caption only of its own
    green = [('triangle', 'green', 'big', (60, 10, 30, 30))]
    _write_retrieval_split(str(tmp_path), [red + green, blue + green],
                           [['a picture of two objects'], ['a small blue square to the left of a big green triangle']])
    c = tw.retrieval_ceiling(str(tmp_path), 'test', draws=400)
    assert c['img_r1'] == pytest.approx(100 * (0.5 + 1) / 2)
    assert c['txt_r1'] == pytest.approx(100 * (0.5 + 1) / 2)
    with pytest.raises(tw.ToyWorldError, match='split'):
        tw.retrieval_ceiling(str(tmp_path), 'train')


def test_grounding_match_bound_counts_positional_expressions_at_chance_among_look_alikes(tmp_path):
    objs = [{'shape': 'square', 'colour': 'red', 'size': 'big', 'box': [0, 0, 10, 10]},
            {'shape': 'square', 'colour': 'blue', 'size': 'small', 'box': [40, 0, 10, 10]},
            {'shape': 'square', 'colour': 'red', 'size': 'small', 'box': [70, 0, 10, 10]},
            {'shape': 'circle', 'colour': 'red', 'size': 'big', 'box': [0, 40, 10, 10]}]
    with open(tmp_path / 'world.json', 'w') as f:
        json.dump([{'image_id': 7, 'file': '7.png', 'split': 'test', 'size': [96, 96], 'objects': objs}], f)
    os.makedirs(tmp_path / 'refcoco+')
    with open(tmp_path / 'refcoco+' / 'instances.json', 'w') as f:
        json.dump({'images': [{'id': 7, 'file_name': '7.png', 'width': 96, 'height': 96}],
                   'annotations': [{'id': 70 + i, 'image_id': 7, 'category_id': 1, 'bbox': o['box']}
                                   for i, o in enumerate(objs)],
                   'categories': [{'id': 1, 'name': 'shape'}]}, f)
    sent_ids = iter(range(100))

    def ref(split, *sents):  # the referent does not matter for the bound, only the words and the image
        ids = [next(sent_ids) for _ in sents]
        return {'ref_id': ids[0], 'ann_id': 70, 'image_id': 7, 'category_id': 1, 'split': split, 'sent_ids': ids,
                'sentences': [{'sent_id': i, 'sent': s, 'tokens': s.split()} for i, s in zip(ids, sents)]}
    refs = [ref('testA', 'the red circle', 'the leftmost square'),       # 1 + 1/3
            ref('testB', 'the small square on the right', 'the big square'),  # 1/2 + 1
            ref('val', 'the leftmost red object'),                         # 1/3
            ref('train', 'the rightmost square')]                          # not evaluated
    with open(tmp_path / 'refcoco+' / 'refs(unc).p', 'wb') as f:
        pickle.dump(refs, f)
    bound = tw.grounding_match_bound(str(tmp_path))
    assert list(bound) == ['val', 'testA', 'testB']
    assert bound['testA']['expressions'] == 2 and bound['testA']['positional'] == 50.0
    assert abs(bound['testA']['bound'] - 100 * (1 + 1 / 3) / 2) < 1e-9
    assert abs(bound['testB']['bound'] - 75.0) < 1e-9 and abs(bound['val']['bound'] - 100 / 3) < 1e-9


def test_cli_ceiling(world, tmp_path, capsys):
    assert tw.main(['--out', world, '--ceiling']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and 'retrieval val' in lines[0] and 'retrieval test' in lines[1]
    for line in lines[:2]:
        txt, img = (float(line.split(name)[1].split('%')[0]) for name in ('txt_r1 ', 'img_r1 '))
        assert 0 < img <= txt <= 100
    assert [line.split()[2] for line in lines[2:]] == ['val:', 'testA:', 'testB:']
    for line in lines[2:]:  # attribute-named expressions count fully, so the bound lies above the positional share
        positional, bound = float(line.split('expressions, ')[1].split('%')[0]), float(line.split('gives ')[1][:-1])
        assert 0 <= positional <= 100 and 100 - positional <= bound <= 100
    assert tw.main(['--out', str(tmp_path), '--ceiling']) == 2
    assert 'not a toy world' in capsys.readouterr().err
