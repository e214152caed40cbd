"""Index files: flat numpy arrays derived from a large input file, written once and memory-mapped afterwards.

A 14M-item annotation JSON or a few hundred tar shards take minutes to parse and check; the result (item offsets,
packed item bytes, sample offsets) depends only on the file's content and on how it was checked. `cached_arrays`
stores that result in one file beside the input (or, when that folder is not writable, under
$ALBEF_INDEX_DIR, default ~/.cache/albef/index), stamped with the input's size and modification time and a tag
naming the checks; while both are unchanged the next run maps it read-only instead of parsing again. Mapped pages
belong to the page cache, so DataLoader workers forked from the process (and other ranks on the machine) share
them instead of each holding a copy.

File layout: a 4096-byte JSON header (padded with spaces) followed by each array's raw bytes, 64-byte aligned.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Mapping

import numpy as np

FORMAT = 'albef-index-1'
HEADER_BYTES = 4096
# Smaller inputs are parsed every time: the saving would be milliseconds and tests would litter their folders.
MIN_SOURCE_BYTES = 8 << 20


def _stamp(source: str) -> dict:
    st = os.stat(source)
    return {'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def _candidates(source: str, tag: str) -> list[str]:
    """Where the index of `source` checked as `tag` may live: beside it, then in the user's cache folder."""
    digest = hashlib.sha1(f'{os.path.realpath(source)}\0{tag}'.encode('utf-8', 'surrogatepass')).hexdigest()[:16]
    folder, name = os.path.split(os.path.abspath(source))
    cache = os.environ.get('ALBEF_INDEX_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'albef', 'index')
    return [os.path.join(folder, f'.{name}.{digest}.idx'), os.path.join(cache, f'{name}.{digest}.idx')]


def _read(path: str, source_stamp: dict, tag: str) -> dict[str, np.ndarray] | None:
    try:
        with open(path, 'rb') as f:
            header = json.loads(f.read(HEADER_BYTES).decode('ascii'))
        if (header.get('format') != FORMAT or header.get('tag') != tag
                or header.get('source') != source_stamp or os.path.getsize(path) != header['total']):
            return None
        return {name: np.memmap(path, dtype=np.dtype(dt), mode='r', offset=off, shape=tuple(shape))
                for name, (dt, shape, off) in header['arrays'].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, stale, or damaged: rebuild


def _write(path: str, arrays: Mapping[str, np.ndarray], source_stamp: dict, tag: str) -> bool:
    layout, offset = {}, HEADER_BYTES
    for name, arr in arrays.items():
        layout[name] = (arr.dtype.str, list(arr.shape), offset)
        offset += -(-arr.nbytes // 64) * 64
    header = json.dumps({'format': FORMAT, 'tag': tag, 'source': source_stamp, 'arrays': layout, 'total': offset})
    if len(header) > HEADER_BYTES:
        return False
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=folder)
    except OSError:
        return False
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(header.encode('ascii').ljust(HEADER_BYTES, b' '))
            for name, arr in arrays.items():
                f.seek(layout[name][2])
                f.write(np.ascontiguousarray(arr).tobytes())
            f.truncate(offset)
        os.replace(tmp, path)  # atomic: ranks building the same index at once each write a whole file
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def cached_arrays(source: str, tag: str, build: Callable[[], Mapping[str, np.ndarray]],
                  min_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays `build()` derives from file `source`, reused from an index file while `source` is unchanged.

    `tag` must name everything besides the file's content that the arrays depend on (the checks applied, the
    format version of the caller). Inputs under `min_bytes` (default MIN_SOURCE_BYTES) are never indexed. When no
    index can be written (read-only folders) the built arrays are returned as they are.
    """
    stamp = _stamp(source)
    small = stamp['size'] < (MIN_SOURCE_BYTES if min_bytes is None else min_bytes)
    if small:
        return dict(build())
    places = _candidates(source, tag)
    for path in places:
        found = _read(path, stamp, tag)
        if found is not None:
            return found
    arrays = dict(build())
    if _stamp(source) != stamp:  # changed while we read it: do not label the result with the new stamp
        return arrays
    for path in places:
        if _write(path, arrays, stamp, tag):
            mapped = _read(path, stamp, tag)
            if mapped is not None:
                return mapped  # map it, so the built copy is freed and workers share the pages
    return arrays
