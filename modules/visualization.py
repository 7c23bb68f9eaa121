"""Pictures of relevance maps: heatmap overlays and side-by-side grids (PNG)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["to_display_image", "overlay", "save_png", "save_grid", "draw_outline"]


def to_display_image(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (C, H, W) tensor or array back to an (H, W, 3) float image in [0, 1]."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    arr = arr * np.asarray(std, dtype=np.float32)[:, None, None] + np.asarray(mean, dtype=np.float32)[:, None, None]
    return np.clip(arr.transpose(1, 2, 0), 0.0, 1.0)


def overlay(image: np.ndarray, heat: np.ndarray, colormap: str = "jet", alpha: float = 0.5,
            clip_percentile: Optional[float] = None) -> np.ndarray:
    """Blend a heatmap over an image.

    Parameters
    ----------
    image: (H, W, 3) float in [0, 1], RGB.
    heat: (H, W) relevance; min-max normalised here, so raw maps are fine.
    colormap: a matplotlib colormap name.
    alpha: weight of the heatmap.
    clip_percentile: if given (e.g. 99.5), values outside the
        [100 - p, p] percentiles are clipped first, so that a few extreme
        values (full LRP's pixel maps) do not wash out the rest.

    Returns
    -------
    (H, W, 3) uint8 RGB.
    """
    import matplotlib

    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != image.shape[:2]:
        import cv2

        heat = cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    if clip_percentile is not None:
        heat = np.clip(heat, *np.nanpercentile(heat, [100 - clip_percentile, clip_percentile]))
    lo, hi = float(np.nanmin(heat)), float(np.nanmax(heat))
    heat = np.nan_to_num((heat - lo) / (hi - lo)) if hi > lo else np.zeros_like(heat)
    colored = matplotlib.colormaps[colormap](heat)[..., :3]
    out = (1 - alpha) * np.asarray(image, dtype=np.float32) + alpha * colored
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def draw_outline(rgb: np.ndarray, mask: np.ndarray, color: Tuple[int, int, int] = (255, 255, 255),
                 thickness: int = 1) -> np.ndarray:
    """Draw the outline of a binary mask on an (H, W, 3) uint8 image (copy)."""
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, thickness)
    return out


def save_png(path: str, rgb: np.ndarray) -> str:
    """Write an (H, W, 3) uint8 RGB array as PNG; creates the folder."""
    import cv2

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")
    return path


def save_grid(path: str, rows: Sequence[Sequence[Tuple[str, np.ndarray]]], title: Optional[str] = None,
              cell_inches: float = 2.2) -> str:
    """Save a grid of titled images (each row a list of (title, RGB uint8)) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(rows)
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell_inches * n_cols, cell_inches * n_rows + (0.4 if title else 0)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row):
                name, img = row[j]
                ax.imshow(img)
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(h_pad=2.0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
