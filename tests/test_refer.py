"""REFER index over tiny refs(unc).p + instances.json written in tmp_path."""
import json
import os
import pickle

import pytest

from refTools import REFER, ReferError


def _sent(sid, text):
    return {'sent_id': sid, 'tokens': text.split(), 'raw': text, 'sent': text}


REFS = [
    {'ref_id': 1, 'ann_id': 11, 'image_id': 100, 'category_id': 1, 'split': 'train',
     'sentences': [_sent(1, 'left man'), _sent(2, 'man on the left')], 'sent_ids': [1, 2]},
    {'ref_id': 2, 'ann_id': 12, 'image_id': 100, 'category_id': 2, 'split': 'val',
     'sentences': [_sent(3, 'red car')], 'sent_ids': [3]},
    {'ref_id': 3, 'ann_id': 21, 'image_id': 200, 'category_id': 1, 'split': 'testA',
     'sentences': [_sent(4, 'woman')], 'sent_ids': [4]},
    {'ref_id': 4, 'ann_id': 22, 'image_id': 200, 'category_id': 2, 'split': 'testB',
     'sentences': [_sent(5, 'blue car')], 'sent_ids': [5]},
    {'ref_id': 5, 'ann_id': 31, 'image_id': 300, 'category_id': 2, 'split': 'testAB',
     'sentences': [_sent(6, 'truck')], 'sent_ids': [6]},
]
INSTANCES = {
    'images': [{'id': 100, 'file_name': 'a.jpg', 'height': 480, 'width': 640},
               {'id': 200, 'file_name': 'b.jpg', 'height': 300, 'width': 400},
               {'id': 300, 'file_name': 'c.jpg', 'height': 200, 'width': 200}],
    'annotations': [{'id': 11, 'image_id': 100, 'category_id': 1, 'bbox': [1, 2, 30, 40]},
                    {'id': 12, 'image_id': 100, 'category_id': 2, 'bbox': [5, 6, 70, 80]},
                    {'id': 13, 'image_id': 100, 'category_id': 1, 'bbox': [0, 0, 9, 9]},
                    {'id': 21, 'image_id': 200, 'category_id': 1, 'bbox': [10, 10, 20, 20]},
                    {'id': 22, 'image_id': 200, 'category_id': 2, 'bbox': [3, 3, 4, 4]},
                    {'id': 31, 'image_id': 300, 'category_id': 2, 'bbox': [7, 7, 7, 7]}],
    'categories': [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'car'}],
}


def _write(root, refs=REFS, instances=INSTANCES, dataset='refcoco+', split_by='unc', protocol=2):
    folder = os.path.join(root, dataset)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'refs({split_by}).p'), 'wb') as f:
        pickle.dump(refs, f, protocol=protocol)
    with open(os.path.join(folder, 'instances.json'), 'w') as f:
        json.dump(instances, f)
    return str(root)


@pytest.fixture
def refer(tmp_path):
    return REFER(_write(tmp_path), 'refcoco+', 'unc')


def test_index(refer, tmp_path):
    assert refer.DATA_DIR == os.path.join(str(tmp_path), 'refcoco+')
    assert refer.IMAGE_DIR == os.path.join(str(tmp_path), 'images', 'mscoco', 'images', 'train2014')
    assert refer.Refs[3]['split'] == 'testA' and refer.Refs[3]['image_id'] == 200
    assert refer.refToAnn[2]['bbox'] == [5, 6, 70, 80]
    assert refer.annToRef[21]['ref_id'] == 3
    assert refer.Imgs[200]['height'] == 300 and refer.Imgs[200]['width'] == 400
    assert refer.Cats == {1: 'person', 2: 'car'}
    assert [a['id'] for a in refer.imgToAnns[100]] == [11, 12, 13]
    assert [r['ref_id'] for r in refer.imgToRefs[100]] == [1, 2]
    assert [r['ref_id'] for r in refer.catToRefs[2]] == [2, 4, 5]
    assert refer.Sents[2]['sent'] == 'man on the left'
    assert refer.sentToRef[4]['ref_id'] == 3
    assert refer.sentToTokens[1] == ['left', 'man']


def test_get_ref_ids_and_splits(refer):
    assert refer.getRefIds() == [1, 2, 3, 4, 5]
    assert refer.getRefIds(split='train') == [1]
    assert refer.getRefIds(split='val') == [2]
    assert refer.getRefIds(split='test') == [3, 4, 5]
    assert refer.getRefIds(split='testA') == [3, 5]  # letter contained: testAB counts
    assert refer.getRefIds(split='testB') == [4, 5]
    assert refer.getRefIds(split='testC') == []
    assert refer.getRefIds(split='testAB') == [5]
    assert refer.getRefIds(image_ids=100) == [1, 2]  # the original crashed here (list of lists)
    assert refer.getRefIds(image_ids=[200, 300, 999], cat_ids=[2]) == [4, 5]
    assert refer.getRefIds(cat_ids=1, split='test') == [3]
    assert refer.getRefIds(ref_ids=[2, 4], split='testB') == [4]
    with pytest.raises(ReferError, match="unknown split 'dev'"):
        refer.getRefIds(split='dev')


def test_get_ann_img_cat_ids_and_loads(refer):
    assert refer.getAnnIds() == [11, 12, 13, 21, 22, 31]
    assert refer.getAnnIds(image_ids=100) == [11, 12, 13]
    assert refer.getAnnIds(image_ids=[100, 200], cat_ids=[1]) == [11, 13, 21]
    assert refer.getAnnIds(ref_ids=[1, 4]) == [11, 22]  # applied (the original ignored it)
    assert refer.getAnnIds(image_ids=100, ref_ids=[1, 4]) == [11]
    assert refer.getImgIds() == [100, 200, 300]
    assert refer.getImgIds(ref_ids=[4, 3, 1]) == [200, 100]
    assert refer.getImgIds(ref_ids=5) == [300]
    assert refer.getCatIds() == [1, 2]
    assert [r['ref_id'] for r in refer.loadRefs([1, 3])] == [1, 3]
    assert refer.loadRefs(2)[0]['ann_id'] == 12
    assert refer.loadAnns(21)[0]['bbox'] == [10, 10, 20, 20]
    assert [a['id'] for a in refer.loadAnns([12, 31])] == [12, 31]
    assert refer.loadImgs(300)[0]['file_name'] == 'c.jpg'
    assert refer.loadCats([2, 1]) == ['car', 'person']
    assert refer.loadRefs() == []
    assert refer.getRefBox(3) == [10, 10, 20, 20]


def test_other_datasets_and_split_by(tmp_path):
    root = _write(tmp_path, dataset='refclef', split_by='berkeley', protocol=4)
    r = REFER(root, dataset='refclef', splitBy='berkeley')
    assert r.IMAGE_DIR == os.path.join(root, 'images', 'saiapr_tc-12')
    assert len(r.Refs) == 5
    _write(tmp_path, dataset='refcocog', split_by='umd')
    assert REFER(root, 'refcocog', 'umd').getRefIds(split='val') == [2]


def test_python2_style_pickle_with_latin1_bytes(tmp_path):
    """Python 2 pickles store str as bytes (SHORT_BINSTRING): non-ASCII bytes need the latin-1 fallback."""
    from refTools.refer import _load_refs
    path = tmp_path / 'refs(unc).p'
    # protocol 2: [ {'x': 'caf\xe9'} ] as Python 2 writes it
    path.write_bytes(b'\x80\x02]q\x00}q\x01U\x01xq\x02U\x04caf\xe9q\x03sa.')
    assert _load_refs(str(path)) == [{'x': 'caf\u00e9'}]
    path.write_bytes(b'\x80\x02]q\x00}q\x01U\x01xq\x02U\x03cafq\x03sa.')
    assert _load_refs(str(path)) == [{'x': 'caf'}]


def test_errors(tmp_path):
    with pytest.raises(ReferError, match=r"unknown REFER dataset 'refcoco\+\+'") as e:
        REFER(str(tmp_path), 'refcoco++')
    assert isinstance(e.value, ValueError)
    missing = os.path.join(str(tmp_path), 'refcoco+', 'refs(unc).p')
    with pytest.raises(ReferError, match='refs file not found') as e:
        REFER(str(tmp_path))
    assert missing in str(e.value)
    root = _write(tmp_path)
    os.remove(os.path.join(root, 'refcoco+', 'instances.json'))
    with pytest.raises(ReferError, match=r'instances file not found: .*instances\.json'):
        REFER(root)
    bad_ref = [dict(REFS[0], ann_id=99)]
    root = _write(tmp_path / 'b', refs=bad_ref)
    with pytest.raises(ReferError, match=r'ref_id 1 points to ann_id 99'):
        REFER(root)
    root = _write(tmp_path / 'c', refs=[{k: v for k, v in REFS[0].items() if k != 'split'}])
    with pytest.raises(ReferError, match=r"ref 0 \(ref_id 1\) has no 'split'"):
        REFER(root)
    root = _write(tmp_path / 'd', instances={'images': [], 'annotations': []})
    with pytest.raises(ReferError, match="has no 'categories' list"):
        REFER(root)


def test_refuses_pickles_with_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo should-not-run',))
    root = _write(tmp_path)
    with open(os.path.join(root, 'refcoco+', 'refs(unc).p'), 'wb') as f:
        pickle.dump([Evil()], f, protocol=2)
    with pytest.raises(ReferError, match='only plain data'):
        REFER(root)


def test_toy_world_refs_load(tmp_path):
    """A (tiny) toy world's REFER files, what Grounding.py reads, load and agree with its expressions."""
    from tests.toy import generate_world
    world = generate_world(str(tmp_path / 'world'), 0, train_images=8, val_images=4, test_images=4)
    refer = REFER(world, 'refcoco+', 'unc')
    with open(os.path.join(world, 'refcoco+_test.json')) as f:
        items = json.load(f)
    assert items and refer.getRefIds(split='test')
    for item in items:
        ref = refer.Refs[int(item['ref_id'])]
        assert 'test' in ref['split']
        img = refer.Imgs[ref['image_id']]
        assert img['height'] > 0 and img['width'] > 0
        assert len(refer.getRefBox(ref['ref_id'])) == 4
