"""The segmentation-test CLI end to end on a few generated images with a tiny model."""
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from baselines.ViT import imagenet_seg_eval as E
from baselines.ViT.train_synthetic import save_model
from baselines.ViT.ViT_explanation_generator import explain, upsample
from baselines.ViT.ViT_LRP import VisionTransformer
from modules.checkpoints import weights_sha256
from data.imagenet_seg import ImagenetSegmentation
from data.synthetic import CLASS_NAMES, write_gtsegs_mat
from modules.methods import METHOD_NAMES

KW = dict(img_size=32, patch_size=8, in_chans=3, num_classes=len(CLASS_NAMES), embed_dim=24, depth=2, num_heads=2,
          mlp_ratio=2.0, qkv_bias=True, distilled=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    model = VisionTransformer(**KW)
    with torch.no_grad():  # larger weights than the init, so the maps are not flat
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    save_model(model, str(root / "model"), {"architecture": "tiny_test_vit", "model_kwargs": KW,
                                            "mean": [0.5] * 3, "std": [0.5] * 3, "class_names": list(CLASS_NAMES)})
    mat = write_gtsegs_mat(str(root / "val.mat"), 10, seed=0, size=40, split="val")  # 40 px: resized to 32
    return root, str(root / "model"), mat


def _run(setup, out, *extra):
    root, weights, mat = setup
    return E.main(["--imagenet-seg-path", mat, "--weights", weights, "--output-dir", str(out), "--device", "cpu",
                   "--quiet", *extra])


def test_all_methods_end_to_end(setup, tmp_path, capsys):
    summary = _run(setup, tmp_path, "--all-methods", "--batch-size", "4", "--num-overlays", "3")
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["methods"]) == set(METHOD_NAMES) and res["n_images"] == 10
    assert res["model"] == "tiny_test_vit" and res["input_size"] == [32, 32]
    assert res["weights_sha256"] == weights_sha256(setup[1])
    assert res["seconds"] > 0 and 0 <= res["classification_accuracy"] <= 1
    for m in METHOD_NAMES:
        r = res["results"][m]
        for key in ("pixel_accuracy", "mIoU", "mAP"):
            assert 0 <= r[key] <= 1 and np.isfinite(r[key])
        one = json.loads((tmp_path / f"results_{m}.json").read_text())
        assert one["method"] == m and one["metrics"]["mAP"] == r["mAP"] and one["n_images"] == 10
        assert one["start_layer"] == (1 if m in ("transformer_attribution", "rollout") else 0)
        assert (tmp_path / "overlays" / m / "00002.png").is_file()
        assert E.METHODS[m].label in printed
    assert (tmp_path / "overlays" / "grid.png").is_file() and (tmp_path / "table.md").is_file()
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["complete"] and progress["n_images_done"] == 10
    assert summary["results"]["rollout"]["mIoU"] == res["results"]["rollout"]["mIoU"]


def test_metrics_follow_the_protocol(setup, tmp_path):
    """Recompute one method by hand: predicted class, start layer 1, bilinear upsampling,
    per-image min-max, mean threshold, pooled IoU, per-image sklearn AP.

    The maps are explained in the script's batches of 3, so both sides hold the same
    float32 bits on any CPU (a batch of 1 rounds differently: mAP moved by 1e-4 under
    ATEN_CPU_CAPABILITY=default, its near-tied pixels reordered); then min-max in
    float64 and the normalised map kept in float32, as the script stores it, so the
    metrics agree to 1e-12."""
    root, weights, mat = setup
    res = _run(setup, tmp_path, "--method", "transformer_attribution", "--batch-size", "3")
    from baselines.ViT.train_synthetic import load_synthetic_model

    model = load_synthetic_model(weights)
    ds = ImagenetSegmentation(mat, size=(32, 32))
    inter, union, correct, total, aps = np.zeros(2), np.zeros(2), 0, 0, []
    for start in range(0, len(ds), 3):
        items = [ds[i] for i in range(start, min(start + 3, len(ds)))]
        x = torch.stack([item[0] for item in items])
        cams = upsample(explain(model, x, "transformer_attribution", start_layer=1), (32, 32)).numpy()
        for cam, (_, gt, _) in zip(cams.astype(np.float64), items):
            cam = ((cam - cam.min()) / (cam.max() - cam.min())).astype(np.float32)  # stored as float32
            pred, g = cam > cam.mean(), gt.numpy() == 1
            cam = cam.astype(np.float64)
            correct += (pred == g).sum()
            total += g.size
            inter += [(~pred & ~g).sum(), (pred & g).sum()]
            union += [(~pred | ~g).sum(), (pred | g).sum()]
            aps.append(average_precision_score(np.r_[~g.ravel(), g.ravel()], np.r_[1 - cam.ravel(), cam.ravel()]))
    m = res["metrics"]
    assert res["method"] == "transformer_attribution" and res["n_images"] == 10
    assert m["pixel_accuracy"] == pytest.approx(correct / total, abs=1e-12)
    assert m["mIoU"] == pytest.approx(np.mean(inter / union), abs=1e-12)
    assert m["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)


def test_limit_and_resume_after_interruption(setup, tmp_path, monkeypatch):
    full = _run(setup, tmp_path / "full", "--method", "rollout", "--batch-size", "3", "--limit", "9")
    assert full["n_images"] == 9
    calls = {"n": 0}
    original = E.relevance_maps

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(E, "relevance_maps", dies_on_third_batch)
    out = tmp_path / "cut"
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line, exit 130, the finished batches kept
        _run(setup, out, "--method", "rollout", "--batch-size", "3", "--limit", "9", "--save-every", "0")
    assert e.value.code == 130
    assert json.loads((out / "progress.json").read_text())["n_images_done"] == 6
    monkeypatch.setattr(E, "relevance_maps", original)
    resumed = _run(setup, out, "--method", "rollout", "--batch-size", "3", "--limit", "9", "--resume")
    assert resumed["n_images"] == 9
    for key in ("pixel_accuracy", "mIoU", "mAP"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], abs=1e-12)
    # a progress file of another run is refused
    with pytest.raises(SystemExit) as e:
        _run(setup, out, "--method", "lrp", "--batch-size", "3", "--limit", "9", "--resume")
    assert e.value.code == 2


@pytest.mark.parametrize("change,message", [
    ({"--imagenet-seg-path": "missing.mat"}, "missing.mat: file not found"),
    ({"--weights": "no_such_checkpoint.pth"}, "checkpoint not found"),
])
def test_bad_input_exits_2_with_one_line(setup, tmp_path, capsys, change, message):
    root, weights, mat = setup
    args = {"--imagenet-seg-path": mat, "--weights": weights}
    args.update({k: str(tmp_path / v) for k, v in change.items()})
    with pytest.raises(SystemExit) as e:
        E.main([a for kv in args.items() for a in kv] + ["--output-dir", str(tmp_path), "--device", "cpu", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_checkpoint_that_does_not_fit_the_factory_model(setup, tmp_path, capsys):
    root, weights, mat = setup
    bad = tmp_path / "tiny.pth"
    torch.save(VisionTransformer(**KW).state_dict(), bad)
    with pytest.raises(SystemExit) as e:
        E.main(["--imagenet-seg-path", mat, "--weights", str(bad), "--model", "vit_small_patch16_224",
                "--output-dir", str(tmp_path), "--device", "cpu", "--quiet"])
    assert e.value.code == 2 and "does not fit" in capsys.readouterr().err


def test_unknown_method_is_refused(setup, tmp_path):
    with pytest.raises(SystemExit) as e:
        _run(setup, tmp_path, "--method", "saliency")
    assert e.value.code == 2


def test_table_has_paper_columns_for_vit_base():
    scores = {"rollout": {"pixel_accuracy": 0.5, "mAP": 0.25, "mIoU": 0.125}}
    table = E.format_table(scores, "t", paper=True)
    assert "| Rollout | 50.00 | 25.00 | 12.50 | 73.54 / 84.76 / 55.42 |" in table
