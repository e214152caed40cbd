"""ALBEF on your own images: Grad-CAM of a caption on an image, or text search over a folder of images.

    # which regions make the ITM head say "match", whole caption and per word -> a PNG grid
    python Predict.py --checkpoint refcoco.pth --image photo.jpg --caption "a dog on the grass" --out dog.png
    # rank a folder's images for a query (ITC, then ITM re-ranking) -> ranking printed, search.json, search.png
    python Predict.py --checkpoint mscoco.pth --images ~/Pictures --query "a dog on the grass" --top_k 5

Checkpoints: any released image-text file (ALBEF.pth, ALBEF_4M.pth, mscoco.pth, flickr30k.pth, refcoco.pth)
or one of ours, as a path or URL; see models/inference.py (`load_model`) for the same in Python. A released
file runs with the original config of its kind at its own resolution; the tokenizer comes from --text_encoder
(hub name, or a local folder holding vocab.txt). Folder features are cached (--cache_dir), so a second query on
the same folder only encodes the text and re-ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import utils
from evaluation.figures import PAD, TITLE_H, contact_sheet, grid_shape, render_grid, write_png  # noqa: F401


class Predictor:
    """Load a checkpoint once, then explain many (image, caption) pairs with ITM Grad-CAM.

    A thin layer over `models.load_model` kept for scripts written against it: `predict(images, caption)` returns
    one `models.inference.GradCam` per image, `save(cam, path)` writes its PNG grid.
    """

    def __init__(self, checkpoint: str, config: str | dict | None = None, device: str | None = None,
                 block_num: int | None = None, text_encoder: str | None = None, unsafe_load: bool = False):
        from models import gradcam, load_model
        self.api = load_model(checkpoint, config=config, text_encoder=text_encoder, device=device,
                              unsafe_load=unsafe_load)
        self.api._require('gradcam')
        self.model, self.tokenizer, self.config = self.api.model, self.api.tokenizer, self.api.config
        self.transform, self.device = self.api.transform, self.api.device
        self.block_num = gradcam.check_block_num(self.model, 'itm', block_num)

    def predict(self, images, caption: str, batch_size: int = 8) -> list:
        """Grad-CAM of `caption` on each image path; one GradCam per image, in order."""
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        self.api.normalise_text(caption, '--caption')
        return self.api.gradcam_batch(paths, caption, self.block_num, batch_size)

    @staticmethod
    def save(cam, out_path: str, tile_size: int = 256, cols: int = 4) -> tuple[int, int]:
        """Write the PNG grid of `cam` to out_path; returns its (height, width)."""
        grid = render_grid(cam, tile_size, cols)
        write_png(grid, out_path)
        return grid.shape[:2]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser('ALBEF on your own images', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
    p.add_argument('--checkpoint', required=True, help='path or URL of a checkpoint (released or ours)')
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument('--image', nargs='+', help='Grad-CAM mode: one or more image files')
    what.add_argument('--images', metavar='DIR', help='search mode: a folder of images (searched recursively)')
    p.add_argument('--caption', '--query', dest='caption', required=True, help='the text to explain or search for')
    p.add_argument('--out', default=None,
                   help='output PNG (Grad-CAM default gradcam.png, several images: <stem>_<k>.png; search default '
                        'search.png, with the ranking in search.json beside it)')
    p.add_argument('--overwrite', action='store_true', help='replace existing output files')
    p.add_argument('--config', default=None,
                   help="model config (default: the checkpoint's own, else the original config of its kind)")
    p.add_argument('--text_encoder', default=None, help='tokenizer folder or hub name (default: from the config)')
    p.add_argument('--top_k', default=5, type=int, help='search: hits to show')
    p.add_argument('--k_rerank', default=16, type=int, help='search: best ITC candidates re-ranked by ITM')
    p.add_argument('--cache_dir', default=None,
                   help="search: where folder features are cached (default ~/.cache/albef/folder_features, "
                        "$ALBEF_CACHE overrides; '' disables the cache)")
    p.add_argument('--batch_size', default=32, type=int, help='images per forward pass')
    p.add_argument('--block_num', default=None, type=int,
                   help='fusion (BERT) layer to explain (default: fusion_layer + 2, the last fusion layer if fewer)')
    p.add_argument('--device', default=None, help='default: cuda when available, else cpu')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'], help='autocast precision')
    p.add_argument('--tile_size', default=256, type=int, help='width of each tile in pixels')
    p.add_argument('--cols', default=None, type=int, help='tiles per row (default 4, search 5)')
    p.add_argument('--unsafe_load', action='store_true', help='allow checkpoints holding pickled code (trusted only)')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return p


def output_paths(out: str, n: int) -> list[str]:
    """--out for one image; <root>_<k><ext> for k = 0..n-1 with several."""
    if n == 1:
        return [out]
    root, ext = os.path.splitext(out)
    return [f'{root}_{k}{ext or ".png"}' for k in range(n)]


def check_outputs(outputs: list[str], inputs: list[str], overwrite: bool) -> None:
    """Refuse, before any work, outputs that are an input, a folder, not PNG (pictures), or that exist."""
    real_inputs = {os.path.realpath(p) for p in inputs}
    for out in outputs:
        if os.path.realpath(out) in real_inputs:
            raise utils.UserError(f'--out {out} is one of the input images; choose another output path')
        if not out.lower().endswith(('.png', '.json')):
            raise utils.UserError(f'--out {out}: the picture is written as PNG; give a path ending in .png')
        if os.path.isdir(out):
            raise utils.UserError(f'--out {out} is a folder; give a file path ending in .png')
        if os.path.exists(out) and not overwrite:
            raise utils.UserError(f'--out {out} exists; pass --overwrite to replace it')


def explain(args) -> list:
    """Grad-CAM mode: one PNG grid per image."""
    from dataset.utils import open_image_rgb, pre_caption
    if not pre_caption(args.caption, 30).strip():
        raise utils.UserError(f'--caption is empty (after normalisation): {args.caption!r}')
    outputs = output_paths(args.out or 'gradcam.png', len(args.image))
    check_outputs(outputs, args.image, args.overwrite)
    for path in args.image:  # cheap checks before the model is loaded (seconds for a full-size checkpoint)
        open_image_rgb(path, '--image')
    predictor = Predictor(args.checkpoint, args.config, args.device, args.block_num, args.text_encoder,
                          args.unsafe_load)
    cams = predictor.predict(args.image, args.caption)
    for cam, out in zip(cams, outputs):
        h, w = predictor.save(cam, out, args.tile_size, args.cols or 4)
        print(f'{cam.image_path}: "{cam.text}" ITM match probability {cam.itm_prob:.4f}; '
              f'Grad-CAM (fusion layer {predictor.block_num}) -> {out} ({w}x{h})', flush=True)
    return cams


def search_folder(args) -> list[dict]:
    """Search mode: rank the folder, print the ranking, write it as JSON and a contact sheet PNG."""
    from dataset.utils import pre_caption
    from evaluation.folder_search import FolderIndex, list_images, search
    from models import load_model
    if args.top_k < 1 or args.k_rerank < 1 or args.batch_size < 1:
        raise utils.UserError('--top_k, --k_rerank and --batch_size must be >= 1')
    if not pre_caption(args.caption, 30).strip():
        raise utils.UserError(f'--query is empty (after normalisation): {args.caption!r}')
    png = args.out or 'search.png'
    report = os.path.splitext(png)[0] + '.json'
    check_outputs([png, report], [], args.overwrite)
    list_images(args.images)  # a missing or empty folder is refused before the model is loaded
    model = load_model(args.checkpoint, config=args.config, text_encoder=args.text_encoder, device=args.device,
                       precision=args.precision, unsafe_load=args.unsafe_load)
    model._require('itm_score')
    start = time.time()
    index = FolderIndex.build(model, args.images, args.cache_dir, args.batch_size)
    embedded = time.time() - start
    hits = search(model, index, args.caption, args.top_k, args.k_rerank)
    seconds = time.time() - start
    print(f'{len(index.paths)} images in {args.images} ('
          f'{"features from the cache" if index.cached else f"embedded in {embedded:.1f} s"}); '
          f'query "{model.normalise_text(args.caption)}" answered in {seconds:.1f} s')
    for line in index.skipped[:5]:
        print(f'warning: skipped {line}')
    if len(index.skipped) > 5:
        print(f'warning: skipped {len(index.skipped) - 5} more unreadable images')
    print('| rank | P(match) | ITC cosine | image |\n| --- | --- | --- | --- |')
    for hit in hits:
        print(f"| {hit['rank']} | {hit['itm']:.4f} | {hit['itc']:.4f} | {os.path.relpath(hit['path'], index.folder)} |")
    cams = model.gradcam_batch([h['path'] for h in hits], args.caption, args.block_num)
    titles = [f"#{h['rank']} {h['itm']:.2f} {os.path.basename(h['path'])}" for h in hits]
    write_png(contact_sheet(cams, titles, args.tile_size, args.cols or 5), png)
    with open(report, 'w') as f:
        json.dump({'query': args.caption, 'normalised_query': model.normalise_text(args.caption),
                   'checkpoint': args.checkpoint, 'folder': index.folder, 'images': len(index.paths),
                   'skipped': index.skipped, 'features_cached': index.cached, 'seconds': round(seconds, 3),
                   'ranking': hits}, f, indent=1)
    print(f'ranking -> {report}; contact sheet with Grad-CAM of the query -> {png}')
    return hits


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not 16 <= args.tile_size <= 2048 or (args.cols is not None and not 1 <= args.cols <= 64):
        raise utils.UserError('--tile_size must be in [16, 2048] and --cols in [1, 64]')
    return search_folder(args) if args.images else explain(args)


if __name__ == '__main__':
    sys.exit(utils.run_cli(main))
