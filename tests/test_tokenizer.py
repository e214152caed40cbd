"""models/tokenization_bert.py: ALBEF's "[CLS] pieces" format on a small vocabulary written to tmp_path."""
import pytest
import torch

from models.tokenization_bert import BertTokenizer

WORDS = ['the', 'dog', 'runs', 'on', 'grass', 'yes', 'no', 'play', '##ing', 'a', 'cat', '.', ',']


@pytest.fixture
def tok(tmp_path):
    vocab = ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS
    (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    return BertTokenizer.from_pretrained(str(tmp_path))


def ids(tok, *tokens):
    return tok.convert_tokens_to_ids(list(tokens))


def test_special_ids_come_from_vocab(tok):
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 3, 4, 5)
    assert len(tok) == tok.vocab_size == 6 + len(WORDS)


def test_single_text_has_no_sep(tok):
    enc = tok('The dog runs')
    assert enc.input_ids == [tok.cls_token_id] + ids(tok, 'the', 'dog', 'runs')
    assert enc.attention_mask == [1, 1, 1, 1]
    std = BertTokenizer.from_pretrained(tok.name_or_path, add_sep=True)('The dog runs')
    assert std.input_ids == enc.input_ids + [tok.sep_token_id]


def test_literal_sep_is_one_token(tok):
    enc = tok(['yes[SEP]', 'no [SEP]'], padding='longest', return_tensors='pt')
    assert enc.input_ids.tolist() == [[3] + ids(tok, 'yes') + [4], [3] + ids(tok, 'no') + [4]]


def test_padding_and_tensors(tok):
    enc = tok(['the dog', 'a cat runs on grass'], padding='longest', return_tensors='pt')
    assert enc.input_ids.dtype == torch.long and enc.attention_mask.dtype == torch.long
    assert enc.input_ids.shape == (2, 6)
    assert enc.input_ids[0].tolist() == [3] + ids(tok, 'the', 'dog') + [0, 0, 0]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    enc = tok(['the dog'], padding='max_length', truncation=True, max_length=5, return_tensors='pt')
    assert enc.input_ids.tolist() == [[3] + ids(tok, 'the', 'dog') + [0, 0]]


def test_truncation_keeps_max_length_minus_one_pieces(tok):
    text = 'the dog runs on grass playing'  # 7 pieces (play ##ing)
    enc = tok([text], padding='longest', truncation=True, max_length=4, return_tensors='pt')
    assert enc.input_ids.tolist() == [[3] + ids(tok, 'the', 'dog', 'runs')]
    # max_length without truncation=True does not truncate (as the reference scripts rely on)
    enc = tok([text], padding='longest', max_length=4, return_tensors='pt')
    assert enc.input_ids.shape[1] == 8
    enc = BertTokenizer.from_pretrained(tok.name_or_path, add_sep=True)(
        [text], padding='longest', truncation=True, max_length=4, return_tensors='pt')
    assert enc.input_ids.tolist() == [[3] + ids(tok, 'the', 'dog') + [4]]


def test_wordpiece_lowercase_punctuation_unknown(tok):
    enc = tok('Playing, the ZEBRA.')
    assert enc.input_ids == [3] + ids(tok, 'play', '##ing', ',', 'the', '[UNK]', '.')


def test_errors_and_decode(tok):
    with pytest.raises(ValueError):
        tok(['the', 'the dog'], return_tensors='pt')  # ragged without padding
    with pytest.raises(ValueError):
        tok(['the'], padding='sideways')
    assert tok.decode(tok('the dog').input_ids[1:]) == 'the dog'


def test_a_tokenizer_without_vocabulary_is_refused(tmp_path):
    """A folder without vocab.txt loads in transformers as a tokenizer of special tokens only, which would train on
    [UNK] alone: refused with one line, as is a name that cannot be loaded at all."""
    import utils
    from models.tokenization_bert import BertTokenizer
    with pytest.raises(utils.UserError, match='no vocabulary beyond its 5 special tokens'):
        BertTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(utils.UserError, match='cannot load the tokenizer'):
        BertTokenizer.from_pretrained(str(tmp_path / 'missing' / 'folder'))


def _written_out(tok, texts, padding, truncation, max_length, add_sep):
    """ALBEF's format built by hand from the word pieces: [CLS] pieces ([SEP]), truncated to max_length - specials
    pieces only with truncation, padded to the longest or to max_length."""
    n_special = 2 if add_sep else 1
    max_length = tok.model_max_length if max_length is None else max_length
    pieces = tok.hf(texts, add_special_tokens=False)['input_ids']
    if truncation:
        pieces = [p[:max(max_length - n_special, 0)] for p in pieces]
    ids = [[tok.cls_token_id] + p + ([tok.sep_token_id] if add_sep else []) for p in pieces]
    target = {'longest': max(map(len, ids)), 'max_length': max_length, False: None}[padding]
    masks = [[1] * len(x) for x in ids]
    if target is not None:
        masks = [m + [0] * max(target - len(m), 0) for m in masks]
        ids = [x + [tok.pad_token_id] * max(target - len(x), 0) for x in ids]
    return ids, masks


@pytest.mark.parametrize('add_sep', [False, True])
def test_fast_tokenizer_template_gives_the_written_out_format(tok, add_sep):
    """The fast tokenizer with a "[CLS] $A" template gives exactly the ids and masks built by hand."""
    if add_sep:
        tok = BertTokenizer.from_pretrained(tok.name_or_path, add_sep=True)
    texts = ['the dog runs', 'a cat playing on grass , yes .', '', 'ZEBRA', 'no [SEP]', 'the ' * 40,
             'the dog runs on grass playing']
    for padding in ('longest', 'max_length', False):
        for truncation in (True, False):
            for max_length in (None, 0, 1, 2, 4, 30):
                if padding == 'max_length' and max_length is None and not truncation:
                    continue  # pads to 512: covered by the other cases
                want_ids, want_masks = _written_out(tok, texts, padding, truncation, max_length, add_sep)
                enc = tok(texts, padding=padding, truncation=truncation, max_length=max_length)
                assert (enc.input_ids, enc.attention_mask) == (want_ids, want_masks), (padding, truncation,
                                                                                      max_length)
                if len(set(map(len, want_ids))) == 1:  # tensors need equal lengths
                    enc = tok(texts, padding=padding, truncation=truncation, max_length=max_length,
                              return_tensors='pt')
                    assert enc.input_ids.tolist() == want_ids and enc.attention_mask.tolist() == want_masks
                for text in texts[:3]:
                    one = tok(text, padding=padding, truncation=truncation, max_length=max_length)
                    want = _written_out(tok, [text], padding, truncation, max_length, add_sep)
                    assert (one.input_ids, one.attention_mask) == (want[0][0], want[1][0])
