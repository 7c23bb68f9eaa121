"""The ICCV 2021 LRP rows on unmodified models: transformer attribution,
partial LRP and "ours with LRP" (METHODS_ICCV.md sections 2 and 4).

The oracle is independent of the engine and of the LRP scope: an own
forward of the unmodified model's modules (batch 1, one unpadded sample),
written from their weights, and an own relevance pass through it by the
rules of METHODS.md sections 1 and 10 (rule set TA: the published
multi-modal code's ``layers_ours``), each rule a few lines here; the
gradients come from autograd on the same own forward; the three generators
are plain loops over METHODS_ICCV.md section 2.  The engine's padded batch
must equal the oracle on every sample; each published quirk that changes
the numbers has a test that fails when the quirk is dropped (the variant
differs from the engine).

Everything is float64 (the ``float64`` fixture), compared at 1e-9.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from modules.explain import StreamMaps, explain
import tests.test_lxmert as lxmert_inputs
from tests.test_generic import _assert_unchanged, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("float64")
B, T, I, FEAT = 3, 7, 5, 12
RTOL, ATOL = 1e-9, 1e-12


def tiny_lxmert(seed=0):
    """As tests/test_lxmert.py's builder (weights N(0, 0.2)); biases N(0, 0.1)
    so the bias-free relevance rules see real biases."""
    cfg = tf.LxmertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=2,
                          x_layers=3, r_layers=2, num_qa_labels=7, visual_feat_dim=FEAT, visual_pos_dim=4)
    torch.manual_seed(seed)
    model = tf.LxmertForQuestionAnswering(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


# padding in both streams (sample 1: 5 tokens; sample 2: 3 tokens, 3 boxes): the builders of test_lxmert
lxmert_batch, lxmert_sample = lxmert_inputs.batch, lxmert_inputs.sample


# --------------------------------------------------------------------------
# The rules (METHODS.md section 1, rule set TA; one sample, so "per sample"
# sums are sums over the whole tensor)
# --------------------------------------------------------------------------
def sdiv(a, b):
    """a / (b + 1e-9) where b != 0 (exactly 0 then: 1e-9), 0 where b == 0."""
    den = b + 1e-9
    den = torch.where(den == 0, torch.full_like(den, 1e-9), den)
    return torch.where(b == 0, torch.zeros_like(a / den), a / den)


def linear_rel(x, W, R, shared=True):
    """Alpha-beta, alpha = 1, bias ignored; TA: one denominator Z1 + Z2
    (shared=False: the LRP rule set's separate denominators)."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), W.clamp(min=0), W.clamp(max=0)
    z1, z2 = xp @ wp.T, xn @ wn.T
    if shared:
        s = sdiv(R, z1 + z2)
        return xp * (s @ wp) + xn * (s @ wn)
    return xp * (sdiv(R, z1) @ wp) + xn * (sdiv(R, z2) @ wn)


def add_rel(a, b, R, rescale=True):
    """Residual add: split by value, then (TA) the totals rescaled to |sum R_a| : |sum R_b|."""
    s = sdiv(R, a + b)
    ra, rb = a * s, b * s
    if not rescale:
        return ra, rb
    sa, sb, sr = ra.sum(), rb.sum(), R.sum()
    fa = sdiv(sa.abs(), sa.abs() + sb.abs()) * sr
    fb = sdiv(sb.abs(), sa.abs() + sb.abs()) * sr
    return ra * sdiv(fa, sa), rb * sdiv(fb, sb)


def matmul_rel(u, v, R):
    """Gradient x input of S = R / (u v): R_u = u * (S v^T), R_v = v * (u^T S)."""
    s = sdiv(R, u @ v)
    return u * (s @ v.transpose(-1, -2)), v * (u.transpose(-1, -2) @ s)


class Oracle:
    """Own forward of an unmodified ``LxmertForQuestionAnswering`` (one sample,
    no padding) from its modules' weights, and an own relevance pass."""

    def __init__(self, model, inputs, shared=True):
        self.m, self.shared, self.inputs = model, shared, inputs
        self.records = []  # (name, query stream, key stream, A, record) in forward order
        lx = model.lxmert
        with torch.enable_grad():
            emb = lx.embeddings(inputs["input_ids"], torch.zeros_like(inputs["input_ids"])).detach()
            vis = lx.encoder.visn_fc(inputs["visual_feats"], inputs["visual_pos"]).detach()
            self.zero_t = torch.zeros(1, 1, 1, emb.shape[1])  # the model adds its (all-zero) masks
            self.zero_i = torch.zeros(1, 1, 1, vis.shape[1])
            lang, self.tape = emb, []
            for k, layer in enumerate(lx.encoder.layer):
                lang = self.layer(layer, lang, self.zero_t, f"l{k}", "text")
            for k, layer in enumerate(lx.encoder.r_layers):
                vis = self.layer(layer, vis, self.zero_i, f"r{k}", "image")
            for k, x in enumerate(lx.encoder.x_layers):
                lang, vis = self.xlayer(x, lang, vis, k)
            pooled_in = lang[:, 0]
            pooled = torch.tanh(self.lin(lx.pooler.dense, pooled_in))
            h = model.answer_head.logit_fc
            a1 = self.lin(h[0], pooled)
            a2 = F.layer_norm(F.gelu(a1), h[2].normalized_shape, h[2].weight, h[2].bias, h[2].eps)
            self.logits = self.lin(h[3], a2)
            self.head = (lang, pooled_in, pooled, a2)
            self.c = int(self.logits.argmax(-1))
            grads = torch.autograd.grad(self.logits[0, self.c], [r[3] for r in self.records], allow_unused=True)
        self.grads = [torch.zeros_like(r[3]) if g is None else g.detach() for r, g in zip(self.records, grads)]
        self.relevance_pass()

    # -- forward ----------------------------------------------------------
    @staticmethod
    def lin(mod, x):
        return x @ mod.weight.T + mod.bias

    def attention(self, att, x, ctx, mask, name, q, k):
        H, d = att.num_attention_heads, att.attention_head_size
        heads = lambda t: t.view(1, -1, H, d).permute(0, 2, 1, 3)  # noqa: E731
        qh, kh, vh = heads(self.lin(att.query, x)), heads(self.lin(att.key, ctx)), heads(self.lin(att.value, ctx))
        kt = kh.transpose(-1, -2)
        scores = (qh @ kt) / math.sqrt(d)
        A = torch.softmax(scores + mask, dim=-1)
        out = (A @ vh).permute(0, 2, 1, 3).reshape(1, -1, H * d)
        rec = dict(att=att, x=x, ctx=ctx, qh=qh, kt=kt, scores=scores, mask=mask, A=A, vh=vh)
        self.records.append((name, q, k, A, rec))
        return out, rec

    def att_layer(self, mod_att, mod_out, x, ctx, mask, name, q, k):
        """LayerNorm(dense(attention(x, ctx)) + x)."""
        ctx_out, rec = self.attention(mod_att, x, ctx, mask, name, q, k)
        h = self.lin(mod_out.dense, ctx_out)
        y = F.layer_norm(h + x, mod_out.LayerNorm.normalized_shape, mod_out.LayerNorm.weight,
                         mod_out.LayerNorm.bias, mod_out.LayerNorm.eps)
        return y, dict(rec=rec, dense=mod_out.dense, ctx_out=ctx_out, h=h, x=x)

    def ffn(self, inter, out, x):
        i_in = self.lin(inter.dense, x)
        i = F.gelu(i_in)
        h = self.lin(out.dense, i)
        y = F.layer_norm(h + x, out.LayerNorm.normalized_shape, out.LayerNorm.weight, out.LayerNorm.bias,
                         out.LayerNorm.eps)
        return y, dict(inter=inter, out=out, x=x, i=i, h=h)

    def layer(self, layer, x, mask, name, stream):
        a, ra = self.att_layer(layer.attention.self, layer.attention.output, x, x, mask, name, stream, stream)
        y, rf = self.ffn(layer.intermediate, layer.output, a)
        self.tape.append(("layer", stream, ra, rf))
        return y

    def xlayer(self, x, lang, vis, k):
        ca = x.visual_attention
        la, rla = self.att_layer(ca.att, ca.output, lang, vis, self.zero_i, f"x{k}.cross_ti", "text", "image")
        va, rva = self.att_layer(ca.att, ca.output, vis, lang, self.zero_t, f"x{k}.cross_it", "image", "text")
        ls, rls = self.att_layer(x.lang_self_att.self, x.lang_self_att.output, la, la, self.zero_t,
                                 f"x{k}.lang_self", "text", "text")
        vs, rvs = self.att_layer(x.visn_self_att.self, x.visn_self_att.output, va, va, self.zero_i,
                                 f"x{k}.visn_self", "image", "image")
        lo, rlo = self.ffn(x.lang_inter, x.lang_output, ls)
        vo, rvo = self.ffn(x.visn_inter, x.visn_output, vs)
        self.tape.append(("x", (rla, rva, rls, rvs, rlo, rvo)))
        return lo, vo

    # -- relevance ----------------------------------------------------------
    def lin_rel(self, mod, x, R):
        return linear_rel(x.detach(), mod.weight.detach(), R, self.shared)

    def add_rel(self, a, b, R):
        return add_rel(a.detach(), b.detach(), R, rescale=self.shared)

    def attention_rel(self, rec, R):
        att = rec["att"]
        H, d = att.num_attention_heads, att.attention_head_size
        Rh = R.view(1, -1, H, d).permute(0, 2, 1, 3)
        RA, RV = matmul_rel(rec["A"].detach(), rec["vh"].detach(), Rh)
        RA, RV = RA / 2, RV / 2
        rec["RA"] = RA
        # softmax: identity; the (constant) mask's share of the add dropped; the scale: identity
        Rs, _ = self.add_rel(rec["scores"], rec["mask"].expand_as(rec["scores"]), RA)
        Rq, Rkt = matmul_rel(rec["qh"].detach(), rec["kt"].detach(), Rs)
        Rq, Rk = Rq / 2, (Rkt / 2).transpose(-1, -2)
        merge = lambda t: t.permute(0, 2, 1, 3).reshape(1, -1, H * d)  # noqa: E731
        R_x = self.lin_rel(att.query, rec["x"], merge(Rq))
        R_ctx = self.lin_rel(att.key, rec["ctx"], merge(Rk)) + self.lin_rel(att.value, rec["ctx"], merge(RV))
        return R_x, R_ctx

    def att_layer_rel(self, r, R):
        Rh, Rres = self.add_rel(r["h"], r["x"], R)  # LayerNorm: identity
        R_ctx_out = self.lin_rel(r["dense"], r["ctx_out"], Rh)
        R_x, R_ctx = self.attention_rel(r["rec"], R_ctx_out)
        return R_x + Rres, R_ctx

    def ffn_rel(self, r, R):
        Rh, Rres = self.add_rel(r["h"], r["x"], R)
        Ri = self.lin_rel(r["out"].dense, r["i"], Rh)  # GELU: identity
        return self.lin_rel(r["inter"].dense, r["x"], Ri) + Rres

    def relevance_pass(self):
        lang, pooled_in, pooled, a2 = self.head
        h = self.m.answer_head.logit_fc
        R = F.one_hot(torch.tensor([self.c]), self.logits.shape[-1]).to(self.logits.dtype)
        R = self.lin_rel(h[3], a2, R)  # LayerNorm, GELU: identity
        R = self.lin_rel(h[0], pooled, R)
        R = self.lin_rel(self.m.lxmert.pooler.dense, pooled_in, R)  # tanh: identity
        R_lang = torch.zeros_like(lang)
        R_lang[:, 0] = R  # the pooled token
        R_vis = None
        layers = list(self.tape)
        for entry in reversed(layers):
            if entry[0] == "x":
                rla, rva, rls, rvs, rlo, rvo = entry[1]
                if R_vis is None:
                    R_vis = torch.zeros_like(rvo["x"])  # the last visual output reaches no logit
                R_ls = self.ffn_rel(rlo, R_lang)
                R_vs = self.ffn_rel(rvo, R_vis)
                R_la = sum(self.att_layer_rel(rls, R_ls))
                R_va = sum(self.att_layer_rel(rvs, R_vs))
                l1, v1 = self.att_layer_rel(rla, R_la)
                v2, l2 = self.att_layer_rel(rva, R_va)
                R_lang, R_vis = l1 + l2, v1 + v2
            else:
                _, stream, ra, rf = entry
                R = R_lang if stream == "text" else R_vis
                R = sum(self.att_layer_rel(ra, self.ffn_rel(rf, R)))
                if stream == "text":
                    R_lang = R
                else:
                    R_vis = R

    # -- per call -----------------------------------------------------------
    def calls(self):
        """(name, query, key, A, G, R_A) of every attention call, batch dimension dropped."""
        return [(n, q, k, r["A"].detach()[0], g[0], r["RA"][0]) for (n, q, k, _, r), g in zip(self.records, self.grads)]


def avg_heads(cam, grad):
    """Eq. 5 (batch 1): mean over heads of max(G * cam, 0)."""
    return (grad * cam).clamp(min=0).mean(dim=0)


def transformer_att(o, self_layers="all", cross="last"):
    """GeneratorBaselines.generate_transformer_attr (METHODS_ICCV.md section 2)."""
    calls = o.calls()
    n_t = calls[0][3].shape[-1]
    R_tt = torch.eye(n_t)
    lang = [c for c in calls if c[1] == "text" and c[2] == "text"]
    if self_layers == "x_only":  # quirk dropped: the language encoder's layers left out
        lang = [c for c in lang if c[0].startswith("x")]
    for n, q, k, A, G, RA in lang:
        R_tt = R_tt + avg_heads(RA, G) @ R_tt
    cross_ti = [c for c in calls if c[1] == "text" and c[2] == "image"]
    if cross == "last":
        R_ti = avg_heads(cross_ti[-1][5], cross_ti[-1][4])
    else:  # quirk dropped: every cross layer summed
        R_ti = sum(avg_heads(c[5], c[4]) for c in cross_ti)
    R_tt = R_tt.clone()
    R_tt[0, 0] = 0
    return R_tt[0], R_ti[0]


def partial_lrp(o, whole_matrix=True, zero_after=True, clamp=False):
    """GeneratorBaselines.generate_partial_lrp: head mean of R_A of the last
    x-layer's language cross attention and lang_self_att, min-max over the
    whole matrix, R_tt[0, 0] = 0 after."""
    calls = o.calls()
    last_ti = [c for c in calls if c[1] == "text" and c[2] == "image"][-1]
    last_tt = [c for c in calls if c[1] == "text" and c[2] == "text"][-1]

    def head_mean(RA):
        return (RA.clamp(min=0) if clamp else RA).mean(dim=0)

    def mm(x):
        return (x - x.min()) / (x.max() - x.min())

    R_ti, R_tt = head_mean(last_ti[5]), head_mean(last_tt[5]).clone()
    if not zero_after:
        R_tt[0, 0] = 0
    if whole_matrix:
        R_tt, R_ti = mm(R_tt), mm(R_ti)
        R_tt[0, 0] = 0
        return R_tt[0], R_ti[0]
    t, i = R_tt[0].clone(), R_ti[0]
    t[0] = 0
    return mm(t), mm(i)


def ours(o, use_lrp=True, with_grad=True):
    """generate_ours(use_lrp) as plain loops (METHODS_ICCV.md section 2)."""
    calls = o.calls()
    n_t = [c for c in calls if c[1] == "text"][0][3].shape[-2]
    n_i = [c for c in calls if c[1] == "image"][0][3].shape[-2]

    def cam(c):
        A = c[5] if use_lrp else c[3]
        return avg_heads(A, c[4]) if with_grad else A.clamp(min=0).mean(dim=0)

    def bar(R):
        n = R.shape[0]
        rhat = R - torch.eye(n)
        return rhat / rhat.sum(dim=-1, keepdim=True) + torch.eye(n)

    by = {c[0]: c for c in calls}
    R_tt, R_ii, R_ti, R_it = torch.eye(n_t), torch.eye(n_i), torch.zeros(n_t, n_i), torch.zeros(n_i, n_t)
    for c in calls:
        if c[0].startswith("l"):
            a = cam(c)
            R_tt, R_ti = R_tt + a @ R_tt, R_ti + a @ R_ti
    for c in calls:
        if c[0].startswith("r"):
            a = cam(c)
            R_ii, R_it = R_ii + a @ R_ii, R_it + a @ R_it
    X = len(o.m.lxmert.encoder.x_layers)
    for k in range(X):
        a_ti = cam(by[f"x{k}.cross_ti"])
        d_ti, d_tt = bar(R_tt).T @ a_ti @ bar(R_ii), a_ti @ R_it
        if k < X - 1:
            a_it = cam(by[f"x{k}.cross_it"])
            d_it, d_ii = bar(R_ii).T @ a_it @ bar(R_tt), a_it @ R_ti
            R_it, R_ii = R_it + d_it, R_ii + d_ii
        R_ti, R_tt = R_ti + d_ti, R_tt + d_tt
        a = cam(by[f"x{k}.lang_self"])
        R_tt, R_ti = R_tt + a @ R_tt, R_ti + a @ R_ti
        if k < X - 1:
            a = cam(by[f"x{k}.visn_self"])
            R_ii, R_it = R_ii + a @ R_ii, R_it + a @ R_it
    R_tt = R_tt.clone()
    R_tt[0, 0] = 0
    return R_tt[0], R_ti[0]


LXMERT_METHODS = {
    "transformer_attribution": (dict(), transformer_att),
    "lrp_last_layer": (dict(), partial_lrp),
    "ours_with_lrp": (dict(use_lrp=True), ours),
}


def _engine(model, inputs, name):
    kw, _ = LXMERT_METHODS[name]
    method = "generic_attribution" if name == "ours_with_lrp" else name
    return explain(model, inputs, method, **kw)


# --------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------
def test_oracle_forward_is_the_model_and_its_relevance_conserves():
    model = tiny_lxmert()
    one = lxmert_sample(lxmert_batch(), 0)
    o = Oracle(model, one)
    with torch.no_grad():
        want = model(**one).question_answering_score
    torch.testing.assert_close(o.logits.detach(), want, rtol=1e-12, atol=1e-12)
    # the published generator without LRP from the oracle's own A, G = tests/test_lxmert.py's
    from tests.test_lxmert import published_generator

    t, i = ours(o, use_lrp=False)
    wt, wi = published_generator(model, one)
    torch.testing.assert_close(t, wt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(i, wi, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LXMERT_METHODS))
def test_lxmert_every_sample_of_a_padded_batch_equals_the_oracle(name):
    model = tiny_lxmert()
    inputs = lxmert_batch()
    before = _snapshot(model)
    got = _engine(model, inputs, name)
    _assert_unchanged(before, _snapshot(model))
    assert isinstance(got, StreamMaps) and got.text.shape == (B, T) and got.image.shape == (B, I)
    _, fn = LXMERT_METHODS[name]
    for b in range(B):
        one = lxmert_sample(inputs, b)
        want_t, want_i = fn(Oracle(model, one))
        n, k = want_t.shape[0], want_i.shape[0]
        torch.testing.assert_close(got.text[b, :n], want_t, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got.image[b, :k], want_i, rtol=RTOL, atol=ATOL)
        assert not got.text[b, n:].any() and not got.image[b, k:].any()  # padding gets 0
        assert got.text[b, 0] == 0  # R_tt[0, 0] = 0
        single = _engine(model, one, name)
        torch.testing.assert_close(single.text[0], want_t, rtol=RTOL, atol=ATOL)


def _differs(got, want, margin=1e-3):
    return float((got - want).abs().max()) > margin * max(float(want.abs().max()), 1e-12)


QUIRKS = [
    # (method, what the variant drops, oracle variant)
    ("transformer_attribution", "self rule over the language encoder too, not only the x-layers",
     lambda o: transformer_att(o, self_layers="x_only")),
    ("transformer_attribution", "R_ti read from the last cross layer only (no aggregation)",
     lambda o: transformer_att(o, cross="sum")),
    ("transformer_attribution", "rule set TA (shared denominator, rescaled adds), not LRP",
     lambda o: transformer_att(Oracle(o.m, o.inputs, shared=False))),
    ("lrp_last_layer", "min-max over the whole matrix, not over the read row",
     lambda o: partial_lrp(o, whole_matrix=False)),
    ("lrp_last_layer", "R_tt[0, 0] = 0 after the min-max, not before",
     lambda o: partial_lrp(o, zero_after=False)),
    ("lrp_last_layer", "head mean of the signed relevance (no clamp)",
     lambda o: partial_lrp(o, clamp=True)),
    ("ours_with_lrp", "gradient still multiplied",
     lambda o: ours(o, use_lrp=True, with_grad=False)),
    ("ours_with_lrp", "A replaced by its relevance",
     lambda o: ours(o, use_lrp=False)),
]


@pytest.mark.parametrize("name,quirk,variant", QUIRKS, ids=[f"{m}: {q}" for m, q, _ in QUIRKS])
def test_lxmert_each_published_quirk_changes_the_numbers(name, quirk, variant):
    """The engine equals the oracle and differs from the oracle with the quirk
    dropped, on at least one sample (so dropping it fails the test above)."""
    model = tiny_lxmert()
    inputs = lxmert_batch()
    got = _engine(model, inputs, name)
    differs = []
    for b in range(B):
        one = lxmert_sample(inputs, b)
        o = Oracle(model, one)
        alt_t, alt_i = variant(o)
        n, k = alt_t.shape[0], alt_i.shape[0]
        differs.append(_differs(got.text[b, :n], alt_t) or _differs(got.image[b, :k], alt_i))
    assert any(differs), f"dropping '{quirk}' does not change {name} on these inputs"


# --------------------------------------------------------------------------
# DETR / Conditional DETR (METHODS_ICCV.md section 4): batch = singles, model unchanged
# (the independent DETR oracle: tests/test_iccv_lrp_detr.py)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["detr", "conditional"])
@pytest.mark.parametrize("name", list(LXMERT_METHODS))
def test_detr_lrp_rows_padded_batch_equals_each_image_alone(kind, name):
    from tests.test_detr import padded_batch, sample, tiny

    model = tiny(kind).double()
    inputs = padded_batch()
    kw, _ = LXMERT_METHODS[name]
    method = "generic_attribution" if name == "ours_with_lrp" else name
    before = _snapshot(model)
    got = explain(model, inputs, method, index=[1, 2], **kw)
    _assert_unchanged(before, _snapshot(model))
    assert torch.isfinite(got).all()
    for b in range(2):
        # the image alone with its padding and pixel_mask (a cropped image gives other border features)
        one = explain(model, sample(inputs, b), method, index=[1, 2][b], **kw)
        torch.testing.assert_close(got[b], one[0], rtol=RTOL, atol=ATOL)
    if name == "lrp_last_layer":  # min-max over the whole (queries x real cells) matrix: the row need not reach 1
        assert float(got.amax()) <= 1 + 1e-12 and float(got.amin()) >= -1e-12
