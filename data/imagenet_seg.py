"""Reader of ``gtsegs_ijcv.mat``, the ImageNet-segmentation test set
(4,276 images with object masks; ../shared/METHODS.md section 4).

The file is MATLAB v7.3, i.e. HDF5: ``/value/img`` is an (n, 1) array of
object references, each to a uint8 image stored transposed as (3, W, H);
``/value/gt`` is (n, 1) references to (1, 1) arrays of references to the
uint8 mask stored as (W, H).  Image i is
``f[f['/value/img'][i, 0]][()].transpose(2, 1, 0)`` and its mask
``f[f[f['/value/gt'][i, 0]][0, 0]][()].transpose(1, 0)``.

The file is opened lazily, once per process (so every DataLoader worker has
its own handle); the dataset object itself pickles without one.
"""
from __future__ import annotations

import copy
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SegmentationDataError", "MAX_PIXELS", "ImagenetSegmentation", "check_gtsegs_file", "read_sample", "resize_pair"]


class SegmentationDataError(ValueError):
    """A segmentation file that is missing or not in the gtsegs layout."""


MAX_PIXELS = 89_478_485
"""Largest image or mask read from a gtsegs file (Pillow's decompression-bomb
limit; the real file's images are at most a few megapixels)."""


def check_gtsegs_file(path: str) -> int:
    """Number of images in ``path``; raises :class:`SegmentationDataError`
    naming the file and what is missing when it is absent, not HDF5 (MATLAB
    v7.3), or lacks ``/value/img`` / ``/value/gt`` of matching length."""
    import h5py

    if not os.path.exists(path):
        raise SegmentationDataError(f"{path}: file not found (the ImageNet-segmentation file gtsegs_ijcv.mat)")
    if os.path.isdir(path):
        raise SegmentationDataError(f"{path}: is a directory, expected the file gtsegs_ijcv.mat")
    if not h5py.is_hdf5(path):
        raise SegmentationDataError(f"{path}: not an HDF5 file (gtsegs_ijcv.mat is a MATLAB v7.3 / HDF5 file; "
                                    "re-save older .mat versions with save -v7.3)")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("/value/img", "/value/gt") if k not in f]
            if missing:
                raise SegmentationDataError(f"{path}: missing dataset{'s' if len(missing) > 1 else ''} "
                                            f"{' and '.join(missing)} (not in the gtsegs_ijcv.mat layout)")
            img, gt = f["/value/img"], f["/value/gt"]
            for name, d in (("/value/img", img), ("/value/gt", gt)):
                if not isinstance(d, h5py.Dataset) or d.ndim != 2 or d.dtype != h5py.ref_dtype:
                    raise SegmentationDataError(f"{path}: {name} must be an (n, 1) dataset of object references, "
                                                f"found {type(d).__name__} {getattr(d, 'shape', '')} "
                                                f"{getattr(d, 'dtype', '')}")
            if img.shape[0] != gt.shape[0]:
                raise SegmentationDataError(f"{path}: /value/img has {img.shape[0]} entries but /value/gt "
                                            f"has {gt.shape[0]}")
            if img.shape[0] == 0:
                raise SegmentationDataError(f"{path}: holds no images (/value/img is empty); nothing to evaluate")
            return int(img.shape[0])
    except OSError as exc:
        raise SegmentationDataError(f"{path}: cannot be read as HDF5 ({exc})") from None


def read_sample(f, index: int, path: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """Image (H, W, 3) uint8 and mask (H, W) uint8 number ``index`` of an
    open gtsegs file ``f`` (an ``h5py.File``)."""
    try:
        img_ds = f[f["/value/img"][index, 0]]
        mask_ds = f[f[f["/value/gt"][index, 0]][0, 0]]
        for what, ds in (("image", img_ds), ("mask", mask_ds)):
            pixels = int(np.prod(ds.shape[1:] if what == "image" else ds.shape, dtype=np.int64))
            if pixels > MAX_PIXELS:
                raise SegmentationDataError(f"{path}: {what} {index} has shape {ds.shape}, more than "
                                            f"{MAX_PIXELS} pixels (a corrupt or hostile file?)")
        img = np.asarray(img_ds[()]).transpose(2, 1, 0)
        mask = np.asarray(mask_ds[()]).transpose(1, 0)
    except (KeyError, ValueError, TypeError, OSError, AttributeError) as exc:
        if isinstance(exc, SegmentationDataError):
            raise
        raise SegmentationDataError(f"{path}: entry {index} does not follow the gtsegs layout ({exc})") from None
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise SegmentationDataError(f"{path}: image {index} has shape {img.shape} after transposing, "
                                    "expected (H, W, 3)")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    if mask.shape != img.shape[:2]:
        raise SegmentationDataError(f"{path}: mask {index} is {mask.shape}, image is {img.shape[:2]}")
    return np.ascontiguousarray(img, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.uint8)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Resize an image bilinearly and its mask with nearest neighbour to
    ``size`` = (H, W), as the published code does with PIL (no crop); the
    mask is made binary (> 0)."""
    from PIL import Image

    h, w = size
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).convert("RGB").resize((w, h), Image.BILINEAR))
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return image, (mask > 0).astype(np.uint8)


class ImagenetSegmentation(Dataset):
    """``torch.utils.data.Dataset`` over a gtsegs ``.mat`` file.

    Parameters
    ----------
    path:
        The ``.mat`` file; checked at construction (see
        :func:`check_gtsegs_file`).
    size:
        (H, W) the images and masks are resized to (224x224 for the
        published protocol), or None to keep each sample's own size.
    mean, std:
        Normalisation of the [0, 1] pixels (0.5, 0.5 in the protocol).
    indices:
        Optional subset (in this order) of the file's entries.

    Items are ``(image, mask, index)``: a float (3, H, W) tensor, a (H, W)
    long tensor of 0/1 and the entry's index in the file.  With
    ``raw=True`` the uint8 arrays (H, W, 3) and (H, W) come back unresized.
    """

    def __init__(self, path: str, size: Optional[Tuple[int, int]] = (224, 224),
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 indices: Optional[Sequence[int]] = None, raw: bool = False):
        self.path = path
        self.length = check_gtsegs_file(path)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.indices = list(range(self.length))
        if indices is not None:
            self.indices = self.subset(indices).indices
        self.raw = raw
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def _handle(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def subset(self, indices: Sequence[int]) -> "ImagenetSegmentation":
        """The same file restricted to ``indices`` (file entry numbers, in order)."""
        bad = [i for i in indices if not 0 <= int(i) < self.length]
        if bad:
            raise SegmentationDataError(f"{self.path}: indices {bad[:5]} outside 0..{self.length - 1}")
        other = copy.copy(self)
        other._file, other._pid = None, None
        other.indices = [int(i) for i in indices]
        return other

    def labels(self) -> Optional[np.ndarray]:
        """Class label of every entry of the file, by entry number (synthetic
        stand-in files only; the real file has none): (n,) int64, or None."""
        f = self._handle()
        if "synthetic/label" not in f:
            return None
        return np.asarray(f["synthetic/label"][()], dtype=np.int64).reshape(-1)

    def read(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Entry ``self.indices[i]`` as uint8 image (H, W, 3) and mask (H, W), unresized."""
        return read_sample(self._handle(), self.indices[i], self.path)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        image, mask = self.read(i)
        if self.raw:
            return image, mask, self.indices[i]
        if self.size is not None:
            image, mask = resize_pair(image, mask, self.size)
        else:
            mask = (mask > 0).astype(np.uint8)
        x = (image.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x), torch.from_numpy(mask.astype(np.int64)), self.indices[i]
