"""Every input size the model takes (issue 26, item 5).

A model that floors or pads explains on its own token grid, and the
explanation states the pixels that grid covers (``pixel_extent``, end
exclusive).  Cases (tiny random configs, nothing downloaded):

* EVA-02 (``eva02_tiny_patch14_224``'s architecture, 2 blocks) built for 64
  pixels: its 14-pixel patch embedding floors 64 / 14 to a 4 x 4 grid, so
  rows and columns 56..63 are seen by no token: extent (0, 0, 56, 56);
* a timm ViT with ``dynamic_img_size`` at 48 x 80 (16-pixel patches, built
  for 32): a 3 x 5 grid over the whole image;
* a timm ViT with ``dynamic_img_pad`` at 40 x 56: padded to 48 x 64, a
  3 x 4 grid whose last row and column also saw 8 padded pixels;
* a Hugging Face ViT with ``interpolate_pos_encoding`` at 44 x 60 (8-pixel
  patches, built for 32): floored to a 5 x 7 grid, extent (0, 0, 40, 56);
* a Hugging Face Swin at 54 x 58 (4-pixel patches): padded to 56 x 60.

Each: finite maps on that grid for every method the family supports, a
batch of 3 equal to 3 singles, the model unchanged afterwards; rollout, raw
attention and generic attribution equal a computation written out here from
attention recorded by the test itself (timm: hooks on ``attn_drop`` with the
fused path off; Hugging Face: ``output_attentions``); the stated extent
equals the pixels on which the patch embedding's output depends (its
Jacobian), and full LRP puts no relevance where no token looked.  All in
float64 (``float64`` fixture), so batch and singles, engine and hand
computation agree to ~1e-12 on any CPU.
"""
import numpy as np
import pytest
import timm
import torch
import transformers as tf
from timm.models.vision_transformer import VisionTransformer

from modules.adapters import InputsError, adapter_for
from modules.adapters.patch_grid import probe_patch_grid
from modules.explain import explain, explain_trace, upsample
from modules.methods import METHODS
from modules.pictures import place_maps, stream_overlays
from tests.test_generic import _assert_unchanged, _randomize, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread", "float64")
B = 3
TOL = dict(atol=1e-10, rtol=1e-9)


def eva02_64():
    torch.manual_seed(0)
    return _randomize(timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=64, depth=2,
                                        embed_dim=48, num_heads=3, num_classes=5))


def vit_dynamic(pad=False):
    torch.manual_seed(0)
    return _randomize(VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4,
                                        num_classes=5, dynamic_img_size=True, dynamic_img_pad=pad))


def hf_vit():
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=5, attn_implementation="eager")
    return _randomize(tf.ViTForImageClassification(cfg))


def hf_swin():
    torch.manual_seed(0)
    cfg = tf.SwinConfig(image_size=56, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4,
                        num_labels=5)
    return _randomize(tf.SwinForImageClassification(cfg))


# name: (builder, (H, W), grid, extent, Hugging Face inputs?)
CASES = {
    "eva02_floor_64": (eva02_64, (64, 64), (4, 4), (0, 0, 56, 56), False),
    "timm_vit_dynamic_size_48x80": (vit_dynamic, (48, 80), (3, 5), (0, 0, 48, 80), False),
    "timm_vit_dynamic_pad_40x56": (lambda: vit_dynamic(pad=True), (40, 56), (3, 4), (0, 0, 48, 64), False),
    "hf_vit_interpolate_44x60": (hf_vit, (44, 60), (5, 7), (0, 0, 40, 56), True),
    "hf_swin_pad_54x58": (hf_swin, (54, 58), (14, 15), (0, 0, 56, 60), True),
}


def _images(size, n=B, seed=1):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _inputs(case, x):
    if not CASES[case][4]:
        return x
    if case.startswith("hf_vit"):
        return {"pixel_values": x, "interpolate_pos_encoding": True}
    return {"pixel_values": x}


def _logits(model, inputs):
    with torch.no_grad():
        out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_on_the_models_own_grid_batch_equals_singles(case):
    build, size, grid, extent, _ = CASES[case]
    model, x = build(), _images(size)
    inputs = _inputs(case, x)
    before, before_out = _snapshot(model), _logits(model, inputs)
    assert before_out.shape == (B, 5)  # the model takes this size
    methods = adapter_for(model).methods()
    for method in methods:
        exp = explain_trace(model, inputs, method)
        want = (B, *size) if METHODS[method].to_input else (B, *grid)
        assert exp.maps.shape == want, method
        assert torch.isfinite(exp.maps).all() and exp.maps.dtype == torch.float64, method
        assert exp.pixel_extent == extent, method
        for i in range(B):
            one = explain(model, _inputs(case, x[i:i + 1]), method, index=exp.target[i:i + 1])
            torch.testing.assert_close(exp.maps[i:i + 1], one, **TOL, msg=method)
    _assert_unchanged(before, _snapshot(model))
    torch.testing.assert_close(_logits(model, inputs), before_out, atol=0, rtol=0)


def _hf_tiny(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return _randomize(cls(cfg_cls(image_size=32, patch_size=8, num_labels=5, attn_implementation="eager", **V,
                                  **kw)))


def _two_towers(cls, cfg_cls):
    torch.manual_seed(0)
    V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return _randomize(cls(cfg_cls(text_config=dict(vocab_size=50, max_position_embeddings=16, **V),
                                  vision_config=dict(image_size=32, patch_size=8, **V))))


def _timm_beit_60():
    from timm.models.beit import Beit

    torch.manual_seed(0)
    return _randomize(Beit(img_size=60, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5,
                           use_abs_pos_emb=False, use_rel_pos_bias=True))


# name: (builder, extra inputs (None: a plain tensor), (H, W), grid, extent): every one floors
MORE = {
    "hf_deit": (lambda: _hf_tiny(tf.DeiTForImageClassification, tf.DeiTConfig), {"interpolate_pos_encoding": True},
                (44, 60), (5, 7), (0, 0, 40, 56)),
    "hf_beit_relative_bias": (lambda: _hf_tiny(tf.BeitForImageClassification, tf.BeitConfig,
                                               use_relative_position_bias=True),
                              {"interpolate_pos_encoding": True}, (44, 60), (5, 7), (0, 0, 40, 56)),
    "hf_dinov2": (lambda: _hf_tiny(tf.Dinov2ForImageClassification, tf.Dinov2Config), {}, (44, 60), (5, 7),
                  (0, 0, 40, 56)),
    "generic_data2vec_vision": (lambda: _hf_tiny(tf.Data2VecVisionForImageClassification, tf.Data2VecVisionConfig),
                                {"interpolate_pos_encoding": True}, (44, 60), (5, 7), (0, 0, 40, 56)),
    "hf_clip": (lambda: _two_towers(tf.CLIPModel, tf.CLIPConfig), {"interpolate_pos_encoding": True}, (44, 60),
                (5, 7), (0, 0, 40, 56)),
    "hf_siglip": (lambda: _two_towers(tf.SiglipModel, tf.SiglipConfig), {"interpolate_pos_encoding": True},
                  (44, 60), (5, 7), (0, 0, 40, 56)),
    "timm_beit_60": (_timm_beit_60, None, (60, 60), (7, 7), (0, 0, 56, 56)),
}


@pytest.mark.parametrize("name", list(MORE))
def test_more_families_floor_on_their_own_grid(name):
    build, extra, size, grid, extent = MORE[name]
    model, x = build(), _images(size)
    ids = torch.randint(3, 49, (B, 6), generator=torch.Generator().manual_seed(5))
    ids[:, -1] = 49  # CLIP pools the highest id (its EOS)

    def inputs(sl):
        if extra is None:
            return x[sl]
        got = {"pixel_values": x[sl], **extra}
        return {**got, "input_ids": ids[sl]} if name in ("hf_clip", "hf_siglip") else got  # image-text pairs

    before = _snapshot(model)
    for method in ("generic_attribution", "lrp"):
        exp = explain_trace(model, inputs(slice(None)), method)
        maps = exp.maps.image if hasattr(exp.maps, "image") else exp.maps
        assert maps.shape == ((B, *size) if method == "lrp" else (B, *grid)), method
        assert torch.isfinite(maps).all() and exp.pixel_extent == extent, method
        if method == "lrp":  # nothing where no token looked
            assert bool((maps[:, extent[2]:] == 0).all()) and bool((maps[:, :, extent[3]:] == 0).all())
        for i in range(B):
            one = explain_trace(model, inputs(slice(i, i + 1)), method).maps
            one = one.image if hasattr(one, "image") else one
            torch.testing.assert_close(maps[i:i + 1], one, **TOL, msg=method)
    _assert_unchanged(before, _snapshot(model))


# --------------------------------------------------------------------------
# The methods written out on the model's own grid, from the test's own recording
# --------------------------------------------------------------------------
def _record_timm(model, x):
    """Logits and every block's attention probabilities (with their graph):
    the output of ``attn_drop`` (identity in eval), the fused path off."""
    probs, hooks, fused = [], [], []
    for block in model.blocks:
        fused.append(block.attn.fused_attn)
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, a, out: probs.append(out)))
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
        for block, f in zip(model.blocks, fused):
            block.attn.fused_attn = f
    return logits, probs


def _record_hf(model, x):
    out = model(pixel_values=x, interpolate_pos_encoding=True, output_attentions=True)
    return out.logits, list(out.attentions)


def _hand(method, probs, grads, weights, prefix, grid):
    """The method's map from (B, H, N, N) probabilities (and gradients), the
    head's read-out ``weights`` (B, N), the ``prefix`` tokens dropped, the
    patch columns laid row-major on ``grid``."""
    N = probs[0].shape[-1]
    eye = torch.eye(N, dtype=probs[0].dtype)
    row = weights
    if method == "attn_last_layer":
        row = torch.einsum("bn,bnm->bm", weights, probs[-1].clamp(min=0).mean(dim=1))
    for l in reversed(range(len(probs))):  # row <- row M_l, last layer first
        if method == "rollout":
            m = probs[l].mean(dim=1) + eye
            m = m / m.sum(dim=-1, keepdim=True)
        elif method == "generic_attribution":
            m = (grads[l] * probs[l]).clamp(min=0).mean(dim=1) + eye
        else:
            break
        row = torch.einsum("bn,bnm->bm", row, m)
    return row[:, prefix:].reshape(row.shape[0], *grid)


HAND = ["eva02_floor_64", "timm_vit_dynamic_size_48x80", "timm_vit_dynamic_pad_40x56", "hf_vit_interpolate_44x60"]


@pytest.mark.parametrize("case", HAND)
def test_maps_equal_the_methods_written_out_on_the_models_grid(case):
    build, size, grid, extent, hf = CASES[case]
    model, x = build(), _images(size, seed=2)
    logits, probs = (_record_hf if hf else _record_timm)(model, x)
    N = probs[0].shape[-1]
    prefix = N - grid[0] * grid[1]
    assert prefix == (1 if hf else model.num_prefix_tokens)  # the recorded tokens are the grid's and the prefix
    target = logits.argmax(dim=-1)
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), probs)
    probs, grads = [p.detach() for p in probs], [g.detach() for g in grads]
    weights = torch.zeros(B, N)
    if not hf and model.global_pool == "avg":  # EVA-02: the mean of the patch rows
        weights[:, prefix:] = 1.0 / (N - prefix)
    else:  # [CLS]
        weights[:, 0] = 1.0
    for method in ("rollout", "attn_last_layer", "generic_attribution"):
        got = explain(model, _inputs(case, x), method)
        torch.testing.assert_close(got, _hand(method, probs, grads, weights, prefix, grid), **TOL, msg=method)


# --------------------------------------------------------------------------
# The extent is the pixels the tokens saw
# --------------------------------------------------------------------------
def _patch_embedding(model):
    return model.patch_embed if hasattr(model, "patch_embed") else model.base_model.embeddings.patch_embeddings


@pytest.mark.parametrize("case", list(CASES))
def test_extent_is_where_the_patch_embedding_depends_on_the_pixels(case):
    build, size, grid, extent, _ = CASES[case]
    model = build()
    x = _images(size, n=1).requires_grad_(True)
    out = _patch_embedding(model)(x)
    out = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(out.square().sum(), x)
    seen = (g.abs().sum(dim=(0, 1)) > 0)
    rows, cols = seen.any(dim=1).nonzero().flatten(), seen.any(dim=0).nonzero().flatten()
    top, left, bottom, right = extent
    H, W = size
    # inside the image: exactly the extent (every pixel of it seen, none beyond)
    assert (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1) == (top, left, min(bottom, H),
                                                                                  min(right, W))
    assert bool(seen[top:min(bottom, H), left:min(right, W)].all())
    # beyond the image: the padding the model added, seen by the last tokens
    assert (bottom > H or right > W) == (case.startswith(("timm_vit_dynamic_pad", "hf_swin")))


def test_extent_of_an_overlapping_padded_projection_is_its_receptive_field():
    """The extent is the grid's receptive field, not a multiple of a patch: a
    5-pixel kernel, stride 3, one pixel of zero padding on a 20 x 23 image
    gives a 6 x 7 grid whose fields span rows -1..18 and columns -1..21."""
    conv = torch.nn.Conv2d(3, 2, kernel_size=5, stride=3, padding=1)
    x = _images((20, 23), n=1).requires_grad_(True)
    got = probe_patch_grid(conv, conv, x.detach(), "conv")
    assert got == ((6, 7), (-1, -1, 19, 22))
    (g,) = torch.autograd.grad(conv(x).square().sum(), x)
    seen = g.abs().sum(dim=(0, 1)) > 0
    assert bool(seen[:19, :22].all()) and not bool(seen[19:].any()) and not bool(seen[:, 22:].any())


def test_full_lrp_puts_nothing_where_no_token_looked():
    model, x = eva02_64(), _images((64, 64))
    for method in ("lrp", "attnlrp", "cplrp"):
        exp = explain_trace(model, x, method)
        assert exp.pixel_extent == (0, 0, 56, 56)
        assert bool((exp.maps[:, 56:, :] == 0).all()) and bool((exp.maps[:, :, 56:] == 0).all()), method
        assert bool((exp.maps[:, :56, :56] != 0).any()), method


# --------------------------------------------------------------------------
# Refusals: what the model refuses, in one line
# --------------------------------------------------------------------------
def test_sizes_the_model_refuses_are_refused_in_one_line():
    with pytest.raises(InputsError, match="patch embedding refuses 40x56") as err:
        explain(vit_dynamic(pad=False), _images((40, 56)), "rollout")  # no dynamic_img_pad: multiples only
    assert "\n" not in str(err.value)
    with pytest.raises(InputsError, match="patch embedding refuses 48x48") as err:
        explain(eva02_64(), _images((48, 48)), "rollout")  # built for 64 pixels, strict size
    assert "\n" not in str(err.value)
    with pytest.raises(InputsError, match="patch embedding refuses") as err:
        explain(hf_vit(), {"pixel_values": _images((4, 60)), "interpolate_pos_encoding": True}, "rollout")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------
# Pictures: the map placed on its extent, not stretched over the image
# --------------------------------------------------------------------------
def test_place_maps_puts_the_map_on_its_extent():
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(3))
    placed = place_maps(maps, (64, 64), (0, 0, 56, 56), fill=-1.0)  # EVA-02 at 64: floor
    torch.testing.assert_close(placed[:, :56, :56], upsample(maps, (56, 56)), atol=0, rtol=0)
    assert bool((placed[:, 56:, :] == -1).all()) and bool((placed[:, :, 56:] == -1).all())
    padded = place_maps(maps[:, :3], (40, 56), (0, 0, 48, 64))  # dynamic_img_pad: the padding cut off
    torch.testing.assert_close(padded, upsample(maps[:, :3], (48, 64))[:, :40, :56], atol=0, rtol=0)
    torch.testing.assert_close(place_maps(maps, (32, 32), None), upsample(maps, (32, 32)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not overlap"):
        place_maps(maps, (32, 32), (40, 0, 56, 32))


def test_overlay_leaves_the_pixels_no_token_saw_untouched():
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    heat = torch.rand(4, 4, generator=torch.Generator().manual_seed(4))
    (_, placed), = stream_overlays(image, {"image": heat}, extents=(0, 0, 56, 56))
    (_, stretched), = stream_overlays(image, {"image": heat})
    raw = (image * 255).round().astype(np.uint8)
    assert np.array_equal(placed[56:], raw[56:]) and np.array_equal(placed[:, 56:], raw[:, 56:])
    assert not np.array_equal(placed[:56, :56], raw[:56, :56])
    assert not np.array_equal(stretched[56:], raw[56:])  # stretching paints heat where no token looked
