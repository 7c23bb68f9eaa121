"""Single-stream vision-language models (VisualBERT, ViLT), unmodified, and
CLIP's published convention (issue 11, items 3 and 6).

VisualBERT and ViLT: finite maps of the documented shapes for every
attention method, a padded batch of 3 equal to 3 singles, the model left as
found, and METHODS_ICCV.md section 3 (``generate_ours`` and its baselines)
re-stated here, unbatched, on attentions captured by the test's own hooks.
CLIP: the published notebook's rule (METHODS_ICCV.md section 5) re-derived
the same way.

Every test runs with torch's default dtype float64 (the ``float64``
fixture: models built and inputs drawn in float64), so two paths agree to
~1e-12 on any CPU and are compared at 1e-9 (issue 20).
"""
import json

import numpy as np
import pytest
import torch
import transformers as tf

from modules.explain import StreamMaps, explain, explain_trace
from modules.methods import ATTENTION_METHODS
from tests.test_generic import _assert_unchanged, _randomize, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("float64")
B, T, I, FEAT, VOCAB, LABELS = 3, 7, 5, 12, 50, 7
IMG, PATCH = 32, 8
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32, num_labels=LABELS)


def tiny_visualbert(seed=0):
    torch.manual_seed(seed)
    cfg = tf.VisualBertConfig(visual_embedding_dim=FEAT, **SMALL)
    return _randomize(tf.VisualBertForQuestionAnswering(cfg), seed=seed, std=0.2)


def tiny_vilt(seed=0):
    torch.manual_seed(seed)
    cfg = tf.ViltConfig(image_size=IMG, patch_size=PATCH, **SMALL)
    return _randomize(tf.ViltForQuestionAnswering(cfg), seed=seed, std=0.2)


def text_batch(g):
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def vb_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids, mask = text_batch(g)
    vmask = torch.ones(B, I, dtype=torch.long)
    vmask[2, 3:] = 0
    return dict(input_ids=ids, attention_mask=mask, visual_embeds=torch.randn(B, I, FEAT, generator=g),
                visual_attention_mask=vmask)


def vb_sample(inputs, b):
    n = int(inputs["attention_mask"][b].sum())
    k = int(inputs["visual_attention_mask"][b].sum())
    return dict(input_ids=inputs["input_ids"][b:b + 1, :n], attention_mask=inputs["attention_mask"][b:b + 1, :n],
                visual_embeds=inputs["visual_embeds"][b:b + 1, :k])


# image sizes of the three samples (H, W); the batch pads them to 32 x 48 with pixel_mask
SIZES = [(32, 48), (24, 32), (32, 16)]


def vilt_batch(seed=1, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    ids, mask = text_batch(g)
    H = max(h for h, _ in sizes)
    W = max(w for _, w in sizes)
    pix = torch.zeros(B, 3, H, W)
    pmask = torch.zeros(B, H, W, dtype=torch.long)
    for b, (h, w) in enumerate(sizes):
        pix[b, :, :h, :w] = torch.randn(3, h, w, generator=g)
        pmask[b, :h, :w] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, pixel_mask=pmask)


def vilt_sample(inputs, b, sizes=SIZES):
    n = int(inputs["attention_mask"][b].sum())
    h, w = sizes[b]
    return dict(input_ids=inputs["input_ids"][b:b + 1, :n], attention_mask=inputs["attention_mask"][b:b + 1, :n],
                pixel_values=inputs["pixel_values"][b:b + 1, :, :h, :w])


# --------------------------------------------------------------------------
# Shapes, batch invariance, model unchanged
# --------------------------------------------------------------------------
ANSWER = 1  # an answer whose GradCAM is not clamped away entirely (w_h < 0 for every head gives a 0 map)


def test_visualbert_every_method_batch_equals_singles_and_model_unchanged():
    model = tiny_visualbert()
    inputs = vb_batch()
    before = _snapshot(model)
    for method in ATTENTION_METHODS:
        got = explain(model, inputs, method, index=ANSWER)
        assert isinstance(got, StreamMaps), method
        assert got.text.shape == (B, T) and got.image.shape == (B, I), method
        assert torch.isfinite(got.text).all() and torch.isfinite(got.image).all(), method
        assert (got.image.abs().sum(1) > 0).all() and got.text.abs().sum() > 0, method
        for b in range(B):
            n = int(inputs["attention_mask"][b].sum())
            k = int(inputs["visual_attention_mask"][b].sum())
            one = explain(model, vb_sample(inputs, b), method, index=ANSWER)
            assert one.text.shape == (1, n) and one.image.shape == (1, k)
            torch.testing.assert_close(got.text[b, :n], one.text[0], atol=1e-10, rtol=1e-9, msg=method)
            torch.testing.assert_close(got.image[b, :k], one.image[0], atol=1e-10, rtol=1e-9, msg=method)
            assert torch.equal(got.text[b, n - 2:], torch.zeros(T - n + 2)), method  # pooled, [SEP], padding
            assert got.text[b, 0] == 0, method  # [CLS]
            assert torch.equal(got.image[b, k:], torch.zeros(I - k)), method
    _assert_unchanged(before, _snapshot(model))


def test_vilt_every_method_batch_with_pixel_mask_equals_singles_and_model_unchanged():
    model = tiny_vilt()
    inputs = vilt_batch()
    gh, gw = 32 // PATCH, 48 // PATCH
    before = _snapshot(model)
    for method in ATTENTION_METHODS:
        got = explain(model, inputs, method)
        assert isinstance(got, StreamMaps), method
        assert got.text.shape == (B, T) and got.image.shape == (B, gh, gw), method
        assert torch.isfinite(got.text).all() and torch.isfinite(got.image).all(), method
        for b, (h, w) in enumerate(SIZES):
            n = int(inputs["attention_mask"][b].sum())
            one = explain(model, vilt_sample(inputs, b), method)
            assert one.image.shape == (1, h // PATCH, w // PATCH)
            torch.testing.assert_close(got.text[b, :n], one.text[0], atol=1e-10, rtol=1e-9, msg=method)
            torch.testing.assert_close(got.image[b, :h // PATCH, :w // PATCH], one.image[0], atol=1e-10, rtol=1e-9,
                                       msg=method)
            outside = torch.ones(gh, gw, dtype=torch.bool)
            outside[:h // PATCH, :w // PATCH] = False
            assert torch.equal(got.image[b][outside], torch.zeros(int(outside.sum()))), method
            assert got.text[b, 0] == 0 and torch.equal(got.text[b, n - 1:], torch.zeros(T - n + 1)), method
    _assert_unchanged(before, _snapshot(model))
    assert "visual_embed" not in vars(model.vilt.embeddings)


def test_bad_inputs_one_line_errors():
    vb, vilt = tiny_visualbert(), tiny_vilt()
    inputs = vb_batch()
    left = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="pad the text on the right"):
        explain(vb, left)
    with pytest.raises(ValueError, match="visual_embeds"):
        explain(vb, {k: v for k, v in inputs.items() if k != "visual_embeds"})
    with pytest.raises(ValueError, match="features"):
        explain(vb, dict(inputs, visual_embeds=torch.randn(B, I, FEAT + 1)))
    v = vilt_batch()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        explain(vilt, dict(v, pixel_values=v["pixel_values"][..., :30], pixel_mask=v["pixel_mask"][..., :30]))
    with pytest.raises(ValueError, match="image_embeds"):
        explain(vilt, dict(v, image_embeds=torch.zeros(B, 4, 32)))
    with pytest.raises(ValueError, match="start_layer"):
        explain(vilt, v, start_layer=3)
    with pytest.raises(ValueError, match="clip_convention does not apply to ViltForQuestionAnswering"):
        explain(vilt, v, "generic_attribution", clip_convention="published")
    bypass = tf.VisualBertForQuestionAnswering(tf.VisualBertConfig(visual_embedding_dim=FEAT, bypass_transformer=True,
                                                                   **SMALL))
    with pytest.raises(TypeError, match="bypass_transformer"):
        explain(bypass, inputs)


# --------------------------------------------------------------------------
# METHODS_ICCV.md section 3, re-stated unbatched on the test's own captures
# --------------------------------------------------------------------------
def _capture(model, attention_class, inputs, wrap_visual=False):
    """Forward pass with hooks on every ``attention_class``'s dropout (the
    probabilities); the logits, the maps (in order), and ViLT's patch index."""
    records, hooks, visual = [], [], []
    for name, module in model.named_modules():
        if type(module).__name__ == attention_class:
            hooks.append(module.dropout.register_forward_hook(lambda m, a, out: records.append(out)))
    emb = getattr(getattr(model, "vilt", None), "embeddings", None)
    if wrap_visual:
        original = emb.visual_embed

        def visual_embed(*args, **kwargs):
            out = original(*args, **kwargs)
            visual.append(out)
            return out
        emb.visual_embed = visual_embed
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            logits = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
        if wrap_visual:
            del emb.visual_embed
    return logits, records, visual


def section3(model, attention_class, inputs, row, wrap_visual=False, index=None):
    """Batch 1: generate_ours, raw_attn, rollout (no row normalisation) and
    attn_gradcam of METHODS_ICCV.md section 3, each the explained row (N,).
    (A GradCAM map that is 0 everywhere is 0/0 = NaN in the published
    min-max; the engine gives 0, compared here as 0.)"""
    logits, A, visual = _capture(model, attention_class, inputs, wrap_visual)
    c = int(logits.argmax(-1)) if index is None else index
    G = torch.autograd.grad(logits[0, c], A)
    A = [a[0].detach() for a in A]
    G = [g[0] for g in G]
    N = A[0].shape[-1]
    R = torch.eye(N)
    for a, g in zip(A, G):
        R = R + (g * a).clamp(min=0).mean(dim=0) @ R
    ours = R[row].clone()
    ours[row] = 0
    raw = A[-1].mean(dim=0)[row].clone()
    raw[row] = 0
    roll = torch.eye(N)
    for a in A:
        roll = (a.mean(dim=0) + torch.eye(N)) @ roll
    cam = (A[-1] * G[-1].mean(dim=[1, 2], keepdim=True)).mean(dim=0).clamp(min=0)
    cam = torch.nan_to_num((cam - cam.min()) / (cam.max() - cam.min()))
    rows = {"generic_attribution": ours, "attn_last_layer": raw, "rollout": roll[row], "attn_gradcam": cam[row]}
    return rows, visual


def test_visualbert_equals_section3_restated():
    model = tiny_visualbert()
    inputs = vb_batch()
    maps = {m: explain(model, inputs, m, index=ANSWER) for m in ATTENTION_METHODS}
    assert (maps["attn_gradcam"].image.sum(1) > 0).all()
    for b in range(B):
        one = vb_sample(inputs, b)
        n = one["input_ids"].shape[1]
        cls_index = n - 2  # MMF and transformers: input_mask.sum(1) - 2
        want, _ = section3(model, "VisualBertSelfAttention", one, cls_index, index=ANSWER)
        k = one["visual_embeds"].shape[1]
        for method, row in want.items():
            got = maps[method]
            torch.testing.assert_close(got.text[b, 1:cls_index], row[1:cls_index], atol=1e-10, rtol=1e-9, msg=method)
            torch.testing.assert_close(got.image[b, :k], row[n:], atol=1e-10, rtol=1e-9, msg=method)


def test_visualbert_explains_the_pooled_token_not_cls():
    model = tiny_visualbert()
    inputs = vb_sample(vb_batch(), 0)
    exp = explain_trace(model, inputs, "attn_last_layer")
    w = exp.trace.streams["joint"].readout.weights
    assert int(w.argmax()) == T - 2 and float(w.sum()) == 1.0
    # the explained logit is the model's own: its gathered token's head output
    assert torch.equal(exp.target, model(**inputs).logits.argmax(-1))


def test_vilt_equals_section3_restated():
    model = tiny_vilt()
    inputs = vilt_batch()
    gh, gw = 32 // PATCH, 48 // PATCH
    for b in range(B):
        one = vilt_sample(inputs, b)
        n = one["input_ids"].shape[1]
        torch.manual_seed(100 + b)  # the same patch order (visual_embed draws it) in every run
        want, visual = section3(model, "ViltSelfAttention", one, 0, wrap_visual=True)
        _, x_mask, (patch_index, (h, w)) = visual[0]
        assert torch.equal(x_mask, torch.ones_like(x_mask))
        for method in ATTENTION_METHODS:
            torch.manual_seed(100 + b)
            got = explain(model, one, method)
            row = want[method]
            torch.testing.assert_close(got.text[0, 1:n - 1], row[1:n - 1], atol=1e-10, rtol=1e-9, msg=method)
            grid = torch.zeros(h, w)
            grid[patch_index[0, :, 0], patch_index[0, :, 1]] = row[n + 1:]
            torch.testing.assert_close(got.image[0], grid, atol=1e-10, rtol=1e-9, msg=method)
    # the patch order really is shuffled by the model (so the grid placement matters)
    _, _, visual = _capture(model, "ViltSelfAttention", vilt_sample(inputs, 0), wrap_visual=True)
    cells = visual[0][2][0][0]
    assert not torch.equal(cells[:, 0] * gw + cells[:, 1], torch.arange(cells.shape[0]))


# --------------------------------------------------------------------------
# CLIP as the published notebook does it (METHODS_ICCV.md section 5)
# --------------------------------------------------------------------------
def tiny_clip():
    V = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    text = dict(vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2,
                pad_token_id=0, **V)
    cfg = tf.CLIPConfig(text_config=text, vision_config=dict(image_size=IMG, patch_size=PATCH, **V), projection_dim=16)
    torch.manual_seed(0)
    return _randomize(tf.CLIPModel(cfg), std=0.2)


def clip_inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB - 2, (B, T), generator=g)
    ids[:, 0] = VOCAB - 2  # SOT
    eot = [6, 4, 3]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, e in enumerate(eot):
        ids[b, e] = VOCAB - 1  # EOT: the largest id, as in CLIP's vocabulary
        ids[b, e + 1:] = 0
        mask[b, :e + 1] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(B, 3, IMG, IMG, generator=g)}, eot


def published_clip(model, inputs):
    """The notebook's ``interpret`` (start_layer = last block) on the test's
    own hooks: per tower R = I + Abar_last (R = I before it), image
    R[:, 0, 1:], text R[b, EOT, 1:EOT] / its sum, EOT = argmax of the ids."""
    records = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__ == "CLIPAttention":
            hooks.append(module.register_forward_hook(
                lambda m, a, out, name=name: records.__setitem__(name, out[1])))
    model.set_attn_implementation("eager")
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    score = out.logits_per_image.diagonal().sum()  # sum_i logits_per_image[i, i]
    maps = {}
    for tower in ("vision_model", "text_model"):
        names = [n for n in records if n.startswith(tower)]
        last = records[names[-1]]
        grad = torch.autograd.grad(score, last, retain_graph=True)[0]
        N = last.shape[-1]
        R = torch.eye(N).expand(B, N, N) + torch.bmm((grad * last).clamp(min=0).mean(dim=1), torch.eye(N).expand(B, N, N))
        maps[tower] = R.detach()
    image = maps["vision_model"][:, 0, 1:].reshape(B, IMG // PATCH, IMG // PATCH)
    eot = inputs["input_ids"].argmax(dim=-1)
    text = torch.zeros(B, T)
    for b in range(B):
        e = int(eot[b])
        row = maps["text_model"][b, e, 1:e]
        text[b, 1:e] = row / row.sum()
    return image, text


def test_clip_published_convention_restated():
    model = tiny_clip()
    inputs, eot = clip_inputs()
    before = _snapshot(model)
    got = explain(model, inputs, "generic_attribution", clip_convention="published")
    after = _snapshot(model)
    _assert_unchanged(before, after)
    image, text = published_clip(tiny_clip(), inputs)
    torch.testing.assert_close(got.image, image, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(got.text, text, atol=1e-10, rtol=1e-9)
    for b, e in enumerate(eot):
        torch.testing.assert_close(got.text[b].sum(), torch.tensor(1.0))
        assert got.text[b, 0] == 0 and torch.equal(got.text[b, e:], torch.zeros(T - e))
    # today's behaviour is kept as the default ("hf"), and differs
    default = explain(model, inputs, "generic_attribution")
    assert torch.equal(default.text, explain(model, inputs, "generic_attribution", clip_convention="hf").text)
    assert not torch.allclose(default.text, got.text)
    assert default.text[0, eot[0]] > 0  # the EOS row over every column, its own entry kept
    # an explicit start layer still wins
    full = explain(model, inputs, "generic_attribution", clip_convention="published", start_layer=0)
    assert not torch.allclose(full.image, got.image)


def test_clip_convention_refused_where_it_does_not_apply():
    model = tiny_clip()
    inputs, _ = clip_inputs()
    with pytest.raises(ValueError, match="use one of"):
        explain(model, inputs, "generic_attribution", clip_convention="notebook")
    with pytest.raises(ValueError, match="takes no option"):
        explain(model, inputs, "rollout", clip_convention="published")
    siglip = tf.SiglipModel(tf.SiglipConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=64),
        vision_config=dict(image_size=IMG, patch_size=PATCH, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=64)))
    from tests.test_lxmert import batch as lxmert_batch, tiny_lxmert

    with pytest.raises(ValueError, match="clip_convention does not apply to LxmertForQuestionAnswering"):
        explain(tiny_lxmert(), lxmert_batch(), "generic_attribution", clip_convention="published")
    with pytest.raises(ValueError, match="CLIPModel only"):
        explain(siglip, {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]},
                "generic_attribution", clip_convention="published")


# --------------------------------------------------------------------------
# Pictures (modules/pictures.py)
# --------------------------------------------------------------------------
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "on", "the", "table", "?", "color", "##s", "dog"]


def tokenizer():
    tok = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})  # a dict: vocab_file= loses it in tf 5
    assert tok.convert_tokens_to_ids("table") == WORDS.index("table")
    return tok


def test_box_map_colours_each_box_by_its_relevance():
    import matplotlib

    from modules.pictures import box_map

    img = np.full((40, 60, 3), 128, dtype=np.uint8)
    boxes = np.array([[2, 2, 20, 20], [30, 10, 55, 35]], dtype=np.float32)
    out = box_map(img, boxes, torch.tensor([0.1, 0.9]), alpha=0.5, thickness=1)
    assert out.shape == img.shape and out.dtype == np.uint8
    cmap = matplotlib.colormaps["jet"]
    lo = tuple(int(round(255 * c)) for c in cmap(0.0)[:3])
    hi = tuple(int(round(255 * c)) for c in cmap(1.0)[:3])
    assert tuple(out[2, 10]) == lo and tuple(out[10, 30]) == hi  # outlines: min-max colours
    assert tuple(out[38, 2]) == (128, 128, 128)  # outside every box: the picture
    inner_hi, inner_lo = out[20, 40].astype(int), out[10, 10].astype(int)
    assert np.abs(inner_hi - 128).sum() > np.abs(inner_lo - 128).sum()  # the relevant box is more opaque
    same = box_map(img, boxes / np.array([60, 40, 60, 40]), [0.1, 0.9], alpha=0.5, thickness=1, normalized=True)
    assert np.array_equal(same, out)
    with pytest.raises(ValueError, match="2 boxes but 3 scores"):
        box_map(img, boxes, [1, 2, 3])


def test_pictures_write_real_png_and_html(tmp_path):
    import cv2

    from modules.pictures import question_words, save_figure, save_text_html, stream_overlays

    words, scores = question_words(tokenizer(), "what colors dog?", torch.tensor([0, .2, .5, .7, .1, .3, 0]))
    assert words == ["what", "colors", "dog", "?"] and scores == pytest.approx([.2, .7, .1, .3])  # max over pieces
    img = np.random.default_rng(0).random((32, 48, 3)).astype(np.float32)
    panels = stream_overlays(img, {"image": torch.rand(4, 6), "other": np.ones((2, 3))})
    assert [p[0] for p in panels] == ["image", "other"] and panels[0][1].shape == (32, 48, 3)
    png = save_figure(str(tmp_path / "f.png"), panels, words, scores, title="Q")
    pic = cv2.imread(png)
    assert pic is not None and pic.shape[0] > 50 and pic.shape[1] > 100
    html = open(save_text_html(str(tmp_path / "t.html"), words, scores, title="Q")).read()
    assert html.count('class="word"') == 4 and "colors" in html


# --------------------------------------------------------------------------
# The CLI: baselines/LXMERT/explain_vqa.py
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    tok = tokenizer()
    lx = tf.LxmertForQuestionAnswering(tf.LxmertConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=2, x_layers=2,
        r_layers=1, num_qa_labels=LABELS, visual_feat_dim=FEAT, visual_pos_dim=4))
    dirs = {}
    for name, model in (("lxmert", _randomize(lx, std=0.2)), ("visual_bert", tiny_visualbert()),
                        ("vilt", tiny_vilt())):
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = str(d)
    loaded = tf.AutoTokenizer.from_pretrained(dirs["lxmert"], local_files_only=True)
    assert loaded.convert_tokens_to_ids("table") == WORDS.index("table")
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8)).save(root / "img.png")
    rng = np.random.default_rng(2)
    boxes = np.array([[0, 0, 30, 20], [10, 5, 59, 39], [20, 20, 40, 39]], dtype=np.float32)
    np.savez(root / "feats.npz", features=rng.standard_normal((3, FEAT)).astype(np.float32), boxes=boxes)
    with open(root / "boxes.json", "w") as f:
        json.dump({"boxes": boxes.tolist(), "features": rng.standard_normal((3, FEAT)).tolist()}, f)
    np.savez(root / "nobox.npz", features=np.zeros((3, FEAT), dtype=np.float32))
    np.savez(root / "wide.npz", features=np.zeros((3, FEAT + 1), dtype=np.float32), boxes=boxes)
    np.savez(root / "outside.npz", features=np.zeros((3, FEAT), dtype=np.float32), boxes=boxes * 2)
    (root / "notimage.png").write_text("no picture")
    return root, dirs


def _run(argv, capsys):
    from baselines.LXMERT.explain_vqa import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.mark.parametrize("kind,regions", [("lxmert", "--features"), ("visual_bert", "--boxes"), ("vilt", None)])
def test_cli_writes_png_and_html(model_dirs, tmp_path, capsys, kind, regions):
    import cv2

    root, dirs = model_dirs
    argv = ["--model-dir", dirs[kind], "--image", root / "img.png", "--question", "what is on the table?",
            "--out", tmp_path / "out.png", "--method", "attn_last_layer" if kind == "vilt" else "generic_attribution"]
    if regions:
        argv += [regions, root / ("feats.npz" if regions == "--features" else "boxes.json")]
    code, out = _run(argv, capsys)
    assert code == 0, out.err
    assert cv2.imread(str(tmp_path / "out.png")) is not None
    html = (tmp_path / "out.html").read_text()
    assert html.count('class="word"') == 6 and "table" in html


def test_cli_bad_input_exits_2_with_one_line(model_dirs, tmp_path, capsys):
    root, dirs = model_dirs
    base = ["--image", root / "img.png", "--question", "what is on the table?", "--out", tmp_path / "o.png"]
    cases = [
        (["--model-dir", dirs["lxmert"]], "reads region features"),
        (["--model-dir", dirs["vilt"], "--features", root / "feats.npz"], "drop --boxes"),
        (["--model-dir", dirs["lxmert"], "--features", root / "wide.npz"], "expects 12"),
        (["--model-dir", dirs["visual_bert"], "--features", root / "nobox.npz"], "no array boxes"),
        (["--model-dir", dirs["lxmert"], "--features", root / "outside.npz"], "outside the image"),
        (["--model-dir", dirs["lxmert"], "--boxes", root / "missing.json"], "not found"),
        (["--model-dir", root / "nowhere", "--features", root / "feats.npz"], "no such directory"),
        (["--model-dir", root, "--features", root / "feats.npz"], "no config.json"),
        (["--model-dir", dirs["lxmert"], "--features", root / "feats.npz", "--index", "99"], "outside 0..6"),
    ]
    for extra, message in cases:
        code, out = _run(base + extra, capsys)
        assert code == 2, (extra, out.err)
        assert out.err.startswith("error:") and out.err.count("\n") == 1 and message in out.err, (extra, out.err)
    code, out = _run(["--model-dir", dirs["vilt"], "--image", root / "notimage.png", "--question", "q?", "--out",
                      tmp_path / "o.png"], capsys)
    assert code == 2 and "not an image" in out.err
    code, out = _run(["--model-dir", dirs["vilt"], "--image", root / "img.png", "--question", " ", "--out",
                      tmp_path / "o.png"], capsys)
    assert code == 2 and "empty" in out.err
    assert not (tmp_path / "o.png").exists()


def test_vilt_subsampled_patches_land_on_their_cells():
    """max_image_length > 0: ViLT sees a random subset of the patches; only
    their cells get relevance, the rest read 0."""
    model = tiny_vilt()
    model.config.max_image_length = 5
    one = vilt_sample(vilt_batch(), 0)
    torch.manual_seed(7)
    exp = explain_trace(model, one, "generic_attribution")
    image = exp.maps.image[0]
    assert image.shape == (4, 6) and torch.isfinite(image).all()
    assert int((image != 0).sum()) == 5
    torch.manual_seed(7)
    want, visual = section3(model, "ViltSelfAttention", one, 0, wrap_visual=True)
    cells = visual[0][2][0][0]
    n = one["input_ids"].shape[1]
    torch.testing.assert_close(image[cells[:, 0], cells[:, 1]], want["generic_attribution"][n + 1:], atol=1e-10,
                               rtol=1e-9)
