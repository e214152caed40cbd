"""The packed annotation store (dataset.utils.Annotations) and its index files (dataset.index_cache): the same
items and the same one-line errors as reading the JSON directly, whether the file is parsed or its index reused."""
import json
import os

import numpy as np
import pytest

from dataset import index_cache
from dataset.index_cache import FileArray
from dataset.caption_dataset import pretrain_dataset, re_train_dataset
from dataset.utils import Annotations, DataError, load_annotations

ITEMS = [
    {'image': 'a.jpg', 'caption': 'plain ascii', 'image_id': 1},
    {'image': 'b.jpg', 'caption': ['a list', 'of captions'], 'image_id': 'x2', 'extra': {'nested': [1, 2.5, None]}},
    {'image': 'c.jpg', 'caption': 'non-ascii: caf\u00e9 \u65e5\u672c \U0001f600 and a lone \ud800 surrogate',
     'image_id': 3, 'score': 1e308, 'flag': True},
]


def write(path, items):
    path.write_text(json.dumps(items))
    return str(path)


@pytest.fixture
def indexed(monkeypatch, tmp_path):
    """Index every file, however small, and keep the user cache folder inside tmp_path."""
    monkeypatch.setattr(index_cache, 'MIN_SOURCE_BYTES', 0)
    monkeypatch.setenv('ALBEF_INDEX_DIR', str(tmp_path / 'cache'))


def test_items_equal_the_json_across_files(tmp_path):
    f1, f2 = write(tmp_path / 'one.json', ITEMS), write(tmp_path / 'two.json', ITEMS[:2])
    ann = load_annotations([f1, f2], {'image': str})
    expected = ITEMS + ITEMS[:2]
    assert len(ann) == 5 and list(ann) == expected
    assert [ann[i] for i in range(-5, 0)] == expected and ann[1:4] == expected[1:4]
    assert ann.where(4) == f'{f2} item 1' and ann.origin(2) == (f1, 2)
    with pytest.raises(IndexError):
        ann[5]


def test_items_are_packed_bytes_not_python_objects(tmp_path):
    path = write(tmp_path / 'a.json', ITEMS * 100)
    ann = load_annotations(path, {})
    assert all(isinstance(o, np.ndarray) and o.dtype == np.int64 for o, _ in ann.parts)
    assert all(isinstance(d, np.ndarray) and d.dtype == np.uint8 for _, d in ann.parts)
    assert ann.nbytes < 1.5 * os.path.getsize(path)
    ann[0]['image'] = 'changed'  # a fresh dict per access: the store stays read-only
    assert ann[0]['image'] == 'a.jpg'


def test_from_items_round_trips():
    ann = Annotations.from_items(ITEMS)
    assert list(ann) == ITEMS and ann.where(1) == '<items> item 1'


def test_index_file_is_written_once_and_reused(indexed, tmp_path):
    path = write(tmp_path / 'a.json', ITEMS)
    first = load_annotations(path, {'image': str}, index_tag='t')
    idx = [n for n in os.listdir(tmp_path) if n.endswith('.idx')]
    assert len(idx) == 1 and idx[0].startswith('.a.json.')
    second = load_annotations(path, {'image': str}, index_tag='t')
    assert isinstance(second.parts[0][1], FileArray) and list(first) == list(second) == ITEMS
    # Another check (tag) gets its own index; a changed file is parsed again.
    assert list(load_annotations(path, {'image': str}, index_tag='other')) == ITEMS
    assert len([n for n in os.listdir(tmp_path) if n.endswith('.idx')]) == 2
    write(tmp_path / 'a.json', ITEMS[:1])
    assert list(load_annotations(path, {'image': str}, index_tag='t')) == ITEMS[:1]


def test_without_a_tag_checks_always_run(indexed, tmp_path):
    path = write(tmp_path / 'a.json', ITEMS)
    calls = []
    load_annotations(path, {}, check=lambda item, where: calls.append(where))
    load_annotations(path, {}, check=lambda item, where: calls.append(where))
    assert len(calls) == 6 and not [n for n in os.listdir(tmp_path) if n.endswith('.idx')]


def test_read_only_folder_falls_back_to_the_cache_folder(indexed, tmp_path):
    folder = tmp_path / 'ro'
    folder.mkdir()
    path = write(folder / 'a.json', ITEMS)
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip('running as a user who may write anywhere')
        load_annotations(path, {}, index_tag='t')
        assert [n for n in os.listdir(tmp_path / 'cache') if n.endswith('.idx')]
        assert list(load_annotations(path, {}, index_tag='t')) == ITEMS
    finally:
        folder.chmod(0o755)


BAD = [
    ('[{"image": ', r'^{f}: not valid JSON \(Expecting value at line 1 column 12\)$'),
    ('{"image": "a.jpg"}', r'^{f}: expected a JSON list of objects, got dict$'),
    ('[]', r'^{f}: the annotation list is empty$'),
    ('[{"image": "a.jpg", "caption": "x"}, 3]', r'^{f} item 1: expected an object, got int$'),
    ('[{"caption": "x"}]', r"^{f} item 0: missing key 'image'$"),
    ('[{"image": "a.jpg", "caption": 5}]', r"^{f} item 0: key 'caption' must be str or list of strings, got 5$"),
    ('[{"image": "a.jpg", "caption": ["ok", 1]}]', r"^{f} item 0: key 'caption' must be str or list of strings"),
    ('[{"image": "a.jpg", "caption": "\\u200b"}]', r"^{f} item 0: key 'caption' is empty"),
    ('[{"image": "a.jpg", "caption": []}]', r"^{f} item 0: key 'caption' is an empty list$"),
    ('[{"image": "", "caption": "x"}]', r'^{f} item 0: image path must be a non-empty string'),
]


@pytest.mark.parametrize('use_index', [False, True])
@pytest.mark.parametrize('text,message', BAD)
def test_bad_files_keep_their_messages(monkeypatch, tmp_path, text, message, use_index):
    if use_index:
        monkeypatch.setattr(index_cache, 'MIN_SOURCE_BYTES', 0)
        monkeypatch.setenv('ALBEF_INDEX_DIR', str(tmp_path / 'cache'))
    path = tmp_path / 'bad.json'
    path.write_text(text)
    for _ in range(2):  # a failed check is never stored: the second load fails the same way
        with pytest.raises(DataError, match=message.replace('{f}', str(path).replace('\\', '\\\\'))):
            pretrain_dataset(str(path), lambda im: im)
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.idx')]


def test_indexed_file_still_reports_missing_and_unreadable_files(indexed, tmp_path):
    path = write(tmp_path / 'a.json', ITEMS)
    load_annotations(path, {}, index_tag='t')
    os.chmod(path, 0)
    try:
        if not os.access(path, os.R_OK):
            with pytest.raises(DataError, match='cannot read'):
                load_annotations(path, {}, index_tag='t')
    finally:
        os.chmod(path, 0o644)
    os.unlink(path)
    with pytest.raises(DataError, match=r'^annotation file .*a\.json: file not found$'):
        load_annotations(path, {}, index_tag='t')


def test_indexed_dataset_still_refuses_escaping_paths_when_loading(indexed, tmp_path):
    """Path checks skipped with a reused index are still made when the item is opened."""
    root = tmp_path / 'images'
    root.mkdir()
    ann = write(tmp_path / 'ann.json', [{'image': 'a.jpg', 'caption': 'x', 'image_id': 1}])
    re_train_dataset(ann, lambda im: im, str(root))
    outside = tmp_path / 'outside'
    outside.mkdir()
    (root / 'a.jpg').symlink_to(outside / 'a.jpg')
    ds = re_train_dataset(ann, lambda im: im, str(root))  # index reused: no per-item checks
    with pytest.raises(DataError, match=r'ann\.json item 0: image path .* escapes image_root .* symbolic link'):
        ds[0]


@pytest.mark.parametrize('dump', [
    lambda items: json.dumps(items),                                     # ASCII: items read in place
    lambda items: json.dumps(items, indent=2),                           # ASCII, pretty-printed
    lambda items: json.dumps(items, ensure_ascii=False).replace('\ud800', 'x'),  # UTF-8: items re-encoded
    lambda items: ' \n[' + json.dumps(items)[1:-1] + ' ]\n',             # spaces around the list
])
def test_every_layout_of_a_file_gives_the_same_items(indexed, tmp_path, dump):
    items = [dict(it) for it in ITEMS] + [{'image': 'n.jpg', 'caption': 'x', 'v': float('inf')}]
    for it in items:
        if isinstance(it.get('caption'), str):
            it['caption'] = it['caption'].replace('\ud800', 'x')
    path = tmp_path / 'a.json'
    path.write_text(dump(items), encoding='utf-8')
    expected = json.loads(path.read_text(encoding='utf-8'))
    assert list(load_annotations(str(path), {})) == expected  # parsed (small file: in memory)
    assert list(load_annotations(str(path), {}, index_tag='t')) == expected  # builds the index
    assert list(load_annotations(str(path), {}, index_tag='t')) == expected  # reuses it


def test_ascii_file_index_holds_offsets_only(indexed, tmp_path):
    path = write(tmp_path / 'a.json', ITEMS * 200)
    load_annotations(path, {}, index_tag='t')
    ann = load_annotations(path, {}, index_tag='t')
    idx = [tmp_path / n for n in os.listdir(tmp_path) if n.endswith('.idx')][0]
    assert os.path.getsize(idx) < 4096 + 16 * 600 + 64 and ann[599] == ITEMS[2]
    # Changed in place while in use: the item no longer decodes, and the error says why.
    with open(path, 'r+b') as f:
        f.write(b'#' * 200)
    with pytest.raises(DataError, match=r'a\.json item 0: cannot decode the item; was .*a\.json changed while in use'):
        ann[0]


@pytest.mark.parametrize('use_index', [False, True])
def test_a_fifo_is_refused_without_opening_it(monkeypatch, tmp_path, use_index):
    """Opening a named pipe for reading blocks until a writer comes: it must be refused from its file type."""
    if use_index:
        monkeypatch.setattr(index_cache, 'MIN_SOURCE_BYTES', 0)
        monkeypatch.setenv('ALBEF_INDEX_DIR', str(tmp_path / 'cache'))
    fifo = tmp_path / 'ann.json'
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r'^annotation file .*ann\.json: is a named pipe \(FIFO\), not a regular file$'):
        load_annotations(str(fifo), {}, check=lambda item, where: None, index_tag='t' if use_index else None)
