"""LXMERT, unmodified: the published generator (METHODS_ICCV.md section 2)
re-derived independently, batch invariance with padding in both streams,
the baselines and ablations, and the model left as found.

Every test runs with torch's default dtype float64 (the ``float64``
fixture), so the engine and the re-derivation, and batch and singles, agree
to ~1e-12 on any CPU and are compared at 1e-9 (issue 20)."""
import pytest
import torch
import transformers as tf

from modules.explain import StreamMaps, explain
from tests.test_generic import _assert_unchanged, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("float64")
B, T, I, FEAT = 3, 7, 5, 12


def tiny_lxmert(seed=0):
    cfg = tf.LxmertConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=2,
                          x_layers=3, r_layers=2, num_qa_labels=7, visual_feat_dim=FEAT, visual_pos_dim=4)
    torch.manual_seed(seed)
    model = tf.LxmertForQuestionAnswering(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    vmask = torch.ones(B, I, dtype=torch.long)
    vmask[2, 3:] = 0
    return dict(input_ids=ids, attention_mask=mask, visual_feats=torch.randn(B, I, FEAT, generator=g),
                visual_pos=torch.rand(B, I, 4, generator=g), visual_attention_mask=vmask)


def sample(inputs, b):
    n = int(inputs["attention_mask"][b].sum())
    k = int(inputs["visual_attention_mask"][b].sum())
    return dict(input_ids=inputs["input_ids"][b:b + 1, :n], attention_mask=inputs["attention_mask"][b:b + 1, :n],
                visual_feats=inputs["visual_feats"][b:b + 1, :k], visual_pos=inputs["visual_pos"][b:b + 1, :k])


# --------------------------------------------------------------------------
# An independent route: own hooks, batch 1, the published generator as a loop
# --------------------------------------------------------------------------
def published_generator(model, inputs, normalize=True, self_in_rule_10=True):
    """METHODS_ICCV.md section 2 for one unpadded sample, written from the text:
    capture every LxmertAttention's probabilities at its dropout (the shared
    cross module fires twice per x-layer, language queries first), take
    d logit_c / d A, then apply the rules in the published order."""
    records = []
    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__ == "LxmertAttention":
            hooks.append(module.dropout.register_forward_hook(
                lambda m, args, out, name=name: records.append((name, out))))
    try:
        out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    logits = out.question_answering_score
    c = int(logits.argmax(-1))
    grads = torch.autograd.grad(logits[0, c], [a for _, a in records], allow_unused=True)
    maps = []
    for (name, a), g in zip(records, grads):
        g = torch.zeros_like(a) if g is None else g
        maps.append((name, (g * a).clamp(min=0).mean(dim=1)[0].detach()))  # Eq. 5 (batch 1)

    def bar(R):  # Eqs. 8-9, no guard (LXMERT)
        n = R.shape[0]
        rhat = R - torch.eye(n)
        return rhat / rhat.sum(dim=-1, keepdim=True) + torch.eye(n)

    n_t, n_i = inputs["input_ids"].shape[1], inputs["visual_feats"].shape[1]
    R_tt, R_ii = torch.eye(n_t), torch.eye(n_i)
    R_ti, R_it = torch.zeros(n_t, n_i), torch.zeros(n_i, n_t)
    X = len(model.lxmert.encoder.x_layers)
    lang = [m for n, m in maps if ".encoder.layer." in n]
    vis = [m for n, m in maps if ".r_layers." in n]
    for a in lang:  # step 1
        R_tt, R_ti = R_tt + a @ R_tt, R_ti + a @ R_ti
    for a in vis:  # step 2
        R_ii, R_it = R_ii + a @ R_ii, R_it + a @ R_it
    for k in range(X):  # steps 3 and 4
        prefix = f"lxmert.encoder.x_layers.{k}."
        cross = [m for n, m in maps if n.startswith(prefix + "visual_attention")]
        a_ti, a_it = cross[0], cross[1]
        lang_self = [m for n, m in maps if n.startswith(prefix + "lang_self_att")][0]
        visn_self = [m for n, m in maps if n.startswith(prefix + "visn_self_att")][0]
        bt = bar(R_tt) if normalize else R_tt
        bi = bar(R_ii) if normalize else R_ii
        d_ti = bt.T @ a_ti @ bi if self_in_rule_10 else a_ti
        d_tt = a_ti @ R_it
        if k < X - 1:
            d_it = bi.T @ a_it @ bt if self_in_rule_10 else a_it
            d_ii = a_it @ R_ti
            R_it, R_ii = R_it + d_it, R_ii + d_ii
        R_ti, R_tt = R_ti + d_ti, R_tt + d_tt
        R_tt, R_ti = R_tt + lang_self @ R_tt, R_ti + lang_self @ R_ti
        if k < X - 1:
            R_ii, R_it = R_ii + visn_self @ R_ii, R_it + visn_self @ R_it
    R_tt = R_tt.clone()
    R_tt[0, 0] = 0  # step 5
    return R_tt[0], R_ti[0]


@pytest.mark.parametrize("ablation", [{}, {"normalize": False}, {"self_in_rule_10": False}])
def test_equals_the_published_generator_per_sample_in_a_padded_batch(ablation):
    model = tiny_lxmert()
    inputs = batch()
    got = explain(model, inputs, "generic_attribution", **ablation)
    assert isinstance(got, StreamMaps) and got.text.shape == (B, T) and got.image.shape == (B, I)
    for b in range(B):
        one = sample(inputs, b)
        want_text, want_image = published_generator(model, one, **ablation)
        n, k = want_text.shape[0], want_image.shape[0]
        torch.testing.assert_close(got.text[b, :n], want_text, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(got.image[b, :k], want_image, atol=1e-10, rtol=1e-9)
        assert not got.text[b, n:].any() and not got.image[b, k:].any()  # padding gets 0
        assert got.text[b, 0] == 0  # R_tt[0, 0] = 0


@pytest.mark.parametrize("method", ["generic_attribution", "rollout", "attn_last_layer", "attn_gradcam"])
def test_every_method_batch_of_3_equals_3_singles_and_model_unchanged(method):
    model = tiny_lxmert()
    inputs = batch()
    before = _snapshot(model)
    with torch.no_grad():
        before_out = model(**inputs).question_answering_score
    got = explain(model, inputs, method)
    _assert_unchanged(before, _snapshot(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).question_answering_score, before_out, atol=0, rtol=0)
    assert torch.isfinite(got.text).all() and torch.isfinite(got.image).all()
    for b in range(B):
        one = explain(model, sample(inputs, b), method)
        n, k = one.text.shape[1], one.image.shape[1]
        torch.testing.assert_close(got.text[b:b + 1, :n], one.text, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(got.image[b:b + 1, :k], one.image, atol=1e-10, rtol=1e-9)


def _last_x_layer_maps(model, inputs):
    """Own capture of the last x-layer's language-query cross attention and lang_self_att (batch 1)."""
    records = {}
    X = len(model.lxmert.encoder.x_layers)
    layer = model.lxmert.encoder.x_layers[X - 1]
    hooks = [layer.visual_attention.att.dropout.register_forward_hook(
        lambda m, a, out: records.setdefault("cross", out)),  # first call: language queries
        layer.lang_self_att.self.dropout.register_forward_hook(lambda m, a, out: records.setdefault("self", out))]
    try:
        out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    logits = out.question_answering_score
    g_cross, g_self = torch.autograd.grad(logits[0, int(logits.argmax())], [records["cross"], records["self"]])
    return records["cross"].detach(), g_cross, records["self"].detach(), g_self


def test_raw_attention_and_gradcam_baselines_as_published():
    model = tiny_lxmert()
    one = sample(batch(), 1)
    a_ti, g_ti, a_tt, g_tt = _last_x_layer_maps(model, one)
    raw = explain(model, one, "attn_last_layer")
    want_tt = a_tt.mean(dim=1)[0, 0].clone()
    want_tt[0] = 0
    torch.testing.assert_close(raw.text[0], want_tt)
    torch.testing.assert_close(raw.image[0], a_ti.mean(dim=1)[0, 0])
    cam = explain(model, one, "attn_gradcam")

    def gradcam(a, g):  # w_h = mean of G_h over the map; clamp after the head mean
        w = g.mean(dim=(2, 3), keepdim=True)
        return (w * a).mean(dim=1).clamp(min=0)[0]

    want_tt = gradcam(a_tt, g_tt)[0].clone()
    want_tt[0] = 0
    torch.testing.assert_close(cam.text[0], want_tt, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(cam.image[0], gradcam(a_ti, g_ti)[0], atol=1e-12, rtol=1e-9)


def test_explains_the_chosen_answer_and_refuses_unknown_options():
    model = tiny_lxmert()
    inputs = batch()
    a = explain(model, inputs, "generic_attribution", index=0)
    b = explain(model, inputs, "generic_attribution", index=[1, 2, 3])
    assert not torch.allclose(a.image, b.image)
    with pytest.raises(ValueError, match="takes no option"):
        explain(model, inputs, "rollout", normalize=False)
    with pytest.raises(ValueError, match="start_layer does not apply"):
        explain(model, inputs, "generic_attribution", start_layer=1)
