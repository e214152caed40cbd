"""Grounding: Grad-CAM maps (models/gradcam.py), proposal handling and the evaluator (evaluation/grounding.py),
Grounding.py end to end, and (slow) learning on the toy world: toy pretrain -> grounding fine-tune -> accuracy per
split well above chance."""
import json
import os
import types
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

import utils
from dataset.utils import DataError
from evaluation import figures
from evaluation.grounding import (clip_box, load_dets, merge_map_shards, prepare_proposals,
                                  proposal_statistics)
from models import create_model, gradcam

from tests.test_parity_models import tiny_model_config
from tests.toy import make_toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny():
    """A random tiny retrieval model (4 BERT layers, fusion from 2; ViT 64 px / 16 px patches) and a batch."""
    torch.manual_seed(0)
    cfg = tiny_model_config()[0]
    model = create_model('retrieval', cfg, None).eval()
    B, L = 3, 7
    image = torch.randn(B, 3, cfg['image_res'], cfg['image_res'])
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ids = torch.randint(5, 1000, (B, L))
    ids[:, 0] = 101
    ids[mask == 0] = 0
    return model, image, ids, mask


def reference_itm_gradcam(model, image, ids, mask, block_num):
    """The original Grounding.py recipe, literally: backward() of the summed match logit, saved gradients, mean
    over heads and over ALL padded positions."""
    attn = model.text_encoder.encoder.layer[block_num].crossattention.self
    attn.save_attention = True
    try:
        image_embeds = model.visual_encoder(image)
        out = model.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=torch.ones(image_embeds.shape[:2]), mode='multi_modal')
        logits = model.itm_head(out.last_hidden_state[:, 0])
        model.zero_grad()
        logits[:, 1].sum().backward()
        B, L = ids.shape
        g = gradcam.patch_grid(model)
        m = mask.view(B, 1, L, 1, 1).float()
        cams = attn.get_attention_map()[:, :, :, 1:].reshape(B, -1, L, *g) * m
        grads = attn.get_attn_gradients()[:, :, :, 1:].reshape(B, -1, L, *g).clamp(min=0) * m
        return (cams * grads).mean(1).mean(1).detach().numpy()
    finally:
        attn.save_attention = False
        attn.save_attention_map(None)
        attn.save_attn_gradients(None)
        model.zero_grad(set_to_none=True)


def reference_itc_gradcam(model, image, ids, mask, block_num):
    image_embeds = model.visual_encoder(image, register_blk=block_num)
    image_feat = torch.nn.functional.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    _, text_feat = model.encode_text(ids, mask)
    model.zero_grad()
    (image_feat * text_feat).sum(1).div(model.temp).sum().backward()
    attn = model.visual_encoder.blocks[block_num].attn
    g = gradcam.patch_grid(model)
    B = image.shape[0]
    cam = attn.get_attention_map()[:, :, 0, 1:].reshape(B, -1, *g)
    grad = attn.get_attn_gradients()[:, :, 0, 1:].reshape(B, -1, *g).clamp(min=0)
    model.zero_grad(set_to_none=True)
    model.visual_encoder(image[:1])  # switches recording off again
    return (cam * grad).mean(1).detach().numpy()


class FakeRefer:
    """The three REFER tables grounding reads (Refs, refToAnn, Imgs)."""

    def __init__(self, refs):
        # refs: {ref_id: (image_id, split, gt box, (width, height))}
        self.Refs = {r: {'ref_id': r, 'image_id': im, 'split': sp} for r, (im, sp, _, _) in refs.items()}
        self.refToAnn = {r: {'bbox': box} for r, (_, _, box, _) in refs.items()}
        self.Imgs = {im: {'id': im, 'width': wh[0], 'height': wh[1]} for (im, _, _, wh) in refs.values()}


# ----------------------------------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('block_num', [2, 3])
def test_itm_gradcam_matches_original_recipe(tiny, block_num):
    model, image, ids, mask = tiny
    ref = reference_itm_gradcam(model, image, ids, mask, block_num)
    out = gradcam.itm_gradcam(model, image, ids, mask, block_num, sentence_average='padded')
    assert out.sentence_maps.shape == (3, 4, 4) and out.token_maps.shape == (3, 7, 4, 4)
    np.testing.assert_allclose(out.sentence_maps, ref, rtol=1e-5, atol=1e-10)
    assert np.abs(ref).max() > 0
    # Padded positions have all-zero maps; 'real' averaging rescales each item by L / n_real.
    assert np.all(out.token_maps[2, 3:] == 0)
    real = gradcam.sentence_map(out.token_maps, out.attention_mask, 'real')
    np.testing.assert_allclose(real * mask.sum(1).numpy()[:, None, None] / 7, out.sentence_maps, rtol=1e-5)
    # Neither parameter gradients nor recording state are left behind.
    assert all(p.grad is None for p in model.parameters())
    assert not model.text_encoder.encoder.layer[block_num].crossattention.self.save_attention
    assert model.text_encoder.encoder.layer[block_num].crossattention.self.get_attention_map() is None


def test_itm_sentence_map_does_not_depend_on_batch_padding(tiny):
    model, image, ids, mask = tiny
    alone = gradcam.itm_gradcam(model, image[2:], ids[2:, :3], mask[2:, :3])
    batched = gradcam.itm_gradcam(model, image, ids, mask)
    np.testing.assert_allclose(alone.sentence_maps[0], batched.sentence_maps[2], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(alone.itm_prob[0], batched.itm_prob[2], rtol=1e-5)


def test_itc_gradcam_matches_original_recipe(tiny):
    model, image, ids, mask = tiny
    out = gradcam.itc_gradcam(model, image, ids, mask, 1)
    ref = reference_itc_gradcam(model, image, ids, mask, 1)
    assert out.token_maps is None and out.sentence_maps.shape == (3, 4, 4)
    np.testing.assert_allclose(out.sentence_maps, ref, rtol=1e-5, atol=1e-12)


def test_gradcam_with_frozen_parameters_and_train_mode_restored(tiny):
    model, image, ids, mask = tiny
    expected = gradcam.itm_gradcam(model, image, ids, mask).sentence_maps
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    try:
        out = gradcam.itm_gradcam(model, image, ids, mask)
        itc = gradcam.itc_gradcam(model, image, ids, mask)
        assert model.training  # restored
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    np.testing.assert_allclose(out.sentence_maps, expected, rtol=1e-5, atol=1e-12)
    assert np.abs(itc.sentence_maps).max() > 0


def test_layers_grid_and_block_num_checks(tiny):
    model = tiny[0]
    assert list(gradcam.fusion_layers(model)) == [2, 3]
    assert gradcam.default_block_num(model, 'itm') == 2  # never the last fusion layer (only [CLS] reaches ITM)
    assert gradcam.default_block_num(model, 'itc') == 1
    assert gradcam.check_block_num(model, 'itm', None) == 2
    for bad in (1, 4, -1):
        with pytest.raises(gradcam.GradCamError, match=r'--block_num .* outside the fusion layers .*2\.\.3'):
            gradcam.check_block_num(model, 'itm', bad)
    with pytest.raises(gradcam.GradCamError, match=r'outside the ViT blocks .*0\.\.1'):
        gradcam.check_block_num(model, 'itc', 2)
    with pytest.raises(gradcam.GradCamError, match='gradcam mode'):
        gradcam.check_block_num(model, 'xyz', 2)
    # bert-base layout: 12 layers from 6 -> layer 8 (the original's default); grid from image_res / patch_size.
    fake = types.SimpleNamespace(text_encoder=types.SimpleNamespace(
        config=types.SimpleNamespace(fusion_layer=6, num_hidden_layers=12)))
    assert gradcam.default_block_num(fake, 'itm') == 8
    cfg = dict(tiny_model_config()[0], image_res=48)
    assert gradcam.patch_grid(create_model('retrieval', cfg, None)) == (3, 3)


def test_last_fusion_layer_gives_only_cls_token_map(tiny):
    model, image, ids, mask = tiny
    out = gradcam.itm_gradcam(model, image, ids, mask, 3)
    assert np.all(out.token_maps[:, 1:] == 0) and np.abs(out.token_maps[:, 0]).max() > 0
    out = gradcam.itm_gradcam(model, image, ids, mask, 2)
    assert np.abs(out.token_maps[0, 1:]).max() > 0


def test_merge_word_pieces():
    maps = np.arange(6 * 2 * 2, dtype=np.float32).reshape(6, 2, 2)
    words, wm = gradcam.merge_word_pieces(['[CLS]', 'a', 'dog', '##gy', '##s', 'runs'], maps)
    assert words == ['a', 'doggys', 'runs']
    np.testing.assert_allclose(wm[1], maps[2:5].mean(0))
    np.testing.assert_allclose(wm[2], maps[5])
    assert gradcam.merge_word_pieces(['[CLS]'], maps[:1])[0] == []


def test_overlay_shape_and_range():
    img = np.full((30, 50, 3), 128, np.uint8)
    hm = np.zeros((4, 4), np.float32)
    hm[1, 2] = 1
    out = figures.overlay(img, hm)
    assert out.shape == (30, 50, 3) and out.dtype == np.uint8
    assert np.array_equal(figures.overlay(img, np.zeros((4, 4))), img)  # a flat map leaves the image as is


# ----------------------------------------------------------------------------------------------------------------
# Proposals, statistics, shard merging
# ----------------------------------------------------------------------------------------------------------------
def test_prepare_proposals_clips_drops_and_errors():
    refer = FakeRefer({0: (10, 'val', [0, 0, 10, 10], (100, 80)), 1: (11, 'testA', [5, 5, 10, 10], (50, 50))})
    dets = {'10': [[0, 0, 10, 10, 0.9], [90, 70, 20, 20], [200, 0, 5, 5], [1, 1, 0, 3]], '11': [[5, 5, 10, 10]]}
    with pytest.warns(UserWarning, match=r'1 proposal box\(es\) extend outside .* clipped.*2 lie entirely outside'):
        out = prepare_proposals([0, 1, 0], refer, dets, 'dets.json')
    assert out == {'10': [[0, 0, 10, 10], [90, 70, 10, 10]], '11': [[5, 5, 10, 10]]}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        prepare_proposals([1], refer, dets)  # nothing outside: no warning
    with pytest.raises(DataError, match=r'^dets\.json: no entry for image_id 11 \(ref_id 1, test item 0\)$'):
        prepare_proposals([1], refer, {'10': dets['10']}, 'dets.json')
    with pytest.raises(DataError, match=r'ref_id 7 is not in the REFER refs'):
        prepare_proposals([7], refer, dets)
    with pytest.raises(DataError, match='every proposal of image_id 11 lies outside'):
        prepare_proposals([1], refer, {'11': [[60, 60, 5, 5]]})
    with pytest.raises(DataError, match='non-numeric'):
        prepare_proposals([1], refer, {'11': [['a', 1, 2, 3]]})
    assert clip_box([-5, -5, 10, 10], 100, 100) == [0, 0, 5, 5]


def test_load_dets_errors(tmp_path):
    with pytest.raises(DataError, match='det_file .*file not found'):
        load_dets(str(tmp_path / 'nope.json'))
    bad = tmp_path / 'bad.json'
    bad.write_text('[1, 2]')
    with pytest.raises(DataError, match='expected an object'):
        load_dets(str(bad))


def test_proposal_statistics():
    refer = FakeRefer({0: (10, 'val', [0, 0, 10, 10], (100, 100)), 1: (11, 'testB', [50, 50, 10, 10], (100, 100))})
    dets = {'10': [[0, 0, 10, 10], [50, 50, 10, 10]], '11': [[0, 0, 10, 10], [20, 20, 5, 5], [70, 70, 5, 5],
                                                             [1, 1, 3, 3]]}
    st = proposal_statistics([0, 0, 1], refer, dets)
    assert st['val'] == {'n': 2, 'mean_proposals': 2.0, 'chance_inv_mean_proposals': 0.5,
                         'chance_random_proposal': 0.5, 'upper_bound': 1.0}
    assert st['testB']['upper_bound'] == 0.0
    assert st['all']['n'] == 3 and st['all']['mean_proposals'] == pytest.approx(8 / 3)


def test_merge_map_shards_drops_sampler_padding():
    n = 7
    shards = []
    for rank in range(3):  # 7 items over 3 ranks: the sampler pads to 9 with repeats
        idx = list(DistributedSampler(range(n), num_replicas=3, rank=rank, shuffle=False))
        shards.append({'index': idx, 'ref_id': [100 + i for i in idx],
                       'pred': np.stack([np.full((2, 2), i, np.float32) for i in idx])})
    assert sum(len(s['index']) for s in shards) == 9
    merged = merge_map_shards(shards, n)
    assert merged['index'] == list(range(n)) and merged['ref_id'] == [100 + i for i in range(n)]
    assert merged['pred'].shape == (n, 2, 2) and np.all(merged['pred'][:, 0, 0] == np.arange(n))
    with pytest.raises(RuntimeError, match='cover 6 distinct items'):
        merge_map_shards([{'index': list(range(6)), 'ref_id': [0] * 6, 'pred': np.zeros((6, 2, 2))}], n)


# ----------------------------------------------------------------------------------------------------------------
# Grounding.py end to end on a very small world (random model: checks plumbing, not learning)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    from tests.toy import generate_world
    import Grounding
    work = tmp_path_factory.mktemp('grounding_small')
    world = generate_world(str(work / 'world'), 5, train_images=12, val_images=4, test_images=4)
    cfg = make_toy_config('Grounding', world, str(work / 'Grounding.yaml'), batch_size=8, queue_size=64,
                          num_workers=0)
    out = str(work / 'out')
    Grounding.main(['--config', cfg, '--output_dir', out, '--device', 'cpu', '--no-distributed',
                    '--max_steps_per_epoch', '2', '--opt', 'schedular={sched: cosine, lr: 1e-4, epochs: 2, '
                    'min_lr: 1e-5, decay_rate: 1, warmup_lr: 1e-4, warmup_epochs: 1, cooldown_epochs: 0}'])
    return world, cfg, out


def test_grounding_script_outputs(small_run):
    world, cfg, out = small_run
    with open(os.path.join(out, 'log.txt')) as f:
        lines = [json.loads(line) for line in f]
    epochs = [r for r in lines if 'epoch' in r]
    assert [r['epoch'] for r in epochs] == [0, 1]
    for r in epochs:
        assert {'train_loss_ita', 'train_loss_itm', 'val_d', 'testA_d', 'testB_d'} <= set(r)
        assert all(0.0 <= r[k] <= 1.0 for k in ('val_d', 'testA_d', 'testB_d'))
    with open(os.path.join(out, 'grounding_results.json')) as f:
        res = json.load(f)
    assert res['gradcam_mode'] == 'itm' and res['block_num'] == 2 and set(res['epochs']) == {'0', '1'}
    assert res['best_epoch'] in (0, 1) and res['best'] == res['epochs'][str(res['best_epoch'])]
    n_test = sum(len(json.load(open(os.path.join(world, f'refcoco+_{s}.json')))) for s in ('val', 'test'))
    assert sum(res['epochs']['0']['n'].values()) == n_test
    chance = res['proposals']['all']['chance_inv_mean_proposals']
    assert 0 < chance < 0.5 and res['proposals']['all']['upper_bound'] == 1.0
    maps = torch.load(os.path.join(out, 'result', 'epoch1.pth'))
    assert maps['pred'].shape == (n_test, 8, 8) and maps['index'].tolist() == list(range(n_test))
    assert os.path.isfile(os.path.join(out, 'checkpoint_best.pth'))


def test_grounding_evaluate_itc_and_itm_agree_with_saved_maps(small_run, tmp_path):
    import Grounding
    world, cfg, out = small_run
    ckpt = os.path.join(out, 'checkpoint_last.pth')
    rec = Grounding.main(['--config', cfg, '--output_dir', str(tmp_path / 'ev'), '--device', 'cpu',
                          '--no-distributed', '--checkpoint', ckpt, '--evaluate'])
    with open(os.path.join(out, 'log.txt')) as f:
        last = [json.loads(line) for line in f if '"epoch"' in line][-1]
    assert rec == {k: last[k] for k in ('val_d', 'testA_d', 'testB_d')}
    saved = torch.load(os.path.join(out, 'result', 'epoch1.pth'))['pred']
    again = torch.load(str(tmp_path / 'ev' / 'result' / 'epoch0.pth'))['pred']
    torch.testing.assert_close(again, saved, rtol=1e-4, atol=1e-9)
    rec = Grounding.main(['--config', cfg, '--output_dir', str(tmp_path / 'itc'), '--device', 'cpu',
                          '--no-distributed', '--checkpoint', ckpt, '--evaluate', '--gradcam_mode', 'itc',
                          '--block_num', '3'])
    assert set(rec) == {'val_d', 'testA_d', 'testB_d'}
    with open(tmp_path / 'itc' / 'grounding_results.json') as f:
        assert json.load(f)['block_num'] == 3


@pytest.mark.parametrize('case', ['block_num', 'block_num_itc', 'missing_det', 'no_checkpoint'])
def test_grounding_bad_input_one_line(small_run, tmp_path, capsys, case):
    import Grounding
    world, cfg, out = small_run
    argv = ['--config', cfg, '--output_dir', str(tmp_path / 'o'), '--device', 'cpu', '--no-distributed',
            '--evaluate', '--checkpoint', os.path.join(out, 'checkpoint_last.pth')]
    if case == 'block_num':
        argv += ['--block_num', '8']
        expect = '--block_num 8 is outside the fusion layers of this model (2..3'
    elif case == 'block_num_itc':
        argv += ['--gradcam_mode', 'itc', '--block_num', '4']
        expect = '--block_num 4 is outside the ViT blocks of this model (0..3'
    elif case == 'no_checkpoint':
        argv = argv[:-1] + ['']
        expect = '--evaluate needs --checkpoint'
    else:
        config = utils.load_config(cfg)
        with open(config['det_file']) as f:
            dets = json.load(f)
        with open(config['test_file'][0]) as f:
            first = json.load(f)[0]
        image_id = next(w['image_id'] for w in json.load(open(os.path.join(world, 'world.json')))
                        if w['file'] == first['image'])
        del dets[str(image_id)]
        (tmp_path / 'dets.json').write_text(json.dumps(dets))
        argv += ['--opt', f'det_file={tmp_path / "dets.json"}']
        expect = f'dets.json: no entry for image_id {image_id} (ref_id {first["ref_id"]}'
    rc = utils.run_cli(Grounding.main, argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert expect in err, err
