"""The LRP layer library: every relevance rule of the project, written once.

Each module here is a drop-in subclass of its ``torch.nn`` counterpart (same
constructor, same parameter names, same forward result) with one extra
method, ``relprop(R)``, that maps the relevance of the module's output to the
relevance of its input(s) following ../shared/METHODS.md section 1.

State is scoped to one explanation.  A module only remembers its input while
an :func:`explanation_state` context is active; plain inference
(``model(x)`` outside the context) stores nothing, and everything a forward
pass recorded is dropped when the context exits.  The rule set (``"TA"`` for
transformer attribution, ``"LRP"`` for the LRP baselines) is a property of the
context, so one model serves both.

Every rule is per sample: every reduction keeps dimension 0 (the batch).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RULE_SETS",
    "RULES",
    "RuleSet",
    "GRADIENT_RULE_SETS",
    "IdentityRule",
    "UniformProduct",
    "ExplanationState",
    "explanation_state",
    "current_state",
    "safe_div",
    "alpha_beta",
    "conv2d_alpha_beta",
    "z_beta",
    "matmul_relevance",
    "add_relevance",
    "RelProp",
    "Identity",
    "LayerNorm",
    "GELU",
    "Tanh",
    "Softmax",
    "Dropout",
    "Linear",
    "Conv2d",
    "Add",
    "Clone",
    "MatMul",
    "TokenSelect",
]

@dataclass(frozen=True)
class RuleSet:
    """What a rule set does, for the rules to read (no rule tests a rule set's name).

    ``shared``: alpha-beta with one shared denominator and rescaled residual
    adds (TA), else separate denominators and plain adds.  ``gradient``: one
    modified backward pass whose gradient times the input is the relevance,
    instead of ``relprop``.  ``products``: the products of two activations and
    the softmax - ``"relevance"`` (the LRP rules), ``"uniform"`` (AttnLRP: each
    factor half the gradient, the softmax its plain gradient) or
    ``"constant"`` (CP-LRP: the attention weights constants)."""

    name: str
    shared: bool = False
    gradient: bool = False
    products: str = "relevance"


RULES: Dict[str, RuleSet] = {r.name: r for r in (
    RuleSet("TA", shared=True),
    RuleSet("LRP"),
    RuleSet("AttnLRP", gradient=True, products="uniform"),
    RuleSet("CPLRP", gradient=True, products="constant"),
)}
"""The rule sets by name: the one place their differences are written."""

RULE_SETS = tuple(RULES)
"""``TA``: the rules of transformer attribution (alpha-beta with a shared
denominator, rescaled residual adds).  ``LRP``: the LRP baselines (separate
denominators, plain adds).  ``AttnLRP`` and ``CPLRP``: the gradient rule sets
(:data:`GRADIENT_RULE_SETS`): one modified backward pass whose gradient
times the input is the relevance (AttnLRP, Achtibat et al. 2024; CP-LRP, Ali
et al. 2022; ../shared/METHODS.md section 9)."""

GRADIENT_RULE_SETS = tuple(name for name, r in RULES.items() if r.gradient)
"""Rule sets that change the forward's autograd graph instead of running ``relprop``:
LayerNorm with a constant standard deviation, the identity rule for GELU and
tanh, linear layers and convolutions as they are (LRP-0), and in attention
either the uniform rule for the two bilinear products (AttnLRP: the gradient
to each factor halved) or constant attention weights (CP-LRP: q and k
detached)."""

EPS = 1e-9


# --------------------------------------------------------------------------
# Explanation-scoped state
# --------------------------------------------------------------------------
@dataclass
class ExplanationState:
    """What one explanation records; lives exactly as long as its context.

    Attributes
    ----------
    rule_set:
        ``"TA"`` or ``"LRP"``: which rules ``relprop`` applies.
    save_inputs:
        Whether LRP modules keep their forward inputs (needed only when a
        relevance pass follows).  Attention maps are recorded regardless.
    inputs:
        Module -> the tensors its forward saw.
    attentions:
        Attention probabilities (B, H, N, N) in forward order, one per
        attention module call.
    attention_relevance:
        Attention module -> relevance of its probabilities, filled by
        ``relprop``.
    """

    rule_set: str = "TA"
    save_inputs: bool = True
    inputs: Dict[nn.Module, Tuple[Tensor, ...]] = field(default_factory=dict)
    attentions: List[Tensor] = field(default_factory=list)
    attention_modules: List[nn.Module] = field(default_factory=list)
    attention_relevance: Dict[nn.Module, Tensor] = field(default_factory=dict)

    def saved(self, module: nn.Module) -> Tuple[Tensor, ...]:
        try:
            return self.inputs[module]
        except KeyError:
            raise RuntimeError(
                f"{type(module).__name__}.relprop called without a recorded forward pass: "
                "run the forward inside explanation_state(save_inputs=True) first"
            ) from None


_STATE: contextvars.ContextVar[Optional[ExplanationState]] = contextvars.ContextVar(
    "lrp_explanation_state", default=None
)


def current_state() -> Optional[ExplanationState]:
    """The active explanation's state, or None during plain inference."""
    return _STATE.get()


@contextlib.contextmanager
def explanation_state(rule_set: str = "TA", save_inputs: bool = True) -> Iterator[ExplanationState]:
    """Scope for one explanation: forwards inside it record, ``relprop`` reads.

    >>> with explanation_state("TA") as state:
    ...     logits = model(x)
    ...     model.relprop(one_hot)
    ...     rel = [state.attention_relevance[m] for m in state.attention_modules]
    """
    if rule_set not in RULE_SETS:
        raise ValueError(f"unknown rule set {rule_set!r}; valid: {', '.join(RULE_SETS)}")
    state = ExplanationState(rule_set=rule_set, save_inputs=save_inputs)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)
        # Drop every reference now rather than when the caller lets go.
        state.inputs.clear()
        state.attentions.clear()
        state.attention_modules.clear()
        state.attention_relevance.clear()


def _require_state() -> ExplanationState:
    state = _STATE.get()
    if state is None:
        raise RuntimeError("relprop needs an active explanation_state() context")
    return state


# --------------------------------------------------------------------------
# The rules as plain functions (METHODS.md section 1)
# --------------------------------------------------------------------------
def safe_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / (b + 1e-9)`` where ``b != 0`` (a denominator that is then exactly
    zero becomes 1e-9), and 0 where ``b == 0``."""
    den = b + EPS
    den = den.masked_fill(den == 0, EPS)
    return (a / den).masked_fill(b == 0, 0.0)


def _sample_sum(t: Tensor) -> Tensor:
    """Sum over every dimension but the batch, kept broadcastable."""
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True) if t.dim() > 1 else t


def alpha_beta(x: Tensor, weight: Tensor, R: Tensor, shared_denominator: bool,
               z: Optional[Tensor] = None) -> Tensor:
    """Alpha-beta rule with alpha = 1, beta = 0 for ``z = x W^T`` (bias ignored).

    With x+ = max(x, 0), x- = min(x, 0), W+ = max(W, 0), W- = min(W, 0),
    Z1 = x+ W+^T, Z2 = x- W-^T:

    - shared denominator (rule set TA): S = safe_div(R, Z1 + Z2),
      R_in = x+ * (S W+) + x- * (S W-);
    - separate denominators (rule set LRP):
      R_in = x+ * (safe_div(R, Z1) W+) + x- * (safe_div(R, Z2) W-).

    ``x`` is (..., in), ``weight`` (out, in) or batched (..., out, in) (a
    constant operand of a matmul), ``R`` (..., out).

    The shared-denominator case is evaluated with three products instead of
    four, through the identities x+ W+^T + x- W-^T = (x W^T + |x| |W|^T) / 2
    and x+ * (S W+) + x- * (S W-) = (x * (S W) + |x| * (S |W|)) / 2; ``z``,
    the forward's x W^T when the caller kept it, saves a fourth.  This is the
    transformer-attribution hot path (every Linear of every block).
    """
    if shared_denominator:
        w_abs = weight.abs()
        x_abs = x.abs()
        if z is None:
            z = x @ weight.transpose(-2, -1)
        s = safe_div(R, (z + x_abs @ w_abs.transpose(-2, -1)) / 2)
        return (x * (s @ weight) + x_abs * (s @ w_abs)) / 2
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    s1 = safe_div(R, xp @ wp.transpose(-2, -1))
    s2 = safe_div(R, xn @ wn.transpose(-2, -1))
    return xp * (s1 @ wp) + xn * (s2 @ wn)


def conv2d_alpha_beta(conv: nn.Conv2d, x: Tensor, R: Tensor, shared_denominator: bool) -> Tensor:
    """:func:`alpha_beta` for a convolution, applied to its unfolded patches.

    A convolution is a Linear map on each receptive field; the relevance of an
    input pixel is the sum over the fields it belongs to (``fold``).
    """
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotImplementedError("alpha-beta relprop supports groups=1, numeric zero padding only")
    k, d, p, st = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    cols = F.unfold(x, k, dilation=d, padding=p, stride=st).transpose(1, 2)  # (B, L, C k k)
    r = R.flatten(2).transpose(1, 2)  # (B, L, out)
    r_cols = alpha_beta(cols, conv.weight.flatten(1), r, shared_denominator)
    return F.fold(r_cols.transpose(1, 2), x.shape[-2:], k, dilation=d, padding=p, stride=st)


def z_beta(x: Tensor, weight: Tensor, R: Tensor, forward: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """z^B rule for the first (pixel) layer, with per-sample bounds.

    L = min(x), H = max(x) over each sample;
    Z = f(x, W) - f(L, W+) - f(H, W-); S = R / (Z + 1e-9);
    R_in = x * f^T(S, W) - L * f^T(S, W+) - H * f^T(S, W-).
    """
    dims = tuple(range(1, x.dim()))
    low = x.amin(dim=dims, keepdim=True).expand_as(x)
    high = x.amax(dim=dims, keepdim=True).expand_as(x)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        l_ = low.detach().clone().requires_grad_(True)
        h_ = high.detach().clone().requires_grad_(True)
        z = forward(x_, weight) - forward(l_, wp) - forward(h_, wn)
        s = R / (z.detach() + EPS)
        gx, gl, gh = torch.autograd.grad(z, (x_, l_, h_), s)
    # gl = -f^T(S, W+) and gh = -f^T(S, W-): the signs of the rule are in z.
    return x * gx + low * gl + high * gh


def matmul_relevance(u: Tensor, v: Tensor, R: Tensor, transpose_v: bool = False) -> Tuple[Tensor, Tensor]:
    """Gradient x input of the normalised relevance for z = u @ v (or u @ v^T).

    S = safe_div(R, z); R_u = u * dz/du^T S; R_v = v * dz/dv^T S.
    """
    if transpose_v:
        z = u @ v.transpose(-2, -1)
        s = safe_div(R, z)
        return u * (s @ v), v * (s.transpose(-2, -1) @ u)
    z = u @ v
    s = safe_div(R, z)
    return u * (s @ v.transpose(-2, -1)), v * (u.transpose(-2, -1) @ s)


def add_relevance(a: Tensor, b: Tensor, R: Tensor, rescale: bool) -> Tuple[Tensor, Tensor]:
    """Residual add z = a + b.

    R_a = a * safe_div(R, z), R_b = b * safe_div(R, z).  With ``rescale``
    (rule set TA) each share is then scaled so that, per sample, the totals
    split in proportion |sum R_a| : |sum R_b| and add up to sum R.
    """
    s = safe_div(R, a + b)
    ra, rb = a * s, b * s
    if not rescale:
        return ra, rb
    a_sum, b_sum, r_sum = _sample_sum(ra), _sample_sum(rb), _sample_sum(R)
    total = a_sum.abs() + b_sum.abs()
    a_fact = safe_div(a_sum.abs(), total) * r_sum
    b_fact = safe_div(b_sum.abs(), total) * r_sum
    return ra * safe_div(a_fact, a_sum), rb * safe_div(b_fact, b_sum)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------
class RelProp(nn.Module):
    """Mixin: a module whose relevance passes unchanged unless overridden."""

    def _record(self, *tensors: Tensor) -> None:
        state = _STATE.get()
        if state is not None and state.save_inputs:
            state.inputs[self] = tensors

    def relprop(self, R):  # noqa: D401 - identity by default
        """Relevance of the input given relevance ``R`` of the output."""
        return R


class Identity(nn.Identity, RelProp):
    pass


def _gradient_rules() -> Optional[RuleSet]:
    """The active gradient rule set (AttnLRP / CP-LRP), else None."""
    state = _STATE.get()
    rules = RULES[state.rule_set] if state is not None else None
    return rules if rules is not None and rules.gradient else None


class IdentityRule(torch.autograd.Function):
    """``y = f(x)`` whose backward passes relevance unchanged: the local
    gradient is ``f(x) / (x + 1e-10)``, so ``x * grad_in = f(x) * grad_out``
    (AttnLRP's identity rule for element-wise non-linearities, METHODS.md section 9)."""

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        y = fn(x)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y = ctx.saved_tensors
        return grad * y / (x + 1e-10), None


class UniformProduct(torch.autograd.Function):
    """``u @ v`` whose backward halves the gradient to each factor: the
    uniform rule for a bilinear product (AttnLRP), each factor receiving half
    of the product's relevance."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(u, v)
        return u @ v

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, v = ctx.saved_tensors
        gu = 0.5 * (grad @ v.transpose(-2, -1))
        gv = 0.5 * (u.transpose(-2, -1) @ grad)
        return _sum_to(gu, u.shape), _sum_to(gv, v.shape)


def _sum_to(g: Tensor, shape) -> Tensor:
    """Reduce a broadcast gradient back to ``shape``."""
    while g.dim() > len(shape):
        g = g.sum(dim=0)
    for i, n in enumerate(shape):
        if n == 1 and g.shape[i] != 1:
            g = g.sum(dim=i, keepdim=True)
    return g


class LayerNorm(nn.LayerNorm, RelProp):
    """Relevance passes LayerNorm unchanged (METHODS.md section 1); under the
    gradient rule sets the standard deviation is a constant:
    ``(x - mean) / detach(std) * w + b`` (METHODS.md section 9)."""

    def forward(self, x: Tensor) -> Tensor:
        if _gradient_rules() is None:
            return super().forward(x)
        mean = x.mean(dim=-1, keepdim=True)
        std = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + self.eps).detach()
        y = (x - mean) / std
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class GELU(nn.GELU, RelProp):
    def forward(self, x: Tensor) -> Tensor:
        if _gradient_rules() is None:
            return super().forward(x)
        return IdentityRule.apply(x, super().forward)


class Tanh(nn.Tanh, RelProp):
    def forward(self, x: Tensor) -> Tensor:
        if _gradient_rules() is None:
            return super().forward(x)
        return IdentityRule.apply(x, torch.tanh)


class Softmax(nn.Softmax, RelProp):
    pass


class Dropout(nn.Dropout, RelProp):
    pass


class Linear(nn.Linear, RelProp):
    """``nn.Linear`` with the alpha-beta rule (alpha = 1, beta = 0)."""

    def forward(self, x: Tensor) -> Tensor:
        state = _STATE.get()
        if state is None or not state.save_inputs:
            return F.linear(x, self.weight, self.bias)
        if not RULES[state.rule_set].shared:
            state.inputs[self] = (x,)
            return F.linear(x, self.weight, self.bias)
        # rule set TA: keep x W^T as well, which alpha_beta reuses
        z = F.linear(x, self.weight)
        state.inputs[self] = (x, z)
        return z if self.bias is None else z + self.bias

    def relprop(self, R: Tensor) -> Tensor:
        state = _require_state()
        saved = state.saved(self)
        return alpha_beta(saved[0], self.weight, R, shared_denominator=RULES[state.rule_set].shared,
                          z=saved[1] if len(saved) > 1 else None)


class Conv2d(nn.Conv2d, RelProp):
    """``nn.Conv2d``: z^B rule when it reads 3-channel pixels, alpha-beta otherwise."""

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        self._record(x)
        return super().forward(x)

    def relprop(self, R: Tensor) -> Tensor:
        state = _require_state()
        (x,) = state.saved(self)
        if x.shape[1] == 3:
            return z_beta(x, self.weight, R, self._conv)
        return conv2d_alpha_beta(self, x, R, shared_denominator=RULES[state.rule_set].shared)


class Add(RelProp):
    """``a + b`` for residual connections (and embedding sums)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        self._record(a, b)
        return a + b

    def relprop(self, R: Tensor) -> Tuple[Tensor, Tensor]:
        state = _require_state()
        a, b = state.saved(self)
        return add_relevance(a.expand_as(R), b.expand_as(R), R, rescale=RULES[state.rule_set].shared)


class Clone(RelProp):
    """One tensor read by several branches; relevance of the branches adds up."""

    def forward(self, x: Tensor, num: int = 2) -> Tuple[Tensor, ...]:
        self._record(x)
        return (x,) * num

    def relprop(self, Rs: Sequence[Tensor]) -> Tensor:
        (x,) = _require_state().saved(self)
        total = torch.stack(list(Rs)).sum(dim=0)
        return torch.where(x == 0, torch.zeros_like(total), total)


class MatMul(RelProp):
    """Product of two activations, ``u @ v`` or ``u @ v^T`` (attention)."""

    def __init__(self, transpose_v: bool = False):
        super().__init__()
        self.transpose_v = transpose_v

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        rules = _gradient_rules()
        if rules is None:
            self._record(u, v)
            return u @ (v.transpose(-2, -1) if self.transpose_v else v)
        v = v.transpose(-2, -1) if self.transpose_v else v
        if rules.products == "uniform":
            return UniformProduct.apply(u, v)
        # CP-LRP: the attention weights are constants (the scores' factors q, k detached)
        return u.detach() @ v.detach() if self.transpose_v else u @ v

    def relprop(self, R: Tensor) -> Tuple[Tensor, Tensor]:
        u, v = _require_state().saved(self)
        return matmul_relevance(u, v, R, transpose_v=self.transpose_v)

    def extra_repr(self) -> str:
        return f"transpose_v={self.transpose_v}"


class TokenSelect(RelProp):
    """``x[:, index]`` (token pooling); relevance goes back to that token only."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        self._record(x)
        return x[:, self.index]

    def relprop(self, R: Tensor) -> Tensor:
        (x,) = _require_state().saved(self)
        out = R.new_zeros(x.shape)
        out[:, self.index] = R
        return out

    def extra_repr(self) -> str:
        return f"index={self.index}"
