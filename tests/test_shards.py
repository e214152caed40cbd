"""webdataset tar shards for pretraining (dataset.shards, dataset.resumable.BlockOrderSampler): reading, the split
across ranks and workers, exact resume in the middle of a shard, shards mixed with JSON, bad members."""
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import create_dataset
from dataset.resumable import BlockOrderSampler, ResumableSampler, build_train_loader, shuffle_buffer
from dataset.shards import ShardDataset, expand_shards
from dataset.utils import is_shard_spec
from dataset.utils import DataError
from tests.toy import ROOT, launch_ranks


def jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (8, 8), (value % 256, (value * 7) % 256, 128)).save(buf, 'JPEG', quality=95)
    return buf.getvalue()


def add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, n_shards: int, per_shard: int, bad: dict | None = None) -> str:
    """Shards as img2dataset writes them: KEY.jpg + KEY.txt (even samples) or KEY.json (odd ones); caption
    'sample G' with G the global number. `bad` maps a global number to the image bytes to write instead."""
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f'{s:05d}.tar'), 'w') as tar:
            for i in range(per_shard):
                g = s * per_shard + i
                key = f'{s:05d}{i:04d}'
                add(tar, f'{key}.jpg', (bad or {}).get(g, jpeg(g)))
                if g % 2:
                    add(tar, f'{key}.json', json.dumps({'caption': f'sample {g}', 'url': 'x'}).encode())
                else:
                    add(tar, f'{key}.txt', f'sample {g}'.encode())
    return os.path.join(str(folder), f'{{00000..{n_shards - 1:05d}}}.tar')


def caption_of(image) -> str:
    return image


def test_spec_detection_and_brace_expansion(tmp_path):
    spec = write_shards(tmp_path, 3, 2)
    assert is_shard_spec(spec) and not is_shard_spec('a.json')
    assert [os.path.basename(p) for p in expand_shards(spec)] == ['00000.tar', '00001.tar', '00002.tar']
    with pytest.raises(DataError, match=r'^shard .*00003\.tar: file not found \(from .*\{00000\.\.00003\}\.tar\)$'):
        expand_shards(spec.replace('00002', '00003'))


def test_samples_read_in_order_with_captions_from_txt_and_json(tmp_path):
    ds = ShardDataset([write_shards(tmp_path, 2, 5)], lambda im: np.asarray(im)[0, 0].tolist())
    assert len(ds) == 10 and ds.blocks().tolist() == [[0, 5], [5, 5]]
    for g in range(10):
        pixel, caption = ds[g]
        assert caption == f'sample {g}'
        assert abs(pixel[0] - g) <= 3  # JPEG keeps a flat colour close
    assert ds.where(7) == f'{tmp_path}/00001.tar sample 2'


def test_shuffle_buffer_is_a_seeded_local_permutation():
    seq = np.arange(1000)
    a = shuffle_buffer(seq, 50, [1, 2])
    assert sorted(a.tolist()) == seq.tolist() and not np.array_equal(a, seq)
    assert np.array_equal(a, shuffle_buffer(seq, 50, [1, 2]))
    assert not np.array_equal(a, shuffle_buffer(seq, 50, [1, 3]))
    # Item k is emitted once it has been read: never before position k - 50.
    position = np.empty(1000, dtype=int)
    position[a] = np.arange(1000)
    assert (position >= seq - 50).all()


def test_block_order_partitions_ranks_and_keeps_shards_together(tmp_path):
    ds = ShardDataset([write_shards(tmp_path, 4, 6)], lambda im: im)
    orders = []
    for rank in range(2):
        s = BlockOrderSampler(ds, num_replicas=2, rank=rank, seed=0, batch_size=4, buffer_size=3)
        s.set_epoch(0)
        orders.append(list(s))
        assert isinstance(s, ResumableSampler) and len(s) == 12
    assert sorted(orders[0] + orders[1]) == list(range(24))
    # Each rank reads two whole shards.
    assert all(len({i // 6 for i in order}) == 2 for order in orders)


RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
from dataset import create_dataset
from dataset.resumable import build_train_loader
dist.init_process_group('gloo')
ds = create_dataset('pretrain', {{'image_res': 16, 'train_file': [{spec!r}]}})
loader = build_train_loader(ds, 4, 2, seed=0)
seen = {{}}
for epoch in range(2):
    loader.sampler.set_epoch(epoch)
    seen[epoch] = [c for _, captions in loader for c in captions]
with open(os.path.join({out!r}, f'rank{{dist.get_rank()}}.json'), 'w') as f:
    json.dump(seen, f)
dist.destroy_process_group()
"""


def test_two_ranks_two_workers_read_every_sample_once_per_epoch(tmp_path):
    spec = write_shards(tmp_path / 'shards', 3, 8)
    script = tmp_path / 'ranks.py'
    script.write_text(RANK_SCRIPT.format(root=ROOT, spec=spec, out=str(tmp_path)))
    procs = launch_ranks(str(script), [], world_size=2)
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    seen = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    everything = sorted(f'sample {g}' for g in range(24))
    for epoch in ('0', '1'):
        assert len(seen[0][epoch]) == len(seen[1][epoch]) == 12
        assert sorted(seen[0][epoch] + seen[1][epoch]) == everything
    assert seen[0]['0'] != seen[0]['1']  # another epoch, another order


def test_resume_in_the_middle_of_a_shard_continues_at_the_same_sample(tmp_path):
    """What --resume does: the checkpoint holds the epoch and the steps done in it; engine.fit calls
    loader.sampler.set_epoch(epoch, start_batch=steps_done) and the epoch goes on from the next sample, with the
    same random augmentation (seeded per sample), whatever the number of workers."""
    config = {'image_res': 16, 'train_file': [write_shards(tmp_path, 3, 10)]}
    ds = create_dataset('pretrain', config)
    full_loader = build_train_loader(ds, 4, 2, seed=5)
    assert isinstance(full_loader.sampler, ResumableSampler)  # what engine.fit checks before resuming exactly
    full_loader.sampler.set_epoch(1)
    full = list(full_loader)
    assert len(full) == 7
    resumed_loader = build_train_loader(create_dataset('pretrain', config), 4, 1, seed=5)
    resumed_loader.sampler.set_epoch(1, start_batch=3)
    resumed = list(resumed_loader)
    assert len(resumed_loader) == len(resumed) == 4
    order = full_loader.sampler.rank_order()
    assert order[12] % 10 not in (0, 9)  # the resume point is inside a shard, not at its edge
    for (img_a, cap_a), (img_b, cap_b) in zip(full[3:], resumed):
        assert list(cap_a) == list(cap_b)
        assert torch.equal(img_a, img_b)


def test_json_and_shards_mixed_in_one_config(tmp_path):
    spec = write_shards(tmp_path / 'shards', 2, 6)
    images = tmp_path / 'images'
    images.mkdir()
    items = []
    for j in range(8):
        path = images / f'{j}.jpg'
        path.write_bytes(jpeg(100 + j))
        items.append({'image': str(path), 'caption': f'json {j}'})
    ann = tmp_path / 'pretrain.json'
    ann.write_text(json.dumps(items))
    ds = create_dataset('pretrain', {'image_res': 16, 'train_file': [str(ann), spec]})
    assert isinstance(ds, ShardDataset) and len(ds) == 20
    assert ds.where(12) == f'{ann} item 0'
    loader = build_train_loader(ds, 4, 0, seed=0)
    loader.sampler.set_epoch(0)
    captions = [c for _, batch in loader for c in batch]
    assert sorted(captions) == sorted([f'sample {g}' for g in range(12)] + [f'json {j}' for j in range(8)])


def test_bad_members_are_named_or_skipped_and_counted(tmp_path):
    spec = write_shards(tmp_path, 2, 5, bad={3: b'not a jpeg at all'})
    shard0 = os.path.join(str(tmp_path), '00000.tar')
    strict = ShardDataset([spec], lambda im: im)
    with pytest.raises(DataError) as e:
        strict[3]
    message = str(e.value)
    assert re.match(rf'^{re.escape(shard0)} sample 3 \(000000003\): cannot read image 000000003\.jpg \(', message)
    assert '\n' not in message
    skipping = ShardDataset([spec], lambda im: im, skip_bad_images=True)
    with pytest.warns(UserWarning, match='skipping bad item: .*sample 3'):
        captions = [skipping[g][1] for g in range(10)]
    assert captions[3] == 'sample 4' and skipping.num_skipped == 1  # replaced by the next readable sample
    assert skipping[3][1] == 'sample 4' and skipping.num_skipped == 2  # known bad: not decoded again


def test_samples_without_caption_or_image_and_damaged_shards(tmp_path):
    path = tmp_path / '00000.tar'
    with tarfile.open(path, 'w') as tar:
        add(tar, 'a.jpg', jpeg(1))             # no caption
        add(tar, 'b.txt', b'caption only')      # no image
        add(tar, 'c.jpg', jpeg(2))
        add(tar, 'c.json', b'{"caption": 5}')  # caption of the wrong type
        add(tar, 'd.jpg', jpeg(3))
        add(tar, 'd.txt', b'\xff\xfe')          # not UTF-8
    ds = ShardDataset([str(path)], lambda im: im)
    expected = [r'sample 0 \(a\): no caption \(a a\.txt member or a a\.json member with a caption\)$',
                r'sample 1 \(b\): no image member \(\.jpg, \.jpeg, \.png, \.webp\); it has: txt$',
                r"sample 2 \(c\): key 'caption' of c\.json must be str or a non-empty list of strings, got 5$",
                r'sample 3 \(d\): d\.txt is not UTF-8 text \(byte 0xff at offset 0\)$']
    for g, message in enumerate(expected):
        with pytest.raises(DataError, match=f'^{re.escape(str(path))} {message}'):
            ds[g]
    (tmp_path / 'broken.tar').write_bytes(b'\x00garbage' * 100)
    with pytest.raises(DataError, match=r'^shard .*broken\.tar: (not a readable tar file|holds no samples)'):
        ShardDataset([str(tmp_path / 'broken.tar')], lambda im: im)
    truncated = tmp_path / 'cut.tar'
    truncated.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(DataError, match=r'^shard .*cut\.tar: not a readable tar file'):
        ShardDataset([str(truncated)], lambda im: im)
