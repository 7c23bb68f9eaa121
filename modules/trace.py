"""What one explanation records, and how relevance is carried through it.

A :class:`Trace` is the record of one forward (and backward) pass: per token
*stream* (``"image"``, ``"text"``, ...) the sequence of operations that map
tokens to tokens — attention calls (:class:`AttentionCall`: probabilities
(B', H, Nq, Nk), their gradients and, for the model copies, their LRP
relevance) and token merges (:class:`Merge`, Swin's patch merging) — and the
:class:`Readout` that says which row the model's head reads and which columns
form the map.  Query and key streams are tagged on every call, so
cross-attention between two streams has its place beside self-attention.

Every method of :mod:`modules.methods` is written against this structure
only, never against a model.  The common computation is
:func:`propagate_row`: the explained row of ``M_{L-1} ... M_s`` (one matrix per
attention call, identity where a method skips a call, merges in between),
evaluated from the left as a vector so it costs O(L N^2), and exact (no
arithmetic at all) for a one-hot read-out row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["WindowLayout", "AttentionCall", "Merge", "Part", "Readout", "Stream", "Trace", "Coupled", "Output", "propagate_row",
           "propagate_column", "attention_calls", "last_call", "pooling_call"]


@dataclass
class WindowLayout:
    """Where the tokens of windowed attention (Swin) sit in the stream.

    The layer attends within windows: its probabilities are
    (B * nW, H, w, w).  ``index`` (nW, w) holds, for each window and position
    in it, the stream token (0 .. N-1) it is, with the cyclic shift already
    undone; every token appears exactly once.  A position the model filled
    with padding (a feature map that is no multiple of the window) holds -1:
    it is no stream token (a constant with no relevance over the input), so
    it reads 0 and whatever reaches it is dropped.
    """

    index: Tensor  # (nW, w) long, -1 for padding
    num_tokens: int

    def _padded(self) -> bool:
        return bool((self.index < 0).any())

    def gather(self, v: Tensor) -> Tensor:
        """(B, N) token values -> (B, nW, w) per window (padding reads 0)."""
        if not self._padded():
            return v[:, self.index]
        ext = F.pad(v, (0, 1))  # column N: the padding's 0
        return ext[:, torch.where(self.index < 0, self.num_tokens, self.index)]

    def scatter(self, v: Tensor) -> Tensor:
        """(B, nW, w) per-window values -> (B, N) token values (padding dropped)."""
        out = v.new_zeros(v.shape[0], self.num_tokens)
        flat = self.index.reshape(-1)
        if not self._padded():
            out[:, flat] = v.reshape(v.shape[0], -1)
            return out
        keep = flat >= 0
        out[:, flat[keep]] = v.reshape(v.shape[0], -1)[:, keep]
        return out

    def dense(self, local: Tensor) -> Tensor:
        """(B * nW, w, w) window maps -> (B, N, N) block-sparse map (zero between windows)."""
        nW, w = self.index.shape
        B = local.shape[0] // nW
        out = local.new_zeros(B, self.num_tokens, self.num_tokens)
        rows = self.index[:, :, None].expand(nW, w, w).reshape(-1)
        cols = self.index[:, None, :].expand(nW, w, w).reshape(-1)
        vals = local.reshape(B, -1)
        if self._padded():
            keep = (rows >= 0) & (cols >= 0)
            rows, cols, vals = rows[keep], cols[keep], vals[:, keep]
        out[:, rows, cols] = vals
        return out


@dataclass
class AttentionCall:
    """One call of an attention layer.

    Attributes
    ----------
    name:
        Dotted path of the module that was called (``"blocks.3.attn"``).
    probs:
        Attention probabilities (B', H, Nq, Nk) after softmax, as the forward
        pass used them; B' = B except for windowed attention (B * nW).
    query, key:
        Streams of the queries and the keys (equal for self-attention).
    grad:
        d score / d probs (per-sample one-hot seed), when a method needs it.
    relevance:
        LRP relevance of the probabilities (model copies only).
    windows:
        The :class:`WindowLayout` of windowed attention, else None.
    key_offset:
        The keys are the key stream's tokens from this position on (an
        attention-pooling head that skips the prefix tokens).
    """

    name: str
    probs: Tensor
    query: str = "main"
    key: str = "main"
    grad: Optional[Tensor] = None
    relevance: Optional[Tensor] = None
    windows: Optional[WindowLayout] = None
    key_offset: int = 0

    @property
    def is_self(self) -> bool:
        return self.query == self.key

    def apply(self, v: Tensor, local: Tensor) -> Tensor:
        """``v @ M`` for a (B, Nq) row vector and this call's head-combined
        matrix M given in its own layout ``local`` (B', Nq, Nk)."""
        if self.windows is None:
            out = torch.bmm(v.unsqueeze(1), local).squeeze(1)
            return F.pad(out, (self.key_offset, 0)) if self.key_offset else out
        win = self.windows
        nW, w = win.index.shape
        vw = win.gather(v).reshape(-1, 1, w)  # (B * nW, 1, w)
        return win.scatter(torch.bmm(vw, local).reshape(v.shape[0], nW, w))


@dataclass
class Merge:
    """Token merging: the stream's next tokens are ``matrix @ tokens``
    (N_new, N_old) — each merged token the mean of the tokens it replaces."""

    name: str
    matrix: Tensor  # (N_new, N_old)

    def apply(self, v: Tensor) -> Tensor:
        return v @ self.matrix.to(v.dtype)


Op = Union[AttentionCall, Merge]


@dataclass
class Part:
    """One of several maps read from the same explained row of one stream
    (single-stream vision-language models: the text columns and the image
    columns of the joint sequence, METHODS_ICCV.md section 3).

    ``positions`` (B, N_0) long: for each input column of the stream, its
    flat position in this map (0 .. prod(shape)-1), or -1 when the column is
    not part of it; every map position is filled by at most one column and
    reads 0 when none fills it.  ``shape``: the map's shape per sample
    (``(T,)`` for text, ``(boxes,)``, ``(gh, gw)`` for a patch grid).
    """

    positions: Tensor
    shape: Tuple[int, ...]

    def read(self, row: Tensor) -> Tensor:
        """(B, N_0) row -> (B, *shape) map."""
        B = row.shape[0]
        n = 1
        for s in self.shape:
            n *= int(s)
        out = row.new_zeros(B, n + 1)  # column n: where the columns outside the map go
        idx = torch.where(self.positions < 0, n, self.positions).to(row.device)
        out.scatter_(1, idx, row)
        return out[:, :n].reshape(B, *self.shape)


@dataclass
class Readout:
    """How the model's head reads a stream, and which columns form the map.

    Attributes
    ----------
    weights:
        (B, N_last) the explained row as weights over the stream's last
        tokens: one-hot for [CLS] / last-token pooling, 1/|P| over the pooled
        tokens for mean pooling (METHODS.md section 8).
    columns:
        (B, N_0) bool: the columns (input tokens) that form the map.
    grid:
        (gh, gw) for image streams: the kept columns reshape to it; None for text.
    self_column:
        The explained token's own column when it is part of a text map
        ([CLS] of a BERT-style classifier), where the published BERT
        conventions set it (METHODS.md section 3); None otherwise.
    token_mask:
        (B, N_0) bool: real (non-padding) tokens of a text stream.
    parts:
        Several maps read from the one explained row, by name (a single
        stream over text and image tokens yields ``text`` and ``image``):
        each a :class:`Part`; when given, ``columns``/``grid`` are not used
        for the map.  None (the default): one map, as above.
    normalize:
        ``"sum"``: a text map divided by its sum over the kept columns
        (CLIP's published notebook, METHODS_ICCV.md section 5); None: raw.
    pixel_extent:
        Image streams: ``(top, left, bottom, right)``, end exclusive, the
        pixels of the input image that the ``grid``'s tokens cover, as the
        model's patch embedding saw them (:mod:`modules.adapters.patch_grid`);
        ``bottom < H``: rows ``bottom .. H-1`` seen by no token (a patch
        embedding that floors), ``bottom > H``: ``bottom - H`` rows of the
        model's padding seen (likewise for columns).  None: not stated (text;
        adapters that take only multiples of the patch: the whole image).
    """

    weights: Tensor
    columns: Tensor
    grid: Optional[Tuple[int, int]] = None
    self_column: Optional[int] = None
    token_mask: Optional[Tensor] = None
    parts: Optional[Dict[str, "Part"]] = None
    normalize: Optional[str] = None
    pixel_extent: Optional[Tuple[int, int, int, int]] = None

    @property
    def row(self) -> Optional[int]:
        """The one row all samples read (one-hot weights), else None."""
        w = self.weights
        hot = (w == 1).sum(dim=1) == 1
        if not bool(hot.all()) or not bool(((w == 0) | (w == 1)).all()):
            return None
        rows = w.argmax(dim=1)
        return int(rows[0]) if bool((rows == rows[0]).all()) else None


@dataclass
class Stream:
    """One token stream: its operations in forward order and its read-out.

    ``text_conventions`` selects the published BERT conventions of
    METHODS.md section 3 (row-normalised transformer attribution, GradCAM
    over the whole map, last layer as the default start of transformer
    attribution) over the ViT ones of section 2.

    ``rollout_row_normalize=False`` makes ``rollout`` the product of
    (A + I), and ``transformer_attribution`` on a text-convention stream
    the product of (Abar + I), without row normalisation (VisualBERT's
    published generator rolls both out with one ``compute_rollout_attention``
    that does not normalise, METHODS_ICCV.md section 3).
    ``default_start="last"`` makes the last layer the default start layer of
    every method on the stream (CLIP's published notebook, METHODS_ICCV.md
    section 5), ``"first"`` layer 0 (VisualBERT's transformer attribution);
    None: the method's own default.  ``partial_lrp_minmax`` makes
    ``lrp_last_layer`` VisualBERT's published ``generate_partial_lrp``: the
    head mean of the signed relevance (no clamp), min-max normalised over
    the whole map of real tokens, then the explained row.
    """

    name: str
    ops: List[Op]
    readout: Readout
    text_conventions: bool = False
    rollout_row_normalize: bool = True
    default_start: Optional[str] = None
    partial_lrp_minmax: bool = False

    @property
    def calls(self) -> List[AttentionCall]:
        """The stream's self-attention calls, in forward order (the "layers"
        that ``start_layer`` counts)."""
        return [op for op in self.ops if isinstance(op, AttentionCall) and op.query == self.name
                and op.key == self.name]


@dataclass
class Output:
    """One map read from a :class:`Coupled` trace: the explained row(s) of
    R[row_stream, col_stream] (METHODS_ICCV.md read-outs).

    ``weights`` (B, N_row) weighs the rows (one-hot: the [CLS] row, a DETR
    query, a decoder position); ``columns`` (B, N_col) marks the columns kept
    (text: every token, padding masked; image: the patches or boxes);
    ``grid`` reshapes the kept columns; ``zero_self`` sets the explained
    token's own entry to 0 (LXMERT's R_tt[0, 0] = 0, VisualBERT's
    R[cls, cls] = 0).
    """

    row_stream: str
    weights: Tensor
    col_stream: str
    columns: Tensor
    grid: Optional[Tuple[int, int]] = None
    zero_self: bool = False


@dataclass
class Coupled:
    """Several token streams coupled by cross-attention (ICCV 2021).

    ``groups`` holds the attention calls in forward order; the calls of one
    group are applied from the same state (LXMERT's two cross-attention
    directions of one layer).  ``sizes`` and ``masks`` ((B, N) bool, real
    tokens) per stream; ``outputs`` the maps to read, in order.
    """

    groups: List[List[AttentionCall]]
    sizes: Dict[str, int]
    masks: Dict[str, Tensor]
    outputs: Dict[str, Output]

    @property
    def calls(self) -> List[AttentionCall]:
        return [c for group in self.groups for c in group]


@dataclass
class Trace:
    """Everything one explanation recorded (all tensors detached)."""

    logits: Tensor
    target: Tensor
    score: Tensor
    streams: Dict[str, Stream]
    input_relevance: Optional[Tensor] = None
    coupled: Optional[Coupled] = None
    starts: Dict[str, int] = field(default_factory=dict)
    """Each stream's start layer, resolved once by the recording (the
    method's default or the caller's ``start_layer``, checked there)."""


def last_call(stream: Stream) -> AttentionCall:
    """The stream's last attention call (an attention-pooling head's, if any)."""
    for op in reversed(stream.ops):
        if isinstance(op, AttentionCall):
            return op
    raise RuntimeError(f"stream {stream.name!r} recorded no attention")


def pooling_call(stream: Stream) -> Optional[AttentionCall]:
    """The cross-attention call of an attention-pooling head reading the stream, else None."""
    last = last_call(stream)
    return None if last.is_self else last


def attention_calls(stream: Stream, start_layer: int) -> List[AttentionCall]:
    """The calls from ``start_layer`` on (the layers a rollout includes)."""
    return stream.calls[start_layer:]


def propagate_row(stream: Stream, layer_matrix: Callable[[AttentionCall], Optional[Tensor]],
                  start_layer: int = 0, weights: Optional[Tensor] = None) -> Tensor:
    """The explained row of ``M_{L-1} ... M_s`` over the stream's input tokens, (B, N_0).

    ``layer_matrix(call)`` gives a call's matrix in its own layout
    (B', Nq, Nk), or None for the identity.  Self-attention calls before
    ``start_layer`` are the identity; cross-attention calls into the stream
    (an attention-pooling head) and merges always apply.  Evaluated from the
    left, ``v <- v M``, starting at the read-out weights (or ``weights``).
    ``start_layer`` is the one the recording resolved and checked
    (:attr:`Trace.starts`).
    """
    calls = stream.calls
    skipped = {id(c) for c in calls[:start_layer]}
    v = stream.readout.weights if weights is None else weights
    row = stream.readout.row if weights is None else None
    first = True
    for op in reversed(stream.ops):
        if isinstance(op, Merge):
            v = op.apply(v)
            first = False
            continue
        if id(op) in skipped:
            continue
        m = layer_matrix(op)
        if m is None:
            continue
        if first and row is not None and op.windows is None:
            v = m[:, row].clone()  # the row itself: no arithmetic
            if op.key_offset:
                v = F.pad(v, (op.key_offset, 0))
        else:
            v = op.apply(v, m)
        first = False
    return v


def propagate_column(stream: Stream, layer_matrix: Callable[[AttentionCall], Optional[Tensor]],
                     start_layer: int = 0) -> Tensor:
    """``M_{L-1} ... M_s 1`` (B, N): the row sums of the self-attention
    product, evaluated from the right (streams without windows or merges)."""
    calls = stream.calls
    x = None
    for call in calls[start_layer:]:
        if call.windows is not None or any(isinstance(op, Merge) for op in stream.ops):
            raise NotImplementedError("row sums of windowed or merged streams")
        m = layer_matrix(call)
        if m is None:
            continue
        x = m.sum(dim=-1) if x is None else torch.bmm(m, x.unsqueeze(-1)).squeeze(-1)
    if x is None:
        n = calls[0].probs.shape[-1]
        x = calls[0].probs.new_ones(calls[0].probs.shape[0], n)
    return x
