"""Synthetic multi-object scenes with exact ground truth, in the real formats.

A scene holds 1-4 objects: the eight shapes of :mod:`data.synthetic`
(:data:`CLASS_NAMES`), each painted in one of :data:`COLOURS` (a fixed
palette of named colours), of a named size (:data:`SIZES`), rotated and
placed at random, over the same textured, cluttered backgrounds as
:mod:`data.synthetic` (its shape rasteriser and background code are
imported, not copied).  Objects are composited in order (object 0 at the
bottom), so a later object may occlude an earlier one; an object's instance
mask is its **visible** pixels, exact by construction (a pixel belongs to
the topmost object whose shape covers it), and its ``occlusion`` is the
share of its shape that later objects hide.  Boxes are the visible mask's
extent.

Generation is deterministic: scene ``index`` of ``split`` under ``seed``
(and a :class:`SceneConfig`) depends on those values only, so any subset can
be made alone, in any order, in any process.  Questions
(:func:`scene_questions`) use their own generator, so changing them never
changes the pictures.

Ground truth for explanations: every :class:`Question` carries its answer,
its tokens, the indices of the tokens the answer depends on, and the ids of
the objects it depends on (the objects matching the query: empty for a "no"
existence answer or a count of 0).

Writers, in the formats the evaluation scripts read::

    <out>/<split>/000000.png ...                              pictures (RGB PNG)
    <out>/annotations/instances_<split>.json                  COCO instances (RLE or polygon masks)
    <out>/annotations/captions_<split>.json                   COCO captions
    <out>/annotations/v2_OpenEnded_scenes_<split>_questions.json   VQA v2 questions
    <out>/annotations/v2_scenes_<split>_annotations.json      VQA v2 annotations
    <out>/imagefolder_<split>/<class>/000000.png               ImageFolder (folder = largest object's class)
    <out>/<split>_gtsegs.mat                                   gtsegs_ijcv.mat layout (union of the objects)
    <out>/<split>_scenes.json                                  every object, question and caption

Command line::

    python data/scenes.py --out-dir outputs/scenes --split val --count 200 --seed 0
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data.synthetic import CLASS_NAMES, NUM_CLASSES, shape_mask
from modules.cli import (CLIError, atomic_write_text, check_memory, check_output_dir, file_lock, int_range,
                         prepare_run_folder)
from data.synthetic import _background, _clutter, _placed, _smooth_noise, _to_uint8, _unit_area  # shared drawing code

__all__ = [
    "CLASS_NAMES", "NUM_CLASSES", "COLOURS", "COLOUR_NAMES", "SIZES", "SCENE_VERSION", "SceneConfig",
    "SceneObject", "Scene", "Question", "scene_rng", "generate_scene", "scene_questions", "scene_caption",
    "relation_holds", "join_phrases", "word_tokenizer", "coco_dict", "vqa_dicts", "captions_dict", "write_images", "write_coco",
    "write_vqa", "write_captions", "write_imagefolder", "write_gtsegs_mat", "write_scenes_json",
    "write_dataset", "SceneDataset", "build_parser", "main",
]

SCENE_VERSION = 1
"""Bumped whenever the scenes a (seed, split, index, config) gives change."""

COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.92, 0.10),
    "green": (0.15, 0.80, 0.20),
    "cyan": (0.10, 0.85, 0.92),
    "blue": (0.18, 0.32, 1.00),
    "purple": (0.65, 0.22, 0.95),
    "white": (0.97, 0.97, 0.97),
}
"""The palette: colour name -> RGB in [0, 1] (shaded by at most -20% when painted)."""
COLOUR_NAMES: Tuple[str, ...] = tuple(COLOURS)

SIZES: Dict[str, Tuple[float, float]] = {"small": (0.06, 0.10), "large": (0.12, 0.20)}
"""Size name -> range of the object's shape area as a fraction of the picture."""

PLURALS: Dict[str, str] = {"cross": "crosses"}
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_MARGIN = 4.0
"""Pixels between two objects' mask centroids (along the axis) below which no relation is asked."""
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


# --------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn (part of their identity with seed, split and index).

    Attributes
    ----------
    size: picture side in pixels.
    min_objects, max_objects: number of objects, uniform in this range.
    distinct_classes: every object of a scene has a different shape class.
    separated: objects never overlap and keep ``gap`` pixels apart.
    gap: minimum distance in pixels between separated objects.
    max_occlusion: largest share of an object's shape that later objects
        may hide (when not ``separated``).
    min_visible: fewest visible pixels an object keeps.
    """

    size: int = 96
    min_objects: int = 1
    max_objects: int = 4
    distinct_classes: bool = False
    separated: bool = False
    gap: int = 2
    max_occlusion: float = 0.4
    min_visible: int = 40

    def validate(self) -> "SceneConfig":
        """Raise ValueError (one line) on an impossible configuration."""
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}..{self.max_objects}")
        if self.distinct_classes and self.max_objects > NUM_CLASSES:
            raise ValueError("more objects than classes with distinct_classes")
        if not 0.0 <= self.max_occlusion < 1.0:
            raise ValueError(f"max_occlusion must be in [0, 1), got {self.max_occlusion}")
        if self.gap < 0 or self.min_visible < 1:
            raise ValueError("gap must be >= 0 and min_visible >= 1")
        return self


@dataclass
class SceneObject:
    """One object of a scene.

    Attributes
    ----------
    id: draw order (0 is drawn first, at the bottom).
    label: class index into :data:`CLASS_NAMES`; ``shape`` its name.
    colour, size: names from :data:`COLOURS` and :data:`SIZES`.
    mask: (H, W) uint8, 1 on the object's visible pixels (exact).
    shape_mask: (H, W) uint8, the whole shape before occlusion.
    box: (x0, y0, x1, y1) of the visible mask, pixel edges: columns
        x0..x1-1 and rows y0..y1-1 (COCO ``bbox`` = [x0, y0, x1-x0, y1-y0]).
    centroid: (x, y) mean of the visible pixels' centres.
    area: visible pixels; ``occlusion`` = 1 - area / shape pixels.
    params: centre, radius (pixels), angle (radians), shape area fraction.
    """

    id: int
    label: int
    shape: str
    colour: str
    size: str
    mask: np.ndarray = field(repr=False)
    shape_mask: np.ndarray = field(repr=False)
    box: Tuple[int, int, int, int] = (0, 0, 0, 0)
    centroid: Tuple[float, float] = (0.0, 0.0)
    area: int = 0
    occlusion: float = 0.0
    params: Dict[str, float] = field(default_factory=dict)

    @property
    def phrase(self) -> str:
        """'large red disk'."""
        return f"{self.size} {self.colour} {self.shape}"

    def record(self) -> Dict:
        """JSON-ready description (no masks)."""
        return {"id": self.id, "label": self.label, "shape": self.shape, "colour": self.colour, "size": self.size,
                "box": list(self.box), "centroid": [round(c, 3) for c in self.centroid], "area": self.area,
                "occlusion": round(self.occlusion, 4), "params": {k: round(v, 4) for k, v in self.params.items()}}


@dataclass
class Question:
    """A templated question and its ground truth.

    Attributes
    ----------
    question: the text ("is there a red disk?").
    tokens: the text split into lower-case words and "?".
    answer: the answer string ("yes", "2", "red", "disk", ...).
    qtype: existence, count, colour, shape or relation.
    answer_type: VQA answer type: "yes/no", "number" or "other".
    token_indices: indices into ``tokens`` of the words the answer depends on.
    objects: ids of the objects the answer depends on.
    """

    question: str
    tokens: List[str]
    answer: str
    qtype: str
    answer_type: str
    token_indices: List[int]
    objects: List[int]


@dataclass
class Scene:
    """One generated scene: ``image`` (H, W, 3) uint8 RGB, its ``objects``,
    ``background`` (the picture before any object), and its identity."""

    image: np.ndarray
    objects: List[SceneObject]
    background: np.ndarray = field(repr=False)
    index: int = 0
    seed: int = 0
    split: str = "train"
    config: SceneConfig = field(default_factory=SceneConfig)

    @property
    def labels(self) -> np.ndarray:
        """Multi-hot (NUM_CLASSES,) float32: 1 for every class present."""
        y = np.zeros(NUM_CLASSES, np.float32)
        for o in self.objects:
            y[o.label] = 1.0
        return y

    @property
    def instance_map(self) -> np.ndarray:
        """(H, W) uint8: 0 for background, ``id + 1`` on each object's visible pixels."""
        out = np.zeros(self.image.shape[:2], np.uint8)
        for o in self.objects:
            out[o.mask.astype(bool)] = o.id + 1
        return out

    def class_mask(self, label: int) -> np.ndarray:
        """(H, W) uint8 union of the visible masks of the objects of class ``label``."""
        out = np.zeros(self.image.shape[:2], np.uint8)
        for o in self.objects:
            if o.label == label:
                out |= o.mask
        return out


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------
def _split_id(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def scene_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of one scene (``stream`` 0: the picture, 1: its questions)."""
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), _split_id(split), int(index), SCENE_VERSION, 7919, int(stream)])


def _extent(label: int, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    pts = np.concatenate([p for p, v in _placed(label, (0.0, 0.0), 1.0, angle) if v == 1])
    return pts.min(axis=0), pts.max(axis=0)


def _try_place(rng: np.random.Generator, label: int, size_name: str, cfg: SceneConfig) -> Tuple[np.ndarray, Dict]:
    """A random placement of shape ``label`` of size ``size_name`` inside the frame."""
    S = cfg.size
    frac = float(rng.uniform(*SIZES[size_name]))
    angle = float(rng.uniform(0, 2 * np.pi))
    lo, hi = _extent(label, angle)
    radius = min(math.sqrt(frac * S * S / _unit_area(label)), (S - 3.5) / float((hi - lo).max()))
    cx = float(rng.uniform(1 - lo[0] * radius, S - 2 - hi[0] * radius))
    cy = float(rng.uniform(1 - lo[1] * radius, S - 2 - hi[1] * radius))
    mask = shape_mask(label, S, (cx, cy), radius, angle)
    return mask, {"center_x": cx, "center_y": cy, "radius": float(radius), "angle": angle, "area_fraction": frac}


def _acceptable(new: np.ndarray, placed: List[np.ndarray], cfg: SceneConfig) -> bool:
    """Whether shape mask ``new``, drawn on top of ``placed`` (shape masks in
    draw order), keeps every object within the occlusion/separation limits."""
    if int(new.sum()) < cfg.min_visible:
        return False
    if not placed:
        return True
    if cfg.separated:
        union = np.zeros_like(new)
        for m in placed:
            union |= m
        if cfg.gap:
            k = 2 * cfg.gap + 1
            union = cv2.dilate(union, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        return not bool((union & new).any())
    masks = placed + [new]
    for i, m in enumerate(masks):
        above = np.zeros_like(m)
        for later in masks[i + 1:]:
            above |= later
        full = int(m.sum())
        visible = int((m & ~above.astype(bool)).sum()) if i < len(masks) - 1 else full
        if visible < cfg.min_visible or visible < (1.0 - cfg.max_occlusion) * full:
            return False
    return True


def _paint(rng: np.random.Generator, colour: str, size: int) -> np.ndarray:
    """The palette colour over the frame, softly shaded (never more than 20%
    darker), sometimes with fine speckle.  Float (H, W, 3)."""
    base = np.asarray(COLOURS[colour], np.float32)
    paint = base * (0.8 + 0.2 * _smooth_noise(rng, size, 3, 1))
    if rng.random() < 0.3:
        paint = paint + rng.normal(0, 0.03, (size, size, 3)).astype(np.float32)
    return paint.astype(np.float32)


def generate_scene(index: int, seed: int = 0, split: str = "train", config: Optional[SceneConfig] = None) -> Scene:
    """Scene ``index`` of ``split`` (deterministic in ``seed, split, index, config``).

    Background and clutter as in :mod:`data.synthetic`; then the objects, in
    order, each through its shape mask.  A placement is redrawn (up to 60
    times, the last 30 as a small object) until every object keeps the
    configuration's occlusion or separation limits; when an object does not
    fit, the whole layout is redrawn (up to 8 layouts; the fullest is kept,
    so an object is left out only in very crowded configurations).
    """
    cfg = (config or SceneConfig()).validate()
    S = cfg.size
    rng = scene_rng(seed, split, index)
    bg = _background(rng, S)
    _clutter(rng, bg)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if cfg.distinct_classes:
        labels = [int(v) for v in rng.choice(NUM_CLASSES, size=n, replace=False)]
    else:
        labels = [int(v) for v in rng.integers(0, NUM_CLASSES, size=n)]
    colours = [COLOUR_NAMES[int(v)] for v in rng.integers(0, len(COLOUR_NAMES), size=n)]
    sizes = [("small", "large")[int(v)] for v in rng.integers(0, 2, size=n)]
    best: Tuple[List[np.ndarray], List[Tuple[int, str, str, Dict]]] = ([], [])
    for layout in range(8):  # a fresh layout when an object did not fit
        shapes: List[np.ndarray] = []
        kept: List[Tuple[int, str, str, Dict]] = []
        for label, colour, size_name in zip(labels, colours, sizes):
            for attempt in range(60):
                s = size_name if attempt < 30 else "small"
                mask, params = _try_place(rng, label, s, cfg)
                if _acceptable(mask, shapes, cfg):
                    shapes.append(mask)
                    kept.append((label, colour, s, params))
                    break
        if len(kept) > len(best[1]):
            best = (shapes, kept)
        if len(kept) == n:
            break
    shapes, kept = best
    paints = []
    for (label, colour, s, params), mask in zip(kept, shapes):
        paint = _paint(rng, colour, S)
        if rng.random() < 0.7:  # a darker rim, inside the shape (as in data/synthetic.py)
            rim = mask.astype(bool) & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
            paint[rim] *= 0.45
        paints.append(paint)
    background = _to_uint8(bg)
    image = background.copy()
    for mask, paint in zip(shapes, paints):
        sel = mask.astype(bool)
        image[sel] = _to_uint8(paint)[sel]
    objects = []
    for i, ((label, colour, s, params), mask) in enumerate(zip(kept, shapes)):
        above = np.zeros_like(mask)
        for later in shapes[i + 1:]:
            above |= later
        vis = (mask & (1 - above)).astype(np.uint8)
        ys, xs = np.nonzero(vis)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(
            id=i, label=label, shape=CLASS_NAMES[label], colour=colour, size=s, mask=vis, shape_mask=mask,
            box=box, centroid=(float(xs.mean()), float(ys.mean())), area=int(vis.sum()),
            occlusion=1.0 - float(vis.sum()) / float(mask.sum()), params=params))
    return Scene(image=image, objects=objects, background=background, index=index, seed=seed, split=split,
                 config=cfg)


# --------------------------------------------------------------------------
# Questions and captions
# --------------------------------------------------------------------------
def relation_holds(a: SceneObject, b: SceneObject, relation: str, margin: float = RELATION_MARGIN) -> Optional[bool]:
    """Whether ``a`` is ``relation`` (left of / right of / above / below) ``b``,
    judged by the visible masks' centroids (image y grows downwards); None
    when the centroids are closer than ``margin`` pixels along that axis."""
    axis = 0 if relation in ("left of", "right of") else 1
    d = b.centroid[axis] - a.centroid[axis]  # > 0: a is left of / above b
    if abs(d) < margin:
        return None
    return (d > 0) if relation in ("left of", "above") else (d < 0)


def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _question(words: List[str], marks: List[int], answer: str, qtype: str, objects: Iterable[int]) -> Question:
    tokens = words + ["?"]
    atype = "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"
    return Question(" ".join(words) + "?", tokens, answer, qtype, atype, sorted(marks), sorted(int(o) for o in objects))


def _descriptor(scene: Scene, o: SceneObject) -> Optional[List[str]]:
    """The shortest words naming ``o`` uniquely ([shape] or [colour, shape]), or None."""
    if sum(p.shape == o.shape for p in scene.objects) == 1:
        return [o.shape]
    if sum(p.shape == o.shape and p.colour == o.colour for p in scene.objects) == 1:
        return [o.colour, o.shape]
    return None


def scene_questions(scene: Scene, per_type: int = 1) -> List[Question]:
    """Templated questions about ``scene`` with answers and what they depend on.

    Up to ``per_type`` questions of each type, drawn with the scene's own
    question generator (deterministic):

    * existence: "is there a [colour] <shape>?" - yes (half the time, about a
      present object) or no; objects: the matching ones;
    * count: "how many <shape>s are there?" / "how many <colour> objects are
      there?" - "0".."4"; objects: the matching ones;
    * colour: "what colour is the <shape>?" - asked only about a shape that
      occurs once; objects: that one;
    * shape: "what shape is the <colour> object?" - only for a colour that
      occurs once;
    * relation: "is the <A> left of / right of / above / below the <B>?" -
      A and B named uniquely, asked only when their centroids are at least
      :data:`RELATION_MARGIN` apart along the axis; objects: A and B.

    ``token_indices`` mark the colour/shape words and the relation's first
    word (left, right, above, below).
    """
    rng = scene_rng(scene.seed, scene.split, scene.index, stream=1)
    objs = scene.objects
    out: List[Question] = []
    for _ in range(per_type):  # existence
        if objs and rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            shape, colour = o.shape, o.colour
        else:
            shape = CLASS_NAMES[int(rng.integers(NUM_CLASSES))]
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        if rng.random() < 0.5:
            words, marks = ["is", "there", _article(shape), shape], [3]
            match = [o.id for o in objs if o.shape == shape]
        else:
            words, marks = ["is", "there", _article(colour), colour, shape], [3, 4]
            match = [o.id for o in objs if o.shape == shape and o.colour == colour]
        out.append(_question(words, marks, "yes" if match else "no", "existence", match))
    for _ in range(per_type):  # count
        if rng.random() < 0.5:
            shape = (objs[int(rng.integers(len(objs)))].shape if objs and rng.random() < 0.7
                     else CLASS_NAMES[int(rng.integers(NUM_CLASSES))])
            words, marks = ["how", "many", _plural(shape), "are", "there"], [2]
            match = [o.id for o in objs if o.shape == shape]
        else:
            colour = (objs[int(rng.integers(len(objs)))].colour if objs and rng.random() < 0.7
                      else COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))])
            words, marks = ["how", "many", colour, "objects", "are", "there"], [2]
            match = [o.id for o in objs if o.colour == colour]
        out.append(_question(words, marks, str(len(match)), "count", match))
    unique_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    for o in [unique_shape[int(i)] for i in rng.permutation(len(unique_shape))[:per_type]]:
        out.append(_question(["what", "colour", "is", "the", o.shape], [4], o.colour, "colour", [o.id]))
    unique_colour = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
    for o in [unique_colour[int(i)] for i in rng.permutation(len(unique_colour))[:per_type]]:
        out.append(_question(["what", "shape", "is", "the", o.colour, "object"], [4], o.shape, "shape", [o.id]))
    pairs = []
    for a in objs:
        for b in objs:
            if a.id == b.id:
                continue
            da, db = _descriptor(scene, a), _descriptor(scene, b)
            if da is None or db is None:
                continue
            for rel in RELATIONS:
                holds = relation_holds(a, b, rel)
                if holds is not None:
                    pairs.append((a, b, da, db, rel, holds))
    for k in rng.permutation(len(pairs))[:per_type]:
        a, b, da, db, rel, holds = pairs[int(k)]
        rel_words = rel.split()
        words = ["is", "the"] + da + rel_words + ["the"] + db
        marks = list(range(2, 2 + len(da))) + [2 + len(da)] + list(range(3 + len(da) + len(rel_words), len(words)))
        out.append(_question(words, marks, "yes" if holds else "no", "relation", [a.id, b.id]))
    return out


def scene_caption(scene: Scene) -> str:
    """A short caption naming every object left to right:
    'a large red disk, a small blue star and a white ring.'"""
    objs = sorted(scene.objects, key=lambda o: o.centroid[0])
    if not objs:
        return "an empty textured background."
    return join_phrases([f"{_article(o.size)} {o.phrase}" for o in objs])


def join_phrases(parts: Sequence[str], conjunction: str = "and") -> str:
    """'p1, p2 and p3.': the caption template (one phrase: 'p1.')."""
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" {conjunction} " + parts[-1]
    return text + "."


def word_tokenizer(words: Sequence[str], strip_accents: Optional[bool] = None,
                   model_input_names: Optional[Sequence[str]] = None):
    """A word-level ``BertTokenizerFast`` over ``words`` (lower case; ids 0-4:
    [PAD] [UNK] [CLS] [SEP] [MASK], then ``words`` in order); ``model_input_names``
    (kept by ``save_pretrained``) drops ``token_type_ids`` for models without them.

    The vocabulary is passed as a dict and checked: with transformers 5,
    ``BertTokenizerFast(vocab_file=...)`` silently keeps only the special
    tokens, and every word would become [UNK]."""
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words))}
    extra = {"model_input_names": list(model_input_names)} if model_input_names else {}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True, strip_accents=strip_accents, **extra)
    if words and tok.convert_tokens_to_ids(words[0]) == vocab["[UNK]"]:
        raise RuntimeError("the tokenizer lost its vocabulary")
    return tok


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------
def _file_name(index: int) -> str:
    return f"{index:06d}.png"


def _image_id(index: int) -> int:
    return index + 1


def _rle(mask: np.ndarray) -> Dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _polygons(mask: np.ndarray) -> List[List[float]]:
    """Outlines of the mask's pixels as COCO polygons (pixel corners, so a
    polygon covers its pixels; holes are not represented)."""
    up = cv2.resize(mask.astype(np.uint8), (mask.shape[1] * 2, mask.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64) / 2.0 + 0.25  # back to pixel units, on the pixels' outer half
        if len(pts) >= 3:
            polys.append([round(float(v), 2) for v in pts.reshape(-1)])
    return polys


def coco_dict(scenes: Sequence[Scene], split: str, mask_format: str = "rle") -> Dict:
    """COCO instances JSON for ``scenes``: image ``id`` = scene index + 1,
    ``file_name`` = ``<index:06d>.png``; one annotation per object with its
    visible mask (``rle``: exact, or ``polygon``: outlines, approximate),
    ``bbox`` [x, y, w, h] and ``area`` of the visible mask; annotation ids
    are ``image_id * 10 + object id``.  Categories have ``id`` = label + 1
    and ``model_index`` = label (the classifier's output index).  Extra
    per-object keys: ``object_id``, ``colour``, ``size``, ``occlusion``."""
    if mask_format not in ("rle", "polygon"):
        raise ValueError(f"mask_format must be 'rle' or 'polygon', got {mask_format!r}")
    images, anns = [], []
    for sc in scenes:
        H, W = sc.image.shape[:2]
        iid = _image_id(sc.index)
        images.append({"id": iid, "file_name": _file_name(sc.index), "width": W, "height": H, "scene_index": sc.index})
        for o in sc.objects:
            x0, y0, x1, y1 = o.box
            seg = _rle(o.mask) if mask_format == "rle" else _polygons(o.mask)
            anns.append({"id": iid * 10 + o.id, "image_id": iid, "category_id": o.label + 1, "segmentation": seg,
                         "area": float(o.area), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "iscrowd": 0, "object_id": o.id, "colour": o.colour, "size": o.size,
                         "occlusion": round(o.occlusion, 4)})
    cats = [{"id": k + 1, "name": n, "supercategory": "shape", "model_index": k} for k, n in enumerate(CLASS_NAMES)]
    return {"info": {"description": f"synthetic scenes (data/scenes.py), split {split}", "version": SCENE_VERSION},
            "licenses": [], "images": images, "annotations": anns, "categories": cats}


def vqa_dicts(scenes: Sequence[Scene], split: str, per_type: int = 1) -> Tuple[Dict, Dict]:
    """VQA v2 questions and annotations JSON for ``scenes``.

    Questions: ``{"questions": [{"image_id", "question", "question_id"}]}``;
    annotations: ``{"annotations": [{"question_id", "image_id",
    "question_type", "answer_type", "multiple_choice_answer", "answers" (ten
    identical answers, as VQA v2 has ten annotators)}]}`` plus ground truth
    for explanations: ``question_tokens``, ``answer_token_indices``,
    ``answer_objects`` (object ids) and ``answer_annotation_ids`` (ids in
    the COCO instances file).  Question ids are ``image_id * 100 + k``.
    """
    info = {"description": f"synthetic scenes (data/scenes.py), split {split}", "version": SCENE_VERSION}
    qs, anns = [], []
    for sc in scenes:
        iid = _image_id(sc.index)
        for k, q in enumerate(scene_questions(sc, per_type)):
            qid = iid * 100 + k
            qs.append({"image_id": iid, "question": q.question, "question_id": qid})
            anns.append({"question_id": qid, "image_id": iid, "question_type": q.qtype, "answer_type": q.answer_type,
                         "multiple_choice_answer": q.answer,
                         "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": j + 1}
                                     for j in range(10)],
                         "question_tokens": q.tokens, "answer_token_indices": q.token_indices,
                         "answer_objects": q.objects, "answer_annotation_ids": [iid * 10 + o for o in q.objects]})
    common = {"info": info, "license": {}, "data_subtype": split, "data_type": "scenes"}
    return (dict(common, task_type="Open-Ended", questions=qs), dict(common, annotations=anns))


def captions_dict(scenes: Sequence[Scene], split: str) -> Dict:
    """COCO captions JSON: one caption per scene (annotation id = image id)."""
    images = [{"id": _image_id(s.index), "file_name": _file_name(s.index), "width": s.image.shape[1],
               "height": s.image.shape[0]} for s in scenes]
    anns = [{"id": _image_id(s.index), "image_id": _image_id(s.index), "caption": scene_caption(s)} for s in scenes]
    return {"info": {"description": f"synthetic scenes captions, split {split}"}, "licenses": [], "images": images,
            "annotations": anns}


def _write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write_text(path, json.dumps(obj))


def _save_png(path: str, rgb: np.ndarray) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")


def write_images(folder: str, scenes: Sequence[Scene]) -> List[str]:
    """Each scene's picture as ``folder/<index:06d>.png`` (RGB)."""
    paths = []
    for s in scenes:
        paths.append(os.path.join(folder, _file_name(s.index)))
        _save_png(paths[-1], s.image)
    return paths


def write_coco(path: str, scenes: Sequence[Scene], split: str, mask_format: str = "rle") -> str:
    """Write :func:`coco_dict` to ``path``."""
    return _write_json(path, coco_dict(scenes, split, mask_format))


def write_vqa(questions_path: str, annotations_path: str, scenes: Sequence[Scene], split: str,
              per_type: int = 1) -> Tuple[str, str]:
    """Write :func:`vqa_dicts` to the two files."""
    q, a = vqa_dicts(scenes, split, per_type)
    return _write_json(questions_path, q), _write_json(annotations_path, a)


def write_captions(path: str, scenes: Sequence[Scene], split: str) -> str:
    """Write :func:`captions_dict` to ``path``."""
    return _write_json(path, captions_dict(scenes, split))


def write_imagefolder(root: str, scenes: Sequence[Scene]) -> Dict:
    """``root/<class>/<index:06d>.png`` with <class> the class of the object
    with the most visible pixels (``torchvision.datasets.ImageFolder``
    reads it; class index == label when all classes occur, the folders of
    every class are created), plus ``root/manifest.json`` with every file's
    multi-hot labels and ``root/instances.npz`` (``instance_maps`` (n, H,
    W) uint8: 0 background, id + 1 per object; ``labels`` (n, 8))."""
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    files, labels = [], []
    for s in scenes:
        main_obj = max(s.objects, key=lambda o: o.area)
        rel = os.path.join(main_obj.shape, _file_name(s.index))
        _save_png(os.path.join(root, rel), s.image)
        files.append(rel)
        labels.append(s.labels.astype(int).tolist())
    np.savez_compressed(os.path.join(root, "instances.npz"), instance_maps=np.stack([s.instance_map for s in scenes]),
                        labels=np.asarray(labels, np.int64))
    manifest = {"generator": "data/scenes.py", "scene_version": SCENE_VERSION, "class_names": list(CLASS_NAMES),
                "files": files, "labels": labels}
    _write_json(os.path.join(root, "manifest.json"), manifest)
    return manifest


def write_gtsegs_mat(path: str, scenes: Sequence[Scene]) -> str:
    """The scenes in the ``gtsegs_ijcv.mat`` layout (../shared/METHODS.md
    section 4, read by :mod:`data.imagenet_seg`): the mask is the union of
    the objects' visible masks.  ``/synthetic/labels`` (n, 8) holds the
    multi-hot labels."""
    import h5py

    from data.synthetic import _matlab_header

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    ref, n = h5py.ref_dtype, len(scenes)
    try:
        with h5py.File(tmp, "w", userblock_size=512) as f:
            refs, value = f.create_group("#refs#"), f.create_group("value")
            value.attrs["MATLAB_class"] = np.bytes_("struct")
            img, gt = value.create_dataset("img", (n, 1), dtype=ref), value.create_dataset("gt", (n, 1), dtype=ref)
            for d in (img, gt):
                d.attrs["MATLAB_class"] = np.bytes_("cell")
            for i, s in enumerate(scenes):
                d_img = refs.create_dataset(f"img{i}", data=np.ascontiguousarray(s.image.transpose(2, 1, 0)))
                d_gt = refs.create_dataset(f"gt{i}", data=np.ascontiguousarray((s.instance_map > 0).astype(np.uint8).T))
                for d in (d_img, d_gt):
                    d.attrs["MATLAB_class"] = np.bytes_("uint8")
                cell = refs.create_dataset(f"gtcell{i}", (1, 1), dtype=ref)
                cell.attrs["MATLAB_class"] = np.bytes_("cell")
                cell[0, 0] = d_gt.ref
                img[i, 0], gt[i, 0] = d_img.ref, cell.ref
            meta = f.create_group("synthetic")
            meta.create_dataset("labels", data=np.stack([s.labels for s in scenes]).astype(np.int64))
            meta.attrs["class_names"] = json.dumps(list(CLASS_NAMES))
        with open(tmp, "r+b") as fh:
            fh.write(_matlab_header())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_scenes_json(path: str, scenes: Sequence[Scene], per_type: int = 1) -> str:
    """Every scene's objects, questions and caption (no masks) as one JSON."""
    cfg = asdict(scenes[0].config) if scenes else asdict(SceneConfig())
    return _write_json(path, {
        "generator": "data/scenes.py", "scene_version": SCENE_VERSION, "config": cfg,
        "class_names": list(CLASS_NAMES), "colours": {k: list(v) for k, v in COLOURS.items()},
        "scenes": [{"index": s.index, "image_id": _image_id(s.index), "file_name": _file_name(s.index),
                    "seed": s.seed, "split": s.split, "objects": [o.record() for o in s.objects],
                    "caption": scene_caption(s), "questions": [asdict(q) for q in scene_questions(s, per_type)]}
                   for s in scenes]})


FORMATS = ("coco", "vqa", "captions", "imagefolder", "mat", "scenes")


def write_dataset(out_dir: str, split: str, count: int, seed: int = 0, config: Optional[SceneConfig] = None,
                  formats: Sequence[str] = FORMATS, mask_format: str = "rle", per_type: int = 1,
                  start: int = 0, quiet: bool = True) -> Dict[str, str]:
    """Generate scenes ``start .. start+count-1`` and write them in ``formats``
    under ``out_dir`` (layout in the module docstring).  Returns format ->
    path written."""
    from tqdm import tqdm

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(unknown)}; valid: {', '.join(FORMATS)}")
    cfg = (config or SceneConfig()).validate()
    scenes = [generate_scene(i, seed, split, cfg)
              for i in tqdm(range(start, start + count), desc=f"generating {split} scenes", disable=quiet, leave=False)]
    ann = os.path.join(out_dir, "annotations")
    written: Dict[str, str] = {}
    if set(formats) & {"coco", "vqa", "captions"}:
        write_images(os.path.join(out_dir, split), scenes)
        written["images"] = os.path.join(out_dir, split)
    if "coco" in formats:
        written["coco"] = write_coco(os.path.join(ann, f"instances_{split}.json"), scenes, split, mask_format)
    if "vqa" in formats:
        q, a = write_vqa(os.path.join(ann, f"v2_OpenEnded_scenes_{split}_questions.json"),
                         os.path.join(ann, f"v2_scenes_{split}_annotations.json"), scenes, split, per_type)
        written["vqa_questions"], written["vqa_annotations"] = q, a
    if "captions" in formats:
        written["captions"] = write_captions(os.path.join(ann, f"captions_{split}.json"), scenes, split)
    if "imagefolder" in formats:
        write_imagefolder(os.path.join(out_dir, f"imagefolder_{split}"), scenes)
        written["imagefolder"] = os.path.join(out_dir, f"imagefolder_{split}")
    if "mat" in formats:
        written["mat"] = write_gtsegs_mat(os.path.join(out_dir, f"{split}_gtsegs.mat"), scenes)
    if "scenes" in formats:
        written["scenes"] = write_scenes_json(os.path.join(out_dir, f"{split}_scenes.json"), scenes, per_type)
    return written


# --------------------------------------------------------------------------
# Dataset for training
# --------------------------------------------------------------------------
class SceneDataset(Dataset):
    """``torch.utils.data.Dataset`` of generated scenes: items are
    ``(image, labels)``, ``image`` a float (3, H, W) tensor normalised with
    ``mean``/``std`` from [0, 1] pixels (``raw``: uint8 (3, H, W)), ``labels``
    the (8,) multi-hot float tensor."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", config: Optional[SceneConfig] = None,
                 start: int = 0, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 raw: bool = False):
        self.n, self.seed, self.split, self.start, self.raw = n, seed, split, start, raw
        self.config = (config or SceneConfig()).validate()
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = generate_scene(self.start + i, self.seed, self.split, self.config)
        chw = s.image.transpose(2, 0, 1)
        x = torch.from_numpy(chw.copy()) if self.raw else torch.from_numpy((chw.astype(np.float32) / 255.0 - self.mean) / self.std)
        return x, torch.from_numpy(s.labels)


# --------------------------------------------------------------------------
# Bounds (issue 27 item 3): counts and sizes have a range, and a request whose
# memory would not fit the machine is refused with the estimate, up front
# --------------------------------------------------------------------------
MAX_COUNT = 10 ** 7
"""Most scenes one command asks for (--count, --scenes, --train-scenes, ...)."""
MAX_SIZE = 4096
"""Largest picture side (pixels)."""


def scenes_memory(count: int, size: int = 96, max_objects: int = 4) -> int:
    """Bytes held for ``count`` scenes kept in memory (picture and one mask per
    object, as :func:`write_dataset` and the stand-in benchmarks keep them),
    plus one scene's float work arrays while it is drawn."""
    return int(count) * size * size * (3 + max_objects) + size * size * 16


def check_scenes_memory(count: int, size: int = 96, max_objects: int = 4, what: str = "--count") -> None:
    """Refuse (one line, with the estimate) ``count`` scenes that would not fit in memory."""
    check_memory(scenes_memory(count, size, max_objects), f"{what} {count} ({size}x{size} pictures)")


scene_count_arg = int_range(1, MAX_COUNT)
"""argparse type: a number of scenes, 1..MAX_COUNT."""


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write synthetic multi-object scenes (shapes of data/synthetic.py in named colours) with exact "
                    "instance masks, boxes, questions and captions, in COCO / VQA v2 / ImageFolder / gtsegs .mat "
                    "formats.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--split", default="val", help="split name (part of every scene's identity)")
    p.add_argument("--count", type=scene_count_arg, default=200, help=f"number of scenes (1..{MAX_COUNT})")
    p.add_argument("--start", type=int, default=0, help="index of the first scene")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--size", type=int, default=96, help=f"picture side (pixels, at most {MAX_SIZE})")
    p.add_argument("--min-objects", type=int, default=1, help="fewest objects per scene")
    p.add_argument("--max-objects", type=int, default=4, help="most objects per scene (at most 4)")
    p.add_argument("--distinct-classes", action="store_true", help="every object of a scene of a different class")
    p.add_argument("--separated", action="store_true", help="objects never overlap (kept --gap pixels apart)")
    p.add_argument("--gap", type=int, default=2, help="pixels between separated objects")
    p.add_argument("--max-occlusion", type=float, default=0.4, help="largest hidden share of an object's shape")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write")
    p.add_argument("--mask-format", choices=("rle", "polygon"), default="rle",
                   help="COCO masks: exact RLE or (approximate) polygons")
    p.add_argument("--questions-per-type", type=int, default=1, help="questions of each type per scene (at most)")
    p.add_argument("--resume", action="store_true",
                   help="write again over a killed run of the same arguments (generation is deterministic: a rerun "
                        "of the same arguments always does this)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this split's files of a run with other arguments (or of an unrecorded run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


RUN_RECORD = "scenes_run_{split}.json"
"""The run folder's record of a split (its identity: the arguments that change the files)."""


def split_outputs(split: str) -> List[str]:
    """Every file or folder a split may have under ``--out-dir`` (relative)."""
    return [split, os.path.join("annotations", f"instances_{split}.json"),
            os.path.join("annotations", f"v2_OpenEnded_scenes_{split}_questions.json"),
            os.path.join("annotations", f"v2_scenes_{split}_annotations.json"),
            os.path.join("annotations", f"captions_{split}.json"), f"imagefolder_{split}", f"{split}_gtsegs.mat",
            f"{split}_scenes.json"]


def _run_identity(args: argparse.Namespace) -> Dict:
    keys = ("split", "count", "start", "seed", "size", "min_objects", "max_objects", "distinct_classes", "separated",
            "gap", "max_occlusion", "formats", "mask_format", "questions_per_type")
    return {"scene_version": SCENE_VERSION, **{k: getattr(args, k) for k in keys}}


def write_run(args: argparse.Namespace, cfg: SceneConfig) -> Dict[str, str]:
    """:func:`write_dataset` into ``--out-dir`` as a run folder (issue 27):
    one run at a time (a lock on the folder), the split's identity recorded;
    files of another identity (or of an unrecorded run) replaced only with
    ``--overwrite``; a rerun of the same identity writes the same bytes again
    (what a killed run resumes by)."""
    import shutil

    if args.split in (".", "..") or not args.split or any(c in args.split for c in "/\\\0"):
        raise CLIError(f"--split {args.split!r}: a name, not a path (it names files and folders under --out-dir)")
    check_output_dir(args.out_dir, flag="--out-dir")
    identity = _run_identity(args)
    record = RUN_RECORD.format(split=args.split)
    with file_lock(args.out_dir, what=f"--out-dir {args.out_dir}"):
        old = None
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(args.out_dir, record), encoding="utf-8") as fh:
                old = json.load(fh)
        outputs = split_outputs(args.split)
        resume = prepare_run_folder(args.out_dir, identity, resume=args.resume or old == identity,
                                    overwrite=args.overwrite, record=record, finished=outputs, flag="--out-dir")
        if not resume:  # --overwrite or nothing there: no file of an earlier run stays beside the new ones
            for name in outputs:
                path = os.path.join(args.out_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
        return write_dataset(args.out_dir, args.split, args.count, args.seed, cfg, args.formats, args.mask_format,
                             args.questions_per_type, args.start, quiet=args.quiet)


def config_from_args(args: argparse.Namespace) -> SceneConfig:
    """The :class:`SceneConfig` of parsed command-line arguments."""
    return SceneConfig(size=args.size, min_objects=args.min_objects, max_objects=args.max_objects,
                       distinct_classes=args.distinct_classes, separated=args.separated, gap=args.gap,
                       max_occlusion=args.max_occlusion)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count <= 0 or args.start < 0 or args.seed < 0 or args.questions_per_type < 0:
        parser.exit(2, "error: --count must be positive; --start, --seed and --questions-per-type non-negative\n")
    if args.size > MAX_SIZE:
        parser.exit(2, f"error: --size must be at most {MAX_SIZE}, not {args.size}\n")
    try:
        cfg = config_from_args(args).validate()
        check_scenes_memory(args.count, args.size, args.max_objects)
        written = write_run(args, cfg)
    except (ValueError, OSError, ImportError, CLIError) as exc:
        parser.exit(2, f"error: {str(exc).splitlines()[0]}\n")
    print(f"wrote {args.count} {args.split} scenes (seed {args.seed}) under {args.out_dir}: "
          + ", ".join(sorted(written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
