"""The VQA stand-in's world: box features, vocabulary and answers for the synthetic scenes.

LXMERT reads one feature vector per box and the box positions.  The
published models take them from a Faster R-CNN; the stand-in uses a fixed,
documented extractor (version :data:`FEATURE_VERSION`) on the scenes of
``data/scenes.py``:

* boxes: every object's box (its visible mask's extent), plus
  ``background_boxes`` random boxes of the background (a scene's own
  generator, stream 2), in a shuffled order; at most :data:`MAX_BOXES`;
* per box, :data:`FEATURE_DIM` values: the crop as 16x16 grey (256) and
  4x4 RGB (48) thumbnails in [0, 1] (``cv2.INTER_AREA``), its mean RGB (3),
  the colour of its most vivid quarter of pixels (HSV saturation): hue as
  (cos, sin) times mean saturation, mean saturation, mean value (4), and the
  box's width, height and area relative to the picture (3);
* positions: (x0 / W, y0 / H, x1 / W, y1 / H), as LXMERT expects.

Questions are tokenised by a word-level BERT tokenizer over the templates'
vocabulary (:func:`build_tokenizer`; the vocabulary is passed as a dict —
transformers 5 silently drops a ``vocab_file`` — and checked); answers are
the :data:`ANSWERS` classes.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from data.scenes import CLASS_NAMES, COLOUR_NAMES, NUMBER_WORDS, PLURALS, Scene, scene_rng, word_tokenizer

__all__ = ["FEATURE_VERSION", "FEATURE_DIM", "MAX_BOXES", "ANSWERS", "VOCAB_WORDS", "box_features",
           "scene_boxes", "build_tokenizer", "encode_questions"]

FEATURE_VERSION = 1
MAX_BOXES = 6
FEATURE_DIM = 256 + 48 + 3 + 4 + 3
ANSWERS: Tuple[str, ...] = ("yes", "no", "0", "1", "2", "3", "4") + tuple(COLOUR_NAMES) + tuple(CLASS_NAMES)
_TEMPLATE_WORDS = ("is", "there", "a", "an", "how", "many", "are", "what", "colour", "shape", "the", "object",
                   "objects", "left", "right", "of", "above", "below", "large", "small", "?")
VOCAB_WORDS: Tuple[str, ...] = tuple(dict.fromkeys(
    _TEMPLATE_WORDS + tuple(COLOUR_NAMES) + tuple(CLASS_NAMES)
    + tuple(PLURALS.get(c, c + "s") for c in CLASS_NAMES) + tuple(NUMBER_WORDS)))


def box_features(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """(FEATURE_DIM,) float32 features of one box ``(x0, y0, x1, y1)`` of an RGB uint8 picture."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    crop = image[y0:y1, x0:x1]
    rgb = crop.astype(np.float32) / 255.0
    grey = cv2.resize(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), (16, 16), interpolation=cv2.INTER_AREA) / 255.0
    small = cv2.resize(crop, (4, 4), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3).astype(np.float32) / 255.0
    sat = hsv[:, 1]
    k = max(1, len(sat) // 4)
    vivid = hsv[np.argsort(-sat, kind="stable")[:k]]
    angle = 2 * math.pi * vivid[:, 0]
    s_mean = float(vivid[:, 1].mean())
    colour = [float(np.cos(angle).mean()) * s_mean, float(np.sin(angle).mean()) * s_mean, s_mean,
              float(vivid[:, 2].mean())]
    geometry = [(x1 - x0) / W, (y1 - y0) / H, (x1 - x0) * (y1 - y0) / (W * H)]
    out = np.concatenate([grey.reshape(-1), small.reshape(-1), rgb.reshape(-1, 3).mean(axis=0), colour, geometry])
    return out.astype(np.float32)


def scene_boxes(scene: Scene, background_boxes: int = 2) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """Features (n, FEATURE_DIM), normalised positions (n, 4) and, per box, the
    object id it shows (-1 for background) of a scene, n <= MAX_BOXES."""
    H, W = scene.image.shape[:2]
    rng = scene_rng(scene.seed, scene.split, scene.index, stream=2)
    boxes = [(list(o.box), o.id) for o in scene.objects]
    for _ in range(min(background_boxes, MAX_BOXES - len(boxes))):
        w, h = int(rng.integers(W // 8, W // 3)), int(rng.integers(H // 8, H // 3))
        x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
        boxes.append(([x, y, x + w, y + h], -1))
    order = rng.permutation(len(boxes))
    boxes = [boxes[i] for i in order]
    feats = np.stack([box_features(scene.image, b) for b, _ in boxes])
    pos = np.asarray([[b[0] / W, b[1] / H, b[2] / W, b[3] / H] for b, _ in boxes], np.float32)
    return feats, pos, [obj for _, obj in boxes]


def build_tokenizer():
    """A word-level ``BertTokenizerFast`` over :data:`VOCAB_WORDS` (lower case)."""
    return word_tokenizer(VOCAB_WORDS)


def encode_questions(tokenizer, questions: Sequence[str], max_length: int = 16) -> Dict[str, np.ndarray]:
    """input_ids / attention_mask / token_type_ids (n, max_length), right-padded."""
    enc = tokenizer(list(questions), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
