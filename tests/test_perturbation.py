"""Perturbation test (METHODS §5): AUC, pixel removal, the toy-model check and
perturbation_eval.py end to end."""
import json
import os
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from baselines.ViT import generate_visualizations as gv
from baselines.ViT import perturbation_eval as pe
from baselines.ViT.perturbation_metrics import (PERTURBATION_STEPS, auc, pixels_to_remove, prepare_maps,
                                                removal_ranks, remove_pixels, select_positions)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # any pytest import mode
from perturbation_helpers import make_model_dir, make_tree  # noqa: E402


# -- pure functions ----------------------------------------------------------------------------
def test_auc_matches_hand_computed_trapezoid():
    # steps 0, 0.1, ..., 0.9: area = 0.1 * sum of the mean of neighbours
    acc = [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # 0.1 * ((1 + .5)/2 + (.5 + .5)/2 + (.5 + 0)/2) = 0.1 * 1.5 = 0.15
    assert auc(acc) == pytest.approx(15.0)
    assert auc([1.0] * 10) == pytest.approx(90.0)  # the maximum
    assert auc([0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0]) == pytest.approx(
        100 * 0.1 * (0.75 + 0.65 + 0.55 + 0.45 + 0.35 + 0.25 + 0.15 + 0.05 + 0.0))
    assert auc([0.2, 0.4], steps=[0.0, 0.5]) == pytest.approx(100 * 0.5 * 0.3)
    with pytest.raises(ValueError):
        auc([1.0] * 9)


def test_pixels_to_remove_224_as_published():
    # int(224 * 224 * p) with the published step values
    assert [pixels_to_remove(224, 224, p) for p in PERTURBATION_STEPS] == \
        [5017, 10035, 15052, 20070, 25088, 30105, 35123, 40140, 45158]


@pytest.mark.parametrize("direction", ["positive", "negative"])
def test_remove_pixels_removes_exactly_the_top_or_bottom_k(direction):
    torch.manual_seed(0)
    B, H, W = 4, 12, 10
    maps = torch.rand(B, H, W)  # distinct values: top-k is unique
    images = torch.rand(B, 3, H, W) + 0.1  # no zero pixel before removal
    ranks = removal_ranks(maps, direction)
    for k in (0, 1, 17, H * W - 1, H * W):
        out = remove_pixels(images, ranks, k)
        removed = (out == 0).all(dim=1).flatten(1)  # all channels zero
        assert removed.sum(dim=1).tolist() == [k] * B
        expected = torch.topk(maps.flatten(1) * (1 if direction == "positive" else -1), k, dim=1).indices
        for b in range(B):
            assert set(torch.nonzero(removed[b]).flatten().tolist()) == set(expected[b].tolist())
        kept = ~removed.reshape(B, 1, H, W).expand_as(images)
        assert torch.equal(out[kept], images[kept])


def test_removal_ties_broken_by_pixel_index():
    maps = torch.zeros(2, 3, 3)
    maps[1, 2, 2] = 1.0
    pos = removal_ranks(maps, "positive")
    neg = removal_ranks(maps, "negative")
    assert pos[0].tolist() == list(range(9)) and neg[0].tolist() == list(range(9))
    assert pos[1].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0]
    assert neg[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_prepare_maps_upsamples_bilinear_and_normalises_per_image():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = prepare_maps(maps, (4, 4))
    ref = torch.nn.functional.interpolate(maps[:1, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(out[0], (ref - ref.min()) / (ref.max() - ref.min()))
    assert torch.equal(out[1], torch.zeros(4, 4))  # constant map -> 0
    same = torch.rand(2, 4, 4)
    torch.testing.assert_close(prepare_maps(same, (4, 4)), (same - same.amin((1, 2), keepdim=True))
                               / (same.amax((1, 2), keepdim=True) - same.amin((1, 2), keepdim=True)))


def test_select_positions_even_spacing():
    assert select_positions(10, None).tolist() == list(range(10))
    assert select_positions(10, 20).tolist() == list(range(10))
    assert select_positions(10, 4).tolist() == [0, 2, 5, 7]
    assert select_positions(50000, 1000)[:3].tolist() == [0, 50, 100]


# -- the toy model: a map pointing exactly at the object ---------------------------------------
class ColourObjectClassifier(nn.Module):
    """Class 0 if the image holds red, 1 if green, else 2 (inputs normalised
    with mean = std = 0.5): its decision depends on the object pixels only."""

    def forward(self, x):
        img = x * 0.5 + 0.5
        red = (img[:, 0] - img[:, 1]).clamp(min=0).sum(dim=(1, 2))
        green = (img[:, 1] - img[:, 0]).clamp(min=0).sum(dim=(1, 2))
        return torch.stack([red, green, torch.full_like(red, 0.5)], dim=1)


def toy_batch(B=6, size=32, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    grey = torch.rand(B, 1, size, size, generator=g)
    images = grey.expand(B, 3, size, size).clone()  # r = g = b: no colour
    masks = torch.zeros(B, size, size)
    labels = torch.arange(B) % 2
    for b in range(B):
        y, x = torch.randint(0, size - side, (2,), generator=g).tolist()
        colour = torch.tensor([0.9, 0.1, 0.1]) if labels[b] == 0 else torch.tensor([0.1, 0.9, 0.1])
        images[b, :, y:y + side, x:x + side] = colour[:, None, None]
        masks[b, y:y + side, x:x + side] = 1.0
    return images, masks, labels


def test_exact_object_map_positive_falls_faster_than_negative():
    images, masks, labels = toy_batch()  # object: 64 of 1024 pixels < 10%
    model = ColourObjectClassifier()
    h0p, pos = pe.perturbation_hits(model, images, masks, labels, [0.5] * 3, [0.5] * 3, "positive")
    h0n, neg = pe.perturbation_hits(model, images, masks, labels, [0.5] * 3, [0.5] * 3, "negative")
    assert h0p.all() and h0n.all()
    acc_pos = [1.0] + pos.float().mean(dim=1).tolist()
    acc_neg = [1.0] + neg.float().mean(dim=1).tolist()
    # the whole object goes at p = 0.1 (102 pixels); negative never reaches it (921 < 960 background pixels)
    assert acc_pos == [1.0] + [0.0] * 9
    assert acc_neg == [1.0] * 10
    assert auc(acc_pos) == pytest.approx(5.0) and auc(acc_neg) == pytest.approx(90.0)
    # the reversed map swaps the roles
    _, rev = pe.perturbation_hits(model, images, 1 - masks, labels, [0.5] * 3, [0.5] * 3, "negative")
    assert not rev.any()


def test_perturbation_hits_independent_of_batch_composition():
    images, masks, labels = toy_batch(B=6, seed=1)
    maps = masks + 0.3 * torch.rand(masks.shape, generator=torch.Generator().manual_seed(2))
    model = ColourObjectClassifier()
    _, full = pe.perturbation_hits(model, images, maps, labels, [0.5] * 3, [0.5] * 3, "positive")
    singles = [pe.perturbation_hits(model, images[b:b + 1], maps[b:b + 1], labels[b:b + 1], [0.5] * 3,
                                    [0.5] * 3, "positive")[1] for b in range(6)]
    assert torch.equal(full, torch.cat(singles, dim=1))


# -- perturbation_eval.py end to end ------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    base = tmp_path_factory.mktemp("pert")
    tree = make_tree(base / "tree")
    model = make_model_dir(base / "model")
    out = base / "maps"
    assert gv.main(["--imagenet-validation-path", tree, "--weights", model, "--method", "rollout",
                    "--output-dir", str(out), "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]) == 0
    return tree, model, out


def test_eval_cli_both_directions(generated, capsys):
    tree, model, out = generated
    res = str(out / "eval")
    for flag in (["--pos"], ["--neg"]):
        assert pe.main(["--results", str(out), "--method", "rollout", "--vis-class", "top", "--batch-size", "3",
                        "--num-workers", "0", "--device", "cpu", "--output-dir", res] + flag) == 0
    data = json.load(open(os.path.join(res, "results.json")))
    assert data["method"] == "rollout" and data["vis_class"] == "top"
    assert data["fractions"] == pytest.approx([0.0] + list(PERTURBATION_STEPS))
    with h5py.File(out / "results.hdf5") as f:
        stored_acc = float((f["pred"][()] == f["target"][()]).mean())
        n = len(f["index"])
    for d in ("positive", "negative"):
        r = data[d]
        assert r["num_images"] == n == 15
        assert r["auc"] == pytest.approx(auc(r["accuracy"]))
        assert r["accuracy"][0] == pytest.approx(stored_acc)  # same model, same images: same predictions
        hits = np.load(os.path.join(res, d, "perturbations_hits.npy"))
        model_hits = np.load(os.path.join(res, d, "model_hits.npy"))
        assert hits.shape == (9, n) and model_hits.shape == (n,)
        assert hits.mean(axis=1) == pytest.approx(r["accuracy"][1:])
    png = os.path.join(res, "perturbation.png")
    assert os.path.getsize(png) > 1000
    assert Image.open(png).size[0] > 100
    assert "AUC" in capsys.readouterr().out


def test_eval_alias_defaults_to_negative(generated):
    import runpy

    tree, model, out = generated
    res = str(out / "alias")
    argv = sys.argv
    sys.argv = ["pertubation_eval_from_hdf5.py", "--results", str(out / "results.hdf5"), "--num-workers", "0",
                "--device", "cpu", "--output-dir", res]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(os.path.dirname(pe.__file__), "pertubation_eval_from_hdf5.py"),
                           run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code == 0
    data = json.load(open(os.path.join(res, "results.json")))
    assert "negative" in data and "positive" not in data


def test_eval_refuses_maps_of_another_method(generated, capsys):
    tree, model, out = generated
    assert pe.main(["--results", str(out), "--method", "transformer_attribution", "--num-workers", "0",
                    "--device", "cpu", "--output-dir", str(out / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "rollout" in err and len(err.splitlines()) == 1


def test_eval_refuses_other_weights_and_non_hdf5(generated, tmp_path, capsys):
    tree, model, out = generated
    other = make_model_dir(tmp_path / "other", seed=1)
    assert pe.main(["--results", str(out), "--weights", other, "--num-workers", "0", "--device", "cpu",
                    "--output-dir", str(tmp_path / "o")]) == 2
    assert "weights hash differs" in capsys.readouterr().err
    bogus = tmp_path / "results.hdf5"
    bogus.write_text("not hdf5")
    assert pe.main(["--results", str(bogus), "--num-workers", "0", "--device", "cpu"]) == 2
    assert "not a readable HDF5 file" in capsys.readouterr().err
    assert pe.main(["--results", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_driver_writes_table_and_skips_finished_work(tmp_path, capsys, monkeypatch):
    from baselines.ViT import demo_perturbation as demo
    from baselines.ViT.ViT_LRP import VisionTransformer, save_model_dir

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=8, embed_dim=16, depth=2, num_heads=2,
                              mlp_ratio=2.0)
    save_model_dir(model, str(tmp_path / "model"), extra={"data": {"seed": 0, "n_val": 8, "val_split": "val"}})
    argv = ["--weights", str(tmp_path / "model"), "--data-dir", str(tmp_path / "val"), "--output-dir",
            str(tmp_path / "pert"), "--methods", "rollout", "partial_lrp", "--device", "cpu", "--batch-size", "4"]
    assert demo.main(argv) == 0
    assert len([f for f in os.listdir(tmp_path / "val") if f.endswith(".json")]) == 1  # manifest of the stand-in
    rows = json.load(open(tmp_path / "pert" / "table.json"))
    assert [r["method"] for r in rows] == ["rollout", "lrp_last_layer"]
    for r in rows:
        data = json.load(open(tmp_path / "pert" / r["method"] / "top" / "results.json"))
        assert r["negative"] == data["negative"]["auc"] and r["positive"] == data["positive"]["auc"]
        assert r["num_images"] == 8
    assert "| Rollout (`rollout`) |" in capsys.readouterr().out
    calls = []
    monkeypatch.setattr(pe, "main", lambda *a, **k: calls.append(a) or 0)
    assert demo.main(argv) == 0 and not calls  # a rerun reuses the finished results


def test_float16_storage_keeps_tiny_and_offset_maps_precise():
    from baselines.ViT.perturbation_data import decode_maps, encode_maps

    rng = np.random.default_rng(0)
    maps = rng.uniform(1e-7, 3e-6, (4, 14, 14)).astype(np.float32)  # transformer attribution's scale on ViT-B
    maps[1] *= -1e6  # large negative values too
    maps[2] = 0.0
    maps[3] = 1.0 + 1e-3 * rng.uniform(size=(14, 14))  # a small variation on a large offset
    vis, scale, offset = encode_maps(maps)
    assert vis.dtype == np.float16 and scale.dtype == np.float32 and scale[2] == 1.0
    span = (maps.reshape(4, -1).max(axis=1) - maps.reshape(4, -1).min(axis=1)).reshape(4, 1, 1)
    err = np.abs(decode_maps(vis, scale, offset) - maps)
    assert np.all(err <= 2.0 ** -11 * np.maximum(span, 1e-30) + 1e-7 * np.abs(maps))  # half-ulp of the range
    assert err[2].max() == 0.0
    # a plain cast would fall into float16's subnormals: over 20x coarser
    assert np.abs(maps[0].astype(np.float16).astype(np.float32) - maps[0]).max() > 20 * err[0].max()
    # the offset map keeps its ranking (scaling by the maximum alone would leave a few levels)
    order = np.argsort(maps[3].ravel(), kind="stable")
    decoded = decode_maps(vis, scale, offset)[3].ravel()
    assert len(np.unique(decoded)) > 150 and np.all(np.diff(decoded[order]) >= -2.0 ** -11 * span[3, 0, 0])
