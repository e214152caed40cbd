"""Cross-attention with fewer encoder rows than text rows (VQA: k answer candidates share one question)."""
import torch

from models.xbert import BertLMHeadModel, build_bert_config


def _decoder():
    config = build_bert_config({'vocab_size': 50, 'hidden_size': 32, 'num_hidden_layers': 2,
                                'num_attention_heads': 4, 'intermediate_size': 64, 'max_position_embeddings': 16},
                               fusion_layer=0, encoder_width=24)
    torch.manual_seed(0)
    return BertLMHeadModel(config).eval()


def test_grouped_encoder_rows_equal_repeated_rows():
    decoder = _decoder()
    nq, k, lq, la = 3, 5, 7, 4
    states = torch.randn(nq, lq, 24)
    atts = torch.ones(nq, lq, dtype=torch.long)
    atts[1, 4:] = 0  # padded question: the mask must follow its group
    ids = torch.randint(1, 50, (nq * k, la))
    with torch.no_grad():
        grouped = decoder(ids, encoder_hidden_states=states, encoder_attention_mask=atts).logits
        repeated = decoder(ids, encoder_hidden_states=states.repeat_interleave(k, 0),
                           encoder_attention_mask=atts.repeat_interleave(k, 0)).logits
    assert grouped.shape == (nq * k, la, 50)
    assert torch.allclose(grouped, repeated, atol=1e-5)
    # The padded key positions really are masked: changing them does not move question 1's rows.
    states2 = states.clone()
    states2[1, 4:] += 10
    with torch.no_grad():
        moved = decoder(ids, encoder_hidden_states=states2, encoder_attention_mask=atts).logits
    assert torch.allclose(moved[k:2 * k], grouped[k:2 * k], atol=1e-5)
    assert torch.allclose(moved[:k], grouped[:k], atol=1e-5)


def test_grouped_rows_with_attention_recording_fall_back_to_repeat():
    decoder = _decoder()
    layer = decoder.bert.encoder.layer[0].crossattention.self
    layer.save_attention = True
    states = torch.randn(2, 6, 24)
    ids = torch.randint(1, 50, (6, 3))
    with torch.no_grad():
        decoder(ids, encoder_hidden_states=states)
    assert layer.get_attention_map().shape == (6, 4, 3, 6)


def test_text_rows_not_a_multiple_of_encoder_rows_is_an_error():
    import pytest
    decoder = _decoder()
    with pytest.raises(ValueError, match='5 text rows are not a multiple of 2 encoder rows'):
        decoder(torch.randint(1, 50, (5, 3)), encoder_hidden_states=torch.randn(2, 6, 24))
