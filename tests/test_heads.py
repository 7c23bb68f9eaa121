"""Token-level and regression heads of the text families (issue 26, item 4).

``*ForTokenClassification``: the logit of class c (``index=``) at token t
(``inputs["position"]``, counted over the sample's real tokens), row t of
the text stream, t's own column kept.  ``num_labels=1`` (regression) heads:
the output itself.  For every family, in float64: finite maps of shape
(B, N) for every method, padding 0, a right-padded batch equal to each
sample alone, the model exactly as found.  The independent check: on BERT
and GPT-2 token heads the attention methods equal the same formulas
computed here from attention probabilities and gradients recorded by the
test's own hooks for that one logit (METHODS.md sections 2-3).
"""
import pytest
import torch
import transformers as tf

from modules.adapters import InputsError
from modules.explain import explain, explain_trace
from modules.methods import METHOD_NAMES
from tests.test_engine_coverage import SEQ, TOL64, VOCAB, _hf, _llama_like, _text, text_batch
from tests.test_generic import _assert_unchanged, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread, much faster under load
B = 3
POSITIONS = [6, 2, 1]  # token t per sample of text_batch()'s lengths (8, 5, 3)
_DISTIL = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32)
_GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, pad_token_id=0)
_MODERNBERT = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
# family -> (config class, config kwargs without num_labels)
FAMILIES = {
    "Bert": (tf.BertConfig, _text()),
    "Roberta": (tf.RobertaConfig, _text(pad_token_id=1)),
    "XLMRoberta": (tf.XLMRobertaConfig, _text(pad_token_id=1)),
    "DistilBert": (tf.DistilBertConfig, _DISTIL),
    "Albert": (tf.AlbertConfig, _text(embedding_size=16)),
    "Electra": (tf.ElectraConfig, _text(embedding_size=16)),
    "DebertaV2": (tf.DebertaV2Config, _text()),
    "ModernBert": (tf.ModernBertConfig, _text(**_MODERNBERT)),
    "GPT2": (tf.GPT2Config, _GPT2),
    "Llama": (tf.LlamaConfig, _llama_like()),
    "Qwen2": (tf.Qwen2Config, _llama_like()),
}


def build(family, head="TokenClassification", labels=3):
    cfg_cls, kw = FAMILIES[family]
    kw = {k: v for k, v in kw.items() if k != "num_labels"}
    return _hf(getattr(tf, f"{family}For{head}"), cfg_cls, num_labels=labels, **kw).double()


def batch_for(model):
    return text_batch(pad=getattr(model.config, "pad_token_id", 0) or 0)


def _sample(batch, i, position=None):
    n = int(batch["attention_mask"][i].sum())
    one = {k: v[i:i + 1, :n] for k, v in batch.items()}
    if position is not None:
        one["position"] = position
    return one


def _check_every_method(model, batch, positions=None):
    """Every method: (B, N) finite maps, padding 0, batch == singles, model unchanged; returns the maps."""
    real = batch["attention_mask"].bool()
    inputs = dict(batch, position=positions) if positions is not None else batch
    before = _snapshot(model)
    out = {}
    for method in METHOD_NAMES:
        got = out[method] = explain(model, inputs, method)
        assert got.shape == (B, SEQ) and torch.isfinite(got).all() and not got.requires_grad, method
        assert bool((got[~real] == 0).all()), method
        for i in range(B):
            one = explain(model, _sample(batch, i, None if positions is None else positions[i]), method)
            # full LRP: rounding of a batch amplified by near-zero denominators (tests/test_lrp_scope.py,
            # FULL_LRP_ATOL: 1e-6 of the largest value); every other method at the float64 tolerance
            tol = dict(atol=1e-6 * float(one.abs().max()), rtol=0) if method == "lrp" else TOL64
            torch.testing.assert_close(got[i:i + 1, :one.shape[1]], one, **tol, msg=method)
    _assert_unchanged(before, _snapshot(model))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_classification_every_method(family):
    model = build(family)
    batch = batch_for(model)
    exp = explain_trace(model, dict(batch, position=POSITIONS), "generic_attribution", index=[2, 0, 1])
    with torch.no_grad():
        logits = model(**batch).logits
    # the explained value is the logit of class index[b] at token t_b
    want = logits[torch.arange(B), torch.tensor(POSITIONS), torch.tensor([2, 0, 1])]
    torch.testing.assert_close(exp.score, want, atol=1e-12, rtol=1e-10)
    assert exp.trace.streams["text"].readout.weights.argmax(dim=1).tolist() == POSITIONS
    _check_every_method(model, batch, POSITIONS)


@pytest.mark.parametrize("family", ["Bert", "DistilBert", "ModernBert", "GPT2", "Llama"])
def test_regression_head_explains_its_output(family):
    model = build(family, head="SequenceClassification", labels=1)
    batch = batch_for(model)
    exp = explain_trace(model, batch, "generic_attribution")
    with torch.no_grad():
        out = model(**batch).logits
    assert out.shape == (B, 1)
    torch.testing.assert_close(exp.score, out[:, 0], atol=1e-12, rtol=1e-10)
    assert exp.target.tolist() == [0, 0, 0]
    maps = _check_every_method(model, batch)
    # a regression output is explained as it is, whatever its sign (no class to pick)
    flipped = build(family, head="SequenceClassification", labels=1)
    with torch.no_grad():
        flipped.score.weight.neg_() if hasattr(flipped, "score") else flipped.classifier.weight.neg_()
        for name in ("score", "classifier"):
            bias = getattr(getattr(flipped, name, None), "bias", None)
            if bias is not None:
                bias.neg_()
    torch.testing.assert_close(explain_trace(flipped, batch, "generic_attribution").score, -out[:, 0],
                               atol=1e-12, rtol=1e-10)
    assert maps["rollout"].shape == (B, SEQ)


def test_token_regression_head():
    model = build("Bert", labels=1)
    batch = batch_for(model)
    exp = explain_trace(model, dict(batch, position=POSITIONS), "attn_gradcam")
    with torch.no_grad():
        out = model(**batch).logits[..., 0]
    torch.testing.assert_close(exp.score, out[torch.arange(B), torch.tensor(POSITIONS)], atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------
# Independent check: the formulas from the test's own recording
# --------------------------------------------------------------------------
def _own_recording(model, batch, attention_class, positions, classes):
    """Attention probabilities (eager) recorded by hooks of the test's own, and
    the gradients of sum_b logits[b, t_b, c_b] with respect to them."""
    probs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: probs.append(out[1]))
             for m in model.modules() if type(m).__name__ == attention_class]
    model.set_attn_implementation("eager")
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            logits = model(**batch).logits
            score = logits[torch.arange(B), torch.tensor(positions), torch.tensor(classes)].sum()
            grads = torch.autograd.grad(score, probs)
    finally:
        for h in hooks:
            h.remove()
    return [p.detach() for p in probs], [g.detach() for g in grads]


def _masked_minmax(x, mask):
    lo = x.masked_fill(~mask, float("inf")).flatten(1).amin(1)[:, None, None]
    hi = x.masked_fill(~mask, float("-inf")).flatten(1).amax(1)[:, None, None]
    return torch.where(hi > lo, (x - lo) / (hi - lo), torch.zeros_like(x)).masked_fill(~mask, 0)


@pytest.mark.parametrize("family, attention_class", [("Bert", "BertSelfAttention"), ("GPT2", "GPT2Attention")])
def test_token_head_equals_the_formulas_on_own_recording(family, attention_class):
    model = build(family)
    batch = batch_for(model)
    classes = [1, 2, 0]
    A, G = _own_recording(build(family), batch, attention_class, POSITIONS, classes)
    assert len(A) == 2 and A[0].shape == (B, 4, SEQ, SEQ)
    real = batch["attention_mask"].bool()
    rows = torch.tensor(POSITIONS)
    eye = torch.eye(SEQ, dtype=torch.float64).expand(B, SEQ, SEQ)
    pick = lambda M: M[torch.arange(B), rows] * real  # row t_b, padding 0  # noqa: E731
    # generic attribution: R = I; R <- R + mean_h max(G * A, 0) R (ICCV 2021 Eqs. 5-7)
    R = eye.clone()
    for a, g in zip(A, G):
        R = R + (g * a).clamp(min=0).mean(dim=1) @ R
    # rollout: the product of row-normalised (I + mean_h A), first layer innermost
    M = eye.clone()
    for a in A:
        step = eye + a.mean(dim=1)
        M = (step / step.sum(-1, keepdim=True)) @ M
    # GradCAM, the published text conventions: w_h = mean of G_h over the real pairs,
    # max(mean_h w_h A_h, 0) min-max over the real pairs, then row t
    pair = real[:, None, :, None] & real[:, None, None, :]
    w = (G[-1] * pair).sum(dim=(2, 3), keepdim=True) / pair.flatten(1).sum(1).reshape(-1, 1, 1, 1)
    gradcam = _masked_minmax((w * A[-1]).mean(dim=1).clamp(min=0), pair[:, 0])
    want = {"generic_attribution": pick(R), "rollout": pick(M), "attn_gradcam": pick(gradcam),
            "attn_last_layer": pick(A[-1].clamp(min=0).mean(dim=1))}
    before = _snapshot(model)
    for method, expected in want.items():
        got = explain(model, dict(batch, position=POSITIONS), method, index=classes)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-9, msg=method)
    _assert_unchanged(before, _snapshot(model))


# --------------------------------------------------------------------------
# One-line refusals
# --------------------------------------------------------------------------
def test_position_is_required_for_token_heads_and_refused_elsewhere():
    token, seq = build("Bert"), build("Bert", head="SequenceClassification")
    batch = batch_for(token)
    cases = [(token, batch, "pass inputs\\['position'\\]"),
             (token, dict(batch, position=[0, 5, 1]), "outside the samples' real tokens"),
             (token, dict(batch, position=1.5), "not a whole number"),
             (seq, dict(batch, position=0), "position applies to token-classification heads")]
    for model, inputs, msg in cases:
        with pytest.raises(InputsError, match=msg) as err:
            explain(model, inputs, "rollout")
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="out of range"):
        explain(token, dict(batch, position=0), "rollout", index=3)
