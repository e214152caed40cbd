"""Numerical parity of the six ALBEF variants with the reference vectors of the original code.

Fixture folder: env ALBEF_REF_DIR, default <repo>/../shared/fixtures/albef_ref_public. Every size comes from the
fixture's tiny_config.json / config_bert_tiny.json, so other fixture sets run unchanged. Models are loaded with a
strict, normal load_state_dict in eval mode, float32. `seeded_forward` outputs depend on torch's RNG stream and
are informational only (not compared).
"""
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from models import create_model
from models.tokenization_bert import BertTokenizer
from models.xbert import build_bert_config, nlvr_num_layers

REPO = Path(__file__).resolve().parents[1]
REF_DIR = Path(os.environ.get('ALBEF_REF_DIR', REPO.parent / 'shared' / 'fixtures' / 'albef_ref_public'))
VARIANTS = ['model_pretrain', 'model_retrieval', 'model_vqa', 'model_nlvr', 'model_ve', 'model_pretrain_nlvr']
TASK = {'model_pretrain': 'pretrain', 'model_retrieval': 'retrieval', 'model_vqa': 'vqa', 'model_nlvr': 'nlvr',
        'model_ve': 've', 'model_pretrain_nlvr': 'pretrain_nlvr'}
ATOL = 1e-5        # hidden states, features, small logits
ATOL_LARGE = 1e-4  # 30522-way logits, summed NLLs, values divided by temp, losses



@pytest.fixture(autouse=True, scope='module')
def _require_fixtures():
    # Missing reference vectors must fail loudly (as tests/conftest.py does), never skip.
    if not (REF_DIR / 'tiny_config.json').is_file():
        pytest.fail(f'reference fixtures not found in {REF_DIR} (set ALBEF_REF_DIR)')


def close(actual, expected, atol=ATOL, what=''):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=1e-5, msg=lambda m: f'{what}: {m}')


def exact(actual, expected, what=''):
    assert torch.equal(actual.cpu(), expected.cpu()), f'{what}: integer outputs differ'


def tiny_model_config():
    """Our config dict from the fixture's tiny_config.json (fixture keys mapped onto ours)."""
    tc = json.loads((REF_DIR / 'tiny_config.json').read_text())
    vit = tc['vit']
    assert vit['qkv_bias'] is True and abs(vit['layer_norm_eps'] - 1e-6) < 1e-12  # fixed in our ViT
    return {
        'image_res': tc['image_res'],
        'patch_size': vit['patch_size'],
        'vision_width': vit['embed_dim'],
        'vision_depth': vit['depth'],
        'vision_num_heads': vit['num_heads'],
        'mlp_ratio': vit['mlp_ratio'],
        'bert_config': str(REF_DIR / 'config_bert_tiny.json'),
        'embed_dim': tc['embed_dim'],
        'temp': tc['temp'],
        'queue_size': tc['queue_size'],
        'momentum': tc['momentum'],
        'mlm_probability': tc['mlm_probability'],
        'alpha': tc['alpha'],
        'distill': tc['distill'],
        'vqa_decoder_layers': tc['vqa_text_decoder_num_hidden_layers'],
    }, tc


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    """A BERT-sized vocabulary (30522 entries, bert-base-uncased special-token positions) for MLM masking."""
    vocab = [f'[unused{i}]' for i in range(30522)]
    for i, tok in {0: '[PAD]', 100: '[UNK]', 101: '[CLS]', 102: '[SEP]', 103: '[MASK]'}.items():
        vocab[i] = tok
    for i, word in enumerate(['the', 'a', 'dog', 'cat'], start=1000):
        vocab[i] = word
    folder = tmp_path_factory.mktemp('vocab')
    (folder / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    return BertTokenizer.from_pretrained(str(folder))


_CACHE = {}


def load_variant(variant, tokenizer):
    """(model in eval mode with the reference weights, fixture dict); cached per variant."""
    if variant not in _CACHE:
        ref = torch.load(REF_DIR / f'{variant}.pt', weights_only=True)
        cfg, _ = tiny_model_config()
        torch.manual_seed(0)
        model = create_model(TASK[variant], cfg, tokenizer).float()
        model.load_state_dict(ref['state_dict'], strict=True)
        model.eval()
        _CACHE[variant] = (model, ref)
    return _CACHE[variant]


def check_common(model, ref, text_encoder):
    inp, out = ref['inputs'], ref['outputs']
    image_embeds = model.visual_encoder(inp['images'])
    close(image_embeds, out['image_embeds'], what='image_embeds')
    text = text_encoder(inp['input_ids'], attention_mask=inp['attention_mask'], mode='text').last_hidden_state
    close(text, out['text_embeds_text_mode'], what='text_embeds_text_mode')
    return image_embeds, text


def check_contrastive_and_itm(model, ref):
    """Shared items of model_pretrain and model_retrieval."""
    inp, out = ref['inputs'], ref['outputs']
    bert = model.text_encoder.bert if hasattr(model.text_encoder, 'bert') else model.text_encoder
    image_embeds, text_embeds = check_common(model, ref, bert)
    _, image_feat = model.encode_image(inp['images'])
    text_embeds2, text_feat = model.encode_text(inp['input_ids'], inp['attention_mask'])
    close(text_embeds2, text_embeds, what='encode_text')
    close(image_feat, out['image_feat'], what='image_feat')
    close(text_feat, out['text_feat'], what='text_feat')
    temp = model.temp
    close(image_feat @ text_feat.t() / temp, out['sim_i2t'], ATOL_LARGE, 'sim_i2t')
    close(text_feat @ image_feat.t() / temp, out['sim_t2i'], ATOL_LARGE, 'sim_t2i')
    # Momentum copies equal the base weights in the fixture, so the in-batch columns are these features.
    text_all = torch.cat([text_feat.t(), model.text_queue], dim=1)
    image_all = torch.cat([image_feat.t(), model.image_queue], dim=1)
    close(image_feat @ text_all / temp, out['sim_i2t_with_queue'], ATOL_LARGE, 'sim_i2t_with_queue')
    close(text_feat @ image_all / temp, out['sim_t2i_with_queue'], ATOL_LARGE, 'sim_t2i_with_queue')
    atts = inp['attention_mask']
    fusion = model.fusion(text_embeds, atts, image_embeds)
    close(fusion, out['fusion_matched'], what='fusion_matched')
    itm = model.itm_logits(text_embeds, atts, image_embeds)
    close(itm, out['itm_logits_matched'], what='itm_logits_matched')
    B = image_embeds.size(0)
    # all pairs [image i, text j]: image index repeated, texts tiled
    pairs = model.itm_logits(text_embeds.repeat(B, 1, 1), atts.repeat(B, 1),
                             image_embeds.repeat_interleave(B, dim=0)).view(B, B, 2)
    close(pairs, out['itm_logits_all_pairs'], what='itm_logits_all_pairs')
    return image_embeds, text_embeds, itm, pairs


@torch.no_grad()
def test_parity_pretrain(tokenizer):
    model, ref = load_variant('model_pretrain', tokenizer)
    inp, out = ref['inputs'], ref['outputs']
    image_embeds, _, _, _ = check_contrastive_and_itm(model, ref)
    mlm_ids, atts, labels = inp['mlm_input_ids'], inp['attention_mask'], inp['mlm_labels']
    hidden = model.text_encoder.bert(mlm_ids, attention_mask=atts, encoder_hidden_states=image_embeds).last_hidden_state
    close(hidden, out['mlm_hidden_multimodal'], what='mlm_hidden_multimodal')
    logits = model.text_encoder(mlm_ids, attention_mask=atts, encoder_hidden_states=image_embeds, return_logits=True)
    close(logits[inp['mlm_positions']], out['mlm_logits_at_masked'], ATOL_LARGE, 'mlm_logits_at_masked')
    masked = model.text_encoder(mlm_ids, attention_mask=atts, encoder_hidden_states=image_embeds,
                                return_logits=True, logits_positions=inp['mlm_positions'])
    close(masked, out['mlm_logits_at_masked'], ATOL_LARGE, 'mlm_logits_at_masked (head at positions)')
    exact(logits.argmax(-1), out['mlm_argmax_all_positions'], 'mlm_argmax_all_positions')
    loss = model.text_encoder(mlm_ids, attention_mask=atts, encoder_hidden_states=image_embeds, labels=labels).loss
    close(loss, out['mlm_loss'], ATOL_LARGE, 'mlm_loss')
    run_seeded_forward_informational(model, ref, lambda m: m(inp['images'], inp['input_ids'], atts,
                                                            alpha=out['seeded_forward']['alpha']))


def run_seeded_forward_informational(model, ref, call):
    """The reference's seeded training forward depends on the RNG stream: only check it runs and is finite."""
    seeded = ref['outputs']['seeded_forward']
    m = copy.deepcopy(model)
    torch.manual_seed(seeded['torch_manual_seed'])
    result = call(m)
    for name, value in result.items():
        assert torch.isfinite(value), f'seeded forward {name} is not finite'
        print(f'{name}: ours {float(value):.4f} reference {float(seeded[name]):.4f} (informational)')


@torch.no_grad()
def test_parity_retrieval(tokenizer):
    model, ref = load_variant('model_retrieval', tokenizer)
    inp, out = ref['inputs'], ref['outputs']
    _, _, itm, pairs = check_contrastive_and_itm(model, ref)
    close(itm[:, 1], out['itm_score_matched'], what='itm_score_matched')
    close(pairs[..., 1], out['itm_score_all_pairs'], what='itm_score_all_pairs')
    run_seeded_forward_informational(model, ref, lambda m: m(inp['images'], inp['input_ids'],
                                                            inp['attention_mask'], inp['idx'],
                                                            alpha=out['seeded_forward']['alpha']))


@torch.no_grad()
def test_parity_vqa(tokenizer):
    model, ref = load_variant('model_vqa', tokenizer)
    inp, out = ref['inputs'], ref['outputs']
    image_embeds, text = check_common(model, ref, model.text_encoder)
    q_atts = inp['attention_mask']
    fusion = model.text_encoder(encoder_embeds=text, attention_mask=q_atts, encoder_hidden_states=image_embeds,
                                mode='fusion').last_hidden_state
    close(fusion, out['fusion_from_text_mode'], what='fusion_from_text_mode')
    states = model.encode_question(inp['images'], inp['input_ids'], q_atts)
    close(states, out['question_states_multimodal'], what='question_states_multimodal')
    a_ids, a_atts, k = inp['answer_ids'], inp['answer_mask'], inp['k']
    close(model.first_token_probs(states, q_atts, a_ids), out['first_token_probs_over_candidates'],
          what='first_token_probs_over_candidates')
    nq, na = states.size(0), a_ids.size(0)
    nll = model.text_decoder(a_ids.repeat(nq, 1), attention_mask=a_atts.repeat(nq, 1),
                             encoder_hidden_states=states.repeat_interleave(na, 0),
                             encoder_attention_mask=q_atts.repeat_interleave(na, 0),
                             labels=a_ids.masked_fill(a_atts == 0, -100).repeat(nq, 1), reduction='none').loss
    close(nll.view(nq, na), out['answer_sequence_nll_all_candidates'], ATOL_LARGE,
          'answer_sequence_nll_all_candidates')
    topk_ids, topk_probs = model.rank_answer(states, q_atts, a_ids, a_atts, k)
    exact(topk_ids, out['rank_answer_topk_ids'], 'rank_answer_topk_ids')
    close(topk_probs, out['rank_answer_topk_probs'], what='rank_answer_topk_probs')
    ids2, probs2 = model.predict(inp['images'], inp['input_ids'], q_atts, a_ids, a_atts, k)
    exact(ids2, out['rank_answer_topk_ids'], 'predict ids')
    close(probs2, out['rank_answer_topk_probs'], what='predict probs')
    sel = inp['train_answer_index']
    m = copy.deepcopy(model)
    loss = m(inp['images'], inp['input_ids'], q_atts, a_ids[sel], a_atts[sel], inp['train_answer_weights'],
             inp['train_answers_per_question'], alpha=inp['train_alpha'])['loss']
    close(loss, out['train_loss'], ATOL_LARGE, 'train_loss')


def check_classifier(variant, tokenizer, images_key_pairs):
    model, ref = load_variant(variant, tokenizer)
    inp, out = ref['inputs'], ref['outputs']
    image_embeds, text = check_common(model, ref, model.text_encoder)
    atts = inp['attention_mask']
    enc_states = images_key_pairs(image_embeds, inp['input_ids'].size(0))
    enc_masks = [None] * len(enc_states) if isinstance(enc_states, list) else None
    fusion = model.text_encoder(encoder_embeds=text, attention_mask=atts, encoder_hidden_states=enc_states,
                                encoder_attention_mask=enc_masks, mode='fusion').last_hidden_state
    close(fusion, out['fusion_from_text_mode'], what='fusion_from_text_mode')
    hidden = model.multimodal_hidden(inp['images'], inp['input_ids'], atts)
    close(hidden, out['multimodal_hidden'], what='multimodal_hidden')
    close(model.predict(inp['images'], inp['input_ids'], atts), out['cls_logits'], what='cls_logits')
    m = copy.deepcopy(model)
    loss = m(inp['images'], inp['input_ids'], atts, inp['targets'], alpha=inp['train_alpha'])['loss']
    close(loss, out['train_loss'], ATOL_LARGE, 'train_loss')


@torch.no_grad()
def test_parity_nlvr(tokenizer):
    _, tc = tiny_model_config()
    model, ref = load_variant('model_nlvr', tokenizer)
    assert len(model.text_encoder.encoder.layer) == tc['nlvr_text_encoder_num_hidden_layers']
    assert nlvr_num_layers(build_bert_config(str(REF_DIR / 'config_bert_tiny.json'))) == \
        tc['nlvr_text_encoder_num_hidden_layers']
    assert torch.equal(ref['inputs']['images'], torch.cat([ref['inputs']['image0'], ref['inputs']['image1']]))
    check_classifier('model_nlvr', tokenizer, lambda e, b: list(torch.split(e, b)))


@torch.no_grad()
def test_parity_ve(tokenizer):
    check_classifier('model_ve', tokenizer, lambda e, b: e)


@torch.no_grad()
def test_parity_pretrain_nlvr(tokenizer):
    model, ref = load_variant('model_pretrain_nlvr', tokenizer)
    inp, out = ref['inputs'], ref['outputs']
    image_embeds, _ = check_common(model, ref, model.text_encoder)
    feat = model.image_feat(image_embeds)
    close(feat, out['image_feat'], what='image_feat')
    close(feat @ feat.t() / 0.07, out['sim_i2i_div_0.07'], ATOL_LARGE, 'sim_i2i_div_0.07')
    i0, i1 = inp['pair_image0_index'], inp['pair_image1_index']
    hidden = model.text_encoder(inp['input_ids'], attention_mask=inp['attention_mask'],
                                encoder_hidden_states=[image_embeds[i0], image_embeds[i1]]).last_hidden_state
    close(hidden, out['multimodal_hidden_fixed_pairs'], what='multimodal_hidden_fixed_pairs')
    logits = model.ta_logits(image_embeds[i0], image_embeds[i1], inp['input_ids'], inp['attention_mask'])
    close(logits, out['ta_logits_fixed_pairs'], what='ta_logits_fixed_pairs')
    run_seeded_forward_informational(model, ref, lambda m: m(inp['images'], inp['input_ids'],
                                                            inp['attention_mask']))


def test_parity_shared_parameter_groups(tokenizer):
    """Tied/shared entries of the fixture are the same Parameter objects in our models."""
    for variant in VARIANTS:
        model, ref = load_variant(variant, tokenizer)
        params = dict(model.named_parameters(remove_duplicate=False))
        for group in ref['shared_parameter_groups']:
            first = params[group[0]]
            assert all(params[name] is first for name in group[1:]), f'{variant}: {group} not shared'
        # nothing else is shared: unique parameter count = keys minus aliases within groups
        n_alias = sum(len(g) - 1 for g in ref['shared_parameter_groups'])
        assert len(params) - len(dict(model.named_parameters())) == n_alias, variant


def full_size_config():
    """Full-size config of full_size_state_dict_shapes.json: ViT-B/16 at its image_res, BERT-base (fusion 6)."""
    shapes = json.loads((REF_DIR / 'full_size_state_dict_shapes.json').read_text())
    c = shapes['_config']
    bert = json.loads((REF_DIR / 'config_bert_tiny.json').read_text())
    bert.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                fusion_layer=6, encoder_width=c['vision_width'])
    cfg = {'image_res': c['image_res'], 'patch_size': 16, 'vision_width': c['vision_width'], 'vision_depth': 12,
           'vision_num_heads': 12, 'mlp_ratio': 4, 'bert_config': bert, 'embed_dim': c['embed_dim'],
           'temp': c['temp'], 'queue_size': c['queue_size'], 'momentum': c['momentum'], 'distill': c['distill']}
    return cfg, shapes


@pytest.mark.parametrize('variant', VARIANTS)
def test_parity_full_size_state_dict(variant, tokenizer):
    cfg, shapes = full_size_config()
    ref = shapes[variant]
    with torch.device('meta'):
        model = create_model(TASK[variant], cfg, tokenizer)
    ours = [[k, list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in model.state_dict().items()]
    assert len(ours) == ref['num_keys']
    assert ours == ref['keys']
    assert sum(p.numel() for p in model.parameters()) == ref['num_parameters_unique']
    params = dict(model.named_parameters(remove_duplicate=False))
    for group in ref['shared_parameter_groups']:
        assert all(params[n] is params[group[0]] for n in group[1:]), group


# ---------------------------------------------------------------------------------------------------------------
# Behaviour beyond the reference vectors: Grad-CAM recording paths, modes, checkpointing, training steps.

def small_config(tmp_path, **extra):
    """Tiny config (ViT 32px width 32, 2 text + 2 fusion BERT layers, no dropout) and a 300-word tokenizer."""
    vocab = ['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
    vocab += [f'w{i}' for i in range(300 - len(vocab))]
    (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    tok = BertTokenizer.from_pretrained(str(tmp_path))
    bert = {'hidden_size': 32, 'num_hidden_layers': 4, 'num_attention_heads': 2, 'intermediate_size': 64,
            'vocab_size': len(tok), 'fusion_layer': 2, 'encoder_width': 32, 'hidden_act': 'gelu',
            'layer_norm_eps': 1e-12, 'max_position_embeddings': 64, 'type_vocab_size': 2,
            'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0}
    config = {'image_res': 32, 'patch_size': 16, 'vision_width': 32, 'vision_depth': 2, 'vision_num_heads': 2,
              'bert_config': bert, 'embed_dim': 16, 'queue_size': 10, 'temp': 0.07, 'momentum': 0.995,
              'vqa_decoder_layers': 2, 'distill': True}
    config.update(extra)
    return config, tok


def batch(tok, B=4, L=7, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, res, res, generator=g)
    ids = torch.randint(104, len(tok), (B, L), generator=g)
    ids[:, 0] = tok.cls_token_id
    atts = torch.ones_like(ids)
    ids[-1, L - 2:] = tok.pad_token_id
    atts[-1, L - 2:] = 0
    return image, ids, atts


def test_vit_recording_block_matches_sdpa_and_keeps_gradients(tmp_path):
    from models.vit import build_vit
    config, _ = small_config(tmp_path)
    vit = build_vit(config).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = vit(x)
    x.requires_grad_(True)
    recorded = vit(x, register_blk=1)
    close(recorded, fused, 1e-6, 'recording path')
    recorded.sum().backward()
    attn = vit.blocks[1].attn
    amap, grad = attn.get_attention_map(), attn.get_attn_gradients()
    assert amap.shape == (2, 2, 5, 5) and grad.shape == amap.shape
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 2, 5))
    assert vit.blocks[0].attn.get_attention_map() is None
    vit(x)
    assert vit.blocks[1].attn.save_attention is False


def test_resample_pos_embed_bicubic_keeps_cls(tmp_path):
    """The loader's position-embedding resize (models.checkpoint.resample_pos_embed) is exactly the original's
    bicubic resize of the patch grid (align_corners False, no antialias), CLS row kept."""
    import torch.nn.functional as F
    from models.checkpoint import resample_pos_embed
    from models.vit import build_vit
    config, _ = small_config(tmp_path, image_res=48)  # 3x3 grid
    vit = build_vit(config)
    ckpt = torch.randn(1, 1 + 4, 32)                  # 2x2 grid
    new = resample_pos_embed(ckpt, vit.pos_embed.shape[1])
    assert new.shape == vit.pos_embed.shape
    assert torch.equal(new[:, 0], ckpt[:, 0])
    grid = ckpt[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 3), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(1, 9, 32)
    assert torch.equal(new[:, 1:], want)
    same = torch.randn(1, 10, 32)
    assert resample_pos_embed(same, vit.pos_embed.shape[1]) is same


def test_xbert_modes_and_cross_attention_recording(tmp_path):
    config, tok = small_config(tmp_path)
    model = create_model('retrieval', config, tok).eval()
    image, ids, atts = batch(tok)
    enc = model.text_encoder
    image_embeds = model.visual_encoder(image)
    full = enc(ids, attention_mask=atts, encoder_hidden_states=image_embeds).last_hidden_state
    text = enc(ids, attention_mask=atts, mode='text').last_hidden_state
    fused = enc(encoder_embeds=text, attention_mask=atts, encoder_hidden_states=image_embeds,
                mode='fusion').last_hidden_state
    close(fused, full, 1e-6, 'text+fusion vs multi_modal')
    # an all-ones image mask equals no mask
    ones = torch.ones(image_embeds.shape[:2], dtype=torch.long)
    close(enc(ids, attention_mask=atts, encoder_hidden_states=image_embeds,
              encoder_attention_mask=ones).last_hidden_state, full, 1e-6, 'ones mask')
    layer = enc.encoder.layer[3].crossattention.self
    layer.save_attention = True
    image_embeds = image_embeds.detach().requires_grad_(True)
    rec = enc(ids, attention_mask=atts, encoder_hidden_states=image_embeds).last_hidden_state
    close(rec, full, 1e-5, 'recording cross-attention')
    model.itm_head(rec[:, 0]).sum().backward()
    assert layer.get_attention_map().shape == (4, 2, 7, 5)
    assert layer.get_attn_gradients().shape == (4, 2, 7, 5)
    with pytest.raises(ValueError):
        enc(ids, attention_mask=atts, mode='bogus')


def test_recording_context_stops_and_drops_maps_even_on_error(tmp_path):
    from models.attention_recording import recording
    config, tok = small_config(tmp_path)
    model = create_model('retrieval', config, tok).eval()
    image, ids, atts = batch(tok)
    layers = [model.text_encoder.encoder.layer[i].crossattention.self for i in (2, 3)]
    image_embeds = model.visual_encoder(image)
    with recording(*layers):
        model.text_encoder(ids, attention_mask=atts, encoder_hidden_states=image_embeds)
        assert [tuple(m.get_attention_map().shape) for m in layers] == [(4, 2, 7, 5)] * 2
    assert all(m.save_attention is False and m.get_attention_map() is None for m in layers)
    with pytest.raises(RuntimeError, match='boom'):
        with recording(layers[0]):
            model.text_encoder(ids, attention_mask=atts, encoder_hidden_states=image_embeds)
            raise RuntimeError('boom')
    assert layers[0].save_attention is False and layers[0].get_attention_map() is None


def test_gradient_checkpointing_gives_same_loss_and_grads(tmp_path):
    results = []
    for ckpt in (False, True):
        config, tok = small_config(tmp_path, grad_checkpointing=ckpt)
        torch.manual_seed(0)
        model = create_model('retrieval', config, tok).train()
        image, ids, atts = batch(tok)
        torch.manual_seed(1)
        out = model(image, ids, atts, torch.tensor([0, 1, 2, 0]), alpha=0.4)
        (out['loss_ita'] + out['loss_itm']).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = results
    for k in o1:
        close(o2[k], o1[k], 1e-6, k)
    assert g1.keys() == g2.keys() and len(g1) > 50
    for n in g1:
        close(g2[n], g1[n], 1e-5, n)


@pytest.mark.parametrize('task', ['pretrain', 'retrieval', 'vqa', 'nlvr', 've', 'pretrain_nlvr'])
@pytest.mark.parametrize('autocast', [False, True])
def test_training_step_runs_and_only_online_weights_get_gradients(tmp_path, task, autocast):
    config, tok = small_config(tmp_path)
    torch.manual_seed(0)
    model = create_model(task, config, tok).train()
    image, ids, atts = batch(tok)
    B = image.size(0)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        if task == 'pretrain':
            out = model(image, ids, atts, alpha=0.4)
        elif task == 'retrieval':
            out = model(image, ids, atts, torch.tensor([0, 1, 2, 0]), alpha=0.4)
        elif task == 'vqa':
            _, a_ids, a_atts = batch(tok, B=5, L=4, seed=1)
            a_ids[:, 0] = tok.cls_token_id
            out = model(image, ids, atts, a_ids, a_atts, torch.full((5,), 0.5), [2, 1, 1, 1], alpha=0.4)
        elif task == 'nlvr':
            out = model(torch.cat([image, image.flip(0)]), ids, atts, torch.tensor([0, 1, 1, 0]), alpha=0.4)
        elif task == 've':
            out = model(image, ids, atts, torch.tensor([0, 1, 2, 0]), alpha=0.4)
        else:
            out = model(image, ids, atts)
    total = sum(out.values())
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values()), out
    total.backward()
    for name, p in model.named_parameters():
        if '_m.' in name:
            assert p.grad is None and not p.requires_grad, name
    assert model.visual_encoder.patch_embed.proj.weight.grad is not None
    if task == 'pretrain':
        assert 0.001 <= model.temp.item() <= 0.5
    if task in ('pretrain', 'retrieval'):
        assert int(model.queue_ptr) == B and model.image_queue.dtype == torch.float32


def test_inference_helpers(tmp_path):
    config, tok = small_config(tmp_path)
    image, ids, atts = batch(tok)
    vqa = create_model('vqa', config, tok).eval()
    _, a_ids, a_atts = batch(tok, B=6, L=4, seed=2)
    a_ids[:, 0] = tok.cls_token_id
    top_ids, top_probs = vqa.predict(image, ids, atts, a_ids, a_atts, k=3)
    assert top_ids.shape == (4, 3) and torch.allclose(top_probs.sum(1), torch.ones(4))
    assert (top_probs[:, :-1] >= top_probs[:, 1:]).all()
    nlvr = create_model('nlvr', config, tok).eval()
    assert nlvr.predict(torch.cat([image, image]), ids, atts).shape == (4, 2)
    ve = create_model('ve', config, tok).eval()
    assert ve.predict(image, ids, atts).shape == (4, 3)
    ret = create_model('grounding', config, tok).eval()
    image_embeds, image_feat = ret.encode_image(image)
    text_embeds, text_feat = ret.encode_text(ids, atts)
    assert image_feat.shape == text_feat.shape == (4, 16)
    assert ret.itm_logits(text_embeds, atts, image_embeds).shape == (4, 2)
    with pytest.raises(ValueError):
        create_model('captioning', config, tok)


def test_model_classes_have_descriptive_names_and_keep_the_released_alias():
    """Each task's class has its own name; `from models.model_x import ALBEF` (released code) still works."""
    import importlib
    import models
    for task, (module, name) in models.TASK_MODULES.items():
        mod = importlib.import_module(module)
        assert models.model_class(task) is getattr(mod, name) is mod.ALBEF
        assert name.startswith('ALBEF') and name != 'ALBEF'
