"""models/momentum.py: EMA, copy_params, ring-buffer queues, gather; momentum-update order in the models."""
import random

import pytest
import torch
import torch.nn as nn

from models.tokenization_bert import BertTokenizer

from models.momentum import concat_all_gather, copy_params, dequeue_and_enqueue, momentum_update


@pytest.fixture
def tiny_config_and_tokenizer(tmp_path):
    """A tiny model config (ViT 32px, 2+2-layer BERT) and a 2000-word tokenizer."""
    vocab = ['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]']
    vocab += [f'w{i}' for i in range(2000 - len(vocab))]
    (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    tok = BertTokenizer.from_pretrained(str(tmp_path))
    bert = {'hidden_size': 32, 'num_hidden_layers': 4, 'num_attention_heads': 2, 'intermediate_size': 64,
            'vocab_size': len(tok), 'fusion_layer': 2, 'encoder_width': 32, 'hidden_act': 'gelu',
            'layer_norm_eps': 1e-12, 'max_position_embeddings': 64, 'type_vocab_size': 2}
    config = {'image_res': 32, 'patch_size': 16, 'vision_width': 32, 'vision_depth': 2, 'vision_num_heads': 2,
              'bert_config': bert, 'embed_dim': 16, 'queue_size': 12, 'temp': 0.07, 'momentum': 0.995}
    return config, tok


def test_copy_params_and_freeze_with_tied_weights():
    def make():
        m = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5))
        m[1].weight = m[0].weight  # tied: appears once in parameters()
        return m
    a, b = make(), make()
    copy_params([(a, b)])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and not pb.requires_grad
    assert b[1].weight is b[0].weight


def test_momentum_update_matches_formula():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in b.parameters()]
    momentum_update([(a, b)], 0.9)
    for p, p_m, old in zip(a.parameters(), b.parameters(), before):
        torch.testing.assert_close(p_m, 0.9 * old + 0.1 * p.detach())


def test_concat_all_gather_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    y = concat_all_gather(x)
    assert torch.equal(y, x.detach()) and not y.requires_grad


def test_ring_buffer_against_naive():
    rng = random.Random(0)
    Q, D = 10, 3
    queue = torch.zeros(D, Q)
    idx_queue = torch.full((1, Q), -100, dtype=torch.long)
    ptr = torch.zeros(1, dtype=torch.long)
    naive_q = [[0.] * D for _ in range(Q)]
    naive_idx = [-100] * Q
    naive_ptr = 0
    counter = 0
    for step in range(40):
        n = rng.choice([1, 2, 3, 4, 7, 10, 13])
        feats = torch.arange(counter, counter + n * D, dtype=torch.float).view(n, D)
        idx = torch.arange(counter, counter + n)
        counter += n * D
        dequeue_and_enqueue([queue, idx_queue], ptr, [feats, idx])
        for row, i in zip(feats.tolist(), idx.tolist()):
            naive_q[naive_ptr] = row
            naive_idx[naive_ptr] = i
            naive_ptr = (naive_ptr + 1) % Q
        assert int(ptr) == naive_ptr
        assert torch.equal(queue, torch.tensor(naive_q).t())
        assert idx_queue.tolist() == [naive_idx]


def test_queue_stays_float32_under_bf16_features():
    queue = torch.zeros(2, 4)
    ptr = torch.zeros(1, dtype=torch.long)
    dequeue_and_enqueue([queue], ptr, [torch.ones(3, 2, dtype=torch.bfloat16)])
    assert queue.dtype == torch.float32 and int(ptr) == 3 and queue[:, :3].eq(1).all()


def test_models_update_momentum_before_momentum_features(tiny_config_and_tokenizer):
    """The momentum ViT already holds the EMA-updated weights when it encodes the current batch."""
    from models import create_model
    config, tok = tiny_config_and_tokenizer
    torch.manual_seed(0)
    model = create_model('retrieval', config, tok)
    with torch.no_grad():
        for p in model.visual_encoder_m.parameters():
            p.add_(1.0)  # make online and momentum differ
    expected = [0.995 * pm + 0.005 * p for p, pm in zip(model.visual_encoder.parameters(),
                                                          model.visual_encoder_m.parameters())]
    seen = {}

    def hook(module, args):
        seen['params'] = [p.detach().clone() for p in module.parameters()]
    model.visual_encoder_m.register_forward_pre_hook(hook)
    B = 4
    image = torch.randn(B, 3, config['image_res'], config['image_res'])
    ids = torch.randint(1000, 2000, (B, 6))
    ids[:, 0] = tok.cls_token_id
    out = model(image, ids, torch.ones_like(ids), torch.arange(B), alpha=0.4)
    for got, want in zip(seen['params'], expected):
        torch.testing.assert_close(got, want)
    assert int(model.queue_ptr) == B
    assert model.idx_queue[0, :B].tolist() == list(range(B))
    assert set(out) == {'loss_ita', 'loss_itm'}


def test_learn_temp_false_keeps_the_temperature_fixed(tiny_config_and_tokenizer):
    from models import create_model
    from optim import create_optimizer
    config, tok = tiny_config_and_tokenizer
    B = 4
    image = torch.randn(B, 3, config['image_res'], config['image_res'])
    ids = torch.randint(1000, 2000, (B, 6))
    ids[:, 0] = tok.cls_token_id
    for learn in (True, False):
        torch.manual_seed(0)
        model = create_model('pretrain', dict(config, learn_temp=learn), tok)
        assert 'temp' in model.state_dict()  # the checkpoint layout does not change
        opt = create_optimizer({'opt': 'adamW', 'lr': 1e-2, 'weight_decay': 0.02}, model)
        loss = sum(model(image, ids, torch.ones_like(ids), alpha=0.4).values())
        loss.backward()
        opt.step()
        assert (float(model.temp) != pytest.approx(0.07, abs=1e-6)) is learn
