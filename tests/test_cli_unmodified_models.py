"""The benchmark scripts on unmodified models (issue 21, item 5).

imagenet_seg_eval.py, generate_visualizations.py + perturbation_eval.py and
class_specificity.py take, besides the LRP copies, ``--model`` a timm model
name (a tiny VisionTransformer registered here, weights from a .pth or
.safetensors file) or a local Hugging Face ViTForImageClassification
directory: every method the model supports runs (an LRP method and an
attention method here), the maps the scripts use are ``explain(model, x,
method)`` of the model as its library built it, fed with the model's own
mean/std, and a method the model does not support is one line, exit 2.
"""
import json
import os
import sys

import h5py
import numpy as np
import pytest
import timm
import torch
import transformers as tf
from safetensors.torch import save_file
from timm.models import register_model

from baselines.ViT import class_specificity as CS
from baselines.ViT import generate_visualizations as gv
from baselines.ViT import imagenet_seg_eval as E
from baselines.ViT import perturbation_eval as pe
from baselines.ViT.perturbation_data import decode_maps, load_image, open_image_tree
from baselines.ViT.perturbation_metrics import normalize_input
from data.imagenet_seg import ImagenetSegmentation
from modules.explain import explain, upsample
from modules.generic import load_unmodified_image_classifier, model_logits, names_unmodified_model
from modules.methods import ATTENTION_METHODS, EVAL_START_LAYER

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # any pytest import mode
from perturbation_helpers import make_tree  # noqa: E402

tf.logging.set_verbosity_error()

TINY = "cli_test_tiny_vit"
TIMM_MEAN, TIMM_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HF_MEAN, HF_STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)

if not timm.is_model(TINY):
    @register_model
    def cli_test_tiny_vit(pretrained=False, **kwargs):
        """A tiny timm VisionTransformer (32x32 input, 8x8 patches) with its own data config."""
        from timm.models.vision_transformer import VisionTransformer

        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        model = VisionTransformer(**dict(dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                              mlp_ratio=2.0), **kwargs))
        model.pretrained_cfg = {"architecture": TINY, "input_size": (3, 32, 32), "mean": TIMM_MEAN,
                                "std": TIMM_STD, "crop_pct": 1.0, "interpolation": "bilinear",
                                "num_classes": model.num_classes}
        return model


def _randomize(model, seed=0):
    """Weights larger than the init, so predictions and maps differ between images."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def timm_weights(path, num_classes, fmt="pth"):
    """A random tiny timm model and its state_dict saved at ``path``."""
    model = _randomize(timm.create_model(TINY, pretrained=False, num_classes=num_classes))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return model, str(path)


def hf_dir(path, num_classes):
    """A random tiny Hugging Face ViT classifier with an image processor (its own mean/std), saved at ``path``."""
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=num_classes)
    model = _randomize(tf.ViTForImageClassification(cfg), seed=1)
    model.save_pretrained(str(path))
    tf.ViTImageProcessor(image_mean=list(HF_MEAN), image_std=list(HF_STD),
                         size={"height": 32, "width": 32}).save_pretrained(str(path))
    return model, str(path)


def one_line_error(capsys):
    """The one ``error:`` line on stderr (what was loaded may be said before it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.fixture
def attention_only(monkeypatch):
    """The tiny timm model's family offering only the attention methods, as
    a family the LRP scope does not reach would."""
    from modules.adapters.timm_models import TimmViTAdapter

    monkeypatch.setattr(TimmViTAdapter, "methods", lambda self: tuple(ATTENTION_METHODS))


def test_the_loader_decides_copy_or_unmodified(tmp_path):
    from baselines.ViT.ViT_LRP import MODEL_FACTORIES

    hf, path = hf_dir(tmp_path / "hf", 3)
    assert not names_unmodified_model("vit_base_patch16_224", "w.pth", MODEL_FACTORIES)  # a copy, as before
    assert names_unmodified_model("timm:vit_base_patch16_224", "w.pth", MODEL_FACTORIES)  # timm's own
    assert names_unmodified_model(TINY, "w.pth", MODEL_FACTORIES)
    assert names_unmodified_model(path, None, MODEL_FACTORIES)
    assert names_unmodified_model("vit_base_patch16_224", path, MODEL_FACTORIES)  # --weights an HF directory
    got = load_unmodified_image_classifier(path)
    assert got.name == "huggingface:ViTForImageClassification" and got.input_size == (32, 32)
    assert got.mean == HF_MEAN and got.std == HF_STD and got.num_classes == 3 and got.weights is None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(got.logits(x), hf(x).logits)
    assert got.map_shape("rollout") == (4, 4) and got.map_shape("lrp") == (32, 32)


# --------------------------------------------------------------------------
# Segmentation test
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    from data.synthetic import CLASS_NAMES, write_gtsegs_mat

    root = tmp_path_factory.mktemp("seg_unmodified")
    mat = write_gtsegs_mat(str(root / "val.mat"), 4, seed=0, size=40, split="val")  # 40 px: resized to 32
    timm_model, pth = timm_weights(root / "tiny.pth", len(CLASS_NAMES))
    hf_model, hf_path = hf_dir(root / "hf", len(CLASS_NAMES))
    return mat, (timm_model, pth), (hf_model, hf_path)


def _seg(mat, out, *extra):
    return E.main(["--imagenet-seg-path", mat, "--output-dir", str(out), "--device", "cpu", "--quiet",
                   "--num-overlays", "1", "--batch-size", "4", *extra])


def _spy_relevance_maps(monkeypatch, module, name):
    """Record what the script's map function got and returned."""
    calls = []
    original = getattr(module, name)

    def spy(model, images, method, *args, **kwargs):
        out = original(model, images, method, *args, **kwargs)
        calls.append((model, images.clone(), method, out))
        return out
    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("which", ["timm", "hf"])
def test_seg_eval_unmodified_model(seg, tmp_path, monkeypatch, which):
    mat, (timm_model, pth), (hf_model, hf_path) = seg
    model, argv = (timm_model, ["--model", TINY, "--weights", pth]) if which == "timm" else \
        (hf_model, ["--model", hf_path])
    mean, std = (TIMM_MEAN, TIMM_STD) if which == "timm" else (HF_MEAN, HF_STD)
    calls = _spy_relevance_maps(monkeypatch, E, "relevance_maps")
    methods = ["transformer_attribution", "rollout" if which == "timm" else "attn_gradcam"]
    for m in methods:
        res = _seg(mat, tmp_path / m, *argv, "--method", m)
        assert res["method"] == m and res["n_images"] == 4
        assert res["model"] == ("timm:" + TINY if which == "timm" else "huggingface:ViTForImageClassification")
        assert res["mean"] == list(mean) and res["std"] == list(std) and res["input_size"] == [32, 32]
        saved = json.loads((tmp_path / m / "results.json").read_text())
        assert all(0 <= saved["metrics"][k] <= 1 for k in ("pixel_accuracy", "mIoU", "mAP"))
        assert (tmp_path / m / f"results_{m}.json").is_file() and (tmp_path / m / "table.md").is_file()
        assert json.loads((tmp_path / m / "progress.json").read_text())["identity"]["model"] == res["model"]
    # the images the script explained: resized, normalised with the model's own mean/std
    ds = ImagenetSegmentation(mat, size=(32, 32), mean=mean, std=std)
    x = torch.stack([ds[i][0] for i in range(4)])
    assert [c[2] for c in calls] == methods
    for used, images, m, maps in calls:
        assert used.__class__ is model.__class__  # the library's own class, not a copy
        torch.testing.assert_close(images, x)
        direct = explain(model, x, m, start_layer=EVAL_START_LAYER.get(m, 0))
        assert direct.shape == (4, 4, 4)
        torch.testing.assert_close(maps, upsample(direct, (32, 32)))


def test_seg_eval_identity_names_the_model(seg, tmp_path, capsys):
    """Results of one model are not resumed or overwritten by another."""
    mat, (_, pth), (_, hf_path) = seg
    _seg(mat, tmp_path, "--model", TINY, "--weights", pth, "--method", "rollout")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _seg(mat, tmp_path, "--model", hf_path, "--method", "rollout", "--resume")
    assert e.value.code == 2
    err = one_line_error(capsys)
    assert "model" in err and "weights_sha256" in err


def test_seg_eval_refusals(seg, tmp_path, capsys, attention_only):
    mat, (_, pth), _ = seg
    for argv, message in ((["--model", TINY, "--weights", pth, "--method", "transformer_attribution"],
                           "does not support --method transformer_attribution; it supports: generic_attribution"),
                          (["--model", TINY, "--method", "rollout"], "needs --weights"),
                          (["--model", "no_such_model_name", "--weights", pth], "neither a local directory")):
        with pytest.raises(SystemExit) as e:
            _seg(mat, tmp_path / "o", *argv)
        assert e.value.code == 2
        assert message in one_line_error(capsys)
    assert not (tmp_path / "o" / "results.json").exists()
    res = _seg(mat, tmp_path / "all", "--model", TINY, "--weights", pth, "--all-methods", "--limit", "1",
               "--num-overlays", "0")
    assert res["methods"] == ["rollout", "attn_last_layer", "attn_gradcam", "generic_attribution"]


# --------------------------------------------------------------------------
# Perturbation test: generate_visualizations.py, then perturbation_eval.py
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pert(tmp_path_factory):
    root = tmp_path_factory.mktemp("pert_unmodified")
    tree = make_tree(root / "tree", classes=3, per_class=2)
    timm_model, st = timm_weights(root / "tiny.safetensors", 3, fmt="safetensors")
    hf_model, hf_path = hf_dir(root / "hf", 3)
    return tree, (timm_model, st), (hf_model, hf_path), root


def _gen(tree, out, *extra):
    return gv.main(["--imagenet-validation-path", tree, "--output-dir", str(out), "--batch-size", "6",
                    "--num-workers", "0", "--device", "cpu", *extra])


@pytest.mark.parametrize("which,method", [("timm", "transformer_attribution"), ("timm", "lrp"),
                                          ("hf", "attn_last_layer"), ("hf", "transformer_attribution")])
def test_perturbation_unmodified_model(pert, tmp_path, which, method):
    tree, (timm_model, st), (hf_model, hf_path), _ = pert
    model, argv = (timm_model, ["--model", TINY, "--weights", st]) if which == "timm" else \
        (hf_model, ["--model", hf_path])
    mean, std = (TIMM_MEAN, TIMM_STD) if which == "timm" else (HF_MEAN, HF_STD)
    out = tmp_path / "maps"
    assert _gen(tree, out, *argv, "--method", method) == 0
    with h5py.File(out / "results.hdf5", "r") as f:
        identity = json.loads(f.attrs["identity_json"])
        stored = decode_maps(f["vis"][()], f["vis_scale"][()], f["vis_offset"][()])
        pred = f["pred"][()]
    assert identity["model"] == ("timm:" + TINY if which == "timm" else "huggingface:ViTForImageClassification")
    assert identity["mean"] == list(mean) and identity["std"] == list(std) and identity["input_size"] == [32, 32]
    shape = (32, 32) if method == "lrp" else (4, 4)
    assert identity["map_shape"] == list(shape) and stored.shape == (6, *shape)
    # the stored maps are explain() of the model as built, on its own normalisation
    images = open_image_tree(tree)
    x = normalize_input(torch.stack([load_image(p, (32, 32)) for p, _ in images.samples]), mean, std)
    with torch.no_grad():
        expected_pred = model_logits(model, x).argmax(-1)
    assert pred.tolist() == expected_pred.tolist()
    direct = explain(model, x, method, index=expected_pred, start_layer=EVAL_START_LAYER.get(method, 0)).numpy()
    peak = np.abs(direct).reshape(6, -1).max(axis=1).reshape(-1, 1, 1)
    assert np.all(np.abs(stored - direct) <= 1e-3 * peak + 1e-30)  # float16 storage
    # the perturbation test loads the same unmodified model again from what the file records
    assert pe.main(["--results", str(out), "--neg", "--num-workers", "0", "--device", "cpu",
                    "--batch-size", "6"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == identity["model"] and len(res["negative"]["accuracy"]) == 10
    hits = np.load(out / "negative" / "model_hits.npy")
    targets = np.array([label for _, label in images.samples])
    assert hits.tolist() == (expected_pred.numpy() == targets).astype(float).tolist()


def test_perturbation_identity_names_the_model(pert, tmp_path, capsys):
    """Maps of one model are neither mixed with another's nor evaluated with another."""
    tree, (_, st), (_, hf_path), root = pert
    out = tmp_path / "maps"
    assert _gen(tree, out, "--model", TINY, "--weights", st, "--method", "rollout") == 0
    assert _gen(tree, out, "--model", TINY, "--weights", st, "--method", "rollout") == 0  # complete: nothing to do
    capsys.readouterr()
    assert _gen(tree, out, "--model", hf_path, "--method", "rollout") == 2
    assert "written with other arguments" in one_line_error(capsys)
    other_path = str(tmp_path / "other.pth")  # the same architecture, other weights
    torch.save({k: v + 1 for k, v in timm.create_model(TINY, num_classes=3).state_dict().items()}, other_path)
    capsys.readouterr()
    assert pe.main(["--results", str(out), "--weights", other_path, "--num-workers", "0", "--device", "cpu"]) == 2
    assert "weights hash differs" in one_line_error(capsys)
    assert pe.main(["--results", str(out), "--model", hf_path, "--weights", hf_path, "--num-workers", "0",
                    "--device", "cpu"]) == 2
    assert "is not the model" in one_line_error(capsys)


def test_generate_visualizations_refusals(pert, tmp_path, capsys, attention_only):
    tree, (_, st), _, _ = pert
    for argv, message in ((["--model", TINY, "--weights", st, "--method", "lrp"],
                           "does not support --method lrp; it supports: generic_attribution"),
                          (["--model", "timm:" + TINY, "--method", "rollout"], "needs --weights")):
        assert _gen(tree, tmp_path / "o", *argv) == 2
        assert message in one_line_error(capsys)
    assert not (tmp_path / "o" / "results.hdf5").exists()


def test_unsupported_models_are_one_line(pert, tmp_path, capsys):
    """A timm ResNet and a Hugging Face text classifier: not image transformers the engine explains."""
    tree, _, _, _ = pert
    resnet = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pth")
    bert = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(str(tmp_path / "bert"))
    for argv, message in ((["--model", "test_resnet", "--weights", str(tmp_path / "resnet.pth")], "ResNet"),
                          (["--model", str(tmp_path / "bert")], "explains image classifiers")):
        assert _gen(tree, tmp_path / "o", *argv, "--method", "rollout") == 2
        assert message in one_line_error(capsys)


# --------------------------------------------------------------------------
# Class specificity
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from data.scenes import main as scenes_main

    out = tmp_path_factory.mktemp("scenes_unmodified")
    assert scenes_main(["--out-dir", str(out), "--split", "val", "--count", "2", "--seed", "1", "--size", "48",
                        "--min-objects", "2", "--max-objects", "2", "--distinct-classes", "--separated",
                        "--formats", "coco", "--quiet"]) == 0
    timm_model, pth = timm_weights(out / "tiny.pth", 8)
    hf_model, hf_path = hf_dir(out / "hf", 8)
    return out, (timm_model, pth), (hf_model, hf_path)


def _cs(data, out, *extra):
    return CS.main(["--annotations", str(data / "annotations" / "instances_val.json"),
                    "--image-dir", str(data / "val"), "--output-dir", str(out), "--device", "cpu",
                    "--batch-size", "2", "--num-overlays", "1", "--quiet", *extra])


@pytest.mark.parametrize("which", ["timm", "hf"])
def test_class_specificity_unmodified_model(scenes, tmp_path, monkeypatch, which):
    data, (timm_model, pth), (hf_model, hf_path) = scenes
    model, argv = (timm_model, ["--model", TINY, "--weights", pth]) if which == "timm" else \
        (hf_model, ["--model", hf_path])
    mean, std = (TIMM_MEAN, TIMM_STD) if which == "timm" else (HF_MEAN, HF_STD)
    calls = []
    original = CS.explain

    def spy(m, x, method, index=None, start_layer=None):
        out = original(m, x, method, index=index, start_layer=start_layer)
        calls.append((m, x.clone(), method, index.clone(), start_layer, out))
        return out
    monkeypatch.setattr(CS, "explain", spy)
    res = _cs(data, tmp_path, *argv, "--methods", "transformer_attribution", "attn_last_layer")
    assert res["n_images"] == 2 and res["methods"] == ["transformer_attribution", "attn_last_layer"]
    assert res["model"].startswith("timm:" if which == "timm" else "huggingface:")
    assert res["input_size"] == [32, 32]
    for f in ("results.json", "table.md", "plot.png", "per_image.jsonl", "run.json"):
        assert (tmp_path / f).is_file(), f
    # the pictures as the model wants them, and explain() of the model as built for each class
    pairs, _ = CS.read_pairs(str(data / "annotations" / "instances_val.json"), str(data / "val"), (), 8)
    x = torch.stack([CS.load_pair(p, (32, 32), mean, std)[0] for p in pairs])
    assert len(calls) == 4
    for used, images, method, index, start, maps in calls:
        assert used is not None and used.__class__ is model.__class__
        torch.testing.assert_close(images, x)
        assert start == EVAL_START_LAYER.get(method, 0)
        torch.testing.assert_close(maps, explain(model, x, method, index=index, start_layer=start))
    # resuming checks the identity: another model is refused
    other = ["--model", hf_path] if which == "timm" else ["--model", TINY, "--weights", pth]
    with pytest.raises(SystemExit) as e:
        _cs(data, tmp_path, *other, "--methods", "transformer_attribution", "attn_last_layer", "--resume")
    assert e.value.code == 2


def test_class_specificity_offers_what_the_model_supports(scenes, tmp_path, capsys, attention_only):
    data, (_, pth), _ = scenes
    with pytest.raises(SystemExit) as e:
        _cs(data, tmp_path / "o", "--model", TINY, "--weights", pth, "--methods", "rollout", "cplrp")
    assert e.value.code == 2
    assert "does not support --methods cplrp" in one_line_error(capsys)
    res = _cs(data, tmp_path / "all", "--model", TINY, "--weights", pth, "--limit", "1", "--num-overlays", "0")
    assert res["methods"] == ["generic_attribution", "rollout", "attn_last_layer", "attn_gradcam"]


def test_a_swin_grid_through_the_scripts(pert, seg, tmp_path, monkeypatch):
    """Swin's maps come at its finest grid (8x8 for 32 px and 4-px patches,
    not a ViT's 4x4): stored at that shape, upsampled from it."""
    tree = pert[0]
    mat = seg[0]
    from data.synthetic import CLASS_NAMES

    cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                        num_labels=len(CLASS_NAMES))
    swin = _randomize(tf.SwinForImageClassification(cfg), seed=2)
    swin.save_pretrained(str(tmp_path / "swin"))
    swin_dir = str(tmp_path / "swin")
    assert _gen(tree, tmp_path / "maps", "--model", swin_dir, "--method", "transformer_attribution") == 0
    with h5py.File(tmp_path / "maps" / "results.hdf5", "r") as f:
        assert json.loads(f.attrs["identity_json"])["map_shape"] == [8, 8]
        stored = decode_maps(f["vis"][()], f["vis_scale"][()], f["vis_offset"][()])
    images = open_image_tree(tree)
    x = normalize_input(torch.stack([load_image(p, (32, 32)) for p, _ in images.samples]), (0.5,) * 3, (0.5,) * 3)
    direct = explain(swin, x, "transformer_attribution", start_layer=1).numpy()
    peak = np.abs(direct).reshape(len(x), -1).max(axis=1).reshape(-1, 1, 1)
    assert stored.shape == (6, 8, 8) and np.all(np.abs(stored - direct) <= 1e-3 * peak + 1e-30)
    calls = _spy_relevance_maps(monkeypatch, E, "relevance_maps")
    res = _seg(mat, tmp_path / "seg", "--model", swin_dir, "--method", "rollout", "--limit", "2")
    assert res["model"] == "huggingface:SwinForImageClassification" and res["n_images"] == 2
    (_, images, _, maps), = calls
    torch.testing.assert_close(maps, upsample(explain(swin, images, "rollout", start_layer=1), (32, 32)))


def test_perturbation_eval_of_copy_maps_refuses_an_unmodified_model(tmp_path, capsys):
    from perturbation_helpers import make_model_dir

    tree = make_tree(tmp_path / "tree", classes=2, per_class=1)
    model_dir = make_model_dir(tmp_path / "copy", num_classes=2, depth=1)
    out = tmp_path / "maps"
    assert _gen(tree, out, "--weights", model_dir, "--method", "rollout") == 0  # a copy, as before
    capsys.readouterr()
    assert pe.main(["--results", str(out), "--model", TINY, "--num-workers", "0", "--device", "cpu"]) == 2
    assert "holds maps of the LRP copy" in one_line_error(capsys)
