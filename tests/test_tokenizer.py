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
