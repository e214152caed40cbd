"""Images: resolving paths inside image_root, decoding to RGB with one-line errors, and the datasets' shared
image-opening base with the skip-bad-images policy."""
from __future__ import annotations

import io
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image

from dataset.annotations import Annotations
from dataset.errors import DataError, brief

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
