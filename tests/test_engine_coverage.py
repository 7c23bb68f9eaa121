"""The one engine on every supported family of unmodified models (issue 10).

For each family: finite maps of the documented shape for every attention
method, a batch of 3 equal to 3 singles (padding included for text), the
model exactly as found afterwards.  Against the copies: timm ViT and our ViT
copy, Hugging Face BERT and our BERT copy, holding the same weights, give
the same maps for every attention method.  The pooled read-outs of
METHODS.md section 8 (mean pooling, attention pooling) are re-derived with
dense matrices.

Every comparison runs in float64 (models ``.double()``, images float64):
both sides are then exact to ~1e-12 and agree to 1e-9 on any CPU, where in
float32 the copy-vs-timm maps alone differ by ~1e-5 after min-max between
CPUs (issue 20).
"""
import pytest
import timm
import torch
import transformers as tf
from timm.models.beit import Beit
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from baselines.ViT.ViT_LRP import from_timm
from BERT_explainability.modules.BERT import BertForSequenceClassification as bert_copy
from modules.adapters import UnsupportedMethodError, supported_models
from modules.aggregation import minmax_normalize
from modules.attention_capture import UnsupportedModelError
from modules.explain import StreamMaps, explain, explain_trace
from modules.methods import ATTENTION_METHODS, METHOD_NAMES
from tests.test_generic import _assert_unchanged, _randomize, _snapshot

tf.logging.set_verbosity_error()
B, IMG, PATCH, VOCAB, SEQ = 3, 32, 8, 60, 8
GRID = IMG // PATCH
V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _timm(cls, **kw):
    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    return _randomize(cls(**args))


def _hf(model_cls, cfg_cls, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(**kw)
    return _randomize(model_cls(cfg))


def _vision(**kw):
    return dict(image_size=IMG, patch_size=PATCH, num_labels=5, **V, **kw)


def _text(**kw):
    out = dict(vocab_size=VOCAB, max_position_embeddings=32, num_labels=3, **V)
    out.update(kw)
    return out


def _llama_like(**kw):
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, num_labels=3, pad_token_id=0, **kw)


IMAGE_FAMILIES = {
    "timm_vit_token": lambda: _timm(VisionTransformer),
    "timm_vit_avg_no_cls": lambda: _timm(VisionTransformer, global_pool="avg", class_token=False, fc_norm=False),
    "timm_vit_map": lambda: _timm(VisionTransformer, global_pool="map"),
    "timm_vit_registers": lambda: _timm(VisionTransformer, reg_tokens=2),
    "timm_vit_registers_avg": lambda: _timm(VisionTransformer, reg_tokens=1, global_pool="avg"),
    "timm_deit3": lambda: _timm(VisionTransformer, init_values=1e-1, no_embed_class=True),
    "timm_deit_distilled": lambda: _timm(VisionTransformerDistilled),
    "timm_eva": lambda: _timm(Eva, use_rot_pos_emb=True, ref_feat_shape=(GRID, GRID), swiglu_mlp=True),
    "timm_beit": lambda: _timm(Beit, use_abs_pos_emb=False, use_rel_pos_bias=True),
    "hf_vit": lambda: _hf(tf.ViTForImageClassification, tf.ViTConfig, **_vision()),
    "hf_deit": lambda: _hf(tf.DeiTForImageClassification, tf.DeiTConfig, **_vision()),
    "hf_deit_teacher": lambda: _hf(tf.DeiTForImageClassificationWithTeacher, tf.DeiTConfig, **_vision()),
    "hf_dinov2": lambda: _hf(tf.Dinov2ForImageClassification, tf.Dinov2Config, **_vision()),
    "hf_dinov2_registers": lambda: _hf(tf.Dinov2WithRegistersForImageClassification, tf.Dinov2WithRegistersConfig,
                                       **_vision(num_register_tokens=2)),
    "hf_beit": lambda: _hf(tf.BeitForImageClassification, tf.BeitConfig, **_vision(use_mean_pooling=True)),
}

TEXT_FAMILIES = {
    "hf_bert": lambda: _hf(tf.BertForSequenceClassification, tf.BertConfig, **_text()),
    "hf_roberta": lambda: _hf(tf.RobertaForSequenceClassification, tf.RobertaConfig, **_text(pad_token_id=1)),
    "hf_xlm_roberta": lambda: _hf(tf.XLMRobertaForSequenceClassification, tf.XLMRobertaConfig,
                                  **_text(pad_token_id=1)),
    "hf_distilbert": lambda: _hf(tf.DistilBertForSequenceClassification, tf.DistilBertConfig, vocab_size=VOCAB,
                                 dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32,
                                 num_labels=3),
    "hf_albert": lambda: _hf(tf.AlbertForSequenceClassification, tf.AlbertConfig, **_text(embedding_size=16)),
    "hf_electra": lambda: _hf(tf.ElectraForSequenceClassification, tf.ElectraConfig, **_text(embedding_size=16)),
    "hf_deberta_v2": lambda: _hf(tf.DebertaV2ForSequenceClassification, tf.DebertaV2Config, **_text()),
    "hf_modernbert": lambda: _hf(tf.ModernBertForSequenceClassification, tf.ModernBertConfig,
                                 **_text(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                         sep_token_id=2, global_attn_every_n_layers=2, local_attention=4)),
    "hf_modernbert_mean": lambda: _hf(tf.ModernBertForSequenceClassification, tf.ModernBertConfig,
                                      **_text(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                              sep_token_id=2, classifier_pooling="mean")),
    "hf_gpt2": lambda: _hf(tf.GPT2ForSequenceClassification, tf.GPT2Config, vocab_size=VOCAB, n_embd=32, n_layer=2,
                           n_head=4, n_positions=32, num_labels=3, pad_token_id=0),
    "hf_llama": lambda: _hf(tf.LlamaForSequenceClassification, tf.LlamaConfig, **_llama_like()),
    "hf_qwen2": lambda: _hf(tf.Qwen2ForSequenceClassification, tf.Qwen2Config, **_llama_like()),
}


def images(n=B, seed=1, dtype=torch.float64):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed)).to(dtype)


def text_batch(seed=2, pad=0, lengths=(SEQ, 5, 3)):
    """Right-padded ids (first token 3, then ids >= 4), real lengths ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), SEQ), pad)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        ids[b, 0] = 3
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _plain(model, inputs):
    with torch.no_grad():
        out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# Every family in float64.  Hugging Face's eager attention asks for a float32
# softmax even in float64 models (ModernBERT, Llama, Qwen2, ViT, CLIP, ...);
# conftest's autouse ``float64_softmax`` keeps it float64, without which batch
# and singles differed by float32 rounding (up to 3.5e-4, ModernBERT) and
# ModernBERT's padded rows went NaN.
TOL64 = dict(atol=1e-10, rtol=1e-9)


def test_float64_softmax_fixture_keeps_float64_and_leaves_float32_alone():
    x = torch.tensor([[0.0, 1e-9, -1.8e308]], dtype=torch.float64)  # a float64 mask value, a float32-invisible gap
    got = torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32)
    assert got.dtype == torch.float64 and got[0, 1] > got[0, 0] and got[0, 2] == 0
    torch.testing.assert_close(got, torch.softmax(x, -1), atol=0, rtol=0)
    x32 = x.clamp(min=-3e38).float()
    assert torch.equal(torch.nn.functional.softmax(x32, dim=-1, dtype=torch.float32), torch.softmax(x32, -1))


def _check_family(model, inputs, sample, shape, tol=TOL64):
    before_out = _plain(model, inputs)
    before = _snapshot(model)
    for method in ATTENTION_METHODS:
        got = explain(model, inputs, method)
        assert got.shape == shape, method
        assert torch.isfinite(got).all() and not got.requires_grad, method
        if method in ("rollout", "attn_last_layer"):
            continue  # the same recording without gradients: batch invariance shown by the other two
        for i in range(B):
            one = explain(model, sample(i), method)
            width = one.shape[-1]
            torch.testing.assert_close(got[i:i + 1, ..., :width], one, **tol, msg=method)
    _assert_unchanged(before, _snapshot(model))
    torch.testing.assert_close(_plain(model, inputs), before_out, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(IMAGE_FAMILIES))
def test_image_family(name):
    model, x = IMAGE_FAMILIES[name]().double(), images()
    _check_family(model, x, lambda i: x[i:i + 1], (B, GRID, GRID))


@pytest.mark.parametrize("name", list(TEXT_FAMILIES))
def test_text_family_with_padding(name):
    model = TEXT_FAMILIES[name]().double()
    pad = getattr(model.config, "pad_token_id", 0) or 0
    batch = text_batch(pad=pad)
    lengths = batch["attention_mask"].sum(dim=1).tolist()

    def sample(i):
        return {k: v[i:i + 1, :lengths[i]] for k, v in batch.items()}

    _check_family(model, batch, sample, (B, SEQ))
    for method in ATTENTION_METHODS:  # padding gets exactly 0
        got = explain(model, batch, method)
        assert torch.equal(got[2, lengths[2]:], torch.zeros(SEQ - lengths[2])), method


def _clip():
    text = dict(vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2,
                pad_token_id=0, **V)
    return _randomize(tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=dict(image_size=IMG, patch_size=PATCH,
                                                                                       **V), projection_dim=16)), std=0.2)


def _siglip():
    cfg = tf.SiglipConfig(text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **V),
                          vision_config=dict(image_size=IMG, patch_size=PATCH, **V))
    return _randomize(tf.SiglipModel(cfg), std=0.2)


@pytest.mark.parametrize("builder", [_clip, _siglip], ids=["clip", "siglip"])
def test_image_text_families(builder):
    model = builder().double()
    ids = torch.randint(3, VOCAB - 2, (B, SEQ), generator=torch.Generator().manual_seed(5))
    ids[:, -1] = VOCAB - 1  # EOS last (SigLIP pads to max length and reads the last token)
    inputs = {"input_ids": ids, "pixel_values": images()}
    before = _snapshot(model)
    for method in ATTENTION_METHODS:
        got = explain(model, inputs, method)
        assert isinstance(got, StreamMaps)
        assert got.image.shape == (B, GRID, GRID) and got.text.shape == (B, SEQ)
        assert torch.isfinite(got.image).all() and torch.isfinite(got.text).all()
        for i in range(B):
            one = explain(model, {k: v[i:i + 1] for k, v in inputs.items()}, method)
            torch.testing.assert_close(got.image[i:i + 1], one.image, atol=1e-10, rtol=1e-9)
            torch.testing.assert_close(got.text[i:i + 1], one.text, atol=1e-10, rtol=1e-9)
    _assert_unchanged(before, _snapshot(model))
    with pytest.raises(ValueError, match="not a whole number"):
        explain(model, inputs, index=1.5)


# --------------------------------------------------------------------------
# Equality with the copies (same weights)
# --------------------------------------------------------------------------
def _close_after_minmax(got, want):
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(minmax_normalize(got.flatten(1)), minmax_normalize(want.flatten(1)), atol=1e-9,
                               rtol=0)


@pytest.mark.parametrize("distilled", [False, True])
def test_timm_vit_equals_copy_for_every_attention_method(distilled):
    model = _timm(VisionTransformerDistilled if distilled else VisionTransformer, depth=3).double()
    ours = from_timm(model)
    assert all(p.dtype == torch.float64 for p in ours.parameters())  # the copy keeps the model's dtype
    x = images()
    for method in ATTENTION_METHODS:
        for start in (0, 1):
            for index in (None, [4, 0, 2]):
                _close_after_minmax(explain(model, x, method, index=index, start_layer=start),
                                    explain(ours, x, method, index=index, start_layer=start))


def test_hf_bert_equals_copy_for_every_attention_method():
    model = TEXT_FAMILIES["hf_bert"]().double()
    ours = bert_copy.BertForSequenceClassification(model.config)
    ours.load_state_dict(bert_copy.convert_hf_state_dict(model.state_dict()), strict=True)
    ours.eval().double()
    batch = text_batch()
    for method in ATTENTION_METHODS:
        for start in (None, 1):
            for index in (None, [1, 2, 0]):
                _close_after_minmax(explain(model, batch, method, index=index, start_layer=start),
                                    explain(ours, batch, method, index=index, start_layer=start))


# --------------------------------------------------------------------------
# Pooled read-outs (METHODS.md section 8) against dense re-derivations
# --------------------------------------------------------------------------
def _dense_R(calls, start=0):
    B, N = calls[0].probs.shape[0], calls[0].probs.shape[-1]
    R = torch.eye(N, dtype=calls[0].probs.dtype).expand(B, N, N).clone()
    for c in calls[start:]:
        abar = (c.grad * c.probs).clamp(min=0).mean(dim=1)
        R = R + abar @ R
    return R


def test_mean_pooling_reads_the_mean_of_the_pooled_rows():
    model = IMAGE_FAMILIES["timm_vit_registers_avg"]().double()
    exp = explain_trace(model, images(), "generic_attribution")
    stream = exp.trace.streams["image"]
    R = _dense_R(stream.calls)
    prefix = model.num_prefix_tokens
    want = R[:, prefix:, prefix:].mean(dim=1)  # mean of the patch rows, patch columns
    torch.testing.assert_close(exp.maps.flatten(1), want, atol=1e-12, rtol=1e-9)


def test_attention_pooling_is_a_cross_attention_from_a_one_token_stream():
    model = IMAGE_FAMILIES["timm_vit_map"]().double()
    exp = explain_trace(model, images(), "generic_attribution")
    stream = exp.trace.streams["image"]
    R = _dense_R(stream.calls)
    N = R.shape[-1]
    eye = torch.eye(N, dtype=R.dtype)
    Rhat = R - eye
    Rbar = torch.nan_to_num(Rhat / Rhat.sum(dim=-1, keepdim=True), nan=0.0) + eye  # Eqs. 8-9
    pool = [op for op in stream.ops if not op.is_self][0]
    abar = (pool.grad * pool.probs).clamp(min=0).mean(dim=1)[:, 0]  # (B, N - prefix): keys skip the prefix
    abar = torch.nn.functional.pad(abar, (model.num_prefix_tokens, 0))
    r = torch.einsum("bn,bnm->bm", abar, Rbar)  # Eq. 10 with Rbar of the one-token stream = 1
    torch.testing.assert_close(exp.maps.flatten(1), r[:, model.num_prefix_tokens:], atol=1e-12, rtol=1e-9)


def test_last_token_pooling_reads_the_models_own_position():
    model = TEXT_FAMILIES["hf_gpt2"]().double()
    batch = text_batch(lengths=(SEQ, 5, 3))
    exp = explain_trace(model, batch, "attn_last_layer")
    rows = exp.trace.streams["text"].readout.weights.argmax(dim=1)
    assert rows.tolist() == [SEQ - 1, 4, 2]
    last = exp.trace.streams["text"].calls[-1].probs.mean(dim=1)
    for b, row in enumerate(rows.tolist()):
        torch.testing.assert_close(exp.maps[b], last[b, row].clamp(min=0))


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_lrp_method_on_a_family_the_scope_does_not_cover_names_who_offers_it():
    """Generation models have no LRP read-out yet: a one-line refusal naming
    the families that run the method (the copies and the scope's)."""
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    for method in sorted(set(METHOD_NAMES) - set(ATTENTION_METHODS)):
        with pytest.raises(UnsupportedMethodError, match=r"BERT LRP copy.*ViT/DeiT LRP copy.*timm ViT family") as err:
            explain(model, {}, method)
        assert "\n" not in str(err.value)


def test_unsupported_model_names_what_is_supported():
    with pytest.raises(UnsupportedModelError, match="unsupported model Linear; supported: ") as err:
        explain(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    for family in ("timm ViT family", "Hugging Face text classifiers", "ViT/DeiT LRP copy", "SiglipModel"):
        assert family in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError, match="global_pool='max'"):
        explain(_timm(VisionTransformer, global_pool="max"), images(1))


def test_supported_list_covers_every_family():
    families = {f for f, *_ in supported_models()}
    assert {"timm ViT family (unmodified)", "Hugging Face image classifiers (unmodified)",
            "Hugging Face text classifiers (unmodified)", "Hugging Face image-text models (unmodified)"} <= families
    examples = {e for _, ex, _, _ in supported_models() for e in ex}
    for cls in ("SiglipModel", "GPT2ForSequenceClassification", "Qwen2ForSequenceClassification",
                "DebertaV2ForSequenceClassification", "Dinov2WithRegistersForImageClassification"):
        assert cls in examples


def test_readme_supported_list_is_the_generated_one():
    import os

    from modules.adapters import supported_models_markdown

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme.split("<!-- supported-models:start -->\n")[1].split("<!-- supported-models:end -->")[0]
    assert section == supported_models_markdown(), "regenerate the README table: python -m modules.adapters"
