"""One writer per annotation format of the toy world: each turns the drawn images' ground truth into its task's
files under the world folder and returns the counts for the manifest.

`images` below is the list that `draw_images` returns: per image {'image_id', 'file', 'split', 'objs',
'background'}; `by_pool` maps each pool of POOLS to its images."""
from __future__ import annotations

import json
import os
import pickle
from collections import Counter

from PIL import Image

from dataset.toyworld.captions import image_captions
from dataset.toyworld.nlvr import nlvr_split
from dataset.toyworld.refcoco import distractor_boxes, ref_expressions
from dataset.toyworld.render import render
from dataset.toyworld.scene import CATEGORY_ID, POOLS, SHAPES, sample_objects
from dataset.toyworld.snli_ve import VE_LABELS, ve_for_image
from dataset.toyworld.streams import CAPTION, DETECTION, IMAGE, NLVR, REF, VE, VQA, stream
from dataset.toyworld.text import finish
from dataset.toyworld.vocab import VOCAB, check_vocab
from dataset.toyworld.vqa import human_answers, vqa_for_image

# Pools by the names the NLVR2 and SNLI-VE files use for them.
_SPLIT_NAMES = (('train', 'train'), ('val', 'dev'), ('test', 'test'))


def dump_json(path: str, obj) -> None:
    """Write `obj` as ASCII JSON in its own key order plus a newline (the same object gives the same bytes)."""
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=True)
        f.write('\n')


def draw_images(out: str, args: dict) -> list[dict]:
    """Sample and render every image of the three pools into `<out>/images`; returns their ground truth."""
    seed, side = args['seed'], args['image_size']
    images = []
    idx = 0
    for pool in POOLS:
        for _ in range(args[f'{pool}_images']):
            rng = stream(seed, IMAGE, idx)
            objs = sample_objects(rng, side)
            pixels, bg = render(rng, side, objs)
            name = f'toy_{idx:06d}.jpg'
            Image.fromarray(pixels).save(os.path.join(out, 'images', name), quality=95)
            images.append({'image_id': idx, 'file': name, 'split': pool, 'objs': objs, 'background': bg})
            idx += 1
    return images


def write_vocab(out: str) -> None:
    """`vocab/vocab.txt`: one token a line, ids = line numbers."""
    with open(os.path.join(out, 'vocab', 'vocab.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(VOCAB) + '\n')


def write_ground_truth(out: str, images: list[dict], side: int) -> None:
    """`world.json`: per image its id, file, split, size, background and objects."""
    dump_json(os.path.join(out, 'world.json'), [
        {'image_id': w['image_id'], 'file': w['file'], 'split': w['split'], 'size': [side, side],
         'background': w['background'],
         'objects': [{'shape': o.shape, 'colour': o.colour, 'size': o.size, 'box': list(o.box)} for o in w['objs']]}
        for w in images])


def write_captions(out: str, prefix: str, images: list[dict], by_pool: dict, args: dict) -> dict:
    """Pretraining (`pretrain.json`, `nlvr_pretrain.json`, image paths under `prefix` as spelled, because
    pretraining opens them as is) and retrieval (`retrieval_{train,val,test}.json`) from the same captions."""
    seed, n_pool = args['seed'], {p: args[f'{p}_images'] for p in POOLS}
    caps = {w['image_id']: image_captions(stream(seed, CAPTION, w['image_id']), w['objs'], args['captions_per_image'])
            for w in images}
    check_vocab((c for cs in caps.values() for c in cs), 'captions')

    def img_path(w):
        return os.path.join(prefix, 'images', w['file'])

    dump_json(os.path.join(out, 'pretrain.json'),
              [{'image': img_path(w), 'caption': caps[w['image_id']]} for w in by_pool['train']])
    dump_json(os.path.join(out, 'nlvr_pretrain.json'),
              [{'image': img_path(w), 'caption': caps[w['image_id']][0]} for w in by_pool['train']])
    dump_json(os.path.join(out, 'retrieval_train.json'),
              [{'image': w['file'], 'caption': c, 'image_id': w['image_id']}
               for w in by_pool['train'] for c in caps[w['image_id']]])
    for pool in ('val', 'test'):
        dump_json(os.path.join(out, f'retrieval_{pool}.json'),
                  [{'image': w['file'], 'caption': caps[w['image_id']]} for w in by_pool[pool]])
    return {'pretrain': {'train': n_pool['train']}, 'nlvr_pretrain': {'train': n_pool['train']},
            'retrieval': {p: n_pool[p] * args['captions_per_image'] for p in POOLS}}


def _vqa_items(by_pool: dict, args: dict) -> dict:
    """The train and test pools' questions with their answers and (underscored) ground truth for the API files."""
    vqa = {}
    qid = 0
    for pool in ('train', 'test'):
        items = []
        for w in by_pool[pool]:
            rng = stream(args['seed'], VQA, w['image_id'])
            for q, a, qtype, atype in vqa_for_image(rng, w['objs'], args['vqa_per_image']):
                items.append({'question_id': qid, 'question': q, 'answer': human_answers(rng, a, atype),
                              'image': w['file'], 'dataset': 'vqa', '_truth': a, '_qtype': qtype,
                              '_atype': atype, '_image_id': w['image_id']})
                qid += 1
        vqa[pool] = items
    return vqa


def write_vqa(out: str, by_pool: dict, args: dict, format_version: int) -> dict:
    """`vqa_{train,test}.json`, `answer_list.json` (most frequent first) and the official VQA API question and
    annotation files of the test split."""
    vqa = _vqa_items(by_pool, args)
    check_vocab((it['question'] for p in vqa.values() for it in p), 'VQA questions')
    check_vocab((a for p in vqa.values() for it in p for a in it['answer']), 'VQA answers')
    public = ('question_id', 'question', 'answer', 'image', 'dataset')
    for pool in ('train', 'test'):
        dump_json(os.path.join(out, f'vqa_{pool}.json'), [{k: it[k] for k in public} for it in vqa[pool]])
    freq = Counter(a for p in ('train', 'test') for it in vqa[p] for a in it['answer'])
    answer_list = sorted(freq, key=lambda a: (-freq[a], a))
    dump_json(os.path.join(out, 'answer_list.json'), answer_list)
    header = {'info': {'description': 'toy world VQA (synthetic)', 'version': str(format_version)},
              'task_type': 'Open-Ended', 'data_type': 'toyworld', 'data_subtype': 'test',
              'license': {'name': 'synthetic data, no restrictions', 'url': ''}}
    dump_json(os.path.join(out, 'vqa_test_questions.json'), dict(header, questions=[
        {'question_id': it['question_id'], 'image_id': it['_image_id'], 'question': it['question']}
        for it in vqa['test']]))
    dump_json(os.path.join(out, 'vqa_test_annotations.json'), dict(header, annotations=[
        {'question_id': it['question_id'], 'image_id': it['_image_id'], 'question_type': it['_qtype'],
         'answer_type': it['_atype'], 'multiple_choice_answer': Counter(it['answer']).most_common(1)[0][0],
         'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': k + 1}
                     for k, a in enumerate(it['answer'])]}
        for it in vqa['test']]))
    return {'vqa': {'train': len(vqa['train']), 'test': len(vqa['test'])}, 'vqa_answers': len(answer_list)}


def write_nlvr(out: str, by_pool: dict, args: dict) -> dict:
    """`nlvr_{train,dev,test}.json`: statements over random image pairs of each pool."""
    counts: dict = {'nlvr': {}, 'nlvr_true': 0}
    for code, (pool, name) in enumerate(_SPLIT_NAMES):
        items = nlvr_split(stream(args['seed'], NLVR, code), by_pool[pool],
                           args['nlvr_per_image'] * args[f'{pool}_images'])
        check_vocab((it['sentence'] for it in items), 'NLVR statements')
        dump_json(os.path.join(out, f'nlvr_{name}.json'), items)
        counts['nlvr'][pool] = len(items)
        counts['nlvr_true'] += sum(it['label'] == 'True' for it in items)
    return counts


def write_ve(out: str, by_pool: dict, args: dict) -> dict:
    """`ve_{train,dev,test}.json`: hypotheses per image, labels cycling so each split is exactly balanced."""
    counts: dict = {'ve': {}}
    label_counts = Counter()
    k = args['ve_per_image']
    for pool, name in _SPLIT_NAMES:
        items = []
        for n, w in enumerate(by_pool[pool]):
            labels = [VE_LABELS[(n * k + j) % 3] for j in range(k)]  # exact balance over the split
            rng = stream(args['seed'], VE, w['image_id'])
            for sentence, label in ve_for_image(rng, w['objs'], labels):
                items.append({'image': os.path.splitext(w['file'])[0], 'sentence': sentence, 'label': label})
        check_vocab((it['sentence'] for it in items), 'VE hypotheses')
        dump_json(os.path.join(out, f've_{name}.json'), items)
        counts['ve'][pool] = len(items)
        label_counts.update(it['label'] for it in items)
    counts['ve_labels'] = {lab: label_counts[lab] for lab in VE_LABELS}
    return counts


def _chosen_refs(rng, objs, refs_per_image: int) -> list:
    """Up to `refs_per_image` (object index, expressions) pairs, objects in random order, skipping objects that
    cannot be singled out."""
    made = []
    for i in [int(i) for i in rng.permutation(len(objs))]:
        if len(made) == refs_per_image:
            break
        sents = ref_expressions(rng, objs[i], objs, int(rng.integers(1, 4)))
        if sents:
            made.append((i, sents))
    return made


def _boxes_of(w: dict, seed: int, side: int) -> tuple[list, list, list]:
    """One image's COCO annotations, shuffled proposals (the objects' boxes and distractors) and ground-truth
    boxes with category."""
    image_id, objs = w['image_id'], w['objs']
    anns = []
    for i, o in enumerate(objs):
        x, y, bw, bh = o.box
        anns.append({'id': image_id * 10 + i, 'image_id': image_id, 'category_id': CATEGORY_ID[o.shape],
                     'bbox': list(o.box), 'area': bw * bh, 'iscrowd': 0,
                     'segmentation': [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    drng = stream(seed, DETECTION, image_id)
    boxes = [list(o.box) for o in objs] + distractor_boxes(drng, objs, side)
    dets = [boxes[k] for k in drng.permutation(len(boxes))]
    cocos = [list(o.box) + [CATEGORY_ID[o.shape]] for o in objs]
    return anns, dets, cocos


def write_refcoco(out: str, images: list[dict], args: dict) -> dict:
    """`refcoco+_{train,val,test}.json` and the REFER files under `refcoco+/` (refs, instances, dets, cocos).
    In the test pool a ref to a big object goes to testA, to a small one to testB."""
    seed, side = args['seed'], args['image_size']
    refs, coco_images, anns, dets, cocos = [], [], [], {}, {}
    ref_items = {'train': [], 'val': [], 'test': []}
    split_refs = Counter()
    n_sents = Counter()
    sent_id = 0
    for w in images:
        rng = stream(seed, REF, w['image_id'])
        objs = w['objs']
        made = _chosen_refs(rng, objs, args['refs_per_image'])
        if not made:
            continue
        image_id = w['image_id']
        coco_images.append({'id': image_id, 'file_name': w['file'], 'height': side, 'width': side})
        image_anns, dets[str(image_id)], cocos[str(image_id)] = _boxes_of(w, seed, side)
        anns.extend(image_anns)
        for i, sents in made:
            o = objs[i]
            if w['split'] == 'test':
                split = 'testA' if o.size == 'big' else 'testB'
            else:
                split = w['split']
            ref_id = len(refs)
            sentences = []
            for s in sents:
                raw = finish(rng, s)
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
    check_vocab((it['text'] for p in ref_items.values() for it in p), 'referring expressions')
    for pool in POOLS:
        dump_json(os.path.join(out, f'refcoco+_{pool}.json'), ref_items[pool])
    with open(os.path.join(out, 'refcoco+', 'refs(unc).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    dump_json(os.path.join(out, 'refcoco+', 'instances.json'), {
        'info': {'description': 'toy world RefCOCO+ (synthetic)'}, 'images': coco_images, 'annotations': anns,
        'categories': [{'id': CATEGORY_ID[s], 'name': s, 'supercategory': 'shape'} for s in SHAPES]})
    dump_json(os.path.join(out, 'refcoco+', 'dets.json'), dets)
    dump_json(os.path.join(out, 'refcoco+', 'cocos.json'), cocos)
    return {'grounding_refs': {s: split_refs[s] for s in ('train', 'val', 'testA', 'testB')},
            'grounding_sents': {s: n_sents[s] for s in ('train', 'val', 'testA', 'testB')}}
