"""The ICCV 2021 LRP rows on an unmodified ``DetrForObjectDetection``
(METHODS_ICCV.md section 4): an independent batch-1 oracle.

The oracle is independent of the engine and of the LRP scope: an own
forward of the transformer (encoder, decoder, class head) from the layers'
weights, over one sample's real feature cells only (padding cells are no
tokens), starting where the scope starts - the flattened, projected feature
map and the position embeddings the model hands its encoder (captured by a
hook on a plain forward) - and an own relevance pass by the rules of
METHODS.md sections 1 and 10, rule set TA (the rule functions of the LXMERT
oracle, tests/test_iccv_lrp.py): alpha-beta linears with one denominator,
rescaled residual adds, each product's operands halved, softmax / LayerNorm
/ ReLU / dropout identity, a position embedding or an additive mask added
to an activation keeps the activation's share only (one add used by q and
k gets their summed relevance once).  Gradients come from autograd on the
same own forward.  The three generators are plain loops over
METHODS_ICCV.md section 4 and the published ``DETR/modules/
ExplanationGenerator.py``.  Every sample of a padded batch (pixel_mask)
must equal it in float64 at 1e-9.
"""
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from modules.explain import explain
from tests.test_detr import GRID, padded_batch, sample, tiny
from tests.test_generic import _assert_unchanged, _snapshot
from tests.test_iccv_lrp import add_rel, avg_heads, linear_rel, matmul_rel

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("float64")
RTOL, ATOL = 1e-9, 1e-12
QUERIES = (2, 4)  # the explained query of each sample


class DetrOracle:
    def __init__(self, model, inputs, query, shared=True):
        self.m, self.shared, self.q, self.inputs = model, shared, query, inputs
        self.records = []  # (name, query stream, key stream, A, record) in forward order
        core = model.model
        seen = {}
        hook = core.encoder.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs),
                                                      with_kwargs=True)
        try:
            with torch.no_grad():
                self.model_logits = model(**inputs).logits
        finally:
            hook.remove()
        real = seen["attention_mask"][0].bool()
        self.idx = real.nonzero()[:, 0]
        self.n_cells = real.numel()
        x = seen["inputs_embeds"][0, self.idx][None].detach()
        self.pos = seen["spatial_position_embeddings"][0, self.idx][None].detach()
        self.qpos = core.query_position_embeddings.weight[None].detach()
        n = x.shape[1]
        self.mask = torch.zeros(1, 1, 1, n)  # the model adds its (here all-zero) padding mask
        with torch.enable_grad():
            self.enc_tape, self.dec_tape = [], []
            h = x
            for k, layer in enumerate(core.encoder.layers):
                h = self.encoder_layer(layer, h, k)
            self.enc = h
            d = torch.zeros_like(self.qpos)  # DETR's all-zero decoder input
            for k, layer in enumerate(core.decoder.layers):
                d = self.decoder_layer(layer, d, k)
            ln = core.decoder.layernorm
            self.dec_out = F.layer_norm(d, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            self.logits = self.lin(model.class_labels_classifier, self.dec_out)
            self.c = int(self.logits[0, query, :-1].argmax())  # "no object" excluded
            score = self.logits[0, query, self.c]
            grads = torch.autograd.grad(score, [r[3] for r in self.records], allow_unused=True)
        self.grads = [torch.zeros_like(r[3]) if g is None else g.detach() for r, g in zip(self.records, grads)]
        self.relevance_pass()

    # -- forward ----------------------------------------------------------
    @staticmethod
    def lin(mod, x):
        return x @ mod.weight.T + mod.bias

    @staticmethod
    def ln(mod, x):
        return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)

    def attention(self, mod, q_in, k_in, v_in, masked, name, qs, ks):
        d = mod.head_dim
        heads = lambda t: t.view(1, t.shape[1], -1, d).transpose(1, 2)  # noqa: E731
        qh, kh, vh = heads(self.lin(mod.q_proj, q_in)), heads(self.lin(mod.k_proj, k_in)), \
            heads(self.lin(mod.v_proj, v_in))
        kt = kh.transpose(-1, -2)
        scores = (qh @ kt) * mod.scaling
        if masked:
            scores_in = scores
            scores = scores + self.mask
        A = torch.softmax(scores, dim=-1)
        ctx = (A @ vh).transpose(1, 2).reshape(1, q_in.shape[1], -1)
        out = self.lin(mod.o_proj, ctx)
        rec = dict(mod=mod, q_in=q_in, k_in=k_in, v_in=v_in, qh=qh, kt=kt, vh=vh, A=A, ctx=ctx,
                   scores=scores_in if masked else None)
        self.records.append((name, qs, ks, A, rec))
        return out, rec

    def mlp(self, mlp, x):
        a = self.lin(mlp.fc1, x)
        r = torch.relu(a)
        return self.lin(mlp.fc2, r), dict(mlp=mlp, x=x, r=r)

    def encoder_layer(self, layer, x, k):
        qk = x + self.pos
        a, ra = self.attention(layer.self_attn, qk, qk, x, True, f"enc{k}", "image", "image")
        h1 = self.ln(layer.self_attn_layer_norm, x + a)
        m, rm = self.mlp(layer.mlp, h1)
        self.enc_tape.append(dict(x=x, a=a, ra=ra, h1=h1, m=m, rm=rm))
        return self.ln(layer.final_layer_norm, h1 + m)

    def decoder_layer(self, layer, h, k):
        qk = h + self.qpos
        s, rs = self.attention(layer.self_attn, qk, qk, h, False, f"dec{k}.self", "query", "query")
        h1 = self.ln(layer.self_attn_layer_norm, h + s)
        c, rc = self.attention(layer.encoder_attn, h1 + self.qpos, self.enc + self.pos, self.enc, True,
                               f"dec{k}.cross", "query", "image")
        h2 = self.ln(layer.encoder_attn_layer_norm, h1 + c)
        m, rm = self.mlp(layer.mlp, h2)
        self.dec_tape.append(dict(h=h, s=s, rs=rs, h1=h1, c=c, rc=rc, h2=h2, m=m, rm=rm))
        return self.ln(layer.final_layer_norm, h2 + m)

    # -- relevance ----------------------------------------------------------
    def lin_rel(self, mod, x, R):
        return linear_rel(x.detach(), mod.weight.detach(), R, self.shared)

    def add_rel(self, a, b, R):
        return add_rel(a.detach(), b.detach().expand_as(R), R, rescale=self.shared)

    def attention_rel(self, rec, R):
        """Relevance of (q input, k input, v input) from that of the output."""
        mod = rec["mod"]
        d = mod.head_dim
        R_ctx = self.lin_rel(mod.o_proj, rec["ctx"], R)
        Rh = R_ctx.view(1, R_ctx.shape[1], -1, d).transpose(1, 2)
        RA, RV = matmul_rel(rec["A"].detach(), rec["vh"].detach(), Rh)
        RA, RV = RA / 2, RV / 2
        rec["RA"] = RA
        Rs = RA  # softmax: identity
        if rec["scores"] is not None:  # the mask's share dropped
            Rs, _ = self.add_rel(rec["scores"], self.mask, Rs)
        Rq, Rkt = matmul_rel(rec["qh"].detach(), rec["kt"].detach(), Rs)  # the scale: identity
        Rq, Rk = Rq / 2, (Rkt / 2).transpose(-1, -2)
        merge = lambda t: t.transpose(1, 2).reshape(1, t.shape[2], -1)  # noqa: E731
        return (self.lin_rel(mod.q_proj, rec["q_in"], merge(Rq)), self.lin_rel(mod.k_proj, rec["k_in"], merge(Rk)),
                self.lin_rel(mod.v_proj, rec["v_in"], merge(RV)))

    def mlp_rel(self, r, R):
        return self.lin_rel(r["mlp"].fc1, r["x"], self.lin_rel(r["mlp"].fc2, r["r"], R))  # ReLU: identity

    def relevance_pass(self):
        seed = torch.zeros(1, self.logits.shape[-1])
        seed[0, self.c] = 1
        R = torch.zeros_like(self.dec_out)
        R[:, self.q] = self.lin_rel(self.m.class_labels_classifier, self.dec_out[:, self.q], seed)  # LN: identity
        R_enc = torch.zeros_like(self.enc)
        for t in reversed(self.dec_tape):
            R_h2, R_m = self.add_rel(t["h2"], t["m"], R)
            R_h2 = R_h2 + self.mlp_rel(t["rm"], R_m)
            R_h1, R_c = self.add_rel(t["h1"], t["c"], R_h2)
            Rq, Rk, Rv = self.attention_rel(t["rc"], R_c)
            R_h1 = R_h1 + self.add_rel(t["h1"], self.qpos, Rq)[0]
            R_enc = R_enc + self.add_rel(self.enc, self.pos, Rk)[0] + Rv
            R_h, R_s = self.add_rel(t["h"], t["s"], R_h1)
            Rq, Rk, Rv = self.attention_rel(t["rs"], R_s)
            R = R_h + self.add_rel(t["h"], self.qpos, Rq + Rk)[0] + Rv  # one add read by q and k
        R = R_enc
        for t in reversed(self.enc_tape):
            R_h1, R_m = self.add_rel(t["h1"], t["m"], R)
            R_h1 = R_h1 + self.mlp_rel(t["rm"], R_m)
            R_x, R_a = self.add_rel(t["x"], t["a"], R_h1)
            Rq, Rk, Rv = self.attention_rel(t["ra"], R_a)
            R = R_x + self.add_rel(t["x"], self.pos, Rq + Rk)[0] + Rv

    def calls(self):
        """(name, query, key, A, G, R_A), batch dimension dropped."""
        return [(n, q, k, r["A"].detach()[0], g[0], r["RA"][0])
                for (n, q, k, _, r), g in zip(self.records, self.grads)]

    def grid(self, row):
        """Values over the real cells -> the sample's (h, w) grid, padded cells 0."""
        out = torch.zeros(self.n_cells)
        out[self.idx] = row
        return out.reshape(GRID)


def detr_transformer_att(o, last_only=True):
    """``generate_transformer_att``: avg_heads(R_A, G) of the last decoder
    cross-attention alone, row q."""
    cross = [c for c in o.calls() if c[2] == "image" and c[1] == "query"]
    if last_only:
        return o.grid(avg_heads(cross[-1][5], cross[-1][4])[o.q])
    return o.grid(sum(avg_heads(c[5], c[4]) for c in cross)[o.q])  # quirk dropped: every cross layer


def detr_partial_lrp(o, whole_matrix=True):
    """``generate_partial_lrp``: head mean of the last cross-attention's R_A
    (signed), min-max over the whole (queries x cells) matrix, row q."""
    cam = [c for c in o.calls() if c[2] == "image" and c[1] == "query"][-1][5].mean(dim=0)
    if not whole_matrix:  # quirk dropped: min-max over the row
        row = cam[o.q]
        return o.grid((row - row.min()) / (row.max() - row.min()))
    return o.grid(((cam - cam.min()) / (cam.max() - cam.min()))[o.q])


def detr_ours(o, use_lrp=True, with_grad=True):
    """``generate_ours``: R_ii = I, R_qq = I, R_qi = 0; encoder self rule;
    per decoder layer the self rule on (R_qq, R_qi), then
    dR_qi = Rbar_qq^T Abar_qi Rbar_ii (the engine's default guard: NaN rows
    of an R bar set to 0), row q."""
    calls = o.calls()
    n, nq = calls[0][3].shape[-1], o.qpos.shape[1]

    def cam(c):
        a = c[5] if use_lrp else c[3]
        return avg_heads(a, c[4]) if with_grad else a.clamp(min=0).mean(dim=0)

    def bar(R):
        eye = torch.eye(R.shape[0])
        rhat = R - eye
        return torch.nan_to_num(rhat / rhat.sum(dim=-1, keepdim=True), nan=0.0) + eye

    R_ii, R_qq, R_qi = torch.eye(n), torch.eye(nq), torch.zeros(nq, n)
    for c in calls:
        if c[1] == "image":
            R_ii = R_ii + cam(c) @ R_ii
        elif c[2] == "query":
            a = cam(c)
            R_qq, R_qi = R_qq + a @ R_qq, R_qi + a @ R_qi
        else:
            R_qi = R_qi + torch.nan_to_num(bar(R_qq).T @ cam(c) @ bar(R_ii), nan=0.0)
    return o.grid(R_qi[o.q])


DETR_METHODS = {
    "transformer_attribution": (dict(), detr_transformer_att),
    "lrp_last_layer": (dict(), detr_partial_lrp),
    "ours_with_lrp": (dict(use_lrp=True), detr_ours),
}


def _engine(model, inputs, name, index):
    kw, _ = DETR_METHODS[name]
    return explain(model, inputs, "generic_attribution" if name == "ours_with_lrp" else name, index=index, **kw)


@pytest.fixture(scope="module")
def detr64():
    return tiny("detr").double()


def test_detr_oracle_forward_is_the_model(detr64):
    inputs = padded_batch()
    for b, q in enumerate(QUERIES):
        o = DetrOracle(detr64, sample(inputs, b), q)
        torch.testing.assert_close(o.logits.detach(), o.model_logits, rtol=1e-12, atol=1e-12)
        assert 0 < o.idx.numel() < o.n_cells  # the sample alone has padding cells, dropped here
        # its A and G give tests/test_detr.py's published generator (transformers' own attentions)
        from tests.test_detr import published_generator

        want, cls = published_generator(detr64, inputs, b, q, guard="rows")
        assert cls == o.c
        torch.testing.assert_close(detr_ours(o, use_lrp=False), want.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(DETR_METHODS))
def test_detr_every_sample_of_a_padded_batch_equals_the_oracle(detr64, name):
    inputs = padded_batch()
    before = _snapshot(detr64)
    oracles = [DetrOracle(detr64, sample(inputs, b), q) for b, q in enumerate(QUERIES)]
    got = _engine(detr64, inputs, name, [(q, o.c) for q, o in zip(QUERIES, oracles)])
    _assert_unchanged(before, _snapshot(detr64))
    assert got.shape == (2, *GRID)
    _, fn = DETR_METHODS[name]
    for b, o in enumerate(oracles):
        want = fn(o)
        assert want.abs().sum() > 0
        torch.testing.assert_close(got[b], want, rtol=RTOL, atol=ATOL)


def _differs(got, want, margin=1e-3):
    return float((got - want).abs().max()) > margin * max(float(want.abs().max()), 1e-12)


DETR_QUIRKS = [
    ("transformer_attribution", "the last cross-attention alone (no aggregation)",
     lambda o: detr_transformer_att(o, last_only=False)),
    ("transformer_attribution", "rule set TA, not LRP",
     lambda o: detr_transformer_att(DetrOracle(o.m, o.inputs, o.q, shared=False))),
    ("lrp_last_layer", "min-max over the whole (queries x cells) matrix, not the row",
     lambda o: detr_partial_lrp(o, whole_matrix=False)),
    ("ours_with_lrp", "gradient still multiplied", lambda o: detr_ours(o, with_grad=False)),
    ("ours_with_lrp", "A replaced by its relevance", lambda o: detr_ours(o, use_lrp=False)),
]


@pytest.mark.parametrize("name,quirk,variant", DETR_QUIRKS, ids=[f"{m}: {q}" for m, q, _ in DETR_QUIRKS])
def test_detr_each_published_quirk_changes_the_numbers(detr64, name, quirk, variant):
    inputs = padded_batch()
    oracles = [DetrOracle(detr64, sample(inputs, b), q) for b, q in enumerate(QUERIES)]
    got = _engine(detr64, inputs, name, [(q, o.c) for q, o in zip(QUERIES, oracles)])
    assert any(_differs(got[b], variant(o)) for b, o in enumerate(oracles)), \
        f"dropping '{quirk}' does not change {name} on these inputs"


def test_a_cropped_image_differs_from_its_batch_row_in_the_backbone_not_in_the_explainer(detr64):
    """The open point of issue 22: a cropped image alone does not equal its
    row of a padded batch - for every method and for the logits too.  The
    cause is the backbone: a stride-32 cell whose receptive field reaches
    past the image's bottom/right edge sees the batch's zero pixels (after
    the convolutions and batch norms: not zeros) where the cropped image sees
    each convolution's own zero padding.  Measured here: on a 320x320 image
    padded to 384x384 only the last two rows and columns of cells differ
    (this tiny ResNet's receptive field), the other 64 cells are equal
    (exactly, on this CPU); the test images (2x3 and 3x2 cells) have no other cells, so
    their logits differ too.  The same image alone with its padding and
    pixel_mask equals its batch row (the explainer is batch-invariant)."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 320, 320, generator=g, dtype=torch.float32).double()
    pad = torch.zeros(1, 3, 384, 384)
    pad[..., :320, :320] = img
    pm = torch.zeros(1, 384, 384, dtype=torch.long)
    pm[..., :320, :320] = 1
    feats = []
    hook = detr64.model.backbone.register_forward_hook(lambda m, a, out: feats.append(out[-1][0].detach()))
    try:
        with torch.no_grad():
            detr64(pixel_values=img)
            detr64(pixel_values=pad, pixel_mask=pm)
    finally:
        hook.remove()
    diff = (feats[1][0, :, :10, :10] - feats[0][0]).abs().amax(dim=0)
    scale = float(feats[0].abs().max())
    assert float(diff[:8, :8].max()) <= 1e-9 * scale  # measured: exactly 0 (float64, this CPU)
    assert bool((diff[8:, :] > 1e-3 * scale).all()) and bool((diff[:, 8:] > 1e-3 * scale).all())  # measured >= 6.5
    inputs = padded_batch()
    with torch.no_grad():
        batch = detr64(**inputs).logits
        crop = detr64(**sample(inputs, 0, crop=True)).logits
        alone = detr64(**sample(inputs, 0)).logits
    assert float((batch[0] - crop[0]).abs().max()) > 1e-2
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-12, atol=1e-12)
