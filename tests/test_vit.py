"""The ViT/DeiT copy: parity with timm, loading, conservation, batch invariance, methods.

Comparisons of two paths (copy vs timm, batch vs singles, engine vs a
re-derivation) run in float64 (the ``float64`` fixture or ``.double()``),
where they hold to ~1e-10 on any CPU (issue 20)."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from baselines.ViT import ViT_LRP as V
from baselines.ViT.ViT_explanation_generator import explain, normalize, upsample
from modules import layers as L
from modules.methods import ALIASES, METHOD_NAMES, METHODS, UnknownMethodError
from tests.conftest import tiny_vit as tiny


def rollout(matrices, start_layer=0):
    """M_{L-1} ... M_s, the whole product (the engine evaluates only its explained row)."""
    joint = matrices[start_layer]
    for m in matrices[start_layer + 1:]:
        joint = m @ joint
    return joint


# -- parity with timm ----------------------------------------------------------------------------
def test_vit_small_parity_with_timm_strict_both_ways():
    ref = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    ours = V.vit_small_patch16_224()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref, ours = ref.double(), ours.eval().double()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=0)
        with L.explanation_state("TA"):  # the explicit-attention path of an explanation
            torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=0)


def test_tiny_distilled_deit_parity_with_timm():
    ref = timm.create_model("deit_base_distilled_patch16_224", pretrained=False, img_size=64, embed_dim=48,
                            depth=2, num_heads=3).eval().double()
    ours = V.from_timm(ref)
    assert ours.distilled and ours.num_prefix_tokens == 2
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-10, rtol=0)


def test_other_input_size_matches_timm_dynamic_size():
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64, depth=2,
                            dynamic_img_size=True).eval().double()
    ours = V.from_timm(ref)
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-10, rtol=0)


def test_from_timm_refuses_unsupported_architecture():
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, global_pool="avg", depth=1)
    with pytest.raises(ValueError, match="global_pool"):
        V.from_timm(ref)


# -- checkpoints ---------------------------------------------------------------------------------
def test_load_checkpoint_formats(tmp_path):
    src = tiny(seed=1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd}, tmp_path / "w.pth")
    x = torch.randn(2, 3, 32, 32)
    for name in ("w.safetensors", "w.pth"):
        dst = V.load_checkpoint(tiny(seed=2), str(tmp_path / name))
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)  # same weights, same arithmetic


def test_load_checkpoint_names_what_did_not_fit(tmp_path):
    sd = tiny().state_dict()
    sd.pop("head.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(V.CheckpointError) as err:
        V.load_checkpoint(tiny(), str(tmp_path / "bad.pt"))
    msg = str(err.value)
    assert "head.weight" in msg and "extra.weight" in msg and "blocks.0.mlp.fc1.weight" in msg
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(V.CheckpointError, match="junk.pth"):
        V.load_checkpoint(tiny(), str(tmp_path / "junk.pth"))


def test_checkpoint_of_another_grid_is_resampled(tmp_path):
    torch.save(tiny(img_size=32).state_dict(), tmp_path / "w.pt")
    model = V.load_checkpoint(tiny(img_size=48), str(tmp_path / "w.pt"))
    assert model.pos_embed.shape[1] == 1 + 6 * 6


# -- relevance propagation -----------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
def test_ta_conservation_per_block_and_sample(distilled, float64):
    """Rule set TA, bias-free weights: each block's input and output relevance
    sums agree per sample (the head too: the one-hot's 1 arrives intact).  Float64;
    what leaks is the rules' 1e-9 stabiliser, measured up to 6.1e-9 relative
    (rounding is ~1e-15), hence rtol 1e-7."""
    model = tiny(distilled=distilled, bias=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), L.explanation_state("TA"):
        logits = model(x)
        R = torch.nn.functional.one_hot(logits.argmax(-1), 10).to(x.dtype)
        R = model.relprop_head(R)
        torch.testing.assert_close(R.sum((1, 2)), torch.ones(4), rtol=1e-7, atol=0)
        for blk in reversed(model.blocks):
            R_in = blk.relprop(R)
            torch.testing.assert_close(R_in.sum((1, 2)), R.sum((1, 2)), rtol=1e-7, atol=0)
            R = R_in


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("distilled", [False, True])
def test_batch_of_four_equals_four_singles(method, distilled, float64):
    model = tiny(distilled=distilled, seed=3)
    x = torch.randn(4, 3, 32, 32)
    index = torch.tensor([0, 3, 5, 9])
    raw_batch = explain(model, x, method, index=index)
    assert raw_batch.dtype == torch.float64
    raw_singles = torch.cat([explain(model, x[i:i + 1], method, index=int(index[i])) for i in range(4)])
    torch.testing.assert_close(normalize(raw_batch), normalize(raw_singles), atol=1e-9, rtol=0)
    # raw maps too, so that a per-sample scale error cannot hide behind the normalisation
    scale = raw_singles.flatten(1).abs().amax(1).reshape(-1, *[1] * (raw_singles.dim() - 1))
    assert ((raw_batch - raw_singles).abs() <= 1e-9 * scale).all()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_shapes_finite_on_non_square_input(method):
    model = tiny(img_size=32)
    x = torch.randn(2, 3, 40, 56)
    out = explain(model, x, method)
    assert out.shape == ((2, 40, 56) if METHODS[method].to_input else (2, 5, 7))  # pixel maps for input relevance
    assert torch.isfinite(out).all()
    assert out.dtype == x.dtype and out.device == x.device


def test_rollout_and_raw_attention_match_their_definitions(float64):
    model = tiny(seed=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), L.explanation_state("TA", save_inputs=False) as state:
        model(x)
        attn = [a.clone() for a in state.attentions]
    for s in (0, 1):
        eye = torch.eye(attn[0].shape[-1])
        full = rollout([(a.mean(1) + eye) / (a.mean(1) + eye).sum(-1, keepdim=True) for a in attn], start_layer=s)
        torch.testing.assert_close(explain(model, x, "rollout", start_layer=s).flatten(1), full[:, 0, 1:],
                                   atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(explain(model, x, "attn_last_layer").flatten(1), attn[-1].mean(1)[:, 0, 1:],
                               atol=1e-12, rtol=1e-9)


def test_generic_attribution_matches_autograd_definition(float64):
    """R = I; R <- R + mean_h(max(grad * A, 0)) R, gradients taken separately."""
    model = tiny(seed=5)
    x = torch.randn(3, 3, 32, 32)
    with L.explanation_state("TA", save_inputs=False) as state:
        logits = model(x.requires_grad_(True))
        target = logits.argmax(-1)
        grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), state.attentions)
        attn = [a.detach() for a in state.attentions]
    R = torch.eye(attn[0].shape[-1]).expand(3, -1, -1)
    for a, g in zip(attn, grads):
        R = R + torch.bmm((g * a).clamp(min=0).mean(1), R)
    torch.testing.assert_close(explain(model, x.detach(), "generic_attribution").flatten(1), R[:, 0, 1:],
                               atol=1e-12, rtol=1e-9)


def _recorded(model, x, target, rule_set):
    """Attention maps, their per-sample gradients and a full relevance pass, taken by hand."""
    with L.explanation_state(rule_set) as state:
        logits = model(x.clone().requires_grad_(True))
        one_hot = torch.nn.functional.one_hot(target, logits.shape[-1]).to(x.dtype)
        grads = torch.autograd.grad((logits * one_hot).sum(), state.attentions)
        with torch.no_grad():
            model.relprop(one_hot, image_size=tuple(x.shape[-2:]))
        rel = [state.attention_relevance[mod] for mod in state.attention_modules]
        attn = [a.detach() for a in state.attentions]
    return attn, grads, rel


@pytest.mark.parametrize("distilled", [False, True])
def test_lrp_based_methods_match_their_definitions(distilled, float64):
    """transformer_attribution: rollout of I + mean_h(max(grad * Rattn, 0)) (full product, row [CLS]);
    lrp_last_layer: mean_h(max(Rattn_{L-1}, 0)) row [CLS]; attn_gradcam: per-head weights from
    grad[h, 0, patches]; patch columns after the prefix tokens."""
    model = tiny(distilled=distilled, seed=8)
    p = model.num_prefix_tokens
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 3])
    attn, grads, rel = _recorded(model, x, target, "TA")
    eye = torch.eye(attn[0].shape[-1])
    for s in (0, 1):
        ref = rollout([(g * r).clamp(min=0).mean(1) + eye for g, r in zip(grads, rel)], start_layer=s)[:, 0, p:]
        got = explain(model, x, "transformer_attribution", index=target, start_layer=s).flatten(1)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    w = grads[-1][:, :, 0, p:].mean(-1, keepdim=True)
    cam = (w * attn[-1][:, :, 0, p:]).mean(1).clamp(min=0)
    lo, hi = cam.amin(1, keepdim=True), cam.amax(1, keepdim=True)
    torch.testing.assert_close(explain(model, x, "attn_gradcam", index=target).flatten(1), (cam - lo) / (hi - lo),
                               atol=1e-12, rtol=1e-9)
    _, _, rel_lrp = _recorded(model, x, target, "LRP")
    torch.testing.assert_close(explain(model, x, "lrp_last_layer", index=target).flatten(1),
                               rel_lrp[-1].clamp(min=0).mean(1)[:, 0, p:], atol=1e-12, rtol=1e-9)


def test_transformer_attribution_is_class_specific_and_start_layer_matters():
    model = tiny(seed=6)
    x = torch.randn(1, 3, 32, 32)
    a, b = explain(model, x, "transformer_attribution", index=1), explain(model, x, "transformer_attribution", index=2)
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, explain(model, x, "transformer_attribution", index=1, start_layer=1))


def test_index_forms_and_errors():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    by_int = explain(model, x, "transformer_attribution", index=4)
    by_tensor = explain(model, x, "transformer_attribution", index=torch.tensor([4, 4]))
    torch.testing.assert_close(by_int, by_tensor)
    with pytest.raises(ValueError, match="out of range"):
        explain(model, x, "transformer_attribution", index=10)
    with pytest.raises(ValueError, match="whole number"):
        explain(model, x, "transformer_attribution", index=1.5)
    with pytest.raises(ValueError, match="start_layer"):
        explain(model, x, "rollout", start_layer=3)


def test_aliases_and_unknown_method():
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    for alias, target in ALIASES.items():
        torch.testing.assert_close(explain(model, x, alias), explain(model, x, target))
    with pytest.raises(UnknownMethodError) as err:
        explain(model, x, "gradcam++")
    assert all(name in str(err.value) for name in METHOD_NAMES)


def test_plain_inference_keeps_nothing():
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    explain(model, x, "transformer_attribution")
    with torch.no_grad():
        model(x)
    params = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    for mod in model.modules():
        held = [k for k, v in vars(mod).items() if isinstance(v, torch.Tensor) and id(v) not in params]
        assert not held, f"{type(mod).__name__} holds tensors {held}"
    assert L.current_state() is None


def test_upsample_and_normalize():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    n = normalize(maps)
    torch.testing.assert_close(n[0], maps[0] / 3)
    assert torch.equal(n[1], torch.zeros(2, 2))
    up = upsample(maps, (8, 6))
    assert up.shape == (2, 8, 6) and torch.allclose(up[1], torch.full((8, 6), 5.0))
