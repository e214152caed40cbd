"""models/pretrained.py: HF BERT and timm/DeiT ViT weights into our encoders.

Tiny random transformers / timm models are saved to tmp_path and loaded back through our loaders; outputs must
equal the libraries' own (<= 1e-5). Nothing is downloaded: hub names and URLs must fail fast and clearly.
"""
import os
import types

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import BertConfig as HFBertConfig
from transformers import BertForMaskedLM as HFBertForMaskedLM
from transformers import BertModel as HFBertModel

from models import checkpoint as ckpt
from models import create_model
from models.checkpoint import CheckpointError, resample_pos_embed
from models.pretrained import apply_pretrained, load_bert_weights, load_vision_weights
from models.vit import VisionTransformer

F_LAYER, N_LAYERS, HIDDEN, VOCAB = 2, 4, 32, 60
BERT = dict(architectures=['BertForMaskedLM'], attention_probs_dropout_prob=0.1, hidden_act='gelu',
            hidden_dropout_prob=0.1, hidden_size=HIDDEN, initializer_range=0.02, intermediate_size=64,
            layer_norm_eps=1e-12, max_position_embeddings=40, model_type='bert', num_attention_heads=2,
            num_hidden_layers=N_LAYERS, pad_token_id=0, type_vocab_size=2, vocab_size=VOCAB,
            fusion_layer=F_LAYER, encoder_width=HIDDEN)
TOKENIZER = types.SimpleNamespace(pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4)


def tiny_config(**overrides):
    config = dict(image_res=32, patch_size=16, vision_width=HIDDEN, vision_depth=2, vision_num_heads=2,
                  mlp_ratio=2, bert_config=dict(BERT), embed_dim=16, temp=0.07, queue_size=8, momentum=0.995,
                  alpha=0.4, distill=True, vqa_decoder_layers=N_LAYERS - F_LAYER)
    config.update(overrides)
    return config


def build(variant, **overrides):
    torch.manual_seed(0)
    return create_model(variant, tiny_config(**overrides), TOKENIZER).eval()


def randomize_(module):
    """Spread the values (std-0.02 init makes outputs nearly input-independent) so comparisons mean something."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1. if 'LayerNorm.weight' in name else 0.))
    return module


@pytest.fixture(scope='module')
def hf_bert_dir(tmp_path_factory):
    """A tiny random BertForMaskedLM written by save_pretrained (config.json + model.safetensors)."""
    torch.manual_seed(1)
    cfg = HFBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=40, hidden_act='gelu')
    model = randomize_(HFBertForMaskedLM(cfg)).eval()
    folder = tmp_path_factory.mktemp('hf_bert')
    model.save_pretrained(folder)
    return str(folder), model


def _ids():
    torch.manual_seed(2)
    ids = torch.randint(5, VOCAB, (3, 9))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


def _sub(sd, prefix):
    return {k[len(prefix):]: v.clone() for k, v in sd.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------------------------
# BERT
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['pretrain', 'retrieval'])
def test_bert_weights_give_transformers_outputs(hf_bert_dir, variant):
    folder, hf = hf_bert_dir
    model = build(variant)
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    report = load_bert_weights(model.text_encoder, folder)
    ours = model.text_encoder
    body = ours.bert if variant == 'pretrain' else ours
    ids, mask = _ids()
    # Our text mode = layers [0, fusion_layer) = transformers' hidden state after layer fusion_layer.
    hf_base = HFBertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.no_grad():
        want = hf_base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[F_LAYER]
        got = body(ids, attention_mask=mask, mode='text').last_hidden_state
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)
    # Cross-attention stays as initialised; everything else came from the checkpoint.
    after = ours.state_dict()
    cross = [k for k in after if 'crossattention' in k]
    assert cross and all(torch.equal(after[k], before[k]) for k in cross)
    assert sorted(report['kept']) == sorted(cross + [k for k in after if k.endswith('position_ids')])
    if variant == 'pretrain':  # the MLM head comes along, still tied to the word embeddings
        assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
        with torch.no_grad():
            assert torch.allclose(ours.cls(got), hf.cls(got), atol=1e-5, rtol=0)
    else:
        assert any(k.startswith('cls.') for k in report['ignored'])


def test_bert_weights_into_nlvr_and_vqa_decoder(hf_bert_dir):
    folder, hf = hf_bert_dir
    hf_sd = hf.state_dict()
    nlvr = build('nlvr')  # 2 + 2 * 2 = 6 layers: layers 4, 5 do not exist in the 4-layer checkpoint
    before = {k: v.clone() for k, v in nlvr.text_encoder.state_dict().items()}
    load_bert_weights(nlvr.text_encoder, folder)
    after = nlvr.text_encoder.state_dict()
    for n in range(6):
        layer = _sub(after, f'encoder.layer.{n}.')
        for k, v in layer.items():
            if n >= N_LAYERS or k.startswith('crossattention.'):
                assert torch.equal(v, before[f'encoder.layer.{n}.{k}']), (n, k)  # fresh, as the original
            else:
                assert torch.equal(v, hf_sd[f'bert.encoder.layer.{n}.{k}']), (n, k)
    vqa = build('vqa', vqa_decoder_layers=3)
    report = apply_pretrained(vqa, dict(tiny_config(), text_encoder=folder))
    dec = vqa.text_decoder.state_dict()
    for n in range(3):  # decoder layer n <- BERT layer n (self-attention, FFN); cross-attention fresh
        assert torch.equal(dec[f'bert.encoder.layer.{n}.attention.self.query.weight'],
                           hf_sd[f'bert.encoder.layer.{n}.attention.self.query.weight'])
    assert torch.equal(dec['cls.predictions.transform.dense.bias'], hf_sd['cls.predictions.transform.dense.bias'])
    assert 'bert.encoder.layer.3.attention.self.query.weight' in report['text_decoder']['ignored']


def test_bert_checkpoint_without_mlm_head_keeps_ours(tmp_path):
    cfg = HFBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=40)
    HFBertModel(cfg).save_pretrained(tmp_path)  # a base model: no cls.*, with a pooler
    model = build('pretrain')
    head = _sub(model.text_encoder.state_dict(), 'cls.')
    report = load_bert_weights(model.text_encoder, str(tmp_path))
    after = model.text_encoder.state_dict()
    # (The head's decoder weight is the word-embedding matrix, which did come from the checkpoint.)
    assert all(torch.equal(v, after['cls.' + k]) for k, v in head.items() if k != 'predictions.decoder.weight')
    assert any(k.startswith('cls.') for k in report['kept'])


def test_bert_errors(tmp_path, hf_bert_dir, monkeypatch):
    model = build('retrieval')
    with pytest.raises(CheckpointError, match='no such folder'):
        load_bert_weights(model.text_encoder, str(tmp_path / 'missing_folder'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(CheckpointError, match='no config.json'):
        load_bert_weights(model.text_encoder, str(tmp_path / 'empty'))
    # A hub name with no cache and no network: one line naming it, quickly (never the 40 s retry loop).
    monkeypatch.setattr(ckpt, 'url_reachable', lambda *a, **k: False)
    with pytest.raises(CheckpointError, match="'albef-test/not-cached-bert'.*unreachable"):
        load_bert_weights(model.text_encoder, 'albef-test/not-cached-bert')
    big = build('retrieval', bert_config=dict(BERT, hidden_size=48, encoder_width=HIDDEN))
    with pytest.raises(CheckpointError, match=r'shape \(60, 32\) in the checkpoint but \(60, 48\)'):
        load_bert_weights(big.text_encoder, hf_bert_dir[0])


# ----------------------------------------------------------------------------------------------------------------
# ViT
# ----------------------------------------------------------------------------------------------------------------
def _timm_vit(img_size):
    torch.manual_seed(3)
    m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=img_size, embed_dim=HIDDEN, depth=2,
                          num_heads=2, mlp_ratio=2, num_classes=7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


@pytest.mark.parametrize('fmt', ['pth', 'safetensors', 'wrapped'])
def test_timm_vit_file_gives_timm_outputs(tmp_path, fmt):
    ref = _timm_vit(32)
    sd = ref.state_dict()
    path = tmp_path / f'vit.{"safetensors" if fmt == "safetensors" else "pth"}'
    if fmt == 'safetensors':
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({'model': sd} if fmt == 'wrapped' else sd, path)
    vit = build('retrieval').visual_encoder
    report = load_vision_weights(vit, str(path))
    assert report['dropped'] == ['head.bias', 'head.weight'] and report['resampled'] is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(x), ref.forward_features(x), atol=1e-5, rtol=0)


def test_vit_pos_embed_resampled_to_model_grid(tmp_path):
    ref = _timm_vit(32)  # 2x2 grid -> our 48 px model: 3x3
    torch.save(ref.state_dict(), tmp_path / 'vit.pth')
    model = build('pretrain', image_res=48)
    report = apply_pretrained(model, dict(tiny_config(image_res=48), load_text_weights=False,
                                          vision_pretrained=str(tmp_path / 'vit.pth')))
    assert set(report) == {'visual_encoder'} and report['visual_encoder']['resampled'] == (5, 10)
    vit = model.visual_encoder
    assert torch.equal(vit.pos_embed.detach(), resample_pos_embed(ref.pos_embed.detach(), 10))
    assert torch.equal(vit.pos_embed.detach()[:, 0], ref.pos_embed.detach()[:, 0])
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, ref.blocks[1].mlp.fc2.weight)
    # The momentum ViT is the caller's business (copy_params), as the contract says.
    model.copy_params()
    assert torch.equal(model.visual_encoder_m.pos_embed, vit.pos_embed)


def test_vit_from_albef_checkpoint_and_mismatch(tmp_path):
    src = build('retrieval')
    torch.save({'model': src.state_dict()}, tmp_path / 'albef.pth')
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=HIDDEN, depth=2, num_heads=2, mlp_ratio=2)
    load_vision_weights(vit, str(tmp_path / 'albef.pth'))
    assert torch.equal(vit.cls_token, src.visual_encoder.cls_token)
    deeper = VisionTransformer(img_size=32, patch_size=16, embed_dim=HIDDEN, depth=3, num_heads=2, mlp_ratio=2)
    with pytest.raises(CheckpointError, match=r'does not fit the ViT.*missing \[blocks.2'):
        load_vision_weights(deeper, str(tmp_path / 'albef.pth'))
    wider = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, mlp_ratio=2)
    with pytest.raises(CheckpointError, match=r'shape mismatch \[.*checkpoint \(.*32.*\) vs model'):
        load_vision_weights(wider, str(tmp_path / 'albef.pth'))


def test_vision_sources_fail_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))  # nothing cached
    monkeypatch.setattr(ckpt, 'url_reachable', lambda *a, **k: False)
    vit = build('retrieval').visual_encoder
    with pytest.raises(CheckpointError, match=r'deit_base_patch16_224-b5f2ef4d.pth: host unreachable'):
        load_vision_weights(vit, 'deit_base')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)  # ignore a real cache
    with pytest.raises(CheckpointError, match=r"'vit_tiny_patch16_224'.*not in the local cache"):
        load_vision_weights(vit, 'vit_tiny_patch16_224')
    with pytest.raises(CheckpointError, match="'no_such_model_xyz'.*not a timm model name"):
        load_vision_weights(vit, 'no_such_model_xyz')
    with pytest.raises(CheckpointError, match='vision_pretrained: checkpoint file not found'):
        load_vision_weights(vit, str(tmp_path / 'deit.pth'))


def test_apply_pretrained_toy_settings_loads_nothing():
    model = build('retrieval')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_pretrained(model, dict(tiny_config(), text_encoder='/nonexistent/vocab', load_text_weights=False,
                                        vision_pretrained=None)) == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match='/nonexistent/vocab'):
        apply_pretrained(model, dict(tiny_config(), text_encoder='/nonexistent/vocab'))
    assert os.environ.get('HF_HUB_OFFLINE') == '1'  # conftest: tests never download


def test_freeze_vision_keeps_pretrained_vit_through_training_steps(tmp_path):
    import engine
    import utils
    ref = randomize_(build('pretrain').visual_encoder)
    torch.save(ref.state_dict(), tmp_path / 'vit.pth')
    config = dict(tiny_config(), load_text_weights=False, vision_pretrained=str(tmp_path / 'vit.pth'),
                  freeze_vision=True, optimizer={'opt': 'adamW', 'lr': 1e-2, 'weight_decay': 0.02},
                  schedular={'sched': 'cosine', 'lr': 1e-2, 'epochs': 1, 'min_lr': 1e-3, 'decay_rate': 1,
                             'warmup_lr': 1e-2, 'warmup_epochs': 0, 'cooldown_epochs': 0})
    utils.validate_config(config)
    class Tokenizer(types.SimpleNamespace):
        def __len__(self):  # MLM draws random replacement tokens from the vocabulary
            return VOCAB
    args = types.SimpleNamespace(checkpoint=None, distributed=False)
    model, bare = engine.build_model('pretrain', config, Tokenizer(**vars(TOKENIZER)), args, torch.device('cpu'))
    optimizer, _, _ = engine.build_optimizer_and_scheduler(config, bare)
    optimized = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert not any(id(p) in optimized or p.requires_grad for p in bare.visual_encoder.parameters())
    text_before = bare.text_encoder.bert.embeddings.word_embeddings.weight.detach().clone()
    ids, mask = _ids()
    model.train()
    for _ in range(2):
        losses = model(torch.randn(3, 3, 32, 32), ids, mask, alpha=0.4)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        bare._momentum_update()
    for name, p in ref.state_dict().items():
        assert torch.equal(bare.visual_encoder.state_dict()[name], p), name
        # m * x + (1 - m) * x is x up to rounding
        torch.testing.assert_close(bare.visual_encoder_m.state_dict()[name], p, atol=1e-6, rtol=0)
    assert not torch.equal(bare.text_encoder.bert.embeddings.word_embeddings.weight, text_before)
    with pytest.raises(utils.ConfigError, match='freeze_vision'):
        utils.validate_config(dict(config, freeze_vision='yes'))
