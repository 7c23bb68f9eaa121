"""Adapters for Swin Transformers as timm or Hugging Face built them, unmodified.

* :class:`TimmSwinAdapter`: timm ``SwinTransformer`` and ``SwinTransformerV2``
  (``global_pool="avg"``).  Each block's ``WindowAttention`` computes its
  probabilities on its unfused path (``fused_attn`` is switched off inside
  the context; V2 has no fused path) and passes them through ``attn_drop``
  right after the softmax: that module's output is recorded.
* :class:`HFSwinAdapter`: Hugging Face ``SwinForImageClassification``
  (``SwinAttention`` returns ``(output, probabilities)`` with eager attention,
  which the context asks for) and ``Swinv2ForImageClassification``
  (``Swinv2SelfAttention`` applies ``self.dropout`` to the probabilities:
  that module's output is recorded).

How relevance is carried (METHODS.md section 8, the project's own
definition beyond the papers): R stays the relevance of the current tokens
over the input patches of the *finest* grid (the patch embedding's, 56 x 56
for a 224-pixel Swin-T).  A window attention call is recorded with a
:class:`~modules.trace.WindowLayout` whose index says, for each window
position, which stream token it is: derived at run time from the block's
own attributes (its window and shift sizes after the library's clamping to
small feature maps) and the feature map size it was called with, by
replaying the block's cyclic shift, padding and window partition on a grid
of token numbers (timm rolls then pads, Hugging Face pads then rolls).
Padding positions (feature maps that are no multiple of the window) are no
stream tokens: constants with no relevance over the input, they read 0 and
what reaches them is dropped.  A patch merging layer (each 2x2 group of
tokens (2i + a, 2j + b), a, b in {0, 1}, to token (i, j), in both
libraries) is a :class:`~modules.trace.Merge` whose rows average the group's
tokens (merging concatenates then projects: the relevance is shared
equally); a group cut by the odd-size padding averages the tokens it has.
The head pools the mean of the last stage's tokens, so the explained row is
their mean (weights 1/N_last).

Image sizes: every size the model takes.  The finest grid is the one the
model's patch embedding gives (Hugging Face pads the image below and to the
right to a multiple of the patch; timm's takes its ``img_size``, or any
multiple of the patch with ``strict_img_size=False``), and the read-out
states the pixels it covers (:mod:`modules.adapters.patch_grid`).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.adapters import InputsError, UnsupportedModelError, feed_dict, hf_class, model_device, register_adapter
from modules.adapters.hooks import HookAdapter
from modules.adapters.patch_grid import patch_grid
from modules.attention_capture import AttentionCapture, AttentionLayer, capture_attention
from modules.methods import Method
from modules.trace import AttentionCall, Merge, Readout, Stream, WindowLayout

__all__ = ["TimmSwinAdapter", "HFSwinAdapter", "window_index", "merge_matrix", "HF_SWIN_CLASSES"]

HF_SWIN_CLASSES = ("SwinForImageClassification", "Swinv2ForImageClassification")


# --------------------------------------------------------------------------
# The bookkeeping (pure functions of the geometry)
# --------------------------------------------------------------------------
def window_index(height: int, width: int, window: Tuple[int, int], shift: Tuple[int, int], pad_first: bool,
                 device: Optional[torch.device] = None) -> Tensor:
    """(nW, wh * ww) stream token of each window position of a Swin block, -1 for padding.

    Replays the block on a (height, width) grid of token numbers (row-major):
    cyclic shift by ``-shift`` and bottom/right padding to a multiple of the
    window (``pad_first``: pad, then shift, as Hugging Face does; else shift,
    then pad, as timm does), then the window partition both libraries use
    (windows row-major over the map, positions row-major in a window).  The
    index of a :class:`~modules.trace.WindowLayout` (METHODS.md section 8).
    """
    wh, ww = int(window[0]), int(window[1])
    sh, sw = int(shift[0]), int(shift[1])
    grid = torch.arange(height * width, device=device).reshape(height, width)
    ph, pw = (wh - height % wh) % wh, (ww - width % ww) % ww

    def pad(g: Tensor) -> Tensor:
        return F.pad(g, (0, pw, 0, ph), value=-1) if ph or pw else g

    def roll(g: Tensor) -> Tensor:
        return torch.roll(g, shifts=(-sh, -sw), dims=(0, 1)) if sh or sw else g

    g = roll(pad(grid)) if pad_first else pad(roll(grid))
    hp, wp = g.shape
    return g.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


def merge_matrix(height: int, width: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> Tensor:
    """(N_new, N_old) patch merging of a (height, width) map: row (i, j) averages
    the tokens (2i + a, 2j + b), a, b in {0, 1}, that exist (odd sides are
    padded by the model; the padding is no token).  R <- M R, METHODS.md
    section 8 (the project's own rule: merged relevance shared equally)."""
    hn, wn = (height + 1) // 2, (width + 1) // 2
    rows = torch.arange(height, device=device)[:, None] // 2 * wn + torch.arange(width, device=device)[None, :] // 2
    parent = rows.reshape(-1)
    count = torch.bincount(parent, minlength=hn * wn).to(dtype)
    m = torch.zeros(hn * wn, height * width, dtype=dtype, device=device)
    m[parent, torch.arange(height * width, device=device)] = 1.0 / count[parent]
    return m


# --------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------
class _Block(NamedTuple):
    name: str  # the block's module path
    module: nn.Module
    layer: AttentionLayer


class _Event(NamedTuple):
    kind: str  # "block" or "merge"
    name: str
    size: Tuple[int, int]  # (H, W) of the feature map the module was called with
    window: Tuple[int, int] = (0, 0)
    shift: Tuple[int, int] = (0, 0)


@dataclass
class _Recording:
    capture: AttentionCapture
    events: List[_Event] = field(default_factory=list)


def _pair(v: Any) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


class _SwinAdapter(HookAdapter):
    lrp = True  # every LRP method through the scope (modules.lrp_scope)
    """Shared part: hooks on the blocks (geometry) and merges, the stream."""

    pad_first = False  # Hugging Face pads before the cyclic shift, timm after

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.blocks = self.find_blocks()
        self.merges = self.find_merges()
        if not self.blocks:
            raise UnsupportedModelError(f"{type(model).__name__}: no Swin blocks found")

    # -- per library -----------------------------------------------------------
    def find_blocks(self) -> List[_Block]:
        raise NotImplementedError

    def find_merges(self) -> List[Tuple[str, nn.Module]]:
        raise NotImplementedError

    def block_size(self, args: tuple, kwargs: dict) -> Tuple[int, int]:
        """(H, W) of the feature map a block was called with."""
        raise NotImplementedError

    def merge_size(self, args: tuple, kwargs: dict) -> Tuple[int, int]:
        raise NotImplementedError

    def patch_size(self) -> Tuple[int, int]:
        raise NotImplementedError

    # -- HookAdapter -----------------------------------------------------------
    def attention_layers(self) -> List[AttentionLayer]:
        return [b.layer for b in self.blocks]

    def stream_of(self, name: str) -> str:
        return "image"

    @contextlib.contextmanager
    def recording(self, method: Method) -> Iterator[_Recording]:
        with contextlib.ExitStack() as stack:
            cap = stack.enter_context(capture_attention(self.model, layers=self.layers, family=self.library))
            rec = _Recording(cap)

            def block_hook(name: str):
                def hook(module, args, kwargs, output):
                    # read after the call: Hugging Face Swin clamps window/shift inside forward
                    rec.events.append(_Event("block", name, self.block_size(args, kwargs),
                                             _pair(module.window_size), _pair(module.shift_size)))
                return hook

            def merge_hook(name: str):
                def hook(module, args, kwargs, output):
                    rec.events.append(_Event("merge", name, self.merge_size(args, kwargs)))
                return hook

            for b in self.blocks:
                stack.callback(b.module.register_forward_hook(block_hook(b.name), with_kwargs=True).remove)
            for name, m in self.merges:
                stack.callback(m.register_forward_hook(merge_hook(name), with_kwargs=True).remove)
            yield rec

    def patch_embedding(self) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
        """(the patch embedding module, its projection convolution)."""
        raise NotImplementedError

    def check_size(self, images: Tensor) -> None:
        """Refuse, in the adapter's words, a size the model refuses (before its patch embedding does)."""

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        """The finest grid and its pixel extent as the model's own patch
        embedding gives them (:mod:`modules.adapters.patch_grid`: Hugging Face
        pads the image to a multiple of the patch)."""
        feed = feed_dict(inputs, "pixel_values", model_device(self.model))
        self.check_size(feed["pixel_values"])
        feed["_grid"], feed["_extent"] = patch_grid(*self.patch_embedding(), feed["pixel_values"], self.patch_size(),
                                                    type(self.model).__name__)
        return feed

    def streams(self, feed: Dict[str, Any], rec: _Recording) -> Dict[str, Stream]:
        what = type(self.model).__name__
        records = list(rec.capture.records)
        if not records:
            raise RuntimeError(f"{what}: no attention was recorded")
        B = feed["pixel_values"].shape[0]
        gh, gw = feed["_grid"]
        dtype, device = records[0].probs.dtype, records[0].probs.device
        tokens, size = gh * gw, (gh, gw)
        ops: List[Any] = []
        n_blocks = 0
        for ev in rec.events:
            if tuple(ev.size) != size:
                raise RuntimeError(f"{what}: {ev.name} saw a {ev.size[0]}x{ev.size[1]} map where the merges "
                                   f"predict {size[0]}x{size[1]}")
            if ev.kind == "merge":
                m = merge_matrix(*ev.size, dtype=dtype, device=device)
                ops.append(Merge(ev.name, m))
                tokens, size = m.shape[0], ((size[0] + 1) // 2, (size[1] + 1) // 2)
                continue
            if n_blocks >= len(records) or not records[n_blocks].name.startswith(ev.name + "."):
                raise RuntimeError(f"{what}: block {ev.name} recorded no attention")
            r = records[n_blocks]
            n_blocks += 1
            index = window_index(*ev.size, ev.window, ev.shift, self.pad_first, device)
            nW, w = index.shape
            if r.probs.shape[0] != B * nW or r.probs.shape[-1] != w:
                raise RuntimeError(f"{what}: {r.name} gave probabilities of shape {tuple(r.probs.shape)}, not "
                                   f"({B}x{nW} windows, heads, {w}, {w})")
            ops.append(AttentionCall(r.name, r.probs, "image", "image", windows=WindowLayout(index, tokens)))
        if n_blocks != len(records):
            raise RuntimeError(f"{what}: recorded {len(records)} attention maps for {n_blocks} block calls")
        weights = torch.full((B, tokens), 1.0 / tokens, dtype=dtype, device=device)  # mean-pooled head
        readout = Readout(weights, torch.ones(B, gh * gw, dtype=torch.bool, device=device), grid=(gh, gw),
                          pixel_extent=feed["_extent"])
        return {"image": Stream("image", ops, readout)}


# --------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------
def _timm_classes() -> Tuple[tuple, tuple]:
    """((SwinTransformer, SwinTransformerV2), (their PatchMerging classes))."""
    from timm.models import swin_transformer as v1
    from timm.models import swin_transformer_v2 as v2

    return (v1.SwinTransformer, v2.SwinTransformerV2), (v1.PatchMerging, v2.PatchMerging)


@register_adapter
class TimmSwinAdapter(_SwinAdapter):
    family = "timm Swin / Swin V2 (unmodified)"
    examples = ("SwinTransformer", "SwinTransformerV2")
    library = "timm"
    notes = "maps at the finest (patch) grid; window/merge rule and mean-pooled head: METHODS.md section 8 (ours)"
    pad_first = False

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "timm" in sys.modules and isinstance(model, _timm_classes()[0])

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        if not isinstance(getattr(getattr(model, "head", None), "fc", None), nn.Linear):
            raise UnsupportedModelError(f"{name}: no classification head (num_classes=0); explain a classifier")
        pool = getattr(model, "global_pool", "avg")
        if pool != "avg":
            raise UnsupportedModelError(f"{name}: global_pool={pool!r} is not supported (avg is)")
        super().__init__(model)

    def find_blocks(self) -> List[_Block]:
        out = []
        for i, stage in enumerate(self.model.layers):
            for j, block in enumerate(stage.blocks):
                attn = getattr(block, "attn", None)
                drop = getattr(attn, "attn_drop", None)
                if not isinstance(drop, nn.Module) or not hasattr(block, "shift_size"):
                    raise UnsupportedModelError(f"{type(self.model).__name__}: layers[{i}].blocks[{j}].attn is "
                                                f"{type(attn).__name__}, without the attn_drop module after its "
                                                "softmax")
                name = f"layers.{i}.blocks.{j}"
                out.append(_Block(name, block, AttentionLayer(f"{name}.attn", attn, drop, None)))
        return out

    def find_merges(self) -> List[Tuple[str, nn.Module]]:
        merging = _timm_classes()[1]
        return [(f"layers.{i}.downsample", stage.downsample) for i, stage in enumerate(self.model.layers)
                if isinstance(stage.downsample, merging)]

    def block_size(self, args, kwargs):
        x = args[0] if args else kwargs["x"]
        return int(x.shape[1]), int(x.shape[2])  # (B, H, W, C)

    merge_size = block_size

    def patch_size(self) -> Tuple[int, int]:
        return _pair(self.model.patch_embed.patch_size)

    def patch_embedding(self):
        return self.model.patch_embed, getattr(self.model.patch_embed, "proj", None)

    def check_size(self, images: Tensor) -> None:
        pe = self.model.patch_embed
        size = tuple(images.shape[-2:])
        if getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None) is not None \
                and size != tuple(pe.img_size):
            raise InputsError(f"{type(self.model).__name__}: images of {size[0]}x{size[1]} pixels, the model takes "
                              f"{pe.img_size[0]}x{pe.img_size[1]}")

    def forward(self, feed, method):
        return self.model(feed["pixel_values"])


# --------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------
@register_adapter
class HFSwinAdapter(_SwinAdapter):
    family = "Hugging Face Swin / Swinv2 image classifiers (unmodified)"
    examples = HF_SWIN_CLASSES
    library = "huggingface"
    notes = "maps at the finest (patch) grid; window/merge rule and mean-pooled head: METHODS.md section 8 (ours)"
    pad_first = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return "transformers" in sys.modules and hf_class(model, HF_SWIN_CLASSES) is not None

    def __init__(self, model: nn.Module):
        self.kind = hf_class(model, HF_SWIN_CLASSES)
        self.base = model.swin if self.kind == "SwinForImageClassification" else model.swinv2
        name = type(model).__name__
        if not isinstance(getattr(model, "classifier", None), nn.Linear):
            raise UnsupportedModelError(f"{name}: no classification head (num_labels=0); explain a classifier")
        if getattr(self.base, "pooler", None) is None:
            raise UnsupportedModelError(f"{name}: no pooling layer (the head reads the mean of the last tokens)")
        super().__init__(model)

    def _path(self, module: nn.Module) -> str:
        if not hasattr(self, "_paths"):
            self._paths = {id(m): n for n, m in self.model.named_modules()}
        return self._paths[id(module)]

    def find_blocks(self) -> List[_Block]:
        out = []
        for stage in self.base.encoder.layers:
            for block in stage.blocks:
                name = self._path(block)
                if self.kind == "SwinForImageClassification":  # (output, probabilities) with eager attention
                    attn = block.attention
                    layer = AttentionLayer(f"{name}.attention", attn, attn, 1)
                else:  # Swinv2SelfAttention: self.dropout(attention_probs)
                    attn = block.attention.self
                    drop = getattr(attn, "dropout", None)
                    if not isinstance(drop, nn.Module):
                        raise UnsupportedModelError(f"{name}.attention.self has no dropout after its softmax")
                    layer = AttentionLayer(f"{name}.attention.self", attn, drop, None)
                out.append(_Block(name, block, layer))
        return out

    def find_merges(self) -> List[Tuple[str, nn.Module]]:
        return [(self._path(stage.downsample), stage.downsample) for stage in self.base.encoder.layers
                if getattr(stage, "downsample", None) is not None]

    def block_size(self, args, kwargs):
        return _pair(args[1] if len(args) > 1 else kwargs["input_dimensions"])

    merge_size = block_size

    def patch_size(self) -> Tuple[int, int]:
        return _pair(self.model.config.patch_size)

    def patch_embedding(self):
        pe = getattr(getattr(self.base, "embeddings", None), "patch_embeddings", None)
        return pe, getattr(pe, "projection", None)

    def forward(self, feed, method):
        return self.model(**{k: v for k, v in feed.items() if not k.startswith("_")}, return_dict=True)
