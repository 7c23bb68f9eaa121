"""An offline stand-in for the ImageNet-segmentation benchmark, with exact masks.

Every image holds one object of one of :data:`CLASS_NAMES` (eight shape
classes) at a random position, scale (5-40% of the image area), colour,
texture and rotation, drawn over a cluttered, textured background with
distractors that are not class objects (thin lines, scribbles, amorphous
blobs, dots).  The object is composited last through its own binary mask, so
the mask is exact by construction: a pixel is object if and only if the
mask says so.

Generation is deterministic: sample ``index`` of split ``split`` under seed
``seed`` depends on those three values only (one
:class:`numpy.random.Generator` per sample), so any subset can be made on
its own, in any order, in any process.  Labels cycle through the classes
(``index % 8``), so every split of a multiple of 8 images is balanced.

Writers: :func:`write_gtsegs_mat` (the ``gtsegs_ijcv.mat`` layout of
../shared/METHODS.md section 4, read unchanged by
``baselines/ViT/imagenet_seg_eval.py``) and :func:`write_imagefolder`
(class sub-folders of PNGs, for ``torchvision.datasets.ImageFolder``; the
folder names sort in label order).  Command line::

    python data/synthetic.py --out outputs/demo/data --n-val 400 --size 96
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "MIN_AREA",
    "MAX_AREA",
    "GENERATOR_VERSION",
    "Sample",
    "sample_rng",
    "shape_mask",
    "generate_sample",
    "generate_split",
    "write_imagefolder",
    "write_gtsegs_mat",
    "write_masks_npz",
    "SyntheticShapes",
    "main",
]

CLASS_NAMES: Tuple[str, ...] = ("arrow", "crescent", "cross", "disk", "ring", "square", "star", "triangle")
"""Shape classes; sorted, so ``ImageFolder`` class indices equal these labels."""
NUM_CLASSES = len(CLASS_NAMES)
MIN_AREA, MAX_AREA = 0.05, 0.40
"""Range of the object's area as a fraction of the image area."""
GENERATOR_VERSION = 1
"""Bumped whenever the pictures a (seed, split, index) gives change."""

_SUBPIXEL_BITS = 4  # cv2 fixed-point coordinates: 1/16 pixel


# --------------------------------------------------------------------------
# Shapes: unit outlines (extent about 1 around the origin), drawn as a list of
# (polygon, value) fills in order, so holes are polygons filled with 0.
# --------------------------------------------------------------------------
def _circle(radius: float, n: int = 96, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _regular(n: int, radius: float = 1.0, phase: float = np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = np.pi / 2 + np.arange(2 * points) * np.pi / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _cross(w: float = 0.3) -> np.ndarray:
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                     (-1, -w), (-w, -w)], dtype=np.float64)


def _arrow() -> np.ndarray:
    return np.array([(-1, -0.24), (0.15, -0.24), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.24), (-1, 0.24)],
                    dtype=np.float64)


_SHAPES: Dict[str, List[Tuple[np.ndarray, int]]] = {
    "arrow": [(_arrow(), 1)],
    "crescent": [(_circle(1.0), 1), (_circle(0.82, cx=0.5), 0)],
    "cross": [(_cross(), 1)],
    "disk": [(_circle(1.0), 1)],
    "ring": [(_circle(1.0), 1), (_circle(0.58), 0)],
    "square": [(_regular(4, phase=np.pi / 4), 1)],
    "star": [(_star(), 1)],
    "triangle": [(_regular(3), 1)],
}
assert tuple(sorted(_SHAPES)) == CLASS_NAMES == tuple(sorted(CLASS_NAMES))


def _placed(label: int, center: Tuple[float, float], radius: float, angle: float) -> List[Tuple[np.ndarray, int]]:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return [(poly @ rot.T * radius + np.asarray(center), val) for poly, val in _SHAPES[CLASS_NAMES[label]]]


def shape_mask(label: int, size: int, center: Tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Binary (size, size) uint8 mask of shape ``label`` scaled by ``radius``
    pixels, rotated by ``angle`` radians and centred at ``center`` = (x, y);
    pixel (row i, column j) is inside when its centre (x=j, y=i) is (cv2
    polygon filling, 1/16-pixel vertex precision)."""
    mask = np.zeros((size, size), np.uint8)
    scale = 1 << _SUBPIXEL_BITS
    for poly, val in _placed(label, center, radius, angle):
        pts = np.round(poly * scale).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [pts], int(val), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask


@functools.lru_cache(maxsize=None)
def _unit_area(label: int) -> float:
    """Area of the unit shape (radius 1), measured on a 2048-pixel raster."""
    r = 1000.0
    return float(shape_mask(label, 2048, (1024.0, 1024.0), r, 0.0).sum()) / (r * r)


# --------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------
@dataclass
class Sample:
    """One generated picture.

    Attributes
    ----------
    image: (H, W, 3) uint8 RGB.
    label: class index into :data:`CLASS_NAMES`.
    mask: (H, W) uint8, 1 on the object and 0 elsewhere (exact).
    background: (H, W, 3) uint8, the picture before the object was drawn.
    foreground: (H, W, 3) uint8, the object's paint; ``image`` is
        ``foreground`` where ``mask`` is 1 and ``background`` elsewhere.
    params: how the object was placed (area fraction, centre, radius, angle).
    """

    image: np.ndarray
    label: int
    mask: np.ndarray
    background: np.ndarray = field(repr=False)
    foreground: np.ndarray = field(repr=False)
    params: Dict[str, float] = field(default_factory=dict)


def _split_id(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample (independent of every other)."""
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), _split_id(split), int(index), GENERATOR_VERSION])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    small = rng.random((cells, cells, channels), dtype=np.float32)
    out = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return out.reshape(size, size, channels)


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A darkish, low-saturation colour (backgrounds and most clutter)."""
    c = 0.08 + 0.37 * rng.random(3, dtype=np.float32)
    return (0.55 * c.mean() + 0.45 * c).astype(np.float32)


def _vivid(rng: np.random.Generator) -> np.ndarray:
    """A bright, saturated colour (objects, some clutter)."""
    import colorsys

    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.9, 1.0))
    return np.asarray(rgb, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background: colour blobs, waves or a rotated checker in muted
    colours, mixed with low-frequency colour noise and fine grain.
    Float (H, W, 3), about [0, 1]."""
    c1 = _muted(rng)
    c2 = np.clip(c1 + rng.uniform(-0.15, 0.15, 3).astype(np.float32), 0, 1)
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    if kind == 0:
        t = _smooth_noise(rng, size, int(rng.integers(3, 9)), 1)[..., 0]
    elif kind == 1:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 9) * u + phase)
    else:
        period = rng.uniform(0.06, 0.2)
        t = (np.floor(u / period) + np.floor(v / period)) % 2
    bg = c1 * t[..., None] + c2 * (1 - t[..., None])
    bg = bg + 0.25 * (_smooth_noise(rng, size, int(rng.integers(2, 6))) - 0.5)
    bg = bg + rng.normal(0, 0.03, (size, size, 3)).astype(np.float32)
    return np.ascontiguousarray(bg, dtype=np.float32)


def _clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Draw distractors in place: thin lines, open scribbles, small amorphous
    blobs and dots (mostly muted, some vivid), none of them a shape class."""
    size = img.shape[0]
    for _ in range(int(rng.integers(6, 16))):
        colour = tuple(float(c) for c in (_vivid(rng) if rng.random() < 0.25 else _muted(rng)))
        kind = int(rng.integers(4))
        if kind == 0:  # straight thin line
            p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
            cv2.line(img, (int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), colour,
                     thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
        elif kind == 1:  # open scribble (random walk)
            steps = rng.normal(0, size * 0.12, (int(rng.integers(3, 7)), 2))
            pts = np.cumsum(steps, axis=0) + rng.uniform(0, size, 2)
            cv2.polylines(img, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], False, colour,
                          thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_AA)
        elif kind == 2:  # amorphous blob, at most about 2% of the image
            side = int(rng.integers(max(4, size // 12), max(5, size // 6) + 1))
            blob = _smooth_noise(rng, side, 4, 1)[..., 0]
            fade = 1 - np.hypot(*np.mgrid[-1:1:side * 1j, -1:1:side * 1j])  # keeps it away from the box edge
            inside = (blob * fade) > 0.35
            y, x = (int(v) for v in rng.integers(0, size - side + 1, 2))
            img[y:y + side, x:x + side][inside] = colour
        else:  # scattered dots
            for _ in range(int(rng.integers(3, 9))):
                p = rng.integers(0, size, 2)
                cv2.circle(img, (int(p[0]), int(p[1])), int(rng.integers(1, 3)), colour, -1, lineType=cv2.LINE_AA)


def _object_paint(rng: np.random.Generator, size: int, avoid: np.ndarray) -> np.ndarray:
    """The object's paint over the whole frame: a bright colour, brighter
    than and far from ``avoid`` (the background's mean under the object),
    shaded, sometimes striped or speckled. Float (H, W, 3), about [0, 1]."""
    best, best_score = None, -np.inf
    for _ in range(24):
        c = _vivid(rng)
        score = min(float(np.linalg.norm(c - avoid)), 2.0 * float(c.mean() - avoid.mean()))
        if score > best_score:
            best, best_score = c, score
        if score > 0.45:
            break
    paint = best * (0.85 + 0.15 * _smooth_noise(rng, size, 3, 1))
    style = int(rng.integers(3))
    if style == 1:  # stripes of a second colour
        c2 = np.clip(best + rng.uniform(-0.25, 0.1, 3).astype(np.float32), 0, 1)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        th = rng.uniform(0, np.pi)
        t = (np.sin((xx * math.cos(th) + yy * math.sin(th)) * 2 * np.pi / rng.uniform(4, 10)) > 0)[..., None]
        paint = np.where(t, paint, c2 * (0.85 + 0.15 * _smooth_noise(rng, size, 3, 1)))
    elif style == 2:  # speckle
        paint = paint + rng.normal(0, 0.05, (size, size, 3)).astype(np.float32)
    return paint.astype(np.float32)


def _place(rng: np.random.Generator, label: int, size: int) -> Dict[str, float]:
    """Random area fraction in [MIN_AREA, MAX_AREA], angle and a centre that
    keeps the whole object inside the frame (shrunk only if it cannot fit)."""
    frac = float(rng.uniform(MIN_AREA, MAX_AREA))
    angle = float(rng.uniform(0, 2 * np.pi))
    radius = math.sqrt(frac * size * size / _unit_area(label))
    pts = np.concatenate([p for p, v in _placed(label, (0.0, 0.0), 1.0, angle) if v == 1])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    cap = (size - 3.5) / float((hi - lo).max())
    if radius < cap:  # one correction for the rasterisation at this size (measured on a larger canvas)
        measured = float(shape_mask(label, 2 * size, (size, size), radius, angle).sum())
        if measured > 0:
            radius *= math.sqrt(frac * size * size / measured)
    radius = min(radius, cap)
    cx = rng.uniform(1 - lo[0] * radius, size - 2 - hi[0] * radius)
    cy = rng.uniform(1 - lo[1] * radius, size - 2 - hi[1] * radius)
    return {"area_fraction": frac, "center_x": float(cx), "center_y": float(cy), "radius": float(radius),
            "angle": angle}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate_sample(index: int, seed: int = 0, size: int = 96, split: str = "train") -> Sample:
    """Sample ``index`` of ``split`` (deterministic in ``seed, split, index``).

    The label is ``index % NUM_CLASSES``.  The picture: textured background
    with clutter, then the object composited through its exact mask.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = sample_rng(seed, split, index)
    label = int(index % NUM_CLASSES)
    bg = _background(rng, size)
    _clutter(rng, bg)
    params = _place(rng, label, size)
    mask = shape_mask(label, size, (params["center_x"], params["center_y"]), params["radius"], params["angle"])
    avoid = bg[mask.astype(bool)].mean(axis=0) if mask.any() else bg.mean(axis=(0, 1))
    paint = _object_paint(rng, size, np.clip(avoid, 0, 1))
    if rng.random() < 0.7:  # a darker rim, inside the mask
        rim = mask.astype(bool) & ~cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
        paint[rim] *= 0.45
    background, foreground = _to_uint8(bg), _to_uint8(paint)
    image = np.where(mask[..., None].astype(bool), foreground, background)
    params["measured_area_fraction"] = float(mask.mean())
    return Sample(image=image, label=label, mask=mask, background=background, foreground=foreground, params=params)


def generate_split(n: int, seed: int = 0, size: int = 96, split: str = "val", start: int = 0
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``start .. start+n-1`` as arrays: images (n, H, W, 3) uint8,
    labels (n,) int64, masks (n, H, W) uint8."""
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    labels = np.empty((n,), np.int64)
    for k in range(n):
        s = generate_sample(start + k, seed, size, split)
        images[k], masks[k], labels[k] = s.image, s.mask, s.label
    return images, labels, masks


def _manifest(n: int, seed: int, size: int, split: str) -> dict:
    return {"generator": "data/synthetic.py", "generator_version": GENERATOR_VERSION, "n": n, "seed": seed,
            "size": size, "split": split, "class_names": list(CLASS_NAMES)}


def _progress(iterable, total: int, desc: str, quiet: bool):
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def write_imagefolder(root: str, n: int, seed: int = 0, size: int = 96, split: str = "val",
                      quiet: bool = True) -> dict:
    """Write ``n`` samples as ``root/<class name>/<index:06d>.png`` (RGB) plus
    ``root/manifest.json`` (parameters and the label of every file) and
    ``root/masks.npz`` (``masks`` (n, H, W) uint8, ``labels`` (n,), in index order).

    ``torchvision.datasets.ImageFolder(root)`` reads it with class index ==
    label, since :data:`CLASS_NAMES` is sorted.  Returns the manifest.
    """
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    files, labels, masks = [], [], np.empty((n, size, size), np.uint8)
    for i in _progress(range(n), n, f"writing {split} images", quiet):
        s = generate_sample(i, seed, size, split)
        rel = os.path.join(CLASS_NAMES[s.label], f"{i:06d}.png")
        if not cv2.imwrite(os.path.join(root, rel), np.ascontiguousarray(s.image[..., ::-1])):
            raise OSError(f"could not write {os.path.join(root, rel)}")
        files.append(rel)
        labels.append(s.label)
        masks[i] = s.mask
    np.savez_compressed(os.path.join(root, "masks.npz"), masks=masks, labels=np.asarray(labels, np.int64))
    manifest = _manifest(n, seed, size, split)
    manifest["files"] = files
    manifest["labels"] = labels
    from modules.cli import atomic_write_text
    atomic_write_text(os.path.join(root, "manifest.json"), json.dumps(manifest, indent=1))  # last: marks it complete
    return manifest


def write_masks_npz(path: str, n: int, seed: int = 0, size: int = 96, split: str = "val") -> str:
    """Write images, labels and masks of ``n`` samples to one ``.npz``."""
    images, labels, masks = generate_split(n, seed, size, split)
    np.savez_compressed(path, images=images, labels=labels, masks=masks)
    return path


def _matlab_header() -> bytes:
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by data/synthetic.py HDF5 schema 1.00 ."
    return text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"


def write_gtsegs_mat(path: str, n: int, seed: int = 0, size: int = 96, split: str = "val",
                     quiet: bool = True) -> str:
    """Write ``n`` samples as a MATLAB v7.3-style ``.mat`` in the layout of
    ``gtsegs_ijcv.mat`` (METHODS.md section 4).

    ``/value/img`` (n, 1) holds references to uint8 (3, W, H) arrays,
    ``/value/gt`` (n, 1) references to (1, 1) arrays of references to the
    uint8 (W, H) masks; the referenced data lives in ``/#refs#`` as MATLAB
    writes it, and a 512-byte MATLAB header precedes the HDF5 data.  The
    labels (not in the real file) are added as ``/synthetic/label`` (n,) with
    the class names as an attribute.  Written to a temporary file, then
    renamed, so a partial file never has the final name.
    """
    import h5py

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    ref = h5py.ref_dtype
    try:
        with h5py.File(tmp, "w", userblock_size=512) as f:
            refs = f.create_group("#refs#")
            value = f.create_group("value")
            value.attrs["MATLAB_class"] = np.bytes_("struct")
            img = value.create_dataset("img", (n, 1), dtype=ref)
            gt = value.create_dataset("gt", (n, 1), dtype=ref)
            for d in (img, gt):
                d.attrs["MATLAB_class"] = np.bytes_("cell")
            labels = np.empty((n,), np.int64)
            for i in _progress(range(n), n, f"writing {os.path.basename(path)}", quiet):
                s = generate_sample(i, seed, size, split)
                d_img = refs.create_dataset(f"img{i}", data=np.ascontiguousarray(s.image.transpose(2, 1, 0)))
                d_img.attrs["MATLAB_class"] = np.bytes_("uint8")
                d_gt = refs.create_dataset(f"gt{i}", data=np.ascontiguousarray(s.mask.T))
                d_gt.attrs["MATLAB_class"] = np.bytes_("uint8")
                cell = refs.create_dataset(f"gtcell{i}", (1, 1), dtype=ref)
                cell.attrs["MATLAB_class"] = np.bytes_("cell")
                cell[0, 0] = d_gt.ref
                img[i, 0] = d_img.ref
                gt[i, 0] = cell.ref
                labels[i] = s.label
            meta = f.create_group("synthetic")
            meta.create_dataset("label", data=labels)
            for k, v in _manifest(n, seed, size, split).items():
                meta.attrs[k] = json.dumps(v)
        with open(tmp, "r+b") as fh:
            fh.write(_matlab_header())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class SyntheticShapes(Dataset):
    """``torch.utils.data.Dataset`` of generated samples, made on demand.

    Items are ``(image, label)`` (or ``(image, label, mask)`` with
    ``with_mask``): ``image`` a float (3, H, W) tensor normalised with
    ``mean``/``std`` from [0, 1] pixels, ``mask`` a (H, W) long tensor.
    """

    def __init__(self, n: int, seed: int = 0, size: int = 96, split: str = "train", start: int = 0,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 with_mask: bool = False):
        self.n, self.seed, self.size, self.split, self.start = n, seed, size, split, start
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.with_mask = with_mask

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = generate_sample(self.start + i, self.seed, self.size, self.split)
        x = (s.image.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
        out = (torch.from_numpy(x), s.label)
        if self.with_mask:
            out = out + (torch.from_numpy(s.mask.astype(np.int64)),)
        return out


MAX_SIZE = 1024
"""Largest --size of the command line (the stand-in is meant to be small)."""
MAX_MASK_BYTES = 8 << 30
"""Largest n * size * size of one split (its masks are held in memory)."""


def build_parser() -> argparse.ArgumentParser:
    from modules import cli

    parser = argparse.ArgumentParser(
        description="Write the synthetic shapes stand-in: <out>/train and <out>/val as ImageFolder trees "
                    "and <out>/val_gtsegs.mat in the gtsegs_ijcv.mat layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (checked for writing before any work)")
    parser.add_argument("--n-train", type=cli.int_range(0, 10_000_000), default=0,
                        help="training images to write as an ImageFolder (training itself generates them on the fly)")
    parser.add_argument("--n-val", type=cli.int_range(0, 10_000_000), default=400,
                        help="validation images (ImageFolder and .mat)")
    parser.add_argument("--size", type=cli.int_range(16, MAX_SIZE), default=96, help="image side in pixels")
    parser.add_argument("--seed", type=cli.int_range(0, 2 ** 63 - 1), default=0, help="generator seed")
    parser.add_argument("--formats", nargs="+", choices=("imagefolder", "mat"), default=["imagefolder", "mat"],
                        help="what to write for the validation split")
    return parser


def _main(argv: Optional[Sequence[str]]) -> int:
    from modules import cli

    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, n in (("--n-train", args.n_train), ("--n-val", args.n_val)):
        if n * args.size * args.size > MAX_MASK_BYTES:
            parser.error(f"{flag} {n} at --size {args.size} needs {n * args.size ** 2 / 2 ** 30:.1f} GiB of masks "
                         f"in memory (limit {MAX_MASK_BYTES >> 30} GiB)")
    cli.check_output_dir(args.out, flag="--out")
    try:
        if args.n_train:
            write_imagefolder(os.path.join(args.out, "train"), args.n_train, args.seed, args.size, "train", quiet=False)
        if args.n_val and "imagefolder" in args.formats:
            write_imagefolder(os.path.join(args.out, "val"), args.n_val, args.seed, args.size, "val", quiet=False)
        if args.n_val and "mat" in args.formats:
            write_gtsegs_mat(os.path.join(args.out, "val_gtsegs.mat"), args.n_val, args.seed, args.size, "val",
                             quiet=False)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; a tree without manifest.json is incomplete: run the same command "
                                "again") from None
    print(f"wrote the synthetic stand-in under {args.out} (seed {args.seed}, size {args.size}, "
          f"{args.n_train} train / {args.n_val} val images)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write the stand-in; bad flags or an unwritable --out exit 2, Ctrl-C 130."""
    from modules import cli
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
