"""The token grid an image model actually uses, and the pixels its tokens cover (issue 26, item 5).

A model takes more image sizes than multiples of its patch: a patch
embedding whose convolution floors (timm ``eva02_tiny_patch14_224`` built
for 64 pixels: 64 / 14 gives a 4 x 4 grid, and the last 8 rows and columns
are seen by no token), one that pads the image to a multiple first (timm
``dynamic_img_pad=True``, Hugging Face Swin), position embeddings resampled
to the grid (timm ``dynamic_img_size=True``, Hugging Face
``interpolate_pos_encoding=True``, DINOv2 always).  The map is on the
model's own token grid, so the grid is read from what the model does, not
recomputed from the image and patch sizes: :func:`probe_patch_grid` runs the
model's own patch embedding on the images (no gradient; a hook on its
projection convolution, removed on exit) and reads the convolution's output
grid and the input it convolved (the image after the model's own padding).
The adapters then check the grid against the token count of the recorded
attention.

The pixel extent ``(top, left, bottom, right)``, end exclusive, in pixels
of the input image, is the union of the grid's receptive fields: token
``(i, j)`` sees rows ``top + i * stride .. top + i * stride + kernel - 1``.
``bottom < H``: rows ``bottom .. H-1`` were seen by no token (floor);
``bottom > H``: the last tokens saw ``bottom - H`` rows of padding the model
added below the image (pad); likewise for columns.  The model's padding is
verified to lie below and to the right of the image (the convolved input's
top-left block equals the image), never assumed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from modules.adapters import InputsError, UnsupportedModelError, check_images

__all__ = ["PatchGrid", "probe_patch_grid", "patch_grid"]


class PatchGrid(NamedTuple):
    """The token grid ``(gh, gw)`` and the pixels it covers ``(top, left, bottom, right)``."""

    grid: Tuple[int, int]
    extent: Tuple[int, int, int, int]


def _pair(v) -> Tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def probe_patch_grid(embed: nn.Module, proj: nn.Conv2d, images: Tensor, what: str) -> PatchGrid:
    """Run ``embed`` (the model's patch embedding; ``proj``, its projection
    convolution, may be ``embed`` itself) on ``images`` (B, C, H, W) and read
    the grid and its pixel extent from what ``proj`` was called with and
    returned.  The patch embedding's own refusals (timm's size asserts,
    Hugging Face's channel check, a kernel larger than the image) become a
    one-line :class:`InputsError`."""
    if images.dim() != 4:
        raise InputsError(f"{what}: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    H, W = (int(s) for s in images.shape[-2:])
    seen = {}

    def hook(module, args, output):
        if "input" not in seen:  # the first call: the one on the pixels
            seen["input"], seen["grid"] = args[0], tuple(output.shape[-2:])

    handle = proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            embed(images)
    except (AssertionError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputsError(f"{what}: the model's patch embedding refuses {H}x{W} images: {first}") from None
    finally:
        handle.remove()
    if "input" not in seen:
        raise UnsupportedModelError(f"{what}: its patch embedding did not call its projection convolution")
    x, (gh, gw) = seen["input"], seen["grid"]
    Hc, Wc = (int(s) for s in x.shape[-2:])
    if (Hc, Wc) != (H, W) and (Hc < H or Wc < W or not torch.equal(x[..., :H, :W], images.to(x.dtype))):
        raise UnsupportedModelError(f"{what}: cannot tell which pixels its tokens saw: the patch projection "
                                    f"convolved a {Hc}x{Wc} input that is not the {H}x{W} image padded below and "
                                    "to the right")
    if gh < 1 or gw < 1:
        raise InputsError(f"{what}: {H}x{W} images give no patch ({gh}x{gw} grid)")
    padding = proj.padding
    if isinstance(padding, str):
        if padding != "valid":
            raise UnsupportedModelError(f"{what}: a patch projection with padding={padding!r}")
        padding = (0, 0)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (proj.kernel_size, proj.stride, padding,
                                                                  proj.dilation))
    top, left = -ph, -pw
    bottom = top + (int(gh) - 1) * sh + dh * (kh - 1) + 1
    right = left + (int(gw) - 1) * sw + dw * (kw - 1) + 1
    return PatchGrid((int(gh), int(gw)), (top, left, bottom, right))


def patch_grid(embed: Optional[nn.Module], proj: Optional[nn.Module], images: Tensor, patch: Tuple[int, int],
               what: str) -> PatchGrid:
    """:func:`probe_patch_grid` where the model's patch embedding projects with
    one ``nn.Conv2d`` on the pixels; otherwise (a hybrid stem, a model whose
    embedding is not found) the images must be multiples of ``patch`` and the
    grid covers them exactly (:func:`~modules.adapters.check_images`)."""
    if isinstance(embed, nn.Module) and isinstance(proj, nn.Conv2d):
        return probe_patch_grid(embed, proj, images, what)
    gh, gw = check_images(images, patch, what)
    return PatchGrid((gh, gw), (0, 0, int(images.shape[-2]), int(images.shape[-1])))

