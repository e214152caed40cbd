"""models/checkpoint.py: one loader for every ALBEF checkpoint layout.

Synthetic checkpoints are built from tiny models of the source variant and rewritten into the layouts of the
released files (ALBEF.pth = {'model': pretrain sd}; mscoco/flickr30k/refcoco.pth = flat online-only retrieval
sd; pretrain_model_nlvr.pth = {'model': TA sd}; vqa.pth = {'model': vqa sd}); every parameter is randomised
(momentum copies independently) so that each value's destination can be checked.
"""
import argparse
import functools
import http.server
import json
import math
import os
import threading
import types
import warnings

import pytest
import torch

from models import create_model
from models.checkpoint import (CheckpointError, check_state_dict, detect_kind, load_checkpoint, read_checkpoint,
                               remap_state_dict, resample_pos_embed, unwrap_state_dict)

F_LAYER, N_LAYERS = 2, 4  # fusion layer and depth of the tiny BERT
BERT = dict(architectures=['BertForMaskedLM'], attention_probs_dropout_prob=0.1, hidden_act='gelu',
            hidden_dropout_prob=0.1, hidden_size=32, initializer_range=0.02, intermediate_size=64,
            layer_norm_eps=1e-12, max_position_embeddings=40, model_type='bert', num_attention_heads=2,
            num_hidden_layers=N_LAYERS, pad_token_id=0, type_vocab_size=2, vocab_size=60, fusion_layer=F_LAYER,
            encoder_width=32)
# model_pretrain only reads the special ids in forward; construction needs a tokenizer object.
TOKENIZER = types.SimpleNamespace(pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4)
MOMENTUM_PREFIXES = ('visual_encoder_m.', 'text_encoder_m.', 'vision_proj_m.', 'text_proj_m.', 'text_decoder_m.',
                     'cls_head_m.')
QUEUES = ('image_queue', 'text_queue', 'idx_queue', 'queue_ptr')


def tiny_config(**overrides):
    config = dict(image_res=32, patch_size=16, vision_width=32, vision_depth=2, vision_num_heads=2, mlp_ratio=2,
                  bert_config=dict(BERT), embed_dim=16, temp=0.07, queue_size=8, momentum=0.995, alpha=0.4,
                  distill=True, vqa_decoder_layers=N_LAYERS - F_LAYER, load_text_weights=False)
    config.update(overrides)
    return config


def build(variant, seed=0, randomize=True, **overrides):
    """A tiny model; with randomize every parameter (momentum copies separately) gets distinct N(0,1) values."""
    torch.manual_seed(seed)
    model = create_model(variant, tiny_config(**overrides), TOKENIZER)
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    return model.eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def assert_same(got, want, what=''):
    assert set(got) == set(want), f'{what}: key sets differ: {sorted(set(got) ^ set(want))[:6]}'
    for k in want:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), f'{what}: {k} differs'


def is_momentum(k):
    return k.startswith(MOMENTUM_PREFIXES)


def flat_online(sd):
    """The released fine-tuned layout: online modules only, no momentum, no queues, no 'model' wrapper."""
    return {k: v for k, v in sd.items() if not is_momentum(k) and k not in QUEUES}


def bicubic_resize(pos, vit):
    """The original's resize of a [1, 1 + g^2, C] position embedding to the grid of `vit` (a ViT or a token
    count), written out: CLS row kept, the grid resized bicubic (align_corners False, no antialias) in float32."""
    num_tokens = vit if isinstance(vit, int) else vit.pos_embed.shape[1]
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(num_tokens - 1)
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode='bicubic', align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------------------
def test_resample_pos_embed_is_the_bicubic_resize_and_keeps_cls():
    vit = build('retrieval', image_res=48).visual_encoder  # 3x3 grid
    pos = torch.randn(1, 1 + 4, 32)  # 2x2 grid
    out = resample_pos_embed(pos, vit.pos_embed.shape[1])
    assert out.shape == (1, 10, 32)
    assert torch.equal(out[:, :1], pos[:, :1])
    assert torch.equal(out, bicubic_resize(pos, vit))
    assert resample_pos_embed(pos, 5) is pos
    # bf16 input stays bf16 (the reference fixtures store bf16) and is computed in float32.
    assert resample_pos_embed(pos.bfloat16(), 10).dtype == torch.bfloat16
    assert torch.equal(resample_pos_embed(pos.bfloat16(), 10), bicubic_resize(pos.bfloat16(), vit))
    # the released checkpoints' case: ViT-B/16 from 256 px (16x16 grid) to 384 px (24x24), and back
    big = torch.randn(1, 257, 768)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(resample_pos_embed(big.to(dtype), 577), bicubic_resize(big.to(dtype), 577))
    small = resample_pos_embed(big, 577)
    assert torch.equal(resample_pos_embed(small, 257), bicubic_resize(small, 257))


def test_detect_kind_on_released_layouts():
    assert detect_kind(snapshot(build('pretrain', randomize=False))) == 'pretrain'
    retrieval = snapshot(build('retrieval', randomize=False))
    assert detect_kind(retrieval) == 'retrieval'
    assert detect_kind(flat_online(retrieval)) == 'retrieval'
    assert detect_kind(snapshot(build('vqa', randomize=False))) == 'vqa'
    assert detect_kind(snapshot(build('nlvr', randomize=False))) == 'nlvr'
    assert detect_kind(snapshot(build('ve', randomize=False))) == 've'
    assert detect_kind(snapshot(build('pretrain_nlvr', randomize=False))) == 'pretrain_nlvr'
    with pytest.raises(CheckpointError, match='cannot tell which ALBEF variant'):
        detect_kind({'foo.weight': torch.zeros(1)})


def test_unwrap_state_dict():
    sd = {'a': torch.zeros(1)}
    assert unwrap_state_dict({'model': sd, 'epoch': 3}) == (sd, True)
    assert unwrap_state_dict(sd) == (sd, False)
    assert unwrap_state_dict({'module.a': sd['a']})[0].keys() == {'a'}
    with pytest.raises(CheckpointError, match='not tensors'):
        unwrap_state_dict({'epoch': 3, 'a': sd['a']})


def _meta(keys):
    return {name: torch.empty(shape, device='meta') for name, shape, _ in keys}


@pytest.fixture(scope='module')
def full_size(ref_dir):
    """Key sets and shapes of the six variants built at full size by the original classes (R = 256)."""
    with open(os.path.join(ref_dir, 'full_size_state_dict_shapes.json')) as f:
        data = json.load(f)
    return {name[len('model_'):]: _meta(entry['keys']) for name, entry in data.items() if name.startswith('model_')}


def _check(full_size, source_sd, kind, variant):
    target = full_size[variant]
    sd, notes, allowed = remap_state_dict(source_sd, kind, variant, target)
    return check_state_dict(sd, target, kind, variant, allowed_missing=allowed), sd


def test_full_size_pairs_have_exactly_the_expected_differences(full_size):
    """The original's full-size key sets: each released pairing differs exactly as the original's scripts expect."""
    pre = full_size['pretrain']
    mlm_heads = sorted(k for k in pre if k.startswith(('text_encoder.cls.', 'text_encoder_m.cls.')))
    extras = sorted(k for k in pre if k in ('temp', 'image_queue', 'text_queue', 'queue_ptr')
                    or k.startswith(('vision_proj', 'text_proj', 'itm_head')))

    res, _ = _check(full_size, pre, 'pretrain', 'retrieval')  # issue #79: idx_queue missing, MLM heads unused
    assert res['missing'] == ['idx_queue'] and res['unexpected'] == mlm_heads and not res['momentum_fill']

    res, sd = _check(full_size, pre, 'pretrain', 'vqa')  # every decoder tensor filled by the remap
    assert res['missing'] == [] and res['unexpected'] == extras
    assert 'text_decoder.bert.encoder.layer.5.crossattention.self.key.weight' in sd

    res, _ = _check(full_size, pre, 'pretrain', 've')
    assert res['missing'] == sorted(k for k in full_size['ve'] if k.startswith(('cls_head.', 'cls_head_m.')))
    assert res['unexpected'] == sorted(mlm_heads + extras) and res['momentum_fill'] == ['cls_head_m']

    res, sd = _check(full_size, pre, 'pretrain', 'pretrain_nlvr')
    assert res['missing'] == ['ta_head.bias', 'ta_head.weight']
    # Unused (names after the remap): MLM heads, ITM head, queues and every momentum module (TA has none).
    assert res['unexpected'] == sorted(k for k in sd if k.startswith(('text_encoder.cls.', 'itm_head.'))
                                       or k in ('image_queue', 'text_queue', 'queue_ptr') or is_momentum(k))
    assert 'text_encoder.encoder.layer.17.crossattention.self.query.weight' in sd

    res, _ = _check(full_size, full_size['pretrain_nlvr'], 'pretrain_nlvr', 'nlvr')
    nlvr = full_size['nlvr']
    assert res['missing'] == sorted(k for k in nlvr if k.startswith('cls_head.') or is_momentum(k))
    assert res['unexpected'] == ['ta_head.bias', 'ta_head.weight', 'temp', 'text_proj.bias', 'text_proj.weight',
                                 'vision_proj.bias', 'vision_proj.weight']
    assert res['momentum_fill'] == ['cls_head_m', 'text_encoder_m', 'visual_encoder_m']

    ret = full_size['retrieval']
    res, _ = _check(full_size, flat_online(ret), 'retrieval', 'retrieval')  # mscoco.pth / refcoco.pth
    assert res['missing'] == sorted(k for k in ret if is_momentum(k) or k in QUEUES) and res['unexpected'] == []

    for variant, sd in full_size.items():  # resume / evaluate: strict
        res, _ = _check(full_size, sd, variant, variant)
        assert res['missing'] == [] and res['unexpected'] == [], variant


# ----------------------------------------------------------------------------------------------------------------
# ALBEF.pth (pretraining) into every variant
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def albef_pth():
    return snapshot(build('pretrain', seed=10))


@pytest.mark.parametrize('variant', ['retrieval', 'grounding'])
def test_pretrain_to_retrieval(albef_pth, variant):
    src = albef_pth
    model = build('retrieval', seed=1, image_res=48)  # 32 -> 48 px: like 256 -> 384
    idx_queue = model.idx_queue.clone()
    report = load_checkpoint(model, {'model': src}, variant)
    assert report['source_kind'] == 'pretrain' and report['variant'] == 'retrieval' and report['wrapped']
    assert report['missing'] == ['idx_queue']
    assert report['unexpected'] == sorted(k for k in src if k.startswith(('text_encoder.cls.', 'text_encoder_m.cls.')))
    got = snapshot(model)
    for sfx in ('', '_m'):
        assert_same(sub(got, f'text_encoder{sfx}.'), sub(src, f'text_encoder{sfx}.bert.'), f'text_encoder{sfx}')
        vis = sub(src, f'visual_encoder{sfx}.')
        vis['pos_embed'] = bicubic_resize(vis['pos_embed'], model.visual_encoder)
        assert_same(sub(got, f'visual_encoder{sfx}.'), vis, f'visual_encoder{sfx}')
    for k in src:
        if k in ('temp', 'image_queue', 'text_queue', 'queue_ptr') or k.startswith(
                ('vision_proj', 'text_proj', 'itm_head')):
            assert torch.equal(got[k], src[k]), k
    assert torch.equal(model.idx_queue, idx_queue)


def test_pretrain_to_vqa_decoder_from_fusion_layers(albef_pth):
    src = albef_pth
    model = build('vqa', seed=1)
    report = load_checkpoint(model, {'model': src}, 'vqa')
    assert report['missing'] == []
    assert set(report['unexpected']) == {k for k in src if k in ('temp', 'image_queue', 'text_queue', 'queue_ptr')
                                         or k.startswith(('vision_proj', 'text_proj', 'itm_head'))}
    got = snapshot(model)
    for sfx in ('', '_m'):
        enc = f'text_encoder{sfx}.bert.'
        assert_same(sub(got, f'text_encoder{sfx}.'), sub(src, enc), 'encoder keeps all layers')
        dec = f'text_decoder{sfx}.'
        assert_same(sub(got, dec + 'bert.embeddings.'), sub(src, enc + 'embeddings.'), 'decoder embeddings')
        for j in range(N_LAYERS - F_LAYER):  # decoder layer j <- encoder layer f + j
            assert_same(sub(got, f'{dec}bert.encoder.layer.{j}.'), sub(src, f'{enc}encoder.layer.{F_LAYER + j}.'),
                        f'decoder{sfx} layer {j}')
        assert_same(sub(got, dec + 'cls.'), sub(src, f'text_encoder{sfx}.cls.'), 'decoder head <- MLM head')
    # Tied inside the decoder: the head's decoder weight is the decoder's word-embedding matrix.
    decoder = model.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def test_pretrain_to_vqa_with_more_decoder_layers_than_fusion_layers(albef_pth):
    model = build('vqa', seed=1, vqa_decoder_layers=N_LAYERS - F_LAYER + 1)
    extra = f'text_decoder.bert.encoder.layer.{N_LAYERS - F_LAYER}.'
    before = sub(snapshot(model), extra)
    with pytest.warns(UserWarning, match='fusion layers'):
        report = load_checkpoint(model, {'model': albef_pth}, 'vqa')
    assert report['missing'] and all(k.startswith((extra, extra.replace('decoder', 'decoder_m')))
                                     for k in report['missing'])
    assert_same(sub(snapshot(model), extra), before, 'extra decoder layer keeps its weights')


def test_pretrain_to_ve_loads_momentum_from_checkpoint(albef_pth):
    src = albef_pth
    model = build('ve', seed=1)
    report = load_checkpoint(model, {'model': src}, 've')
    assert report['missing'] == sorted(k for k in model.state_dict() if k.startswith(('cls_head.', 'cls_head_m.')))
    assert report['momentum_copied'] == ['cls_head_m']
    got = snapshot(model)
    assert_same(sub(got, 'cls_head_m.'), sub(got, 'cls_head.'), 'fresh head and its momentum copy start equal')
    # The checkpoint's momentum encoders (different from its online ones) are the ones loaded.
    assert_same(sub(got, 'text_encoder_m.'), sub(src, 'text_encoder_m.bert.'), 'text_encoder_m')
    assert_same(sub(got, 'visual_encoder_m.'), sub(src, 'visual_encoder_m.'), 'visual_encoder_m')
    assert not torch.equal(got['text_encoder_m.embeddings.word_embeddings.weight'],
                           got['text_encoder.embeddings.word_embeddings.weight'])


def test_pretrain_to_pretrain_nlvr_duplicates_fusion_layers(albef_pth):
    src = albef_pth
    model = build('pretrain_nlvr', seed=1)
    ta_head = sub(snapshot(model), 'ta_head.')
    report = load_checkpoint(model, {'model': src}, 'pretrain_nlvr')
    assert report['missing'] == ['ta_head.bias', 'ta_head.weight']
    got = snapshot(model)
    for n in range(F_LAYER):
        assert_same(sub(got, f'text_encoder.encoder.layer.{n}.'), sub(src, f'text_encoder.bert.encoder.layer.{n}.'))
    for i in range(N_LAYERS - F_LAYER):  # layers f+2i and f+2i+1 <- source layer f+i
        want = sub(src, f'text_encoder.bert.encoder.layer.{F_LAYER + i}.')
        for n in (F_LAYER + 2 * i, F_LAYER + 2 * i + 1):
            assert_same(sub(got, f'text_encoder.encoder.layer.{n}.'), want, f'layer {n}')
    layers = model.text_encoder.encoder.layer
    assert layers[F_LAYER].crossattention.self.key.weight is layers[F_LAYER + 1].crossattention.self.key.weight
    for k in ('temp', 'vision_proj.weight', 'text_proj.bias'):
        assert torch.equal(got[k], src[k])
    assert_same(sub(got, 'ta_head.'), ta_head, 'ta_head stays fresh')


def test_pretrain_to_nlvr_directly(albef_pth):
    model = build('nlvr', seed=1)
    report = load_checkpoint(model, {'model': albef_pth}, 'nlvr')
    assert report['missing'] == sorted(k for k in model.state_dict() if k.startswith(('cls_head.', 'cls_head_m.')))
    got = snapshot(model)
    assert_same(sub(got, f'text_encoder_m.encoder.layer.{F_LAYER + 1}.'),
                sub(albef_pth, f'text_encoder_m.bert.encoder.layer.{F_LAYER}.'))


@pytest.mark.parametrize('variant', ['vqa', 've', 'nlvr'])
def test_pretrain_into_model_without_distillation(albef_pth, variant):
    model = build(variant, seed=1, distill=False)
    report = load_checkpoint(model, {'model': albef_pth}, variant)
    assert report['momentum_copied'] == []
    assert any(k.startswith('visual_encoder_m.') for k in report['unexpected'])
    assert torch.equal(model.visual_encoder.cls_token, albef_pth['visual_encoder.cls_token'])


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuned layouts
# ----------------------------------------------------------------------------------------------------------------
def test_ta_checkpoint_to_nlvr_copies_momentum_from_loaded_weights():
    src = snapshot(build('pretrain_nlvr', seed=20))
    model = build('nlvr', seed=1, image_res=48)
    report = load_checkpoint(model, {'model': src}, 'nlvr')
    assert report['source_kind'] == 'pretrain_nlvr'
    assert report['unexpected'] == ['ta_head.bias', 'ta_head.weight', 'temp', 'text_proj.bias', 'text_proj.weight',
                                    'vision_proj.bias', 'vision_proj.weight']
    assert report['missing'] == sorted(k for k in model.state_dict() if k.startswith('cls_head.') or is_momentum(k))
    assert report['momentum_copied'] == ['cls_head_m', 'text_encoder_m', 'visual_encoder_m']
    got = snapshot(model)
    assert_same(sub(got, 'text_encoder.'), sub(src, 'text_encoder.'))
    for prefix in ('text_encoder', 'visual_encoder', 'cls_head'):  # not random, unlike the original's NLVR.py
        assert_same(sub(got, prefix + '_m.'), sub(got, prefix + '.'), prefix + '_m')
    # Shared key/value stay shared in the momentum encoder too.
    layers_m = model.text_encoder_m.encoder.layer
    assert layers_m[F_LAYER].crossattention.self.value.bias is layers_m[F_LAYER + 1].crossattention.self.value.bias


@pytest.mark.parametrize('variant', ['retrieval', 'grounding'])
def test_flat_online_retrieval_checkpoint(variant):
    """mscoco.pth / flickr30k.pth / refcoco.pth: flat, online only, no queues, trained at another resolution."""
    src = flat_online(snapshot(build('retrieval', seed=30)))
    model = build('retrieval', seed=1, image_res=48)
    queues = {k: getattr(model, k).clone() for k in QUEUES}
    report = load_checkpoint(model, src, variant)
    assert report['source_kind'] == 'retrieval' and not report['wrapped'] and not report['source_has_momentum']
    assert report['missing'] == sorted(k for k in model.state_dict() if is_momentum(k) or k in QUEUES)
    assert report['unexpected'] == []
    got = snapshot(model)
    want = dict(src)
    want['visual_encoder.pos_embed'] = bicubic_resize(src['visual_encoder.pos_embed'], model.visual_encoder)
    assert_same({k: v for k, v in got.items() if k in want}, want)
    for prefix in ('visual_encoder', 'text_encoder', 'vision_proj', 'text_proj'):
        assert_same(sub(got, prefix + '_m.'), sub(got, prefix + '.'), prefix + '_m')
    for k, v in queues.items():
        assert torch.equal(getattr(model, k), v)


def test_vqa_checkpoint_evaluate_is_strict(tmp_path):
    src_model = build('vqa', seed=40)
    path = tmp_path / 'vqa.pth'
    torch.save({'model': src_model.state_dict(), 'config': {'image_res': 32}, 'epoch': 7}, path)
    model = build('vqa', seed=1)
    report = load_checkpoint(model, str(path), 'vqa')
    assert report['strict'] and report['source_kind'] == 'vqa' and report['source'] == str(path)
    assert_same(snapshot(model), snapshot(src_model))


@pytest.mark.parametrize('variant', ['pretrain', 'retrieval', 'vqa', 'nlvr', 've', 'pretrain_nlvr'])
def test_own_checkpoint_loads_strictly(tmp_path, variant):
    src_model = build(variant, seed=50)
    path = tmp_path / 'checkpoint_00.pth'
    torch.save({'model': src_model.state_dict(), 'optimizer': {'state': {}, 'param_groups': []},
                'lr_scheduler': {'last_epoch': 0}, 'config': {'lr': 1e-4}, 'epoch': 0}, path)
    model = build(variant, seed=1)
    report = load_checkpoint(model, path, variant)
    assert report['strict'] and report['missing'] == [] and report['unexpected'] == []
    assert report['momentum_copied'] == []
    assert_same(snapshot(model), snapshot(src_model))


def test_queue_of_other_size_is_dropped_with_warning():
    src = snapshot(build('retrieval', seed=60))
    model = build('retrieval', seed=1, queue_size=16)
    before = {k: getattr(model, k).clone() for k in QUEUES}
    with pytest.warns(UserWarning, match='dropped'):
        report = load_checkpoint(model, {'model': src}, 'retrieval')
    assert report['missing'] == sorted(QUEUES)
    for k, v in before.items():
        assert torch.equal(getattr(model, k), v)
    assert torch.equal(model.temp.detach(), src['temp'])


def test_shared_key_value_pairs_load_consistently():
    src = snapshot(build('nlvr', seed=70))
    key = f'text_encoder.encoder.layer.{F_LAYER}.crossattention.self.key.weight'
    twin = f'text_encoder.encoder.layer.{F_LAYER + 1}.crossattention.self.key.weight'
    assert torch.equal(src[key], src[twin])
    # Given under one name only: the other name is filled, the load still succeeds.
    model = build('nlvr', seed=1)
    load_checkpoint(model, {'model': {k: v for k, v in src.items() if k != key}}, 'nlvr')
    assert torch.equal(model.state_dict()[key], src[twin])
    # Different values for one shared tensor: refused instead of "the later key wins".
    bad = dict(src)
    bad[key] = src[key] + 1
    with pytest.raises(CheckpointError, match='shared tensor'):
        load_checkpoint(build('nlvr', seed=1), {'model': bad}, 'nlvr')


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('source,variant', [('ve', 'retrieval'), ('nlvr', 've'), ('retrieval', 'vqa'),
                                            ('vqa', 'pretrain'), ('retrieval', 'nlvr'), ('pretrain_nlvr', 've')])
def test_checkpoint_of_another_variant_is_refused(source, variant):
    src = snapshot(build(source, seed=80, randomize=False))
    with pytest.raises(CheckpointError, match=f"'{source}' checkpoint cannot initialise a '{variant}' model"):
        load_checkpoint(build(variant, randomize=False), {'model': src}, variant)


def test_forced_source_kind_lists_offending_keys():
    src = snapshot(build('ve', randomize=False))
    with pytest.raises(CheckpointError, match=r"does not fit the 'retrieval' model: missing \[.*itm_head.*"
                                              r"unexpected \[cls_head"):
        load_checkpoint(build('retrieval', randomize=False), src, 'retrieval', source_kind='retrieval')


def test_checkpoint_of_another_size_lists_shapes():
    src = snapshot(build('pretrain', randomize=False, vision_width=48,
                         bert_config=dict(BERT, encoder_width=48)))
    with pytest.raises(CheckpointError, match=r'shape mismatch \[.*checkpoint \(.*48.*\) vs model \(.*32'):
        load_checkpoint(build('retrieval', randomize=False), {'model': src}, 'retrieval')
    deeper = snapshot(build('retrieval', randomize=False, bert_config=dict(BERT, num_hidden_layers=N_LAYERS + 1)))
    with pytest.raises(CheckpointError, match=rf'unexpected \[text_encoder.encoder.layer.{N_LAYERS}\.'):
        load_checkpoint(build('retrieval', randomize=False), deeper, 'retrieval')


def test_variant_must_match_model():
    with pytest.raises(CheckpointError, match="'retrieval' model"):
        load_checkpoint(build('retrieval', randomize=False), {}, 'vqa')
    with pytest.raises(CheckpointError, match='unknown model variant'):
        load_checkpoint(build('retrieval', randomize=False), {}, 'captioning')


def test_missing_truncated_and_garbage_files(tmp_path):
    model = build('retrieval', randomize=False)
    with pytest.raises(CheckpointError, match='not found: .*nope.pth'):
        load_checkpoint(model, str(tmp_path / 'nope.pth'), 'retrieval')
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': model.state_dict()}, path)
    data = path.read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r'truncated\.pth: the file is truncated or corrupt'):
        load_checkpoint(model, str(truncated), 'retrieval')
    legacy = tmp_path / 'legacy.pth'
    torch.save({'model': model.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint(model, str(legacy), 'retrieval')
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty.pth: the file is truncated or corrupt'):
        read_checkpoint(str(empty))


def test_pickled_code_needs_opt_in(tmp_path):
    src = build('retrieval', seed=90)
    path = tmp_path / 'old_style.pth'
    # Old checkpoints carry argparse/ruamel objects; torch.load(weights_only=True) refuses them.
    torch.save({'model': src.state_dict(), 'args': argparse.Namespace(lr=1e-4)}, path)
    model = build('retrieval', seed=1)
    with pytest.raises(CheckpointError, match=r'pickled Python objects \(argparse.Namespace\).*'
                                              r'allow_pickle=True.*--unsafe_load'):
        load_checkpoint(model, path, 'retrieval')
    report = load_checkpoint(model, path, 'retrieval', allow_pickle=True)
    assert report['strict']
    assert_same(snapshot(model), snapshot(src))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_url_source_and_unreachable_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    serve = tmp_path / 'www'
    serve.mkdir()
    src = build('retrieval', seed=100)
    torch.save({'model': src.state_dict()}, serve / 'mscoco_full.pth')
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                             functools.partial(_QuietHandler, directory=str(serve)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        model = build('retrieval', seed=1)
        url = f'http://127.0.0.1:{server.server_address[1]}/mscoco_full.pth'
        report = load_checkpoint(model, url, 'retrieval')
        assert report['strict'] and report['source'] == url
        assert_same(snapshot(model), snapshot(src))
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(CheckpointError, match='unreachable'):
        read_checkpoint('http://127.0.0.1:1/ALBEF.pth')


# ----------------------------------------------------------------------------------------------------------------
# The original's tiny reference state dicts (shared/fixtures): real key sets and values of the unmodified code
# ----------------------------------------------------------------------------------------------------------------
def _reference_config(ref_dir):
    with open(os.path.join(ref_dir, 'tiny_config.json')) as f:
        c = json.load(f)
    vit = c['vit']
    return dict(image_res=c['image_res'], patch_size=vit['patch_size'], vision_width=vit['embed_dim'],
                vision_depth=vit['depth'], vision_num_heads=vit['num_heads'], mlp_ratio=vit['mlp_ratio'],
                bert_config=c['bert'], embed_dim=c['embed_dim'], temp=c['temp'], queue_size=c['queue_size'],
                momentum=c['momentum'], alpha=c['alpha'], distill=c['distill'],
                vqa_decoder_layers=c['vqa_text_decoder_num_hidden_layers'], load_text_weights=False)


@pytest.fixture(scope='module')
def reference(ref_dir):
    config = _reference_config(ref_dir)
    sds = {}
    for variant in ('pretrain', 'retrieval', 'vqa', 'nlvr', 've', 'pretrain_nlvr'):
        data = torch.load(os.path.join(ref_dir, f'model_{variant}.pt'), map_location='cpu', weights_only=True)
        sds[variant] = data['state_dict']
    return config, sds


@pytest.mark.parametrize('variant', ['pretrain', 'retrieval', 'vqa', 'nlvr', 've', 'pretrain_nlvr'])
def test_reference_state_dicts(reference, variant):
    """The original's own checkpoint of each variant loads strictly; its pretraining one initialises it."""
    config, sds = reference
    torch.manual_seed(0)
    model = create_model(variant, config, TOKENIZER)
    report = load_checkpoint(model, {'model': sds[variant]}, variant)
    assert report['strict']
    got = model.state_dict()
    for k, v in sds[variant].items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k
    if variant != 'pretrain':
        torch.manual_seed(0)
        model = create_model(variant, config, TOKENIZER)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # VQA: the 6-layer decoder is deeper than the 2 fusion layers
            report = load_checkpoint(model, {'model': sds['pretrain']}, variant)
        assert report['source_kind'] == 'pretrain'
        got = model.state_dict()
        want = sds['pretrain']['text_encoder.bert.encoder.layer.0.attention.self.query.weight']
        assert torch.equal(got['text_encoder.encoder.layer.0.attention.self.query.weight'], want.float())
