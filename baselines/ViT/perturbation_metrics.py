"""Pure pieces of the perturbation test (../shared/METHODS.md section 5).

Batched tensor functions and the AUC; no files, no models.  The scripts
``generate_visualizations.py`` and ``perturbation_eval.py`` build on them.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from baselines.ViT.ViT_explanation_generator import normalize, upsample
from modules.methods import EVAL_START_LAYER
from modules.ranking import DEFAULT_TIE_BREAK, DEFAULT_TIE_SEED, TIE_BREAKS, ranking_ranks, tied_share, top_k_masks

__all__ = [
    "PERTURBATION_STEPS",
    "DIRECTIONS",
    "EVAL_START_LAYER",
    "eval_start_layer",
    "auc",
    "pixels_to_remove",
    "prepare_maps",
    "removal_ranks",
    "removal_masks",
    "remove_pixels",
    "remove_masked",
    "tied_share",
    "TIE_BREAKS",
    "DEFAULT_TIE_BREAK",
    "DEFAULT_TIE_SEED",
    "normalize_input",
    "select_positions",
]

#: Removed fractions p of METHODS section 5 (p = 0 is the unperturbed image).
PERTURBATION_STEPS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: ``positive`` removes the most relevant pixels first, ``negative`` the least.
DIRECTIONS: Tuple[str, ...] = ("positive", "negative")


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")


def eval_start_layer(method: str) -> int:
    """The rollout start layer the evaluation uses for a canonical method name."""
    return EVAL_START_LAYER.get(method, 0)


def auc(accuracies: Sequence[float], steps: Optional[Sequence[float]] = None) -> float:
    """Area under the accuracy curve, METHODS section 5.

    AUC = 100 * trapz([acc_0, acc_0.1, ..., acc_0.9], x=[0, 0.1, ..., 0.9]).

    Parameters
    ----------
    accuracies:
        Accuracy (fraction in [0, 1]) at each x, starting with the
        unperturbed accuracy acc_0.
    steps:
        The x values; default ``[0, *PERTURBATION_STEPS]``.

    Returns
    -------
    float
        The area times 100 (at most 90 with the default steps).
    """
    acc = np.asarray(accuracies, dtype=np.float64)
    x = np.asarray((0.0,) + PERTURBATION_STEPS if steps is None else steps, dtype=np.float64)
    if acc.shape != x.shape:
        raise ValueError(f"{acc.size} accuracies for {x.size} steps")
    return float(100.0 * np.trapezoid(acc, x=x))


def pixels_to_remove(height: int, width: int, fraction: float) -> int:
    """k = int(H * W * p), the number of pixels removed at fraction p."""
    return int(height * width * fraction)


def prepare_maps(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    """Stored relevance maps (B, h, w) -> (B, H, W) float32 in [0, 1]:
    bilinear upsampling to the image size (skipped when the sizes already
    agree, e.g. ``lrp``), then per-sample min-max normalisation (METHODS §5)."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = upsample(maps, tuple(size))
    return normalize(maps)


def removal_ranks(maps: Tensor, direction: str, tie_break: str = DEFAULT_TIE_BREAK,
                  seed: int = DEFAULT_TIE_SEED) -> Tensor:
    """Removal order of every pixel: (B, H, W) maps -> (B, H*W) long ranks.

    Rank 0 is removed first: the highest relevance for ``positive``, the
    lowest for ``negative``.  Ties follow ``tie_break`` (``random`` or
    ``raster``, see :mod:`modules.ranking`; ``topk`` has no single order: use
    :func:`removal_masks`).  The pixels removed at step k are exactly those
    with ``rank < k``.
    """
    _check_direction(direction)
    return ranking_ranks(maps.flatten(1), direction == "positive", tie_break, seed)


def removal_masks(maps: Tensor, direction: str, ks: Sequence[int], tie_break: str = DEFAULT_TIE_BREAK,
                  seed: int = DEFAULT_TIE_SEED) -> Tensor:
    """Pixels removed at each step: (B, H, W) maps -> (len(ks), B, H*W) bool.

    ``ks`` are the numbers of pixels removed (:func:`pixels_to_remove`).
    ``topk`` is the published loop: ``torch.topk(vis, k)`` on the flattened
    maps, ``vis = -vis`` for the negative test, on the maps' device; ``random``
    and ``raster`` as in :func:`removal_ranks` (METHODS §5, issue 16).
    """
    _check_direction(direction)
    return top_k_masks(maps.flatten(1), ks, direction == "positive", tie_break, seed)


def remove_pixels(images: Tensor, ranks: Tensor, k: int) -> Tensor:
    """Images (B, C, H, W) in [0, 1] with their first ``k`` pixels in removal
    order set to 0 in every channel (before normalisation, METHODS §5)."""
    return remove_masked(images, ranks < k)


def remove_masked(images: Tensor, removed: Tensor) -> Tensor:
    """Images (B, C, H, W) in [0, 1] with the pixels of ``removed`` ((B, H*W)
    or (B, H, W) bool) set to 0 in every channel (METHODS §5)."""
    B, C, H, W = images.shape
    keep = ~removed.reshape(B, 1, H, W)
    return images * keep.to(images.dtype)


def normalize_input(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel for (B, C, H, W) images in [0, 1]."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return (images - m) / s


def select_positions(dataset_size: int, limit: Optional[int]) -> np.ndarray:
    """Dataset indices explained for ``--limit``: all of them without a limit,
    else ``limit`` evenly spaced ones, ``floor(i * n / limit)`` (a class-sorted
    tree such as ImageNet's validation set keeps every class represented)."""
    if dataset_size <= 0:
        raise ValueError("the dataset is empty")
    if limit is None or limit >= dataset_size:
        return np.arange(dataset_size, dtype=np.int64)
    if limit <= 0:
        raise ValueError(f"limit must be positive, not {limit}")
    return (np.arange(limit, dtype=np.int64) * dataset_size) // limit
