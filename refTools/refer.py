"""REFER: the RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF annotation index, as Grounding.py reads it.

`REFER(data_root, dataset, splitBy)` loads `data_root/<dataset>/refs(<splitBy>).p` (a pickle: list of refs with
ref_id, ann_id, image_id, category_id, split, sentences) and `data_root/<dataset>/instances.json` (COCO-style
images, annotations, categories) and builds the lookup tables. Grounding uses `Refs[ref_id]` ('image_id',
'split'), `refToAnn[ref_id]['bbox']` and `Imgs[image_id]` ('height', 'width').

Deliberate differences from the original (refer_python3.py):

* errors raise `ReferError` (a ValueError) with a one-line message naming the file / item / argument: unknown
  dataset or split (the original printed and called exit()), a missing file (names the path) or one that is not a
  regular file (a FIFO would block the reader forever), a ref whose ann_id or image_id is not in instances.json,
  malformed records (ids that are not ints, a split that is not a string, sentences that are not a list, the
  referenced annotation without a 4-number bbox or its image without a positive width and height), JSON nested
  beyond the parser's recursion limit;
* the pickle is read with an unpickler that only builds plain containers (dict, list, str, numbers), so a
  tampered refs file cannot run code; Python-2 byte strings that are not ASCII are decoded as latin-1;
* `getRefIds(image_ids=...)` returns the refs of those images (the original built a list of lists and crashed);
* `getAnnIds(ref_ids=...)` applies the ref filter (the original computed it and ignored it);
* `getImgIds` / `getCatIds` return lists in first-seen order (the original returned dict views or set order).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import stat
import time
from typing import Any

from utils import UserError

__all__ = ['REFER', 'ReferError', 'DATASETS']

# dataset name -> image folder relative to data_root (the original's layout)
DATASETS = {
    'refcoco': os.path.join('images', 'mscoco', 'images', 'train2014'),
    'refcoco+': os.path.join('images', 'mscoco', 'images', 'train2014'),
    'refcocog': os.path.join('images', 'mscoco', 'images', 'train2014'),
    'refclef': os.path.join('images', 'saiapr_tc-12'),
}
_REF_KEYS = ('ref_id', 'ann_id', 'image_id', 'category_id', 'split', 'sentences')


class ReferError(UserError, ValueError):
    """Bad REFER data or arguments; the one-line message names the file, item or argument."""


def _as_list(x: Any) -> list:
    """The original API's convention: a list (or tuple/set) is used as is, anything else becomes [x]."""
    if isinstance(x, (list, tuple, set, frozenset)):
        return list(x)
    return [x]


_SAFE_GLOBALS = {('builtins', 'set'), ('builtins', 'frozenset'), ('__builtin__', 'set'),
                 ('__builtin__', 'frozenset')}


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler for refs(*).p that refuses every global except set/frozenset: the file only needs dicts, lists,
    strings and numbers, so a global means a foreign (or malicious) pickle."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refuses to load {module}.{name} (only plain data is allowed)')


def _check_file(path: str, what: str) -> None:
    """ReferError for a missing path or one that is not a regular file (reading a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ReferError(f'REFER {what} file not found: {path}') from None
    except (OSError, ValueError) as e:
        raise ReferError(f'REFER {what} file {path}: cannot read ({e})') from None
    if not stat.S_ISREG(mode):
        kind = 'a directory' if stat.S_ISDIR(mode) else 'a named pipe (FIFO)' if stat.S_ISFIFO(mode) else 'special'
        raise ReferError(f'REFER {what} file {path}: is {kind}, not a regular file')


def _brief(value, limit: int = 60) -> str:
    try:
        return repr(value)[:limit]
    except RecursionError:
        return f'<{type(value).__name__} nested too deeply to show>'


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_box(x) -> bool:
    return (isinstance(x, (list, tuple)) and len(x) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x))


def _load_refs(path: str) -> list:
    _check_file(path, 'refs')
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        raise ReferError(f'REFER refs file {path}: cannot read ({e.strerror or e})') from None
    try:
        try:
            refs = _PlainUnpickler(io.BytesIO(raw)).load()
        except UnicodeDecodeError:  # a Python-2 pickle with non-ASCII byte strings
            refs = _PlainUnpickler(io.BytesIO(raw), encoding='latin1').load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ReferError(f'REFER refs file {path} could not be read: {type(e).__name__}: {e}') from None
    if not isinstance(refs, list):
        raise ReferError(f'REFER refs file {path} must hold a list of refs, got {type(refs).__name__}')
    return refs


def _load_instances(path: str) -> dict:
    _check_file(path, 'instances')
    try:
        with open(path, 'r', encoding='utf-8') as f:
            instances = json.load(f)
    except json.JSONDecodeError as e:
        raise ReferError(f'REFER instances file {path} is not valid JSON: {e}') from None
    except RecursionError:
        raise ReferError(f'REFER instances file {path}: JSON nested too deeply to parse') from None
    except UnicodeDecodeError as e:
        raise ReferError(f'REFER instances file {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset '
                         f'{e.start})') from None
    except OSError as e:
        raise ReferError(f'REFER instances file {path}: cannot read ({e.strerror or e})') from None
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(instances, dict) or not isinstance(instances.get(key), list):
            raise ReferError(f"REFER instances file {path} has no '{key}' list")
    return instances


class REFER:
    """Index of one referring-expression dataset.

    Tables: Anns {ann_id: ann}, Imgs {image_id: image}, Cats {cat_id: name}, imgToAnns {image_id: [anns]},
    Refs {ref_id: ref}, imgToRefs, catToRefs, refToAnn {ref_id: ann}, annToRef {ann_id: ref},
    Sents {sent_id: sentence}, sentToRef, sentToTokens.
    """

    def __init__(self, data_root: str, dataset: str = 'refcoco+', splitBy: str = 'unc', verbose: bool = False):
        if dataset not in DATASETS:
            raise ReferError(f'unknown REFER dataset {dataset!r}; known: {", ".join(DATASETS)}')
        tic = time.time()
        if verbose:
            print(f'loading dataset {dataset} into memory...')
        self.DATA_DIR = os.path.join(data_root, dataset)
        self.IMAGE_DIR = os.path.join(data_root, DATASETS[dataset])
        self.ref_file = os.path.join(self.DATA_DIR, f'refs({splitBy}).p')
        self.instances_file = os.path.join(self.DATA_DIR, 'instances.json')
        refs = _load_refs(self.ref_file)
        instances = _load_instances(self.instances_file)
        self.data = {'dataset': dataset, 'refs': refs, 'images': instances['images'],
                     'annotations': instances['annotations'], 'categories': instances['categories']}
        self.createIndex()
        if verbose:
            print(f'DONE (t={time.time() - tic:.2f}s)')

    def createIndex(self) -> None:
        """Build every lookup table from `self.data`."""
        where = self.instances_file
        Anns, Imgs, Cats, imgToAnns = {}, {}, {}, {}
        for k, ann in enumerate(self.data['annotations']):
            if not isinstance(ann, dict) or 'id' not in ann or 'image_id' not in ann:
                raise ReferError(f"{where}: annotations[{k}] needs 'id' and 'image_id'")
            for key in ('id', 'image_id'):
                if not _is_int(ann[key]):
                    raise ReferError(f"{where}: annotations[{k}] key '{key}' must be an int, got {_brief(ann[key])}")
            Anns[ann['id']] = ann
            imgToAnns.setdefault(ann['image_id'], []).append(ann)
        for k, img in enumerate(self.data['images']):
            if not isinstance(img, dict) or 'id' not in img:
                raise ReferError(f"{where}: images[{k}] has no 'id'")
            if not _is_int(img['id']):
                raise ReferError(f"{where}: images[{k}] key 'id' must be an int, got {_brief(img['id'])}")
            Imgs[img['id']] = img
        for k, cat in enumerate(self.data['categories']):
            if not isinstance(cat, dict) or 'id' not in cat or 'name' not in cat:
                raise ReferError(f"{where}: categories[{k}] needs 'id' and 'name'")
            if not _is_int(cat['id']):
                raise ReferError(f"{where}: categories[{k}] key 'id' must be an int, got {_brief(cat['id'])}")
            Cats[cat['id']] = cat['name']

        Refs, imgToRefs, refToAnn, annToRef, catToRefs = {}, {}, {}, {}, {}
        Sents, sentToRef, sentToTokens = {}, {}, {}
        for k, ref in enumerate(self.data['refs']):
            if not isinstance(ref, dict):
                raise ReferError(f'{self.ref_file}: ref {k} is not a dict')
            for key in _REF_KEYS:
                if key not in ref:
                    raise ReferError(f"{self.ref_file}: ref {k} (ref_id {_brief(ref.get('ref_id'))}) has no '{key}'")
            self._check_ref(ref, k)
            ref_id, ann_id = ref['ref_id'], ref['ann_id']
            if ann_id not in Anns:
                raise ReferError(f'{self.ref_file}: ref_id {ref_id!r} points to ann_id {ann_id!r}, which is not '
                                 f'in {where}')
            img = Imgs.get(ref['image_id'])
            if img is None:
                raise ReferError(f"{self.ref_file}: ref_id {ref_id!r} points to image_id {ref['image_id']!r}, which is "
                                 f"not in {where}")
            if not all(_is_int(img.get(k)) and img[k] > 0 for k in ('width', 'height')):
                raise ReferError(f"{where}: the image {ref['image_id']} of ref_id {ref_id} needs positive int 'width' "
                                 f"and 'height', got {_brief(img.get('width'))} x {_brief(img.get('height'))}")
            if not _is_box(Anns[ann_id].get('bbox')):
                raise ReferError(f"{where}: the annotation {ann_id} of ref_id {ref_id} needs 'bbox' [x, y, w, h] "
                                 f"(4 finite numbers), got {_brief(Anns[ann_id].get('bbox'))}")
            Refs[ref_id] = ref
            imgToRefs.setdefault(ref['image_id'], []).append(ref)
            catToRefs.setdefault(ref['category_id'], []).append(ref)
            refToAnn[ref_id] = Anns[ann_id]
            annToRef[ann_id] = ref
            for sent in ref['sentences']:
                if not isinstance(sent, dict) or 'sent_id' not in sent:
                    raise ReferError(f"{self.ref_file}: ref_id {ref_id!r} has a sentence without 'sent_id'")
                if not _is_int(sent['sent_id']):
                    raise ReferError(f"{self.ref_file}: ref_id {ref_id!r} has a sentence whose 'sent_id' is not an "
                                     f"int: {_brief(sent['sent_id'])}")
                Sents[sent['sent_id']] = sent
                sentToRef[sent['sent_id']] = ref
                sentToTokens[sent['sent_id']] = sent.get('tokens')
        self.Anns, self.Imgs, self.Cats, self.imgToAnns = Anns, Imgs, Cats, imgToAnns
        self.Refs, self.imgToRefs, self.refToAnn, self.annToRef, self.catToRefs = (
            Refs, imgToRefs, refToAnn, annToRef, catToRefs)
        self.Sents, self.sentToRef, self.sentToTokens = Sents, sentToRef, sentToTokens

    def _check_ref(self, ref: dict, k: int) -> None:
        """ReferError naming the refs file and the ref for a record whose values have the wrong types."""
        name = f"{self.ref_file}: ref {k} (ref_id {_brief(ref['ref_id'])})"
        for key in ('ref_id', 'ann_id', 'image_id', 'category_id'):
            if not _is_int(ref[key]):
                raise ReferError(f"{name}: key '{key}' must be an int, got {_brief(ref[key])}")
        if not isinstance(ref['split'], str):
            raise ReferError(f"{name}: key 'split' must be a string, got {_brief(ref['split'])}")
        if not isinstance(ref['sentences'], list):
            raise ReferError(f"{name}: key 'sentences' must be a list, got {_brief(ref['sentences'])}")

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _split_filter(refs: list, split: str) -> list:
        if split in ('testA', 'testB', 'testC'):
            return [ref for ref in refs if split[-1] in ref['split']]  # e.g. 'testA' also keeps 'testAB'
        if split in ('testAB', 'testBC', 'testAC'):
            return [ref for ref in refs if ref['split'] == split]
        if split == 'test':
            return [ref for ref in refs if 'test' in ref['split']]
        if split in ('train', 'val'):
            return [ref for ref in refs if ref['split'] == split]
        raise ReferError(f"unknown split {split!r}; known: train, val, test, testA, testB, testC, testAB, testBC, "
                         f"testAC")

    def getRefIds(self, image_ids=[], cat_ids=[], ref_ids=[], split: str = '') -> list:
        """Ref ids filtered by images, categories, ref ids and split (all empty: every ref).

        Split rules: 'testA'/'testB'/'testC' keep refs whose split contains that letter; 'testAB'/'testBC'/'testAC'
        exact; 'test' any split containing 'test'; 'train'/'val' exact; anything else raises ReferError.
        """
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if image_ids:
            refs = [ref for image_id in image_ids for ref in self.imgToRefs.get(image_id, [])]
        else:
            refs = self.data['refs']
        if cat_ids:
            refs = [ref for ref in refs if ref['category_id'] in cat_ids]
        if ref_ids:
            refs = [ref for ref in refs if ref['ref_id'] in ref_ids]
        if split:
            refs = self._split_filter(refs, split)
        return [ref['ref_id'] for ref in refs]

    def getAnnIds(self, image_ids=[], cat_ids=[], ref_ids=[]) -> list:
        """Annotation ids filtered by images, categories and refs (all empty: every annotation)."""
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if image_ids:
            anns = [ann for image_id in image_ids for ann in self.imgToAnns.get(image_id, [])]
        else:
            anns = self.data['annotations']
        if cat_ids:
            anns = [ann for ann in anns if ann.get('category_id') in cat_ids]
        ann_ids = [ann['id'] for ann in anns]
        if ref_ids:
            wanted = {self.Refs[r]['ann_id'] for r in ref_ids if r in self.Refs}
            ann_ids = [a for a in ann_ids if a in wanted]
        return ann_ids

    def getImgIds(self, ref_ids=[]) -> list:
        """Image ids of the given refs (de-duplicated, first-seen order), or of every image."""
        ref_ids = _as_list(ref_ids)
        if ref_ids:
            return list(dict.fromkeys(self.Refs[r]['image_id'] for r in ref_ids))
        return list(self.Imgs)

    def getCatIds(self) -> list:
        """Every category id."""
        return list(self.Cats)

    def loadRefs(self, ref_ids=[]) -> list:
        """Refs of the given ref id(s)."""
        return [self.Refs[r] for r in _as_list(ref_ids)]

    def loadAnns(self, ann_ids=[]) -> list:
        """Annotations of the given annotation id(s)."""
        return [self.Anns[a] for a in _as_list(ann_ids)]

    def loadImgs(self, image_ids=[]) -> list:
        """Image records of the given image id(s)."""
        return [self.Imgs[i] for i in _as_list(image_ids)]

    def loadCats(self, cat_ids=[]) -> list:
        """Category names of the given category id(s)."""
        return [self.Cats[c] for c in _as_list(cat_ids)]

    def getRefBox(self, ref_id) -> list:
        """The [x, y, w, h] box of the ref's annotation."""
        return self.refToAnn[ref_id]['bbox']
