"""Text-to-image search over a folder of one's own images with an ALBEF image-text checkpoint.

`FolderIndex.build(model, folder)` embeds every image in the folder (recursively) with the ITC image encoder and
keeps the features in a cache file named by hashes of the folder, of the model (checkpoint file, config,
resolution) and of the folder listing (relative paths, sizes, modification times): a second query on an
unchanged folder reads the features instead of recomputing them, and any added, removed or changed image makes a
new entry (the folder's older entries for that model are deleted). `search(model, index, query)` ranks every
image by ITC similarity, re-ranks the best `k_rerank` by the ITM head's match probability (as the released
fine-tuned retrieval models rank), and returns the top hits.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import torch

from dataset.utils import DataError
from utils import UserError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
CACHE_VERSION = 1


def default_cache_dir() -> str:
    """$ALBEF_CACHE, else $XDG_CACHE_HOME/albef, else ~/.cache/albef; features go to its folder_features/."""
    root = os.environ.get('ALBEF_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'albef')
    return os.path.join(root, 'folder_features')


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursively, by extension), as sorted paths relative to it."""
    if not os.path.isdir(folder):
        raise UserError(f'--images {folder}: not a folder' if os.path.exists(folder)
                        else f'--images {folder}: folder not found')
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    if not found:
        raise UserError(f'--images {folder}: no image files ({", ".join(IMAGE_EXTENSIONS)})')
    return sorted(found)


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def listing_hash(folder: str, paths: list[str]) -> str:
    """Hash of the listing: relative path, size and modification time (ns) of every image."""
    entries = []
    for p in paths:
        st = os.stat(os.path.join(folder, p))
        entries.append((p, st.st_size, st.st_mtime_ns))
    return _sha(entries)


def model_hash(model) -> str:
    """Hash of what the features depend on: the checkpoint (path, size, mtime; or URL), config, resolution."""
    source = model.source
    ident = source
    if source and os.path.isfile(source):
        st = os.stat(source)
        ident = (os.path.realpath(source), st.st_size, st.st_mtime_ns)
    return _sha([CACHE_VERSION, ident, model.config, model.image_res, model.precision])


@dataclass
class FolderIndex:
    """ITC features of a folder's images: `paths` relative to `folder`, `features` [N, D] L2-normalised.
    `skipped` lists images that could not be read (with the reason); `cached` says whether the features came
    from the cache."""
    folder: str
    paths: list[str]
    features: torch.Tensor
    skipped: list[str]
    cache_file: str | None
    cached: bool

    @classmethod
    def build(cls, model, folder: str, cache_dir: str | None = None, batch_size: int = 32,
              progress: bool = True) -> 'FolderIndex':
        """Embed the images of `folder` (or read them from the cache; `cache_dir=''` disables it)."""
        folder = os.path.abspath(folder)
        paths = list_images(folder)
        cache_file = None
        if cache_dir != '':
            cache_dir = cache_dir or default_cache_dir()
            stem = f'{_sha(os.path.realpath(folder))}-{model_hash(model)}'
            cache_file = os.path.join(cache_dir, f'{stem}-{listing_hash(folder, paths)}.pt')
            if os.path.isfile(cache_file):
                try:
                    saved = torch.load(cache_file, map_location='cpu', weights_only=True)
                    return cls(folder, list(saved['paths']), saved['features'], list(saved['skipped']),
                               cache_file, True)
                except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, never fatal
                    print(f'note: ignoring unreadable feature cache {cache_file} ({type(e).__name__})')
        # Read every image once up front so that unreadable files are skipped with a note instead of aborting.
        good, skipped, feats = [], [], []
        chunks = range(0, len(paths), batch_size)
        if progress:
            from tqdm import tqdm
            chunks = tqdm(chunks, total=len(chunks), desc=f'embedding {len(paths)} images', unit='batch',
                          file=sys.stdout)
        for start in chunks:
            tensors, names = [], []
            for p in paths[start:start + batch_size]:
                try:
                    tensors.append(model.load_image(os.path.join(folder, p))[1])
                    names.append(p)
                except DataError as e:
                    skipped.append(f'{p}: {e}')
            if tensors:
                feats.append(model.embed_images(torch.stack(tensors), batch_size=batch_size))
                good += names
        if not good:
            raise UserError(f'--images {folder}: none of the {len(paths)} image files could be read '
                            f'(first: {skipped[0]})')
        index = cls(folder, good, torch.cat(feats), skipped, cache_file, False)
        if cache_file:
            index._save()
        return index

    def _save(self) -> None:
        """Write the cache entry atomically and delete this folder's older entries for the same model."""
        folder_part = os.path.basename(self.cache_file).rsplit('-', 1)[0]
        os.makedirs(os.path.dirname(self.cache_file), exist_ok=True)
        tmp = f'{self.cache_file}.tmp{os.getpid()}'
        torch.save({'paths': self.paths, 'features': self.features, 'skipped': self.skipped}, tmp)
        os.replace(tmp, self.cache_file)
        for name in os.listdir(os.path.dirname(self.cache_file)):
            path = os.path.join(os.path.dirname(self.cache_file), name)
            if name.startswith(folder_part + '-') and path != self.cache_file and name.endswith('.pt'):
                os.remove(path)


def search(model, index: FolderIndex, query: str, top_k: int = 5, k_rerank: int = 16) -> list[dict]:
    """The `top_k` images best matching `query`: ranked by ITC similarity, the first max(k_rerank, top_k)
    re-ranked by ITM match probability. Each hit: rank, path (absolute), itm (P(match)), itc (cosine)."""
    text_feat = model.embed_texts([query])[0]
    sims = index.features @ text_feat
    k = min(len(index.paths), max(k_rerank, top_k))
    itc, order = sims.topk(k)
    candidates = [os.path.join(index.folder, index.paths[i]) for i in order.tolist()]
    itm = model.itm_score(candidates, query)
    ranked = sorted(range(k), key=lambda j: (-float(itm[j]), -float(itc[j])))[:top_k]
    return [{'rank': r + 1, 'path': candidates[j], 'itm': float(itm[j]), 'itc': float(itc[j])}
            for r, j in enumerate(ranked)]
