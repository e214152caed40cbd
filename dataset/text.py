"""Text as the original feeds it to BERT: caption and question normalisation, and the check that a text has
something visible left to read."""
from __future__ import annotations

import re
import unicodedata
from typing import Callable

from dataset.errors import DataError, brief

# Characters that draw nothing (or that the tokenizer drops) although their category is a letter or a symbol.
# U+FFFD (the replacement character of a decoding error) is dropped by the BERT tokenizer.
_BLANK_LETTERS = frozenset('\u115f\u1160\u3164\uffa0\u2800\u180e\ufffd')
_INVISIBLE_CATEGORIES = frozenset(('Cc', 'Cf', 'Cs', 'Co', 'Cn', 'Zs', 'Zl', 'Zp', 'Mn', 'Me'))
_ASCII_ALNUM = re.compile(r'[0-9A-Za-z]')


def has_visible_text(text: str, normalise: Callable[[str], str] = None) -> bool:
    """Whether `text` (after `normalise`, default pre_caption without truncation) keeps a visible character.

    Empty strings, whitespace, punctuation that normalisation deletes, and format or control characters alone
    (zero-width space U+200B, joiners, BOM, soft hyphen, combining marks without a base, Hangul fillers) give an
    empty input to the text encoder: MLM has nothing to mask and every loss on it is meaningless (NaN when a whole
    batch is like that).
    """
    if _ASCII_ALNUM.search(text):  # fast path: letters and digits survive normalisation
        return True
    normalised = (normalise or (lambda t: pre_caption(t, max_words=1 << 30)))(text)
    return any(not ch.isspace() and ch not in _BLANK_LETTERS and unicodedata.category(ch) not in _INVISIBLE_CATEGORIES
               for ch in normalised)


def check_visible_text(value, key: str, where: str, normalise: Callable[[str], str] = None) -> None:
    """DataError naming the item and key when the text (or an entry of a list of texts) has no visible character."""
    texts = value if isinstance(value, list) else [value]
    for j, text in enumerate(texts):
        if isinstance(text, str) and not has_visible_text(text, normalise):
            entry = f' entry {j}' if isinstance(value, list) else ''
            raise DataError(f'{where}: key {key!r}{entry} is empty (no visible characters after normalisation: '
                            f'{brief(text, 40)})')


# Characters removed outright by both cleaners.
_DELETE_TABLE = str.maketrans('', '', ',.\'!?"()*#:;~')
# '-' and '/' become spaces (applied after deletion, so '--' becomes two spaces).
_SPACE_TABLE = str.maketrans({'-': ' ', '/': ' '})
_MULTI_WS = re.compile(r'\s{2,}')


def _truncate_words(text: str, max_words: int) -> str:
    # Split on the single space character (not str.split()): consecutive spaces yield empty "words" that count
    # toward the limit, exactly like the original.
    words = text.split(' ')
    if len(words) > max_words:
        return ' '.join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Normalise a caption: lower-case, drop punctuation, collapse whitespace runs, keep at most `max_words` words.

    Order (as in the original): lower; delete , . ' ! ? " ( ) * # : ; ~; '-' and '/' -> space, '<person>' -> 'person';
    runs of >= 2 whitespace characters -> one space (a single tab/newline survives); strip trailing newlines then
    leading/trailing spaces; truncate on single spaces.
    """
    if not isinstance(caption, str):
        raise TypeError(f'pre_caption expects a str, got {type(caption).__name__}')
    text = caption.lower().translate(_DELETE_TABLE).translate(_SPACE_TABLE).replace('<person>', 'person')
    text = _MULTI_WS.sub(' ', text)
    text = text.rstrip('\n').strip(' ')
    return _truncate_words(text, max_words)


def pre_question(question: str, max_ques_words: int = 50) -> str:
    """Normalise a VQA question: like `pre_caption` but without '<person>', whitespace collapsing or left strip.

    Only trailing spaces are removed; tabs/newlines and inner space runs survive (and count as empty words for
    the truncation).
    """
    if not isinstance(question, str):
        raise TypeError(f'pre_question expects a str, got {type(question).__name__}')
    text = question.lower().translate(_DELETE_TABLE).translate(_SPACE_TABLE)
    text = text.rstrip(' ')
    return _truncate_words(text, max_ques_words)
