"""Pure loss functions shared by the ALBEF variants.

Everything that turns logits into a scalar runs in float32 (autocast off), so the losses are safe under bf16
autocast: the contrastive similarities against the fp32 queues, softmaxes over 30522 classes, soft targets.
"""
import torch
import torch.nn.functional as F


def _no_autocast(t):
    """Context manager disabling autocast on the device type of tensor t (fp32 islands)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def similarity(feat, feat_all, temp):
    """Contrastive logits feat [B, D] x feat_all [D, N] / temp, computed in float32 -> [B, N]."""
    with _no_autocast(feat):
        if torch.is_tensor(temp):
            temp = temp.float()
        return feat.float() @ feat_all.float() / temp


def soft_cross_entropy(logits, targets, dim=-1):
    """Mean over rows of -sum_j targets_j * log_softmax(logits)_j (targets are probabilities)."""
    with _no_autocast(logits):
        return -(F.log_softmax(logits.float(), dim=dim) * targets.float()).sum(dim=dim).mean()


def distill_targets(sim_m, hard_targets, alpha):
    """Soft ITC targets alpha * softmax(sim_m) + (1 - alpha) * hard_targets (rows)."""
    with _no_autocast(sim_m):
        return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard_targets.float()


def itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i):
    """Image-text contrastive loss: mean of the two soft cross-entropies."""
    return (soft_cross_entropy(sim_i2t, targets_i2t, dim=1) + soft_cross_entropy(sim_t2i, targets_t2i, dim=1)) / 2


def itm_loss(logits, labels):
    """Image-text matching loss: mean cross-entropy of [N, 2] logits."""
    with _no_autocast(logits):
        return F.cross_entropy(logits.float(), labels)


def classification_loss(prediction, targets, prediction_m=None, alpha=0.):
    """CE, mixed with the momentum-softmax cross-entropy when prediction_m is given (NLVR2/VE):
    (1 - alpha) * CE(prediction, targets) - alpha * mean_b sum_c softmax(prediction_m) log_softmax(prediction)."""
    with _no_autocast(prediction):
        loss = F.cross_entropy(prediction.float(), targets)
        if prediction_m is None:
            return loss
        distill = soft_cross_entropy(prediction, F.softmax(prediction_m.float(), dim=1), dim=1)
        return (1 - alpha) * loss + alpha * distill


def mlm_loss(logits, labels, soft_labels=None, alpha=0.):
    """Masked-LM loss: mean CE over positions whose label != -100, optionally mixed with distillation.

    labels: [B, L] with -100 at unlabelled positions. logits: [B, L, V] (every position) or [M, V] (only the M
    labelled positions, in row-major order). soft_labels: probabilities in either of the same two layouts.
    Returns (1 - alpha) * CE + alpha * mean_masked(-sum soft * log_softmax(logits)); NaN when nothing is
    labelled (as the original).
    """
    with _no_autocast(logits):
        keep = labels != -100
        logits = logits.float()
        if logits.shape[:-1] == labels.shape:
            logits = logits[keep]
        target = labels[keep]
        loss = F.cross_entropy(logits, target)
        if soft_labels is not None:
            if soft_labels.shape[:-1] == labels.shape:
                soft_labels = soft_labels[keep]
            distill = -(F.log_softmax(logits, dim=-1) * soft_labels.float()).sum(-1).mean()
            loss = (1 - alpha) * loss + alpha * distill
        return loss


def lm_loss(logits, labels, soft_labels=None, alpha=0., reduction='none'):
    """Causal LM loss of the VQA decoder (as the original xbert's BertLMHeadModel).

    logits [B, L, V] (position t predicts token t+1), labels [B, L] with -100 ignored. The shifted token NLLs
    are computed with `reduction`; for 'none' they are summed per sequence -> [B]. soft_labels [B, L-1, V]
    (probabilities for the shifted positions) add alpha-mixed distillation, also summed per sequence.
    """
    with _no_autocast(logits):
        shifted = logits[:, :-1, :].float()
        target = labels[:, 1:]
        B, Lm1, V = shifted.shape
        nll = F.cross_entropy(shifted.reshape(-1, V), target.reshape(-1), reduction=reduction, ignore_index=-100)
        if reduction != 'none':
            if soft_labels is not None:
                raise ValueError("lm_loss: soft_labels need reduction='none'")
            return nll
        loss = nll.view(B, -1).sum(1)
        if soft_labels is not None:
            distill = -(F.log_softmax(shifted, dim=-1) * soft_labels.float()).sum(-1)
            distill = (distill * (target != -100)).sum(1)
            loss = (1 - alpha) * loss + alpha * distill
        return loss


def mask_tokens(input_ids, vocab_size, mask_token_id, pad_token_id, cls_token_id, mlm_probability=0.15,
                generator=None):
    """BERT 80/10/10 masking as in ALBEF; returns (masked_input_ids, labels).

    Positions holding [PAD] or [CLS] are never masked; other ids (including other specials) can be. Labels are
    the original ids at masked positions and -100 elsewhere. Random replacements are drawn from the whole
    vocabulary. Random numbers come from `generator` (a CPU torch.Generator) or the global CPU RNG, in the
    original order: masked, replaced, random, random ids.
    """
    device = input_ids.device
    shape = input_ids.shape
    ids_cpu = input_ids.detach().cpu()
    probability_matrix = torch.full(shape, float(mlm_probability))
    masked = torch.bernoulli(probability_matrix, generator=generator).bool()
    masked &= ids_cpu != pad_token_id
    masked &= ids_cpu != cls_token_id
    labels = ids_cpu.masked_fill(~masked, -100)
    replaced = torch.bernoulli(torch.full(shape, 0.8), generator=generator).bool() & masked
    out = ids_cpu.masked_fill(replaced, mask_token_id)
    rand = torch.bernoulli(torch.full(shape, 0.5), generator=generator).bool() & masked & ~replaced
    random_words = torch.randint(vocab_size, shape, dtype=torch.long, generator=generator)
    out = torch.where(rand, random_words, out)
    return out.to(device), labels.to(device)
