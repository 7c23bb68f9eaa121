"""Generic attention explainability of unmodified timm / Hugging Face models
(METHODS.md section 2, ``generic_attribution``): the formula, equality with
the model copies and with transformers' own ``output_attentions``, batch
invariance, and that the model is left exactly as found.

Every test runs with torch's default dtype float64 (the ``float64``
fixture): models are built and inputs drawn in float64, so two paths agree
to ~1e-12 on any CPU and are compared at 1e-9 (issue 20)."""
import copy
import os

import pytest
import torch
from torch import nn

import transformers as tf
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from baselines.ViT.ViT_explanation_generator import explain as explain_vit_copy
from baselines.ViT.ViT_LRP import from_timm
from modules.attention_capture import UnsupportedModelError, capture_attention, find_attention_layers
from modules.aggregation import positive_head_mean
from modules.generic import CLIPRelevance, clip_pooled_index, explain_any, generic_explanation
from modules.methods import METHODS
from modules.trace import AttentionCall, Readout, Stream

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("float64")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, IMG, PATCH, SEQ, VOCAB = 3, 32, 8, 8, 60


# --------------------------------------------------------------------------
# Tiny random models (weights larger than the 0.02 init: attention far from uniform)
# --------------------------------------------------------------------------
def _randomize(model: nn.Module, seed: int = 0, std: float = 0.25) -> nn.Module:
    """Weights drawn in float32 whatever the model's dtype: a float64 model gets the same numbers."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "norm" in name.lower():
                p.copy_(1.0 + 0.1 * randn(p.shape) if name.endswith("weight") else 0.1 * randn(p.shape))
            else:
                p.copy_(std * randn(p.shape))
    return model.eval()


def timm_vit(distilled: bool = False, depth: int = 3):
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    torch.manual_seed(0)
    return _randomize(cls(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=depth, num_heads=4, num_classes=5))


def _vision_kwargs():
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=IMG,
                patch_size=PATCH)


def _text_kwargs():
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=32)


def hf_vit():
    return _randomize(tf.ViTForImageClassification(tf.ViTConfig(num_labels=5, **_vision_kwargs())))


def hf_deit():
    return _randomize(tf.DeiTForImageClassification(tf.DeiTConfig(num_labels=5, **_vision_kwargs())))


def hf_deit_teacher():
    return _randomize(tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(num_labels=5, **_vision_kwargs())))


def hf_bert():
    return _randomize(tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **_text_kwargs())))


def hf_roberta():
    return _randomize(tf.RobertaForSequenceClassification(tf.RobertaConfig(num_labels=3, pad_token_id=1,
                                                                           **_text_kwargs())))


def hf_distilbert():
    cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=32, num_labels=3)
    return _randomize(tf.DistilBertForSequenceClassification(cfg))


EOS, BOS, PAD = VOCAB - 1, VOCAB - 2, 0


def hf_clip(eos_token_id: int = EOS):
    text = dict(_text_kwargs(), eos_token_id=eos_token_id, bos_token_id=BOS, pad_token_id=PAD)
    cfg = tf.CLIPConfig(text_config=text, vision_config=_vision_kwargs(), projection_dim=16)
    return _randomize(tf.CLIPModel(cfg), std=0.2)


def images(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def text_batch(pad: int = 0, seed: int = 2) -> dict:
    """[CLS]=2 first, ids >= 3 after, sample 1 padded at the end (pad id ``pad``)."""
    ids = torch.randint(3, VOCAB - 2, (B, SEQ), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    ids[1, -3:] = pad
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def clip_batch(n_images: int = 2, n_texts: int = 2, seed: int = 3) -> dict:
    """Texts BOS ... EOS, then padding; the EOS positions differ per text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n_texts, SEQ), PAD)
    mask = torch.zeros_like(ids)
    for t in range(n_texts):
        length = SEQ - 2 * (t % 3)  # 8, 6, 4
        ids[t, :length] = torch.randint(3, VOCAB - 2, (length,), generator=g)
        ids[t, 0], ids[t, length - 1] = BOS, EOS
        mask[t, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": images(n_images, seed)}


GRID = IMG // PATCH
MODELS = {
    # name: (builder, inputs, expected output shape)
    "timm_vit": (timm_vit, lambda: images(), (B, GRID, GRID)),
    "timm_deit_distilled": (lambda: timm_vit(distilled=True), lambda: images(), (B, GRID, GRID)),
    "hf_vit": (hf_vit, lambda: {"pixel_values": images()}, (B, GRID, GRID)),
    "hf_deit": (hf_deit, lambda: images(), (B, GRID, GRID)),
    "hf_deit_teacher": (hf_deit_teacher, lambda: {"pixel_values": images()}, (B, GRID, GRID)),
    "hf_bert": (hf_bert, lambda: text_batch(), (B, SEQ)),
    "hf_roberta": (hf_roberta, lambda: text_batch(pad=1), (B, SEQ)),
    "hf_distilbert": (hf_distilbert, lambda: text_batch(), (B, SEQ)),
    "hf_clip": (hf_clip, lambda: clip_batch(B, B), ((B, GRID, GRID), (B, SEQ))),
}


def _sample(inputs, i: int):
    if isinstance(inputs, torch.Tensor):
        return inputs[i:i + 1]
    return {k: v[i:i + 1] for k, v in inputs.items()}


def _plain_output(model, inputs):
    with torch.no_grad():
        if isinstance(inputs, torch.Tensor):
            out = model(inputs) if isinstance(model, VisionTransformer) else model(pixel_values=inputs)
        else:
            out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.logits_per_image)


def _snapshot(model: nn.Module) -> dict:
    """Everything an explanation could leave behind."""
    hooks = {}
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            hooks[(name, attr)] = tuple(getattr(m, attr, {}).keys())
    configs = {id(c): (c, c._attn_implementation) for m in model.modules()
               for c in [getattr(m, "config", None)] if isinstance(c, tf.PretrainedConfig)}
    return {
        "hooks": hooks,
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "fused": {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")},
        "attn_impl": {k: v[1] for k, v in configs.items()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    assert after["hooks"] == before["hooks"]
    assert all(not keys for keys in after["hooks"].values()), "a hook was left on the model"
    for key in ("training", "requires_grad", "fused", "attn_impl"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert all(g is None for g in after["grads"].values()), "an explanation wrote .grad"


# --------------------------------------------------------------------------
# The formula (pure tensor functions)
# --------------------------------------------------------------------------
def _generic_rows(attentions, gradients, rows, start_layer=0):
    """The engine's generic_attribution on a hand-built stream: row ``rows[b]`` of R for sample b."""
    B, N = attentions[0].shape[0], attentions[0].shape[-1]
    weights = torch.nn.functional.one_hot(torch.as_tensor(rows).expand(B), N).to(attentions[0].dtype)
    calls = [AttentionCall(f"layer{i}", a, grad=g) for i, (a, g) in enumerate(zip(attentions, gradients))]
    stream = Stream("main", calls, Readout(weights, torch.ones(B, N, dtype=torch.bool)))
    return METHODS["generic_attribution"].compute(stream, start_layer, None)


def test_generic_relevance_hand_computed():
    # one head, N = 2; layer 0: grad*A = [[.75, -.5], [2, 1]] -> Abar0 = [[.75, 0], [2, 1]]
    a0 = torch.tensor([[0.75, 0.25], [0.5, 0.5]])[None, None]
    g0 = torch.tensor([[1.0, -2.0], [4.0, 2.0]])[None, None]
    # layer 1: Abar1 = [[0, 1], [0, 0]]
    a1 = torch.tensor([[0.5, 0.5], [0.5, 0.5]])[None, None]
    g1 = torch.tensor([[-1.0, 2.0], [-3.0, -1.0]])[None, None]
    # R0 = I + Abar0 = [[1.75, 0], [2, 2]]; R1 = R0 + Abar1 @ R0 = [[3.75, 2], [2, 2]]
    torch.testing.assert_close(_generic_rows([a0, a1], [g0, g1], 0)[0], torch.tensor([3.75, 2.0]))
    torch.testing.assert_close(_generic_rows([a0, a1], [g0, g1], 1)[0], torch.tensor([2.0, 2.0]))
    # start_layer = 1 drops layer 0: R = I + Abar1
    torch.testing.assert_close(_generic_rows([a0, a1], [g0, g1], 0, start_layer=1)[0], torch.tensor([1.0, 1.0]))


def test_head_mean_of_positive_part():
    a = torch.ones(1, 2, 2, 2)
    g = torch.tensor([[[1.0, -1.0], [2.0, 0.0]], [[3.0, 1.0], [-2.0, 4.0]]])[None]
    # heads: max(g, 0) = [[1,0],[2,0]] and [[3,1],[0,4]] -> mean [[2, .5], [1, 2]]
    torch.testing.assert_close(positive_head_mean(g * a)[0], torch.tensor([[2.0, 0.5], [1.0, 2.0]]))


@pytest.mark.parametrize("start_layer", [0, 2])
def test_generic_relevance_matches_plain_loop_per_sample(start_layer, seed):
    L, H, N = 4, 3, 6
    attn = [torch.rand(B, H, N, N).softmax(-1) for _ in range(L)]
    grad = [torch.randn(B, H, N, N) for _ in range(L)]
    rows = torch.tensor([0, 5, 2])
    got = _generic_rows(attn, grad, rows, start_layer)
    for b in range(B):  # independent re-statement, one sample at a time
        r = torch.eye(N)
        for layer in range(start_layer, L):
            abar = (grad[layer][b] * attn[layer][b]).clamp(min=0).mean(dim=0)
            r = r + abar @ r
        torch.testing.assert_close(got[b], r[rows[b]])
        torch.testing.assert_close(_generic_rows(attn, grad, 3, start_layer)[b], r[3])


def test_start_layer_out_of_range():
    with pytest.raises(ValueError, match=r"start_layer=3 outside 0\.\.2"):
        explain_any(timm_vit(), images(1), start_layer=3)
    with pytest.raises(ValueError, match=r"start_layer=-1"):
        explain_any(hf_bert(), text_batch(), start_layer=-1)


# --------------------------------------------------------------------------
# Equality with the model copies
# --------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("start_layer", [0, 1])
def test_timm_equals_vit_copy(distilled, start_layer):
    model = timm_vit(distilled)
    ours = from_timm(model)
    x = images()
    for index in (None, [4, 0, 2]):
        got = explain_any(model, x, index=index, start_layer=start_layer)
        want = explain_vit_copy(ours, x, method="generic_attribution", index=index, start_layer=start_layer)
        assert got.shape == want.shape == (B, GRID, GRID)
        assert want.abs().max() > 1e-3  # not a trivial map
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


_BERT_COPY = os.path.join(ROOT, "BERT_explainability", "modules", "BERT")


@pytest.mark.skipif(not all(os.path.isfile(os.path.join(_BERT_COPY, f))
                            for f in ("BertForSequenceClassification.py", "ExplanationGenerator.py")),
                    reason="the BERT copy (BERT_explainability/modules/BERT/BertForSequenceClassification.py and "
                           "ExplanationGenerator.py) is not written yet")
@pytest.mark.parametrize("start_layer", [0, 1])
def test_hf_bert_equals_bert_copy(start_layer):
    from BERT_explainability.modules.BERT import BertForSequenceClassification as copy_module
    from BERT_explainability.modules.BERT.ExplanationGenerator import explain as explain_bert_copy

    model = hf_bert()
    ours = copy_module.BertForSequenceClassification(model.config)
    state = model.state_dict()
    if hasattr(copy_module, "convert_hf_state_dict"):
        state = copy_module.convert_hf_state_dict(state)
    ours.load_state_dict(state, strict=True)
    ours.eval()
    batch = text_batch()
    for index in (None, [1, 2, 0]):
        got = explain_any(model, batch, index=index, start_layer=start_layer)
        want = explain_bert_copy(ours, batch["input_ids"], batch["attention_mask"], "generic_attribution",
                                 index=index, start_layer=start_layer)
        assert got.shape == want.shape == (B, SEQ)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def _reference_via_output_attentions(model, inputs, start_layer=0):
    """Independent route: transformers' own ``output_attentions`` on a copy
    with eager attention, gradients of the returned score, the formula by hand."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    if "pixel_values" in inputs and "input_ids" in inputs:  # CLIP, paired inputs
        out = ref(**inputs, output_attentions=True)
        score = out.logits_per_image.diagonal()
        towers = [out.vision_model_output.attentions, out.text_model_output.attentions]
        eos = clip_pooled_index(ref.text_model, inputs["input_ids"])
        rows = [torch.zeros_like(eos), eos]
    else:
        out = ref(**inputs, output_attentions=True)
        score = out.logits.gather(1, out.logits.argmax(-1, keepdim=True)).squeeze(1)
        towers, rows = [out.attentions], [torch.zeros(score.shape[0], dtype=torch.long)]
    flat = [a for tower in towers for a in tower]
    grads = torch.autograd.grad(score.sum(), flat)
    results, k = [], 0
    for tower, row in zip(towers, rows):
        r = torch.eye(tower[0].shape[-1]).expand(score.shape[0], -1, -1)
        for layer in range(len(tower)):
            if layer >= start_layer:
                abar = (grads[k] * tower[layer]).clamp(min=0).mean(dim=1)
                r = r + abar @ r
            k += 1
        results.append(r[torch.arange(score.shape[0]), row].detach())
    return results, score.detach()


@pytest.mark.parametrize("name", ["hf_vit", "hf_deit_teacher", "hf_bert", "hf_distilbert", "hf_clip"])
def test_hf_equals_reference_through_output_attentions(name):
    builder, make_inputs, _ = MODELS[name]
    model, inputs = builder(), make_inputs()
    feed = inputs if isinstance(inputs, dict) else {"pixel_values": inputs}
    (ref, *ref_text), ref_score = _reference_via_output_attentions(model, feed, start_layer=1)
    exp = generic_explanation(model, inputs, start_layer=1)
    torch.testing.assert_close(exp.score, ref_score, atol=1e-12, rtol=1e-9)
    if exp.kind == "text":
        torch.testing.assert_close(exp.relevance, ref, atol=1e-10, rtol=1e-9)
    else:
        prefix = ref.shape[-1] - GRID * GRID
        torch.testing.assert_close(exp.relevance, ref[:, prefix:].reshape(-1, GRID, GRID), atol=1e-10, rtol=1e-9)
    if exp.kind == "image-text":
        torch.testing.assert_close(exp.text_relevance, ref_text[0], atol=1e-10, rtol=1e-9)


# --------------------------------------------------------------------------
# Every listed model: shape, finite, batch = singles, model left as found
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_shapes_batch_invariance_and_restoration(name):
    builder, make_inputs, shape = MODELS[name]
    model, inputs = builder(), make_inputs()
    assert all(p.dtype == torch.float64 for p in model.parameters())  # built under the float64 fixture
    before_out = _plain_output(model, inputs)
    before = _snapshot(model)
    got = explain_any(model, inputs)
    _assert_unchanged(before, _snapshot(model))
    torch.testing.assert_close(_plain_output(model, inputs), before_out, atol=0, rtol=0)

    parts = list(got) if isinstance(got, CLIPRelevance) else [got]
    shapes = list(shape) if isinstance(got, CLIPRelevance) else [shape]
    for part, want in zip(parts, shapes):
        assert part.shape == want
        assert torch.isfinite(part).all()
        assert (part > 0).any() and not part.requires_grad
    for i in range(B):
        single = explain_any(model, _sample(inputs, i))
        for part, one in zip(parts, list(single) if isinstance(single, CLIPRelevance) else [single]):
            torch.testing.assert_close(part[i:i + 1], one, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("name", ["hf_bert", "hf_roberta", "hf_distilbert"])
def test_text_padding_gives_zero_and_matches_unpadded(name):
    builder, make_inputs, _ = MODELS[name]
    model, batch = builder(), make_inputs()
    got = explain_any(model, batch)
    assert torch.equal(got[1, -3:], torch.zeros(3))  # padded keys get probability 0
    alone = explain_any(model, {k: v[1:2, :-3] for k, v in batch.items()})
    torch.testing.assert_close(got[1:2, :-3], alone, atol=1e-10, rtol=1e-9)


def test_timm_index_and_deit_teacher_explain_averaged_logits():
    model = hf_deit_teacher()
    x = images()
    exp = generic_explanation(model, x, index=2)
    with torch.no_grad():
        out = model(pixel_values=x)
    torch.testing.assert_close(out.logits, (out.cls_logits + out.distillation_logits) / 2)
    # The explanation runs eager attention (captured), this forward SDPA: two float32 paths that
    # differed by 1.6e-7 (rel 1.8e-6) under ATEN_CPU_CAPABILITY=default; another logit differs by ~0.1.
    torch.testing.assert_close(exp.score, out.logits[:, 2], atol=1e-6, rtol=1e-5)
    assert exp.target.tolist() == [2, 2, 2]
    assert generic_explanation(model, x).target.tolist() == out.logits.argmax(-1).tolist()


# --------------------------------------------------------------------------
# The capture context
# --------------------------------------------------------------------------
def test_capture_switches_off_fused_and_sdpa_only_inside():
    vit, bert = timm_vit(), hf_bert()
    assert all(b.attn.fused_attn for b in vit.blocks)
    with capture_attention(vit) as cap:
        assert not any(b.attn.fused_attn for b in vit.blocks)
        vit(images(1))
        assert [r.name for r in cap.records] == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
        assert cap.records[0].probs.shape == (1, 4, 1 + GRID * GRID, 1 + GRID * GRID)
        torch.testing.assert_close(cap.records[0].probs.sum(-1), torch.ones(1, 4, 17))
    assert all(b.attn.fused_attn for b in vit.blocks)
    impl = bert.config._attn_implementation
    assert impl != "eager"
    with capture_attention(bert):
        assert bert.config._attn_implementation == "eager"
    assert bert.config._attn_implementation == impl


def test_config_asking_for_attentions_gets_no_transformers_hooks():
    model = hf_bert()
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    model.config.output_hidden_states = True
    before = _snapshot(model)
    explain_any(model, text_batch())
    _assert_unchanged(before, _snapshot(model))
    assert model.config.output_attentions and model.config.output_hidden_states
    assert not getattr(model, "_output_capturing_hooks_installed", False)


def test_capture_records_the_probabilities_timm_computes():
    model = timm_vit()
    x = images(2)
    with capture_attention(model) as cap:
        model(x)
    # re-compute block 0's softmax(q k^T * scale) from its input by hand
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        attn = model.blocks[0].attn
        q, k, _ = attn.qkv(model.blocks[0].norm1(h)).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
        want = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
    torch.testing.assert_close(cap.attentions()[0], want)


def test_restored_after_train_mode_frozen_no_grad_and_errors():
    model = hf_bert()
    batch = text_batch()
    want = explain_any(model, batch)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    before = _snapshot(model)
    with torch.no_grad():  # the explanation enables gradients itself
        got = explain_any(model, batch)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # dropout was off inside
    _assert_unchanged(before, _snapshot(model))
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(model):
            raise RuntimeError("boom")
    _assert_unchanged(before, _snapshot(model))


def test_unsupported_models_named_with_what_was_looked_for():
    with pytest.raises(UnsupportedModelError, match=r"Sequential.*looked for.*timm VisionTransformer"):
        find_attention_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UnsupportedModelError, match=r"Sequential"):
        explain_any(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))
    # avg and map pooling are supported (METHODS.md section 8); max pooling has no row to explain
    pooled = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=1, num_heads=4, num_classes=5,
                               global_pool="max")
    with pytest.raises(UnsupportedModelError, match="global_pool='max'"):
        explain_any(pooled, images(1))
    base = tf.BertModel(tf.BertConfig(**_text_kwargs()))
    with pytest.raises(UnsupportedModelError, match=r"BertModel.*BertForSequenceClassification"):
        explain_any(base, text_batch())


# --------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------
@pytest.mark.parametrize("eos_token_id", [EOS, 2])
def test_clip_pooled_index_is_the_token_clip_pools(eos_token_id):
    model = hf_clip(eos_token_id)
    batch = clip_batch(2, 3)
    if eos_token_id == 2:  # legacy configs pool the highest id: make EOS the highest
        batch["input_ids"] = torch.where(batch["input_ids"] == EOS, VOCAB - 1, batch["input_ids"] % (VOCAB - 3))
    eos = clip_pooled_index(model.text_model, batch["input_ids"])
    assert eos.tolist() == [7, 5, 3]
    with torch.no_grad():
        out = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(3), eos])


def test_clip_2x2_pairs_explain_the_similarities_the_model_returns():
    model = hf_clip()
    batch = clip_batch(2, 2)
    with torch.no_grad():
        sims = model(**batch).logits_per_image  # (images, texts)
    diag = generic_explanation(model, batch)
    swapped = generic_explanation(model, batch, index=[1, 0])
    # the four pairs reproduce the 2x2 similarity matrix the model returns
    torch.testing.assert_close(diag.score, sims.diagonal())
    torch.testing.assert_close(swapped.score, sims[[0, 1], [1, 0]])
    assert diag.target.tolist() == [0, 1] and swapped.target.tolist() == [1, 0]
    for exp in (diag, swapped):
        assert exp.relevance.shape == (2, GRID, GRID) and exp.text_relevance.shape == (2, SEQ)
        assert torch.isfinite(exp.relevance).all() and torch.isfinite(exp.text_relevance).all()
        # causal text tower: nothing after the pooled EOS token gets relevance
        for b, eos in enumerate(exp.text_row.tolist()):
            assert exp.text_relevance[b, eos] >= 1.0
            assert torch.equal(exp.text_relevance[b, eos + 1:], torch.zeros(SEQ - eos - 1))
    # the map of pair (image 0, text 1) is that pair explained alone
    alone = explain_any(model, {"pixel_values": batch["pixel_values"][:1], "input_ids": batch["input_ids"][1:],
                                "attention_mask": batch["attention_mask"][1:]})
    torch.testing.assert_close(swapped.relevance[:1], alone.image, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(swapped.text_relevance[:1], alone.text, atol=1e-10, rtol=1e-9)
    # the image map depends on the text it is paired with
    assert not torch.allclose(diag.relevance[0], swapped.relevance[0])


def test_clip_one_image_many_texts_and_bad_pairing():
    model = hf_clip()
    batch = clip_batch(1, 3)
    exp = generic_explanation(model, batch)
    with torch.no_grad():
        sims = model(**batch).logits_per_image
    torch.testing.assert_close(exp.score, sims[0])
    assert exp.relevance.shape == (3, GRID, GRID) and exp.text_relevance.shape == (3, SEQ)
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        explain_any(model, clip_batch(2, 3))
    with pytest.raises(ValueError, match="out of range"):
        explain_any(model, clip_batch(2, 3), index=[0, 3])
