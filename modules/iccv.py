"""The rules of Chefer, Gur, Wolf, ICCV 2021 (bi-modal and encoder-decoder attention).

Pure, batched tensor functions, each the equation of the paper as the
published code computes it (../shared/METHODS_ICCV.md section 1), and the
propagation over several token streams coupled by cross-attention
(:class:`~modules.trace.Coupled`).  Unlike the published code (batch 1), every
function is per sample: no reduction crosses dimension 0, and padded tokens
(``mask`` False) take no part.

Matrices are indexed [row = receiving (query-side) token, column = source token].
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from modules.aggregation import gradcam_map, head_mean, masked_minmax, positive_head_mean, rollout_product

__all__ = ["self_attention_rule", "rbar", "bimodal_rule", "init_relevance", "mask_map",
           "nan_to_zero", "coupled_generic", "coupled_last_layer", "coupled_rollout",
           "raw_attention", "coupled_gradcam", "read_outputs", "coupled_transformer_attribution", "coupled_partial_lrp",
           "has_relevance"]


def self_attention_rule(R_s: Dict[str, Tensor], abar: Tensor) -> Dict[str, Tensor]:
    """Eqs. 6, 7: the additions R_st += Abar R_st of a self-attention of
    stream s, for every stream t (R_ss and the cross terms R_sq alike, each
    from the values before the update); ``abar`` (B, Ns, Ns), ``R_s`` the
    row of stream pairs {t: R_st}.  The single-stream methods apply the same
    rule as a row vector, v <- v (I + Abar) (:func:`modules.trace.propagate_row`)."""
    return {t: torch.bmm(abar, R) for t, R in R_s.items()}


def nan_to_zero(x: Tensor) -> Tensor:
    """The NaN guard of the published DETR generator: NaN entries set to 0."""
    return torch.nan_to_num(x, nan=0.0)


def rbar(R: Tensor, mask: Optional[Tensor] = None, nan_guard: bool = True) -> Tensor:
    """Eqs. 8, 9: Rbar = (R - I) / rowsum(R - I) + I, rows of Rbar summing to 2.

    The division is plain (no epsilon): a row of R - I that sums to 0 gives
    NaN (0/0) in that row, kept with ``nan_guard=False`` (the published LXMERT
    generator) and set to 0 with ``nan_guard=True`` (the published DETR
    generator sets NaN entries of the addition to 0).  Padded tokens
    (``mask`` (B, N) False) get zero rows and columns (never NaN).
    """
    n = R.shape[-1]
    eye = torch.eye(n, dtype=R.dtype, device=R.device)
    rhat = R - eye
    out = rhat / rhat.sum(dim=-1, keepdim=True)
    if mask is not None:  # padded tokens take no part, whatever nan_guard says
        out = torch.where(mask[:, :, None] & mask[:, None, :], out, torch.zeros_like(out))
    if nan_guard:
        out = nan_to_zero(out)
    out = out + eye
    return out if mask is None else mask_map(out, mask, mask)


def bimodal_rule(R_ss: Tensor, R_qq: Tensor, R_qs: Tensor, abar_sq: Tensor, normalize: bool = True,
                 self_in_rule_10: bool = True, mask_s: Optional[Tensor] = None, mask_q: Optional[Tensor] = None,
                 nan_guard: Union[bool, str] = True) -> Tuple[Tensor, Tensor]:
    """Eqs. 10, 11 for a cross-attention with queries from stream s and keys
    from stream q, ``abar_sq`` (B, Ns, Nq):

        dR_sq = Rbar_ss^T Abar_sq Rbar_qq          (Eq. 10, note the transpose)
        dR_ss = Abar_sq R_qs                       (Eq. 11, R_qs not normalised)

    ``normalize=False`` uses R_ss, R_qq for the R bars (ablation);
    ``self_in_rule_10=False`` makes dR_sq = Abar_sq (ablation).  A real row of
    R - I that sums to 0 makes a NaN row of its R bar; ``nan_guard``:

    * True: that row of the R bar is set to 0 before the product (and any
      NaN entry of dR_sq to 0);
    * ``"published"``: as the published DETR generator
      (``R_sq_addition[isnan] = 0``, METHODS_ICCV.md section 4): the NaN row
      runs through the product, which is then NaN everywhere, and the NaN
      entries of dR_sq are set to 0 — the whole addition is dropped;
    * False: NaN kept (the published LXMERT generator).

    Padded tokens never make NaN (:func:`rbar`).  Returns (dR_sq, dR_ss).
    """
    if nan_guard not in (True, False, "published"):
        raise ValueError(f"nan_guard={nan_guard!r}; use True, False or 'published'")
    if self_in_rule_10:
        inner = nan_guard is True
        left = rbar(R_ss, mask_s, inner) if normalize else R_ss
        right = rbar(R_qq, mask_q, inner) if normalize else R_qq
        d_sq = torch.bmm(torch.bmm(left.transpose(1, 2), abar_sq), right)
    else:
        d_sq = abar_sq
    if nan_guard:
        d_sq = nan_to_zero(d_sq)
    return d_sq, torch.bmm(abar_sq, R_qs)


def init_relevance(sizes: Dict[str, int], batch: int, dtype: torch.dtype, device: torch.device,
                   masks: Optional[Dict[str, Tensor]] = None) -> Dict[Tuple[str, str], Tensor]:
    """R_ss = I (self-relevance; over the real tokens), R_st = 0 (cross relevance), for every pair of streams."""
    R = {}
    for s, ns in sizes.items():
        for t, nt in sizes.items():
            if s == t:
                eye = torch.eye(ns, dtype=dtype, device=device).expand(batch, ns, ns).clone()
                R[s, t] = eye if masks is None or s not in masks else mask_map(eye, masks[s], masks[s])
            else:
                R[s, t] = torch.zeros(batch, ns, nt, dtype=dtype, device=device)
    return R


def mask_map(m: Tensor, rows: Optional[Tensor], cols: Optional[Tensor]) -> Tensor:
    """Zero the rows and columns of padded tokens of a (B, Nr, Nc) map."""
    if rows is not None:
        m = m * rows[:, :, None].to(m.dtype)
    if cols is not None:
        m = m * cols[:, None, :].to(m.dtype)
    return m


# --------------------------------------------------------------------------
# The methods on coupled streams (METHODS_ICCV.md sections 2 and 4)
# --------------------------------------------------------------------------
def _abar(call, masks, fn) -> Tensor:
    return mask_map(fn(call), masks.get(call.query), masks.get(call.key))


def coupled_generic(coupled, normalize: bool = True, self_in_rule_10: bool = True,
                    nan_guard: Union[bool, str] = True, use_lrp: bool = False) -> Dict[Tuple[str, str], Tensor]:
    """The paper's method (``generate_ours`` without LRP), every stream pair's R.

    Self-attention calls apply Eqs. 6-7, cross-attention calls Eqs. 10-11;
    the calls of one group are all computed from the state before the group
    (LXMERT's two directions of one cross layer), then added.  ``normalize``
    and ``self_in_rule_10`` are the published ablations; ``nan_guard=False``
    keeps NaNs as the published LXMERT generator does, ``"published"``
    drops a whole Eq. 10 addition that holds a NaN as the published DETR
    generator does (:func:`bimodal_rule`).  ``use_lrp`` (the published
    ``generate_ours(use_lrp=True)``, "ours with LRP"): every A replaced by its
    LRP relevance, the gradient still multiplied: Abar = mean_h max(G * R_A, 0).
    """
    first = coupled.calls[0].probs
    masks = coupled.masks
    R = init_relevance(coupled.sizes, first.shape[0], first.dtype, first.device, masks)
    for group in coupled.groups:
        deltas = []
        for call in group:
            abar = _abar(call, masks, lambda c: positive_head_mean(c.grad * (c.relevance if use_lrp else c.probs)))
            s, q = call.query, call.key
            if call.is_self:
                deltas += [((s, t), d) for t, d in self_attention_rule({t: R[s, t] for t in coupled.sizes},
                                                                       abar).items()]
            else:
                d_sq, d_ss = bimodal_rule(R[s, s], R[q, q], R[q, s], abar, normalize, self_in_rule_10,
                                          masks.get(s), masks.get(q), nan_guard)
                deltas += [((s, q), d_sq), ((s, s), d_ss)]
        for key, d in deltas:
            R[key] = R[key] + d
    return R


def _last_calls(coupled, row_stream: str, col_stream: str):
    """The last self-attention call of ``row_stream`` (col_stream == row_stream),
    else its last cross-attention call into ``col_stream``."""
    for call in reversed(coupled.calls):
        if call.query == row_stream and call.key == col_stream:
            return call
    raise RuntimeError(f"no attention from {row_stream} to {col_stream} was recorded")


def coupled_last_layer(coupled, weigh: Callable) -> Dict[Tuple[str, str], Tensor]:
    """R[s, t] = ``weigh(call)`` (B, Ns, Nt) of the last attention from s to t
    (the raw-attention and GradCAM baselines of METHODS_ICCV.md sections 2, 4)."""
    out = {}
    for o in coupled.outputs.values():
        call = _last_calls(coupled, o.row_stream, o.col_stream)
        out[o.row_stream, o.col_stream] = _abar(call, coupled.masks, weigh)
    return out


def raw_attention(call) -> Tensor:
    """Mean over heads of A (no gradient, no clamp)."""
    return head_mean(call.probs)


def coupled_gradcam(call, masks) -> Tensor:
    """GradCAM of METHODS_ICCV.md section 2: w_h = mean of G_h over the whole
    (real) map; max(mean_h w_h A_h, 0) (clamp after the head mean)."""
    pair = mask_map(torch.ones_like(call.probs[:, 0]), masks.get(call.query), masks.get(call.key))[:, None]
    return gradcam_map(call.probs, call.grad, pair)  # pair (B, 1, Nq, Nk)


def coupled_rollout(coupled) -> Dict[Tuple[str, str], Tensor]:
    """Rollout baseline (class independent): R[s, s] = rollout of every
    self-attention of s; R[s, t] = rollout_s^T Abar_st rollout_t with Abar_st
    the head-mean of the last cross-attention from s to t and each rollout
    over the stream's self-attention calls before that cross-attention."""
    calls = coupled.calls
    masks = coupled.masks
    out = {}

    def rollout_of(stream: str, before: Optional[int] = None) -> Tensor:
        mask = masks.get(stream)
        maps = [mask_map(head_mean(c.probs), mask, mask) for i, c in enumerate(calls)
                if c.query == stream and c.key == stream and (before is None or i < before)]
        joint = rollout_product(maps)
        if joint is None:
            first = calls[0].probs
            n = coupled.sizes[stream]
            joint = torch.eye(n, dtype=first.dtype, device=first.device).expand(first.shape[0], n, n)
        return joint

    for o in coupled.outputs.values():
        s, t = o.row_stream, o.col_stream
        if s == t:
            out[s, t] = rollout_of(s)
            continue
        idx = max(i for i, c in enumerate(calls) if c.query == s and c.key == t)
        cross = _abar(calls[idx], masks, raw_attention)
        out[s, t] = torch.bmm(torch.bmm(rollout_of(s, idx).transpose(1, 2), cross), rollout_of(t, idx))
    return out


def has_relevance(coupled) -> bool:
    """True when the trace carries an LRP relevance for every call (the
    adapter ran the relevance pass: a method or option that asked for it)."""
    return all(c.relevance is not None for c in coupled.calls)


def coupled_transformer_attribution(coupled) -> Dict[Tuple[str, str], Tensor]:
    """The CVPR method adapted to coupled streams, as the published
    ``GeneratorBaselines.generate_transformer_attr`` (LXMERT) and DETR's
    ``generate_transformer_att`` compute it (METHODS_ICCV.md sections 2, 4):
    Abar = mean_h max(G * R_A, 0) with R_A the LRP relevance of A;

    * R[s, s] = I, then R <- R + Abar R over **every** self-attention call of
      stream s, in forward order (LXMERT: the language encoder and every
      x-layer's ``lang_self_att``, the last included), no cross term;
    * R[s, t], s != t: Abar of the **last** cross-attention from s to t
      alone (no aggregation, no R bar).
    """
    masks = coupled.masks
    out = {}
    for o in coupled.outputs.values():
        s, t = o.row_stream, o.col_stream
        weigh = lambda c: positive_head_mean(c.grad * c.relevance)  # noqa: E731
        if s != t:
            out[s, t] = _abar(_last_calls(coupled, s, t), masks, weigh)
            continue
        first = coupled.calls[0].probs
        n = coupled.sizes[s]
        eye = torch.eye(n, dtype=first.dtype, device=first.device).expand(first.shape[0], n, n)
        R = mask_map(eye, masks.get(s), masks.get(s))
        for call in coupled.calls:
            if call.query == s and call.key == s:
                R = R + self_attention_rule({s: R}, _abar(call, masks, weigh))[s]
        out[s, t] = R
    return out


def coupled_partial_lrp(coupled) -> Dict[Tuple[str, str], Tensor]:
    """Partial LRP as published (``generate_partial_lrp``, METHODS_ICCV.md
    sections 2, 4): the LRP relevance of the last attention from s to t
    (self: the stream's last self-attention), mean over heads (no gradient,
    no clamp), min-max normalised over the **whole matrix** (the real rows
    and columns of each sample; a constant matrix gives 0, where the
    published division would give NaN).  The explained token's own entry is
    zeroed after the normalisation by :func:`read_outputs` (``zero_self``)."""
    masks = coupled.masks
    out = {}
    for o in coupled.outputs.values():
        s, t = o.row_stream, o.col_stream
        call = _last_calls(coupled, s, t)
        m = head_mean(call.relevance)
        B, nq, nk = m.shape
        rows = masks.get(s, torch.ones(B, nq, dtype=torch.bool, device=m.device))
        cols = masks.get(t, torch.ones(B, nk, dtype=torch.bool, device=m.device))
        if call.key_offset or nk != cols.shape[1]:
            raise RuntimeError(f"partial LRP: the map of {call.name} does not cover stream {t}")
        out[s, t] = masked_minmax(m, rows[:, :, None] & cols[:, None, :])
    return out


def read_outputs(coupled, R: Dict[Tuple[str, str], Tensor]) -> Dict[str, Tensor]:
    """Each output's explained row of R[row_stream, col_stream]: the explained
    token's own entry set to 0 where asked, padded or dropped columns 0 (text,
    boxes); on a grid the ``columns`` are reshaped to it, padded cells 0."""
    maps = {}
    for name, o in coupled.outputs.items():
        row = torch.bmm(o.weights.to(R[o.row_stream, o.col_stream].dtype).unsqueeze(1),
                        R[o.row_stream, o.col_stream]).squeeze(1)
        if o.zero_self and o.row_stream == o.col_stream:
            row = row.scatter(1, o.weights.argmax(dim=1, keepdim=True), 0.0)
        cols = o.columns & coupled.masks.get(o.col_stream, torch.ones_like(o.columns))
        if o.grid is None:
            maps[name] = row.masked_fill(~cols, 0.0)
        else:  # the grid of the batch: padded cells (mask False) read 0 (DETR's padded feature maps)
            maps[name] = row.masked_fill(~cols, 0.0)[o.columns].reshape(row.shape[0], *o.grid)
    return maps
