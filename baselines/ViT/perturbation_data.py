"""Files of the perturbation test (../shared/METHODS.md section 5): the image
tree, the model's identity and the HDF5 stores of relevance maps.

The maps of one run live first in one *part file* per process
(``results.part{rank}of{world}.hdf5``), then are merged into ``results.hdf5``.

Crash safety of a part file: it is created complete under a unique temporary
name and linked into place only if no other run created it meanwhile (an
existing part and its finished batches are never replaced); every dataset is contiguous and allocated when the
file is created, so afterwards only raw values are written at fixed offsets
and the file's structure (its HDF5 metadata) never changes.  A batch's rows
are written, flushed and synced before its ``batch_done`` flag is set and
synced, so a process killed at any moment leaves a readable file in which
every flagged batch is complete; a rerun recomputes only unflagged batches
and overwrites their rows (never appends, so nothing is duplicated).
``results.hdf5`` is written under a unique temporary name and renamed, so it
is either absent or complete, and two merges never share a temporary.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from modules.checkpoints import file_sha256, weights_sha256  # noqa: F401 - re-exported

__all__ = [
    "InputError",
    "FORMAT",
    "RESULTS_NAME",
    "ImageList",
    "open_image_tree",
    "RobustImageDataset",
    "encode_maps",
    "decode_maps",
    "set_tf32",
    "file_sha256",
    "weights_sha256",
    "part_path",
    "find_parts",
    "identity_mismatch",
    "PartFile",
    "merge_parts",
    "read_results",
]

FORMAT = "transformer-explainability/perturbation-maps/1"
RESULTS_NAME = "results.hdf5"
_PART_RE = re.compile(r"^results\.part(\d+)of(\d+)\.hdf5$")


class InputError(Exception):
    """Bad input: reported in one line with exit status 2."""


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------
@dataclass
class ImageList:
    """The images of a tree: ``samples`` = [(path, label)], sorted as
    torchvision's ``ImageFolder`` sorts them, and the tree's ``root``."""

    root: str
    samples: List[Tuple[str, int]]
    classes: List[str]

    def sha256(self) -> str:
        """Hash of the (relative path, label) list: identifies the tree."""
        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{os.path.relpath(path, self.root)}\t{label}\n".encode())
        return h.hexdigest()


#: File extensions torchvision's ImageFolder accepts.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples, classes) exactly as ``torchvision.datasets.ImageFolder``
    lists them (sorted class folders, sorted walk, case-insensitive
    extensions), without importing torchvision."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), label))
    return samples, classes


def open_image_tree(root: str) -> ImageList:
    """The images of an ImageNet validation tree as torchvision reads it.

    ``root`` is an ``ImageFolder`` tree (``root/<class>/<image>``; classes
    sorted by name, so ImageNet's synset folders give the standard 0..999
    labels) or an ``ImageNet`` root (``meta.bin`` and ``val/``).  A missing
    or empty tree raises :class:`InputError`.  Files are only listed here;
    an unreadable one is found (and skipped) when it is loaded.
    """
    if not os.path.exists(root):
        raise InputError(f"image directory not found: {root}")
    if not os.path.isdir(root):
        raise InputError(f"not a directory: {root} (expected an ImageFolder tree root/<class>/<image>)")
    if os.path.isfile(os.path.join(root, "meta.bin")) and os.path.isdir(os.path.join(root, "val")):
        from torchvision.datasets import ImageNet

        try:
            ds = ImageNet(root, split="val")
        except Exception as exc:  # torchvision raises several kinds
            raise InputError(f"{root}: not a readable torchvision ImageNet root ({exc})") from None
        samples, classes, root = list(ds.samples), [c[0] for c in ds.classes], ds.split_folder
    else:
        samples, classes = _image_folder(root)
        if not classes:
            raise InputError(f"no class sub-directories in {root} "
                             "(expected an ImageFolder tree root/<class>/<image>)")
        if set(classes) <= {"train", "val", "validation", "test"}:
            raise InputError(f"{root} holds split folders ({', '.join(classes)}), not classes; "
                             f"pass the validation split, e.g. {os.path.join(root, classes[-1])}")
    if not samples:
        raise InputError(f"no images in {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return ImageList(root=os.path.abspath(root), samples=list(samples), classes=list(classes))


def load_image(path: str, size: Tuple[int, int]) -> Tensor:
    """(3, H, W) float in [0, 1]: RGB, resized to ``size`` (no crop) with
    Pillow's antialiased bilinear filter, as ``transforms.Resize((H, W))``
    does on a PIL image (METHODS §5)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((int(size[1]), int(size[0])), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class RobustImageDataset(Dataset):
    """Images by dataset index; an unreadable file gives a zero image and the
    reason instead of an exception, so one bad file does not stop a run.

    Items are ``(index, image (3, H, W) in [0, 1], label, error)`` with
    ``error == ""`` for a good image.
    """

    def __init__(self, images: ImageList, size: Tuple[int, int]):
        self.images = images
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.images.samples)

    def __getitem__(self, index: int):
        path, label = self.images.samples[index]
        try:
            image = load_image(path, self.size)
            error = ""
        except Exception as exc:  # any decoder error: report, do not stop
            image = torch.zeros(3, *self.size)
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return int(index), image, int(label), error


# --------------------------------------------------------------------------
# Maps in float16
# --------------------------------------------------------------------------
def encode_maps(maps: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, h, w) float maps -> (float16 (map - min) / range, float32 range, float32 min) per row.

    Raw relevance can be tiny (transformer attribution of a ViT-B is often
    ~1e-6, float16's subnormal range) or a small variation on a large offset
    (rollout of a deep model), so each row is min-max scaled to [0, 1] before
    the cast: every row keeps float16's precision relative to its own range,
    which is what the ranking of pixels depends on.  The raw map is
    ``decode_maps(vis, scale, offset)``.  Constant (or non-finite) rows get
    range 1.
    """
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(len(maps), -1)
    if maps.size:
        offset, top = flat.min(axis=1), flat.max(axis=1)
    else:
        offset = top = np.zeros(len(maps), np.float32)
    scale = top - offset
    ok = np.isfinite(scale) & (scale > 0)
    scale = np.where(ok, scale, 1.0).astype(np.float32)
    offset = np.where(np.isfinite(offset), offset, 0.0).astype(np.float32)
    shape = (-1, *([1] * (maps.ndim - 1)))
    if not np.isfinite(maps).all():
        raise InputError("maps hold NaN or Inf values; refusing to store them (as zeros)")
    vis = np.clip((maps - offset.reshape(shape)) / scale.reshape(shape), 0.0, 1.0)
    return vis.astype(np.float16), scale, offset


def decode_maps(vis: np.ndarray, scale: np.ndarray, offset: Optional[np.ndarray] = None) -> np.ndarray:
    """Inverse of :func:`encode_maps`, in float32."""
    shape = (-1, *([1] * (np.ndim(vis) - 1)))
    out = np.asarray(vis, dtype=np.float32) * np.asarray(scale, np.float32).reshape(shape)
    return out if offset is None else out + np.asarray(offset, np.float32).reshape(shape)


def set_tf32(enabled: bool) -> None:
    """Allow or forbid TensorFloat-32 in CUDA matmuls and cuDNN convolutions.

    The scripts forbid it by default: on an H100, relevance of a ViT-B
    (random weights) differed from the CPU's by up to 4x the map's maximum
    for transformer attribution with cuDNN's default TF32 convolutions, and
    by 0.16x without; rollout by 1e-5 either way.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


# --------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------
def _plain(value):
    """HDF5 attribute value -> JSON-like Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_attrs(f: h5py.File, identity: Dict) -> None:
    """The identity as readable attributes (None as -1) and as one JSON string
    (what is compared), plus the format tag."""
    f.attrs["format"] = FORMAT
    for key, value in identity.items():
        f.attrs[key] = -1 if value is None else (list(value) if isinstance(value, tuple) else value)
    f.attrs["identity_json"] = json.dumps(identity, sort_keys=True)


def _read_identity(f: h5py.File, path: str) -> Dict:
    fmt = _plain(f.attrs.get("format", ""))
    if fmt != FORMAT or "identity_json" not in f.attrs:
        raise InputError(f"{path} is not a relevance-map file of this project (format {fmt!r}, expected {FORMAT!r})")
    try:
        identity = json.loads(_plain(f.attrs["identity_json"]))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: malformed metadata: attribute identity_json is not JSON "
                         f"({str(exc).splitlines()[0]})") from None
    if not isinstance(identity, dict):
        raise InputError(f"{path}: malformed metadata: attribute identity_json must be a JSON object, "
                         f"got {type(identity).__name__}")
    return identity


def _check_rows(f: h5py.File, path: str) -> None:
    """Types, shapes, ranges and finiteness of a merged file's datasets (one line naming the field)."""
    n = None
    for name in ("index", "target", "pred", "vis_scale", "vis_offset"):
        d = f[name]
        if not isinstance(d, h5py.Dataset) or d.ndim != 1:
            raise InputError(f"{path}: dataset {name!r} must be one-dimensional")
        kind = d.dtype.kind
        if kind not in ("iu" if name in ("index", "target", "pred") else "f"):
            raise InputError(f"{path}: dataset {name!r} has dtype {d.dtype}, expected "
                             f"{'integers' if name in ('index', 'target', 'pred') else 'floats'}")
        if n is None:
            n = d.shape[0]
        elif d.shape[0] != n:
            raise InputError(f"{path}: dataset {name!r} has {d.shape[0]} rows, 'index' has {n}")
    vis = f["vis"]
    if not isinstance(vis, h5py.Dataset) or vis.ndim != 3 or vis.shape[0] != n or vis.dtype.kind != "f":
        raise InputError(f"{path}: dataset 'vis' must be float maps (n={n}, h, w), got {getattr(vis, 'shape', None)}")
    if n == 0:
        raise InputError(f"{path}: no rows")
    index = f["index"][()]
    if (index < 0).any():
        raise InputError(f"{path}: dataset 'index' holds negative image numbers ({int(index.min())})")
    if len(np.unique(index)) != n:
        raise InputError(f"{path}: dataset 'index' repeats image numbers")
    for name in ("vis_scale", "vis_offset"):
        if not np.isfinite(f[name][()]).all():
            raise InputError(f"{path}: dataset {name!r} holds NaN or Inf")
    for a in range(0, n, 4096):  # the maps, a block at a time
        if not np.isfinite(vis[a:a + 4096]).all():
            raise InputError(f"{path}: dataset 'vis' holds NaN or Inf maps (rows {a}..{min(a + 4096, n) - 1})")


def identity_mismatch(found: Dict, wanted: Dict, keys: Optional[Sequence[str]] = None) -> List[str]:
    """``"key: file has X, this run Y"`` for every differing key."""
    keys = sorted(set(found) | set(wanted)) if keys is None else keys
    return [f"{k}: file has {found.get(k)!r}, this run {wanted.get(k)!r}"
            for k in keys if _plain(found.get(k)) != _plain(wanted.get(k))]


# --------------------------------------------------------------------------
# Part files (one per process, resumable)
# --------------------------------------------------------------------------
def part_path(output_dir: str, rank: int, world: int) -> str:
    """Path of the part file of process ``rank`` out of ``world``."""
    return os.path.join(output_dir, f"results.part{rank}of{world}.hdf5")


def find_parts(output_dir: str) -> Dict[int, List[str]]:
    """Part files in ``output_dir`` grouped by world size."""
    groups: Dict[int, List[str]] = {}
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            m = _PART_RE.match(name)
            if m:
                groups.setdefault(int(m.group(2)), []).append(os.path.join(output_dir, name))
    return groups


def _preallocated(f: h5py.File, name: str, shape: Tuple[int, ...], dtype) -> h5py.Dataset:
    """A contiguous dataset whose space is reserved now (no later metadata change)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def _unique_tmp(path: str) -> str:
    """A new empty file next to ``path`` under a name no other run uses
    (``.NAME.PID.XXXX.tmp``, which :func:`modules.cli.remove_stale_temporaries`
    clears once PID is gone), to be written and then renamed into place."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _sync(f: h5py.File) -> None:
    f.flush()
    try:
        os.fsync(f.id.get_vfd_handle())
    except (OSError, TypeError, ValueError):  # a driver without a file descriptor
        pass


class PartFile:
    """The resumable store of one process: its rows, in global batch order.

    Datasets: ``index`` (dataset index, written at creation), ``target``,
    ``pred``, ``valid`` (0 for an unreadable image), ``vis`` (n, h, w)
    float16 with ``vis_scale`` and ``vis_offset`` (n,) float32 (see :func:`encode_maps`), ``batch_offsets``
    (first row of each batch, plus n) and
    ``batch_done`` (1 once a batch is committed).
    """

    def __init__(self, path: str, f: h5py.File):
        self.path, self.f = path, f
        self.offsets = f["batch_offsets"][()]
        self.done = f["batch_done"][()].astype(bool)

    # -- life cycle -------------------------------------------------------
    @classmethod
    def open_or_create(cls, path: str, identity: Dict, batches: Sequence[np.ndarray],
                       map_shape: Tuple[int, int]) -> "PartFile":
        """Open ``path`` to continue it, or create it for ``batches`` (lists of
        dataset indices).  A file written with another identity raises
        :class:`InputError` naming what differs."""
        if not os.path.exists(path):
            cls._create(path, identity, batches, map_shape)
        try:
            f = h5py.File(path, "r+")
        except OSError as exc:
            raise InputError(f"{path}: cannot be opened ({exc}); delete it to start this part over") from None
        try:
            found = _read_identity(f, path)
            diff = identity_mismatch(found, identity)
            if diff:
                raise InputError(f"{path} was written with other arguments ({'; '.join(diff)}); "
                                 "rerun with the same arguments to continue it, or delete it to start over")
            index = np.concatenate(list(batches)) if len(batches) else np.zeros(0, np.int64)
            if not np.array_equal(f["index"][()], index) or tuple(f["vis"].shape[1:]) != tuple(map_shape):
                raise InputError(f"{path} does not match this run's images; delete it to start over")
        except BaseException:
            f.close()
            raise
        return cls(path, f)

    @staticmethod
    def _create(path: str, identity: Dict, batches: Sequence[np.ndarray], map_shape: Tuple[int, int]) -> None:
        index = np.concatenate(list(batches)).astype(np.int64) if len(batches) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in batches])]).astype(np.int64)
        n = len(index)
        tmp = _unique_tmp(path)
        try:
            with h5py.File(tmp, "w") as f:
                _write_attrs(f, identity)
                for name, data in (("index", index), ("batch_offsets", offsets),
                                   ("batch_done", np.zeros(len(batches), np.uint8))):
                    _preallocated(f, name, data.shape, data.dtype)[...] = data
                for name in ("target", "pred"):
                    _preallocated(f, name, (n,), np.int64)
                _preallocated(f, "valid", (n,), np.uint8)
                _preallocated(f, "vis", (n, *map_shape), np.float16)
                _preallocated(f, "vis_scale", (n,), np.float32)
                _preallocated(f, "vis_offset", (n,), np.float32)
            try:  # publish only if no other run created the part meanwhile (never replace its batches)
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links
                if not os.path.exists(path):
                    os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self) -> "PartFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- batches ----------------------------------------------------------
    @property
    def num_batches(self) -> int:
        return len(self.done)

    def pending(self) -> List[int]:
        """Batches (local numbers) not yet committed."""
        return [j for j in range(self.num_batches) if not self.done[j]]

    def batch_index(self, j: int) -> np.ndarray:
        return self.f["index"][self.offsets[j]:self.offsets[j + 1]]

    def commit(self, j: int, target: np.ndarray, pred: np.ndarray, valid: np.ndarray, maps: np.ndarray) -> None:
        """Write batch ``j``'s rows (``maps`` (rows, h, w) as ``explain``
        returned them), sync, then flag the batch done and sync."""
        vis, scale, offset = encode_maps(maps)
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        if len(target) != b - a or vis.shape[1:] != self.f["vis"].shape[1:]:
            raise ValueError(f"batch {j}: {len(target)} rows of {vis.shape[1:]} for {b - a} rows of "
                             f"{self.f['vis'].shape[1:]}")
        if b > a:
            self.f["target"][a:b] = target
            self.f["pred"][a:b] = pred
            self.f["valid"][a:b] = valid
            self.f["vis"][a:b] = vis
            self.f["vis_scale"][a:b] = scale
            self.f["vis_offset"][a:b] = offset
        _sync(self.f)
        self.f["batch_done"][j] = 1
        _sync(self.f)
        self.done[j] = True


# --------------------------------------------------------------------------
# The merged file
# --------------------------------------------------------------------------
def merge_parts(paths: Sequence[str], out_path: str, identity: Dict, info: Dict,
                samples: Optional[Sequence[Tuple[str, int]]] = None, block_rows: int = 4096) -> Dict:
    """Merge the complete part files of one run into ``out_path`` (atomically).

    ``paths[r]`` is the part of rank r, which holds global batches r, r + w,
    r + 2w, ... (w = ``len(paths)``); the merge walks the global batches in
    order, so rows come out sorted by dataset index, and copies the maps in
    blocks (memory stays small even for pixel-level ``lrp`` maps).  Only
    readable images become rows; ``skipped_index`` (and ``skipped_path``
    when ``samples`` is given) lists the others.  ``identity`` (without the
    per-process keys) and ``info`` become the attributes.  Returns a summary.
    """
    world = len(paths)
    files: List[h5py.File] = []
    tmp = None
    try:
        for path in paths:
            if not os.path.isfile(path):
                raise InputError(f"part file missing: {path}; run the same command again to write it")
            f = h5py.File(path, "r")
            files.append(f)
            diff = identity_mismatch(_read_identity(f, path), identity, keys=sorted(identity))
            if diff:
                raise InputError(f"{path} was written with other arguments ({'; '.join(diff)})")
            done = f["batch_done"][()]
            if not done.all():
                raise InputError(f"{path} is incomplete ({int(done.sum())} of {done.size} batches done); "
                                 "run the same command again to finish it")
        small = [{k: f[k][()] for k in ("index", "target", "pred", "valid", "vis_scale", "vis_offset", "batch_offsets")}
                 for f in files]
        total = sum(len(p["batch_offsets"]) - 1 for p in small)
        for r, p in enumerate(small):
            if len(p["batch_offsets"]) - 1 != len(range(r, total, world)):
                raise InputError(f"the part files {', '.join(paths)} are not the shards of one run")
        n = int(sum(int(p["valid"].sum()) for p in small))
        if n == 0:
            raise InputError("no readable image: nothing to write")
        map_shape = tuple(files[0]["vis"].shape[1:])
        chunk_rows = max(1, min(n, 1024, (1 << 20) // (2 * int(np.prod(map_shape)))))
        tmp = _unique_tmp(out_path)
        with h5py.File(tmp, "w") as out:
            _write_attrs(out, identity)
            for key, value in info.items():
                out.attrs[key] = -1 if value is None else value
            dsets = {k: out.create_dataset(k, (n,), np.int64) for k in ("index", "target", "pred")}
            vis_out = out.create_dataset("vis", (n, *map_shape), np.float16, chunks=(chunk_rows, *map_shape),
                                         compression="gzip", compression_opts=4, shuffle=True)
            for k in ("vis_scale", "vis_offset"):
                dsets[k] = out.create_dataset(k, (n,), np.float32)
            skipped: List[int] = []
            pos = 0
            buf: Dict[str, List[np.ndarray]] = {k: [] for k in ("index", "target", "pred", "vis_scale", "vis_offset", "vis")}

            def flush() -> int:
                if not buf["index"]:
                    return pos
                m = sum(len(v) for v in buf["index"])
                for k, d in dsets.items():
                    d[pos:pos + m] = np.concatenate(buf[k])
                vis_out[pos:pos + m] = np.concatenate(buf["vis"])
                for v in buf.values():
                    v.clear()
                return pos + m

            for g in range(total):
                r, j = g % world, g // world
                p = small[r]
                a, b = int(p["batch_offsets"][j]), int(p["batch_offsets"][j + 1])
                ok = p["valid"][a:b].astype(bool)
                skipped.extend(p["index"][a:b][~ok].tolist())
                if ok.any():
                    for k in ("index", "target", "pred", "vis_scale", "vis_offset"):
                        buf[k].append(p[k][a:b][ok])
                    buf["vis"].append(files[r]["vis"][a:b][ok])
                if sum(len(v) for v in buf["index"]) >= block_rows:
                    pos = flush()
            pos = flush()
            index = dsets["index"][()]
            if pos != n or np.any(np.diff(index) <= 0):
                raise InputError(f"the part files {', '.join(paths)} overlap or are out of order")
            out.attrs["num_images"] = n
            out.attrs["num_skipped"] = len(skipped)
            out.create_dataset("skipped_index", data=np.asarray(skipped, dtype=np.int64))
            if samples is not None:
                out.create_dataset("skipped_path", data=[samples[i][0] for i in skipped], dtype=h5py.string_dtype())
        os.replace(tmp, out_path)
    finally:
        for f in files:
            f.close()
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return {"num_images": n, "num_skipped": len(skipped)}


def read_results(path: str) -> Tuple[Dict, Dict]:
    """Identity and info attributes of a merged ``results.hdf5``; anything
    else (missing, unreadable, another format, a part file) raises
    :class:`InputError`."""
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_NAME)
    if not os.path.isfile(path):
        raise InputError(f"relevance maps not found: {path} (run generate_visualizations.py first)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        identity = _read_identity(f, path)
        if "batch_done" in f:
            raise InputError(f"{path} is an unmerged part file; run generate_visualizations.py --merge")
        for name in ("index", "target", "pred", "vis", "vis_scale", "vis_offset"):
            if name not in f:
                raise InputError(f"{path} lacks the dataset {name!r}")
        try:
            _check_rows(f, path)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # h5py's errors for corrupt blocks
            raise InputError(f"{path}: unreadable datasets ({str(exc).splitlines()[0]})") from None
        info = {k: _plain(v) for k, v in f.attrs.items() if k != "identity_json"}
    return identity, info
