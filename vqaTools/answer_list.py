"""Build a VQA candidate answer list (the `answer_list` file of configs/VQA.yaml) from training annotations.

    python -m vqaTools.answer_list --train data/vqa_train.json data/vqa_val.json --top-n 3128 --out answer_list.json

The counting lives in `vqaTools.vqa.build_answer_list` (this module is the discoverable entry point and delegates to
`vqaTools.vqa.main`; both commands are the same): every human answer of ALBEF-format files (items whose 'answer' is
a list, vqa_train.json / vg_qa.json) or official annotation files counts once, most frequent first, ties
alphabetical, answers taken as written.

Caveat: the answer_list.json released with ALBEF (3,128 answers) cannot be rebuilt exactly from the VQA v2 counts;
it was inherited from earlier work whose selection rules (answer normalisation, frequency threshold, splits) are
not published. This tool gives a list of the same kind, not the same list, so use the released file to reproduce
the paper's numbers.
"""
from vqaTools.vqa import build_answer_list, main

__all__ = ['build_answer_list', 'main']

if __name__ == '__main__':
    raise SystemExit(main())
