"""ALBEF's tokenizer behaviour on top of transformers' fast BERT tokenizer (spec section 3).

The original encodes a single text as "[CLS] pieces" with **no trailing [SEP]**; truncation keeps at most
max_length - 1 word pieces. `BertTokenizer(add_sep=True)` gives the standard "[CLS] pieces [SEP]" instead.
A literal "[SEP]" inside a string is one token (special tokens are never split by the fast tokenizer), so VQA
answers ending in "[SEP]" get their end token that way. Every id comes from the loaded vocabulary.
"""
import torch
from transformers import BertTokenizerFast


class Encoding(dict):
    """Dict with attribute access (input_ids, attention_mask), like transformers' BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        """Move tensor values to `device` (returns self)."""
        for k, v in self.items():
            if torch.is_tensor(v):
                self[k] = v.to(device)
        return self


class BertTokenizer:
    """Callable wrapper around transformers.BertTokenizerFast with ALBEF's single-sequence format."""

    def __init__(self, hf_tokenizer, add_sep=False):
        self.hf = hf_tokenizer
        self.add_sep = add_sep

    @classmethod
    def from_pretrained(cls, name_or_folder, add_sep=False, **kwargs):
        """Load a hub name or a folder containing vocab.txt (or tokenizer.json).

        Raises UserError (one line) when nothing can be loaded, and when what loads has no vocabulary beyond the
        special tokens (transformers builds such an empty tokenizer for some misspelled names), which would
        otherwise train on [UNK] alone.
        """
        from utils import UserError
        kwargs.setdefault('model_max_length', 512)
        try:
            hf = BertTokenizerFast.from_pretrained(name_or_folder, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the tokenizer '{name_or_folder}' ({str(e).splitlines()[0][:120]}); pass "
                            f"--text_encoder with a hub name or a local folder holding vocab.txt") from None
        if len(hf) <= len(hf.all_special_tokens):
            raise UserError(f"tokenizer '{name_or_folder}' has no vocabulary beyond its {len(hf)} special tokens "
                            f"(a misspelled hub name, or a folder without vocab.txt)")
        return cls(hf, add_sep=add_sep)

    # Special ids and sizes, always read from the vocabulary.
    @property
    def pad_token_id(self):
        return self.hf.pad_token_id

    @property
    def cls_token_id(self):
        return self.hf.cls_token_id

    @property
    def sep_token_id(self):
        return self.hf.sep_token_id

    @property
    def mask_token_id(self):
        return self.hf.mask_token_id

    @property
    def unk_token_id(self):
        return self.hf.unk_token_id

    @property
    def vocab_size(self):
        return len(self.hf)

    def __len__(self):
        return len(self.hf)

    def __getattr__(self, name):
        # decode, convert_ids_to_tokens, tokenize, ... come from the wrapped tokenizer.
        if name == 'hf':
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __call__(self, text, padding=False, truncation=False, max_length=None, return_tensors=None, **kwargs):
        """Tokenize one string or a list of strings.

        padding: False/'do_not_pad', True/'longest', or 'max_length'; truncation keeps max_length - 1 pieces
        (max_length - 2 with add_sep). Without truncation=True nothing is truncated, even with max_length (as
        the reference). Returns an Encoding with input_ids and attention_mask (LongTensors with
        return_tensors='pt', lists otherwise; a single string gives un-batched lists / [1, L] tensors).
        """
        if kwargs:
            raise TypeError(f'BertTokenizer: unsupported arguments {sorted(kwargs)}')
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        n_special = 2 if self.add_sep else 1
        pieces = self.hf(texts, add_special_tokens=False)['input_ids'] if texts else []
        do_truncate = truncation not in (False, None, 'do_not_truncate')
        if do_truncate:
            if max_length is None:
                max_length = self.hf.model_max_length
            pieces = [p[:max(max_length - n_special, 0)] for p in pieces]
        ids = [[self.cls_token_id] + p + ([self.sep_token_id] if self.add_sep else []) for p in pieces]

        if padding in (True, 'longest'):
            target = max((len(x) for x in ids), default=0)
        elif padding == 'max_length':
            target = max_length if max_length is not None else self.hf.model_max_length
        elif padding in (False, None, 'do_not_pad'):
            target = None
        else:
            raise ValueError(f'BertTokenizer: unknown padding {padding!r}')
        masks = [[1] * len(x) for x in ids]
        if target is not None:
            masks = [m + [0] * max(target - len(m), 0) for m in masks]
            ids = [x + [self.pad_token_id] * max(target - len(x), 0) for x in ids]

        if return_tensors == 'pt':
            if len({len(x) for x in ids}) > 1:
                raise ValueError('BertTokenizer: texts have different lengths; use padding=True for tensors')
            return Encoding(input_ids=torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
                            attention_mask=torch.tensor(masks, dtype=torch.long).reshape(len(ids), -1))
        if return_tensors is not None:
            raise ValueError(f"BertTokenizer: return_tensors must be 'pt' or None, got {return_tensors!r}")
        if single:
            return Encoding(input_ids=ids[0], attention_mask=masks[0])
        return Encoding(input_ids=ids, attention_mask=masks)
