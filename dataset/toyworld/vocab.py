"""The toy world's BERT WordPiece vocabulary: every word the templates can say, plus the tokens that keep any
text free of [UNK], and the check that a written text stays inside it."""
from __future__ import annotations

# Every word the templates can produce. Fixed (seed-independent) so the vocabulary size is a constant; the
# generator checks every text it writes against it.
WORDS = (
    'a', 'altogether', 'an', 'and', 'any', 'appears', 'are', 'background', 'ball', 'big', 'blue', 'both', 'box',
    'but', 'can', 'circle', 'circles', 'color', 'colored', 'colour', 'containing', 'contain', 'contains',
    'diamond', 'diamonds', 'does', 'each', 'eight', 'either', 'equally', 'exactly', 'five', 'four', 'from',
    'fewer', 'green', 'has', 'have', 'how', 'image', 'images', 'in', 'including', 'is', 'just', 'large',
    'left', 'leftmost', 'little', 'lone', 'many', 'more', 'neither', 'no', 'none', 'nope', 'not',
    'number', 'object', 'objects', 'of', 'on', 'one', 'only', 'or', 'orange', 'other', 'picture', 'plain',
    'purple', 'pyramid', 'rectangle', 'red', 'rhombus', 'right', 'rightmost', 'round', 'same', 'scene', 'see',
    'seven', 'shape', 'shapes', 'showing', 'shows', 'single', 'six', 'size', 'small', 'square',
    'squares', 'than', 'the', 'there', 'three', 'tiny', 'to', 'together', 'total', 'triangle', 'triangles',
    'two', 'violet', 'visible', 'what', 'which', 'with', 'yeah', 'yellow', 'yes', 'you', 'zero',
)
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
# BERT's basic tokenizer splits punctuation into single tokens; keeping them (and single characters plus their
# ## continuations) in the vocabulary means any text, even words outside the world, avoids [UNK].
PUNCTUATION = tuple('.,?!\'"-:;()/')
CHARACTERS = tuple('abcdefghijklmnopqrstuvwxyz0123456789')


def build_vocab() -> list[str]:
    """The fixed vocabulary, in file order (ids = line numbers): specials, punctuation, characters, words."""
    tokens = list(SPECIAL_TOKENS) + list(PUNCTUATION) + list(CHARACTERS) + ['##' + c for c in CHARACTERS]
    seen = set(tokens)
    for w in WORDS:
        if w not in seen:  # single-letter words ('a') are already there as characters
            tokens.append(w)
            seen.add(w)
    return tokens


VOCAB = build_vocab()
VOCAB_SIZE = len(VOCAB)
_VOCAB_SET = frozenset(VOCAB)


def text_words(text: str) -> list[str]:
    """Words as BERT's basic tokenizer sees them (lower-cased, punctuation split off)."""
    out = []
    for w in text.lower().split():
        cur = ''
        for ch in w:
            if ch in PUNCTUATION:
                if cur:
                    out.append(cur)
                out.append(ch)
                cur = ''
            else:
                cur += ch
        if cur:
            out.append(cur)
    return out


def check_vocab(texts, where: str) -> None:
    """Raise if any word of the texts is missing from the vocabulary (a template bug)."""
    for t in texts:
        for w in text_words(t):
            if w not in _VOCAB_SET:  # a template bug, not a user error
                raise RuntimeError(f'{where}: word {w!r} of {t!r} is missing from the toy vocabulary')

