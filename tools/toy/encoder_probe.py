"""What does a toy checkpoint's image encoder see? Linear probes for each object's shape, colour, size and place.

    python -m tools.toy.encoder_probe --world data/toyworld --checkpoint output/toy_pretrain/checkpoint_last.pth
    python -m tools.toy.encoder_probe --world data/toyworld --config configs/toy/Pretrain.yaml     # random init
    python -m tools.toy.encoder_probe ... --json                                                 # one JSON line

For every object of the world (world.json), the feature is the mean of the ViT's last-layer patch tokens whose
patch centre lies inside the object's box (the test transform: the image resized to image_res). A logistic
regression (L-BFGS, small L2) is fitted per attribute on the train pool's objects and scored on the test pool's;
'x' is the column of the object's centre on a 16 x 16 grid (where it is: what left / right statements need).
Chance: 25 % shape, 16.7 % colour, 50 % size, about 6 % x. A random-init encoder already separates colour (a linear function
of the pixels); shape and size must be learned, so their gain over the random-init row measures what training
taught the image side. The downstream tasks cannot do better than what the encoder sees.

`--supervised-steps N` is the reference for that gain: it trains the same encoder (from the checkpoint, or from
random init) for N AdamW steps directly on one attribute (`--attribute`, default shape; `all`: the three at once)
of every object in a batch of 32 train images (and, from [CLS], which of its values each image holds), and prints
the objects' test accuracy at a few step counts: how fast this encoder *can* learn to see the attribute when told
directly. The same training, on all three attributes from random init, makes the toy configs' `vision_pretrained`
weights (`python -m dataset.toyworld.supervised_vit`).
"""
from __future__ import annotations

import argparse
import json
import sys

from dataset.toyworld import read_world
from dataset.toyworld.supervised_vit import (ATTRIBUTES, POSITION_BINS, centre_bins, load_objects, pool_objects,
                                             train_on_attributes)

PROBED = ATTRIBUTES + ('x',)


def object_features(vit, world_dir: str, images: list, image_res: int, patch_size: int, batch: int = 100):
    """Mean patch token per object for the given world.json entries: (features [N, D], labels per PROBED name)."""
    import torch
    pixels, masks, objects = load_objects(world_dir, images, image_res, patch_size)
    vit.eval()
    with torch.no_grad():
        feats = torch.cat([pool_objects(vit(pixels[i:i + batch])[:, 1:], masks[i:i + batch])
                           for i in range(0, len(images), batch)])
    labels = {a: [o[a] for objs in objects for o in objs] for a in ATTRIBUTES}
    labels['x'] = [c['x'] for w in images for c in centre_bins(w, POSITION_BINS)]
    return feats, labels


def linear_probe(train_x, train_y: list, test_x, test_y: list, l2: float = 1e-3) -> float:
    """Test accuracy (%) of a multinomial logistic regression fitted on standardised train features."""
    import torch
    classes = sorted(set(train_y))
    ytr = torch.tensor([classes.index(v) for v in train_y])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(xtr.shape[1], len(classes))
    opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xtr), ytr) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        pred = head(xte).argmax(1).tolist()
    return 100.0 * sum(classes[p] == t for p, t in zip(pred, test_y)) / len(test_y)


def probe(world_dir: str, vit, image_res: int, patch_size: int, max_train_images: int | None = None) -> dict:
    """Linear-probe accuracies {'shape', 'colour', 'size', 'x'} (%) plus object counts for a ViT on a toy world."""
    world = read_world(world_dir)
    train = [w for w in world if w['split'] == 'train'][:max_train_images]
    test = [w for w in world if w['split'] == 'test']
    xtr, ytr = object_features(vit, world_dir, train, image_res, patch_size)
    xte, yte = object_features(vit, world_dir, test, image_res, patch_size)
    out = {a: round(linear_probe(xtr, ytr[a], xte, yte[a]), 1) for a in PROBED}
    out.update(train_objects=len(ytr['shape']), test_objects=len(yte['shape']))
    return out


def checkpoint_and_config(checkpoint: str | None, config_path: str | None):
    """(state dict or None, config): a toy checkpoint's weights and its saved config, which --config replaces."""
    import utils
    from models.checkpoint import read_checkpoint, unwrap_state_dict
    state, config = None, None
    if checkpoint:
        raw = read_checkpoint(checkpoint)
        state, _ = unwrap_state_dict(raw, checkpoint)
        config = raw.get('config') if isinstance(raw, dict) else None
    if config_path:
        config = utils.load_config(config_path)
    if config is None:
        raise utils.UserError(f'--checkpoint {checkpoint}: holds no config; pass --config with its model sizes')
    return state, config


def load_vit(checkpoint: str | None, config_path: str | None):
    """The ViT of a checkpoint (its saved config, or --config) or a random-init one from --config."""
    import utils
    from models.vit import build_vit
    state, config = checkpoint_and_config(checkpoint, config_path)
    vit = build_vit(config)
    if state is not None:
        prefix = 'visual_encoder.'
        vision = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not vision:
            raise utils.UserError(f'--checkpoint {checkpoint}: no visual_encoder.* weights')
        vit.load_state_dict(vision)
    return vit, config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--world', default='data/toyworld', help='toy world folder (default data/toyworld)')
    p.add_argument('--checkpoint', help='a toy checkpoint (any task); omit for a random-init encoder')
    p.add_argument('--config', help='config with the model sizes (default: the checkpoint\'s own)')
    p.add_argument('--max-train-images', type=int, default=None, help='fit the probes on at most this many')
    p.add_argument('--supervised-steps', type=int, default=0,
                   help='instead: train the encoder this many steps directly on --attribute and print test accuracy')
    p.add_argument('--attribute', default='shape', choices=ATTRIBUTES + ('all',),
                   help="what --supervised-steps trains on ('all': one head per attribute, losses summed)")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = p.parse_args(argv)
    import torch
    import utils
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        if not args.checkpoint and not args.config:
            raise utils.UserError('give --checkpoint, --config (random init), or both')
        vit, config = load_vit(args.checkpoint, args.config)
        if args.supervised_steps:
            attributes = ATTRIBUTES if args.attribute == 'all' else (args.attribute,)
            curve = train_on_attributes(args.world, vit, config['image_res'], config.get('patch_size', 16),
                                        attributes, args.supervised_steps)
            if args.json:
                print(json.dumps({'attributes': attributes, 'curve': curve}))
            else:
                print(f'{"+".join(attributes)} learned directly, test accuracy (%): ' + ', '.join(
                    f'step {s} ' + ' / '.join(f'{a} {acc[a]:.1f}' for a in attributes) for s, acc in curve))
            return 0
        result = probe(args.world, vit, config['image_res'], config.get('patch_size', 16), args.max_train_images)
    except utils.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    result['checkpoint'] = args.checkpoint or 'random init'
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'encoder':<50}" + ''.join(f'{a:>8}' for a in PROBED) + '   objects train/test')
        print(f"{result['checkpoint'][-50:]:<50}" + ''.join(f'{result[a]:>8.1f}' for a in PROBED) +
              f"   {result['train_objects']}/{result['test_objects']}")
        print(f'chance: shape 25.0, colour 16.7, size 50.0, x {100 / POSITION_BINS:.1f} (%)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
