"""A synthetic "toy world" in the exact annotation formats of every ALBEF task.

`python -m dataset.toyworld --out data/toyworld --seed 0` draws small RGB images with 1-4 non-overlapping flat
objects (4 shapes x 6 colours x 2 sizes, random background tint, pixel noise) and writes, for the same images,
the annotation files of pretraining, TA (text-assignment) pretraining, retrieval, VQA, NLVR2, SNLI-VE and
RefCOCO+ grounding, a BERT WordPiece `vocab/vocab.txt` that covers every word, `world.json` (ground truth) and
`manifest.json` (generation arguments + file hashes). All text comes from templates over the ground truth, so
every statement is decidable from the pixels (or, for SNLI-VE "neutral", provably not decidable, see below).

Layout under --out (image paths are relative to `<out>/images` except in the two pretraining files, whose
`image` is os.path.join(out, 'images', file) exactly as --out was spelled, because pretraining opens paths as is):

    images/toy_000000.jpg ...      RGB JPEG, quality 95, --image-size square
    vocab/vocab.txt                [PAD] [UNK] [CLS] [SEP] [MASK], punctuation, characters, ##characters, words
    pretrain.json                  [{image, caption: [captions]}]                  (train images)
    nlvr_pretrain.json             [{image, caption: str}]                         (train images)
    retrieval_train.json           [{image, caption: str, image_id: int}]          (one item per caption)
    retrieval_{val,test}.json      [{image, caption: [captions]}]
    vqa_train.json                 [{question_id, question, answer: [10 human answers], image, dataset: 'vqa'}]
    vqa_test.json                  same fields (the answers are kept so the toy can be scored offline)
    answer_list.json               every answer string of train and test (most frequent first)
    vqa_test_questions.json        official VQA API question file of the test split
    vqa_test_annotations.json      official VQA API annotation file of the test split
    nlvr_{train,dev,test}.json     [{images: [file0, file1], sentence, label: 'True'|'False'}]
    ve_{train,dev,test}.json       [{image: id without extension, sentence, label}]
    refcoco+_train.json            [{image, text}]                                 (one item per sentence)
    refcoco+_{val,test}.json       [{image, text, ref_id}]                         (test = testA + testB)
    refcoco+/refs(unc).p           REFER refs (pickle protocol 2)
    refcoco+/instances.json        COCO-style images / annotations / categories
    refcoco+/dets.json             {str(image_id): [[x, y, w, h], ...]} proposals
    refcoco+/cocos.json            {str(image_id): [[x, y, w, h, category_id], ...]} ground-truth boxes
    world.json                     per image: image_id, file, split, size, background, objects[shape, colour, size, box]
    manifest.json                  generator arguments, counts, sha256 of every annotation file

Splits. Images are drawn once and split into disjoint pools train / val / test (--train-images, --val-images,
--test-images). Pretraining, retrieval-train, VQA-train, NLVR-train, VE-train and RefCOCO+-train use only train
images; the val pool feeds retrieval-val, NLVR-dev, VE-dev and RefCOCO+ val; the test pool feeds retrieval-test,
VQA-test, NLVR-test, VE-test and RefCOCO+ testA/testB.

Task design (all geometry uses box centres; object centres differ by >= 10% of the width, so left/right is clear):
  * VQA: colour / shape / size of a uniquely described object, counts (0-4), existence (yes/no balanced),
    left/right (yes/no balanced, or 'left'/'right'). Ten human answers per question: 6-10 correct, the rest
    synonyms ('violet', 'two', 'large', 'yeah', ...) or wrong answers of the same type, so answer weights matter.
  * NLVR2: 9 statement templates about an image pair (counts per image, both/neither/only, more/same, totals,
    relations, leftmost object). For every template the True/False labels are balanced.
  * SNLI-VE: every hypothesis predicates something of a definite description ("the big circle is red",
    "the red square is to the left of the blue triangle", "the purple object is the leftmost object").
    entailment = the described object(s) exist uniquely and the claim holds; contradiction = they exist and the
    claim is false; neutral = a described object is NOT in the image, so the claim about it can be neither
    verified nor refuted. Claimed values are drawn independently of the label, so the text alone cannot tell the
    label; the image decides it. Labels are balanced (one of each per image at the default 3 per image).
  * RefCOCO+: each ref names one object uniquely, by attributes ("red circle", "the big square") or by position
    among look-alikes ("the leftmost triangle", "blue square on the right"). Category = shape. Split of a ref:
    train / val by image pool; in the test pool testA = refs to BIG objects, testB = refs to SMALL objects (the
    small ones are harder to localise, mirroring RefCOCO+'s easier testA / harder testB).
    dets.json holds every object box plus, per object, jittered distractors (IoU < 0.5 with every object) and a
    random background box, shuffled; every box lies inside the image.

Determinism: every image and every task's text comes from its own numpy Generator seeded by (seed, task, index),
JSON is written in a fixed key order, no time stamps: the same arguments give byte-identical files. Changing a
text flag (e.g. --vqa-per-image) leaves the images and the other tasks unchanged.

Safety: the world is written into a temporary sibling folder and renamed into place at the end. An --out that
holds something else is refused with a one-line error (exit code 2) and left untouched: a folder that is not a toy
world, or a toy world made with different arguments (unless --force, which replaces a toy world only). The same
arguments reuse the existing world (after checking the file hashes) unless --force.

Modules: `scene` (the things and their sampling), `render` (pixels), `vocab` (the WordPiece vocabulary), `text`
(shared phrasing), `captions` / `vqa` / `nlvr` / `snli_ve` / `refcoco` (each task's templates), `streams` (the
per-task random streams), `writers` (one writer per annotation format), `world` (generation, manifest, reading
back), `analysis` (question / statement kinds, retrieval and grounding bounds), `cli` (the command line) and
`supervised_vit` (the image tower trained on the world's labels, `python -m dataset.toyworld.supervised_vit`).
This package re-exports the names callers use.
"""
from dataset.toyworld.analysis import (NLVR_STATEMENT_KINDS, VQA_QUESTION_KINDS, grounding_match_bound, names_a_side,
                                       nlvr_statement_kind, retrieval_ceiling, vqa_question_kind)
from dataset.toyworld.cli import build_parser, main
from dataset.toyworld.nlvr import NLVR_TEMPLATES
from dataset.toyworld.scene import (ATTRS, CATEGORY_ID, COLOUR_NAMES, COLOURS, POOLS, SHAPES, SIZES, Desc, Obj)
from dataset.toyworld.snli_ve import VE_LABELS
from dataset.toyworld.text import NUMBER_WORDS, SIDE_WORDS, SIZE_WORDS
from dataset.toyworld.vocab import VOCAB, VOCAB_SIZE, WORDS, build_vocab
from dataset.toyworld.world import (ANNOTATION_FILES, DEFAULTS, FORMAT_VERSION, GENERATOR, ToyWorldError,
                                    format_summary, generate, read_manifest, read_world)

__all__ = [
    'ANNOTATION_FILES', 'ATTRS', 'CATEGORY_ID', 'COLOURS', 'COLOUR_NAMES', 'DEFAULTS', 'Desc', 'FORMAT_VERSION',
    'GENERATOR', 'NLVR_STATEMENT_KINDS', 'NLVR_TEMPLATES', 'NUMBER_WORDS', 'Obj', 'POOLS', 'SHAPES', 'SIDE_WORDS',
    'SIZES', 'SIZE_WORDS', 'ToyWorldError', 'VE_LABELS', 'VOCAB', 'VOCAB_SIZE', 'VQA_QUESTION_KINDS', 'WORDS',
    'build_parser', 'build_vocab', 'format_summary', 'generate', 'grounding_match_bound', 'main', 'names_a_side',
    'nlvr_statement_kind', 'read_manifest', 'read_world', 'retrieval_ceiling', 'vqa_question_kind',
]
