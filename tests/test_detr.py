"""DETR and Conditional DETR, unmodified (METHODS_ICCV.md sections 4 and 7).

The engine's maps re-derived independently (transformers' own
``output_attentions`` on a copy, gradients of the explained logit, the
published generator as a plain loop over one sample's real tokens); every
attention method finite on (B, h, w); a padded batch of two sizes equal to
each image alone; the model left as found; the query API; the mask
pipeline against a hand-computed Otsu threshold and a hand-worked
upsampling; ``explain_detections``; the CLI end to end.

Comparisons of two paths (engine vs the published generator, batch vs
singles, strategies) run in float64 (``models64`` and the ``float64``
fixture: inputs drawn in float64), where they agree to ~1e-12 on any CPU
and are compared at 1e-9 (issue 20).
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from modules.adapters.detr import resolve_detection_index
from modules.detection import (detection_masks, explain_detections, masks_from_maps, otsu_binarize,
                               preprocess)
from modules.explain import explain, explain_trace
from modules.methods import ATTENTION_METHODS
from tests.test_generic import _assert_unchanged, _randomize, _snapshot

tf.logging.set_verbosity_error()
NQ, NCLS = 6, 3
SIZES = [(64, 96), (96, 64)]  # two image sizes (multiples of 32: the grids align)
PAD = (96, 96)
GRID = (3, 3)


def _config(cfg_cls, **kw):
    backbone = tf.ResNetConfig(num_channels=3, embedding_size=4, hidden_sizes=[4, 4, 8, 8], depths=[1, 1, 1, 1],
                               layer_type="basic", out_features=["stage4"])
    return cfg_cls(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=16,
                   encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=NQ, num_labels=NCLS, **kw)


def tiny(kind="detr", seed=0):
    cls, cfg = {"detr": (tf.DetrForObjectDetection, tf.DetrConfig),
                "conditional": (tf.ConditionalDetrForObjectDetection, tf.ConditionalDetrConfig)}[kind]
    torch.manual_seed(seed)
    return _randomize(cls(_config(cfg)), seed=seed, std=0.3)


KINDS = ("detr", "conditional")


@pytest.fixture(scope="module")
def models():
    return {k: tiny(k) for k in KINDS}


@pytest.fixture(scope="module")
def models64(models):
    """The same models in float64."""
    return {k: copy.deepcopy(m).double() for k, m in models.items()}


def padded_batch(seed=1):
    """Two images of different sizes, zero-padded bottom/right, with pixel_mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(2, 3, *PAD, dtype=torch.float32)
    mask = torch.zeros(2, *PAD, dtype=torch.long)
    for b, (h, w) in enumerate(SIZES):
        x[b, :, :h, :w] = torch.randn(3, h, w, generator=g, dtype=torch.float32)
        mask[b, :h, :w] = 1
    # the same pixels whatever the default dtype (drawn in float32, then cast)
    return {"pixel_values": x.to(torch.get_default_dtype()), "pixel_mask": mask}


def sample(inputs, b, crop=False):
    x, m = inputs["pixel_values"][b:b + 1], inputs["pixel_mask"][b:b + 1]
    if crop:
        h, w = SIZES[b]
        x, m = x[..., :h, :w], m[..., :h, :w]
    return {"pixel_values": x, "pixel_mask": m}


# --------------------------------------------------------------------------
# An independent route: transformers' own output_attentions, one sample, a loop
# --------------------------------------------------------------------------
def published_generator(model, inputs, b, query, cls=None, normalize=True, guard="published"):
    """METHODS_ICCV.md section 4 for sample ``b``, written from the text.

    The attentions come from transformers itself (``output_attentions=True``
    on a deepcopy in eager mode), the gradients from ``autograd.grad`` of
    ``pred_logits[b, q, c]``; the rules run unbatched over the sample's real
    image tokens only (padded tokens are no tokens), with R_ii = I, R_qq = I,
    R_qi = 0; no Eq. 11; NaN entries of dR_qi set to 0 (``guard="published"``:
    a NaN row of an R bar, from a row of R - I that sums to 0, makes the
    whole product NaN, so the whole addition is dropped) or NaN rows of the
    R bars set to 0 before the product (``guard="rows"``, the engine's
    default).  Returns the (h, w) map, padded cells 0, and the class.
    """
    m = copy.deepcopy(model).eval()
    m.config._attn_implementation = "eager"
    for sub in m.modules():
        if isinstance(getattr(sub, "config", None), tf.PretrainedConfig):
            sub.config._attn_implementation = "eager"
    out = m(**inputs, output_attentions=True)
    logits = out.logits
    if cls is None:
        cls = int(logits[b, query, :-1].argmax()) if isinstance(m, tf.DetrForObjectDetection) \
            else int(logits[b, query].argmax())
    enc, dec, cross = list(out.encoder_attentions), list(out.decoder_attentions), list(out.cross_attentions)
    grads = torch.autograd.grad(logits[b, query, cls], enc + dec + cross)
    g_enc, g_dec, g_cross = grads[:len(enc)], grads[len(enc):len(enc) + len(dec)], grads[len(enc) + len(dec):]
    # the real cells: pixel_mask downsampled (nearest) to the encoder's grid
    n_tok = enc[0].shape[-1]
    H, W = inputs["pixel_values"].shape[-2:]
    h, w = -(-H // 32), -(-W // 32)
    assert h * w == n_tok
    pm = inputs["pixel_mask"][b].float()
    rows = (torch.arange(h) * H / h).floor().long()
    cols = (torch.arange(w) * W / w).floor().long()
    real = pm[rows][:, cols].bool().reshape(-1)
    idx = real.nonzero()[:, 0]

    def abar(a, g, r, c):
        a, g = a[b][:, r][:, :, c], g[b][:, r][:, :, c]
        return (g * a).clamp(min=0).mean(dim=0)

    def rbar(R):
        eye = torch.eye(R.shape[0])
        rhat = R - eye
        out = rhat / rhat.sum(dim=-1, keepdim=True)
        return (torch.nan_to_num(out, nan=0.0) if guard == "rows" else out) + eye

    n, nq = idx.numel(), dec[0].shape[-1]
    all_q = torch.arange(nq)
    R_ii, R_qq, R_qi = torch.eye(n), torch.eye(nq), torch.zeros(nq, n)
    for a, g in zip(enc, g_enc):
        R_ii = R_ii + abar(a, g, idx, idx) @ R_ii
    for a, g, ac, gc in zip(dec, g_dec, cross, g_cross):
        A = abar(a, g, all_q, all_q)
        R_qq, R_qi = R_qq + A @ R_qq, R_qi + A @ R_qi
        Ac = abar(ac, gc, all_q, idx)
        d = (rbar(R_qq).T @ Ac @ rbar(R_ii)) if normalize else (R_qq.T @ Ac @ R_ii)
        R_qi = R_qi + torch.nan_to_num(d, nan=0.0)
    full = torch.zeros(h * w)
    full[idx] = R_qi[query]
    return full.reshape(h, w), cls


@pytest.mark.parametrize("kind", KINDS)
def test_generic_attribution_equals_the_published_generator(models64, kind, float64):
    model = models64[kind]
    inputs = padded_batch()
    for b, q in ((0, 2), (1, 4)):
        for guard, option in (("rows", True), ("published", "published")):
            ref, cls = published_generator(model, inputs, b, q, guard=guard)
            e = explain_trace(model, inputs, "generic_attribution", index=[(q, cls), (q, cls)], nan_guard=option)
            assert e.maps.shape == (2, *GRID)
            torch.testing.assert_close(e.maps[b], ref.detach(), atol=1e-12, rtol=1e-9)
        assert float(e.maps[b].abs().max()) > 0 or guard == "published"
        # the unpadded image alone, through transformers' route as well
        alone, _ = published_generator(model, sample(inputs, b, crop=True), 0, q, cls, guard="rows")
        torch.testing.assert_close(explain(model, sample(inputs, b, crop=True), index=[(q, cls)])[0], alone.detach(),
                                   atol=1e-12, rtol=1e-9)
        assert float(alone.detach().abs().max()) > 0
    # the ablation without normalisation
    ref, cls = published_generator(model, inputs, 0, 1, normalize=False)
    got = explain(model, inputs, "generic_attribution", index=[(1, cls)] * 2, normalize=False)[0]
    torch.testing.assert_close(got, ref.detach(), atol=1e-12, rtol=1e-9)


def test_the_published_nan_guard_drops_whole_additions(models64, float64):
    """DETR's first decoder layer sees zero query content, so d y / d A of its
    self-attention is constant along each row and a query whose heads all
    have a negative constant gets a zero row of R_qq - I.  The published
    generator then multiplies a NaN row through Eq. 10 and zeroes the whole
    addition; the engine's default zeroes only that row of R bar.  On this
    model (two heads) the published guard drops every addition of query 0 in
    image 0, and changes nothing in image 1 (no zero row there)."""
    model = models64["detr"]
    inputs = padded_batch()
    published = explain(model, inputs, index=0, nan_guard="published")
    rows = explain(model, inputs, index=0)
    assert float(published[0].abs().max()) == 0.0
    assert float(rows[0].abs().max()) > 0
    torch.testing.assert_close(published[1], rows[1])
    assert float(rows[1].abs().max()) > 0
    with pytest.raises(ValueError):
        explain(model, inputs, nan_guard="sometimes")


@pytest.mark.parametrize("kind", KINDS)
def test_every_attention_method_finite_and_model_unchanged(models, kind):
    model = models[kind]
    model.train()  # explanations run in eval mode and put the flag back
    before = _snapshot(model)
    inputs = padded_batch()
    for method in ATTENTION_METHODS:
        maps = explain(model, inputs, method)
        assert maps.shape == (2, *GRID), method
        assert bool(torch.isfinite(maps).all()), method
        assert float(maps[0, 2].abs().max()) == 0.0, method  # padded cells: image 0 is 64 high (2 of 3 rows)
        assert float(maps[1, :, 2].abs().max()) == 0.0, method  # image 1 is 64 wide (2 of 3 columns)
        if method != "attn_gradcam":  # GradCAM may clamp a whole map to 0 (negative head weights)
            assert float(maps.abs().max()) > 0, method
    _assert_unchanged(before, _snapshot(model))
    model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_each_image_alone(models64, kind, float64):
    """Every method: sample b of a padded batch of two sizes equals sample b
    run alone with the same padded input and pixel_mask (nothing crosses
    samples; the masks are honoured per sample)."""
    model = models64[kind]
    inputs = padded_batch()
    for method in ATTENTION_METHODS:
        batch = explain_trace(model, inputs, method, index=[3, 5])
        for b, q in enumerate((3, 5)):
            one = explain_trace(model, sample(inputs, b), method, index=q)
            torch.testing.assert_close(batch.maps[b], one.maps[0], atol=1e-12, rtol=1e-9)
            assert int(batch.target[b]) == int(one.target[0])


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_unpadded_images_when_the_backbone_ignores_padding(kind, float64):
    """A ResNet's features near the border see the padding, so a padded image
    is not the unpadded one for any method.  With the backbone's convolutions
    zeroed the features are constant (the frozen batch norms' bias), the
    transformer sees only position embeddings and the pixel_mask; then the
    padded batch's maps, cropped to each image's cells, equal the maps of
    the unpadded images alone — the key padding and the mask downsampling
    are honoured through the whole trace."""
    model = tiny(kind)
    with torch.no_grad():
        for name, p in model.model.backbone.named_parameters():
            if p.dim() == 4:
                p.zero_()
    inputs = padded_batch()
    for method in ATTENTION_METHODS:
        batch = explain(model, inputs, method, index=[(2, 0), (4, 1)])
        for b, (q, c) in enumerate(((2, 0), (4, 1))):
            h, w = SIZES[b][0] // 32, SIZES[b][1] // 32
            alone = explain(model, sample(inputs, b, crop=True), method, index=[(q, c)])
            assert alone.shape == (1, h, w)
            torch.testing.assert_close(batch[b, :h, :w], alone[0], atol=1e-12, rtol=1e-9)


def test_index_api(models64, float64):
    model = models64["detr"]
    inputs = padded_batch()
    with torch.no_grad():
        logits = model(**inputs).logits
    probs = logits.softmax(-1)[..., :-1]
    # default: the most confident query, its class over the object classes
    e = explain_trace(model, inputs)
    q = probs.amax(-1).argmax(-1)
    assert e.trace.coupled.outputs["image"].weights.argmax(1).tolist() == q.tolist()
    assert e.target.tolist() == [int(logits[b, q[b], :-1].argmax()) for b in range(2)]
    torch.testing.assert_close(e.score, logits[torch.arange(2), q, e.target])
    # queries only, per sample: classes by argmax excluding "no object"
    e = explain_trace(model, inputs, index=[1, 4])
    assert e.target.tolist() == [int(logits[0, 1, :-1].argmax()), int(logits[1, 4, :-1].argmax())]
    # (query, class) pairs; the last class ("no object") can be asked for explicitly
    e = explain_trace(model, inputs, index=[(0, NCLS), (5, 1)])
    torch.testing.assert_close(e.score, torch.stack([logits[0, 0, NCLS], logits[1, 5, 1]]))
    e2 = explain_trace(model, inputs, index=torch.tensor([[0, NCLS], [5, 1]]))
    torch.testing.assert_close(e.maps, e2.maps)
    with pytest.raises(ValueError):
        explain(model, inputs, index=NQ)
    for bad in ([0, 1, 2], [(0, NCLS + 1)], 1.5, True, [(-1, 0)], [(0, 1, 2)]):
        with pytest.raises(ValueError):
            resolve_detection_index(bad, logits, no_object=True)
    q, c = resolve_detection_index(np.array([[2, 1], [3, 0]]), logits, no_object=True)
    assert q.tolist() == [2, 3] and c.tolist() == [1, 0]
    # Conditional DETR: sigmoid scores, every class is an object class
    q, c = resolve_detection_index(None, logits, no_object=False)
    assert q.tolist() == logits.sigmoid().amax(-1).argmax(-1).tolist()
    assert c.tolist() == [int(logits[b, q[b]].argmax()) for b in range(2)]


# --------------------------------------------------------------------------
# explain_detections
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_explain_detections(models64, kind, float64):
    model = models64[kind]
    inputs = padded_batch()
    with torch.no_grad():
        out = model(**inputs)
    probs = out.logits.softmax(-1)[..., :-1] if kind == "detr" else out.logits.sigmoid()
    best = probs.amax(-1).flatten().sort().values
    threshold = float(best[best.numel() // 2 - 1] + best[best.numel() // 2]) / 2  # between two scores
    dets = explain_detections(model, inputs, threshold=threshold, image_sizes=[(300, 400), (40, 30)])
    assert len(dets) == 2
    for b, d in enumerate(dets):
        keep = (probs[b].amax(-1) > threshold).nonzero()[:, 0]
        assert d.queries.tolist() == keep.tolist()
        assert d.labels.tolist() == probs[b, keep].argmax(-1).tolist()
        torch.testing.assert_close(d.scores, probs[b, keep].amax(-1))
        torch.testing.assert_close(d.boxes, out.pred_boxes[b, keep])
        H, W = d.image_size
        cx, cy, w, h = out.pred_boxes[b, keep].unbind(-1)
        torch.testing.assert_close(d.boxes_xyxy, torch.stack([(cx - w / 2) * W, (cy - h / 2) * H,
                                                              (cx + w / 2) * W, (cy + h / 2) * H], -1))
        assert d.unpadded_size == SIZES[b] and d.input_size == PAD
        for k, (q, c) in list(enumerate(zip(d.queries.tolist(), d.labels.tolist())))[:2]:
            one = explain(model, sample(inputs, b), index=[(q, c)])[0]
            torch.testing.assert_close(d.maps[k], one, atol=1e-12, rtol=1e-9)
        assert detection_masks(d).shape == (d.queries.numel(), *d.image_size)
    # every strategy gives the same maps; a method without gradients too
    for strategy in ("batched", "repeat"):
        other = explain_detections(model, inputs, threshold=threshold, strategy=strategy)
        for a, o in zip(dets, other):
            torch.testing.assert_close(a.maps, o.maps, atol=1e-12, rtol=1e-9)
    raw = explain_detections(model, inputs, threshold=threshold, method="attn_last_layer")
    b0 = 0 if raw[0].queries.numel() else 1
    q0 = int(raw[b0].queries[0])
    torch.testing.assert_close(raw[b0].maps[0], explain(model, sample(inputs, b0), "attn_last_layer", index=q0)[0])
    # nothing above the threshold: empty results of the right shapes
    none = explain_detections(model, inputs, threshold=1.0)
    assert [d.queries.numel() for d in none] == [0, 0] and none[0].maps.shape == (0, *GRID)
    with pytest.raises(ValueError):
        explain_detections(model, inputs, threshold=1.5)


def test_preprocess_detr_transform():
    imgs = [Image.new("RGB", (100, 50), (255, 0, 0)), Image.new("RGB", (60, 90), (0, 0, 255))]
    feed, sizes = preprocess(imgs, shortest=64, longest=100)
    assert sizes == [(50, 100), (90, 60)]
    # 100x50 -> shorter side 64 would make the longer 128 > 100: shorter = round(100 * 50 / 100) = 50
    # 60x90 -> 64x96
    assert feed["pixel_values"].shape == (2, 3, 96, 100)
    assert feed["pixel_mask"][0].sum() == 50 * 100 and feed["pixel_mask"][1].sum() == 96 * 64
    red = (1.0 - 0.485) / 0.229
    assert abs(float(feed["pixel_values"][0, 0, 10, 10]) - red) < 1e-5
    assert float(feed["pixel_values"][0, :, 60:].abs().max()) == 0.0


def test_preprocess_with_an_image_processor():
    proc = tf.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    imgs = [Image.new("RGB", (100, 50)), Image.new("RGB", (60, 90))]
    feed, sizes = preprocess(imgs, proc)
    assert sizes == [(50, 100), (90, 60)]
    assert feed["pixel_values"].shape[:2] == (2, 3) and feed["pixel_mask"].shape[0] == 2
    assert feed["pixel_mask"].shape[1:] == feed["pixel_values"].shape[2:]


# --------------------------------------------------------------------------
# Masks from explanations (METHODS_ICCV.md section 7)
# --------------------------------------------------------------------------
def otsu_by_hand(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class
    variance w0 w1 (mu0 - mu1)^2 of {<= t} and {> t} (OpenCV's convention)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(float)
    p = hist / hist.sum()
    best, best_t = -1.0, 0
    for t in range(256):
        w0, w1 = p[:t + 1].sum(), p[t + 1:].sum()
        if w0 == 0 or w1 == 0:
            continue
        mu0 = (np.arange(t + 1) * p[:t + 1]).sum() / w0
        mu1 = (np.arange(t + 1, 256) * p[t + 1:]).sum() / w1
        var = w0 * w1 * (mu0 - mu1) ** 2
        if var > best:
            best, best_t = var, t
    return best_t


def test_otsu_mask_equals_the_threshold_by_hand():
    cam = torch.tensor([[0.10, 0.20, 0.90, 0.95],
                        [0.15, 0.60, 0.85, 1.00],
                        [0.05, 0.30, 0.40, 0.70]])
    u8 = ((cam - cam.min()) / (cam.max() - cam.min()) * 255).numpy().astype(np.uint8)  # truncation
    t = otsu_by_hand(u8)
    expected = np.where(u8 > t, 255.0, 0.0)
    got = otsu_binarize(cam)
    assert set(np.unique(got.numpy())) <= {0.0, 255.0}
    np.testing.assert_array_equal(got.numpy(), expected)
    assert 0 < expected.sum() < 255 * cam.numel()
    # restricted to the real cells of a padded map: the padding takes no part and stays background
    padded = torch.zeros(4, 5)
    padded[:3, :4] = cam
    valid = torch.zeros(4, 5, dtype=torch.bool)
    valid[:3, :4] = True
    got = otsu_binarize(padded, valid)
    np.testing.assert_array_equal(got[:3, :4].numpy(), expected)
    assert float(got[3].abs().sum() + got[:, 4].abs().sum()) == 0
    # a constant map gives no mask
    assert float(otsu_binarize(torch.ones(3, 3)).sum()) == 0


def test_mask_pipeline_by_hand():
    # a 1x2 grid, query 0 kept: Otsu -> [0, 255]; bilinear (align_corners False) to 1x4 samples the
    # grid at x = -0.25 (clamped: 0), 0.25, 0.75, 1.25 (clamped: 255) -> [0, 63.75, 191.25, 255] -> > 0:
    # [F, T, T, T]; crop to the unpadded 1x3: [F, T, T]; nearest resize to 1x6: [F, F, T, T, T, T].
    maps = torch.tensor([[[0.2, 0.9]], [[0.9, 0.2]]])
    keep = torch.tensor([True, False])
    masks = masks_from_maps(maps, keep, input_size=(1, 4), unpadded_size=(1, 3), image_size=(1, 6))
    assert masks.dtype == torch.bool and masks.shape == (2, 1, 6)
    assert masks[0, 0].tolist() == [False, False, True, True, True, True]
    assert not bool(masks[1].any())  # below the threshold: -1 everywhere, no mask
    # a 2x2 grid upsampled x2 with one foreground cell: value > 0 dilates it by half a cell (one pixel)
    maps = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    masks = masks_from_maps(maps, torch.tensor([True]), (4, 4), (4, 4), (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:, 1:] = True
    assert torch.equal(masks[0], expected)


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, models):
    path = tmp_path_factory.mktemp("detr_model")
    models["detr"].save_pretrained(path)
    return str(path)


def test_cli_end_to_end(model_dir, tmp_path, capsys):
    from baselines.DETR import detr_masks

    img = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out" / "masks.png"
    code = detr_masks.main(["--model-dir", model_dir, "--image", str(img), "--out", str(out), "--threshold", "0.0",
                            "--shortest", "64", "--longest", "96", "--device", "cpu", "--published-nan-guard"])
    assert code == 0
    with Image.open(out) as drawn:
        assert drawn.size == (90, 70)
    result = json.loads((tmp_path / "out" / "masks.json").read_text())
    dets = result["images"][0]["detections"]
    assert len(dets) == NQ  # threshold 0 keeps every query
    assert {"query", "label", "score", "box_cxcywh", "box_xyxy", "mask_pixels"} <= set(dets[0])
    assert result["method"] == "generic_attribution" and result["nan_guard"] == "published"
    # two images: one picture each, one JSON; the first run's JSON is replaced only with --overwrite (issue 27)
    two = ["--model-dir", model_dir, "--image", str(img), "--image", str(img), "--out", str(out), "--threshold", "0.5",
           "--shortest", "64", "--longest", "96", "--batch-size", "2"]
    capsys.readouterr()
    assert detr_masks.main(two) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert json.loads((tmp_path / "out" / "masks.json").read_text()) == result
    code = detr_masks.main(two + ["--overwrite"])
    assert code == 0
    assert (tmp_path / "out" / "masks-0.png").is_file() and (tmp_path / "out" / "masks-1.png").is_file()
    assert len(json.loads((tmp_path / "out" / "masks.json").read_text())["images"]) == 2


def test_cli_bad_input_exits_2(model_dir, tmp_path, capsys):
    from baselines.DETR import detr_masks

    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(img)
    bad_img = tmp_path / "bad.png"
    bad_img.write_text("not an image")
    vit_dir = tmp_path / "vit"
    tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(vit_dir)
    out = str(tmp_path / "o.png")
    cases = [
        ["--model-dir", str(tmp_path / "missing"), "--image", str(img), "--out", out],
        ["--model-dir", str(vit_dir), "--image", str(img), "--out", out],
        ["--model-dir", model_dir, "--image", str(bad_img), "--out", out],
        ["--model-dir", model_dir, "--image", str(tmp_path / "nope.png"), "--out", out],
        ["--model-dir", model_dir, "--image", str(img), "--out", str(tmp_path)],
        ["--model-dir", model_dir, "--image", str(img), "--out", out, "--device", "nodevice"],
        ["--model-dir", model_dir, "--image", str(img), "--out", out, "--method", "rollout", "--published-nan-guard"],
    ]
    for argv in cases:
        assert detr_masks.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)
    with pytest.raises(SystemExit) as exc:
        detr_masks.main(["--model-dir", model_dir, "--image", str(img), "--out", out, "--threshold", "1.5"])
    assert exc.value.code == 2
    assert not os.path.exists(out)
