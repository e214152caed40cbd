"""VQA accuracy exactly as ALBEF's copy of the VQA evaluator computes it, quirks included.

The quirks are reproduced on purpose (they define the numbers ALBEF-era results were reported with):

* the prediction is ALWAYS normalised (whitespace, punctuation, lower-case, number words none/zero..ten -> digits,
  articles dropped, contractions), unlike the official evaluator, which does so only when the humans disagree;
* the human answers are only punctuation-processed, and only when the answers of a question are not all
  identical; they are never lower-cased, digit-mapped, article-stripped or stripped of spaces;
* at most 32 periods are removed per answer (the original passed `re.UNICODE`, i.e. 32, as the `count`
  argument of `re.sub`);
* the contraction table is looked up after lower-casing, so its capitalised keys (Im, Ive, Id've, I'dve) never
  match; a period is removed when it is not followed by a digit (the intended "not preceded by a digit" check is
  a mistyped lookahead that never blocks);
* a human answer record is compared with the *other* records by dict inequality.

One deliberate difference: the original rewrote the ground-truth answers of the VQA object in place; here the
processed answers are computed on copies (`self.gtAnswersCompared` keeps them), so the VQA object is unchanged
and evaluating twice gives the same numbers. A single evaluation gives results identical to the original's.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Iterable

__all__ = ['VQAEval', 'CONTRACTIONS', 'MANUAL_MAP', 'ARTICLES', 'PUNCT']

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5', 'six': '6',
              'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = ('a', 'an', 'the')
PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!')
# The original pattern is "(?!<=\d)(\.)(?!\d)": its first group is a negative *lookahead* for the text "<=" plus a
# digit, which can never match where a '.' starts, so the pattern is exactly "a period not followed by a digit".
_PERIOD_STRIP = re.compile(r'\.(?!\d)')
_COMMA_STRIP = re.compile(r'(\d)(,)(\d)')
_PERIOD_STRIP_COUNT = 32  # the original passed re.UNICODE (== 32) as re.sub's `count`


class VQAEval:
    """VQA accuracy of `vqaRes` (from `vqa.loadRes`) against `vqa`, stored with `n` decimals.

    After `evaluate()`: `accuracy` {'overall', 'perQuestionType', 'perAnswerType'} (percent),
    `evalQA` {question_id: percent}, `evalQuesType` {type: {question_id: percent}}, `evalAnsType` likewise, and
    (additions) `predNormalised` {question_id: normalised prediction}, `gtAnswersCompared` {question_id: [human
    answers as compared]}.
    """

    def __init__(self, vqa: Any = None, vqaRes: Any = None, n: int = 2, verbose: bool = False):
        self.n = n
        self.verbose = verbose
        self.accuracy: dict = {}
        self.evalQA: dict = {}
        self.evalQuesType: dict = {}
        self.evalAnsType: dict = {}
        self.predNormalised: dict = {}
        self.gtAnswersCompared: dict = {}
        self.vqa = vqa
        self.vqaRes = vqaRes
        self.params = {'question_id': vqa.getQuesIds()} if vqa is not None else {}
        self.contractions = dict(CONTRACTIONS)
        self.manualMap = dict(MANUAL_MAP)
        self.articles = list(ARTICLES)
        self.punct = list(PUNCT)
        self.periodStrip = _PERIOD_STRIP
        self.commaStrip = _COMMA_STRIP

    # ------------------------------------------------------------------------------------------------------------
    def processPunctuation(self, inText: str) -> str:
        """Per punctuation mark (in PUNCT order): delete it if it touches a space or the text has a digit-comma-
        digit anywhere (tests on the input text), else turn it into a space; then drop up to 32 periods that are
        not followed by a digit."""
        outText = inText
        has_digit_comma = self.commaStrip.search(inText) is not None
        for p in self.punct:
            if (p + ' ' in inText or ' ' + p in inText) or has_digit_comma:
                outText = outText.replace(p, '')
            else:
                outText = outText.replace(p, ' ')
        return self.periodStrip.sub('', outText, count=_PERIOD_STRIP_COUNT)

    def processDigitArticle(self, inText: str) -> str:
        """Lower-case, split on whitespace, map number words none/zero..ten to digits, drop articles, expand
        contractions (keys compared as they are, after lower-casing), join with single spaces."""
        words = []
        for word in inText.lower().split():
            word = self.manualMap.get(word, word)
            if word not in self.articles:
                words.append(word)
        return ' '.join(self.contractions.get(w, w) for w in words)

    # ------------------------------------------------------------------------------------------------------------
    def evaluate(self, quesIds: Iterable | None = None) -> None:
        """Score every question of `quesIds` (default: all ground-truth questions, annotation order)."""
        if quesIds is None:
            quesIds = list(self.params['question_id'])
        else:
            quesIds = list(quesIds)
        missing = [q for q in quesIds if q not in self.vqaRes.qa]
        if missing:
            raise KeyError(f'VQAEval: no result for question ids {missing[:10]}'
                           + (f' (+{len(missing) - 10} more)' if len(missing) > 10 else ''))
        accQA: list[float] = []
        accQuesType: dict = {}
        accAnsType: dict = {}
        if self.verbose:
            print('computing accuracy')
        for step, quesId in enumerate(quesIds):
            gt = self.vqa.qa[quesId]
            resAns = self.vqaRes.qa[quesId]['answer']
            resAns = resAns.replace('\n', ' ').replace('\t', ' ').strip()
            resAns = self.processDigitArticle(self.processPunctuation(resAns))

            # copies of the answer records: the original processed them in place
            records = [dict(a) for a in gt['answers']]
            if len({a['answer'] for a in records}) > 1:
                for a in records:
                    a['answer'] = self.processPunctuation(a['answer'])
            gtAcc = []
            for record in records:
                others = [item for item in records if item != record]
                matches = [item for item in others if item['answer'] == resAns]
                gtAcc.append(min(1, float(len(matches)) / 3))
            avgGTAcc = float(sum(gtAcc)) / len(gtAcc)

            quesType, ansType = gt['question_type'], gt['answer_type']
            accQA.append(avgGTAcc)
            accQuesType.setdefault(quesType, []).append(avgGTAcc)
            accAnsType.setdefault(ansType, []).append(avgGTAcc)
            self.setEvalQA(quesId, avgGTAcc)
            self.setEvalQuesType(quesId, quesType, avgGTAcc)
            self.setEvalAnsType(quesId, ansType, avgGTAcc)
            self.predNormalised[quesId] = resAns
            self.gtAnswersCompared[quesId] = [a['answer'] for a in records]
            if self.verbose and step % 100 == 0:
                self.updateProgress(step / float(len(quesIds)))
        self.setAccuracy(accQA, accQuesType, accAnsType)
        if self.verbose:
            print('Done computing accuracy')

    # ------------------------------------------------------------------------------------------------------------
    def setAccuracy(self, accQA: list, accQuesType: dict, accAnsType: dict) -> None:
        """Overall / per question type / per answer type means, in percent, rounded to n decimals."""
        if not accQA:
            raise ValueError('VQAEval: no questions to evaluate')
        self.accuracy['overall'] = round(100 * float(sum(accQA)) / len(accQA), self.n)
        self.accuracy['perQuestionType'] = {t: round(100 * float(sum(v)) / len(v), self.n)
                                            for t, v in accQuesType.items()}
        self.accuracy['perAnswerType'] = {t: round(100 * float(sum(v)) / len(v), self.n)
                                          for t, v in accAnsType.items()}

    def setEvalQA(self, quesId: Any, acc: float) -> None:
        self.evalQA[quesId] = round(100 * acc, self.n)

    def setEvalQuesType(self, quesId: Any, quesType: str, acc: float) -> None:
        self.evalQuesType.setdefault(quesType, {})[quesId] = round(100 * acc, self.n)

    def setEvalAnsType(self, quesId: Any, ansType: str, acc: float) -> None:
        self.evalAnsType.setdefault(ansType, {})[quesId] = round(100 * acc, self.n)

    def updateProgress(self, progress: float) -> None:
        """A one-line text progress bar on stdout."""
        bar_length = 20
        progress = min(max(float(progress), 0.0), 1.0)
        block = int(round(bar_length * progress))
        status = 'Done...\r\n' if progress >= 1 else ''
        sys.stdout.write(f"\rFinished Percent: [{'#' * block + '-' * (bar_length - block)}] "
                         f"{int(progress * 100)}% {status}")
        sys.stdout.flush()
