"""Scores of the ImageNet-segmentation test (../shared/METHODS.md section 4).

Plain functions over batches of relevance maps and binary ground-truth
masks, (B, H, W) NumPy arrays or tensors; every per-image quantity stays per
image, and the pooled counts are sums over images:

- :func:`prepare_maps`: per-image min-max to [0, 1] (NaN -> 0);
- :func:`threshold_maps`: foreground = map > mean of that map;
- :func:`pixel_counts`: correct and labelled pixels (pixel accuracy =
  sum correct / sum labelled over all images);
- :func:`intersection_union`: |P ∩ G| and |P ∪ G| for background and
  foreground (mIoU = mean over the two classes of the pooled ratio);
- :func:`average_precision`: per-image AP (scikit-learn) of the scores
  [1 - map, map] against the labels [gt == 0, gt == 1];
- :class:`SegmentationScores`: accumulates all of them over batches.

Every division by zero gives 0, so no NaN can come out.
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["prepare_maps", "threshold_maps", "pixel_counts", "intersection_union", "average_precision",
           "SegmentationScores", "segmentation_scores"]


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _batch(x, name: str) -> np.ndarray:
    x = _np(x)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must be (B, H, W) or (H, W), got shape {x.shape}")
    return x


def _check(maps: np.ndarray, gt: np.ndarray) -> None:
    if maps.shape != gt.shape:
        raise ValueError(f"maps {maps.shape} and masks {gt.shape} differ in shape")


def prepare_maps(maps) -> np.ndarray:
    """Per-image min-max normalisation of (B, H, W) maps to [0, 1], in
    float32; a constant map (0/0) and any NaN become 0 (METHODS.md §4)."""
    m = _batch(maps, "maps").astype(np.float64)
    flat = m.reshape(m.shape[0], -1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN maps
        lo = np.nanmin(flat, axis=1, keepdims=True)
        hi = np.nanmax(flat, axis=1, keepdims=True)
        out = (flat - lo) / (hi - lo)
    out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out.reshape(m.shape).astype(np.float32)


def threshold_maps(maps) -> np.ndarray:
    """Foreground prediction: map > mean of that map, per image. (B, H, W) bool."""
    m = _batch(maps, "maps")
    t = m.reshape(m.shape[0], -1).mean(axis=1)
    return m > t[:, None, None]


def pixel_counts(pred, gt) -> Tuple[int, int]:
    """(correct, labelled) pixels summed over the batch; every pixel is labelled."""
    p, g = _batch(pred, "pred").astype(bool), _batch(gt, "gt") > 0
    _check(p, g)
    return int((p == g).sum()), int(g.size)


def intersection_union(pred, gt) -> Tuple[np.ndarray, np.ndarray]:
    """Pooled |P ∩ G| and |P ∪ G| over the batch for class 0 (background)
    and class 1 (foreground): two int64 arrays of length 2."""
    p, g = _batch(pred, "pred").astype(bool), _batch(gt, "gt") > 0
    _check(p, g)
    inter = np.array([(~p & ~g).sum(), (p & g).sum()], dtype=np.int64)
    union = np.array([(~p | ~g).sum(), (p | g).sum()], dtype=np.int64)
    return inter, union


def average_precision(maps, gt) -> np.ndarray:
    """Per-image average precision (scikit-learn's ``average_precision_score``)
    of the scores [1 - map, map] against the labels [gt == 0, gt == 1], all
    pixels of the image; ``maps`` already normalised to [0, 1]. (B,) float64,
    NaN -> 0."""
    from sklearn.metrics import average_precision_score

    m, g = _batch(maps, "maps").astype(np.float64), _batch(gt, "gt") > 0
    _check(m, g)
    out = np.empty(m.shape[0], dtype=np.float64)
    for i in range(m.shape[0]):
        s = m[i].reshape(-1)
        lab = g[i].reshape(-1)
        scores = np.concatenate([1.0 - s, s])
        labels = np.concatenate([~lab, lab]).astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i] = np.nan_to_num(average_precision_score(labels, scores))
    return out


def _ratio(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


@dataclass
class SegmentationScores:
    """Running sums of the segmentation test over batches of one method.

    ``update(maps, gt)`` takes raw (B, H, W) maps already at the masks'
    size (upsampled if they were patch maps), normalises and thresholds
    them, and adds the counts; ``result()`` gives pixel accuracy, mIoU and
    mAP (fractions in [0, 1]) over everything seen.
    """

    correct: int = 0
    labelled: int = 0
    intersection: List[int] = field(default_factory=lambda: [0, 0])
    union: List[int] = field(default_factory=lambda: [0, 0])
    ap_sum: float = 0.0
    n_images: int = 0

    def update(self, maps, gt) -> Dict[str, np.ndarray]:
        """Add a batch; returns its normalised maps, predictions and per-image AP."""
        norm = prepare_maps(maps)
        gt = _batch(gt, "gt")
        _check(norm, gt)
        pred = threshold_maps(norm)
        c, n = pixel_counts(pred, gt)
        inter, union = intersection_union(pred, gt)
        ap = average_precision(norm, gt)
        self.correct += c
        self.labelled += n
        self.intersection = [int(a + b) for a, b in zip(self.intersection, inter)]
        self.union = [int(a + b) for a, b in zip(self.union, union)]
        self.ap_sum += float(ap.sum())
        self.n_images += int(norm.shape[0])
        return {"maps": norm, "pred": pred, "ap": ap}

    def result(self) -> Dict[str, float]:
        iou = _ratio(self.intersection, self.union)
        return {
            "pixel_accuracy": float(_ratio(self.correct, self.labelled)),
            "mIoU": float(iou.mean()),
            "mAP": float(_ratio(self.ap_sum, self.n_images)),
            "IoU_background": float(iou[0]),
            "IoU_foreground": float(iou[1]),
            "n_images": self.n_images,
        }

    def state(self) -> Dict:
        """The running sums, JSON-serialisable (to resume an interrupted run)."""
        return {"correct": self.correct, "labelled": self.labelled, "intersection": list(self.intersection),
                "union": list(self.union), "ap_sum": self.ap_sum, "n_images": self.n_images}

    @classmethod
    def from_state(cls, state: Dict) -> "SegmentationScores":
        return cls(int(state["correct"]), int(state["labelled"]), [int(v) for v in state["intersection"]],
                   [int(v) for v in state["union"]], float(state["ap_sum"]), int(state["n_images"]))


def segmentation_scores(maps, gt) -> Dict[str, float]:
    """:meth:`SegmentationScores.result` of one batch of maps and masks."""
    s = SegmentationScores()
    s.update(maps, gt)
    return s.result()
