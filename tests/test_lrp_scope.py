"""Every LRP method on unmodified models: rules attached to tensor operations (issue 21).

The copies are the oracle: on a timm ``VisionTransformer`` (and a distilled
DeiT) or a Hugging Face ``BertForSequenceClassification`` holding the copy's
weights, every LRP method gives the copy's map in float64.  Where the
upstream forward groups an operation differently from the copy the maps
differ only through ``safe_div``'s 1e-9 stabiliser (timm scales q before
``q k^T``, the copy after the product): with the stabiliser set to 0 the two
agree to 1e-9 after min-max (measured: 0 to 3e-12), at the default they
agree to 1e-4 (measured: 2.4e-5, full LRP on the ViT).

Every family the scope covers: finite maps of the documented shape, a batch
of 3 equal to 3 singles (padding included), the model exactly as found.
Each rule against its equation on small tensors; the linear rules against
zennit's (``ZPlus`` = the shared-denominator alpha=1 rule; ``Epsilon`` at 0 =
LRP-0); an operation without a rule refused in one line.
"""
import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import modules.layers as layers
from baselines.ViT.ViT_LRP import from_timm
from BERT_explainability.modules.BERT import BertForSequenceClassification as bert_copy
from modules.aggregation import minmax_normalize
from modules.explain import explain, explain_trace
from modules.lrp_scope import ScopeState, UnsupportedOperationError, relevance_scope
from tests.test_engine_coverage import B, IMAGE_FAMILIES, TEXT_FAMILIES, _timm, images, text_batch
from tests.test_generic import _assert_unchanged, _snapshot

LRP_METHODS = ("transformer_attribution", "lrp", "lrp_last_layer", "attnlrp", "cplrp")


@pytest.fixture
def no_stabiliser(monkeypatch):
    """safe_div without its 1e-9: isolates the rules from where the stabiliser sits."""
    monkeypatch.setattr(layers, "EPS", 0.0)


def _close_after_minmax(got, want, atol=1e-9):
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(minmax_normalize(got.flatten(1)), minmax_normalize(want.flatten(1)), atol=atol,
                               rtol=0)


# --------------------------------------------------------------------------
# The copies as oracles
# --------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
def test_timm_vit_equals_copy_for_every_lrp_method(distilled, no_stabiliser):
    model = _timm(VisionTransformerDistilled if distilled else VisionTransformer, depth=3).double()
    ours = from_timm(model)
    x = images()
    for method in LRP_METHODS:
        for start in ((0, 1) if method == "transformer_attribution" else (None,)):
            for index in (None, [4, 0, 2]):
                _close_after_minmax(explain(model, x, method, index=index, start_layer=start),
                                    explain(ours, x, method, index=index, start_layer=start))


def _bert_pair():
    model = TEXT_FAMILIES["hf_bert"]().double()
    ours = bert_copy.BertForSequenceClassification(model.config)
    ours.load_state_dict(bert_copy.convert_hf_state_dict(model.state_dict()), strict=True)
    return model, ours.eval().double()


def test_hf_bert_equals_copy_for_every_lrp_method(no_stabiliser):
    model, ours = _bert_pair()
    batch = text_batch()  # padded: lengths 8, 5, 3
    for method in LRP_METHODS:
        for start in ((None, 0, 1) if method == "transformer_attribution" else (None,)):
            for index in (None, [1, 2, 0]):
                _close_after_minmax(explain(model, batch, method, index=index, start_layer=start),
                                    explain(ours, batch, method, index=index, start_layer=start))


def test_with_the_stabiliser_the_copies_differ_only_by_where_it_sits():
    # measured on these models: ViT full LRP 2.4e-5, transformer attribution 3.0e-6; BERT full LRP 1.7e-8
    model = _timm(VisionTransformer, depth=3).double()
    ours = from_timm(model)
    x = images()
    for method in LRP_METHODS:
        _close_after_minmax(explain(model, x, method), explain(ours, x, method), atol=1e-4)
    model, ours = _bert_pair()
    for method in LRP_METHODS:
        _close_after_minmax(explain(model, text_batch(), method), explain(ours, text_batch(), method), atol=1e-6)


# --------------------------------------------------------------------------
# Every family: shape, finite, batch = singles, model unchanged
# --------------------------------------------------------------------------
def _swin_families():
    from tests.test_swin import hf_v1, hf_v2, timm_v1, timm_v2

    return {"timm_swin": timm_v1, "timm_swin_v2": timm_v2, "hf_swin": hf_v1, "hf_swin_v2": hf_v2}


def _check(model, inputs, sample, tol):
    before = _snapshot(model)
    for method in LRP_METHODS:
        got = explain(model, inputs, method)
        assert torch.isfinite(got).all() and not got.requires_grad, method
        for i in range(B):
            one = explain(model, sample(i), method)
            t = tol
            if method == "lrp" and got.dtype == torch.float64:
                t = dict(atol=FULL_LRP_ATOL * float(one.abs().max()), rtol=0)
            torch.testing.assert_close(got[i:i + 1, ..., :one.shape[-1]], one, **t, msg=method)
        yield method, got
    _assert_unchanged(before, _snapshot(model))


TOL64 = dict(atol=1e-10, rtol=1e-9)
# Full LRP (separate alpha-beta denominators) amplifies rounding: a batch of 3
# against singles differs by up to 7e-8 of the map's largest value (XLM-R:
# 1.5e-6 where it reaches 21; ALBERT 5.6e-7 of 207), the unpadded sample 0
# too - BLAS rounds a batch differently.  Every other method agrees to 1e-15
# there.  Allowed: 1e-6 of the largest value.
FULL_LRP_ATOL = 1e-6


@pytest.mark.parametrize("name", sorted(IMAGE_FAMILIES) + ["timm_swin", "timm_swin_v2", "hf_swin", "hf_swin_v2"])
def test_every_lrp_method_on_image_families(name):
    builder = IMAGE_FAMILIES.get(name) or _swin_families()[name]
    model = builder().double()
    from tests.test_swin import IMG as SWIN_IMG

    size = SWIN_IMG if "swin" in name else images().shape[-1]
    x = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for method, got in _check(model, x, lambda i: x[i:i + 1], TOL64):
        if method in ("lrp", "attnlrp", "cplrp"):
            assert got.shape == (B, size, size), method  # pixels
        else:
            assert got.dim() == 3 and got.shape[0] == B, method


@pytest.mark.parametrize("name", sorted(TEXT_FAMILIES))
def test_every_lrp_method_on_text_families_with_padding(name):
    check_text_family(TEXT_FAMILIES[name]().double())  # every family in float64 (conftest's float64_softmax)


def check_text_family(model, pad=0, positions=None, tol=TOL64):
    """Every LRP method on a right-padded batch of 3: maps (B, T), padding 0,
    each sample equal to it alone, the model unchanged; ``positions``: the
    token a token head explains, per sample."""
    batch = text_batch(pad=pad)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    inputs = batch if positions is None else dict(batch, position=positions)

    def sample(i):
        n = lengths[i]
        one = {k: v[i:i + 1, :n] for k, v in batch.items()}
        return one if positions is None else dict(one, position=positions[i])

    for method, got in _check(model, inputs, sample, tol):
        assert got.shape == batch["input_ids"].shape, method
        assert (got[batch["attention_mask"] == 0] == 0).all(), method  # padding reads 0


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_every_lrp_method_on_image_text_families(name):
    """Two towers, one score: the image map and the text map of each pair;
    the pair's similarity is a product of the two towers' embeddings (each half)."""
    from tests.test_engine_coverage import GRID, SEQ, VOCAB, _clip, _siglip

    model = (_clip if name == "clip" else _siglip)().double()
    ids = torch.randint(3, VOCAB - 2, (B, SEQ), generator=torch.Generator().manual_seed(5))
    ids[:, -1] = VOCAB - 1  # EOS last
    inputs = {"input_ids": ids, "pixel_values": images()}
    before = _snapshot(model)
    for method in LRP_METHODS:
        exp = explain_trace(model, inputs, method)
        got = exp.maps
        side = images().shape[-1] if method in ("lrp", "attnlrp", "cplrp") else GRID
        assert got.image.shape == (B, side, side) and got.text.shape == (B, SEQ), method
        assert torch.isfinite(got.image).all() and torch.isfinite(got.text).all(), method
        for i in range(B):
            one = explain(model, {k: v[i:i + 1] for k, v in inputs.items()}, method)
            for a, b in ((got.image[i:i + 1], one.image), (got.text[i:i + 1], one.text)):
                t = dict(atol=FULL_LRP_ATOL * float(b.abs().max()), rtol=0) if method == "lrp" else TOL64
                torch.testing.assert_close(a, b, **t, msg=method)
        if method in ("attnlrp", "cplrp"):  # the delta covers both towers' input relevance
            total = got.image.flatten(1).sum(1) + got.text.sum(1)
            torch.testing.assert_close(total + exp.delta, exp.score)
    _assert_unchanged(before, _snapshot(model))


# --------------------------------------------------------------------------
# Conservation as an output
# --------------------------------------------------------------------------
def _bias_free_vit():
    model = _timm(VisionTransformer, qkv_bias=False, class_token=True).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("pos_embed", "cls_token"):
                p.zero_()
    return model


def test_cp_lrp_conserves_on_a_bias_free_model():
    model = _bias_free_vit()
    exp = explain_trace(model, images(), "cplrp")
    assert exp.delta.shape == (B,)
    torch.testing.assert_close(exp.delta, torch.zeros(B, dtype=torch.float64), atol=1e-8, rtol=0)
    # with biases the delta is their share: not 0
    exp = explain_trace(IMAGE_FAMILIES["timm_vit_token"]().double(), images(), "cplrp")
    assert exp.delta.abs().min() > 1e-6
    torch.testing.assert_close(exp.maps.flatten(1).sum(1) + exp.delta, exp.score)


def test_delta_is_none_for_methods_that_stop_at_the_attention():
    exp = explain_trace(IMAGE_FAMILIES["timm_vit_token"]().double(), images(), "transformer_attribution")
    assert exp.delta is None


# --------------------------------------------------------------------------
# The rules on small tensors
# --------------------------------------------------------------------------
def _scoped(module, x, rule_set, seed):
    """(output, relevance of x) of ``module`` through the scope, relevance seeded with ``seed``."""
    leaf = x.detach().requires_grad_(True)
    with relevance_scope(module, rule_set) as state:
        out = module(leaf)
    state.relevance = True
    (r,) = torch.autograd.grad(out, leaf, seed)
    return out.detach(), r


class _Net(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _alpha_beta_restated(x, W, R, shared):
    """METHODS.md section 1, four products, no shortcut."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), W.clamp(min=0), W.clamp(max=0)
    z1, z2 = xp @ wp.T, xn @ wn.T
    if shared:
        s = R / (z1 + z2)
        return xp * (s @ wp) + xn * (s @ wn)
    d1, d2 = (torch.where(z == 0, torch.zeros_like(R), R / z) for z in (z1, z2))  # 0 where nothing flows
    return xp * (d1 @ wp) + xn * (d2 @ wn)


@pytest.mark.parametrize("rule_set", ["TA", "LRP"])
def test_linear_rule_is_alpha_beta(rule_set, no_stabiliser):
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 5).double()
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    R = torch.randn(4, 5, generator=g, dtype=torch.float64)
    _, r = _scoped(lin, x, rule_set, R)
    torch.testing.assert_close(r, _alpha_beta_restated(x, lin.weight.detach(), R, rule_set == "TA"))


def _linear_stack():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).double()


def test_ta_linear_rules_equal_zennit_zplus(no_stabiliser):
    from zennit.composites import LayerMapComposite
    from zennit.rules import ZPlus

    net = _linear_stack()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seed = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    with LayerMapComposite([(nn.Linear, ZPlus(stabilizer=1e-30, zero_params="bias"))]).context(net) as m:
        xz = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(m(xz), xz, seed)
    _, got = _scoped(net, x, "TA", seed)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got.sum(1), torch.ones(4, dtype=torch.float64))  # ZPlus conserves (no bias)


def test_gradient_rule_sets_are_lrp0_equal_to_zennit_epsilon():
    from zennit.composites import LayerMapComposite
    from zennit.rules import Epsilon

    net = _linear_stack()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seed = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    with LayerMapComposite([(nn.Linear, Epsilon(epsilon=1e-30))]).context(net) as m:
        xz = x.clone().requires_grad_(True)
        out = m(xz)
        (want,) = torch.autograd.grad(out, xz, seed * out.detach())  # zennit seeds the relevance, the logit
    for rule_set in ("AttnLRP", "CPLRP"):
        _, g = _scoped(net, x, rule_set, seed)
        # the identity rule's 1e-10 in relu's y / (x + 1e-10) is the only difference (|x| >= 1e-3 here)
        torch.testing.assert_close(x * g, want, atol=1e-12, rtol=1e-6)


def test_product_of_two_activations_is_the_halved_matmul_rule(no_stabiliser):
    g = torch.Generator().manual_seed(2)
    u0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    v0 = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    R = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    with relevance_scope(nn.Identity(), "TA") as state:
        z = u @ v
    state.relevance = True
    ru, rv = torch.autograd.grad(z, (u, v), R)
    S = R / (u0 @ v0)
    torch.testing.assert_close(ru, u0 * (S @ v0.transpose(1, 2)) / 2)
    torch.testing.assert_close(rv, v0 * (u0.transpose(1, 2) @ S) / 2)
    # AttnLRP's uniform rule: half the gradient to each factor
    u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    with relevance_scope(nn.Identity(), "AttnLRP") as state:
        z = u @ v
    state.relevance = True
    gu, gv = torch.autograd.grad(z, (u, v), R)
    torch.testing.assert_close(gu, 0.5 * R @ v0.transpose(1, 2))
    torch.testing.assert_close(gv, 0.5 * u0.transpose(1, 2) @ R)


def test_add_of_a_constant_drops_its_share_and_mean_splits_by_value(no_stabiliser):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    c = torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
    R = torch.randn(2, 3, generator=g, dtype=torch.float64)
    _, r = _scoped(_Net(lambda t: (t + c).mean(dim=1)), x, "LRP", R)
    z = x + c
    r_z = z * (R[:, None] / z.sum(dim=1, keepdim=True))  # the mean: LRP-0 of a sum
    torch.testing.assert_close(r, x * r_z / z)  # the add: x's share, c's dropped


def test_scaled_dot_product_attention_is_decomposed_and_recorded(no_stabiliser):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    R = torch.randn(2, 2, 4, 3, generator=g, dtype=torch.float64)

    def explicit(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) / 3 ** 0.5 + mask, dim=-1) @ v

    for rule_set in ("TA", "LRP", "AttnLRP", "CPLRP"):
        got, want = [], []
        for fn, out in ((lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask), got),
                        (explicit, want)):
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            with relevance_scope(nn.Identity(), rule_set) as state:
                y = fn(*leaves)
            state.relevance = True
            out.append(y.detach())
            grads = torch.autograd.grad(y, leaves, R, allow_unused=True)  # CP-LRP: q, k unreached
            out.extend(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))
            if fn is not explicit:
                assert len(state.attentions) == 1 and state.attentions[0][1].shape == (2, 2, 4, 4)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=rule_set)


def test_gradient_pass_is_the_ordinary_gradient():
    """The same forward serves the gradient (d y / d A) and the relevance."""
    model = IMAGE_FAMILIES["timm_vit_token"]().double()
    x = images()
    leaf = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    leaf2 = x.clone().requires_grad_(True)
    with relevance_scope(model, "TA"):
        out = model(leaf2)
    (scoped,) = torch.autograd.grad(out[:, 1].sum(), leaf2)
    torch.testing.assert_close(scoped, plain, atol=1e-12, rtol=1e-10)


class _Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


def test_an_operation_without_a_rule_is_refused_in_one_line():
    model = _timm(VisionTransformer, act_layer=_Exp).double()
    before = _snapshot(model)
    for method in ("transformer_attribution", "attnlrp"):
        with pytest.raises(UnsupportedOperationError) as err:
            explain(model, images(1), method)
        msg = str(err.value)
        assert "'exp'" in msg and "'blocks.0.mlp.act'" in msg and "\n" not in msg
    _assert_unchanged(before, _snapshot(model))
    # the attention-only methods never enter the scope
    assert torch.isfinite(explain(model, images(1), "generic_attribution")).all()


def test_plain_inference_outside_the_scope_is_unchanged():
    model = IMAGE_FAMILIES["timm_vit_token"]().double()
    x = images()
    with torch.no_grad():
        before = model(x)
    explain(model, x, "transformer_attribution")
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    state = ScopeState("TA")
    assert state.ops == 0 and not state.relevance


def test_a_scoped_forward_is_freed_with_its_output_and_state():
    """The autograd graph refers to the scope's pass flag only, never to the
    state that records the probabilities: dropping the output and the state
    frees the forward at once, without the cycle collector (a cycle through
    the graph, which the collector cannot see, leaked every scoped forward of
    a model with fused attention: 1.2 GB a call on ViT-S at batch 8)."""
    import gc
    import weakref

    net = _Net(lambda x: F.scaled_dot_product_attention(x, x, x))
    leaf = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    gc.disable()
    try:
        with relevance_scope(net, "TA") as state:
            out = net(leaf)
        probs = weakref.ref(state.attentions[0][1])
        del state, out
        assert probs() is None
    finally:
        gc.enable()


_OWN_GRAPH = {"MmBackward0", "AddmmBackward0", "BmmBackward0", "GeluBackward0", "NativeLayerNormBackward0",
              "SoftmaxBackward0", "ConvolutionBackward0", "MulBackward0", "AddBackward0"}


def _graph_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("rule_set", ["TA", "LRP"])
def test_without_a_gradient_pass_the_forward_keeps_no_graph_of_its_own(rule_set):
    """``ScopeState(gradient=False)`` (explain's choice for every method
    without a gradient pass): the operations' own values are computed without
    autograd, so the forward's graph is the switches and routing only, and
    the relevance equals the one through the full graph bit for bit."""
    model = IMAGE_FAMILIES["timm_vit_token"]().double()
    x = images()
    got = {}
    for gradient in (True, False):
        leaf = x.clone().requires_grad_(True)
        state = ScopeState(rule_set, gradient=gradient)
        with relevance_scope(model, rule_set, state):
            out = model(leaf)
        nodes = _graph_nodes(out)
        assert bool(nodes & _OWN_GRAPH) == gradient, sorted(nodes & _OWN_GRAPH)
        state.relevance = True
        seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        (got[gradient],) = torch.autograd.grad(out, leaf, seed)
    assert torch.equal(got[True], got[False])


def test_elementwise_product_norms_and_activation_modules(no_stabiliser):
    """Our rules for operations the papers never met, each against its equation."""
    import transformers as tf
    from transformers.activations import NewGELUActivation

    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    R = torch.randn(3, 7, generator=g, dtype=torch.float64)
    W1 = torch.randn(7, 7, generator=g, dtype=torch.float64)
    W2 = torch.randn(7, 7, generator=g, dtype=torch.float64)
    # a gated product of two activations (SwiGLU): each factor half of the matmul-style share
    _, r = _scoped(_Net(lambda t: (t @ W1) * (t @ W2)), x0, "TA", R)
    a, b = x0 @ W1, x0 @ W2
    half = R / 2  # u * (R / (u v)) * v = R for each factor, halved
    torch.testing.assert_close(r, _alpha_beta_restated(x0, W1.T, half, True) + _alpha_beta_restated(x0, W2.T, half, True))
    # x / ||x|| (a norm written by hand, as CLIP's): the divisor a constant, relevance passes to x
    _, r = _scoped(_Net(lambda t: t / torch.pow(torch.sum(torch.pow(t, 2), -1, keepdim=True), 0.5)), x0, "LRP", R)
    torch.testing.assert_close(r, R)
    # activation modules and RMS norms written as several calls: one operation
    rms = tf.models.llama.modeling_llama.LlamaRMSNorm(7).double()
    for module in (NewGELUActivation(), rms):
        y, r = _scoped(module, x0, "TA", R)
        torch.testing.assert_close(r, R)  # TA / LRP: identity
        _, gr = _scoped(module, x0, "AttnLRP", R)
        torch.testing.assert_close(x0 * gr, y * R, atol=1e-9, rtol=1e-7)  # identity rule: x * grad = y * R
    # LayerNorm under the gradient rule sets: the standard deviation a constant (METHODS.md section 9)
    ln = nn.LayerNorm(7).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    _, gr = _scoped(ln, x0, "CPLRP", R)
    leaf = x0.clone().requires_grad_(True)
    std = torch.sqrt(leaf.var(-1, unbiased=False, keepdim=True) + ln.eps).detach()
    (want,) = torch.autograd.grad(((leaf - leaf.mean(-1, keepdim=True)) / std * ln.weight + ln.bias), leaf, R)
    torch.testing.assert_close(gr, want)


def test_einsum_of_two_activations_is_the_matmul_rule(no_stabiliser):
    g = torch.Generator().manual_seed(7)
    u0 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    v0 = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    R = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    out = []
    for fn in (lambda a, b: torch.einsum("bij,bjk->bik", a, b), lambda a, b: a @ b):
        for rule_set in ("TA", "AttnLRP"):
            u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
            with relevance_scope(nn.Identity(), rule_set) as state:
                z = fn(u, v)
            state.relevance = True
            out.append(torch.autograd.grad(z, (u, v), R))
    for a, b in zip(out[:2], out[2:]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
