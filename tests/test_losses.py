"""models/losses.py against naive loop implementations."""
import math

import pytest
import torch

from models import losses


def naive_log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def naive_soft_ce(logits, targets):
    total = 0.
    for lrow, trow in zip(logits.tolist(), targets.tolist()):
        total += -sum(t * l for t, l in zip(trow, naive_log_softmax(lrow)))
    return total / len(logits)


def test_soft_cross_entropy_and_itc():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, generator=g)
    targets = torch.softmax(torch.randn(5, 9, generator=g), 1)
    assert losses.soft_cross_entropy(logits, targets).item() == pytest.approx(naive_soft_ce(logits, targets), abs=1e-5)
    logits2 = torch.randn(5, 9, generator=g)
    targets2 = torch.softmax(torch.randn(5, 9, generator=g), 1)
    expected = (naive_soft_ce(logits, targets) + naive_soft_ce(logits2, targets2)) / 2
    assert losses.itc_loss(logits, logits2, targets, targets2).item() == pytest.approx(expected, abs=1e-5)


def test_distill_targets_and_similarity():
    g = torch.Generator().manual_seed(1)
    sim_m = torch.randn(3, 7, generator=g)
    hard = torch.zeros(3, 7)
    hard.fill_diagonal_(1)
    t = losses.distill_targets(sim_m, hard, 0.4)
    for i in range(3):
        ex = [math.exp(x) for x in sim_m[i].tolist()]
        for j in range(7):
            assert t[i, j].item() == pytest.approx(0.4 * ex[j] / sum(ex) + 0.6 * hard[i, j].item(), abs=1e-6)
    assert torch.allclose(t.sum(1), torch.ones(3))
    a, b = torch.randn(3, 4, generator=g), torch.randn(4, 7, generator=g)
    temp = torch.tensor(0.07)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        s = losses.similarity(a, b, temp)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, a @ b / 0.07)


def test_classification_and_itm_loss():
    g = torch.Generator().manual_seed(2)
    pred, pred_m = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    targets = torch.tensor([0, 2, 1, 2])
    ce = -sum(naive_log_softmax(r)[t] for r, t in zip(pred.tolist(), targets.tolist())) / 4
    assert losses.classification_loss(pred, targets).item() == pytest.approx(ce, abs=1e-6)
    assert losses.itm_loss(pred, targets).item() == pytest.approx(ce, abs=1e-6)
    distill = naive_soft_ce(pred, torch.softmax(pred_m, 1))
    got = losses.classification_loss(pred, targets, pred_m, alpha=0.4).item()
    assert got == pytest.approx(0.6 * ce + 0.4 * distill, abs=1e-6)


def test_mlm_loss_layouts_and_distillation():
    g = torch.Generator().manual_seed(3)
    B, L, V = 2, 5, 11
    logits = torch.randn(B, L, V, generator=g)
    labels = torch.full((B, L), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 4, 7, 0
    soft = torch.softmax(torch.randn(B, L, V, generator=g), -1)
    pos = [(0, 1), (0, 3), (1, 4)]
    ce = -sum(naive_log_softmax(logits[b, l].tolist())[labels[b, l]] for b, l in pos) / 3
    dist = -sum(sum(s * x for s, x in zip(soft[b, l].tolist(), naive_log_softmax(logits[b, l].tolist())))
                for b, l in pos) / 3
    keep = labels != -100
    assert losses.mlm_loss(logits, labels).item() == pytest.approx(ce, abs=1e-5)
    assert losses.mlm_loss(logits[keep], labels).item() == pytest.approx(ce, abs=1e-5)
    want = 0.6 * ce + 0.4 * dist
    assert losses.mlm_loss(logits, labels, soft, 0.4).item() == pytest.approx(want, abs=1e-5)
    assert losses.mlm_loss(logits[keep], labels, soft[keep], 0.4).item() == pytest.approx(want, abs=1e-5)
    assert losses.mlm_loss(logits[keep], labels, soft, 0.4).item() == pytest.approx(want, abs=1e-5)
    # nothing masked -> NaN, like the reference
    assert torch.isnan(losses.mlm_loss(logits, torch.full((B, L), -100)))


def test_lm_loss_per_sequence_sum_and_distillation():
    g = torch.Generator().manual_seed(4)
    B, L, V = 3, 4, 6
    logits = torch.randn(B, L, V, generator=g)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[1, 3] = -100
    labels[2, 2:] = -100
    soft = torch.softmax(torch.randn(B, L - 1, V, generator=g), -1)
    got = losses.lm_loss(logits, labels, reduction='none')
    got_d = losses.lm_loss(logits, labels, soft, alpha=0.4, reduction='none')
    for b in range(B):
        nll = dist = 0.
        for t in range(L - 1):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            ls = naive_log_softmax(logits[b, t].tolist())
            nll -= ls[y]
            dist -= sum(s * x for s, x in zip(soft[b, t].tolist(), ls))
        assert got[b].item() == pytest.approx(nll, abs=1e-5)
        assert got_d[b].item() == pytest.approx(0.6 * nll + 0.4 * dist, abs=1e-5)
    mean = losses.lm_loss(logits, labels, reduction='mean')
    assert mean.item() == pytest.approx(got.sum().item() / int((labels[:, 1:] != -100).sum()), abs=1e-5)


def test_mask_tokens_rules_and_rng():
    pad, cls, mask_id, V = 0, 101, 103, 30522
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(999, V, (64, 40), generator=g)
    ids[:, 0] = cls
    ids[:, 30:] = pad
    out, labels = losses.mask_tokens(ids, V, mask_id, pad, cls, 0.15, generator=torch.Generator().manual_seed(7))
    out2, labels2 = losses.mask_tokens(ids, V, mask_id, pad, cls, 0.15, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, out2) and torch.equal(labels, labels2)
    masked = labels != -100
    assert not masked[:, 0].any() and not masked[:, 30:].any()
    assert torch.equal(labels[masked], ids[masked])
    assert torch.equal(out[~masked], ids[~masked])
    rate = masked[:, 1:30].float().mean().item()
    assert 0.12 < rate < 0.18
    n = masked.sum().item()
    replaced = (out[masked] == mask_id).sum().item() / n
    kept = (out[masked] == ids[masked]).sum().item() / n
    assert 0.74 < replaced < 0.86 and 0.05 < kept < 0.16
    # global RNG when no generator is given: reproducible under manual_seed
    torch.manual_seed(3)
    a = losses.mask_tokens(ids, V, mask_id, pad, cls)
    torch.manual_seed(3)
    b = losses.mask_tokens(ids, V, mask_id, pad, cls)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_itm_negative_weights_hard_random_and_excluded_pairs():
    from models.contrastive import itm_negative_weights
    torch.manual_seed(0)
    sim = torch.randn(5, 5) * 3
    itself = torch.eye(5, dtype=torch.bool)
    hard = itm_negative_weights(sim, itself)
    # s = 0 is the original: softmax over the row, the positive zeroed, nothing renormalised.
    expected = torch.softmax(sim, dim=1)
    expected.fill_diagonal_(0)
    assert torch.equal(hard, expected)
    mixed = itm_negative_weights(sim, itself, 0.5)
    assert torch.allclose(mixed.sum(1), torch.ones(5))
    assert torch.allclose(mixed, 0.5 * hard / hard.sum(1, keepdim=True) + 0.5 * (~itself).float() / 4)
    uniform = itm_negative_weights(sim, itself, 1.0)
    assert torch.allclose(uniform, (~itself).float() / 4)
    # Excluded pairs (e.g. captions of the same image in retrieval) are never drawn at any share.
    same_image = itself.clone()
    same_image[0, 1] = same_image[1, 0] = True
    for share in (0.0, 0.3, 1.0):
        weights = itm_negative_weights(sim, same_image, share)
        assert (weights[same_image] == 0).all() and (weights[~same_image] > 0).all()


def test_itm_negative_weights_when_a_batch_holds_one_image_only():
    """Rows whose every candidate is a positive (all captions of one image) draw among the other items instead of
    making torch.multinomial fail; other rows keep the softmax of the similarities."""
    from models.contrastive import itm_negative_weights
    sim = torch.randn(4, 4)
    same = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    w = itm_negative_weights(sim, same)
    torch.testing.assert_close(w[3], torch.softmax(sim[3], 0).masked_fill(same[3], 0))
    all_one = torch.ones(4, 4, dtype=torch.bool)
    for share in (0.0, 0.5):
        w = itm_negative_weights(sim, all_one, share)
        assert torch.isfinite(w).all() and (w.diagonal() == 0).all() and (w.sum(1) > 0).all()
        assert torch.multinomial(w, 1).shape == (4, 1)
