"""The toy-world measuring aids (tools/toy/): each probe's arithmetic on a mini world, and its command line."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv: str) -> str:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def test_encoder_probe_loading_accuracy_and_supervised_reference(tmp_path):
    from tools.toy import encoder_probe
    import utils
    from tests.toy import MINI_WORLD_SIZES, generate_world
    world = generate_world(str(tmp_path / 'world'), 0, **MINI_WORLD_SIZES)
    config = utils.load_config(os.path.join(ROOT, 'configs', 'toy', 'Pretrain.yaml'))
    torch.manual_seed(0)
    vit, _ = encoder_probe.load_vit(None, os.path.join(ROOT, 'configs', 'toy', 'Pretrain.yaml'))
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'model': {f'visual_encoder.{k}': v for k, v in vit.state_dict().items()}, 'config': config}, ckpt)
    loaded, _ = encoder_probe.load_vit(str(ckpt), None)
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), loaded.state_dict().values()))

    result = encoder_probe.probe(world, loaded, config['image_res'], config['patch_size'])
    assert result['test_objects'] >= 8 and result['train_objects'] >= 24
    # random patch features are a linear function of the pixels: colour is separable far above 1/6 chance
    assert result['colour'] > 50
    assert all(0 <= result[a] <= 100 for a in encoder_probe.PROBED)

    r = subprocess.run([sys.executable, '-m', 'tools.toy.encoder_probe', '--world', world, '--checkpoint', str(ckpt),
                        '--json'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: line[k] for k in encoder_probe.PROBED} == {k: result[k] for k in encoder_probe.PROBED}
    r = subprocess.run([sys.executable, '-m', 'tools.toy.encoder_probe', '--world', world], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and '--checkpoint' in r.stderr

    # the supervised reference trains the encoder and reports at the asked steps and the last one
    r = subprocess.run([sys.executable, '-m', 'tools.toy.encoder_probe', '--world', world, '--checkpoint', str(ckpt),
                        '--supervised-steps', '2', '--attribute', 'all', '--json'], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line['attributes'] == list(encoder_probe.ATTRIBUTES) and [s for s, _ in line['curve']] == [2]
    assert set(line['curve'][0][1]) == set(encoder_probe.ATTRIBUTES)


def test_toy_fusion_probe_masks_each_attribute_word_and_reports_shares(tmp_path):
    from tools.toy import fusion_probe as tfp
    import models
    import engine
    from tests.toy import MINI_WORLD_SIZES, TINY, generate_world
    world = generate_world(str(tmp_path / 'world'), 0, **MINI_WORLD_SIZES)
    tokenizer = engine.build_tokenizer({'text_encoder': os.path.join(world, 'vocab')})

    (ids, atts, owner, positions, attributes, truth), word_ids = tfp.masked_copies(
        tokenizer, ['a big red circle', 'two objects'])
    # one copy per attribute word of the first caption, none of the second; exactly that word masked
    assert attributes == ['size', 'colour', 'shape'] and owner.tolist() == [0, 0, 0]
    assert [tokenizer.convert_ids_to_tokens(int(t)) for t in truth] == ['big', 'red', 'circle']
    for row, pos in zip(ids, positions.tolist()):
        assert int(row[pos]) == tokenizer.mask_token_id and int((row == tokenizer.mask_token_id).sum()) == 1
    assert atts.shape == ids.shape and word_ids['shape'] == tokenizer.convert_tokens_to_ids(list(tfp.ATTRIBUTE_WORDS['shape']))
    with pytest.raises(ValueError, match='no shape, colour or size word'):
        tfp.masked_copies(tokenizer, ['two objects'])

    config = {**TINY, 'image_res': 32, 'text_encoder': os.path.join(world, 'vocab')}
    torch.manual_seed(0)
    model = models.create_model('pretrain', config, tokenizer)
    ckpt = tmp_path / 'pretrain.pth'
    torch.save({'model': model.state_dict(), 'config': config}, ckpt)
    loaded, tok, cfg = tfp.load_model(str(ckpt), None, world)
    result = tfp.fusion_probe(loaded, tok, world, cfg['image_res'], cfg['patch_size'])

    with open(os.path.join(world, 'retrieval_test.json')) as f:
        first_captions = [it['caption'][0] for it in json.load(f)]
    expected = {a: sum(w in tfp.ATTRIBUTE_WORDS[a] for c in first_captions for w in tokenizer.tokenize(c))
                for a in tfp.ATTRIBUTE_WORDS}
    assert result['masked_words'] == expected and sum(expected.values()) > 0
    assert all(0 <= result[f'{a}_{w}'] <= 100 for a in tfp.ATTRIBUTE_WORDS for w in ('own', 'shuffled'))
    # the seed-0 mini world has single-object test images; one share per fusion layer (TINY: 2 BERT layers,
    # fusion from layer 1), each a share of a probability mass
    assert result['single_object_shape_words'] > 0 and len(result['attention_on_object']) == 1
    assert 0 < result['object_area_share'] <= 100 and all(0 <= s <= 100 for s in result['attention_on_object'])
    # recording is switched off again (later forwards take the fused path)
    assert all(not layer.crossattention.self.save_attention for layer in tfp._fusion_layers(loaded))

    r = subprocess.run([sys.executable, '-m', 'tools.toy.fusion_probe', '--world', world, '--checkpoint', str(ckpt),
                        '--json'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k: line[k] for k in result} == result
    torch.save({'model': model.state_dict()}, tmp_path / 'bare.pth')
    r = subprocess.run([sys.executable, '-m', 'tools.toy.fusion_probe', '--world', world, '--checkpoint',
                        str(tmp_path / 'bare.pth')], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and '--config' in r.stderr


def test_toy_grounding_errors_sorts_box_choices(tmp_path):
    from tools.toy import grounding_errors
    from refTools.refer import REFER
    from tests.toy import MINI_WORLD_SIZES, generate_world
    world = generate_world(str(tmp_path / 'world'), 0, **MINI_WORLD_SIZES)
    refer = REFER(world, 'refcoco+', 'unc')
    items = [it for name in ('refcoco+_val.json', 'refcoco+_test.json')
             for it in json.load(open(os.path.join(world, name)))]
    grid = 8

    def box_map(box, side):  # the share of each cell that the box covers
        edges = torch.arange(grid + 1) * side / grid
        cover_x = (torch.minimum(edges[1:], torch.tensor(box[0] + box[2]))
                   - torch.maximum(edges[:-1], torch.tensor(box[0]))).clamp(min=0)
        cover_y = (torch.minimum(edges[1:], torch.tensor(box[1] + box[3]))
                   - torch.maximum(edges[:-1], torch.tensor(box[1]))).clamp(min=0)
        return cover_y[:, None] * cover_x[None, :] / (side / grid) ** 2

    def write(choose):
        preds = []
        for it in items:
            ref = refer.Refs[it['ref_id']]
            preds.append(box_map(choose(ref), refer.Imgs[ref['image_id']]['width']))
        path = tmp_path / 'maps.pth'
        torch.save({'index': torch.arange(len(items)), 'ref_id': torch.tensor([it['ref_id'] for it in items]),
                    'pred': torch.stack(preds)}, path)
        return str(path)

    on_target = grounding_errors.analyse(world, write(lambda ref: refer.refToAnn[ref['ref_id']]['bbox']))
    assert set(on_target) <= {'val', 'testA', 'testB'} and on_target
    for split, r in on_target.items():
        assert r['n'] == sum(refer.Refs[it['ref_id']]['split'] == split for it in items)
        assert abs(sum(r[k] for k in grounding_errors.OUTCOMES) - 100) < 0.5
        assert r['correct'] >= 75 and r['objects only'] >= 75
        assert r['counts']['by attributes'] + r['counts']['by position'] == r['n']

    def other_object(ref):  # a map on another object of the image, where there is one
        boxes = [a['bbox'] for a in refer.imgToAnns[ref['image_id']] if a['id'] != ref['ann_id']]
        return boxes[0] if boxes else [0, 0, 2, 2]
    elsewhere = grounding_errors.analyse(world, write(other_object))
    for split, r in elsewhere.items():
        assert r['correct'] < on_target[split]['correct'] and r['other object'] + r['background'] > 0

    assert grounding_errors.main(['--world', world, '--maps', str(tmp_path / 'nothing.pth')]) == 2


def test_toy_vqa_kinds_scores_each_kind_with_the_vqa_metric(tmp_path):
    from tools.toy import vqa_kinds
    from dataset.toyworld import vqa_question_kind
    from tests.toy import MINI_WORLD_SIZES, generate_world
    world = generate_world(str(tmp_path / 'world'), 0, **MINI_WORLD_SIZES)
    items = json.load(open(os.path.join(world, 'vqa_test.json')))
    truth = {it['question_id']: max(set(it['answer']), key=it['answer'].count) for it in items}
    # Right on every question but the relation ones, which all get an answer no human gave.
    result = [{'question_id': q, 'answer': 'purple elephant' if vqa_question_kind(it['question']) == 'relation'
               else truth[q]} for q, it in zip(truth, items)]
    path = tmp_path / 'result.json'
    path.write_text(json.dumps(result))
    report = vqa_kinds.accuracy_by_kind(items, str(path))
    assert report['questions'] == len(items) == sum(r['questions'] for r in report['kinds'].values())
    for kind, r in report['kinds'].items():
        assert r['accuracy'] == (0.0 if kind == 'relation' else 100.0), kind
    relation = report['kinds'].get('relation', {'questions': 0})['questions']
    assert abs(report['overall'] - 100.0 * (1 - relation / len(items))) < 0.01
    out = _run('-m', 'tools.toy.vqa_kinds', '--world', world, '--result', str(path), '--json')
    assert json.loads(out.strip().splitlines()[-1]) == report
    assert vqa_kinds.main(['--world', world, '--result', str(tmp_path / 'nothing.json')]) == 2


def test_toy_relation_probe_masks_the_side_word_and_scores_the_choice(tmp_path):
    from tools.toy import relation_probe
    import models
    import utils
    from engine import build_tokenizer
    from tests.toy import generate_world, mini_config
    world = generate_world(str(tmp_path / 'world'), 0, train_images=24, val_images=8, test_images=40)
    tokenizer = build_tokenizer({'text_encoder': os.path.join(world, 'vocab')})
    items = relation_probe.probe_items(world)
    kinds = {it['kind'] for it in items}
    assert kinds == {'relation', 'text cue'}
    assert all(it['answer'] in ('left', 'right') for it in items)

    seen = []

    def oracle(item, ids, atts, position):  # knows the answer: sees it only through the item
        assert ids[0, position] == tokenizer.mask_token_id and atts.shape == ids.shape
        seen.append(tokenizer.decode(ids[0]))
        return (1.0, 0.0) if item['answer'] == 'left' else (0.0, 1.0)
    perfect = relation_probe.score(items, tokenizer, oracle)
    assert all(r['accuracy'] == 100.0 for r in perfect.values())
    assert sum(r['items'] for r in perfect.values()) == len(items) == len(seen)
    assert all('[MASK]' in text for text in seen)

    always_left = relation_probe.score(items, tokenizer, lambda *a: (1.0, 0.0))
    for kind, r in always_left.items():
        assert r['accuracy'] == r['answer left']
    assert always_left['text cue']['accuracy'] == 100.0 and always_left['relation']['answer left'] < 100.0

    # End to end on a tiny random pretraining model: every caption is scored, one JSON line.
    config_path = mini_config('Pretrain', world, tmp_path / 'config.yaml')
    config = utils.load_config(config_path)
    model = models.create_model('pretrain', config, tokenizer)
    torch.save({'model': model.state_dict()}, tmp_path / 'checkpoint.pth')
    out = _run('-m', 'tools.toy.relation_probe', '--world', world, '--checkpoint', str(tmp_path / 'checkpoint.pth'),
               '--json')
    report = json.loads(out.strip().splitlines()[-1])
    assert {k: r['items'] for k, r in report.items()} == {k: r['items'] for k, r in perfect.items()}
    assert all(0 <= r['accuracy'] <= 100 for r in report.values())
    assert relation_probe.main(['--world', world, '--checkpoint', str(tmp_path / 'none.pth')]) == 2


@pytest.mark.parametrize('task', ['ve', 'nlvr'])
def test_toy_sentence_kinds_splits_the_evaluators_accuracy_by_kind(task, tmp_path):
    import importlib
    from tools.toy import sentence_kinds as kinds
    import models
    import utils
    from dataset import create_dataset
    from engine import build_tokenizer
    from evaluation.classification import evaluate
    from evaluation.common import build_eval_loaders
    from dataset.toyworld import nlvr_statement_kind
    from tests.toy import generate_world, mini_config
    script = importlib.import_module({'ve': 'VE', 'nlvr': 'NLVR'}[task])
    assert kinds.sentence_kind('The leftmost circle is small.') == 'position'
    assert kinds.sentence_kind('In the left image, a circle is to the right of a square') == 'position'
    assert kinds.sentence_kind('The left image has more squares than the right image.') == 'no position'
    assert kinds.sentence_kind('the brightest circle is small') == 'no position'
    names = ('contradiction', 'neutral', 'entailment')
    assert kinds.accuracy_by_kind(['a b', 'a c'], [0, 1], [0, 0], names, statement_kind=lambda s: s[-1])[
        'statement: c'] == {'items': 1, 'accuracy': 0.0}
    assert kinds.accuracy_by_kind(['a left b', 'a b', 'a b'], [2, 0, 1], [2, 0, 0], names) == {
        'all': {'items': 3, 'accuracy': 200 / 3}, 'no position': {'items': 2, 'accuracy': 50.0},
        'no position / contradiction': {'items': 2, 'accuracy': 50.0}, 'position': {'items': 1, 'accuracy': 100.0},
        'position / entailment': {'items': 1, 'accuracy': 100.0}}

    world = generate_world(str(tmp_path / 'world'), 0, train_images=24, val_images=8, test_images=16,
                           image_size=48)
    config_path = mini_config({'ve': 'VE', 'nlvr': 'NLVR'}[task], world, tmp_path / 'config.yaml')
    config = utils.load_config(config_path)
    tokenizer = build_tokenizer(config)
    torch.manual_seed(0)
    model = models.create_model(task, config, tokenizer)
    torch.save({'model': model.state_dict()}, tmp_path / 'checkpoint.pth')
    out = _run('-m', 'tools.toy.sentence_kinds', '--task', task, '--checkpoint', str(tmp_path / 'checkpoint.pth'),
               '--json')
    report = json.loads(out.strip().splitlines()[-1])
    test_set = create_dataset(task, config)[2]
    found = [kinds.sentence_kind(item['sentence']) for item in test_set.ann]
    assert report['all']['items'] == len(test_set)
    assert {k: report[k]['items'] for k in ('no position', 'position') if k in report} == {
        k: found.count(k) for k in set(found)}
    statements = {k[len('statement: '):]: r['items'] for k, r in report.items() if k.startswith('statement: ')}
    if task == 'nlvr':
        assert statements == Counter(nlvr_statement_kind(item['sentence']) for item in test_set.ann)
    else:
        assert statements == {}
    # The same predictions as the task script's evaluator.
    loader = build_eval_loaders([test_set], 4, 0)[0]
    predict = script.make_predict_fn(tokenizer, torch.device('cpu'), 64, 'fp32')
    assert abs(report['all']['accuracy'] - 100 * evaluate(model, loader, predict, script.CLASS_NAMES)['acc']) < 1e-6
    assert kinds.main(['--task', task, '--checkpoint', str(tmp_path / 'none.pth')]) == 2
