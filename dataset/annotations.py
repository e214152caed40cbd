"""Annotation files: reading JSON lists with one-line errors naming file and item, and the packed store
(`Annotations`) that keeps items as bytes and offsets, so forked loader workers share them without copying."""
from __future__ import annotations

import bisect
import json
import operator
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dataset.errors import DataError, brief, check_regular_file
from dataset.index_cache import FileArray, cached_arrays


def _type_name(types) -> str:
    if not isinstance(types, tuple):
        types = (types,)
    return ' or '.join('list' if t is list else t.__name__ for t in types)


def as_file_list(ann_file, what: str = 'annotation file') -> list[str]:
    """Accept one path or a list of paths; return a list (empty or non-string entries are errors)."""
    files = [ann_file] if isinstance(ann_file, (str, os.PathLike)) else ann_file
    if not isinstance(files, (list, tuple)) or not files:
        raise DataError(f'{what}: expected a path or a non-empty list of paths, got {ann_file!r}')
    out = []
    for f in files:
        if not isinstance(f, (str, os.PathLike)) or not str(f):
            raise DataError(f'{what}: expected a path or a list of paths, got entry {f!r}')
        out.append(os.fspath(f))
    return out


def is_shard_spec(entry) -> bool:
    """Whether a train_file entry names webdataset tar shards (a path or brace pattern ending in .tar), read by
    dataset.shards rather than as a JSON annotation file."""
    return isinstance(entry, str) and entry.lower().endswith('.tar')


class Annotations:
    """The concatenated items of one or more JSON annotation files, remembering where each item came from.

    Items are kept packed, not as Python objects: per file, one byte buffer holding every item's JSON text and an
    int64 array of (start, end) offsets into it; for an ASCII file the buffer is the file's own bytes, otherwise
    each item re-encoded. Small files hold both in memory (numpy arrays); large ones read them on demand from
    their index file and from the JSON file itself (dataset.index_cache.FileArray), so the bytes live once in the
    page cache for every process and rank. Either way DataLoader workers forked from the process share them: no per-item
    reference count is touched, so copy-on-write never copies them. Indexing decodes one item into a fresh dict
    (a few microseconds). Provenance is per-file start offsets.
    Behaves as a read-only list of dicts.
    """

    def __init__(self, parts: Sequence[tuple[np.ndarray, Any]], files: list[str], starts: list[int]):
        self.parts = list(parts)
        self.files = files
        self.starts = starts
        self._n = starts[-1] + len(self.parts[-1][0]) // 2 if self.parts else 0

    @classmethod
    def from_items(cls, items: Sequence[Mapping], files: list[str] | None = None,
                   starts: list[int] | None = None) -> 'Annotations':
        """Pack in-memory items (one pseudo-file named '<items>' unless `files`/`starts` say otherwise)."""
        files = files or ['<items>']
        starts = starts or [0]
        bounds = list(starts) + [len(items)]
        parts = []
        for k in range(len(files)):
            offsets, data = pack_items(items[bounds[k]:bounds[k + 1]])
            parts.append((np.stack([offsets[:-1], offsets[1:]], axis=1).reshape(-1), np.frombuffer(data, np.uint8)))
        return cls(parts, files, list(starts))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        index = operator.index(index)
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(f'annotation index {index} out of range ({self._n} items)')
        k = bisect.bisect_right(self.starts, index) - 1
        spans, data = self.parts[k]
        i = index - self.starts[k]
        start, stop = spans[2 * i:2 * i + 2].tolist()
        text = data.read(start, stop) if isinstance(data, FileArray) else data[start:stop].tobytes()
        try:
            return json.loads(text)
        except ValueError:  # an indexed file read in place, changed since
            raise DataError(f'{self.where(index)}: cannot decode the item; was {self.files[k]} changed while in '
                            f'use? (restart to read it again)') from None

    def __iter__(self):
        for i in range(self._n):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed items and their offsets (in memory, or in the files read on demand)."""
        return sum(o.nbytes + d.nbytes for o, d in self.parts)

    def origin(self, index: int) -> tuple[str, int]:
        """(annotation file, index inside that file) of global item `index`."""
        k = bisect.bisect_right(self.starts, index) - 1
        return self.files[k], index - self.starts[k]

    def where(self, index: int) -> str:
        """'file item N' for error messages."""
        f, i = self.origin(index)
        return f'{f} item {i}'


def _item_encoder() -> Callable[[Any], bytes]:
    """Compact JSON bytes of one item. ASCII escapes, so every item round-trips through bytes, even strings
    holding lone surrogates from JSON escapes. json.dumps builds a new C encoder per call, which costs more than
    encoding a small item: build it once (falling back to json.dumps where the C encoder is unavailable)."""
    c_make_encoder = getattr(json.encoder, 'c_make_encoder', None)
    if c_make_encoder is not None:
        try:
            # markers=None: no cycle check (parsed JSON has no cycles); allow_nan as json.load accepts NaN.
            encode = c_make_encoder(None, None, json.encoder.encode_basestring_ascii, None, ':', ',', False, False,
                                    True)
            if ''.join(encode({'a': [1, 'b\u00e9']}, 0)) == '{"a":[1,"b\\u00e9"]}':
                return lambda item: ''.join(encode(item, 0)).encode('ascii')
        except TypeError:  # another Python's signature
            pass
    return lambda item: json.dumps(item, separators=(',', ':')).encode('ascii')


_PACK = _item_encoder()


def pack_items(items: Sequence) -> tuple[np.ndarray, bytes]:
    """(offsets [n+1] int64, bytes) holding each item as compact JSON: item i is data[offsets[i]:offsets[i+1]]."""
    pieces = [_PACK(item) for item in items]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)), out=offsets[1:])
    return offsets, b''.join(pieces)


def check_items(data, path: str, required: Mapping[str, Any], check: Callable[[dict, str], None] | None) -> None:
    """Validate the parsed content of one annotation file (see load_annotations); DataError names the item."""
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON list of objects, got {type(data).__name__}')
    if not data:
        raise DataError(f'{path}: the annotation list is empty')
    checks = [(key, types if isinstance(types, tuple) else (types,)) for key, types in required.items()]
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f'{path} item {i}: expected an object, got {type(item).__name__}')
        for key, ok_types in checks:
            if key not in item:
                raise DataError(f'{path} item {i}: missing key {key!r}')
            value = item[key]
            # bool is an int subclass: never accept it where a number is meant.
            if isinstance(value, bool) and bool not in ok_types:
                ok = False
            else:
                ok = isinstance(value, ok_types)
            if ok and isinstance(value, list):
                ok = all(isinstance(v, str) for v in value)
            if not ok:
                raise DataError(f'{path} item {i}: key {key!r} must be {_type_name(ok_types)}'
                                f'{" of strings" if list in ok_types else ""}, got {brief(value)}')
        if check is not None:
            check(item, f'{path} item {i}')


_JSON_SPACE = re.compile(r'[ \t\n\r]*')


def _item_spans(raw: bytes) -> tuple[list, np.ndarray] | None:
    """(items, spans [2n] int64: item i is raw[spans[2i]:spans[2i+1]]) of an ASCII JSON list, parsed item by item,
    or None when the file is not ASCII or not a well-formed list (read_json_file then parses it, or words the
    error). For ASCII text a character offset is a byte offset, so the items stay where they are in the file."""
    if not raw.isascii():
        return None
    text = raw.decode('ascii')
    decode = json.JSONDecoder().raw_decode
    space = _JSON_SPACE.match
    pos = space(text, 0).end()
    if not text.startswith('[', pos):
        return None
    items, bounds = [], []
    try:
        pos = space(text, pos + 1).end()
        if text.startswith(']', pos):
            return None  # empty: read_json_file and check_items word it
        while True:
            item, end = decode(text, pos)
            items.append(item)
            bounds += (pos, end)
            pos = space(text, end).end()
            if text.startswith(',', pos):
                pos = space(text, pos + 1).end()
            elif text.startswith(']', pos):
                break
            else:
                return None
    except (ValueError, RecursionError):
        return None
    if space(text, pos + 1).end() != len(text):
        return None
    return items, np.asarray(bounds, dtype=np.int64)


def _load_packed(path: str, required: Mapping[str, Any], what: str, check, index_tag: str | None):
    """(spans, data) of one checked annotation file: item i is data[spans[2i]:spans[2i+1]] (the file's own bytes
    for an ASCII file, re-encoded items otherwise), from its index file when one is valid."""
    source: dict[str, bytes] = {}

    def build():
        try:
            check_regular_file(path, what)  # first: opening a FIFO would block
            with open(path, 'rb') as f:
                raw = f.read()
        except (OSError, ValueError, DataError):
            raw = b''  # read_json_file words the error
        parsed = _item_spans(raw) if raw else None
        if parsed is not None:
            data, spans = parsed
            check_items(data, path, required, check)
            source['raw'] = raw
            return {'spans': spans}
        data = read_json_file(path, what)
        check_items(data, path, required, check)
        offsets, packed = pack_items(data)
        del data
        spans = np.stack([offsets[:-1], offsets[1:]], axis=1).reshape(-1)
        return {'spans': spans, 'data': np.frombuffer(packed, dtype=np.uint8)}

    if index_tag is None and check is not None:  # checks we cannot name: never reuse a stored result
        arrays = build()
    else:
        # Open it first: a missing, special or unreadable file gets its usual message even when indexed.
        try:
            check_regular_file(path, what)
            with open(path, 'rb'):
                pass
        except (FileNotFoundError, DataError, OSError, ValueError):
            arrays = build()  # read_json_file words the error
        else:
            tag = f'annotations-2 {sorted((k, _type_name(v)) for k, v in required.items())} {index_tag}'
            arrays = cached_arrays(path, tag, build)
    if 'data' in arrays:
        return arrays['spans'], arrays['data']
    if isinstance(arrays['spans'], FileArray):  # indexed: read the items from the JSON file itself when needed
        return arrays['spans'], FileArray(path, 0, np.uint8, os.path.getsize(path))
    return arrays['spans'], np.frombuffer(source['raw'], dtype=np.uint8)


def load_annotations(ann_file, required: Mapping[str, Any], what: str = 'annotation file',
                     check: Callable[[dict, str], None] | None = None, *,
                     index_tag: str | None = None) -> Annotations:
    """Load and validate JSON annotation file(s) (one path or a list, concatenated in order).

    Each file must hold a non-empty JSON list of objects; every object must have the keys of `required` with
    values of the given type(s) (`list` means a list of strings). `check(item, where)` may add task-specific
    checks and raise DataError. Errors name the file, the item index, the key and the expected type.
    `index_tag` names what `check` depends on (its parameters): with it, a large file's checked and packed items
    are stored in an index file and reused while the file is unchanged (dataset.index_cache); without it a
    `check` makes every load parse and check again.
    """
    files = as_file_list(ann_file, what)
    parts, starts, n = [], [], 0
    for path in files:
        spans, data = _load_packed(path, required, what, check, index_tag)
        parts.append((spans, data))
        starts.append(n)
        n += len(spans) // 2
    return Annotations(parts, files, starts)


def read_json_file(path: str, what: str = 'annotation file'):
    """Parse a JSON file, or raise a one-line DataError naming it: missing, not a regular file (a FIFO would block
    forever), unreadable, not UTF-8, invalid JSON, or nested deeper than the parser's recursion limit."""
    try:
        check_regular_file(path, what)
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f'{what} {path}: file not found') from None
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})') from None
    except RecursionError:
        raise DataError(f'{path}: JSON nested too deeply to parse (arrays or objects inside each other beyond '
                        f'the recursion limit); an annotation file needs only a list of flat objects') from None
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})') from None
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror or e})') from None
    except DataError:
        raise
    except ValueError as e:  # a path with a NUL character
        raise DataError(f'{what} {path!r}: not a valid file name ({e})') from None


def load_answer_list(path) -> list[str]:
    """The VQA candidate answers: a non-empty JSON list of strings."""
    if not path:
        raise DataError('answer_list: a path to a JSON list of answer strings is required for the test split')
    data = read_json_file(path, 'answer_list')
    if not isinstance(data, list) or not data:
        raise DataError(f'{path}: expected a non-empty JSON list of answer strings')
    for i, a in enumerate(data):
        if not isinstance(a, str):
            raise DataError(f'{path} item {i}: answers must be strings, got {brief(a)}')
    return data
