"""LRP rules attached to tensor operations: every LRP method on unmodified models.

../shared/METHODS.md section 10 is the specification.  Inside
:func:`relevance_scope` a :class:`torch.overrides.TorchFunctionMode` sees
every torch call of the model's forward.  Each *computing* operation whose
input depends on the explained input (an "activation") gets a switch: an
``autograd.Function`` whose output equals the operation's, and whose
backward either

* passes the incoming gradient on to the operation's own autograd graph
  (the *gradient* pass: ``d y_c / d A_l`` exactly as autograd computes it), or
* maps the incoming relevance to the relevance of the operation's
  activation inputs with the rule of the chosen rule set (the *relevance*
  pass, zennit's "relevance as the gradient").

:attr:`ScopeState.relevance` says which, read at backward time, so one
forward serves both passes.  Routing operations (reshape, index, cat, ...)
are left to autograd, whose backward routes relevance exactly (a tensor
read twice sums its branches: the Clone rule).  An operation on an
activation that neither computes by a known rule nor routes is refused with
a one-line :class:`UnsupportedOperationError` naming it and the module it
ran in.

In-place forms (``x += y``, ``x.add_(y)``, ``x.mul_(c)``, ``x /= c``,
``torch.relu_(x)``) are their out-of-place operation by the same rule,
computed on a copy of ``x`` taken before the write and then written into
``x`` (autograd routes the write), so the model sees exactly what it sees
without the scope; an activation module that writes its input
(``nn.ReLU(inplace=True)``) likewise; in-place routing (``masked_fill_``,
``t[i] = v``, ``unsqueeze_``) stays autograd's.  The rules keep the values they read at
backward time without copying them; a write of the forward into memory a
rule keeps first gives that rule its own copy (copy on write), so each rule
reads what its operation saw, and a write the scope could not see (after it
closed) is refused when the rule reads the value.

Which tensors are activations: inside the scope no parameter requires grad
(their flags are put back on exit) and the explained input is a leaf that
does, so ``requires_grad`` marks exactly the tensors that depend on the
explained input.  A position embedding, an attention mask or a rotary
table is then a constant, whatever parameter it was computed from.

Rule sets (:data:`modules.layers.RULE_SETS`): ``TA`` and ``LRP`` compute
relevance directly (METHODS.md sections 1-3); ``AttnLRP`` and ``CPLRP``
are modified gradients, the relevance being input x gradient (section 9).

Elementwise activation modules and RMS norms written as several torch calls
(Hugging Face ``NewGELUActivation``, ``LlamaRMSNorm``; timm ``QuickGELU``)
are treated as one operation at module level (:func:`module_rule`): their
inner calls run plainly and their output gets the switch.

The model is left exactly as found: no attribute is set on it, the
parameters' ``requires_grad`` flags are restored, and the module hooks used
to name modules in messages are global hooks removed on exit.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from modules.layers import RULE_SETS, RULES, add_relevance, alpha_beta, matmul_relevance, safe_div, z_beta
from modules.mha import multi_head_attention

__all__ = ["ScopeState", "UnsupportedOperationError", "relevance_scope", "ROUTING", "module_rule",
           "conv2d_alpha_beta_params", "sum_to"]


class UnsupportedOperationError(RuntimeError):
    """An operation on an activation that has no LRP rule (one-line message)."""


# --------------------------------------------------------------------------
# State of one explanation
# --------------------------------------------------------------------------
@dataclass
class ScopeState:
    """What one scope records; read by the switches at backward time.

    Attributes
    ----------
    rule_set:
        One of :data:`modules.layers.RULE_SETS`.
    relevance:
        False: backward passes are ordinary gradients; True: relevance
        (TA/LRP) or the rule set's modified gradient (AttnLRP/CP-LRP).
        Kept in :attr:`switch`, the only part of the state the autograd
        graph refers to: the graph never refers back to the state and the
        probabilities it records (no reference cycle, which Python's
        collector cannot see through the graph: each forward would leak).
    gradient:
        Whether a gradient pass will run (transformer attribution's
        ``d y_c / d A``).  False (rule sets TA and LRP only): the operations'
        own values are computed without their autograd graph, so the forward
        keeps only what the rules read (the batch-proportional memory of a
        second graph is not allocated).
    attentions:
        (module name, probabilities) of every ``scaled_dot_product_attention``
        the scope decomposed, in forward order.
    ops:
        Number of operations that received a rule (for the overhead report).
    kept:
        The values the rules read at backward time, by storage (weak
        references, emptied when the scope closes): an in-place write inside
        the forward (``a += b``, ``x.mul_(c)``, ``t[i] = v``, ``masked_fill_``)
        first gives each of them its own copy, so every rule reads the values
        its operation saw (copy on write).
    """

    rule_set: str
    attentions: List[Tuple[str, Tensor]] = field(default_factory=list)
    ops: int = 0
    module_stack: List[str] = field(default_factory=list)
    opaque: int = 0
    gradient: bool = True
    switch: "_Pass" = field(default_factory=lambda: _Pass(), repr=False)
    kept: Dict[Any, List["weakref.ref[_Kept]"]] = field(default_factory=dict, repr=False)

    def keep(self, t: Tensor, op: str) -> "_Kept":
        """``t``'s value as a rule reads it at backward time, registered by
        storage so that a write inside the forward copies it first."""
        kept = _Kept(t, op)
        self.kept.setdefault(_storage(t), []).append(weakref.ref(kept))
        return kept

    def before_write(self, t: Any) -> None:
        """Copy on write: every value a rule keeps in ``t``'s storage gets its
        own copy before an operation of the forward writes there."""
        if isinstance(t, Tensor) and self.kept:
            for ref in self.kept.pop(_storage(t), ()):
                kept = ref()
                if kept is not None:
                    kept.own_copy()

    @property
    def relevance(self) -> bool:
        return self.switch.relevance

    @relevance.setter
    def relevance(self, on: bool) -> None:
        self.switch.relevance = bool(on)

    @property
    def graph_free(self) -> bool:
        """Operations computed without their own graph (no gradient pass, rule set TA or LRP)."""
        return not self.gradient and not self.gradient_rules

    @property
    def gradient_rules(self) -> bool:
        return RULES[self.rule_set].gradient

    @property
    def shared(self) -> bool:
        """TA: shared alpha-beta denominator and rescaled adds."""
        return RULES[self.rule_set].shared

    def where(self) -> str:
        return self.module_stack[-1] if self.module_stack else "the model's forward"


class _Pass:
    """Which pass the switches of one scope run (see :attr:`ScopeState.relevance`)."""

    __slots__ = ("relevance",)

    def __init__(self) -> None:
        self.relevance = False


class _Switch(torch.autograd.Function):
    """``y`` (computed by the operation, with its own graph) in the forward;
    in the backward either the gradient to ``y`` (gradient pass) or
    ``rule(R)`` to the activations (relevance pass)."""

    @staticmethod
    def forward(ctx, flag: _Pass, rule: Callable, y: Tensor, *acts: Tensor) -> Tensor:
        ctx.flag, ctx.rule, ctx.n = flag, rule, len(acts)
        return y.detach()

    @staticmethod
    def backward(ctx, g: Tensor):
        if not ctx.flag.relevance:
            return (None, None, g) + (None,) * ctx.n
        out = ctx.rule(g)
        return (None, None, None) + tuple(out)


def _switch(state: ScopeState, y: Tensor, acts: Sequence[Tensor], rule: Callable) -> Tensor:
    state.ops += 1
    return _Switch.apply(state.switch, rule, y, *acts)


def _storage(t: Tensor) -> Any:
    """A key of the memory ``t`` lives in (views of one tensor share it)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage: never written in place here
        return None


class _Kept:
    """A value a rule reads at backward time: the operation's tensor,
    detached (no copy), until a write inside the forward gives it its own
    copy (:meth:`ScopeState.before_write`).  A write the scope did not see
    (after it closed, or through ``.data``) is refused when the rule reads
    it, never misread."""

    __slots__ = ("t", "version", "op", "__weakref__")

    def __init__(self, t: Tensor, op: str):
        self.t = t.detach()
        self.version = self.t._version
        self.op = op

    def own_copy(self) -> None:
        self.t = self.t.clone()
        self.version = self.t._version

    @property
    def value(self) -> Tensor:
        if self.t._version != self.version:
            raise UnsupportedOperationError(f"LRP: a tensor the rule of torch '{self.op}' reads was modified in "
                                            "place after the operation, where the scope could not see the write")
        return self.t


class _Meta(NamedTuple):
    """A tensor's shape and dtype: what :func:`sum_to` reads (a rule that
    keeps only this lets the forward free the tensor)."""

    shape: torch.Size
    dtype: torch.dtype


def _meta(t: Tensor) -> _Meta:
    return _Meta(t.shape, t.dtype)


def sum_to(g: Tensor, like: Union[Tensor, _Meta]) -> Tensor:
    """Reduce a broadcast relevance back to ``like``'s shape and dtype."""
    shape = like.shape
    while g.dim() > len(shape):
        g = g.sum(dim=0)
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g.to(like.dtype)


def _is_act(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad


# --------------------------------------------------------------------------
# The rules (METHODS.md section 10's table)
# --------------------------------------------------------------------------
def conv2d_alpha_beta_params(x: Tensor, weight: Tensor, R: Tensor, shared: bool, stride, padding, dilation,
                             groups: int) -> Tensor:
    """Alpha-beta (alpha=1) for ``conv2d(x, weight)`` on its unfolded patches."""
    if groups != 1 or isinstance(padding, str):
        raise UnsupportedOperationError("conv2d alpha-beta: groups=1 and numeric padding only")
    k = weight.shape[-2:]
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    r = R.flatten(2).transpose(1, 2)
    r_cols = alpha_beta(cols, weight.flatten(1), r, shared)
    return F.fold(r_cols.transpose(1, 2), x.shape[-2:], k, dilation=dilation, padding=padding, stride=stride)


def _identity_rule(state: ScopeState, x: Tensor, y: Tensor, op: str) -> Callable:
    """TA/LRP: relevance passes unchanged.  AttnLRP/CP-LRP: the identity rule
    for element-wise non-linearities, local gradient ``y / (x + 1e-10)``."""
    if not state.gradient_rules:
        return _pass_rule(x)
    xk, yk = state.keep(x, op), state.keep(y, op)
    like = _meta(x)
    return lambda g: (sum_to(g * yk.value / (xk.value + 1e-10), like),)


def _pass_rule(x: Tensor) -> Callable:
    """Relevance (or the modified gradient) passes unchanged."""
    like = _meta(x)
    return lambda R: (sum_to(R, like),)


def _zero_rule(acts: Sequence[Tensor]) -> Callable:
    """No relevance (gradient) reaches the inputs: None, so autograd skips what lies below."""
    return lambda R: (None,) * len(acts)


def _product_rule(state: ScopeState, u: Tensor, v: Tensor, z: Tensor, kind: str) -> Callable:
    """Two activations multiplied (``matmul`` or element-wise).

    TA/LRP: section 1's matmul rule, S = safe_div(R, z), R_u = u * (S d z/d u),
    each share halved.  AttnLRP: the uniform rule (each factor half the
    gradient).  CP-LRP: the plain gradient (the attention weights are made
    constant at the softmax instead)."""
    op = "matmul" if kind == "matmul" else "mul"
    uk, vk = state.keep(u, op), state.keep(v, op)
    # the product itself only where the rule divides by it (not kept otherwise: the attention
    # scores are the largest tensor of a block)
    zk = state.keep(z, op) if not state.gradient_rules and (kind != "matmul" or u.dim() != v.dim()) else None
    if state.gradient_rules:
        half = 0.5 if RULES[state.rule_set].products == "uniform" else 1.0
        if kind == "matmul":
            return lambda g: (sum_to(half * (g @ vk.value.transpose(-2, -1)), u),
                              sum_to(half * (uk.value.transpose(-2, -1) @ g), v))
        return lambda g: (sum_to(half * g * vk.value, u), sum_to(half * g * uk.value, v))
    if kind == "matmul":
        def rule(R):
            uv, vv = uk.value, vk.value
            if uv.dim() == vv.dim():
                ru, rv = matmul_relevance(uv, vv, R)
            else:
                s = safe_div(R, zk.value)
                ru, rv = uv * sum_to(s @ vv.transpose(-2, -1), uv), vv * sum_to(uv.transpose(-2, -1) @ s, vv)
            return sum_to(ru / 2, u), sum_to(rv / 2, v)
        return rule

    def elementwise(R):
        uv, vv = uk.value, vk.value
        s = safe_div(R, zk.value)
        return sum_to(uv * s * vv / 2, u), sum_to(vv * s * uv / 2, v)
    return elementwise


def _linear_rule(state: ScopeState, x: Tensor, weight: Tensor, z: Optional[Tensor], op: str = "linear") -> Callable:
    """Alpha-beta (TA: shared denominator; LRP: separate), bias ignored;
    ``z = x W^T`` from the forward (the shared denominator reuses it; None:
    not kept).  Gradient rule sets: LRP-0 (the plain gradient)."""
    wk = state.keep(weight, op)  # a parameter, or a constant operand of a matmul
    if state.gradient_rules:
        return lambda g: (sum_to(g @ wk.value, x),)
    xk = state.keep(x, op)
    shared = state.shared
    zk = state.keep(z, op) if shared and z is not None else None
    return lambda R: (sum_to(alpha_beta(xk.value, wk.value, R, shared_denominator=shared,
                                        z=None if zk is None else zk.value), x),)


# --------------------------------------------------------------------------
# Operations by name
# --------------------------------------------------------------------------
ROUTING = frozenset("""
reshape reshape_as view view_as permute transpose t swapaxes swapdims movedim moveaxis cat concat concatenate stack
hstack vstack split split_with_sizes tensor_split unbind chunk __getitem__ __setitem__ gather index_select
take_along_dim narrow select roll expand expand_as contiguous clone to type float double half bfloat16 cpu cuda
flatten unflatten squeeze unsqueeze repeat tile flip masked_fill masked_fill_ where pad dropout dropout_ alpha_dropout
feature_alpha_dropout detach detach_ copy_ zeros_like ones_like empty_like full_like new_zeros new_ones new_empty
new_full new_tensor __get__ pin_memory requires_grad_ retain_grad diagonal tril triu index_put index_put_
masked_select broadcast_to repeat_interleave type_as fill_ zero_ view_as_real view_as_complex as_strided __deepcopy__
""".split())
"""Operations whose backward is exact relevance routing (METHODS.md section 10)."""

_ACTIVATIONS = frozenset("gelu silu tanh relu sigmoid hardtanh leaky_relu elu mish hardswish "
                         "softplus quick_gelu".split())
_NORMS = frozenset("layer_norm rms_norm".split())
_ADDS = {"add": 1, "__add__": 1, "__radd__": 1, "sub": -1, "__sub__": -1, "subtract": -1, "__rsub__": -2, "rsub": -2}
_MULS = frozenset("mul __mul__ __rmul__ multiply".split())
_DIVS = frozenset("div __truediv__ divide true_divide".split())
_MATMULS = frozenset("matmul __matmul__ bmm mm".split())
_REDUCE = {"sum": False, "mean": True}
_CONSTANT_NORMS = frozenset("norm vector_norm".split())
_CONSTANT_POWERS = frozenset("pow __pow__ sqrt rsqrt square".split())
"""Powers of an activation are constants of the relevance pass: they occur in
norms written as torch calls (CLIP's ``_get_vector_norm``); a model that uses
one as a feature gets no relevance through it (ours, README)."""
_INPLACE_DUNDERS = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__", "__itruediv__": "__truediv__",
                    "__idiv__": "__truediv__", "__ipow__": "__pow__"}
_NO_WRITE = frozenset("requires_grad_ detach_ share_memory_".split())


def _writes(name: str) -> bool:
    """Whether the operation writes its first argument in place (``x.add_(y)``,
    ``x += y``, ``t[i] = v``, ``masked_fill_``, ``copy_``, ...)."""
    return name == "__setitem__" or name in _INPLACE_DUNDERS or (
        name.endswith("_") and not name.endswith("__") and name not in _NO_WRITE)


def _base(name: str) -> str:
    """The name of an in-place operation's out-of-place form (``add_`` ->
    ``add``, ``__imul__`` -> ``__mul__``, ``relu_`` -> ``relu``)."""
    return _INPLACE_DUNDERS.get(name, name[:-1])


def _out_of_place(name: str) -> Optional[Callable]:
    """The out-of-place form of an in-place operation, None if torch has none."""
    base = _base(name)
    for owner in (Tensor, torch, F):
        f = getattr(owner, base, None)
        if callable(f):
            return f
    return None


def _name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


class _Scope(TorchFunctionMode):
    def __init__(self, state: ScopeState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.opaque or not _has_act(args, kwargs):
            if self.state.kept and args and _writes(_name(func)):  # a value a rule keeps may live there
                self.state.before_write(args[0])
            return func(*args, **kwargs)
        return self.dispatch(func, args, kwargs)

    # -- the table ----------------------------------------------------------
    def dispatch(self, func, args, kwargs, label: Optional[str] = None):
        """``func`` by its rule; ``label``: the name refusals give (an in-place form's)."""
        s = self.state
        name = _name(func)
        if isinstance(kwargs.get("out"), Tensor):
            return self.refuse(label or name, "an operation writing to out=")
        writes = _writes(name)
        if name in ROUTING or (writes and _base(name) in ROUTING) or \
                (s.gradient_rules and name in _LINEAR_IN_GRADIENT_RULES and _linear_use(name, args)):
            if writes:  # masked_fill_, t[i] = v, copy_, unsqueeze_, ...: autograd routes the write
                s.before_write(args[0])
            return func(*args, **kwargs)
        if writes:
            return self.inplace(name, args, kwargs)
        if name == "linear":
            return self.linear(*args, **kwargs)
        if name == "conv2d":
            return self.conv2d(func, args, kwargs)
        if name in _MATMULS:
            return self.matmul(args[0], args[1], func)
        if name == "addmm":
            return self.addmm(func, args, kwargs)
        if name == "einsum":
            return self.einsum(func, args, kwargs)
        if name in _ADDS:
            return self.add(func, args, kwargs, _ADDS[name])
        if name in _MULS:
            return self.mul(func, args, kwargs)
        if name in _DIVS:
            a, b = args[0], args[1]
            if not _is_act(a) or kwargs.get("rounding_mode"):
                return self.refuse(label or name, "a division of a constant by an activation")
            y = self.call(func, args, kwargs)
            if not _is_act(b):  # by a constant: identity (gradient rule sets: the plain gradient)
                return y if s.gradient_rules else _switch(s, y, [a], _pass_rule(a))
            # by an activation (a norm computed by hand, CLIP's x / ||x||): the divisor is a
            # constant (ours, as LayerNorm's std): identity; gradient rule sets: g / b
            bk = s.keep(b, name) if s.gradient_rules else None
            like = _meta(a)
            rule = (lambda g: (sum_to(g / bk.value, like), None)) if s.gradient_rules else \
                (lambda R: (sum_to(R, like), None))
            return _switch(s, y, [a, b], rule)
        if name in _CONSTANT_POWERS:  # the pieces of a norm computed by hand: constants (ours)
            x = args[0]
            y = self.call(func, args, kwargs)
            return _switch(s, y, [x], _zero_rule([x]))
        if name in ("neg", "__neg__", "negative"):  # times -1: identity (gradient rule sets: the plain gradient)
            y = self.call(func, args, kwargs)
            return y if s.gradient_rules else _switch(s, y, [args[0]], _pass_rule(args[0]))
        if name in ("softmax", "_softmax", "log_softmax"):
            x = args[0]
            y = self.call(func, args, kwargs)
            if RULES[s.rule_set].products == "constant":
                return y.detach()  # constant attention weights: nothing below the softmax is visited
            if RULES[s.rule_set].products == "uniform":
                return y  # the plain gradient
            return _switch(s, y, [x], _pass_rule(x))
        if name in _NORMS:
            return self.norm(func, name, args, kwargs)
        if name in _ACTIVATIONS:
            x = args[0]
            y = self.call(func, args, kwargs)
            return _switch(s, y, [x], _identity_rule(s, x, y, name))
        if name in _REDUCE:
            return self.reduce(func, name, args, kwargs)
        if name in _CONSTANT_NORMS:
            y = self.call(func, args, kwargs)
            return _switch(s, y, [args[0]], _zero_rule([args[0]]))
        if name == "normalize":  # x / ||x||: the norm a constant (ours)
            x = args[0]
            y = self.call(func, args, kwargs)
            return _switch(s, y, [x], _identity_rule(s, x, y, name))
        if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d"):  # a global average pool: a mean
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            n = 1 if name.endswith("1d") else 2
            if all(v == 1 for v in ((size,) * n if isinstance(size, int) else tuple(size))):
                return self.reduce(torch.mean, "mean", (args[0], tuple(range(-n, 0)), True), {})
            return self.refuse(name, "an adaptive pool to more than one cell")
        if name == "scaled_dot_product_attention":
            return self.sdpa(*args, **kwargs)
        if name == "multi_head_attention_forward":  # nn.MultiheadAttention's fused call
            return multi_head_attention(*args, **kwargs, op=self.op, refuse=self.refuse,
                                        record=lambda p: self.state.attentions.append((self.state.where(), p)))
        y = func(*args, **kwargs)
        if not isinstance(y, Tensor) or not y.is_floating_point() or not y.requires_grad:
            return y  # shapes, comparisons, indices: nothing to propagate
        return self.refuse(label or name)

    def inplace(self, name: str, args: tuple, kwargs: dict) -> Tensor:
        """``a.op_(b)``, ``a op= b``: the out-of-place operation by its rule on
        a copy of ``a`` (with ``a``'s graph), its result written into ``a``
        (autograd routes the write: ``CopyBackwards``), so the model sees what
        it sees without the scope and every rule reads the values its
        operation saw (METHODS.md section 10: the in-place form's rule is the
        out-of-place form's)."""
        a = args[0]
        out_of_place = _out_of_place(name)
        if out_of_place is None or not isinstance(a, Tensor):
            return self.refuse(name)
        before = a.clone() if a.requires_grad else a  # routing; a constant target is copied on write below
        y = self.dispatch(out_of_place, (before,) + tuple(args[1:]), kwargs, label=name)
        self.state.before_write(a)
        return a.copy_(y)

    def call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A computing operation's own value: with its autograd graph when a
        gradient pass or a gradient rule set reads it, else without (the
        switch connects the activations; nothing is saved for a backward that
        never runs)."""
        if self.state.graph_free:
            with torch.no_grad():
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def refuse(self, name: str, what: str = "an operation on an activation") -> Any:
        raise UnsupportedOperationError(
            f"LRP ({self.state.rule_set}): {what} has no rule: torch '{name}' in module '{self.state.where()}' "
            "(METHODS.md section 10 lists the rules)")

    # -- the computing operations ------------------------------------------
    def linear(self, x, weight, bias=None):
        s = self.state
        if _is_act(weight) or _is_act(bias):
            return self.refuse("linear", "a linear layer whose weight depends on the input")
        z = self.call(F.linear, (x, weight), {})
        y = z if bias is None else self.call(torch.add, (z, bias), {})
        return _switch(s, y, [x], _linear_rule(s, x, weight, z))

    def addmm(self, func, args, kwargs):
        bias, x, w = args[:3]
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3 or _is_act(bias) or _is_act(w):
            return self.refuse("addmm", "addmm other than bias + x @ W")
        z = self.call(torch.matmul, (x, w), {})
        y = self.call(torch.add, (z, bias), {})
        return _switch(self.state, y, [x], _linear_rule(self.state, x, w.t(), z, "addmm"))

    def conv2d(self, func, args, kwargs):
        s = self.state
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        p = dict(zip(names, args))
        p.update(kwargs)
        x, w = p["input"], p["weight"]
        stride, padding, dilation, groups = (p.get("stride", 1), p.get("padding", 0), p.get("dilation", 1),
                                             p.get("groups", 1))
        if _is_act(w) or _is_act(p.get("bias")):
            return self.refuse("conv2d", "a convolution whose weight depends on the input")
        if padding == "valid":
            padding = 0
        elif isinstance(padding, str):
            return self.refuse("conv2d", f"a convolution with padding={padding!r}")
        y = self.call(func, args, kwargs)
        wk, shape = s.keep(w, "conv2d"), x.shape
        shared = s.shared
        if s.gradient_rules:
            rule = lambda g: (torch.nn.grad.conv2d_input(shape, wk.value, g, stride, padding, dilation, groups),)
        else:
            xk = s.keep(x, "conv2d")
            if x.is_leaf:  # the explained pixels: z^B with per-sample bounds
                conv = lambda inp, weight: F.conv2d(inp, weight, None, stride, padding, dilation, groups)
                rule = lambda R: (z_beta(xk.value, wk.value, R, conv),)
            else:
                rule = lambda R: (conv2d_alpha_beta_params(xk.value, wk.value, R, shared, stride, padding, dilation,
                                                           groups),)
        return _switch(s, y, [x], rule)

    def matmul(self, u, v, func=torch.matmul):
        s = self.state
        z = self.call(func, (u, v), {})
        if _is_act(u) and _is_act(v):
            kind = "matmul"
            return _switch(s, z, [u, v], _product_rule(s, u, v, z, kind))
        if _is_act(u):  # x @ C: a linear map with weight C^T (C may be batched: a learned query)
            if v.dim() < 2:
                return self.refuse(_name(func), "a product of an activation with a vector")
            return _switch(s, z, [u], _linear_rule(s, u, v.transpose(-2, -1), z, _name(func)))
        if u.dim() < 2 or v.dim() < 2:
            return self.refuse(_name(func), "a product of a constant with an activation vector")
        # C @ x: transpose to x^T @ C^T
        vt = v.transpose(-2, -1)
        rule_t = _linear_rule(s, vt, u, z.transpose(-2, -1), _name(func))
        return _switch(s, z, [v], lambda R: (rule_t(R.transpose(-2, -1))[0].transpose(-2, -1),))

    def einsum(self, func, args, kwargs):
        eq = args[0]
        ops = list(args[1:]) if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else list(args[1])
        acts = [o for o in ops if _is_act(o)]
        if len(ops) != 2 or len(acts) != 2:
            return self.refuse("einsum", "an einsum other than a product of two activations")
        u, v = ops
        z = self.call(func, args, kwargs)
        s = self.state
        uk, vk = s.keep(u, "einsum"), s.keep(v, "einsum")
        zk = None if s.gradient_rules else s.keep(z, "einsum")

        def grads(S):
            """The einsum's vector-Jacobian products (it is bilinear: exact for any S)."""
            with torch.enable_grad():
                u_ = uk.value.detach().requires_grad_(True)
                v_ = vk.value.detach().requires_grad_(True)
                zz = torch.einsum(eq, u_, v_)
                return torch.autograd.grad(zz, (u_, v_), S)

        if s.gradient_rules:
            half = 0.5 if RULES[s.rule_set].products == "uniform" else 1.0
            return _switch(s, z, [u, v], lambda g: tuple(half * t for t in grads(g)))

        def rule(R):
            gu, gv = grads(safe_div(R, zk.value))
            return uk.value * gu / 2, vk.value * gv / 2
        return _switch(s, z, [u, v], rule)

    def add(self, func, args, kwargs, sign):
        """``c_a a + c_b b`` (add: 1, alpha; sub: 1, -alpha; rsub: -1, 1)."""
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        y = self.call(func, args, kwargs)
        coeffs = (-alpha, 1) if sign == -2 else (1, sign * alpha)
        return _switch(self.state, y, [t for t in (a, b) if _is_act(t)], _add_rule(self.state, a, b, coeffs, y))

    def mul(self, func, args, kwargs):
        s = self.state
        a, b = args[0], args[1]
        y = self.call(func, args, kwargs)
        if _is_act(a) and _is_act(b):
            return _switch(s, y, [a, b], _product_rule(s, a, b, y, "elementwise"))
        x = a if _is_act(a) else b
        # times a scalar, a constant or a parameter (attention scale, masks, LayerScale): identity
        if s.gradient_rules:
            c = b if x is a else a
            if isinstance(c, Tensor):
                ck = s.keep(c, "mul")
                return _switch(s, y, [x], lambda g: (sum_to(g * ck.value, x),))
            return _switch(s, y, [x], lambda g: (sum_to(g * c, x),))
        return _switch(s, y, [x], _pass_rule(x))

    def norm(self, func, name, args, kwargs):
        s = self.state
        x = args[0]
        if any(_is_act(t) for t in list(args[1:]) + list(kwargs.values())):
            return self.refuse(name, "a norm whose weight depends on the input")
        y = self.call(func, args, kwargs)
        if not s.gradient_rules:
            return _switch(s, y, [x], _pass_rule(x))
        if name == "rms_norm":  # the rms a constant: y = x * (w / rms), local gradient y / x
            return _switch(s, y, [x], _identity_rule(s, x, y, name))
        # layer_norm with the standard deviation a constant (METHODS.md section 9)
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        p = dict(zip(names, args))
        p.update(kwargs)
        shape = p["normalized_shape"]
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dims = tuple(range(-len(shape), 0))
        xv = x.detach()
        std = torch.sqrt(xv.var(dim=dims, unbiased=False, keepdim=True) + p.get("eps", 1e-5))
        w = p.get("weight")
        wk = None if w is None else s.keep(w, name)

        def rule(g):
            gw = g if wk is None else g * wk.value
            gx = gw / std
            return (gx - gx.mean(dim=dims, keepdim=True),)
        return _switch(s, y, [x], rule)

    def reduce(self, func, name, args, kwargs):
        s = self.state
        x = args[0]
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if kwargs.get("dtype") is not None or (dims is not None and not isinstance(dims, (int, tuple, list))):
            return self.refuse(name, "a reduction with these arguments")
        y = self.call(func, args, kwargs)
        nd = x.dim()
        red = tuple(range(nd)) if dims is None or (isinstance(dims, (tuple, list)) and len(dims) == 0) else \
            tuple(d % nd for d in ((dims,) if isinstance(dims, int) else dims))

        def expand(t: Tensor) -> Tensor:
            if not keepdim:
                for d in sorted(red):
                    t = t.unsqueeze(d)
            return t

        if s.gradient_rules:
            scale = 1.0 / math.prod(x.shape[d] for d in red) if _REDUCE[name] else 1.0
            shape = x.shape
            return _switch(s, y, [x], lambda g: (expand(g).expand(shape) * scale,))
        xk = s.keep(x, name)
        total = x.detach().sum(dim=red, keepdim=True)

        def rule(R):
            xv = xk.value
            return (xv * safe_div(expand(R).to(xv.dtype), total),)
        return _switch(s, y, [x], rule)

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        """``scaled_dot_product_attention`` decomposed: q k^T, scale, mask,
        softmax (recorded), A v — each step by its rule."""
        if dropout_p:
            return self.refuse("scaled_dot_product_attention", "attention dropout (run in eval mode)")
        q, k, v = query, key, value
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        d = q.shape[-1]
        scores = self.op(torch.matmul, q, k.transpose(-2, -1))
        scores = self.op(torch.mul, scores, scale if scale is not None else 1.0 / math.sqrt(d))
        Lq, Lk = q.shape[-2], k.shape[-2]
        if is_causal:
            causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = self.op(torch.add, scores, attn_mask)
        probs = self.op(torch.softmax, scores, -1)
        self.state.attentions.append((self.state.where(), probs))
        return self.op(torch.matmul, probs, v)

    def op(self, func, *args, **kwargs):
        """One operation through the table (used by decompositions)."""
        if not _has_act(args, kwargs):
            return func(*args, **kwargs)
        return self.dispatch(func, args, kwargs)


def _has_act(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor argument (or one in a list/tuple argument) is an activation."""
    for a in args:
        if isinstance(a, Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)):
            if any(isinstance(t, Tensor) and t.requires_grad for t in a):
                return True
    for a in kwargs.values():
        if isinstance(a, Tensor) and a.requires_grad:
            return True
    return False


_LINEAR_IN_GRADIENT_RULES = frozenset("linear conv2d addmm add __add__ __radd__ sub __sub__ subtract "
                                      "__rsub__ rsub sum mean adaptive_avg_pool1d adaptive_avg_pool2d matmul "
                                      "__matmul__ bmm mm mul __mul__ __rmul__ multiply".split())
"""Operations that are linear in their one activation: under the gradient rule
sets (LRP-0) their plain gradient is the rule, so they run unintercepted."""


def _linear_use(name: str, args: tuple) -> bool:
    """A product is linear only with one activation factor (two: the product rule)."""
    if name in ("matmul", "__matmul__", "bmm", "mm", "mul", "__mul__", "__rmul__", "multiply"):
        return sum(isinstance(a, Tensor) and a.requires_grad for a in args[:2]) == 1
    if name in ("linear", "conv2d", "addmm"):
        return not any(isinstance(a, Tensor) and a.requires_grad for a in args[1:])
    return True


def _add_rule(state: ScopeState, a: Any, b: Any, coeffs: Tuple[float, float], y: Tensor) -> Callable:
    """Residual add ``y = c_a a + c_b b``: section 1's rule (TA: rescaled)
    over the two terms for two activations; an activation plus a constant:
    the same rule, the constant's share dropped.  AttnLRP/CP-LRP: the plain
    gradient (LRP-0: the split by value is input x gradient)."""
    keep = [(t, c) for t, c in zip((a, b), coeffs) if _is_act(t)]
    if state.gradient_rules:
        return lambda g: tuple(sum_to(g * c, t) for t, c in keep)
    # the terms as the add read them (kept, not copied: a later write copies them first);
    # scaled by their coefficient only in the relevance pass (no copies kept by the forward)
    values = [state.keep(t, "add") if isinstance(t, Tensor) else torch.as_tensor(t, dtype=y.dtype, device=y.device)
              for t in (a, b)]
    likes = [_meta(t) if _is_act(t) else None for t in (a, b)]  # the parameters' flags are restored by backward time
    shared = state.shared

    def rule(R):
        terms = [v.value if isinstance(v, _Kept) else v for v in values]
        ta, tb = ((v if c == 1 else v * c).to(R.dtype).expand(R.shape) for v, c in zip(terms, coeffs))
        ra, rb = add_relevance(ta, tb, R, rescale=shared)
        return tuple(sum_to(r, like) for r, like in zip((ra, rb), likes) if like is not None)
    return rule


# --------------------------------------------------------------------------
# Module-level rules: activations and RMS norms written as several torch calls
# --------------------------------------------------------------------------
_ACTIVATION_MODULES = ("transformers.activations", "timm.layers.activations", "torch.nn.modules.activation")


def module_rule(module: nn.Module) -> Optional[str]:
    """``"elementwise"`` for activation modules and RMS norms (treated as
    one operation: identity / the identity rule), else None."""
    cls = type(module)
    name = cls.__name__
    if cls.__module__.startswith(_ACTIVATION_MODULES) and not isinstance(module, (nn.Softmax, nn.MultiheadAttention,
                                                                                   nn.Softmax2d, nn.LogSoftmax)):
        return "elementwise"
    if name.endswith("RMSNorm") or name in ("T5LayerNorm", "QuickGELU"):  # QuickGELU: open_clip's
        return "elementwise"
    return None


@contextlib.contextmanager
def relevance_scope(model: nn.Module, rule_set: str, state: Optional[ScopeState] = None) -> Iterator[ScopeState]:
    """Run ``model``'s forward inside this context to attach the rules.

    Inside: no parameter of ``model`` requires grad (restored on exit), each
    module call is named for messages, activation modules and RMS norms are
    one operation, and every torch call is routed through the rules.  The
    backward passes run after the context has closed; set
    ``state.relevance`` to choose between the gradient and the relevance pass.
    """
    if rule_set not in RULE_SETS:
        raise ValueError(f"unknown rule set {rule_set!r}; valid: {', '.join(RULE_SETS)}")
    state = state or ScopeState(rule_set)
    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}
    params = [p for p in model.parameters() if p.requires_grad]
    mode = _Scope(state)
    # (module, one operation, grad mode before, the input of a module that writes its input)
    opened: List[Tuple[nn.Module, bool, bool, Optional[Tensor]]] = []

    def pre(module, args):
        state.module_stack.append(names.get(id(module), type(module).__name__))
        opaque = bool(args) and _is_act(args[0]) and module_rule(module) is not None and not state.opaque
        # nn.ReLU(inplace=True) writes its input: it writes a copy (routing), the rule reads the input,
        # and the result is written into the input after it (as the in-place forms)
        written = args[0] if opaque and getattr(module, "inplace", False) is True else None
        opened.append((module, opaque, torch.is_grad_enabled(), written))
        if opaque:
            state.opaque += 1
            if state.graph_free:  # its inner calls' graph would never be read
                torch._C._set_grad_enabled(False)
        return None if written is None else (written.clone(),) + tuple(args[1:])

    def post(module, args, output):
        state.module_stack.pop()
        _, opaque, grad_mode, written = opened.pop()
        if not opaque:
            return None
        state.opaque -= 1
        torch._C._set_grad_enabled(grad_mode)
        x = args[0] if written is None else written
        if not isinstance(output, Tensor):
            raise UnsupportedOperationError(f"LRP: module '{names.get(id(module))}' ({type(module).__name__}) "
                                            "returned no tensor")
        with torch.overrides._pop_mode_temporarily() if _mode_active(mode) else contextlib.nullcontext():
            y = _switch(state, output, [x], _identity_rule(state, x, output, type(module).__name__))
            if written is None:
                return y
            state.before_write(written)
            return written.copy_(y)

    for p in params:
        p.requires_grad_(False)
    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        with mode:
            yield state
    finally:
        for _, opaque, grad_mode, _ in opened:  # a module that raised: its grad mode as it found it
            if opaque:
                torch._C._set_grad_enabled(grad_mode)
                break
        opened.clear()
        h1.remove()
        h2.remove()
        for p in params:
            p.requires_grad_(True)
        state.module_stack.clear()
        state.opaque = 0
        state.kept.clear()  # no write of the forward left to see


def _mode_active(mode: TorchFunctionMode) -> bool:
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    return bool(stack) and stack[-1] is mode
