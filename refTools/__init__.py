"""Referring-expression datasets: `refTools.refer.REFER` (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF annotation index,
used by Grounding.py) and its `ReferError`.

Caption metrics are deliberately not shipped. The original repository bundled `refTools/evaluation` (a modified
coco-caption: PTB tokenizer and METEOR via Java jars, BLEU, ROUGE-L, CIDEr, and `RefEvaluation`), but ALBEF only
imports `RefEvaluation` and never uses it: ALBEF does referring-expression *comprehension* (boxes), not
generation. Should generated expressions ever need scoring, the `pycocoevalcap` package on PyPI provides the same
metrics (it needs Java for the tokenizer and METEOR).
"""
from refTools.refer import DATASETS, REFER, ReferError

__all__ = ['REFER', 'ReferError', 'DATASETS']
