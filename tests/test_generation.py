"""Generation explanations on unmodified Hugging Face models (issue 11, item 5).

Families: BART, T5, VisionEncoderDecoder (ViT + GPT-2, ViT + BERT decoders),
GPT-2, Llama, Qwen2 — tiny random configs, CPU.  For each: finite maps of the
documented shapes, a padded batch of 3 equal to 3 singles (sources and
decoder targets right-padded; decoder-only samples left- *and* right-padded
in one batch), causality (target entries after the explained position are 0),
the model exactly as found.  The encoder-decoder rule is re-stated
independently (plain loops over the attentions and gradients the model itself
returns with ``output_attentions=True``) from METHODS_ICCV.md sections 1 and 4.
``explain_generation`` (one forward, one gradient per token) equals one
``explain`` per generated token; the CLI writes a real HTML file and exits 2
with one line on bad input.

Every test runs with torch's default dtype float64 (the ``float64``
fixture: models built and inputs drawn in float64), so batch and singles,
and the engine and the re-statement, agree to ~1e-12 on any CPU and are
compared at 1e-9 (issue 20); one CPU thread (``one_thread``).
"""
import re

import pytest
import torch
import transformers as tf

from BERT_explainability import explain_generation as cli
from modules.adapters import InputsError, UnsupportedMethodError
from modules.explain import explain, explain_trace
from modules.generation import explain_generation, generation_html, left_pad
from tests.test_generic import _assert_unchanged, _randomize, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread", "float64")
V, S, T, IMG, PATCH = 40, 7, 5, 16, 4
GRID = IMG // PATCH
PAD, BOS, EOS = 0, 1, 2
ENC_DEC = ("bart", "t5", "ved_gpt2", "ved_bert")
CAUSAL = ("gpt2", "llama", "qwen2")


def _bart(**kw):
    cfg = tf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS, **kw)
    return tf.BartForConditionalGeneration(cfg)


def _t5(**kw):
    cfg = tf.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=PAD, pad_token_id=PAD,
                      eos_token_id=EOS, **kw)
    return tf.T5ForConditionalGeneration(cfg)


def _ved(decoder: str):
    enc = tf.ViTConfig(image_size=IMG, patch_size=PATCH, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)
    if decoder == "gpt2":
        dec = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True,
                            bos_token_id=BOS, eos_token_id=EOS)
    else:
        dec = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, is_decoder=True, add_cross_attention=True, pad_token_id=PAD)
    model = tf.VisionEncoderDecoderModel(tf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = BOS, PAD, EOS
    model.generation_config.decoder_start_token_id = BOS
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    return model


def _llama_like(cfg_cls):
    return cfg_cls(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                   eos_token_id=EOS)


BUILDERS = {
    "bart": _bart,
    "t5": _t5,
    "ved_gpt2": lambda: _ved("gpt2"),
    "ved_bert": lambda: _ved("bert"),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                     bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)),
    "llama": lambda: tf.LlamaForCausalLM(_llama_like(tf.LlamaConfig)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(_llama_like(tf.Qwen2Config)),
}
_CACHE = {}
# Every model in float64, Llama and Qwen2 included: their eager attention asks
# for a float32 softmax whatever the model's dtype, which made a float64 model's
# -1.8e308 padding mask -inf and a left-padded query's row NaN; conftest's
# autouse float64_softmax keeps it float64, and batch equals singles to 1e-10.
TOL64 = dict(atol=1e-10, rtol=1e-9)


def build(name, **kw):
    dtype = torch.get_default_dtype()
    if kw:
        torch.manual_seed(0)
        return _randomize(BUILDERS[name](**kw)).to(dtype)
    if (name, dtype) not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name, dtype] = _randomize(BUILDERS[name]()).to(dtype)
    return _CACHE[name, dtype]


def _ids(n, g):
    return torch.randint(3, V, (n,), generator=g)


def enc_dec_batch(name, lengths=(S, 5, 3), targets=(T, 3, 4), seed=1):
    """Right-padded sources (text) or images, right-padded decoder targets."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    out = {}
    if name.startswith("ved"):
        out["pixel_values"] = torch.randn(B, 3, IMG, IMG, generator=g)
    else:
        ids = torch.full((B, S), PAD)
        mask = torch.zeros_like(ids)
        for b, n in enumerate(lengths):
            ids[b, :n] = _ids(n, g)
            mask[b, :n] = 1
        out.update(input_ids=ids, attention_mask=mask)
    dec = torch.full((B, T), PAD)
    dmask = torch.zeros_like(dec)
    for b, n in enumerate(targets):
        dec[b, :n] = _ids(n, g)
        dmask[b, :n] = 1
    out.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    return out


def enc_dec_single(batch, i, name):
    out = {}
    if name.startswith("ved"):
        out["pixel_values"] = batch["pixel_values"][i:i + 1]
    else:
        n = int(batch["attention_mask"][i].sum())
        out.update(input_ids=batch["input_ids"][i:i + 1, :n], attention_mask=batch["attention_mask"][i:i + 1, :n])
    t = int(batch["decoder_attention_mask"][i].sum())
    out["decoder_input_ids"] = batch["decoder_input_ids"][i:i + 1, :t]
    return out


N = 8


def causal_batch(seed=2):
    """Sample 0 full, sample 1 left-padded (6 real), sample 2 right-padded (4 real); prompts of 4, 3, 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((3, N), PAD)
    mask = torch.zeros_like(ids)
    for b, (lo, hi) in enumerate([(0, N), (N - 6, N), (0, 4)]):
        ids[b, lo:hi] = _ids(hi - lo, g)
        mask[b, lo:hi] = 1
    return {"input_ids": ids, "attention_mask": mask, "prompt_length": torch.tensor([4, 3, 2])}


def _plain_logits(model, inputs):
    feed = {k: v for k, v in inputs.items() if k not in ("position", "prompt_length")}
    if "decoder_input_ids" not in feed and "position_ids" not in feed:
        feed["position_ids"] = (feed["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**feed, use_cache=False).logits


# --------------------------------------------------------------------------
# explain(): shapes, batch invariance, causality, the model unchanged
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENC_DEC)
def test_encoder_decoder_family(name):
    model = build(name)
    inputs = enc_dec_batch(name)
    before_out = _plain_logits(model, inputs)
    before = _snapshot(model)
    got = explain(model, inputs)
    _assert_unchanged(before, _snapshot(model))
    torch.testing.assert_close(_plain_logits(model, inputs), before_out, atol=0, rtol=0)

    image = name.startswith("ved")
    assert got.source.shape == ((3, GRID, GRID) if image else (3, S))
    assert got.target.shape == (3, T)
    for part in got:
        assert torch.isfinite(part).all() and (part >= 0).all() and not part.requires_grad
    assert (got.source > 0).any()
    tlen = inputs["decoder_attention_mask"].sum(dim=1)
    for b in range(3):
        t = int(tlen[b]) - 1  # default position: the last real target token
        assert (got.target[b, t + 1:] == 0).all()  # causality (and padding)
        assert got.target[b, t] >= 1  # R_dd's identity
        if not image:
            assert (got.source[b, int(inputs["attention_mask"][b].sum()):] == 0).all()
    for i in range(3):
        one = explain(model, enc_dec_single(inputs, i, name))
        t = int(tlen[i])
        torch.testing.assert_close(got.target[i, :t], one.target[0], atol=1e-10, rtol=1e-9)
        if image:
            torch.testing.assert_close(got.source[i], one.source[0], atol=1e-10, rtol=1e-9)
        else:
            n = int(inputs["attention_mask"][i].sum())
            torch.testing.assert_close(got.source[i, :n], one.source[0], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_family(name):
    model = build(name)
    inputs = causal_batch()
    before_out = _plain_logits(model, inputs)
    before = _snapshot(model)
    got = explain(model, inputs)
    _assert_unchanged(before, _snapshot(model))
    torch.testing.assert_close(_plain_logits(model, inputs), before_out, atol=0, rtol=0)

    assert got.source.shape == got.target.shape == (3, N)
    real = inputs["attention_mask"].bool()
    starts = [0, N - 6, 0]
    ends = [N, N, 4]  # one past the last real token = one past the explained position
    for part in got:
        assert torch.isfinite(part).all() and (part >= 0).all()
        assert (part[~real] == 0).all()
    for b in range(3):
        prompt_end = starts[b] + int(inputs["prompt_length"][b])
        assert (got.source[b, prompt_end:] == 0).all() and (got.target[b, :prompt_end] == 0).all()
        assert (got.source[b, starts[b]:prompt_end] > 0).any()
        assert got.target[b, ends[b] - 1] >= 1  # the explained position's own token (identity)
    for i in range(3):
        lo, hi = starts[i], ends[i]
        single = {"input_ids": inputs["input_ids"][i:i + 1, lo:hi], "prompt_length": int(inputs["prompt_length"][i])}
        one = explain(model, single)
        torch.testing.assert_close(got.source[i, lo:hi], one.source[0], **TOL64)
        torch.testing.assert_close(got.target[i, lo:hi], one.target[0], **TOL64)
    # an earlier position: nothing after it is relevant (causality, not masking)
    early = explain(model, dict(inputs, position=torch.tensor([5, 4, 2])))
    full = early.source + early.target
    for b, p in enumerate([5, 4, 2]):
        t = starts[b] + p
        assert (full[b, t + 1:] == 0).all() and full[b, t] >= 1


# --------------------------------------------------------------------------
# The explained value and the choice of position / id
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bart", "gpt2"])
def test_explained_value_is_the_logit_of_the_chosen_id_at_the_chosen_position(name):
    model = build(name)
    inputs = enc_dec_batch(name) if name == "bart" else causal_batch()
    logits = _plain_logits(model, inputs)
    if name == "bart":
        rows = inputs["decoder_attention_mask"].sum(dim=1) - 1
        pos = torch.tensor([1, 0, 2])
        pos_rows = pos
    else:
        rows = torch.tensor([N - 1, N - 1, 3])
        pos = torch.tensor([1, 0, 2])
        pos_rows = pos + torch.tensor([0, N - 6, 0])
    e = explain_trace(model, inputs)
    at = logits[torch.arange(3), rows]
    assert torch.equal(e.target, at.argmax(dim=-1))  # default: the id greedy decoding generates there
    torch.testing.assert_close(e.score, at.gather(1, e.target[:, None]).squeeze(1), atol=1e-10, rtol=1e-10)
    ids = [5, 6, 7]
    e = explain_trace(model, dict(inputs, position=pos), index=ids)
    at = logits[torch.arange(3), pos_rows]
    assert e.target.tolist() == ids
    torch.testing.assert_close(e.score, at[torch.arange(3), torch.tensor(ids)], atol=1e-10, rtol=1e-10)
    # a different id gives a different map (class specific)
    a = explain(model, dict(inputs, position=pos), index=ids)
    b = explain(model, dict(inputs, position=pos), index=[9, 10, 11])
    assert not torch.allclose(a.source, b.source)


def test_bad_position_and_index_are_one_line_errors():
    model = build("bart")
    inputs = enc_dec_batch("bart")
    with pytest.raises(InputsError, match="outside the samples' real tokens"):
        explain(model, dict(inputs, position=4))  # sample 1 has 3 target tokens
    with pytest.raises(InputsError, match="not a whole number"):
        explain(model, dict(inputs, position=1.5))
    with pytest.raises(ValueError, match="out of range"):
        explain(model, inputs, index=V)
    with pytest.raises(InputsError, match="prompt_length applies to decoder-only"):
        explain(model, dict(inputs, prompt_length=2))
    bad = dict(inputs, decoder_attention_mask=inputs["decoder_attention_mask"].flip(1))
    with pytest.raises(InputsError, match="right-padded"):
        explain(model, bad)
    gaps = causal_batch()
    gaps["attention_mask"][0, 3] = 0
    with pytest.raises(InputsError, match="one run"):
        explain(build("gpt2"), gaps)


def test_default_target_is_the_decoder_start_token():
    model = build("t5")
    inputs = enc_dec_batch("t5")
    src = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    start = torch.full((3, 1), model.config.decoder_start_token_id)
    a = explain(model, src)
    b = explain(model, dict(src, decoder_input_ids=start))
    assert a.target.shape == (3, 1)
    torch.testing.assert_close(a.source, b.source, atol=0, rtol=0)


# --------------------------------------------------------------------------
# The encoder-decoder rule, re-stated independently (METHODS_ICCV.md sections 1, 4)
# --------------------------------------------------------------------------
def _reference(enc_att, dec_att, cross_att):
    """DETR's rule for one sample, from (A, G) pairs of (H, N, M) tensors, in plain loops.

    R_ss = I, R_dd = I, R_ds = 0.  Encoder: R_ss += Abar R_ss.  Decoder, per
    layer: R_dd += Abar R_dd and R_ds += Abar R_ds (from the old values), then
    R_ds += Rbar_dd^T Abar_ds Rbar_ss with Rbar = (R - I) / rowsum(R - I) + I,
    a row whose R - I sums to 0 contributing no normalised part (0/0 := 0,
    the NaN guard), NaN entries of the addition set to 0.
    """
    def abar(a, g):
        H, n, m = a.shape
        out = torch.zeros(n, m, dtype=torch.float64)
        for h in range(H):
            out += (a[h].double() * g[h].double()).clamp(min=0)
        return out / H

    def rbar(r):
        n = r.shape[0]
        out = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            row = r[i].clone()
            row[i] -= 1
            total = float(row.sum())
            if total != 0:
                out[i] = row / total
            out[i, i] += 1
        return out

    n_s, n_d = enc_att[0][0].shape[-1], dec_att[0][0].shape[-1]
    R_ss = torch.eye(n_s, dtype=torch.float64)
    for a, g in enc_att:
        R_ss = R_ss + abar(a, g) @ R_ss
    R_dd = torch.eye(n_d, dtype=torch.float64)
    R_ds = torch.zeros(n_d, n_s, dtype=torch.float64)
    for (a, g), (ca, cg) in zip(dec_att, cross_att):
        m = abar(a, g)
        R_dd, R_ds = R_dd + m @ R_dd, R_ds + m @ R_ds
        add = rbar(R_dd).T @ abar(ca, cg) @ rbar(R_ss)
        R_ds = R_ds + torch.nan_to_num(add, nan=0.0)
    return R_ds, R_dd


@pytest.mark.parametrize("name", ["bart", "t5", "ved_gpt2"])
def test_encoder_decoder_rule_restated_independently(name):
    model = build(name)
    batch = enc_dec_batch(name, seed=5)
    inputs = enc_dec_single(batch, 0, name)
    t = 2
    ref_model = BUILDERS[name]()
    ref_model.load_state_dict(model.state_dict())
    ref_model.set_attn_implementation("eager")
    ref_model.eval()
    out = ref_model(**inputs, output_attentions=True, use_cache=False, return_dict=True)
    token = int(out.logits[0, t].argmax())
    groups = [out.encoder_attentions, out.decoder_attentions, out.cross_attentions]
    flat = [a for g in groups for a in g]
    grads = torch.autograd.grad(out.logits[0, t, token], flat)
    it = iter(grads)
    pairs = [[(a[0].detach(), next(it)[0]) for a in g] for g in groups]
    R_ds, R_dd = _reference(*pairs)

    got = explain(model, dict(inputs, position=t))
    src = R_ds[t]
    if name.startswith("ved"):
        src = src[1:].reshape(GRID, GRID)  # [CLS] takes part, dropped at the read-out
    torch.testing.assert_close(got.source[0], src, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(got.target[0], R_dd[t], atol=1e-12, rtol=1e-9)
    assert (got.source > 0).any() and (R_dd[t, t + 1:] == 0).all()


# --------------------------------------------------------------------------
# explain_generation
# --------------------------------------------------------------------------
def _generation_inputs(name, B=2):
    if name.startswith("ved"):
        return {"pixel_values": torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))}
    if name in CAUSAL:
        b = causal_batch()
        keep = [1, 2][:B]  # left- and right-padded prompts
        return {"input_ids": b["input_ids"][keep], "attention_mask": b["attention_mask"][keep]}
    b = enc_dec_batch(name)
    return {"input_ids": b["input_ids"][1:1 + B], "attention_mask": b["attention_mask"][1:1 + B]}


def _single(inputs, i):
    out = {k: v[i:i + 1] for k, v in inputs.items()}
    if "attention_mask" in out:
        real = out["attention_mask"][0].bool()
        out = {k: v[:, real] for k, v in out.items()}
    return out


@pytest.mark.parametrize("name", ENC_DEC + CAUSAL)
def test_explain_generation(name):
    model = build(name)
    inputs = _generation_inputs(name)
    K = 4
    before = _snapshot(model)
    out = explain_generation(model, inputs, max_new_tokens=K)
    _assert_unchanged(before, _snapshot(model))
    causal = name in CAUSAL
    B, k = out.tokens.shape
    assert B == 2 and 1 <= k <= K
    assert out.source.shape[:2] == (2, k) and out.target.shape[:2] == (2, k)
    assert out.target.shape[2] == (k - 1 if causal else k) == out.target_ids.shape[1]
    if name.startswith("ved"):
        assert out.source.shape[2:] == (GRID, GRID) and out.source_ids is None
    else:
        assert out.source.shape[2] == out.source_ids.shape[1]
        assert (out.source[~out.source_mask[:, None, :].expand_as(out.source)] == 0).all()
    assert torch.isfinite(out.source).all() and torch.isfinite(out.target).all()
    assert (out.source > 0).any()
    # causality: token k is predicted from target tokens before it only
    for j in range(k):
        limit = j if causal else j + 1
        assert (out.target[:, j, limit:] == 0).all()
    # the generated tokens are model.generate's, the scores their logits
    gen_in = dict(inputs)
    if causal:
        gen_in["input_ids"], gen_in["attention_mask"] = left_pad(inputs["input_ids"], inputs["attention_mask"], PAD)
    with torch.no_grad():
        seq = model.generate(**gen_in, max_new_tokens=K, do_sample=False, num_beams=1)
    assert torch.equal(out.tokens, seq[:, seq.shape[1] - k:])
    # one forward + one gradient per token == one explain() per token
    for j in range(k):
        if causal:
            P = gen_in["input_ids"].shape[1]
            step = {"input_ids": seq[:, :P + j],
                    "attention_mask": torch.cat([gen_in["attention_mask"], torch.ones(2, j, dtype=torch.long)], 1),
                    "prompt_length": gen_in["attention_mask"].sum(dim=1)}
        else:
            step = dict(inputs, decoder_input_ids=seq[:, :j + 1])
        e = explain_trace(model, step, index=out.tokens[:, j])
        torch.testing.assert_close(out.scores[:, j], e.score, **TOL64)
        if causal:
            torch.testing.assert_close(out.source[:, j], e.maps.source[:, :P], **TOL64)
            torch.testing.assert_close(out.target[:, j, :j], e.maps.target[:, P:P + j], **TOL64)
        else:
            torch.testing.assert_close(out.source[:, j], e.maps.source, **TOL64)
            torch.testing.assert_close(out.target[:, j, :j + 1], e.maps.target, **TOL64)
    # a padded batch of 2 == 2 singles
    for i in range(2):
        one = explain_generation(model, _single(inputs, i), max_new_tokens=K)
        kk = one.tokens.shape[1]
        assert torch.equal(one.tokens[0], out.tokens[i, :kk])
        if name.startswith("ved"):
            torch.testing.assert_close(one.source[0], out.source[i, :kk], **TOL64)
        else:
            real = out.source_mask[i]
            torch.testing.assert_close(one.source[0], out.source[i, :kk][:, real], **TOL64)
        torch.testing.assert_close(one.target[0], out.target[i, :kk, :one.target.shape[2]], **TOL64)


def test_explain_generation_marks_tokens_after_the_end_of_sequence():
    model = build("gpt2")
    # greedy tokens far from ties (every step's top-2 logit margin >= 0.04, measured), so float rounding
    # cannot change which token is the third
    inputs = _generation_inputs("gpt2")
    out = explain_generation(model, inputs, max_new_tokens=4)
    eos = int(out.tokens[0, 2])  # make sample 0's third token its end-of-sequence token
    assert eos not in out.tokens[1, :3].tolist() and eos not in out.tokens[0, :2].tolist()
    model.generation_config.eos_token_id = eos
    try:
        ended = explain_generation(model, inputs, max_new_tokens=4)
    finally:
        model.generation_config.eos_token_id = EOS
    assert ended.generated[0].tolist() == [True, True, True, False]
    assert (ended.source[0, 3] == 0).all() and (ended.target[0, 3] == 0).all()
    n = ended.tokens.shape[1]
    assert torch.equal(ended.tokens[:, :3], out.tokens[:, :3])
    torch.testing.assert_close(ended.source[:, :3], out.source[:, :3], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(ended.target[1, :n], out.target[1, :n, :n - 1], atol=1e-10, rtol=1e-9)


def test_explain_generation_methods_and_bad_arguments():
    model = build("bart")
    inputs = _generation_inputs("bart")
    for method in ("rollout", "attn_last_layer", "attn_gradcam"):
        out = explain_generation(model, inputs, max_new_tokens=2, method=method)
        assert torch.isfinite(out.source).all() and (out.source > 0).any()
    with pytest.raises(ValueError, match="max_new_tokens"):
        explain_generation(model, inputs, max_new_tokens=0)
    with pytest.raises(ValueError, match="takes no option"):
        explain_generation(model, inputs, max_new_tokens=1, bogus=True)
    for method in ("transformer_attribution", "lrp"):  # refused in one line that says why
        with pytest.raises(UnsupportedMethodError, match=r"LRP pass, which BartForConditionalGeneration does not "
                                                         r"offer yet: the LRP read-outs of generation .* not built"):
            explain_generation(model, inputs, max_new_tokens=1, method=method)
    with pytest.raises(InputsError, match="no generation model"):
        explain_generation(tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, hidden_size=32,
                                                                          num_hidden_layers=1, num_attention_heads=4,
                                                                          intermediate_size=64)),
                           inputs, max_new_tokens=1)


def test_left_pad_moves_real_tokens_to_the_right():
    ids = torch.tensor([[5, 6, 0, 0], [0, 7, 8, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    got, gmask = left_pad(ids, mask, pad_id=0)
    assert got.tolist() == [[0, 0, 5, 6], [0, 0, 7, 8], [1, 2, 3, 4]]
    assert gmask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]


# --------------------------------------------------------------------------
# HTML and the CLI
# --------------------------------------------------------------------------
def test_generation_html_colours_the_source_once_per_generated_word():
    page = generation_html(["the", "cat", "<sat>"], [[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]], ["le", "chat"], title="t")
    assert page.count('<section class="generated">') == 2
    assert page.count('class="word"') == 6 and "&lt;sat&gt;" in page
    assert page.count("<body>") == 1 and page.count("</html>") == 1
    # the first section colours "the" fully red, "cat" white (render_html's colours)
    first = page.split('<section class="generated">')[1]
    assert re.search(r'rgb\(255, 0, 0\)" title="1">the<', first)
    assert re.search(r'rgb\(255, 255, 255\)" title="0">cat<', first)
    with pytest.raises(ValueError):
        generation_html(["a"], [[1.0]], ["x", "y"])


WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "le", "chat"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"] + WORDS)}
    tok = tf.BertTokenizer(vocab=vocab)
    assert tok("the cat")["input_ids"][1:3] == [vocab["the"], vocab["cat"]]  # the vocabulary was taken
    dirs = {}
    for name in ("bart", "gpt2"):
        d = tmp_path_factory.mktemp(name)
        tok.save_pretrained(str(d))
        build(name).save_pretrained(str(d))
        dirs[name] = d
    d = tmp_path_factory.mktemp("classifier")
    tok.save_pretrained(str(d))
    tf.BertForSequenceClassification(tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=64)).save_pretrained(str(d))
    dirs["classifier"] = d
    return dirs


@pytest.mark.parametrize("name", ["bart", "gpt2"])
def test_cli_writes_an_html_heatmap(model_dirs, tmp_path, capsys, name):
    out = tmp_path / "sub" / "gen.html"
    rc = cli.main(["--model-dir", str(model_dirs[name]), "--text", "the cat sat on the mat", "--out", str(out),
                   "--max-new-tokens", "3", "--device", "cpu", "--method", "generic_attribution"])
    assert rc == 0, capsys.readouterr().err
    page = out.read_text()
    n = page.count('<section class="generated">')
    assert 1 <= n <= 3
    assert page.count('class="word"') == 6 * n  # the six source words, once per generated token
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--text", "   "], "--text is empty"),
    (["--model-dir", "/nonexistent/dir"], "no such directory"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--device", "cuda:99"], "--device"),
    (["--model-dir", "CLASSIFIER"], "not a supported text generation model"),
    (["--method", "lrp"], "--method"),
])
def test_cli_bad_input_exits_2_with_one_line(model_dirs, tmp_path, capsys, args, message):
    base = {"--model-dir": str(model_dirs["bart"]), "--text": "the cat", "--out": str(tmp_path / "o.html")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = str(model_dirs["classifier"]) if value == "CLASSIFIER" else value
    argv = [x for kv in base.items() for x in kv]
    with pytest.raises(SystemExit) if args[0] in ("--max-new-tokens", "--method") else _nothing() as exit_info:
        rc = cli.main(argv)
    rc = exit_info.value.code if exit_info is not None else rc
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 or err.splitlines()[0].startswith("usage:")
    assert not (tmp_path / "o.html").exists()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
