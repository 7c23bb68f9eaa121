"""Pictures of multi-modal explanations: image overlays per stream, box maps,
text heatmaps, and one figure that puts them together (issue 11, item 7).

Built on the project's two picture modules, never duplicating them:
:mod:`modules.visualization` (``overlay`` blends a patch map over the
image, ``save_grid`` writes titled panels as a PNG) and
:mod:`modules.text_heatmap` (``render_html`` colours words,
``word_scores`` takes a word's score as the maximum over its wordpieces,
METHODS.md section 6).  What is new here: a relevance value per box drawn
on the picture (LXMERT / VisualBERT image maps: one value per detected
region), words rendered as a coloured strip for the PNG, and the word
scores of a question from its token map.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from modules.text_heatmap import render_html, score_to_rgb, word_scores
from modules.visualization import overlay, save_grid, save_png

__all__ = ["as_numpy", "place_maps", "stream_overlays", "box_map", "question_words", "words_strip", "text_html",
           "save_text_html", "save_figure"]


def as_numpy(x) -> np.ndarray:
    """A tensor (any device) or array-like as a float32 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def place_maps(maps, size: Tuple[int, int], extent: Optional[Sequence[int]], fill: float = 0.0):
    """(B, gh, gw) token maps -> (B, H, W) pixel maps placed on the pixels
    their tokens cover: upsampled bilinearly (:func:`modules.explain.upsample`)
    over ``extent`` = ``(top, left, bottom, right)``, end exclusive (an
    explanation's ``pixel_extent``), the part inside the (H, W) image kept
    (padding the model added is cut off), ``fill`` where no token looked.
    ``extent`` None: the whole image (plain upsampling)."""
    import torch

    from modules.explain import upsample

    H, W = int(size[0]), int(size[1])
    if extent is None:
        extent = (0, 0, H, W)
    top, left, bottom, right = (int(v) for v in extent)
    if not (top < bottom and left < right and top < H and left < W and bottom > 0 and right > 0):
        raise ValueError(f"pixel extent {tuple(extent)} does not overlap a {H}x{W} image")
    maps = torch.as_tensor(maps)
    if maps.dim() != 3:
        raise ValueError(f"maps must be (B, gh, gw), got shape {tuple(maps.shape)}")
    up = upsample(maps, (bottom - top, right - left))
    out = up.new_full((up.shape[0], H, W), fill)
    r0, r1, c0, c1 = max(top, 0), min(bottom, H), max(left, 0), min(right, W)
    out[:, r0:r1, c0:c1] = up[:, r0 - top:r1 - top, c0 - left:c1 - left]
    return out


def stream_overlays(image: np.ndarray, maps: Mapping[str, object], alpha: float = 0.5,
                    colormap: str = "jet", extents=None) -> List[Tuple[str, np.ndarray]]:
    """One heatmap overlay per image stream: ``maps`` name -> (gh, gw) map of
    one sample (upsampled bilinearly and min-max normalised by
    :func:`modules.visualization.overlay`).  ``extents``: the
    explanation's ``pixel_extent`` (one ``(top, left, bottom, right)`` for
    every map, or a dict by name): each map is placed on the pixels its
    tokens cover (:func:`place_maps`) instead of stretched over the image,
    and the pixels no token saw are shown without heat.  Returns (name, RGB
    uint8) panels for :func:`save_figure` / ``save_grid``."""
    img = _float_image(image)
    panels = []
    for name, m in maps.items():
        heat = as_numpy(m)
        if heat.ndim != 2:
            raise ValueError(f"map {name!r} must be (gh, gw) for one sample, got shape {heat.shape}")
        extent = extents.get(name) if isinstance(extents, Mapping) else extents
        if extent is None:
            panels.append((name, overlay(img, heat, colormap=colormap, alpha=alpha)))
            continue
        placed = as_numpy(place_maps(heat[None], img.shape[:2], extent, fill=float("nan"))[0])
        out = overlay(img, placed, colormap=colormap, alpha=alpha)
        unseen = np.isnan(placed)
        out[unseen] = (img[unseen] * 255).round().astype(np.uint8)
        panels.append((name, out))
    return panels


def _float_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def box_map(image: np.ndarray, boxes, scores, colormap: str = "jet", alpha: float = 0.45,
            thickness: int = 2, normalized: bool = False) -> np.ndarray:
    """Boxes drawn on the picture in their relevance colour.

    Parameters
    ----------
    image:
        (H, W, 3) RGB, uint8 or float in [0, 1].
    boxes:
        (K, 4) boxes (x1, y1, x2, y2), in pixels, or in [0, 1] of the image
        width/height with ``normalized=True`` (LXMERT's ``visual_pos``).
    scores:
        (K,) relevance per box (an image map of LXMERT / VisualBERT), min-max
        normalised here over the boxes.
    alpha:
        Opacity of the fill; every box is also outlined in its colour.

    Returns
    -------
    (H, W, 3) uint8 RGB.  The boxes are drawn from the least to the most
    relevant, so the most relevant box lies on top where boxes overlap.
    """
    import cv2
    import matplotlib

    img = (_float_image(image) * 255).round().astype(np.uint8)
    H, W = img.shape[:2]
    b = as_numpy(boxes).reshape(-1, 4)
    s = as_numpy(scores).reshape(-1)
    if b.shape[0] != s.shape[0]:
        raise ValueError(f"{b.shape[0]} boxes but {s.shape[0]} scores")
    if normalized:
        b = b * np.array([W, H, W, H], dtype=np.float32)
    finite = np.isfinite(s)
    lo, hi = (float(s[finite].min()), float(s[finite].max())) if finite.any() else (0.0, 0.0)
    level = np.where(finite, (s - lo) / (hi - lo), 0.0) if hi > lo else np.zeros_like(s)
    cmap = matplotlib.colormaps[colormap]
    out = img.copy()
    for k in np.argsort(level, kind="stable"):
        x1, y1, x2, y2 = (int(round(v)) for v in b[k])
        x1, x2 = sorted((max(0, min(W - 1, x1)), max(0, min(W - 1, x2))))
        y1, y2 = sorted((max(0, min(H - 1, y1)), max(0, min(H - 1, y2))))
        color = tuple(int(round(255 * c)) for c in cmap(float(level[k]))[:3])
        fill = out.copy()
        cv2.rectangle(fill, (x1, y1), (x2, y2), color, thickness=-1)
        a = alpha * (0.25 + 0.75 * float(level[k]))  # more relevant boxes are more opaque
        out = np.round((1 - a) * out + a * fill).astype(np.uint8)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness=thickness)
    return out


def question_words(tokenizer, question: str, token_scores) -> Tuple[List[str], List[float]]:
    """The question's words and their scores from a text map over the tokens
    ``tokenizer(question)`` gives ([CLS] ... [SEP]): a word's score is the
    maximum over its wordpieces, special tokens skipped (METHODS.md section 6).
    Needs a fast tokenizer (word ids)."""
    enc = tokenizer(question)
    if not hasattr(enc, "word_ids") or enc.word_ids() is None:
        raise ValueError("question_words needs a fast tokenizer (word ids)")
    scores = as_numpy(token_scores).reshape(-1)
    ids = enc.word_ids()
    if len(ids) != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} token scores for {len(ids)} tokens of the question")
    words = []
    for w in sorted({w for w in ids if w is not None}):
        span = enc.word_to_chars(w)
        words.append(question[span.start:span.end])
    return words, word_scores([float(v) for v in scores], ids)


def words_strip(words: Sequence[str], scores: Sequence[float], width: int = 640, font_size: int = 18,
                title: Optional[str] = None) -> np.ndarray:
    """The words as an image, each on its relevance colour (the
    blue - white - red scale of :func:`modules.text_heatmap.score_to_rgb`),
    wrapped to ``width`` pixels; (h, width, 3) uint8 RGB."""
    from PIL import Image, ImageDraw, ImageFont

    if len(words) != len(scores):
        raise ValueError(f"{len(words)} words but {len(scores)} scores")
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    finite = [abs(float(s)) for s in scores if np.isfinite(s)]
    scale = max(finite) if finite else 0.0
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, gap, line_h = 4, 6, font_size + 10
    x, y = gap, gap
    placed = []
    if title:
        placed.append((x, y, title, None))
        y += line_h
    for word, s in zip(words, scores):
        w = int(probe.textlength(word, font=font)) + 2 * pad
        if x + w > width - gap and x > gap:
            x, y = gap, y + line_h
        placed.append((x, y, word, score_to_rgb(float(s), scale)))
        x += w + gap
    canvas = Image.new("RGB", (width, y + line_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for x, y, word, color in placed:
        if color is not None:
            w = int(probe.textlength(word, font=font)) + 2 * pad
            draw.rectangle([x, y, x + w, y + line_h - 4], fill=color, outline=(160, 160, 160))
        draw.text((x + pad, y + 2), word, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def text_html(words: Sequence[str], scores: Sequence[float], title: Optional[str] = None) -> str:
    """A standalone HTML text heatmap (:func:`modules.text_heatmap.render_html`)."""
    return render_html(list(words), [float(s) for s in scores], title=title)


def save_text_html(path: str, words: Sequence[str], scores: Sequence[float], title: Optional[str] = None) -> str:
    """Write :func:`text_html` to ``path`` (atomically); returns ``path``."""
    from modules.cli import atomic_write_text

    return atomic_write_text(path, text_html(words, scores, title))


def save_figure(path: str, panels: Sequence[Tuple[str, np.ndarray]], words: Optional[Sequence[str]] = None,
                scores: Optional[Sequence[float]] = None, title: Optional[str] = None) -> str:
    """One PNG: the image panels side by side (``save_grid``) and, when given,
    the words on their relevance colours below them."""
    if not panels and words is None:
        raise ValueError("nothing to draw")
    if words is None:
        return save_grid(path, [list(panels)], title=title)
    strip = words_strip(words, scores if scores is not None else [0.0] * len(words))
    if not panels:
        return save_png(path, strip)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import os

    n = len(panels)
    cell = 3.2
    strip_h = cell * n * strip.shape[0] / strip.shape[1]
    fig = plt.figure(figsize=(cell * n, cell + strip_h + (0.5 if title else 0.2)))
    grid = fig.add_gridspec(2, n, height_ratios=[cell, max(strip_h, 0.3)])
    for j, (name, img) in enumerate(panels):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    ax.imshow(strip)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
