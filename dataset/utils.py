"""Data helpers: text normalisation (spec 4.1), annotation/image loading with clear errors, grounding scoring.

Everything that reads user data goes through `load_annotations`, `resolve_image_path` and `open_image_rgb`, so
a bad file or a bad item always produces a one-line `DataError` that names the annotation file, the item index and
(for images) the image path.
"""
from __future__ import annotations

import bisect
import io
import json
import operator
import os
import re
import stat
import unicodedata
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image

from dataset.index_cache import FileArray, cached_arrays
from utils import UserError, unwrap_worker_error, worker_error_message  # noqa: F401 (re-exported)


class DataError(UserError, ValueError):
    """Bad input data (annotation file, annotation item or image). The message is one line naming the culprit.

    Raised inside a DataLoader worker it keeps its one-line message (see utils.UserError).
    """


# ----------------------------------------------------------------------------------------------------------------
# Small helpers for messages and files
# ----------------------------------------------------------------------------------------------------------------
def brief(value, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, safe for values nested too deeply to repr (RecursionError)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f'<{type(value).__name__} nested too deeply to show>'
    return text[:limit]


def check_regular_file(path: str, what: str) -> None:
    """Raise DataError unless `path` is a regular file (after symlinks): a directory, a FIFO, a socket or a device
    would make the reader fail obscurely or block forever. A missing file raises FileNotFoundError (the callers
    word that one themselves)."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return
    kind = ('a directory' if stat.S_ISDIR(mode) else 'a named pipe (FIFO)' if stat.S_ISFIFO(mode)
            else 'a socket' if stat.S_ISSOCK(mode) else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else 'not a regular file')
    raise DataError(f'{what} {path}: is {kind}, not a regular file')


# Characters that draw nothing (or that the tokenizer drops) although their category is a letter or a symbol.
# U+FFFD (the replacement character of a decoding error) is dropped by the BERT tokenizer.
_BLANK_LETTERS = frozenset('\u115f\u1160\u3164\uffa0\u2800\u180e\ufffd')
_INVISIBLE_CATEGORIES = frozenset(('Cc', 'Cf', 'Cs', 'Co', 'Cn', 'Zs', 'Zl', 'Zp', 'Mn', 'Me'))
_ASCII_ALNUM = re.compile(r'[0-9A-Za-z]')


def has_visible_text(text: str, normalise: Callable[[str], str] = None) -> bool:
    """Whether `text` (after `normalise`, default pre_caption without truncation) keeps a visible character.

    Empty strings, whitespace, punctuation that normalisation deletes, and format or control characters alone
    (zero-width space U+200B, joiners, BOM, soft hyphen, combining marks without a base, Hangul fillers) give an
    empty input to the text encoder: MLM has nothing to mask and every loss on it is meaningless (NaN when a whole
    batch is like that).
    """
    if _ASCII_ALNUM.search(text):  # fast path: letters and digits survive normalisation
        return True
    normalised = (normalise or (lambda t: pre_caption(t, max_words=1 << 30)))(text)
    return any(not ch.isspace() and ch not in _BLANK_LETTERS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES
               for ch in normalised)


def check_visible_text(value, key: str, where: str, normalise: Callable[[str], str] = None) -> None:
    """DataError naming the item and key when the text (or an entry of a list of texts) has no visible character."""
    texts = value if isinstance(value, list) else [value]
    for j, text in enumerate(texts):
        if isinstance(text, str) and not has_visible_text(text, normalise):
            entry = f' entry {j}' if isinstance(value, list) else ''
            raise DataError(f'{where}: key {key!r}{entry} is empty (no visible characters after normalisation: '
                            f'{brief(text, 40)})')


# ----------------------------------------------------------------------------------------------------------------
# Text normalisation (spec 4.1)
# ----------------------------------------------------------------------------------------------------------------
# Characters removed outright by both cleaners.
_DELETE_TABLE = str.maketrans('', '', ',.\'!?"()*#:;~')
# '-' and '/' become spaces (applied after deletion, so '--' becomes two spaces).
_SPACE_TABLE = str.maketrans({'-': ' ', '/': ' '})
_MULTI_WS = re.compile(r'\s{2,}')


def _truncate_words(text: str, max_words: int) -> str:
    # Split on the single space character (not str.split()): consecutive spaces yield empty "words" that count
    # toward the limit, exactly like the original.
    words = text.split(' ')
    if len(words) > max_words:
        return ' '.join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Normalise a caption: lower-case, drop punctuation, collapse whitespace runs, keep at most `max_words` words.

    Order (spec 4.1): lower; delete , . ' ! ? " ( ) * # : ; ~; '-' and '/' -> space, '<person>' -> 'person';
    runs of >= 2 whitespace characters -> one space (a single tab/newline survives); strip trailing newlines then
    leading/trailing spaces; truncate on single spaces.
    """
    if not isinstance(caption, str):
        raise TypeError(f'pre_caption expects a str, got {type(caption).__name__}')
    text = caption.lower().translate(_DELETE_TABLE).translate(_SPACE_TABLE).replace('<person>', 'person')
    text = _MULTI_WS.sub(' ', text)
    text = text.rstrip('\n').strip(' ')
    return _truncate_words(text, max_words)


def pre_question(question: str, max_ques_words: int = 50) -> str:
    """Normalise a VQA question: like `pre_caption` but without '<person>', whitespace collapsing or left strip.

    Only trailing spaces are removed; tabs/newlines and inner space runs survive (and count as empty words for
    the truncation).
    """
    if not isinstance(question, str):
        raise TypeError(f'pre_question expects a str, got {type(question).__name__}')
    text = question.lower().translate(_DELETE_TABLE).translate(_SPACE_TABLE)
    text = text.rstrip(' ')
    return _truncate_words(text, max_ques_words)


# ----------------------------------------------------------------------------------------------------------------
# Annotation files
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Image paths and image decoding
# ----------------------------------------------------------------------------------------------------------------
_REAL_DIRS: dict[str, str] = {}


def _real_dir(path: str) -> str:
    """os.path.realpath of a folder, cached (annotation files name few folders for many images)."""
    real = _REAL_DIRS.get(path)
    if real is None:
        real = os.path.realpath(path)
        if len(_REAL_DIRS) < 100_000:
            _REAL_DIRS[path] = real
    return real


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_image_path(image_root: str, rel: str, allow_absolute: bool, where: str, *,
                       check_file_link: bool = True) -> str:
    """Join `rel` to `image_root`, refusing paths that escape the root unless `allow_absolute`.

    Escaping = an absolute path, a '..' component, or a symbolic link (a folder on the way, or with
    `check_file_link` the file itself) that leads outside the real path of image_root. With allow_absolute, the
    path is used as os.path.join does (absolute paths ignore the root; an empty root leaves relative paths relative
    to the working directory). Folder real paths are cached; the datasets check the file's own link only when they
    open it (`check_file_link=False` at construction keeps loading a large annotation file free of per-item stats).
    """
    if not isinstance(rel, str) or not rel or '\x00' in rel:
        raise DataError(f'{where}: image path must be a non-empty string without NUL characters, got {brief(rel)}')
    path = os.path.join(image_root or '', rel)
    if not allow_absolute:
        parts = re.split(r'[\\/]', rel)
        if os.path.isabs(rel) or rel.startswith(('/', '\\')) or '..' in parts:
            raise DataError(f'{where}: image path {rel!r} escapes image_root {image_root!r} '
                            f'(absolute or with ..); pass allow_absolute_paths=True to allow it')
        try:
            root = _real_dir(image_root or '.')
            real = os.path.join(_real_dir(os.path.dirname(path) or '.'), os.path.basename(path))
            if check_file_link and os.path.islink(real):
                real = os.path.realpath(real)
        except ValueError as e:  # a name the file system cannot encode (a lone surrogate from a JSON escape)
            raise DataError(f'{where}: image path {brief(rel)} is not a valid file name ({e})') from None
        if not _inside(real, root):
            raise DataError(f'{where}: image path {rel!r} escapes image_root {image_root!r} through a symbolic '
                            f'link (it leads to {real}); pass allow_absolute_paths=True to allow it')
    return path


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    PIL's own convert('RGB') clips 16/32-bit integer images at 255 (a nearly white picture), so those are
    rescaled first. Alpha is dropped (as the original's convert('RGB') does); palette images with a transparency
    entry go through RGBA to avoid PIL's warning.
    """
    mode = img.mode
    if mode == 'RGB':
        return img
    if mode.startswith('I;16') or mode == 'I':
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data (PNG/TIFF) spans 0..65535; 32-bit 'I' images are treated as 16-bit when they fit.
        scale = 257.0 if arr.size == 0 or arr.max() > 255 else 1.0
        arr8 = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode='L').convert('RGB')
    if mode == 'F':
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:  # float images in [0, 1]
            arr = arr * 255.0
        arr8 = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode='L').convert('RGB')
    if mode == 'P' and 'transparency' in img.info:
        return img.convert('RGBA').convert('RGB')
    return img.convert('RGB')


def open_image_rgb(path: str, where: str = '') -> Image.Image:
    """Open an image file fully decoded as 8-bit RGB, or raise DataError naming the path (and `where`).

    Truncated files are errors (ImageFile.LOAD_TRUNCATED_IMAGES is deliberately left False).
    """
    prefix = f'{where}: ' if where else ''
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None  # Image.open below says what is wrong
    except ValueError:  # e.g. an embedded NUL character
        raise DataError(f'{prefix}image path is not a valid file name: {path!r}') from None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):  # a FIFO blocks Image.open forever
        raise DataError(f'{prefix}image path is not a regular file (a named pipe, socket or device): {path}')
    try:
        return _decode_rgb(path)
    except FileNotFoundError:
        raise DataError(f'{prefix}image file not found: {path}') from None
    except IsADirectoryError:
        raise DataError(f'{prefix}image path is a directory: {path}') from None
    except Image.DecompressionBombError as e:
        raise DataError(f'{prefix}image too large: {path} ({e})') from None
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f'{prefix}cannot read image {path} ({_first_line(e)})') from None


def decode_image_rgb(data: bytes, name: str, where: str = '') -> Image.Image:
    """Decode an image held in memory (a tar member) as 8-bit RGB, or raise DataError naming `name` and `where`."""
    prefix = f'{where}: ' if where else ''
    try:
        return _decode_rgb(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DataError(f'{prefix}image too large: {name} ({e})') from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f'{prefix}cannot read image {name} ({_first_line(e)})') from None


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _decode_rgb(source) -> Image.Image:
    """Image.open + full decode + _to_rgb, closing what it opened on failure (errors propagate as PIL raises)."""
    img = Image.open(source)
    try:
        img.load()  # decode now so errors surface here; Pillow closes a single-frame file after load()
        out = _to_rgb(img)
    except BaseException:
        img.close()
        raise
    if out is not img:
        img.close()  # free the unconverted copy (and the file of multi-frame formats)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Base class for the datasets: bad-image policy
# ----------------------------------------------------------------------------------------------------------------
class ImageDatasetBase:
    """Mixin giving datasets one image-opening path and the optional skip-bad-images policy.

    Subclasses implement `_load(index)` (returning the item tuple) and call `self._open(path, index)` for every
    image. With `skip_bad_images=False` (default) a missing/unreadable image raises DataError naming the file and
    the annotation item. With True, the item is replaced by the next readable item (index+1, index+2, ... wrapping
    around) and `num_skipped` counts the replacements. Note: with DataLoader workers each worker process has its
    own copy of the counter; substitution in evaluation sets leaves the skipped items out of the metrics.
    """

    ann: Annotations
    skip_bad_images: bool = False
    max_substitutions: int = 1000

    def _init_image_loading(self, skip_bad_images: bool) -> None:
        """Every dataset's constructor ends here: the bad-image policy."""
        self.skip_bad_images = bool(skip_bad_images)
        self.num_skipped = 0
        self.bad_items: set[int] = set()

    def _open(self, path: str, index: int) -> Image.Image:
        return open_image_rgb(path, self.ann.where(index))

    def _load(self, index: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, index: int):
        if not self.skip_bad_images:
            return self._load(index)
        n = len(self)
        first_error = None
        for step in range(min(n, self.max_substitutions)):
            j = (index + step) % n
            if j in self.bad_items:
                self.num_skipped += 1
                continue
            try:
                return self._load(j)
            except DataError as e:
                warnings.warn(f'skipping bad item: {e}', stacklevel=2)
                self.bad_items.add(j)
                self.num_skipped += 1
                first_error = first_error or e
        raise DataError(f'no readable item found in {min(n, self.max_substitutions)} items from index {index} '
                        f'(first error: {first_error})')


# ----------------------------------------------------------------------------------------------------------------
# Grounding (spec 10.8)
# ----------------------------------------------------------------------------------------------------------------
def computeIoU(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes exactly as the original evaluates it.

    The intersection uses inclusive pixel corners (x2 = x + w - 1) and counts (x2 - x1 + 1)(y2 - y1 + 1) only when
    x1 < x2 and y1 < y2 (boxes sharing a single row/column count as disjoint); the union uses the plain areas
    w*h. Both quirks are kept so accuracies match the published numbers.
    """
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def proposal_scores(heatmap, proposals: Iterable[Sequence[float]], alpha: float = 0.5) -> np.ndarray:
    """Score each [x, y, w, h, ...] proposal on a heat map already at image size: region sum / (w*h)**alpha.

    The region is rows int(y) .. int(y+h)-1 and columns int(x) .. int(x+w)-1 (as the original slices). Starts
    below 0 are clamped to 0 (the original's negative slice start would wrap around). Proposals with w*h <= 0
    score -inf instead of dividing by zero.
    """
    m = np.asarray(heatmap.detach().cpu() if hasattr(heatmap, 'detach') else heatmap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f'heatmap must be 2-D [H, W], got shape {m.shape}')
    scores = []
    for det in proposals:
        x, y, w, h = (float(v) for v in det[:4])
        area = w * h
        if area <= 0:
            scores.append(-np.inf)
            continue
        r0, r1 = max(int(y), 0), max(int(y + h), 0)
        c0, c1 = max(int(x), 0), max(int(x + w), 0)
        scores.append(m[r0:r1, c0:c1].sum() / area ** alpha)
    return np.asarray(scores, dtype=np.float64)


class BoxChoice(NamedTuple):
    index: int          # position of the chosen proposal
    box: list           # its [x, y, w, h]
    score: float        # its score
    fallback: bool      # True when no proposal scored > 0 (the original would have reused a stale box)


def choose_box(heatmap, proposals: Sequence[Sequence[float]], alpha: float = 0.5) -> BoxChoice:
    """Pick the proposal with the highest `proposal_scores` value.

    The original keeps a running maximum starting at 0 and updates it on a strict '>', so the first of tied best
    scores wins (np.argmax does the same) but when every score is <= 0 it silently keeps the box chosen for the
    previous expression (or crashes on the first). We instead still take the argmax and flag it with
    `fallback=True`. Raises ValueError when there are no proposals.
    """
    if len(proposals) == 0:
        raise ValueError('choose_box: no proposals for this image')
    scores = proposal_scores(heatmap, proposals, alpha)
    k = int(np.argmax(scores))
    return BoxChoice(k, [float(v) for v in proposals[k][:4]], float(scores[k]), not bool(scores[k] > 0))


def upsample_heatmap(pred, height: int, width: int, mask_size: int | None = None):
    """Resize a square Grad-CAM map (e.g. 24x24, given as a tensor/array/list, 2-D or flat) to [height, width]
    with bicubic interpolation (align_corners False), as grounding_eval does. Returns a float tensor on CPU."""
    import torch
    import torch.nn.functional as F
    t = torch.as_tensor(pred, dtype=torch.float32).detach().cpu()
    if t.dim() != 2:
        side = mask_size or int(round(t.numel() ** 0.5))
        t = t.reshape(side, side)
    out = F.interpolate(t[None, None], size=(int(height), int(width)), mode='bicubic', align_corners=False)
    return out[0, 0]


def grounding_eval(results, dets: Mapping, cocos, refer, alpha: float = 0.5, mask_size: int = 24,
                   verbose: bool = True) -> dict:
    """Box accuracy per split (spec 10.8): results = [{'ref_id', 'pred' (mask_size x mask_size)}].

    For each result the map is upsampled to the image size, the best detection of that image is chosen with
    `choose_box`, and it counts as correct when computeIoU with the ground-truth box is >= 0.5. Returns
    {'val_d', 'testA_d', 'testB_d'} as fractions (NaN for a split without items, where the original divides by
    zero). `cocos` is accepted for signature compatibility and unused, as in the original. Difference: when no
    detection scores > 0 the argmax is used instead of a stale box (see choose_box); the count is printed.
    """
    correct = {'val': 0, 'testA': 0, 'testB': 0}
    num = {'val': 0, 'testA': 0, 'testB': 0}
    fallbacks = 0
    for res in results:
        ref_id = int(res['ref_id'])
        ref = refer.Refs[ref_id]
        gt_box = refer.refToAnn[ref_id]['bbox']
        image = refer.Imgs[ref['image_id']]
        mask = upsample_heatmap(res['pred'], image['height'], image['width'], mask_size)
        key = str(ref['image_id'])
        if key not in dets or not dets[key]:
            raise DataError(f'detections: no proposals for image_id {key} (ref_id {ref_id})')
        choice = choose_box(mask, dets[key], alpha)
        fallbacks += choice.fallback
        split = ref['split']
        if split in num:
            num[split] += 1
            if computeIoU(gt_box, choice.box) >= 0.5:
                correct[split] += 1
    out = {}
    for split in ('val', 'testA', 'testB'):
        out[f'{split}_d'] = correct[split] / num[split] if num[split] else float('nan')
        if verbose:
            print(f'{split}: {out[split + "_d"]:.3f}')
    if fallbacks and verbose:
        print(f'note: for {fallbacks} expression(s) no detection scored > 0; the best-scoring one was used')
    return out
