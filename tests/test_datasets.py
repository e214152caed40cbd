"""Datasets, image/annotation loading errors, transforms, samplers/loaders and grounding helpers.

Everything is built from tiny JSON files and images written into tmp_path (no toy-world generator needed).
"""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import dataset
from dataset import (DataError, create_dataset, create_loader, create_sampler, grounding_dataset, nlvr_dataset,
                     pretrain_dataset, re_eval_dataset, re_train_dataset, ve_dataset, vqa_collate_fn, vqa_dataset)
from dataset.transforms import MEAN, STD, build_transform
from dataset.utils import load_annotations, open_image_rgb
from evaluation.grounding_boxes import choose_box, computeIoU, grounding_eval, proposal_scores, upsample_heatmap
from utils import ConfigError, UserError


def ident(img):
    return img


def write_json(path, obj):
    path = str(path)
    with open(path, 'w') as f:
        json.dump(obj, f)
    return path


def make_image(path, color=(200, 10, 10), size=(12, 10), mode='RGB'):
    Image.new(mode, size, color).save(str(path))
    return str(path)


@pytest.fixture
def root(tmp_path):
    """An image root with a few RGB JPEGs: a.jpg (red), b.jpg (green), sub/c.jpg (blue)."""
    r = tmp_path / 'images'
    (r / 'sub').mkdir(parents=True)
    make_image(r / 'a.jpg', (220, 0, 0))
    make_image(r / 'b.jpg', (0, 220, 0))
    make_image(r / 'sub' / 'c.jpg', (0, 0, 220))
    return str(r)


# ----------------------------------------------------------------------------------------------------------------
# Image opening
# ----------------------------------------------------------------------------------------------------------------
def test_import_does_not_change_pil_globals():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS is not None
    assert 'LOAD_TRUNCATED_IMAGES' in dataset.__doc__  # the deviation is documented


def test_open_image_converts_modes_to_rgb(tmp_path):
    cases = {
        'gray.png': Image.new('L', (6, 5), 77),
        'cmyk.jpg': Image.new('CMYK', (6, 5), (0, 0, 0, 0)),
        'rgba.png': Image.new('RGBA', (6, 5), (10, 20, 30, 0)),
        'la.png': Image.new('LA', (6, 5), (90, 128)),
        '1bit.png': Image.new('1', (6, 5), 1),
    }
    pal = Image.new('P', (6, 5), 1)
    pal.putpalette([0, 0, 0, 250, 5, 5] + [0] * 762)
    pal.info['transparency'] = 0
    cases['palette.png'] = pal
    for name, img in cases.items():
        img.save(str(tmp_path / name))
        out = open_image_rgb(str(tmp_path / name))
        assert out.mode == 'RGB' and out.size == (6, 5), name
    assert open_image_rgb(str(tmp_path / 'gray.png')).getpixel((0, 0)) == (77, 77, 77)
    assert open_image_rgb(str(tmp_path / 'palette.png')).getpixel((0, 0)) == (250, 5, 5)
    assert open_image_rgb(str(tmp_path / 'rgba.png')).getpixel((0, 0)) == (10, 20, 30)  # alpha dropped


def test_open_image_16bit_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = str(tmp_path / 'deep.png')
    Image.fromarray(arr).save(path)
    out = open_image_rgb(path)
    assert out.mode == 'RGB'
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_open_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r'ann.json item 3: image file not found: .*nope.jpg'):
        open_image_rgb(str(tmp_path / 'nope.jpg'), 'ann.json item 3')
    bad = tmp_path / 'bad.jpg'
    bad.write_bytes(b'not an image')
    with pytest.raises(DataError, match='cannot read image .*bad.jpg'):
        open_image_rgb(str(bad))
    full = tmp_path / 'full.jpg'
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(str(full))
    trunc = tmp_path / 'trunc.jpg'
    trunc.write_bytes(full.read_bytes()[:600])
    with pytest.raises(DataError, match='trunc.jpg'):
        open_image_rgb(str(trunc))
    assert issubclass(DataError, ValueError) and issubclass(DataError, UserError)


# ----------------------------------------------------------------------------------------------------------------
# Annotation loading
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('content,pattern', [
    ({'image': 'a.jpg'}, 'expected a JSON list of objects, got dict'),
    ([], 'the annotation list is empty'),
    ([{'image': 'a.jpg', 'caption': 'x'}, 'oops'], r'item 1: expected an object, got str'),
    ([{'image': 'a.jpg'}], r"item 0: missing key 'caption'"),
    ([{'image': 'a.jpg', 'caption': 'x'}, {'image': 5, 'caption': 'y'}], r"item 1: key 'image' must be str"),
    ([{'image': 'a.jpg', 'caption': ['ok', 3]}], r"item 0: key 'caption' must be str or list of strings"),
])
def test_annotation_errors_name_file_item_key_type(tmp_path, content, pattern):
    path = write_json(tmp_path / 'ann.json', content)
    with pytest.raises(DataError, match=pattern) as e:
        pretrain_dataset(path, ident)
    assert 'ann.json' in str(e.value) and '\n' not in str(e.value)


def test_annotation_file_level_errors(tmp_path):
    with pytest.raises(DataError, match='file not found'):
        load_annotations(str(tmp_path / 'missing.json'), {})
    broken = tmp_path / 'broken.json'
    broken.write_text('[{"image": ')
    with pytest.raises(DataError, match='broken.json: not valid JSON'):
        load_annotations(str(broken), {})
    with pytest.raises(DataError, match='non-empty list of paths'):
        load_annotations([], {})


def test_annotation_origin_across_files(tmp_path):
    f1 = write_json(tmp_path / 'one.json', [{'k': 1}, {'k': 2}])
    f2 = write_json(tmp_path / 'two.json', [{'k': 3}])
    ann = load_annotations([f1, f2], {'k': int})
    assert [a['k'] for a in ann] == [1, 2, 3]
    assert ann.origin(1) == (f1, 1) and ann.origin(2) == (f2, 0)


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bad', ['../a.jpg', 'sub/../../a.jpg', '/etc/passwd'])
def test_paths_escaping_image_root_are_refused(root, tmp_path, bad):
    ann = write_json(tmp_path / 'ann.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 1},
                                             {'image': bad, 'caption': 'y', 'image_id': 2}])
    with pytest.raises(DataError, match=r'ann.json item 1: image path .* escapes image_root'):
        re_train_dataset(ann, ident, root)


def test_allow_absolute_paths(root, tmp_path):
    absolute = os.path.join(root, 'a.jpg')
    ann = write_json(tmp_path / 'ann.json', [{'image': absolute, 'caption': 'x', 'image_id': 1},
                                             {'image': '../images/b.jpg', 'caption': 'y', 'image_id': 2}])
    ds = re_train_dataset(ann, ident, root, allow_absolute_paths=True)
    assert ds[0][0].getpixel((0, 0))[0] > 150 and ds[1][0].getpixel((0, 0))[1] > 150


# ----------------------------------------------------------------------------------------------------------------
# Dataset classes
# ----------------------------------------------------------------------------------------------------------------
def test_pretrain_dataset_paths_as_given_and_caption_lists(root, tmp_path):
    ann = write_json(tmp_path / 'pre.json', [
        {'image': os.path.join(root, 'a.jpg'), 'caption': 'A Dog, running!'},
        {'image': os.path.join(root, 'b.jpg'), 'caption': ['First one.', 'Second (one)']},
    ])
    ds = pretrain_dataset([ann, ann], build_transform('test', 8), max_words=2)
    assert len(ds) == 4
    image, caption = ds[0]
    assert image.shape == (3, 8, 8) and caption == 'a dog'
    seen = {ds[1][1] for _ in range(40)}
    assert seen == {'first one', 'second one'}


def test_pretrain_empty_caption_list_is_an_error(root, tmp_path):
    ann = write_json(tmp_path / 'pre.json', [{'image': os.path.join(root, 'a.jpg'), 'caption': []}])
    with pytest.raises(DataError, match="item 0: key 'caption' is an empty list"):
        pretrain_dataset(ann, ident)


def test_re_train_maps_image_ids_by_first_appearance(root, tmp_path):
    ann = write_json(tmp_path / 'tr.json', [
        {'image': 'b.jpg', 'caption': 'Green square.', 'image_id': 'img_b'},
        {'image': 'a.jpg', 'caption': 'red', 'image_id': 7},
        {'image': 'b.jpg', 'caption': 'again green', 'image_id': 'img_b'},
        {'image': 'sub/c.jpg', 'caption': 'blue', 'image_id': '7'},
    ])
    ds = re_train_dataset([ann], ident, root)
    assert ds.img_ids == {'img_b': 0, 7: 1, '7': 2}
    assert [ds[i][2] for i in range(4)] == [0, 1, 0, 2]
    assert ds[0][1] == 'green square'


def test_re_eval_exposes_text_image_maps(root, tmp_path):
    ann = write_json(tmp_path / 'ev.json', [
        {'image': 'a.jpg', 'caption': ['Red.', 'A red square']},
        {'image': 'sub/c.jpg', 'caption': ['Blue!']},
    ])
    ds = re_eval_dataset(ann, ident, root)
    assert len(ds) == 2
    assert ds.text == ['red', 'a red square', 'blue']
    assert ds.image == ['a.jpg', 'sub/c.jpg']
    assert ds.txt2img == {0: 0, 1: 0, 2: 1} and ds.img2txt == {0: [0, 1], 1: [2]}
    assert ds[1][1] == 1
    empty = write_json(tmp_path / 'ev2.json', [{'image': 'a.jpg', 'caption': ['x']}, {'image': 'b.jpg', 'caption': []}])
    with pytest.raises(DataError, match=r"ev2.json item 1: image 'b.jpg' has an empty caption list"):
        re_eval_dataset(empty, ident, root)


def test_vqa_train_weights_eos_and_roots(root, tmp_path):
    vg_root = tmp_path / 'vg'
    vg_root.mkdir()
    make_image(vg_root / 'v.jpg')
    answers = ['yes', 'yes', 'no', 'yes', 'maybe', 'no', 'yes', 'yes', 'no', 'yes']
    ann = write_json(tmp_path / 'vqa.json', [
        {'question': 'Is it red?', 'answer': answers, 'image': 'a.jpg', 'dataset': 'vqa'},
        {'question': 'What color is-it ', 'answer': 'Green', 'image': 'v.jpg', 'dataset': 'vg'},
    ])
    ds = vqa_dataset(ann, ident, root, str(vg_root), eos='[SEP]')
    image, question, ans, weights = ds[0]
    assert question == 'is it red'
    assert ans == ['yes[SEP]', 'no[SEP]', 'maybe[SEP]']
    expected = []
    for a in ['yes', 'no', 'maybe']:
        w = 0.0
        for x in answers:
            if x == a:
                w += 1 / len(answers)
        expected.append(w)
    assert weights == expected  # bit-exact repeated addition
    assert weights == pytest.approx([0.6, 0.3, 0.1])
    image, question, ans, weights = ds[1]
    assert question == 'what color is it' and ans == ['Green[SEP]'] and weights == [0.5]
    assert image.size == (12, 10)


def test_vqa_errors_and_test_split(root, tmp_path):
    bad = write_json(tmp_path / 'bad.json', [
        {'question': 'q', 'answer': ['a'], 'image': 'a.jpg', 'dataset': 'vqa'},
        {'question': 'q', 'answer': ['a'], 'image': 'a.jpg', 'dataset': 'coco'},
    ])
    with pytest.raises(DataError, match=r"bad.json item 1: key 'dataset' must be 'vqa' or 'vg', got 'coco'"):
        vqa_dataset(bad, ident, root, root)
    vg_without_root = write_json(tmp_path / 'vg.json', [{'question': 'q', 'answer': 'a', 'image': 'a.jpg',
                                                          'dataset': 'vg'}])
    with pytest.raises(DataError, match='vg_root is not configured'):
        vqa_dataset(vg_without_root, ident, root, None)
    long_q = ' '.join(['word'] * 60)
    test = write_json(tmp_path / 'test.json', [
        {'question_id': 11, 'question': long_q, 'image': 'a.jpg', 'dataset': 'vqa'},
        {'question_id': 12, 'question': 'Why?', 'image': 'b.jpg', 'dataset': 'vqa', 'answer': ['no', 'no']},
    ])
    answer_list = write_json(tmp_path / 'answers.json', ['yes', 'no', '2'])
    ds = vqa_dataset([test], ident, root, None, split='test', answer_list=answer_list)
    assert ds.answer_list == ['yes', 'no', '2']
    image, question, qid = ds[0]
    assert qid == 11 and len(question.split(' ')) == 50  # test split forces 50 words
    assert ds.gt_answers == {12: ['no', 'no']}
    with pytest.raises(DataError, match='answer_list'):
        vqa_dataset([test], ident, root, None, split='test')


def test_vqa_collate(root, tmp_path):
    ann = write_json(tmp_path / 'vqa.json', [
        {'question': 'q1', 'answer': ['a', 'b', 'a'], 'image': 'a.jpg', 'dataset': 'vqa'},
        {'question': 'q2', 'answer': ['c'], 'image': 'b.jpg', 'dataset': 'vqa'},
    ])
    ds = vqa_dataset(ann, build_transform('test', 8), root, None)
    images, questions, answers, weights, n = vqa_collate_fn([ds[0], ds[1]])
    assert images.shape == (2, 3, 8, 8) and questions == ['q1', 'q2']
    assert answers == ['a[SEP]', 'b[SEP]', 'c[SEP]'] and n == [2, 1]
    assert weights.dtype == torch.float32 and weights.tolist() == pytest.approx([2 / 3, 1 / 3, 1.0])


def test_nlvr_labels_and_two_images(root, tmp_path):
    ann = write_json(tmp_path / 'nlvr.json', [
        {'images': ['a.jpg', 'b.jpg'], 'sentence': 'Left is red.', 'label': 'True'},
        {'images': ['sub/c.jpg', 'a.jpg'], 'sentence': 'x', 'label': 'False'},
    ])
    ds = nlvr_dataset([ann], ident, root)
    img0, img1, sentence, label = ds[0]
    assert img0.getpixel((0, 0))[0] > 150 and img1.getpixel((0, 0))[1] > 150
    assert sentence == 'left is red' and label == 1 and ds[1][3] == 0
    bad = write_json(tmp_path / 'bad.json', [{'images': ['a.jpg', 'b.jpg'], 'sentence': 's', 'label': 'true'}])
    with pytest.raises(DataError, match=r"item 0: key 'label' must be the string 'True' or 'False'"):
        nlvr_dataset(bad, ident, root)
    bad = write_json(tmp_path / 'bad2.json', [{'images': ['a.jpg'], 'sentence': 's', 'label': 'True'}])
    with pytest.raises(DataError, match='exactly 2 image paths'):
        nlvr_dataset(bad, ident, root)


def test_ve_labels_and_jpg_extension(root, tmp_path):
    ann = write_json(tmp_path / 've.json', [
        {'image': 'a', 'sentence': 'A red thing.', 'label': 'entailment'},
        {'image': 'b', 'sentence': 'x', 'label': 'neutral'},
        {'image': 'sub/c', 'sentence': 'y', 'label': 'contradiction'},
    ])
    ds = ve_dataset(ann, ident, root)
    assert [ds[i][2] for i in range(3)] == [2, 1, 0] and ds[0][1] == 'a red thing'
    bad = write_json(tmp_path / 'bad.json', [{'image': 'a', 'sentence': 'x', 'label': 'maybe'}])
    with pytest.raises(DataError, match=r"item 0: key 'label' must be one of entailment, neutral, contradiction"):
        ve_dataset(bad, ident, root)


def test_grounding_train_ids_by_basename_and_test_ref_ids(root, tmp_path):
    (tmp_path / 'images' / 'other').mkdir()
    make_image(tmp_path / 'images' / 'other' / 'a.jpg')
    ann = write_json(tmp_path / 'g.json', [
        {'image': 'sub/c.jpg', 'text': 'Blue thing'},
        {'image': 'a.jpg', 'text': 'red'},
        {'image': 'other/a.jpg', 'text': 'same basename as a.jpg'},
    ])
    ds = grounding_dataset([ann], ident, root, mode='train')
    assert [ds[i][2] for i in range(3)] == [0, 1, 1] and ds[0][1] == 'blue thing'
    test = write_json(tmp_path / 'gt.json', [{'image': 'a.jpg', 'text': 't', 'ref_id': 42}])
    assert grounding_dataset([test], ident, root, mode='test')[0][2] == 42
    with pytest.raises(DataError, match="missing key 'ref_id'"):
        grounding_dataset([ann], ident, root, mode='test')


# ----------------------------------------------------------------------------------------------------------------
# Bad images: error vs skip
# ----------------------------------------------------------------------------------------------------------------
def test_missing_image_error_names_annotation_item(root, tmp_path):
    ann = write_json(tmp_path / 'tr.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 1},
                                            {'image': 'gone.jpg', 'caption': 'y', 'image_id': 2}])
    ds = re_train_dataset(ann, ident, root)
    with pytest.raises(DataError, match=r'tr.json item 1: image file not found: .*gone.jpg'):
        ds[1]


def test_skip_bad_images_substitutes_and_counts(root, tmp_path):
    (tmp_path / 'images' / 'broken.jpg').write_bytes(b'garbage')
    ann = write_json(tmp_path / 'tr.json', [
        {'image': 'a.jpg', 'caption': 'red', 'image_id': 1},
        {'image': 'gone.jpg', 'caption': 'gone', 'image_id': 2},
        {'image': 'broken.jpg', 'caption': 'broken', 'image_id': 3},
        {'image': 'b.jpg', 'caption': 'green', 'image_id': 4},
    ])
    ds = re_train_dataset(ann, ident, root, skip_bad_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert ds[1][1] == 'green' and ds.num_skipped == 2
        assert ds[2][1] == 'green' and ds.num_skipped == 3  # known-bad items are not re-read
        assert ds[0][1] == 'red'
    assert ds.bad_items == {1, 2}
    all_bad = write_json(tmp_path / 'bad.json', [{'image': 'gone.jpg', 'caption': 'x', 'image_id': 1}])
    ds = re_train_dataset(all_bad, ident, root, skip_bad_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(DataError, match='no readable item'):
            ds[0]


# ----------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------
def test_transforms_shapes_and_normalisation():
    img = Image.new('RGB', (40, 30), (255, 0, 128))
    out = build_transform('test', 16)(img)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = [(255 / 255 - MEAN[0]) / STD[0], (0 - MEAN[1]) / STD[1], (128 / 255 - MEAN[2]) / STD[2]]
    assert out[:, 5, 5].tolist() == pytest.approx(expected, abs=1e-5)
    for kind in ('pretrain', 'train', 'grounding_train'):
        np.random.seed(0)
        torch.manual_seed(0)
        t = build_transform(kind, 24)
        assert t(img).shape == (3, 24, 24)
        names = [type(s).__name__ for s in t.transforms]
        assert 'RandomAugment' in names and names[-2:] == ['ToTensor', 'Normalize']
    crop = build_transform('pretrain', 24).transforms[0]
    assert crop.scale == (0.2, 1.0) and str(crop.interpolation) == 'InterpolationMode.BICUBIC'
    assert build_transform('train', 24).transforms[0].scale == (0.5, 1.0)
    ra = build_transform('train', 24).transforms[2]
    assert (ra.N, ra.M, ra.isPIL) == (2, 7, True) and len(ra.augs) == 10
    assert type(build_transform('grounding_train', 24).transforms[0]).__name__ == 'Resize'
    with pytest.raises(ValueError, match="unknown transform kind 'val'"):
        build_transform('val', 24)


# ----------------------------------------------------------------------------------------------------------------
# create_dataset / samplers / loaders
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def task_files(root, tmp_path):
    f = {}
    f['pre'] = write_json(tmp_path / 'pre.json', [{'image': os.path.join(root, 'a.jpg'), 'caption': 'c'}])
    f['re_train'] = write_json(tmp_path / 'ret.json', [{'image': 'a.jpg', 'caption': 'c', 'image_id': 1},
                                                       {'image': 'b.jpg', 'caption': 'd', 'image_id': 2}])
    f['re_eval'] = write_json(tmp_path / 'ree.json', [{'image': 'a.jpg', 'caption': ['c', 'e']}])
    f['vqa_train'] = write_json(tmp_path / 'vqt.json', [{'question': 'q', 'answer': ['a'], 'image': 'a.jpg',
                                                          'dataset': 'vqa'}])
    f['vqa_test'] = write_json(tmp_path / 'vqs.json', [{'question_id': 1, 'question': 'q', 'image': 'a.jpg',
                                                         'dataset': 'vqa'}])
    f['answers'] = write_json(tmp_path / 'al.json', ['a', 'b'])
    f['nlvr'] = write_json(tmp_path / 'nl.json', [{'images': ['a.jpg', 'b.jpg'], 'sentence': 's', 'label': 'True'}])
    f['ve'] = write_json(tmp_path / 've.json', [{'image': 'a', 'sentence': 's', 'label': 'neutral'}])
    f['g_train'] = write_json(tmp_path / 'gtr.json', [{'image': 'a.jpg', 'text': 't'}])
    f['g_test'] = write_json(tmp_path / 'gte.json', [{'image': 'a.jpg', 'text': 't', 'ref_id': 3}])
    return f


def test_create_dataset_all_names(root, task_files):
    f = task_files
    base = {'image_res': 16, 'image_root': root}
    pre = create_dataset('pretrain', {**base, 'train_file': [f['pre'], f['pre']]})
    assert isinstance(pre, pretrain_dataset) and len(pre) == 2 and pre[0][0].shape == (3, 16, 16)
    assert isinstance(create_dataset('nlvr_pretrain', {'image_res': 16, 'train_file': f['pre']}), pretrain_dataset)
    tr, va, te = create_dataset('re', {**base, 'train_file': [f['re_train']], 'val_file': f['re_eval'],
                                       'test_file': f['re_eval']})
    assert isinstance(tr, re_train_dataset) and isinstance(te, re_eval_dataset) and va.text == ['c', 'e']
    tr, te = create_dataset('vqa', {'image_res': 16, 'train_file': [f['vqa_train']], 'test_file': [f['vqa_test']],
                                    'vqa_root': root, 'vg_root': root, 'answer_list': f['answers']})
    assert tr[0][2] == ['a[SEP]'] and te[0][2] == 1 and te.answer_list == ['a', 'b']
    sets = create_dataset('nlvr', {**base, 'train_file': [f['nlvr']], 'val_file': [f['nlvr']],
                                   'test_file': [f['nlvr']]})
    assert len(sets) == 3 and sets[0][0][3] == 1 and sets[2][0][0].shape == (3, 16, 16)
    sets = create_dataset('ve', {**base, 'train_file': f['ve'], 'val_file': f['ve'], 'test_file': f['ve']})
    assert len(sets) == 3 and sets[1][0][2] == 1
    tr, te = create_dataset('grounding', {**base, 'train_file': [f['g_train']], 'test_file': [f['g_test']]})
    assert tr[0][2] == 0 and te[0][2] == 3
    assert type(tr.transform.transforms[0]).__name__ == 'Resize'
    assert type(te.transform.transforms[1]).__name__ == 'ToTensor'



def test_create_dataset_config_errors(root, task_files):
    with pytest.raises(ConfigError, match="config key 'val_file' is required for dataset 're'"):
        create_dataset('re', {'image_res': 16, 'image_root': root, 'train_file': task_files['re_train']})
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        create_dataset('coco', {'image_res': 16})


def test_create_dataset_max_words_option(root, task_files, tmp_path):
    ann = write_json(tmp_path / 'long.json', [{'image': 'a.jpg', 'caption': 'one two three four', 'image_id': 1}])
    tr, _, _ = create_dataset('re', {'image_res': 8, 'image_root': root, 'train_file': ann,
                                     'val_file': task_files['re_eval'], 'test_file': task_files['re_eval'],
                                     'max_words': 2})
    assert tr[0][1] == 'one two'


def test_create_sampler_shards_with_padding(root, task_files):
    ds = re_eval_dataset(write_json(os.path.join(os.path.dirname(task_files['pre']), 'five.json'),
                                    [{'image': 'a.jpg', 'caption': ['x']}] * 5), ident, root)
    samplers = [create_sampler([ds], [False], 2, r)[0] for r in range(2)]
    shards = [list(s) for s in samplers]
    assert shards == [[0, 2, 4], [1, 3, 0]]  # padded by repeating indices
    s = create_sampler([ds, ds], [True, False], 1, 0)
    assert s[0].shuffle and not s[1].shuffle and s[0].seed == 0
    with pytest.raises(ValueError):
        create_sampler([ds], [True, False], 1, 0)


def test_create_loader_flags(root, task_files):
    tr, va, _ = create_dataset('re', {'image_res': 8, 'image_root': root, 'train_file': task_files['re_train'],
                                      'val_file': task_files['re_eval'], 'test_file': task_files['re_eval']})
    train_loader, val_loader = create_loader([tr, va], [None, None], [1, 4], [0, 0], [True, False], [None, None])
    assert train_loader.drop_last and not val_loader.drop_last
    assert type(train_loader.sampler).__name__ == 'RandomSampler'
    assert type(val_loader.sampler).__name__ == 'SequentialSampler'
    assert train_loader.pin_memory == torch.cuda.is_available()
    assert not train_loader.persistent_workers
    images, captions, idx = next(iter(train_loader))
    assert images.shape == (1, 3, 8, 8) and isinstance(captions, (list, tuple)) and idx.dtype == torch.int64
    sampler = create_sampler([tr], [True], 1, 0)[0]
    (loader,) = create_loader([tr], [sampler], [2], [0], [True], [None])
    assert loader.sampler is sampler


class _NoiseAug(torch.utils.data.Dataset):
    """Returns numpy's and python's next random numbers: exposes per-worker RNG seeding."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import random
        return torch.tensor([np.random.random(), random.random()], dtype=torch.float64)


def test_worker_seeding_differs_across_workers_and_is_reproducible():
    def run(seed):
        torch.manual_seed(seed)
        (loader,) = create_loader([_NoiseAug()], [None], [2], [2], [False], [None])
        assert loader.persistent_workers and loader.worker_init_fn is dataset.worker_init_fn
        return torch.cat(list(loader))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # worker 0 loads batches 0 and 2, worker 1 batches 1 and 3: their first draws must differ
    assert a[0, 0] != a[2, 0] and a[0, 1] != a[2, 1]


# ----------------------------------------------------------------------------------------------------------------
# Grounding helpers
# ----------------------------------------------------------------------------------------------------------------
def test_compute_iou_inclusive_intersection_plain_union():
    assert computeIoU([0, 0, 10, 10], [0, 0, 10, 10]) == pytest.approx(1.0)
    # overlap columns 5..9, rows 0..9 inclusive: 5 * 10 = 50; union 100 + 100 - 50
    assert computeIoU([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    # sharing exactly one column (x1 == x2) counts as disjoint
    assert computeIoU([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
    # two columns: inter = 2 * 10
    assert computeIoU([0, 0, 10, 10], [8, 0, 10, 10]) == pytest.approx(20 / 180)
    assert computeIoU([0, 0, 4, 4], [10, 10, 4, 4]) == 0.0
    # fractional boxes: x 2.5..6.5 (5 px inclusive), y 3..5 (3 px) -> 15; union 24 + 24 - 15
    assert computeIoU([1.5, 2.0, 6.0, 4.0], [2.5, 3.0, 6.0, 4.0]) == pytest.approx(15 / 33)


def test_proposal_scores_and_choose_box():
    m = np.zeros((20, 30))
    m[5:10, 10:20] = 1.0
    dets = [[10, 5, 10, 5, 0.9, 1], [0, 0, 30, 20], [10, 5, 5, 5]]
    scores = proposal_scores(m, dets, alpha=0.5)
    assert scores == pytest.approx([50 / 50 ** 0.5, 50 / 600 ** 0.5, 25 / 25 ** 0.5])
    c = choose_box(torch.tensor(m), dets)
    assert c.index == 0 and c.box == [10.0, 5.0, 10.0, 5.0] and not c.fallback
    # region rows int(y) .. int(y+h)-1: a box from y=4.6 with h=0.6 covers row 4 only (int(5.2) = 5)
    assert proposal_scores(m, [[10, 4.6, 1, 0.6]], alpha=0)[0] == 0.0
    assert proposal_scores(m, [[10, 4.6, 1, 1.0]], alpha=0)[0] == 0.0  # int(4.6)=4 .. int(5.6)-1=4: still row 4
    assert proposal_scores(m, [[10, 4.6, 1, 1.5]], alpha=0)[0] == 1.0  # rows 4..5
    # ties: the first best wins (as the original's strict '>')
    assert choose_box(m, [[10, 5, 5, 5], [15, 5, 5, 5]]).index == 0
    # all scores <= 0: still the argmax, flagged
    neg = -np.ones((20, 30))
    c = choose_box(neg, [[0, 0, 2, 2], [0, 0, 10, 10]])
    assert c.fallback and c.index == 0
    assert proposal_scores(m, [[0, 0, 0, 5]])[0] == -np.inf
    with pytest.raises(ValueError):
        choose_box(m, [])


def test_upsample_and_grounding_eval():
    class FakeRefer:
        Refs = {1: {'image_id': 7, 'split': 'val'}, 2: {'image_id': 7, 'split': 'testA'},
                3: {'image_id': 7, 'split': 'testB'}}
        refToAnn = {1: {'bbox': [0, 0, 24, 24]}, 2: {'bbox': [24, 24, 24, 24]}, 3: {'bbox': [0, 24, 24, 24]}}
        Imgs = {7: {'height': 48, 'width': 48}}

    top_left = torch.zeros(24, 24)
    top_left[:12, :12] = 1.0
    bottom_right = torch.zeros(24, 24)
    bottom_right[12:, 12:] = 1.0
    up = upsample_heatmap(top_left, 48, 48)
    assert up.shape == (48, 48) and up[:20, :20].mean() > 0.9 and up[28:, 28:].abs().max() < 0.1
    dets = {'7': [[0, 0, 24, 24], [24, 24, 24, 24], [0, 24, 24, 24]]}
    results = [{'ref_id': 1, 'pred': top_left}, {'ref_id': 2, 'pred': bottom_right.flatten()},
               {'ref_id': 3, 'pred': top_left}]
    out = grounding_eval(results, dets, None, FakeRefer(), verbose=False)
    assert out == {'val_d': 1.0, 'testA_d': 1.0, 'testB_d': 0.0}
    with pytest.raises(DataError, match='no proposals for image_id 7'):
        grounding_eval(results, {}, None, FakeRefer(), verbose=False)
