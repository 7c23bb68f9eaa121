"""The generic path for Hugging Face classifiers no adapter names (issue 26, item 1).

Tiny random configs of families without an adapter (Data2VecVision, MPNet,
LayoutLM, BigBird in full attention, CamemBERT, ERNIE, Data2VecText,
XLM-RoBERTa-XL, RoFormer, Megatron-BERT, an MPNet token head): the generic
adapters take them; finite maps of the documented shape, a padded batch
equal to each sample alone (float64), the model exactly as found.  Where a
dedicated adapter also applies (BERT, GPT-2, ViT, BEiT) the generic path,
forced by hiding the class from the dedicated adapter, gives the same maps
for every method.  What it cannot read is refused in one line.
"""
import pytest
import torch
import transformers as tf

from modules.adapters import adapter_for, hf_models
from modules.attention_capture import UnsupportedModelError
from modules.explain import explain
from modules.methods import ATTENTION_METHODS, METHOD_NAMES
from tests.test_engine_coverage import (B, GRID, IMAGE_FAMILIES, SEQ, TEXT_FAMILIES, TOL64, VOCAB, _hf, _text,
                                        _vision, images, text_batch)
from tests.test_generic import _assert_unchanged, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (builder, every method here (True) or the attention methods here and the LRP ones in
# tests/test_lrp_scope_inplace.py (False): their forwards write in place or use reshape_as)
FAMILIES = {
    "data2vec_vision_mean": (lambda: _hf(tf.Data2VecVisionForImageClassification, tf.Data2VecVisionConfig,
                                         **_vision(use_mean_pooling=True, attn_implementation="eager")), True),
    "data2vec_vision_cls": (lambda: _hf(tf.Data2VecVisionForImageClassification, tf.Data2VecVisionConfig,
                                        **_vision(use_mean_pooling=False, attn_implementation="eager")), True),
    "layoutlm": (lambda: _hf(tf.LayoutLMForSequenceClassification, tf.LayoutLMConfig, **_text()), True),
    "camembert": (lambda: _hf(tf.CamembertForSequenceClassification, tf.CamembertConfig, **_text(pad_token_id=1)),
                  True),
    "ernie": (lambda: _hf(tf.ErnieForSequenceClassification, tf.ErnieConfig, **_text()), True),
    "data2vec_text": (lambda: _hf(tf.Data2VecTextForSequenceClassification, tf.Data2VecTextConfig,
                                  **_text(pad_token_id=1)), True),
    "xlm_roberta_xl": (lambda: _hf(tf.XLMRobertaXLForSequenceClassification, tf.XLMRobertaXLConfig,
                                   **_text(pad_token_id=1)), True),
    "roformer": (lambda: _hf(tf.RoFormerForSequenceClassification, tf.RoFormerConfig, **_text(embedding_size=32)),
                 False),
    "megatron_bert": (lambda: _hf(tf.MegatronBertForSequenceClassification, tf.MegatronBertConfig, **_text()),
                      False),
    "mpnet": (lambda: _hf(tf.MPNetForSequenceClassification, tf.MPNetConfig, **_text(pad_token_id=1)), False),
    "bigbird_full": (lambda: _hf(tf.BigBirdForSequenceClassification, tf.BigBirdConfig,
                                 **_text(attention_type="original_full", pad_token_id=0)), False),
    "mpnet_token": (lambda: _hf(tf.MPNetForTokenClassification, tf.MPNetConfig, **_text(pad_token_id=1)), False),
}
POSITIONS = [6, 2, 1]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generic_path_family(name):
    builder, every = FAMILIES[name]
    model = builder().double()
    assert "generic path" in adapter_for(model).family
    image = name.startswith("data2vec_vision")
    if image:
        x = images()
        sample = lambda i: x[i:i + 1]  # noqa: E731
    else:
        x = text_batch(pad=getattr(model.config, "pad_token_id", 0) or 0)
        lengths = x["attention_mask"].sum(1).tolist()
        if name.endswith("token"):
            x = dict(x, position=POSITIONS)

        def sample(i):
            one = {k: v[i:i + 1, :lengths[i]] for k, v in x.items() if k != "position"}
            return dict(one, position=POSITIONS[i]) if "position" in x else one
    before = _snapshot(model)
    for method in METHOD_NAMES if every else ATTENTION_METHODS:
        got = explain(model, x, method)
        side = 32 if method in ("lrp", "attnlrp", "cplrp") else GRID
        assert got.shape == ((B, side, side) if image else (B, SEQ)), method
        assert torch.isfinite(got).all(), method
        if not image:
            assert bool((got[x["attention_mask"] == 0] == 0).all()), method
        for i in range(B):
            one = explain(model, sample(i), method)
            tol = dict(atol=1e-6 * float(one.abs().max()), rtol=0) if method == "lrp" else TOL64
            torch.testing.assert_close(got[i:i + 1, ..., :one.shape[-1]], one, **tol, msg=method)
    _assert_unchanged(before, _snapshot(model))


@pytest.mark.parametrize("name, table, key", [
    ("hf_bert", "TEXT_CLASSES", "BertForSequenceClassification"),
    ("hf_gpt2", "TEXT_CLASSES", "GPT2ForSequenceClassification"),
    ("hf_vit", "IMAGE_CLASSES", "ViTForImageClassification"),
    ("hf_beit", "IMAGE_CLASSES", "BeitForImageClassification"),
])
def test_generic_path_equals_the_dedicated_adapter(name, table, key, monkeypatch):
    image = name in IMAGE_FAMILIES
    model = (IMAGE_FAMILIES if image else TEXT_FAMILIES)[name]().double()
    x = images() if image else text_batch(pad=getattr(model.config, "pad_token_id", 0) or 0)
    assert "generic" not in adapter_for(model).family
    want = {m: explain(model, x, m) for m in METHOD_NAMES}
    monkeypatch.delitem(getattr(hf_models, table), key)  # the dedicated adapter no longer names it
    assert "generic path" in adapter_for(model).family
    for method in METHOD_NAMES:
        torch.testing.assert_close(explain(model, x, method), want[method], atol=1e-12, rtol=1e-10, msg=method)


def test_what_it_cannot_read_is_refused_in_one_line(monkeypatch):
    # DINOv2's head reads [CLS] and the mean of the patches: several tokens, no mean pooling in its config
    model = IMAGE_FAMILIES["hf_dinov2"]().double()
    monkeypatch.delitem(hf_models.IMAGE_CLASSES, "Dinov2ForImageClassification")
    with pytest.raises(UnsupportedModelError, match="cannot tell which token the head reads") as err:
        explain(model, images(), "rollout")
    assert "\n" not in str(err.value)
    # an SDPA-only attention class returns no probabilities: the message says to load it eager
    sdpa = _hf(tf.Data2VecVisionForImageClassification, tf.Data2VecVisionConfig, **_vision(attn_implementation="sdpa"))
    with pytest.raises(RuntimeError, match="eager attention") as err:
        explain(sdpa.double(), images(), "rollout")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------
# The escape hatch: readout=
# --------------------------------------------------------------------------
def test_readout_given_equals_the_readout_found():
    mpnet = FAMILIES["mpnet"][0]().double()
    x = text_batch(pad=1)
    d2v = FAMILIES["data2vec_vision_mean"][0]().double()
    for method in ATTENTION_METHODS:
        torch.testing.assert_close(explain(mpnet, x, method, readout=0), explain(mpnet, x, method), atol=0, rtol=0)
        torch.testing.assert_close(explain(d2v, images(), method, readout="mean"), explain(d2v, images(), method),
                                   atol=0, rtol=0)
    # a row other than [CLS] (counted over each sample's real tokens) is that row, without the [CLS] conventions
    got = explain(mpnet, x, "attn_last_layer", readout=[2, 1, 0])
    assert not torch.allclose(got, explain(mpnet, x, "attn_last_layer"))


def test_readout_lets_a_head_the_path_cannot_read_be_explained(monkeypatch):
    model = IMAGE_FAMILIES["hf_dinov2"]().double()
    monkeypatch.delitem(hf_models.IMAGE_CLASSES, "Dinov2ForImageClassification")
    got = explain(model, images(), "generic_attribution", readout=0)  # the user says: the [CLS] row
    assert got.shape == (B, GRID, GRID) and torch.isfinite(got).all()
    gpt2 = TEXT_FAMILIES["hf_gpt2"]().double()
    x = text_batch()
    want = explain(gpt2, x, "generic_attribution")  # the dedicated adapter: the last real token
    monkeypatch.delitem(hf_models.TEXT_CLASSES, "GPT2ForSequenceClassification")
    last = (x["attention_mask"].sum(1) - 1).tolist()
    torch.testing.assert_close(explain(gpt2, x, "generic_attribution", readout=last), want, atol=1e-12, rtol=1e-10)


def test_readout_refusals_are_one_line():
    bert = TEXT_FAMILIES["hf_bert"]().double()
    mpnet = FAMILIES["mpnet"][0]().double()
    token = FAMILIES["mpnet_token"][0]().double()
    x = text_batch(pad=1)
    cases = [(bert, text_batch(), 0, "applies to the generic path"), (mpnet, x, "max", "a token index"),
             (mpnet, x, [9, 0, 0], "outside the samples' real tokens"),
             (token, dict(x, position=0), 0, "reads token inputs\\['position'\\]")]
    for model, inputs, readout, msg in cases:
        with pytest.raises(ValueError, match=msg) as err:
            explain(model, inputs, "rollout", readout=readout)
        assert "\n" not in str(err.value)
