"""One explanation engine for every model and every method.

    from modules.explain import explain
    maps = explain(model, inputs, method="generic_attribution", index=None, start_layer=None)

``model`` is one of the project's LRP copies (every method) or a model as
timm or Hugging Face built it, unmodified (the methods that need only
attention and gradients: :data:`modules.methods.ATTENTION_METHODS`).
``inputs`` is an image tensor or the dict a Hugging Face tokenizer / image
processor / processor returns.

How it works: an :class:`~modules.adapters.Adapter` (one small class per model
family, chosen by :func:`~modules.adapters.adapter_for`) feeds the inputs,
records every attention call in a :class:`~modules.trace.Trace` (natively in
the copies, by scoped hooks otherwise) and says which row the head reads;
this module takes the gradients and relevance the method asks for; the
method's registry entry (:mod:`modules.methods`) combines the trace; the
read-out here turns its token row into the map (prefix tokens dropped, patch
grid, the published BERT conventions for text).  The model is left exactly
as found.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.adapters import UnsupportedMethodError, UnsupportedModelError, adapter_for, supported_models
from modules.aggregation import check_start_layer, masked_min, minmax_normalize
from modules.methods import Index, Method
from modules.trace import Stream, Trace

__all__ = ["explain", "explain_trace", "Explanation", "StreamMaps", "UnsupportedModelError",
           "UnsupportedMethodError", "supported_models", "supported_methods", "check_start_layer"]


class StreamMaps(NamedTuple):
    """Relevance of a two-stream model: one field per stream (CLIP: image, text)."""

    image: Tensor
    text: Tensor


class Explanation(NamedTuple):
    """What :func:`explain_trace` returns: the maps, the explained value and class."""

    maps: Union[Tensor, StreamMaps]
    score: Tensor  # (B,) the explained value as the model returned it
    target: Tensor  # (B,) the explained class (CLIP: the text paired with each image)
    trace: Trace
    delta: Optional[Tensor] = None
    """(B,) conservation of the methods whose relevance reaches the input
    (``lrp``, ``attnlrp``, ``cplrp``): the relevance put in at the output
    minus the sum of the input relevance (captum's convergence delta).  The
    relevance put in is 1 for the LRP rule sets (one-hot seed) and the
    explained logit for the gradient rule sets.  What it holds: the biases'
    shares, the dropped shares of constants added to activations (position
    embeddings, class tokens, attention masks) and, for AttnLRP, the
    softmax's Taylor remainder; 0 up to rounding on a model without them for
    CP-LRP.  None for the other methods."""
    pixel_extent: Optional[Any] = None
    """``(top, left, bottom, right)``, end exclusive: the pixels of the input
    image the map's token grid covers, read from the model's own patch
    embedding (:mod:`modules.adapters.patch_grid`).  ``bottom < H`` / ``right <
    W``: the rows / columns beyond were seen by no token (the patch embedding
    floors: EVA-02 with 14-pixel patches at 64 pixels gives (0, 0, 56, 56));
    beyond ``H`` / ``W``: padding the model added was seen.  Pixel maps
    (``lrp`` on images) are over the whole image, 0 where no token looked.
    None where not stated (text; families that take only multiples of the
    patch, whose grid covers the whole image); a dict by stream name when
    several streams state one."""


def supported_methods(model: nn.Module) -> Tuple[str, ...]:
    """The canonical method names ``model`` supports."""
    return adapter_for(model).methods()


def explain(model: nn.Module, inputs: Any, method: Union[str, Method] = "generic_attribution", index: Index = None,
            start_layer: Optional[int] = None, readout: Any = None,
            **options: Any) -> Union[Tensor, Tuple[Tensor, ...]]:
    """Raw relevance of the inputs for the explained output.

    Parameters
    ----------
    model:
        A model copy of this project, or a supported timm / Hugging Face model
        (:func:`supported_models`), in any mode: it runs in eval mode and is
        left exactly as it was.
    inputs:
        Images (B, C, H, W) normalised as the model expects, or the dict a
        Hugging Face tokenizer / image processor / processor returns (text
        batches padded, with their ``attention_mask``).  Tensors follow the
        model's device.
    method:
        A name from :data:`modules.methods.METHOD_CHOICES`.
    index:
        None: each sample's predicted class; an int, or one class per sample.
        CLIP: the text paired with each image (default: image i with text i).
    start_layer:
        First attention layer of the rollout-type methods; None: 0, or the
        last layer for transformer attribution on text (METHODS.md section 3).
        Models with coupled streams (cross-attention) use every layer.
    readout:
        Which token(s) the head reads, for a Hugging Face classifier no
        adapter names (the generic path, which otherwise finds it from the
        head's gradient): a token index (int, or one per sample, counted over
        the sample's real tokens; 0 = [CLS] with its conventions) or
        ``"mean"`` (the mean of the real tokens' rows; images: of the patch
        tokens').  Refused for models with an adapter of their own.
    **options:
        Method options on coupled streams: ``generic_attribution`` takes the
        published ablations ``normalize`` and ``self_in_rule_10`` (both True)
        and ``nan_guard`` (METHODS_ICCV.md section 1).  Options an adapter
        takes (``Adapter.options``): ``clip_convention`` of CLIPModel with
        ``generic_attribution`` — ``"hf"`` (default: the EOS row over every
        token, start layer 0) or ``"published"`` (the published notebook,
        METHODS_ICCV.md section 5: text map = EOT row, columns 1..EOT-1
        divided by their sum, other columns 0; both towers start at their
        last block; the image map is the [CLS] row as before).

    Returns
    -------
    Tensor or StreamMaps
        (B, gh, gw) patches for images (Swin: its finest grid), (B, N) tokens
        for text (padding 0), (B, H, W) pixels for ``lrp`` on images; a
        two-stream model returns a :class:`StreamMaps`; so does a
        single-stream vision-language model (VisualBERT, ViLT: ``.text``
        (B, T), ``.image`` (B, boxes) or (B, gh, gw)).
    """
    return explain_trace(model, inputs, method, index, start_layer, readout, **options).maps


def explain_trace(model: nn.Module, inputs: Any, method: Union[str, Method] = "generic_attribution",
                  index: Index = None, start_layer: Optional[int] = None, readout: Any = None,
                  **options: Any) -> Explanation:
    """:func:`explain`, returning also the explained score, class and the trace."""
    adapter = adapter_for(model)
    m = adapter.check_method(method, options)
    if readout is not None:
        if not hasattr(adapter, "set_readout"):
            raise ValueError(f"readout= applies to the generic path (Hugging Face classifiers no adapter names); "
                             f"{type(model).__name__}'s adapter reads its head itself")
        adapter.set_readout(readout)
    own = {k: options.pop(k) for k in list(options) if k in adapter.options}
    foreign = sorted(k for k in options if k in m.adapter_options)
    if foreign:
        raise ValueError(f"option {', '.join(foreign)} does not apply to {type(model).__name__}")
    if own:
        adapter.configure(**own)
    for stream, depth in adapter.depths().items():
        check_start_layer(start_layer, depth)
    trace = adapter.record(inputs, m, index, start_layer)
    if trace.coupled is not None:
        if start_layer is not None:
            raise ValueError(f"start_layer does not apply to {type(model).__name__}: its method uses every layer")
        with torch.no_grad():
            maps = {k: v.detach() for k, v in m.compute_coupled(trace.coupled, **options).items()}
    else:
        if options:
            raise ValueError(f"options {', '.join(sorted(options))} do not apply to {type(model).__name__} "
                             "(normalize, self_in_rule_10, nan_guard: models with cross-attention; "
                             "clip_convention: CLIPModel)")
        maps = {}
        for name, stream in trace.streams.items():
            got = _read_out(m, stream, trace, trace.starts[name])
            maps.update(got if isinstance(got, dict) else {name: got})
    return Explanation(_as_tuple(maps), trace.score, trace.target, trace, _delta(m, trace), _pixel_extent(trace))


def _pixel_extent(trace: Trace) -> Any:
    """The image streams' stated pixel extent (see :attr:`Explanation.pixel_extent`)."""
    got = {name: s.readout.pixel_extent for name, s in trace.streams.items()
           if s.readout.pixel_extent is not None}
    return next(iter(got.values())) if len(got) == 1 else (got or None)


def _delta(m: Method, trace: Trace) -> Optional[Tensor]:
    """Relevance in minus relevance out at the input (see :attr:`Explanation.delta`)."""
    r = trace.input_relevance
    if not m.to_input or r is None:
        return None
    parts = r.values() if isinstance(r, dict) else [r]
    total = sum(p.detach().flatten(1).sum(dim=1) for p in parts)
    seed = trace.score.to(total.dtype) if m.input_gradient else torch.ones_like(total)
    return seed - total


def _as_tuple(maps: Dict[str, Tensor]) -> Union[Tensor, Tuple[Tensor, ...]]:
    """One map: the tensor; (image, text): :class:`StreamMaps`; other names: a named tuple of them."""
    if len(maps) == 1:
        return next(iter(maps.values()))
    if set(maps) == set(StreamMaps._fields):
        return StreamMaps(**maps)
    cls = _TUPLES.get(tuple(maps))
    if cls is None:
        cls = _TUPLES[tuple(maps)] = namedtuple("Maps", list(maps))
    return cls(**maps)


_TUPLES: Dict[Tuple[str, ...], type] = {}


def _read_out(m: Method, stream: Stream, trace: Trace, start: int) -> Union[Tensor, Dict[str, Tensor]]:
    """The method's token row -> the map: the published conventions, the
    kept columns, the patch grid; a stream with ``readout.parts`` gives one
    map per part (by name).  ``start``: the stream's start layer as the
    recording resolved it (:attr:`Trace.starts`)."""
    with torch.no_grad():
        row = m.compute(stream, start, trace)
        readout = stream.readout
        if row.dim() == 3:  # a finished pixel map (full LRP on images)
            return row.detach()
        if readout.parts is not None:
            # text conventions: GradCAM is already min-max normalised over the whole map
            renorm = m.normalized and not stream.text_conventions
            out = {}
            for name, part in readout.parts.items():
                got = part.read(row)
                out[name] = (minmax_normalize(got) if renorm else got).detach()
            return out
        if readout.grid is None:  # text: METHODS.md section 3 conventions, padding 0
            real = readout.token_mask if readout.token_mask is not None else torch.ones_like(row, dtype=torch.bool)
            row = row.clone()
            if readout.self_column is not None and m.self_entry is not None:
                s = readout.self_column
                row[:, s] = 0 if m.self_entry == "zero" else masked_min(row, real)
            cols = readout.columns & real
            row = row.masked_fill(~cols, 0.0)
            if readout.normalize == "sum":  # CLIP's published text map
                row = row / row.sum(dim=1, keepdim=True)
            return row.detach()
        B = row.shape[0]
        kept = row[readout.columns].reshape(B, -1)
        if m.normalized:
            kept = minmax_normalize(kept)
        return kept.reshape(B, *readout.grid).detach()


def upsample(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (B, h, w) maps to (B, *size)."""
    maps = maps.unsqueeze(1)
    if not maps.is_floating_point():
        maps = maps.float()
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
