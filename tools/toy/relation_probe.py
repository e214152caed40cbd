"""Did a toy pretraining learn left and right? Masked-word probe on the test images' captions.

    python -m tools.toy.relation_probe --world data/toyworld --checkpoint output/toy_demo/pretrain/checkpoint_last.pth
    python -m tools.toy.relation_probe ... --config <config.yaml> --json

In each test caption "a red circle to the left of a blue square" the word left / right is masked and the
pretrained model's MLM head (reading the image through its fusion layers) chooses between the two: only the image
can tell, so 50 % is chance. The control masks "left" in "from left to right", which the text alone gives away.
`--config` defaults to the config.yaml that Pretrain.py wrote beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from tools.toy.report import emit, missing_input

RELATION = re.compile(r'\bto the (left|right) of\b')
TEXT_CUE = re.compile(r'\bfrom left to right\b')


def probe_items(world_dir: str, split: str = 'test') -> list[dict]:
    """Captions of the split's retrieval file with a maskable side word: {'image', 'caption', 'answer' ('left' or
    'right'), 'kind' ('relation': the image decides; 'text cue': 'from left to right'), 'occurrence' (which
    occurrence of the answer word in the caption to mask)}."""
    with open(os.path.join(world_dir, f'retrieval_{split}.json')) as f:
        entries = json.load(f)
    items = []
    for entry in entries:
        captions = entry['caption'] if isinstance(entry['caption'], list) else [entry['caption']]
        for caption in captions:
            text = caption.lower()
            match = RELATION.search(text)
            if match:
                word = match.group(1)
                items.append({'image': entry['image'], 'caption': text, 'answer': word, 'kind': 'relation',
                              'occurrence': len(re.findall(rf'\b{word}\b', text[:match.start(1)]))})
            elif TEXT_CUE.search(text):
                cue = TEXT_CUE.search(text)
                items.append({'image': entry['image'], 'caption': text, 'answer': 'left', 'kind': 'text cue',
                              'occurrence': len(re.findall(r'\bleft\b', text[:cue.start()]))})
    return items


def score(items: list[dict], tokenizer, side_logits) -> dict:
    """Share (%) of items whose masked side word wins, per kind: {kind: {'items', 'accuracy', 'answer left'}}.

    side_logits(item, input_ids [1, L], attention_mask [1, L], position) -> (logit of 'left', logit of 'right') at
    the masked `position`."""
    left_id, right_id = tokenizer.convert_tokens_to_ids(['left', 'right'])
    tally: dict = {}
    for item in items:
        enc = tokenizer(item['caption'], return_tensors='pt')
        ids = enc.input_ids.clone()
        want = left_id if item['answer'] == 'left' else right_id
        positions = (ids[0] == want).nonzero().flatten().tolist()
        if item['occurrence'] >= len(positions):
            raise ValueError(f"caption {item['caption']!r}: no occurrence {item['occurrence']} of "
                             f"{item['answer']!r} after tokenization")
        position = positions[item['occurrence']]
        ids[0, position] = tokenizer.mask_token_id
        left, right = side_logits(item, ids, enc.attention_mask, position)
        chosen = 'left' if left > right else 'right'
        t = tally.setdefault(item['kind'], {'items': 0, 'right': 0, 'left answers': 0})
        t['items'] += 1
        t['right'] += chosen == item['answer']
        t['left answers'] += item['answer'] == 'left'
    return {kind: {'items': t['items'], 'accuracy': 100.0 * t['right'] / t['items'],
                   'answer left': 100.0 * t['left answers'] / t['items']} for kind, t in sorted(tally.items())}


def mlm_side_logits(model, transform, image_root: str):
    """side_logits for `score` from a pretraining model: its MLM logits at the mask, the image through the fusion."""
    import torch
    from PIL import Image
    left_id, right_id = model.tokenizer.convert_tokens_to_ids(['left', 'right'])

    @torch.no_grad()
    def side_logits(item, input_ids, attention_mask, position):
        with Image.open(os.path.join(image_root, os.path.basename(item['image']))) as img:
            pixels = transform(img.convert('RGB')).unsqueeze(0)
        logits = model.text_encoder(input_ids, attention_mask=attention_mask,
                                    encoder_hidden_states=model.visual_encoder(pixels), return_logits=True)
        return float(logits[0, position, left_id]), float(logits[0, position, right_id])
    return side_logits


def run(world_dir: str, checkpoint: str, config_path: str | None = None) -> dict:
    """Load the pretraining checkpoint with its config and probe the world's test captions."""
    import models
    import utils
    from dataset.transforms import build_transform
    from engine import build_tokenizer
    from models.checkpoint import load_checkpoint
    config = utils.load_config(config_path or os.path.join(os.path.dirname(checkpoint), 'config.yaml'))
    config['vision_pretrained'] = None  # the checkpoint holds the ViT
    tokenizer = build_tokenizer(config)
    model = models.create_model('pretrain', config, tokenizer)
    load_checkpoint(model, checkpoint, 'pretrain')
    model.eval()
    side_logits = mlm_side_logits(model, build_transform('test', config['image_res']),
                                  os.path.join(world_dir, 'images'))
    return score(probe_items(world_dir), tokenizer, side_logits)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--world', default='data/toyworld', help='toy world folder')
    parser.add_argument('--checkpoint', required=True, help='a Pretrain.py checkpoint')
    parser.add_argument('--config', default=None, help='its config (default: config.yaml beside it)')
    parser.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = parser.parse_args(argv)
    config_path = args.config or os.path.join(os.path.dirname(args.checkpoint), 'config.yaml')
    if missing_input(((os.path.join(args.world, 'retrieval_test.json'), '--world'),
                      (args.checkpoint, '--checkpoint'), (config_path, '--config'))):
        return 2
    report = run(args.world, args.checkpoint, config_path)
    emit(report, args.json, f'MLM left / right probe of {args.checkpoint} (test captions)',
         ('masked word', 'captions', 'chosen right %', '"left" is the answer %'),
         [(kind, r['items'], r['accuracy'], r['answer left']) for kind, r in report.items()])
    return 0


if __name__ == '__main__':
    sys.exit(main())
