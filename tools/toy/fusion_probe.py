"""Does a toy pretraining checkpoint's fusion read the image? Masked attribute words on held-out images.

    python -m tools.toy.fusion_probe --world data/toyworld --checkpoint output/toy_pretrain/checkpoint_last.pth
    python -m tools.toy.fusion_probe ... --json                                      # one JSON line

`encoder_probe` asks what the image encoder sees; this asks what the whole pretraining model (encoder, fusion
layers, MLM head) reads out of an image for a word about it. For each test-pool image, its first retrieval-test
caption is copied once per shape / colour / size word in it, with that word replaced by [MASK], and the MLM head's
choice among the words of that attribute is scored (size: the synonyms count as one: small = little, big = large).
Every masked caption is scored twice: with its own image and with another test image (a fixed shuffle). The
shuffled column is what the caption's words alone give; the gap between the columns is what the image adds.

For single-object images the probe also reports where the masked shape word looks: the share of each fusion
layer's cross-attention (mean over heads) that falls on the object's patches (patch centre inside its box), next
to the share of patches the object covers. Attention that reads an object's shape has to land on it; a share near
the area share means the layer looks everywhere alike.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from dataset.toyworld import COLOUR_NAMES, SHAPES, SIZE_WORDS, read_world
from dataset.toyworld.supervised_vit import object_masks
from tools.toy.encoder_probe import checkpoint_and_config

ATTRIBUTE_WORDS = {
    'shape': SHAPES,
    'colour': COLOUR_NAMES,
    'size': tuple(w for words in SIZE_WORDS.values() for w in words),
}
SIZE_CLASS = {w: size for size, words in SIZE_WORDS.items() for w in words}  # synonyms: one class


def load_model(checkpoint: str, config_path: str | None, world_dir: str):
    """The pretraining model of a toy checkpoint (its saved config, or --config) with the world's tokenizer."""
    import engine
    import models
    from models.checkpoint import load_checkpoint
    _, config = checkpoint_and_config(checkpoint, config_path)
    config = dict(config, text_encoder=os.path.join(world_dir, 'vocab'))
    tokenizer = engine.build_tokenizer(config)
    model = models.create_model('pretrain', config, tokenizer)
    load_checkpoint(model, checkpoint, 'pretrain')
    return model.eval(), tokenizer, config


def masked_copies(tokenizer, captions: list[str]):
    """One copy of each caption per attribute word in it, that word masked.

    Returns (input_ids [M, L], attention_mask [M, L], caption index [M], masked position [M], attribute [M],
    true word id [M]).
    """
    import torch
    word_ids = {a: tokenizer.convert_tokens_to_ids(list(ws)) for a, ws in ATTRIBUTE_WORDS.items()}
    attribute_of = {i: a for a, ids in word_ids.items() for i in ids}
    text = tokenizer(captions, padding='longest', return_tensors='pt')
    rows, owner, positions, attributes, truth = [], [], [], [], []
    for c, ids in enumerate(text.input_ids):
        for pos, token in enumerate(ids.tolist()):
            if token in attribute_of:
                masked = ids.clone()
                masked[pos] = tokenizer.mask_token_id
                rows.append(masked)
                owner.append(c)
                positions.append(pos)
                attributes.append(attribute_of[token])
                truth.append(token)
    if not rows:
        raise ValueError('no shape, colour or size word in the captions')
    owner = torch.tensor(owner)
    return (torch.stack(rows), text.attention_mask[owner], owner, torch.tensor(positions), attributes,
            torch.tensor(truth)), word_ids


def _correct(attribute: str, predicted: int, true: int, id_to_word) -> bool:
    if attribute == 'size':
        return SIZE_CLASS[id_to_word(predicted)] == SIZE_CLASS[id_to_word(true)]
    return predicted == true


def _fusion_layers(model):
    return [layer for layer in model.text_encoder.bert.encoder.layer
            if getattr(layer, 'crossattention', None) is not None]


def fusion_probe(model, tokenizer, world_dir: str, image_res: int, patch_size: int, max_images: int | None = None,
                 batch: int = 256) -> dict:
    """Held-out masked-word accuracy per attribute (own image / shuffled image, %) and, for single-object images,
    the masked shape word's cross-attention share on the object per fusion layer (%)."""
    import torch
    from PIL import Image
    from dataset.transforms import build_transform
    from models.attention_recording import recording
    with open(os.path.join(world_dir, 'retrieval_test.json'), encoding='utf-8') as f:
        items = json.load(f)[:max_images]
    world = {w['file']: w for w in read_world(world_dir)}
    transform = build_transform('test', image_res)
    pixels = torch.stack([transform(Image.open(os.path.join(world_dir, 'images', it['image'])).convert('RGB'))
                          for it in items])
    captions = [it['caption'][0] if isinstance(it['caption'], list) else it['caption'] for it in items]
    (ids, atts, owner, positions, attributes, truth), word_ids = masked_copies(tokenizer, captions)
    shuffled = torch.roll(torch.arange(len(items)), 1)  # every image paired with another one
    grid = image_res // patch_size
    object_mask = torch.stack([object_masks(world[it['image']]['objects'][:1], world[it['image']]['size'][0],
                                            grid)[0].float() for it in items])
    single = torch.tensor([len(world[it['image']]['objects']) == 1 for it in items])
    layers = _fusion_layers(model)
    id_to_word = tokenizer.convert_ids_to_tokens
    hits = {(a, which): [0, 0] for a in ATTRIBUTE_WORDS for which in ('own', 'shuffled')}
    attention_share = [[] for _ in layers]
    area_share = []
    with torch.no_grad():
        image_embeds = model.visual_encoder(pixels)
        for which, image_of in (('own', torch.arange(len(items))), ('shuffled', shuffled)):
            record = which == 'own'
            with recording(*(layer.crossattention.self for layer in layers)) if record else contextlib.nullcontext():
                for start in range(0, len(ids), batch):
                    sl = slice(start, start + batch)
                    rows = torch.arange(len(ids))[sl]
                    logits = model.text_encoder(ids[sl], attention_mask=atts[sl],
                                                encoder_hidden_states=image_embeds[image_of[owner[sl]]],
                                                return_logits=True)
                    at_mask = logits[torch.arange(len(rows)), positions[sl]]
                    for r, row in enumerate(rows.tolist()):
                        a = attributes[row]
                        choice = word_ids[a][int(at_mask[r, word_ids[a]].argmax())]
                        hits[(a, which)][0] += _correct(a, choice, int(truth[row]), id_to_word)
                        hits[(a, which)][1] += 1
                        if record and a == 'shape' and single[owner[row]]:
                            mask = object_mask[owner[row]]
                            for k, layer in enumerate(layers):
                                probs = layer.crossattention.self.get_attention_map()[r, :, positions[row], 1:]
                                attention_share[k].append(float((probs.mean(0) * mask).sum()))
                            area_share.append(float(mask.mean()))
    result = {f'{a}_{which}': round(100.0 * h / max(n, 1), 1) for (a, which), (h, n) in hits.items()}
    result['masked_words'] = {a: hits[(a, 'own')][1] for a in ATTRIBUTE_WORDS}
    result['single_object_shape_words'] = len(area_share)
    if area_share:
        result['object_area_share'] = round(100.0 * sum(area_share) / len(area_share), 1)
        result['attention_on_object'] = [round(100.0 * sum(s) / len(s), 1) for s in attention_share]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--world', default='data/toyworld', help='toy world folder (default data/toyworld)')
    p.add_argument('--checkpoint', required=True, help='a toy pretraining checkpoint')
    p.add_argument('--config', help="config with the model sizes (default: the checkpoint's own)")
    p.add_argument('--max-images', type=int, default=None, help='use at most this many test images')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = p.parse_args(argv)
    import torch
    import utils
    torch.set_num_threads(args.threads)
    try:
        model, tokenizer, config = load_model(args.checkpoint, args.config, args.world)
        result = fusion_probe(model, tokenizer, args.world, config['image_res'], config.get('patch_size', 16),
                              args.max_images)
    except utils.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    result['checkpoint'] = args.checkpoint
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"masked word, held-out images   {'own image':>10}{'shuffled':>10}   words")
    for a, words in ATTRIBUTE_WORDS.items():
        print(f"{a:<31}{result[f'{a}_own']:>10.1f}{result[f'{a}_shuffled']:>10.1f}   {result['masked_words'][a]}")
    if 'attention_on_object' in result:
        layers = ', '.join(f'{s:.1f}' for s in result['attention_on_object'])
        print(f"single-object images ({result['single_object_shape_words']} shape words): cross-attention on the "
              f"object per fusion layer {layers} % (object covers {result['object_area_share']:.1f} % of patches)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
