"""Index files: flat numpy arrays derived from a large input file, written once and memory-mapped afterwards.

A 14M-item annotation JSON or a few hundred tar shards take minutes to parse and check; the result (item offsets,
packed item bytes, sample offsets) depends only on the file's content and on how it was checked. `cached_arrays`
stores that result in one file beside the input (or, when that folder is not writable, under
$ALBEF_INDEX_DIR, default ~/.cache/albef/index), stamped with the input's size and modification time and a tag
naming the checks; while both are unchanged the next run reads it instead of parsing again. The stored arrays come
back as `FileArray`s, read with positioned reads (os.pread) on demand: their bytes stay in the kernel's page cache,
shared by every process and rank on the machine and reclaimable under memory pressure, and no process holds a
copy or even a mapping (so none counts them in its resident or proportional set size).

File layout: a 4096-byte JSON header (padded with spaces) followed by each 1-D array's raw bytes, 64-byte aligned.
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


class FileArray:
    """A read-only 1-D array stored in a file at `offset`, read on demand with os.pread.

    `a[i]` is a numpy scalar, `a[i:j]` (step 1) a numpy array, for uint8 data `a.read(i, j)` the bytes. The file is
    opened lazily once per process (a descriptor inherited through fork is reused: pread has no shared position),
    and a pickled FileArray carries only its path, so spawned workers open the file themselves.
    """

    def __init__(self, path: str, offset: int, dtype, length: int):
        self.path, self.offset, self.dtype, self.length = path, int(offset), np.dtype(dtype), int(length)
        self._fd = None

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    @property
    def nbytes(self) -> int:
        return self.length * self.dtype.itemsize

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, start: int, stop: int) -> bytes:
        """The raw bytes of elements start .. stop-1 (0 <= start <= stop <= len)."""
        size = self.dtype.itemsize
        n = (stop - start) * size
        data = os.pread(self._fileno(), n, self.offset + start * size)
        if len(data) != n:
            raise OSError(f'{self.path}: index file shorter than its header says')
        return data

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self.length)
            if step != 1:
                raise IndexError('FileArray slices take no step')
            return np.frombuffer(self.read(start, max(start, stop)), dtype=self.dtype)
        i = int(index)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f'index {index} out of range ({self.length})')
        return np.frombuffer(self.read(i, i + 1), dtype=self.dtype)[0]

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != '_fd'}

    def __setstate__(self, state):
        self.__dict__.update(state, _fd=None)

    def __del__(self):
        if getattr(self, '_fd', None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _read(path: str, source_stamp: dict, tag: str) -> dict[str, FileArray] | None:
    try:
        with open(path, 'rb') as f:
            header = json.loads(f.read(HEADER_BYTES).decode('ascii'))
        if (header.get('format') != FORMAT or header.get('tag') != tag
                or header.get('source') != source_stamp or os.path.getsize(path) != header['total']):
            return None
        return {name: FileArray(path, off, dt, shape[0]) for name, (dt, shape, off) in header['arrays'].items()}
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
                  min_bytes: int | None = None) -> dict[str, np.ndarray | FileArray]:
    """The 1-D arrays `build()` derives from file `source`, reused from an index file while `source` is unchanged
    (as FileArrays; see the module's docstring).

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
            stored = _read(path, stamp, tag)
            if stored is not None:
                return stored  # read from the file, so the built copy is freed
    return arrays
