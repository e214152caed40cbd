"""ALBEF's tokenizer behaviour on top of transformers' fast BERT tokenizer.

The original encodes a single text as "[CLS] pieces" with **no trailing [SEP]**; truncation keeps at most
max_length - 1 word pieces. Both come from the fast tokenizer itself, given a `tokenizers` post-processor whose
template is "[CLS] $A" (truncation leaves room for the special tokens the template adds).
`BertTokenizer(add_sep=True)` gives the standard "[CLS] pieces [SEP]" instead.
A literal "[SEP]" inside a string is one token (special tokens are never split by the fast tokenizer), so VQA
answers ending in "[SEP]" get their end token that way. Every id comes from the loaded vocabulary.
"""
import torch
from tokenizers.processors import TemplateProcessing
from transformers import BertTokenizerFast

from utils import UserError

PADDING = (True, False, None, 'longest', 'max_length', 'do_not_pad')


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
    """Callable wrapper around transformers.BertTokenizerFast with ALBEF's single-sequence format.

    The wrapped tokenizer's post-processor is replaced, so its own `encode` / `__call__` also give that format.
    """

    def __init__(self, hf_tokenizer, add_sep=False):
        self.hf = hf_tokenizer
        self.add_sep = add_sep
        cls_token, sep_token = hf_tokenizer.cls_token, hf_tokenizer.sep_token
        special = [(cls_token, hf_tokenizer.cls_token_id)]
        if add_sep:
            special.append((sep_token, hf_tokenizer.sep_token_id))
        hf_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f'{cls_token} $A {sep_token}' if add_sep else f'{cls_token} $A', special_tokens=special)

    @classmethod
    def from_pretrained(cls, name_or_folder, add_sep=False, **kwargs):
        """Load a hub name or a folder containing vocab.txt (or tokenizer.json).

        Raises UserError (one line) when nothing can be loaded, and when what loads has no vocabulary beyond the
        special tokens (transformers builds such an empty tokenizer for some misspelled names), which would
        otherwise train on [UNK] alone.
        """
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
        if padding not in PADDING:
            raise ValueError(f'BertTokenizer: unknown padding {padding!r}')
        if return_tensors not in (None, 'pt'):
            raise ValueError(f"BertTokenizer: return_tensors must be 'pt' or None, got {return_tensors!r}")
        if not isinstance(text, str):
            text = list(text)
            if not text:
                return Encoding(input_ids=[], attention_mask=[])
        do_truncate = truncation not in (False, None, 'do_not_truncate')
        # transformers would truncate to max_length without truncation=True (the original does not), and warns
        # when max_length comes without a use: pass it only where it applies.
        if not do_truncate and padding != 'max_length':
            max_length = None
        elif do_truncate and max_length is not None:
            # Below the number of special tokens transformers leaves the text whole; the original keeps no piece,
            # which is the same as truncating to exactly the special tokens (and pads to no more than that).
            max_length = max(max_length, 2 if self.add_sep else 1)
        enc = self.hf(text, padding=padding or False, truncation=do_truncate, max_length=max_length,
                      return_tensors=return_tensors, return_token_type_ids=False)
        return Encoding(input_ids=enc['input_ids'], attention_mask=enc['attention_mask'])
