"""The data helpers under the module name the original's code and habits use (`dataset.utils.pre_caption`, ...).

Each lives in the module of its concern: `dataset.errors` (DataError), `dataset.text` (caption and question
normalisation), `dataset.annotations` (annotation files, the packed store), `dataset.images` (image paths,
decoding, the bad-image policy). Grounding's box scoring is evaluation: `evaluation.grounding_boxes`.
"""
from dataset.annotations import (Annotations, as_file_list, check_items, is_shard_spec, load_annotations,  # noqa: F401
                                 load_answer_list, pack_items, read_json_file)
from dataset.errors import DataError, brief, check_regular_file  # noqa: F401
from dataset.images import (ImageDatasetBase, decode_image_rgb, open_image_rgb, resolve_image_path)  # noqa: F401
from dataset.text import check_visible_text, has_visible_text, pre_caption, pre_question  # noqa: F401
