"""The ICCV 2021 LRP rows on the single-stream vision-language models:
transformer attribution, partial LRP and "ours with LRP" on an unmodified
``VisualBertForQuestionAnswering`` (METHODS_ICCV.md section 3, the published
``VisualBERT/.../ExplanationGenerator.py``), and ViLT as the project's
extension of that section.

The VisualBERT oracle is independent of the engine and of the LRP scope: an
own forward of the model's layers (batch 1, one unpadded sample) from their
weights, starting at the joint sequence the model's embeddings return, and
an own relevance pass by the rules of METHODS.md sections 1 and 10 (rule
set TA: the published ``BERT_ours`` is built from ``layers_ours``).  The
rules and the per-layer forward/relevance steps are those of the LXMERT
oracle (tests/test_iccv_lrp.py), whose BERT-style module names VisualBERT
shares; the generators are plain loops over METHODS_ICCV.md section 3.
Every sample of a batch padded in both the text and the boxes must equal
it; each published quirk that changes the numbers has a test that fails
when the quirk is dropped.

Everything is float64 (the ``float64`` fixture), compared at 1e-9.
"""
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from modules.explain import StreamMaps, explain
from tests.test_generic import _assert_unchanged, _snapshot
from tests.test_iccv_lrp import Oracle, avg_heads
from tests.test_vlm import B, I, PATCH, SIZES, T, tiny_vilt, tiny_visualbert, vb_batch, vb_sample, vilt_batch, \
    vilt_sample

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("float64")
RTOL, ATOL = 1e-9, 1e-12


# --------------------------------------------------------------------------
# The VisualBERT oracle: own forward from the joint embeddings up, own relevance pass
# --------------------------------------------------------------------------
class VisualBertOracle(Oracle):
    """``VisualBertForQuestionAnswering`` on one unpadded sample: the
    embeddings' output (the model's own module, captured by a hook), then
    every ``VisualBertLayer`` written out (post-LN BERT layers, the additive
    mask all zeros as the model adds it), the token at
    ``cls_index = len(text) - 2`` (MMF's and transformers' ``vqa`` pooling),
    the ``cls`` linear head.  Relevance: one-hot at the explained logit,
    through ``cls``, placed at the pooled token, back through every layer."""

    def __init__(self, model, inputs, shared=True):
        self.m, self.shared, self.inputs = model, shared, inputs
        self.records, self.tape = [], []
        self.n_text = inputs["input_ids"].shape[1]
        self.cls_index = self.n_text - 2
        got = []
        hook = model.visual_bert.embeddings.register_forward_hook(lambda m, a, out: got.append(out.detach()))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            hook.remove()
        emb = got[0]
        with torch.enable_grad():
            zero = torch.zeros(1, 1, 1, emb.shape[1])
            h = emb
            for k, layer in enumerate(model.visual_bert.encoder.layer):
                h = self.layer(layer, h, zero, f"layer{k}", "joint")
            self.last, self.pooled_in = h, h[:, self.cls_index]
            self.logits = self.lin(model.cls, self.pooled_in)
            self.c = int(self.logits.argmax(-1))
            grads = torch.autograd.grad(self.logits[0, self.c], [r[3] for r in self.records], allow_unused=True)
        self.grads = [torch.zeros_like(r[3]) if g is None else g.detach() for r, g in zip(self.records, grads)]
        self.relevance_pass()

    def relevance_pass(self):
        seed = torch.zeros_like(self.logits)
        seed[0, self.c] = 1
        R = torch.zeros_like(self.last)
        R[:, self.cls_index] = self.lin_rel(self.m.cls, self.pooled_in, seed)  # dropout: identity; gather: routing
        for _, _, ra, rf in reversed(self.tape):
            R = sum(self.att_layer_rel(ra, self.ffn_rel(rf, R)))

    def split(self, row):
        """The published read-out: entry cls_index set to 0; text = columns
        1 .. cls_index-1, image = columns len(text) .. N-1."""
        row = row.clone()
        row[self.cls_index] = 0
        return row[1:self.cls_index], row[self.n_text:]


def vb_transformer_att(o, normalize=False, start=0, row=None):
    """``generate_transformer_att``: cams = mean_h max(G * R_A, 0) of every
    layer; ``compute_rollout_attention`` (cam + I, **no** row normalisation,
    from start_layer 0); row cls_index."""
    mats = []
    for _, _, _, A, G, RA in o.calls():
        m = avg_heads(RA, G) + torch.eye(A.shape[-1])
        mats.append(m / m.sum(dim=-1, keepdim=True) if normalize else m)
    joint = mats[start]
    for m in mats[start + 1:]:
        joint = m @ joint
    return o.split(joint[o.cls_index if row is None else row])


def vb_ours(o, use_lrp=True, with_grad=True):
    """``generate_ours``: R = I; R += Abar @ R over every layer, Abar from
    R_A when use_lrp (the gradient still multiplied); row cls_index."""
    calls = o.calls()
    R = torch.eye(calls[0][3].shape[-1])
    for _, _, _, A, G, RA in calls:
        cam = RA if use_lrp else A
        R = R + (avg_heads(cam, G) if with_grad else cam.clamp(min=0).mean(dim=0)) @ R
    return o.split(R[o.cls_index])


def vb_partial_lrp(o, whole_map=True, clamp=False):
    """``generate_partial_lrp``: head mean of the last layer's R_A (signed),
    min-max over the whole N x N map, row cls_index, its own entry 0."""
    RA = o.calls()[-1][5]
    cam = (RA.clamp(min=0) if clamp else RA).mean(dim=0)
    if whole_map:
        return o.split(((cam - cam.min()) / (cam.max() - cam.min()))[o.cls_index])
    # quirk dropped: min-max over the read columns only (text 1 .. cls_index-1 and the boxes)
    t, i = o.split(cam[o.cls_index])
    both = torch.cat([t, i])
    lo, hi = both.min(), both.max()
    return (t - lo) / (hi - lo), (i - lo) / (hi - lo)


VB_METHODS = {
    "transformer_attribution": (dict(), vb_transformer_att),
    "lrp_last_layer": (dict(), vb_partial_lrp),
    "ours_with_lrp": (dict(use_lrp=True), vb_ours),
}


def _engine(model, inputs, name):
    kw, _ = VB_METHODS[name]
    return explain(model, inputs, "generic_attribution" if name == "ours_with_lrp" else name, **kw)


def test_visualbert_oracle_forward_is_the_model():
    model = tiny_visualbert()
    one = vb_sample(vb_batch(), 0)
    o = VisualBertOracle(model, one)
    with torch.no_grad():
        want = model(**one).logits
    torch.testing.assert_close(o.logits.detach(), want, rtol=1e-12, atol=1e-12)
    # its A and G give tests/test_vlm.py's generate_ours (attention methods) on the same sample
    from tests.test_vlm import section3

    rows, _ = section3(model, "VisualBertSelfAttention", one, o.cls_index)
    t, i = vb_ours(o, use_lrp=False)
    torch.testing.assert_close(t, rows["generic_attribution"][1:o.cls_index], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(i, rows["generic_attribution"][o.n_text:], rtol=1e-10, atol=1e-12)


def test_visualbert_oracle_relevance_conserves_without_biases():
    """Rule set TA with alpha = 1 conserves on a bias-free model (METHODS.md
    section 1): the relevance reaching the joint embeddings sums to 1, up
    to the 1e-9 stabilisers (and the zero mask's dropped share: none)."""
    model = tiny_visualbert()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "LayerNorm" not in name:
                p.zero_()
    one = vb_sample(vb_batch(), 1)
    o = VisualBertOracle(model, one)
    seed = torch.zeros_like(o.logits)
    seed[0, o.c] = 1
    R = torch.zeros_like(o.last)
    R[:, o.cls_index] = o.lin_rel(model.cls, o.pooled_in, seed)
    for _, _, ra, rf in reversed(o.tape):
        R = sum(o.att_layer_rel(ra, o.ffn_rel(rf, R)))
        assert abs(float(R.sum()) - 1) < 1e-4


@pytest.mark.parametrize("name", list(VB_METHODS))
def test_visualbert_every_sample_of_a_padded_batch_equals_the_oracle(name):
    model = tiny_visualbert()
    inputs = vb_batch()  # text padded (samples 1, 2), boxes padded (sample 2)
    before = _snapshot(model)
    got = _engine(model, inputs, name)
    _assert_unchanged(before, _snapshot(model))
    assert isinstance(got, StreamMaps) and got.text.shape == (B, T) and got.image.shape == (B, I)
    _, fn = VB_METHODS[name]
    for b in range(B):
        one = vb_sample(inputs, b)
        o = VisualBertOracle(model, one)
        want_t, want_i = fn(o)
        n, k, cls = o.n_text, one["visual_embeds"].shape[1], o.cls_index
        torch.testing.assert_close(got.text[b, 1:cls], want_t, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got.image[b, :k], want_i, rtol=RTOL, atol=ATOL)
        assert got.text[b, 0] == 0 and not got.text[b, cls:].any() and not got.image[b, k:].any()
        assert want_t.abs().sum() > 0 and want_i.abs().sum() > 0
        single = _engine(model, one, name)
        torch.testing.assert_close(single.text[0, 1:cls], want_t, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(single.image[0], want_i, rtol=RTOL, atol=ATOL)


def test_visualbert_transformer_attribution_is_ours_with_lrp():
    """A consequence of the published code: the rollout of (Abar + I) with
    no row normalisation from layer 0 is R = I, R += Abar R (the engine
    gives the same numbers for both rows)."""
    model = tiny_visualbert()
    inputs = vb_batch()
    ta = _engine(model, inputs, "transformer_attribution")
    ours = _engine(model, inputs, "ours_with_lrp")
    torch.testing.assert_close(ta.text, ours.text, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ta.image, ours.image, rtol=1e-12, atol=1e-15)


def _differs(got, want, margin=1e-3):
    return float((got - want).abs().max()) > margin * max(float(want.abs().max()), 1e-12)


VB_QUIRKS = [
    ("transformer_attribution", "rollout without row normalisation (one compute_rollout_attention)",
     lambda o: vb_transformer_att(o, normalize=True)),
    ("transformer_attribution", "every layer (start_layer 0), not BERT's last-layer default",
     lambda o: vb_transformer_att(o, start=len(o.calls()) - 1)),
    ("transformer_attribution", "the pooled token's row (cls_index), not [CLS]",
     lambda o: vb_transformer_att(o, row=0)),
    ("transformer_attribution", "rule set TA (shared denominator, rescaled adds), not LRP",
     lambda o: vb_transformer_att(VisualBertOracle(o.m, o.inputs, shared=False))),
    # (Only the pooled row of the last layer receives relevance, so the whole map's
    # min-max is that row's with 0 included: what the whole map adds is the 0 and
    # the entries outside the read columns.)
    ("lrp_last_layer", "min-max over the whole map (0, [CLS], [SEP], the pooled entry included), "
                       "not over the read columns",
     lambda o: vb_partial_lrp(o, whole_map=False)),
    ("lrp_last_layer", "head mean of the signed relevance (no clamp)",
     lambda o: vb_partial_lrp(o, clamp=True)),
    ("lrp_last_layer", "rule set TA, not LRP",
     lambda o: vb_partial_lrp(VisualBertOracle(o.m, o.inputs, shared=False))),
    ("ours_with_lrp", "gradient still multiplied",
     lambda o: vb_ours(o, use_lrp=True, with_grad=False)),
    ("ours_with_lrp", "A replaced by its relevance",
     lambda o: vb_ours(o, use_lrp=False)),
]


@pytest.mark.parametrize("name,quirk,variant", VB_QUIRKS, ids=[f"{m}: {q}" for m, q, _ in VB_QUIRKS])
def test_visualbert_each_published_quirk_changes_the_numbers(name, quirk, variant):
    """The engine equals the oracle (test above) and differs from the
    oracle with the quirk dropped on at least one sample."""
    model = tiny_visualbert()
    inputs = vb_batch()
    got = _engine(model, inputs, name)
    differs = []
    for b in range(B):
        one = vb_sample(inputs, b)
        o = VisualBertOracle(model, one)
        alt_t, alt_i = variant(o)
        k = one["visual_embeds"].shape[1]
        differs.append(_differs(got.text[b, 1:o.cls_index], alt_t) or _differs(got.image[b, :k], alt_i))
    assert any(differs), f"dropping '{quirk}' does not change {name} on these inputs"


def test_visualbert_lrp_options_refused_where_they_do_not_apply():
    model = tiny_visualbert()
    inputs = vb_batch()
    with pytest.raises(ValueError, match="takes no option use_lrp"):
        explain(model, inputs, "rollout", use_lrp=True)
    with pytest.raises(ValueError, match="not True or False"):
        explain(model, inputs, "generic_attribution", use_lrp="yes")
    with pytest.raises(ValueError, match="needs an LRP pass"):
        explain(model, inputs, "lrp")  # full LRP has no ICCV definition here


# --------------------------------------------------------------------------
# ViLT (ours): an independent batch-1 oracle, alone and as a row of a padded batch
# --------------------------------------------------------------------------
class ViltOracle(Oracle):
    """``ViltForQuestionAnswering`` on one unpadded sample, the project's
    extension of section 3: the joint sequence the embeddings return (and
    the patch index their ``visual_embed`` drew), then every pre-LN
    ``ViltLayer`` written out, the final LayerNorm, the pooler (dense, tanh
    on joint token 0) and the classifier (linear, LayerNorm, GELU, linear).
    Relevance: one-hot at the explained logit, back through the head to
    token 0 and through every layer (LayerNorm, GELU, tanh: identity).

    ``masked``: whether the model adds its (here all-zero) additive mask to
    the scores.  transformers' ViLT adds it only when some sample of the
    call is padded (``create_bidirectional_mask`` returns None otherwise),
    and the add's rule (the split by value with its 1e-9 stabiliser, then
    the TA rescale) moves R_A by ~1e-8: a sample alone is ``masked=False``,
    a row of a padded batch ``masked=True``."""

    def __init__(self, model, inputs, shared=True, masked=False):
        from tests.test_vlm import _capture

        self.masked = masked
        self.m, self.shared, self.inputs = model, shared, inputs
        self.records, self.tape = [], []
        self.n_text, self.cls_index = inputs["input_ids"].shape[1], 0
        got = []
        hook = model.vilt.embeddings.register_forward_hook(lambda m, a, out: got.append(out[0].detach()))
        try:
            with torch.no_grad():
                _, _, visual = _capture(model, "ViltSelfAttention", inputs, wrap_visual=True)
        finally:
            hook.remove()
        _, _, (patch_index, (self.gh, self.gw)) = visual[0]
        self.cells = patch_index[0]
        emb = got[0]
        ln = lambda mod, x: F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)  # noqa: E731
        with torch.enable_grad():
            zero = torch.zeros(1, 1, 1, emb.shape[1])
            x = emb
            for k, layer in enumerate(model.vilt.encoder.layer):
                x_ln = ln(layer.layernorm_before, x)
                ctx, rec = self.attention(layer.attention.attention, x_ln, x_ln, zero, f"layer{k}", "joint", "joint")
                h = self.lin(layer.attention.output.dense, ctx)
                x1 = h + x
                y = ln(layer.layernorm_after, x1)
                i = F.gelu(self.lin(layer.intermediate.dense, y))
                o = self.lin(layer.output.dense, i)
                self.tape.append(dict(rec=rec, ctx=ctx, layer=layer, x=x, h=h, x1=x1, y=y, i=i, o=o))
                x = o + x1
            seq = ln(model.vilt.layernorm, x)
            self.pooled_in = seq[:, 0]
            self.pooled = torch.tanh(self.lin(model.vilt.pooler.dense, self.pooled_in))
            c = model.classifier
            self.l1 = self.lin(c[0], self.pooled)
            self.l2 = F.gelu(ln(c[1], self.l1))
            self.logits = self.lin(c[3], self.l2)
            self.last = seq
            self.c = int(self.logits.argmax(-1))
            grads = torch.autograd.grad(self.logits[0, self.c], [r[3] for r in self.records], allow_unused=True)
        self.grads = [torch.zeros_like(r[3]) if g is None else g.detach() for r, g in zip(self.records, grads)]
        self.relevance_pass()

    def add_rel(self, a, b, R):
        if a.dim() == 4 and not self.masked:  # the scores: no mask added, no add rule
            return R, torch.zeros_like(R)
        return super().add_rel(a, b, R)

    def relevance_pass(self):
        c = self.m.classifier
        seed = torch.zeros_like(self.logits)
        seed[0, self.c] = 1
        R0 = self.lin_rel(c[0], self.pooled, self.lin_rel(c[3], self.l2, seed))
        R = torch.zeros_like(self.last)
        R[:, 0] = self.lin_rel(self.m.vilt.pooler.dense, self.pooled_in, R0)
        for t in reversed(self.tape):
            layer = t["layer"]
            R_o, R_x1 = self.add_rel(t["o"], t["x1"], R)
            R_y = self.lin_rel(layer.intermediate.dense, t["y"], self.lin_rel(layer.output.dense, t["i"], R_o))
            R_h, R_x = self.add_rel(t["h"], t["x"], R_x1 + R_y)
            R_ctx = self.lin_rel(layer.attention.output.dense, t["ctx"], R_h)
            R = R_x + sum(self.attention_rel(t["rec"], R_ctx))

    def split(self, row):
        """Row 0 with its own entry 0; text = columns 1 .. n-2 ([CLS], [SEP]
        dropped), image = the patch columns put on their grid cells."""
        row = row.clone()
        row[0] = 0
        grid = torch.zeros(self.gh, self.gw)
        grid[self.cells[:, 0], self.cells[:, 1]] = row[self.n_text + 1:]
        return row[1:self.n_text - 1], grid


@pytest.mark.parametrize("name", list(VB_METHODS))
def test_vilt_each_sample_alone_equals_the_oracle(name):
    model = tiny_vilt()
    inputs = vilt_batch()
    _, fn = VB_METHODS[name]
    for b in range(B):
        one = vilt_sample(inputs, b)
        torch.manual_seed(100 + b)
        o = ViltOracle(model, one)
        with torch.no_grad():
            torch.manual_seed(100 + b)
            torch.testing.assert_close(o.logits.detach(), model(**one).logits, rtol=1e-12, atol=1e-12)
        want_t, want_i = fn(o)
        torch.manual_seed(100 + b)
        got = _engine(model, one, name)
        n = o.n_text
        torch.testing.assert_close(got.text[0, 1:n - 1], want_t, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got.image[0], want_i, rtol=RTOL, atol=ATOL)
        assert want_i.abs().sum() > 0


@pytest.mark.parametrize("name", list(VB_METHODS))
def test_vilt_every_sample_of_a_padded_batch_equals_the_masked_oracle(name):
    """A row of a padded batch (text and pixel_mask padding) equals the
    oracle of the sample alone with the model's zero mask added, at 1e-9.
    The same sample explained alone differs from it by up to 3e-8 of the
    map's maximum (measured), and the oracle says why: alone, transformers'
    ViLT adds no mask, so the add rule on the scores (split by value with
    the 1e-9 stabiliser, then rescaled) does not run (partial LRP: its last
    layer's R_A is read before that add, no difference)."""
    model = tiny_vilt()
    inputs = vilt_batch()
    before = _snapshot(model)
    got = _engine(model, inputs, name)
    _assert_unchanged(before, _snapshot(model))
    assert "visual_embed" not in vars(model.vilt.embeddings)
    gh, gw = 32 // PATCH, 48 // PATCH
    assert got.text.shape == (B, T) and got.image.shape == (B, gh, gw)
    _, fn = VB_METHODS[name]
    gaps = []
    for b, (h, w) in enumerate(SIZES):
        one = vilt_sample(inputs, b)
        torch.manual_seed(100 + b)
        want_t, want_i = fn(ViltOracle(model, one, masked=True))
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(got.text[b, 1:n - 1], want_t, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got.image[b, :h // PATCH, :w // PATCH], want_i, rtol=RTOL, atol=ATOL)
        assert not got.image[b, h // PATCH:].any() and not got.image[b, :, w // PATCH:].any()
        assert got.text[b, 0] == 0 and not got.text[b, n - 1:].any() and want_i.abs().sum() > 0
        torch.manual_seed(100 + b)
        alone_t, alone_i = fn(ViltOracle(model, one, masked=False))
        gaps.append(float((want_i - alone_i).abs().max() / want_i.abs().max()))
    if name == "lrp_last_layer":
        assert max(gaps) < 1e-12
    else:
        assert 1e-9 < max(gaps) < 1e-6, gaps


# --------------------------------------------------------------------------
# baselines/LXMERT/explain_vqa.py --use-lrp (the three VQA models)
# --------------------------------------------------------------------------
from tests.test_vlm import _run, model_dirs  # noqa: E402,F401  (the CLI's saved tiny models)


@pytest.mark.parametrize("kind", ["lxmert", "visual_bert", "vilt"])
def test_explain_vqa_use_lrp_is_ours_with_lrp(model_dirs, tmp_path, capsys, kind):
    import numpy as np
    from PIL import Image

    from baselines.LXMERT.explain_vqa import explain_vqa, load_regions, load_vqa_model

    root, dirs = model_dirs
    base = ["--model-dir", dirs[kind], "--image", root / "img.png", "--question", "what is on the table?",
            "--out", tmp_path / "out.png"] + ([] if kind == "vilt" else ["--features", root / "feats.npz"])
    code, out = _run(base + ["--use-lrp"], capsys)
    assert code == 0, out.err
    assert (tmp_path / "out.png").stat().st_size > 0 and "table" in (tmp_path / "out.html").read_text()
    # the maps it draws are generic_attribution(use_lrp=True), and differ from the plain method
    model, tok, _ = load_vqa_model(dirs[kind], torch.device("cpu"))
    image = Image.open(root / "img.png").convert("RGB")
    regions = None if kind == "vilt" else load_regions(str(root / "feats.npz"), "npz", *image.size)
    args = (model, tok, kind, "what is on the table?", image, regions, "generic_attribution", None, dirs[kind])
    torch.manual_seed(0)
    lrp = explain_vqa(*args, use_lrp=True)
    torch.manual_seed(0)
    plain = explain_vqa(*args)
    assert np.isfinite(lrp["text"].numpy()).all() and lrp["text"].abs().sum() > 0
    assert not torch.allclose(lrp["text"], plain["text"])
    code, out = _run(base + ["--method", "rollout", "--use-lrp"], capsys)
    assert code == 2 and out.err.count("\n") == 1 and "--use-lrp applies to generic_attribution" in out.err
