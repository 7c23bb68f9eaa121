"""In-place operations and ``reshape_as`` inside the LRP scope (issues 21 item 2 and 26).

An in-place form (``x.add_(y)``, ``x += y``, ``x.mul_(c)``, ``x.div_(c)``,
``torch.relu_(x)``, an ``nn.LeakyReLU(inplace=True)`` module, ...) is its
out-of-place operation by the same rule, on the value before the write, and
the result is written into ``x``: checked against the same function written
out of place, exactly (float64, 1e-12), under every rule set, including
writes into a value an earlier rule keeps (copy on write: the earlier rule
still reads what its operation saw).  A write the scope cannot see (after it
closed) is refused when the rule reads the value; an in-place operation
without a rule is refused in one line naming it.

The Hugging Face families of the generic path whose forwards write in place
or use ``reshape_as`` (MPNet and its token head, BigBird in full attention,
Megatron-BERT, RoFormer, XLM), and MobileBERT and MarkupLM, which no test
covered: every LRP method, finite maps of the documented shape, a padded
batch of 3 equal to each sample alone (float64), the model exactly as found,
through ``tests/test_lrp_scope.py``'s own check.
"""
import pytest
import torch
import transformers as tf
from torch import nn

from modules.adapters import adapter_for
from modules.lrp_scope import UnsupportedOperationError, relevance_scope
from tests.test_engine_coverage import VOCAB, _hf, _text
from tests.test_generic_path import FAMILIES as GENERIC, POSITIONS
from tests.test_lrp_scope import _alpha_beta_restated, _Net, check_text_family
from tests.test_lrp_scope import no_stabiliser  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

RULE_SETS = ("TA", "LRP", "AttnLRP", "CPLRP")
EXACT = dict(atol=1e-12, rtol=0)


def _relevance(fn, x, rule_set, seed):
    """(output, relevance of x) of ``fn`` through the scope (relevance pass seeded with ``seed``)."""
    net = _Net(fn)
    leaf = x.detach().clone().requires_grad_(True)
    with relevance_scope(net, rule_set) as state:
        out = net(leaf)
    state.relevance = True
    (r,) = torch.autograd.grad(out, leaf, seed, allow_unused=True)
    return out.detach(), torch.zeros_like(x) if r is None else r


_G = torch.Generator().manual_seed(11)
X = torch.randn(3, 6, generator=_G, dtype=torch.float64)
W1 = torch.randn(6, 6, generator=_G, dtype=torch.float64)
W2 = torch.randn(6, 6, generator=_G, dtype=torch.float64)
C = torch.rand(1, 6, generator=_G, dtype=torch.float64) + 0.5
SEED = torch.randn(3, 6, generator=_G, dtype=torch.float64)


def _gated_inplace(t):
    # the identity rule (AttnLRP) keeps h: the write below copies it first (gelu, whose own backward reads
    # its input: writing into the output of tanh, which saves its output, fails in plain autograd as well)
    h = torch.nn.functional.gelu(t @ W1)
    h.mul_(t @ W2)  # a product of two activations, in place
    h += t @ W1  # a residual, in place
    h.div_(2.0)
    h.sub_(C, alpha=0.5)
    return torch.relu_(h)


def _gated(t):
    h = torch.nn.functional.gelu(t @ W1)
    h = h * (t @ W2)
    h = h + t @ W1
    h = h / 2.0
    h = torch.sub(h, C, alpha=0.5)
    return torch.relu(h)


def _kept_then_written_inplace(t):
    z = (t @ W1) * (t @ W2)  # the product rule keeps z (its denominator)
    y = z + t  # the add rule keeps z
    z[:, 0] = 0.0  # a routing write into both kept values
    z *= C
    return y + z


def _kept_then_written(t):
    z = (t @ W1) * (t @ W2)
    y = z + t
    z2 = z.clone()
    z2[:, 0] = 0.0
    return y + z2 * C


def _scaled_scores_inplace(t):
    s = t @ t.transpose(0, 1)  # q k^T of two activations (MPNet's scores, here on one 2-d tensor)
    s /= 3.0 ** 0.5
    s += C[:, :3]  # a constant bias (MPNet's position bias)
    s.masked_fill_(torch.eye(3, dtype=torch.bool), float("-inf"))
    return torch.softmax(s, -1) @ t


def _scaled_scores(t):
    s = t @ t.transpose(0, 1)
    s = s / 3.0 ** 0.5
    s = s + C[:, :3]
    s = s.masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))
    return torch.softmax(s, -1) @ t


def _constant_target(t):
    buf = torch.zeros(3, 6, dtype=torch.float64)
    buf.add_(t @ W1)  # a constant written with an activation: the write makes it one
    return buf * t


def _constant_target_out_of_place(t):
    return (torch.zeros(3, 6, dtype=torch.float64) + t @ W1) * t


_LEAKY = nn.LeakyReLU(0.1)
_LEAKY_INPLACE = nn.LeakyReLU(0.1, inplace=True)  # an activation module, one operation, that writes its input


def _module_inplace(t):
    h = (t @ W1) * (t @ W2)  # the product rule keeps h
    _LEAKY_INPLACE(h)
    return h @ W2 + h


def _module(t):
    g = _LEAKY((t @ W1) * (t @ W2))
    return g @ W2 + g


@pytest.mark.parametrize("rule_set", RULE_SETS)
@pytest.mark.parametrize("pair", [(_gated_inplace, _gated), (_kept_then_written_inplace, _kept_then_written),
                                  (_scaled_scores_inplace, _scaled_scores),
                                  (_constant_target, _constant_target_out_of_place), (_module_inplace, _module)],
                         ids=["gated", "kept_then_written", "scaled_scores", "constant_target", "module"])
def test_inplace_equals_out_of_place(pair, rule_set, no_stabiliser):  # noqa: F811
    inplace, out_of_place = pair
    y1, r1 = _relevance(inplace, X, rule_set, SEED)
    y2, r2 = _relevance(out_of_place, X, rule_set, SEED)
    torch.testing.assert_close(y1, y2, **EXACT)  # the model sees its own values
    torch.testing.assert_close(r1, r2, **EXACT, msg=rule_set)
    assert r1.abs().sum() > 0


def test_inplace_add_reads_its_terms_before_the_write(no_stabiliser):  # noqa: F811
    """``a += b``: the add rule's terms are a before the write and b (the
    scope once read a after it, a + b, splitting by the wrong values)."""
    b = torch.rand(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 1.0

    def fn(t):
        a = t @ W1
        a += b
        return a

    _, got = _relevance(fn, X, "LRP", SEED)
    a = X @ W1
    r_a = a * SEED / (a + b)  # section 1's add: a's share, the constant's dropped
    want = _alpha_beta_restated(X, W1.T, r_a, shared=False)  # a = X W1, a product with a constant: alpha-beta
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


class _WritesAfterTheScope(nn.Module):
    def forward(self, x):
        self.kept = torch.tanh(x)
        return self.kept + x


def test_a_write_the_scope_cannot_see_is_refused_in_one_line():
    """A value a rule keeps, written in place after the scope closed (nothing
    saw the write): refused when the relevance pass reads it, never misread."""
    net = _WritesAfterTheScope()
    leaf = X.clone().requires_grad_(True)
    with relevance_scope(net, "TA") as state:
        out = net(leaf)
    with torch.no_grad():
        net.kept[:, 0] = 0.0
    state.relevance = True
    with pytest.raises(UnsupportedOperationError, match="modified in place after the operation") as err:
        torch.autograd.grad(out, leaf, torch.ones_like(out))
    assert "\n" not in str(err.value) and "'add'" in str(err.value)


def test_an_inplace_operation_without_a_rule_is_refused_in_one_line():
    for fn, op in ((lambda t: (t @ W1).exp_(), "exp_"), (lambda t: torch.add(t, t, out=torch.empty_like(t)), "add"),
                   (lambda t: (t @ W1).cos_(), "cos_")):
        with pytest.raises(UnsupportedOperationError) as err:
            _relevance(fn, X, "TA", SEED)
        msg = str(err.value)
        assert f"torch '{op}'" in msg and "\n" not in msg, msg


# --------------------------------------------------------------------------
# The Hugging Face families of the generic path these operations unblock
# --------------------------------------------------------------------------
# the generic path's tests run the attention methods on these, the LRP ones here
NEWLY_COVERED = sorted(name for name, (_, every) in GENERIC.items() if not every)


@pytest.mark.parametrize("name", NEWLY_COVERED)
def test_every_lrp_method_on_generic_path_families(name):
    model = GENERIC[name][0]().double()
    assert "generic path" in adapter_for(model).family
    check_text_family(model, pad=getattr(model.config, "pad_token_id", 0) or 0,
                      positions=POSITIONS if name.endswith("token") else None)


def _zero_pad_row(model):
    """MobileBERT's trigram embedding reads each token's neighbours: the last
    real token of a padded sample sees the pad token's embedding in a batch
    and zeros alone, so the model's own outputs differ (measured: the
    attention maps by up to 0.6 of their largest value) unless that row is
    zero, as ``padding_idx`` initialises it; zeroed here."""
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.pad_token_id] = 0.0
    return model


# generic-path families no test covered: XLM (its `tensor *= mask` was refused), MobileBERT and MarkupLM
# (their LRP methods ran, untested); name -> builder
UNTESTED = {
    "xlm": lambda: _hf(tf.XLMForSequenceClassification, tf.XLMConfig, vocab_size=VOCAB, emb_dim=32, n_layers=2,
                       n_heads=4, max_position_embeddings=32, num_labels=3, pad_index=0),
    "mobilebert": lambda: _zero_pad_row(_hf(tf.MobileBertForSequenceClassification, tf.MobileBertConfig,
                                            **_text(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                                    num_feedforward_networks=1))),
    "markuplm": lambda: _hf(tf.MarkupLMForSequenceClassification, tf.MarkupLMConfig, **_text(pad_token_id=1)),
}


@pytest.fixture
def xlm_float64_softmax(monkeypatch):
    """XLM computes its softmax on ``scores.float()`` whatever the model's
    dtype; in a float64 model that float32 rounding alone puts a padded
    batch 1.6e-6 (full LRP) / 1.1e-7 (the others) of the map's largest
    value away from its samples alone, 2.3e-14 without it (measured).  As
    conftest's float64_softmax does for ``F.softmax(dtype=float32)``: a
    float64 tensor stays float64."""
    real = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: self if self.dtype == torch.float64
                        else real(self, *a, **k))


@pytest.mark.parametrize("name", sorted(UNTESTED))
def test_every_lrp_method_on_untested_generic_path_families(name, request):
    if name == "xlm":
        request.getfixturevalue("xlm_float64_softmax")
    model = UNTESTED[name]().double()
    assert "generic path" in adapter_for(model).family
    pad = model.config.pad_index if name == "xlm" else model.config.pad_token_id
    check_text_family(model, pad=pad)
