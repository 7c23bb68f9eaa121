"""The one registry of explanation methods: what each needs, and how it combines a trace.

A :class:`Method` says what it needs from a model (attention, gradients, an
LRP relevance pass and its rule set) and how it turns a recorded
:class:`~modules.trace.Stream` into relevance over the stream's input tokens
(``compute``).  :func:`modules.explain.explain` runs the passes a method asks
for and calls ``compute``; no other code branches on a method's name, so a
new method is one entry here.  Definitions: ../shared/METHODS.md sections 2,
3 and 8.

A CLI offers ``METHOD_CHOICES`` as ``--method`` choices; code calls
:func:`resolve_method` to turn a name or alias into a :class:`Method`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from modules import iccv
from modules.aggregation import add_identity, gradcam_map, head_mean, masked_minmax, positive_head_mean, row_normalize
from modules.trace import AttentionCall, Stream, Trace, last_call, pooling_call, propagate_column, propagate_row

__all__ = ["EVAL_START_LAYER", "Index", "resolve_index", "Method", "METHODS", "ALIASES", "METHOD_NAMES",
           "METHOD_CHOICES", "ATTENTION_METHODS", "resolve_method", "UnknownMethodError"]

Index = Union[None, int, Sequence[int], Tensor]

Compute = Callable[[Stream, int, Trace], Tensor]


@dataclass(frozen=True)
class Method:
    """One explanation method: what it needs and how it combines a trace.

    Attributes
    ----------
    name:
        Canonical name (the ``--method`` value).
    label:
        Name used in the papers' tables.
    rule_set:
        LRP rule set of its relevance pass (``"TA"``/``"LRP"``), or None
        when it needs no relevance pass (then an unmodified model can run it).
    needs_grad:
        Whether it needs the attention gradients d y_c / d A.
    class_specific:
        False for methods whose map ignores the explained class.
    compute:
        ``compute(stream, start_layer, trace)``: relevance over the stream's
        input tokens (B, N_0), or a finished (B, H, W) pixel map.
    last_layer_only:
        Needs gradients/relevance of the last attention layer only.
    self_entry:
        Text maps that keep the explained token's column (BERT's [CLS]):
        ``"zero"`` sets it to 0, ``"min"`` to the row's minimum (METHODS.md
        section 3); None leaves it.
    text_start:
        Default start layer on text streams: ``"last"`` for the published
        BERT transformer attribution, else 0.
    normalized:
        The output is min-max normalised per sample (GradCAM, as specified).
    to_input:
        Its relevance pass runs to the input (full LRP), instead of stopping
        at the first attention layer it needs.
    compute_coupled:
        ``compute_coupled(coupled, **options)``: the method on streams
        coupled by cross-attention (METHODS_ICCV.md), one map per output; None
        when the method has no such definition.
    options:
        Keyword options the method accepts: those ``compute_coupled`` takes
        (the published ablations) and those an adapter takes when it builds
        the streams (``Adapter.options``: CLIP's ``clip_convention``).
    adapter_options:
        Those of ``options`` an adapter takes (refused, with a one-line
        error, for a model whose adapter does not take them).
    coupled_rule_set:
        The rule set of the relevance pass on coupled streams (LXMERT, DETR),
        when it differs from ``rule_set``: the published multi-modal code has
        one LRP layer file per model, ``layers_ours`` (rule set TA: shared
        alpha-beta denominator, rescaled adds), used for every LRP baseline
        (METHODS_ICCV.md sections 2, 4).  ``generic_attribution`` with
        ``use_lrp=True`` runs the TA pass too (:data:`COUPLED_LRP_RULE_SET`).
    """

    name: str
    label: str
    rule_set: Optional[str]
    needs_grad: bool
    class_specific: bool
    compute: Compute
    last_layer_only: bool = False
    self_entry: Optional[str] = None
    text_start: str = "first"
    normalized: bool = False
    to_input: bool = False
    compute_coupled: Optional[Callable[..., Dict[str, Tensor]]] = None
    options: Tuple[str, ...] = ()
    input_gradient: bool = False
    adapter_options: Tuple[str, ...] = ()
    coupled_rule_set: Optional[str] = None

    @property
    def needs_copy(self) -> bool:
        """True for methods that need an LRP pass (the copies, or the LRP scope on unmodified families)."""
        return self.rule_set is not None

    def default_start_layer(self, stream: Stream) -> int:
        if stream.default_start == "last":  # the stream's own convention (CLIP published)
            return len(stream.calls) - 1
        if stream.default_start == "first":  # VisualBERT published: every layer
            return 0
        return len(stream.calls) - 1 if stream.text_conventions and self.text_start == "last" else 0


# --------------------------------------------------------------------------
# The computations (each one equation of METHODS.md)
# --------------------------------------------------------------------------
def _last(stream: Stream) -> AttentionCall:
    """The last attention the head depends on: an attention-pooling head's
    call (a cross-attention from the pooling query), else the last layer."""
    return last_call(stream)


def _only_last(stream: Stream, matrix: Callable[[AttentionCall], Tensor]) -> Callable[[AttentionCall], Optional[Tensor]]:
    last = _last(stream)
    return lambda call: matrix(call) if call is last else None


def _transformer_attribution(stream: Stream, start: int, trace: Trace) -> Tensor:
    """M_l = I + mean_h max(grad_l * Rattn_l, 0), row-normalised on text
    streams (METHODS.md sections 2, 3) except where the stream's rollout is
    not (VisualBERT published, METHODS_ICCV.md section 3); the explained row
    of the rollout."""
    normalize = stream.text_conventions and stream.rollout_row_normalize

    def matrix(call: AttentionCall) -> Tensor:
        m = add_identity(positive_head_mean(call.grad * call.relevance))
        return row_normalize(m) if normalize else m
    return propagate_row(stream, matrix, start)


def _attention(stream: Stream, start: int) -> Callable[[AttentionCall], Tensor]:
    """What an attention-only method reads of a call: the probabilities, or
    their LRP relevance when the adapter ran the relevance pass for every
    call it uses ("ours with LRP", ``use_lrp=True``: the published
    ``generate_ours(use_lrp=True)``)."""
    used = stream.calls[start:] + [op for op in stream.ops if isinstance(op, AttentionCall) and not op.is_self]
    if all(c.relevance is not None for c in used):
        return lambda call: call.relevance
    return lambda call: call.probs


def _generic_attribution(stream: Stream, start: int, trace: Trace) -> Tensor:
    """R = I; R <- R + mean_h max(grad_l * A_l, 0) R for l >= s (ICCV 2021, Eqs. 5-7).

    An attention-pooling head (one learned query over the tokens) is a
    cross-attention from a one-token stream (METHODS.md section 8):
    r = Abar_pool @ Rbar, Rbar = (R - I) / rowsum(R - I) + I (Eqs. 8-10,
    Rbar of the one-token stream = 1), NaN entries (rows of R - I that sum
    to 0) set to 0.  With u = Abar_pool / rowsum(R - I), r = u R - u + Abar_pool,
    so only the row sums R 1 are needed besides the usual row.
    """
    attn = _attention(stream, start)

    def self_matrix(call: AttentionCall) -> Tensor:
        return add_identity(positive_head_mean(call.grad * attn(call)))

    pool = pooling_call(stream)
    if pool is None:
        return propagate_row(stream, self_matrix, start)
    abar = positive_head_mean(pool.grad * attn(pool))  # (B, 1, Nk)
    a = propagate_row(stream, lambda call: abar if call is pool else None, start)  # Abar_pool over the tokens
    d = propagate_column(stream, lambda call: None if call is pool else self_matrix(call), start) - 1
    u = torch.nan_to_num(a / d, nan=0.0, posinf=0.0, neginf=0.0)
    return propagate_row(stream, lambda call: None if call is pool else self_matrix(call), start, weights=u) - u + a


def _rollout(stream: Stream, start: int, trace: Trace) -> Tensor:
    """M_l = row-normalised (I + mean_h A_l) (Abnar & Zuidema 2020); without
    the row normalisation on streams that ask for it (VisualBERT's published
    baseline, METHODS_ICCV.md section 3)."""
    norm = row_normalize if stream.rollout_row_normalize else (lambda m: m)
    return propagate_row(stream, lambda call: norm(add_identity(head_mean(call.probs))) if call.is_self
                         else head_mean(call.probs), start)


def _attn_last_layer(stream: Stream, start: int, trace: Trace) -> Tensor:
    """Mean over heads of max(A_{L-1}, 0), the explained row."""
    return propagate_row(stream, _only_last(stream, lambda call: positive_head_mean(call.probs)))


def _lrp_last_layer(stream: Stream, start: int, trace: Trace) -> Tensor:
    """Partial LRP: mean over heads of max(Rattn_{L-1}, 0), the explained row.
    VisualBERT's published generator (``stream.partial_lrp_minmax``): the
    head mean of the signed Rattn_{L-1}, min-max normalised over the whole
    map of real tokens (MMF drops the padding), then the explained row."""
    if stream.partial_lrp_minmax:
        call = _last(stream)
        R = call.relevance
        real = stream.readout.token_mask if stream.readout.token_mask is not None else \
            torch.ones(R.shape[0], R.shape[-1], dtype=torch.bool, device=R.device)
        full = masked_minmax(head_mean(R), real[:, :, None] & real[:, None, :])
        return propagate_row(stream, _only_last(stream, lambda c: full))
    return propagate_row(stream, _only_last(stream, lambda call: positive_head_mean(call.relevance)))


def _attn_gradcam(stream: Stream, start: int, trace: Trace) -> Tensor:
    """GradCAM on the last layer's attention (METHODS.md sections 2, 3).

    Image streams: w_h = mean of the explained row of grad_h over the map's
    columns; max(mean_h w_h A_h[row], 0) (normalised by the engine).
    Text streams (the published BERT code): w_h = mean of grad_h over the
    whole map (real tokens), max(mean_h w_h A_h, 0) min-max normalised over
    the map, the explained token's own entry set to 0, then its row.
    """
    call = _last(stream)
    A, G = call.probs, call.grad
    readout = stream.readout
    if stream.text_conventions:
        real = readout.token_mask if readout.token_mask is not None else \
            torch.ones(A.shape[0], A.shape[-1], dtype=torch.bool, device=A.device)
        pair = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, N, N)
        full = masked_minmax(gradcam_map(A, G, pair), pair[:, 0])
        if readout.self_column is not None:
            full[:, readout.self_column, readout.self_column] = 0
        return propagate_row(stream, _only_last(stream, lambda c: full))
    # the explained row of each head's gradient and attention, over the last layer's keys
    heads = range(A.shape[1])
    g_rows = torch.stack([propagate_row(stream, _only_last(stream, lambda c, h=h: G[:, h])) for h in heads], 1)
    a_rows = torch.stack([propagate_row(stream, _only_last(stream, lambda c, h=h: A[:, h])) for h in heads], 1)
    cols = readout.columns[:, None, :]  # (B, 1, N_0)
    w = (g_rows * cols).sum(dim=-1, keepdim=True) / cols.sum(dim=-1, keepdim=True)  # (B, H, 1)
    return (w * a_rows).mean(dim=1).clamp(min=0)


def _lrp(stream: Stream, start: int, trace: Trace) -> Tensor:
    """Relevance at the input (full LRP, AttnLRP, CP-LRP): pixels (B, H, W)
    summed over colour channels, or tokens (B, N) summed over the hidden
    dimension (the word embeddings for AttnLRP / CP-LRP); by stream for a
    two-stream model."""
    r = trace.input_relevance
    return r[stream.name] if isinstance(r, dict) else r


def _coupled_generic(coupled, **options) -> Dict[str, Tensor]:
    """The paper's method; "ours with LRP" when the adapter was asked for it
    (``use_lrp=True``, an adapter option: the adapter then runs the relevance
    pass and the trace carries R_A for every call)."""
    return iccv.read_outputs(coupled, iccv.coupled_generic(coupled, use_lrp=iccv.has_relevance(coupled), **options))


def _coupled_transformer_attribution(coupled) -> Dict[str, Tensor]:
    return iccv.read_outputs(coupled, iccv.coupled_transformer_attribution(coupled))


def _coupled_partial_lrp(coupled) -> Dict[str, Tensor]:
    return iccv.read_outputs(coupled, iccv.coupled_partial_lrp(coupled))


def _coupled_rollout(coupled) -> Dict[str, Tensor]:
    return iccv.read_outputs(coupled, iccv.coupled_rollout(coupled))


def _coupled_raw(coupled) -> Dict[str, Tensor]:
    return iccv.read_outputs(coupled, iccv.coupled_last_layer(coupled, iccv.raw_attention))


def _coupled_gradcam(coupled) -> Dict[str, Tensor]:
    masks = coupled.masks
    return iccv.read_outputs(coupled, iccv.coupled_last_layer(coupled, lambda c: iccv.coupled_gradcam(c, masks)))


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("transformer_attribution", "Transformer attribution (ours)", "TA", True, True, _transformer_attribution,
           self_entry="min", text_start="last", compute_coupled=_coupled_transformer_attribution,
           coupled_rule_set="TA"),
    Method("generic_attribution", "Generic attention attribution", None, True, True, _generic_attribution,
           compute_coupled=_coupled_generic,
           options=("normalize", "self_in_rule_10", "nan_guard", "clip_convention", "use_lrp"),
           adapter_options=("clip_convention", "use_lrp")),
    Method("rollout", "Rollout", None, False, False, _rollout, self_entry="zero", compute_coupled=_coupled_rollout),
    Method("attn_last_layer", "Raw attention", None, False, False, _attn_last_layer, last_layer_only=True,
           self_entry="zero", compute_coupled=_coupled_raw),
    Method("attn_gradcam", "GradCAM", None, True, True, _attn_gradcam, last_layer_only=True, normalized=True,
           compute_coupled=_coupled_gradcam),
    Method("lrp_last_layer", "Partial LRP", "LRP", False, True, _lrp_last_layer, last_layer_only=True,
           self_entry="zero", compute_coupled=_coupled_partial_lrp, coupled_rule_set="TA"),
    Method("lrp", "LRP", "LRP", False, True, _lrp, self_entry="zero", to_input=True),
    Method("attnlrp", "AttnLRP (Achtibat et al. 2024)", "AttnLRP", False, True, _lrp, to_input=True,
           input_gradient=True),
    Method("cplrp", "CP-LRP (Ali et al. 2022)", "CPLRP", False, True, _lrp, to_input=True, input_gradient=True),
)}

ALIASES: Dict[str, str] = {
    "full_lrp": "lrp",
    "partial_lrp": "lrp_last_layer",
    "last_attn": "attn_last_layer",
}

COUPLED_LRP_RULE_SET = "TA"
"""Rule set of ``generic_attribution(use_lrp=True)`` on coupled streams (the
published ``generate_ours(use_lrp=True)`` runs the model's ``relprop``,
``layers_ours``: TA)."""

COUPLED_LRP_METHODS: Tuple[str, ...] = ("transformer_attribution", "lrp_last_layer")
"""The LRP methods with a coupled-stream definition (METHODS_ICCV.md sections 2-4)."""

EVAL_START_LAYER: Dict[str, int] = {"transformer_attribution": 1, "rollout": 1}
"""start_layer the paper's evaluation scripts use (METHODS.md section 2); 0 for the rest."""

METHOD_NAMES: Tuple[str, ...] = tuple(METHODS)
METHOD_CHOICES: Tuple[str, ...] = METHOD_NAMES + tuple(ALIASES)
ATTENTION_METHODS: Tuple[str, ...] = tuple(name for name, m in METHODS.items() if not m.needs_copy)
"""Methods that need only attention and gradients: every model can run them."""


class UnknownMethodError(ValueError):
    pass


def resolve_method(name: Union[str, Method]) -> Method:
    """The :class:`Method` for a canonical name or alias; an unknown name
    raises :class:`UnknownMethodError` listing the valid ones."""
    if isinstance(name, Method):
        return name
    key = ALIASES.get(name, name)
    try:
        return METHODS[key]
    except (KeyError, TypeError):
        raise UnknownMethodError(
            f"unknown method {name!r}; valid: {', '.join(METHOD_NAMES)} "
            f"(aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())})"
        ) from None


def resolve_index(index: Index, logits: Tensor, what: str = "class") -> Tensor:
    """The explained class per sample, (B,) long: argmax of ``logits`` when
    ``index`` is None, else ``index`` (an int for every sample, or one per
    sample).  Fractional or out-of-range indices raise ValueError.

    ``what`` names the index in messages (``"class"``, ``"text"``).
    """
    B, C = logits.shape
    if index is None:
        return logits.argmax(dim=-1)
    if isinstance(index, bool):
        raise ValueError(f"{what} index {index!r} is not a whole number")
    target = torch.as_tensor(index, device=logits.device).reshape(-1)
    if target.dtype == torch.bool or (target.is_floating_point() and not bool((target == target.round()).all())):
        raise ValueError(f"{what} index {target.tolist()} is not a whole number")
    target = target.long()
    if target.numel() == 1:
        target = target.expand(B)
    if target.numel() != B:
        raise ValueError(f"index holds {target.numel()} {what} indices for a batch of {B}")
    if bool(((target < 0) | (target >= C)).any()):
        noun = "classes" if what == "class" else f"{what}s"
        raise ValueError(f"{what} index {target.tolist()} out of range: the model has {C} {noun} (0..{C - 1})")
    return target
