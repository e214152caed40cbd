"""The toy world's stand-in for the ImageNet-trained DeiT that ALBEF starts from: a supervised image tower.

    python -m dataset.toyworld.supervised_vit --world data/toyworld --config configs/toy/Pretrain.yaml

ALBEF never learns to see from image-text pairs alone: its ViT starts from DeiT weights trained with labels on
ImageNet. The toy world has no ImageNet, so this trains the toy config's ViT (random init, the config's sizes)
with labels on the toy world's own train pool: for every object, the mean last-layer patch token inside its box
goes through one linear head per attribute (shape, colour, size); for every image, the [CLS] token through a
multi-label head (which shapes, colours and sizes occur); losses summed, AdamW. Only the train pool is used (val
and test images stay unseen); the heads are dropped. The weights are written atomically to
`<world>/vit_supervised.pth`, a plain ViT state dict that `vision_pretrained:` loads, with
`vit_supervised.json` beside it saying what made them (world arguments, model sizes, steps, test accuracy).
Run again with the same world, sizes and steps, it does nothing (`--force` retrains).

Without it, a from-scratch toy ViT learns colour but hardly shape from captions (README, "Status").

Trained so, the tower's object tokens forget where the object is (a linear probe tells its centre's column no better
than chance, `tools/toy/encoder_probe.py`). `--position-bins B` adds two per-object heads for the column and row of
the centre on a B x B grid, so the tokens keep it (as a DeiT's do). Off by default: on the default world it did not
lift the tasks that ask for left / right (README, "Status").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from dataset.toyworld.world import read_manifest, read_world

ATTRIBUTES = ('shape', 'colour', 'size')
WEIGHTS_NAME = 'vit_supervised.pth'
# Raise when the training itself changes (heads, losses, optimizer): weights made by an older recipe are retrained.
RECIPE_VERSION = 2
# Cells per side of the grid on which tools/toy/encoder_probe.py reads an object's place: finer than the toy configs'
# 8 x 8 patch grid, since objects that the texts call left / right of each other can be closer than a patch.
POSITION_BINS = 16
# The ViT sizes the weights depend on; a config that differs in any of them needs its own training.
VIT_KEYS = ('image_res', 'patch_size', 'vision_width', 'vision_depth', 'vision_num_heads', 'mlp_ratio',
            'vision_init_std', 'patch_embed')


def object_masks(objects, image_side: int, grid: int):
    """[n_objects, grid*grid] bool: the patches whose centre lies inside each object's box (at least the one
    under the box centre, for a box too small to contain a patch centre)."""
    import torch
    centres = torch.arange(grid) + 0.5
    masks = []
    for o in objects:
        x, y, w, h = (v * grid / image_side for v in o['box'])
        mask = (((centres >= y) & (centres <= y + h))[:, None] & ((centres >= x) & (centres <= x + w))[None, :])
        if not mask.any():
            mask[min(grid - 1, int(y + h / 2)), min(grid - 1, int(x + w / 2))] = True
        masks.append(mask.flatten())
    return torch.stack(masks)


def load_objects(world_dir: str, images: list, image_res: int, patch_size: int):
    """Pixels [n, 3, R, R] (test transform), per image its object masks [k, grid*grid] (float) and per image its
    objects' attribute dicts, for the given world.json entries."""
    import torch
    from PIL import Image
    from dataset.transforms import build_transform
    transform = build_transform('test', image_res)
    grid = image_res // patch_size
    pixels = torch.stack([transform(Image.open(os.path.join(world_dir, 'images', w['file'])).convert('RGB'))
                          for w in images])
    masks = [object_masks(w['objects'], w['size'][0], grid).float() for w in images]
    return pixels, masks, [w['objects'] for w in images]


def pool_objects(patch_tokens, masks: list):
    """Mean patch token inside each object's box: [total objects, D] from per-image tokens [n, grid*grid, D] and
    per-image masks [k, grid*grid]."""
    import torch
    return torch.cat([m @ t / m.sum(1, keepdim=True) for m, t in zip(masks, patch_tokens)])


def centre_bins(image: dict, bins: int) -> list[dict]:
    """Per object of a world.json entry, the column ('x') and row ('y') of its box centre when the image is cut into
    `bins` x `bins` equal cells."""
    width, height = image['size']
    out = []
    for o in image['objects']:
        x, y, w, h = o['box']
        out.append({'x': min(bins - 1, int((x + w / 2) * bins / width)),
                    'y': min(bins - 1, int((y + h / 2) * bins / height))})
    return out


def train_on_attributes(world_dir: str, vit, image_res: int, patch_size: int, attributes=ATTRIBUTES,
                        steps: int = 1000, batch: int = 32, lr: float = 5e-4, report=(100, 200, 400), seed: int = 0,
                        log_every: int = 0, position_bins: int = 0):
    """Train `vit` on the train pool's labels and return [(step, {attribute: test accuracy %})] at the `report` steps
    and at the last one.

    Two kinds of heads, cross-entropies summed: per object, one linear head per attribute in `attributes` on the
    mean patch token inside its box; per image, one linear multi-label head on the [CLS] token saying which values
    of those attributes occur in the image. The second is what the DeiT's classification token learns on ImageNet and
    what ALBEF's image-text contrast reads (a tower locked with an untrained [CLS] gives ITC little to work with).
    With `position_bins` B > 0, two more per-object heads name the column and the row ('x', 'y') of the object's
    centre on a B x B grid: heads that only name attributes teach the tokens to forget where they are, which a
    DeiT's tokens do not.
    `log_every` > 0 prints a progress line (loss, ETA) that often."""
    import torch
    import torch.nn.functional as F
    world = read_world(world_dir)
    pools = {}
    for split in ('train', 'test'):
        images = [w for w in world if w['split'] == split]
        pixels, masks, objects = load_objects(world_dir, images, image_res, patch_size)
        if position_bins:  # the centre's cell joins each object's labels
            objects = [[{**o, **c} for o, c in zip(objs, centre_bins(w, position_bins))]
                       for objs, w in zip(objects, images)]
        pools[split] = (pixels, masks, objects)
    per_object_labels = tuple(attributes) + (('x', 'y') if position_bins else ())
    classes = {a: sorted({o[a] for objs in pools['train'][2] for o in objs}) for a in attributes}
    classes.update({a: list(range(position_bins)) for a in per_object_labels[len(attributes):]})
    width = vit.pos_embed.shape[-1]
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(width, len(c)) for a, c in classes.items()})
    image_head = torch.nn.Linear(width, sum(len(classes[a]) for a in attributes))
    offsets = dict(zip(attributes, [sum(len(classes[b]) for b in attributes[:i]) for i in range(len(attributes))]))
    opt = torch.optim.AdamW([*vit.parameters(), *heads.parameters(), *image_head.parameters()], lr=lr,
                            weight_decay=0.02)
    gen = torch.Generator().manual_seed(seed)

    def present(objects):
        target = torch.zeros(image_head.out_features)
        for o in objects:
            for a in attributes:
                target[offsets[a] + classes[a].index(o[a])] = 1.0
        return target

    def losses_or_logits(split, idx):
        pixels, masks, objects = pools[split]
        tokens = vit(pixels[idx])
        feats = pool_objects(tokens[:, 1:], [masks[i] for i in idx])
        per_object = {a: (heads[a](feats), torch.tensor([classes[a].index(o[a]) for i in idx for o in objects[i]]))
                      for a in per_object_labels}
        per_image = (image_head(tokens[:, 0]), torch.stack([present(objects[i]) for i in idx]))
        return per_object, per_image

    def test_accuracy():
        vit.eval()
        with torch.no_grad():
            per_object, _ = losses_or_logits('test', list(range(len(pools['test'][2]))))
        vit.train()
        return {a: round(100.0 * (logits.argmax(1) == targets).float().mean().item(), 1)
                for a, (logits, targets) in per_object.items()}

    curve, n_train = [], len(pools['train'][2])
    vit.train()
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch,), generator=gen).tolist()
        per_object, (image_logits, image_targets) = losses_or_logits('train', idx)
        loss = (sum(F.cross_entropy(logits, targets) for logits, targets in per_object.values())
                + F.binary_cross_entropy_with_logits(image_logits, image_targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps):
            eta = (time.time() - start) / step * (steps - step)
            print(f'supervised ViT step {step}/{steps}  loss {loss.item():.3f}  eta {eta:.0f} s', flush=True)
        if step in report or step == steps:
            curve.append((step, test_accuracy()))
    vit.eval()
    return curve


def provenance(world_dir: str, config: dict, steps: int, position_bins: int = 0) -> dict:
    """What the weights depend on: the world's generation arguments, the training recipe, the ViT sizes, the
    step count and (when used) the position heads' grid."""
    manifest = read_manifest(world_dir)
    if manifest is None:
        raise FileNotFoundError(f'{world_dir}: no toy world manifest.json (python -m dataset.toyworld)')
    return {'world': manifest['args'], 'format_version': manifest['format_version'], 'recipe': RECIPE_VERSION,
            'vit': {k: config.get(k) for k in VIT_KEYS}, 'steps': steps,
            # only when used, so that records written before the option existed still match
            **({'position_bins': position_bins} if position_bins else {})}


def ensure_supervised_vit(world_dir: str, config: dict, steps: int = 1000, force: bool = False,
                          log_every: int = 100, position_bins: int = 0) -> str:
    """Train and write `<world_dir>/vit_supervised.pth` for the config's ViT unless weights made from the same
    world, sizes, steps and position heads are already there; returns the weights' path."""
    import torch
    import utils
    from models.vit import build_vit
    out = os.path.join(world_dir, WEIGHTS_NAME)
    meta_path = os.path.splitext(out)[0] + '.json'
    made_from = provenance(world_dir, config, steps, position_bins)
    if not force and os.path.isfile(out) and os.path.isfile(meta_path):
        with open(meta_path, encoding='utf-8') as f:
            if json.load(f).get('made_from') == made_from:
                print(f'{out}: up to date (same world, ViT sizes, steps and heads); pass --force to retrain')
                return out
    torch.manual_seed(0)
    vit = build_vit(config)
    start = time.time()
    curve = train_on_attributes(world_dir, vit, config['image_res'], config.get('patch_size', 16),
                                steps=steps, log_every=log_every, position_bins=position_bins)
    # Weights first, then the record that vouches for them: an interrupted run is retrained next time.
    utils.atomic_save(vit.state_dict(), out)
    utils.atomic_write_text(meta_path, json.dumps({'made_from': made_from, 'test_accuracy': curve,
                                                   'seconds': round(time.time() - start)}, indent=1) + '\n')
    final = curve[-1][1]
    print(f'wrote {out} ({steps} steps, {time.time() - start:.0f} s); test-pool accuracy ' +
          ' / '.join(f'{a} {v:.1f} %' for a, v in final.items()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 with a one-line message for bad input)."""
    p = argparse.ArgumentParser(prog='python -m dataset.toyworld.supervised_vit', description=__doc__.splitlines()[0])
    p.add_argument('--world', default='data/toyworld', help='toy world folder (default data/toyworld)')
    p.add_argument('--config', default='configs/toy/Pretrain.yaml', help='config with the ViT sizes')
    p.add_argument('--steps', type=int, default=1000, help='AdamW steps of 32 images (default 1000)')
    p.add_argument('--position-bins', type=int, default=0,
                   help="also train per-object heads for the column and row of the object's centre on this grid "
                        '(default 0: none)')
    p.add_argument('--force', action='store_true', help='retrain even if up-to-date weights are there')
    p.add_argument('--threads', type=int, default=0, help='torch threads (default: torch decides)')
    args = p.parse_args(argv)
    import torch
    import utils
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.steps < 1:
            raise utils.UserError(f'--steps {args.steps}: must be at least 1')
        if args.position_bins < 0 or args.position_bins == 1:
            raise utils.UserError(f'--position-bins {args.position_bins}: must be 0 (off) or at least 2')
        config = utils.load_config(args.config)
        read_world(args.world)
        ensure_supervised_vit(args.world, config, args.steps, args.force, position_bins=args.position_bins)
    except (utils.UserError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
