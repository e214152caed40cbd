"""Pretraining pairs from webdataset tar shards (img2dataset's output), alone or mixed with JSON annotation files.

A `train_file` entry ending in `.tar` names shards, brace notation allowed (`/data/cc3m/{00000..00331}.tar`,
expanded with braceexpand). A shard holds samples as consecutive members sharing a key: `KEY.jpg` (or .jpeg,
.png, .webp) and the caption in `KEY.txt` or as `caption` (a string or a list of strings) of `KEY.json`. Members
are split into samples by webdataset's rules (`base_plus_ext` keys, `group_by_keys`).

Reading: once per shard, its headers are scanned (tarfile) for where every sample's members lie (flat arrays kept in
an index file beside the shard while it is unchanged, see dataset.index_cache). A sample is then one positioned read
(`os.pread`) of its bytes, cut into members and grouped by webdataset's `group_by_keys`, so `ShardDataset` is an
ordinary indexable dataset: the order (shards shuffled per epoch, split into contiguous ranges across ranks, a
seeded shuffle buffer within the range) comes from `dataset.resumable.BlockOrderSampler`, and exact resume, per-
sample augmentation seeds and the bad-image policy work as for JSON files. JSON entries of the same list become
further samples after the shard samples, ordered in blocks of JSON_BLOCK consecutive items.
"""
from __future__ import annotations

import json
import os
import random
import re
import tarfile

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import Dataset
from webdataset.tariterators import base_plus_ext, group_by_keys

from dataset.caption_dataset import pretrain_dataset
from dataset.index_cache import cached_arrays
from dataset.utils import (DataError, ImageDatasetBase, as_file_list, brief, check_regular_file, check_visible_text,
                           decode_image_rgb, is_shard_spec, pre_caption)

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
JSON_BLOCK = 10_000          # JSON items per block of the epoch order (a shard is one block)
_OPEN_SHARDS = 64            # file descriptors kept open per process


def expand_shards(spec: str) -> list[str]:
    """The shard paths of one entry (brace notation expanded); each must be a regular file."""
    paths = list(braceexpand(spec))
    for path in paths:
        try:
            check_regular_file(path, 'shard')
        except FileNotFoundError:
            raise DataError(f'shard {path}: file not found' + (f' (from {spec})' if path != spec else '')) from None
    return paths


_META = re.compile(r'__[^/]*__($|/)')  # webdataset's skip_meta: members such as __index__ are no sample's


def scan_shard(path: str) -> dict[str, np.ndarray]:
    """Where a shard's samples and members lie, so that reading one needs no tar parsing:
    sample i is members first_member[i] .. first_member[i+1]-1 (consecutive members sharing a key, as webdataset
    groups them); member j's data is `size[j]` bytes at `data_offset[j]`, its name bytes
    names[name_offsets[j]:name_offsets[j+1]] (UTF-8)."""
    first, offsets, sizes, names, last_key = [], [], [], [], None
    try:
        with tarfile.open(path, mode='r:') as tar:
            for member in tar:
                key, _ = base_plus_ext(member.name)
                if key is None or not member.isreg() or _META.match(member.name):
                    continue  # webdataset skips these too
                if key != last_key:
                    first.append(len(offsets))
                    last_key = key
                offsets.append(member.offset_data)
                sizes.append(member.size)
                names.append(member.name.encode('utf-8', 'surrogateescape'))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f'shard {path}: not a readable tar file ({_first_line(e)})') from None
    if not first:
        raise DataError(f'shard {path}: holds no samples (members named KEY.jpg, KEY.txt, ...)')
    name_offsets = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum([len(n) for n in names], out=name_offsets[1:])
    return {'first_member': np.asarray(first + [len(offsets)], dtype=np.int64),
            'data_offset': np.asarray(offsets, dtype=np.int64), 'size': np.asarray(sizes, dtype=np.int64),
            'name_offsets': name_offsets, 'names': np.frombuffer(b''.join(names), dtype=np.uint8)}


def _shard_index(path: str) -> dict[str, np.ndarray]:
    return cached_arrays(path, 'shard-index-2', lambda: scan_shard(path))


def _first_line(e: BaseException) -> str:
    # webdataset appends context to an exception's args: its message is the first one
    text = str(e.args[0]) if len(e.args) > 1 else str(e)
    return (text.splitlines() or [type(e).__name__])[0]


class ShardDataset(ImageDatasetBase, Dataset):
    """Pretraining pairs from tar shards, then from JSON annotation files: item (image tensor, normalised caption).

    `train_files`: a list of entries, each a shard spec (see is_shard_spec) or a JSON annotation file (read by
    `pretrain_dataset` with the same options). Indices 0 .. num_shard_samples-1 are shard samples in shard order,
    the rest the JSON items. `blocks()` gives the units the epoch order keeps together.
    A sample without an image member or caption, an undecodable image or an empty caption is a DataError naming
    the shard and the sample's key; with `skip_bad_images` it is replaced by the next readable sample and counted
    in `num_skipped` (see ImageDatasetBase).
    """

    def __init__(self, train_files, transform, max_words: int = 30, *, image_root: str = '',
                 allow_absolute_paths: bool = True, skip_bad_images: bool = False):
        entries = as_file_list(train_files, 'train_file')
        self.shards: list[str] = [p for e in entries if is_shard_spec(e) for p in expand_shards(e)]
        # Per shard: numpy arrays for small shards, read on demand from index files for large ones.
        self.index = [_shard_index(p) for p in self.shards]
        counts = np.asarray([len(ix['first_member']) - 1 for ix in self.index], dtype=np.int64)
        self.shard_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first sample of each shard
        json_files = [e for e in entries if not is_shard_spec(e)]
        # The JSON part opens and transforms its items; the bad-image policy is ours, over all indices.
        self.json_part = (pretrain_dataset(json_files, transform, max_words, image_root=image_root,
                                           allow_absolute_paths=allow_absolute_paths)
                          if json_files else None)
        self.num_shard_samples = int(self.shard_first[-1])
        self.transform = transform
        self.max_words = max_words
        self._fds: dict[str, int] = {}
        self._fd_pid = os.getpid()
        self._init_image_loading(skip_bad_images)

    def __len__(self) -> int:
        return self.num_shard_samples + (len(self.json_part) if self.json_part is not None else 0)

    def blocks(self) -> np.ndarray:
        """[n_blocks, 2] (first index, length): each shard, then the JSON items in runs of JSON_BLOCK."""
        shard_blocks = np.stack([self.shard_first[:-1], np.diff(self.shard_first)], axis=1)
        n_json = len(self) - self.num_shard_samples
        firsts = np.arange(0, n_json, JSON_BLOCK, dtype=np.int64)
        json_blocks = np.stack([self.num_shard_samples + firsts, np.minimum(JSON_BLOCK, n_json - firsts)], axis=1)
        return np.concatenate([shard_blocks, json_blocks]).astype(np.int64)

    def where(self, index: int) -> str:
        """'shard sample N' or 'file item N' for error messages."""
        if index >= self.num_shard_samples:
            return self.json_part.ann.where(index - self.num_shard_samples)
        k = int(np.searchsorted(self.shard_first, index, side='right')) - 1
        return f'{self.shards[k]} sample {index - int(self.shard_first[k])}'

    # -- reading -----------------------------------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        if self._fd_pid != os.getpid():  # a forked worker: keep the parent's descriptors for the parent
            self._fds, self._fd_pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= _OPEN_SHARDS:
                os.close(self._fds.pop(next(iter(self._fds))))
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f'shard {path}: cannot read ({e.strerror or e})') from None
            self._fds[path] = fd
        return fd

    def read_sample(self, index: int) -> dict:
        """The raw members of shard sample `index` as webdataset groups them: {'__key__', 'jpg': bytes, ...}.
        One positioned read of the sample's bytes; the index says where each member's data lies in them."""
        k = int(np.searchsorted(self.shard_first, index, side='right')) - 1
        path, i, ix = self.shards[k], index - int(self.shard_first[k]), self.index[k]
        j0, j1 = ix['first_member'][i:i + 2].tolist()
        offsets, sizes = ix['data_offset'][j0:j1].tolist(), ix['size'][j0:j1].tolist()
        name_offsets = ix['name_offsets'][j0:j1 + 1].tolist()
        names = ix['names'][name_offsets[0]:name_offsets[-1]].tobytes()
        start, end = offsets[0], offsets[-1] + sizes[-1]
        where = f'{path} sample {i}'
        try:
            blob = os.pread(self._fd(path), end - start, start)
        except OSError as e:
            raise DataError(f'{where}: cannot read the shard ({e.strerror or e})') from None
        if len(blob) != end - start:
            raise DataError(f'{where}: the shard is shorter than when it was indexed ({len(blob)} of {end - start} '
                            f'bytes at offset {start})')
        n0 = name_offsets[0]
        members = [{'fname': names[name_offsets[m] - n0:name_offsets[m + 1] - n0].decode('utf-8', 'surrogateescape'),
                    'data': blob[off - start:off - start + size], '__url__': path}
                   for m, (off, size) in enumerate(zip(offsets, sizes))]
        try:
            samples = list(group_by_keys(members))
        except ValueError as e:  # a key with two members of the same extension
            raise DataError(f'{where}: {_first_line(e)}') from None
        if len(samples) != 1:
            raise DataError(f'{where}: expected the members of one sample, found {len(samples)} samples')
        return samples[0]

    def _load(self, index: int):
        if index >= self.num_shard_samples:
            return self.json_part._load(index - self.num_shard_samples)
        sample = self.read_sample(index)
        key = sample.get('__key__')
        where = f'{self.where(index)} ({key})'
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            members = ', '.join(sorted(k for k in sample if not k.startswith('__')))
            raise DataError(f'{where}: no image member (.{", .".join(IMAGE_EXTENSIONS)}); it has: {members}')
        image = decode_image_rgb(sample[ext], f'{key}.{ext}', where)
        caption = self._caption(sample, key, where)
        return self.transform(image), pre_caption(caption, self.max_words)

    def _caption(self, sample: dict, key: str, where: str) -> str:
        if 'txt' in sample:
            try:
                caption = sample['txt'].decode('utf-8')
            except UnicodeDecodeError as e:
                raise DataError(f'{where}: {key}.txt is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset '
                                f'{e.start})') from None
        elif 'json' in sample:
            try:
                meta = json.loads(sample['json'])
            except (ValueError, RecursionError) as e:
                raise DataError(f'{where}: {key}.json is not valid JSON ({_first_line(e)})') from None
            caption = meta.get('caption') if isinstance(meta, dict) else None
            if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
                caption = random.choice(caption)
            if not isinstance(caption, str):
                raise DataError(f"{where}: key 'caption' of {key}.json must be str or a non-empty list of strings, "
                                f"got {brief(caption)}")
        else:
            raise DataError(f'{where}: no caption (a {key}.txt member or a {key}.json member with a caption)')
        check_visible_text(caption, 'caption', where)
        return caption

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_fds'] = {}  # descriptors do not travel to spawned workers
        return state

    def __del__(self):
        if getattr(self, '_fd_pid', None) == os.getpid():
            for fd in getattr(self, '_fds', {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass
