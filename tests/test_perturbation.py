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
from baselines.ViT.perturbation_metrics import (PERTURBATION_STEPS, auc, pixels_to_remove, prepare_maps, removal_masks,
                                                removal_ranks, remove_masked, remove_pixels, select_positions)
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
def test_remove_pixels_removes_exactly_the_top_or_bottom_k(direction, seed):
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


def test_raster_rule_breaks_ties_by_pixel_index():
    maps = torch.zeros(2, 3, 3)
    maps[1, 2, 2] = 1.0
    pos = removal_ranks(maps, "positive", "raster")
    neg = removal_ranks(maps, "negative", "raster")
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
    h0p, pos, _ = pe.perturbation_hits(model, images, masks, labels, [0.5] * 3, [0.5] * 3, "positive")
    h0n, neg, _ = pe.perturbation_hits(model, images, masks, labels, [0.5] * 3, [0.5] * 3, "negative")
    assert h0p.all() and h0n.all()
    acc_pos = [1.0] + pos.float().mean(dim=1).tolist()
    acc_neg = [1.0] + neg.float().mean(dim=1).tolist()
    # the whole object goes at p = 0.1 (102 pixels); negative never reaches it (921 < 960 background pixels)
    assert acc_pos == [1.0] + [0.0] * 9
    assert acc_neg == [1.0] * 10
    assert auc(acc_pos) == pytest.approx(5.0) and auc(acc_neg) == pytest.approx(90.0)
    # the reversed map swaps the roles
    _, rev, _ = pe.perturbation_hits(model, images, 1 - masks, labels, [0.5] * 3, [0.5] * 3, "negative")
    assert not rev.any()


def test_perturbation_hits_independent_of_batch_composition():
    images, masks, labels = toy_batch(B=6, seed=1)
    maps = masks + 0.3 * torch.rand(masks.shape, generator=torch.Generator().manual_seed(2))
    model = ColourObjectClassifier()
    _, full, _ = pe.perturbation_hits(model, images, maps, labels, [0.5] * 3, [0.5] * 3, "positive")
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
    assert "ties: random, seed 0" in open(tmp_path / "pert" / "table.md").read()
    # every tie rule on the same stored maps (the default rule's results are reused)
    compare = argv[:6] + ["--methods", "rollout", "--device", "cpu", "--batch-size", "4", "--compare-tie-breaks"]
    assert demo.main(compare) == 0
    (row,) = json.load(open(tmp_path / "pert" / "tie_breaks.json"))
    main = json.load(open(tmp_path / "pert" / "rollout" / "top" / "results.json"))
    for rule in ("random", "topk", "raster"):
        res = main if rule == "random" else \
            json.load(open(tmp_path / "pert" / "rollout" / "top" / "ties" / rule / "results.json"))
        assert res["tie_break"] == rule
        for d in ("positive", "negative"):
            assert row["auc"][rule][d] == res[d]["auc"] and row["accuracy"][rule][d] == res[d]["accuracy"]
    for d in ("positive", "negative"):
        acc = np.array([row["accuracy"][t][d] for t in ("random", "topk", "raster")])
        assert row["max_step_diff"][d] == pytest.approx(100 * (acc.max(axis=0) - acc.min(axis=0)).max())
    assert "| Rollout (`rollout`) |" in open(tmp_path / "pert" / "tie_breaks.md").read()
    calls = []
    monkeypatch.setattr(pe, "main", lambda *a, **k: calls.append(a) or 0)
    assert demo.main(argv) == 0 and not calls  # a rerun reuses the finished results
    assert demo.main(compare) == 0 and not calls  # of every rule
    assert demo.main(argv + ["--tie-break", "raster"]) == 0 and len(calls) == 4  # another rule is new work


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


# -- tie rules (issue 16) -------------------------------------------------------------------------
def test_each_rule_removes_the_documented_pixels_of_a_tied_map():
    from modules.ranking import tie_permutation

    # 4 x 6 map: columns 0-1 a plateau of 1.0 (8 pixels), columns 2-3 of 0.5 (8), columns 4-5 of 0 (8)
    maps = torch.zeros(1, 4, 6)
    maps[0, :, :2] = 1.0
    maps[0, :, 2:4] = 0.5
    images = torch.rand(1, 3, 4, 6) + 0.1
    flat = maps.flatten(1)
    perm = tie_permutation(24, 3).tolist()
    for direction, level in (("positive", 1.0), ("negative", 0.0)):
        plateau = [i for i in range(24) if flat[0, i] == level]
        for k in (3, 8, 11):
            m = {rule: removal_masks(maps, direction, [k], rule, 3)[0, 0] for rule in ("raster", "random", "topk")}
            removed = {rule: set(torch.nonzero((remove_masked(images, m[rule]) == 0).all(dim=1).flatten())
                                 .flatten().tolist()) for rule in m}
            if k <= 8:  # inside the first plateau: which of its pixels go is the rule's choice
                assert removed["raster"] == set(plateau[:k])  # lowest flat index first
                assert removed["random"] == set([i for i in perm if i in plateau][:k])  # the permutation's order
            else:  # the whole plateau, then the next level's first 3 by the rule
                nxt = [i for i in range(24) if flat[0, i] == 0.5]
                assert removed["raster"] == set(plateau) | set(nxt[:k - 8])
                assert removed["random"] == set(plateau) | set([i for i in perm if i in nxt][:k - 8])
            ref = torch.topk(flat if direction == "positive" else -flat, k, dim=-1).indices[0]
            assert removed["topk"] == set(ref.tolist())
    # the rules really differ on this map (the test can fail)
    assert not torch.equal(removal_masks(maps, "positive", [3], "raster", 3),
                           removal_masks(maps, "positive", [3], "random", 3))


def test_map_without_ties_scores_identically_under_all_rules():
    images, masks, labels = toy_batch(B=6, seed=3)
    g = torch.Generator().manual_seed(4)
    B, H, W = masks.shape
    maps = torch.stack([torch.randperm(H * W, generator=g).float().reshape(H, W) for _ in range(B)]) + 2000 * masks
    assert all(len(torch.unique(m)) == H * W for m in maps)  # no ties within a map
    model = ColourObjectClassifier()
    res = {}
    for rule in ("random", "topk", "raster"):
        for d in ("positive", "negative"):
            res[rule, d] = pe.perturbation_hits(model, images, maps, labels, [0.5] * 3, [0.5] * 3, d,
                                                tie_break=rule, tie_seed=7)
    # positive falls to 0, negative stays at 1: the steps change predictions, so the comparison has content
    assert not res["raster", "positive"][1].any() and res["raster", "negative"][1].all()
    ks = [pixels_to_remove(H, W, p) for p in PERTURBATION_STEPS]
    for d in ("positive", "negative"):
        ref = removal_masks(maps, d, ks, "raster")
        assert torch.equal(removal_masks(maps, d, ks, "random", 7), ref)
        assert torch.equal(removal_masks(maps, d, ks, "topk"), ref)
        h0, hits, tied = res["raster", d]
        assert torch.all(tied == 0)
        for rule in ("random", "topk"):
            assert torch.equal(res[rule, d][0], h0) and torch.equal(res[rule, d][1], hits)
            assert torch.all(res[rule, d][2] == 0)


@pytest.fixture(scope="module")
def gradcam_maps(tmp_path_factory):
    """Stored attention-GradCAM maps (clamped at 0: large tied regions) of a small generated set."""
    base = tmp_path_factory.mktemp("ties")
    tree = make_tree(base / "tree", classes=3, per_class=4)
    model = make_model_dir(base / "model")
    out = base / "maps"
    assert gv.main(["--imagenet-validation-path", tree, "--weights", model, "--method", "attn_gradcam",
                    "--output-dir", str(out), "--batch-size", "6", "--num-workers", "0", "--device", "cpu"]) == 0
    return tree, model, out


def published_loop_hits(model, data, vis, target, neg, steps=PERTURBATION_STEPS):
    """The evaluation loop of METHODS.md section 5 as the published script
    (pertubation_eval_from_hdf5.py) writes it: ``vis`` (B, H, W) upsampled and
    min-max normalised; negated for the negative test; torch.topk of the
    flattened map; the chosen pixels set to 0 in every channel via scatter;
    (x - 0.5) / 0.5; prediction == target."""
    base_size = data.shape[-1] * data.shape[-2]
    org_shape = data.shape
    if neg:
        vis = -vis
    vis = vis.reshape(org_shape[0], -1)
    hits = []
    for p in steps:
        _data = data.clone()
        _, idx = torch.topk(vis, int(base_size * p), dim=-1)
        idx = idx.unsqueeze(1).repeat(1, org_shape[1], 1)
        _data = _data.reshape(org_shape[0], org_shape[1], -1)
        _data = _data.scatter_(-1, idx, 0)
        _data = _data.reshape(*org_shape)
        out = model((_data - 0.5) / 0.5)
        # every prediction far from a tie (float noise between batch sizes is ~1e-6), so the hits compared
        # below cannot depend on it
        top2 = out.topk(2, dim=1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4
        hits.append((out.argmax(dim=1) == target).numpy())
    return np.stack(hits).astype(float)


def test_topk_rule_equals_the_published_loop_on_stored_maps(gradcam_maps):
    from baselines.ViT.perturbation_data import decode_maps, load_image, open_image_tree
    from baselines.ViT.ViT_LRP import load_model

    tree, model_dir, out = gradcam_maps
    res = out / "eval_topk"
    for flag in ("--pos", "--neg"):
        assert pe.main(["--results", str(out), flag, "--tie-break", "topk", "--batch-size", "5",
                        "--num-workers", "0", "--device", "cpu", "--output-dir", str(res)]) == 0
    data = json.load(open(res / "results.json"))
    assert data["tie_break"] == "topk" and data["tie_seed"] is None
    # the direct re-statement, on the same stored maps and images
    with h5py.File(out / "results.hdf5") as f:
        index, target = f["index"][()], f["target"][()]
        maps = torch.from_numpy(decode_maps(f["vis"][()], f["vis_scale"][()], f["vis_offset"][()]))
    model = load_model("vit_base_patch16_224", model_dir).eval()
    samples = open_image_tree(tree).samples
    images = torch.stack([load_image(samples[i][0], (32, 32)) for i in index])
    vis = torch.nn.functional.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    lo = vis.flatten(1).amin(1)[:, None, None]
    hi = vis.flatten(1).amax(1)[:, None, None]
    vis = (vis - lo) / (hi - lo)
    with torch.no_grad():
        for d, neg in (("positive", False), ("negative", True)):
            ref = published_loop_hits(model, images, vis, torch.from_numpy(target), neg)
            hits = np.load(res / d / "perturbations_hits.npy")
            assert np.array_equal(hits, ref)
            assert data[d]["accuracy"][1:] == pytest.approx(ref.mean(axis=1).tolist())
            # the maps are tied where it matters, so the rule is not idle here
            assert max(data[d]["tied_share"]) > 0
    ks = [pixels_to_remove(32, 32, p) for p in PERTURBATION_STEPS]
    assert not torch.equal(removal_masks(vis, "negative", ks, "topk"), removal_masks(vis, "negative", ks, "raster"))


def test_results_json_records_rule_seed_and_tied_share(gradcam_maps, capsys):
    tree, model_dir, out = gradcam_maps
    res = out / "eval_record"
    common = ["--results", str(out), "--batch-size", "6", "--num-workers", "0", "--device", "cpu",
              "--output-dir", str(res)]
    assert pe.main(common + ["--pos", "--tie-seed", "3"]) == 0
    assert pe.main(common + ["--neg", "--tie-seed", "3"]) == 0
    data = json.load(open(res / "results.json"))
    assert data["tie_break"] == "random" and data["tie_seed"] == 3
    for d in ("positive", "negative"):
        r = data[d]
        assert r["tie_break"] == "random" and r["tie_seed"] == 3 and r["device"] == "cpu"
        tied = np.load(res / d / "tied_share.npy")
        assert tied.shape == (9, r["num_images"]) and np.all((tied >= 0) & (tied <= 1))
        assert r["tied_share"] == pytest.approx(tied.mean(axis=1).tolist())
        assert max(r["tied_share"]) > 0  # clamped GradCAM, upsampled borders: some removed pixels are tied
    capsys.readouterr()
    # another rule in the same folder: refused in one line, the finished entries kept (issue 27); with
    # --overwrite it replaces them, with a warning
    kept = (res / "results.json").read_bytes()
    assert pe.main(common + ["--pos", "--tie-break", "raster"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another tie rule" in err and "--overwrite" in err
    assert (res / "results.json").read_bytes() == kept
    assert pe.main(common + ["--pos", "--tie-break", "raster", "--overwrite"]) == 0
    assert "another tie rule" in capsys.readouterr().err
    data = json.load(open(res / "results.json"))
    assert data["tie_break"] == "raster" and data["tie_seed"] is None and "negative" not in data
    assert pe.main(common + ["--pos", "--tie-seed", "-1"]) == 2
    assert "--tie-seed" in capsys.readouterr().err


# -- two runs, one output folder (issue 15, class 2) ----------------------------------------------
def _fake_result(n=4, value=0.5):
    acc = [value] * 10
    return {"model_hits": np.ones(n), "perturbations_hits": np.full((9, n), value), "tied": np.zeros((9, n)),
            "accuracy": acc, "auc": auc(acc), "tied_share": [0.0] * 9, "num_images": n, "num_left_out": 0}


def test_concurrent_directions_wait_for_each_other(tmp_path, monkeypatch):
    """--pos and --neg finishing together: the second must not read
    results.json while the first is between its read and its write."""
    import threading
    import time

    header = {"method": "rollout", "vis_class": "top", "maps": {"id": 1}, "tie_break": "random", "tie_seed": 0}
    out = str(tmp_path)
    with open(tmp_path / "results.json", "w") as f:
        json.dump(dict(header, fractions=[0.0] + list(PERTURBATION_STEPS)), f)
    real_load = json.load
    slow = threading.Event()

    def slow_load(fh):  # the first reader is held up after reading, as a busy machine might
        data = real_load(fh)
        if not slow.is_set():
            slow.set()
            time.sleep(0.6)
        return data

    plotted = []
    monkeypatch.setattr(json, "load", slow_load)
    monkeypatch.setattr(pe, "plot_results", lambda data, path: plotted.append(sorted(data)) or path)
    errors = []

    def write(direction, value):
        try:
            pe.write_outputs(out, header, direction, _fake_result(value=value))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    a = threading.Thread(target=write, args=("positive", 0.25))
    b = threading.Thread(target=write, args=("negative", 0.75))
    a.start()
    assert slow.wait(5)  # a has read results.json and is sleeping
    b.start()
    a.join(10)
    b.join(10)
    assert not errors
    data = real_load(open(tmp_path / "results.json"))
    assert data["positive"]["accuracy"][0] == 0.25 and data["negative"]["accuracy"][0] == 0.75
    assert "positive" in plotted[-1] and "negative" in plotted[-1]  # the last plot shows both
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_pos_and_neg_processes_on_one_folder_keep_both(generated, tmp_path):
    import subprocess

    tree, model, out = generated
    res = tmp_path / "both"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(repo, "baselines", "ViT", "perturbation_eval.py"),
                               "--results", str(out), flag, "--batch-size", "8", "--num-workers", "0",
                               "--device", "cpu", "--output-dir", str(res)], env=env, cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for flag in ("--pos", "--neg")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    data = json.load(open(res / "results.json"))
    assert "positive" in data and "negative" in data
    for d in ("positive", "negative"):
        assert np.load(res / d / "perturbations_hits.npy").shape == (9, 15)
    assert os.path.getsize(res / "perturbation.png") > 1000
    assert not [f for f in os.listdir(res) if f.endswith(".tmp")]


def test_part_file_creation_never_replaces_a_part_with_finished_batches(tmp_path):
    """Two runs creating the same part at once: the later creation must leave
    the earlier run's file (and its committed batches) alone."""
    from baselines.ViT.perturbation_data import PartFile

    path = str(tmp_path / "results.part0of1.hdf5")
    identity = {"method": "rollout"}
    batches = [np.array([0, 1]), np.array([2])]
    with PartFile.open_or_create(path, identity, batches, (2, 2)) as part:
        part.commit(0, np.array([1, 2]), np.array([1, 2]), np.array([1, 1]), np.ones((2, 2, 2), np.float32))
        PartFile._create(path, identity, batches, (2, 2))  # the other run, which saw no file a moment ago
    with PartFile.open_or_create(path, identity, batches, (2, 2)) as part:
        assert part.pending() == [1]
        assert part.f["target"][:2].tolist() == [1, 2]
    assert os.listdir(tmp_path) == ["results.part0of1.hdf5"]  # no temporary left


def test_merge_uses_its_own_temporary(tmp_path):
    """A merge must not delete another run's temporary (the old shared
    'results.hdf5.tmp' was removed by whichever merge finished first)."""
    from baselines.ViT.perturbation_data import PartFile, merge_parts, read_results

    path = str(tmp_path / "results.part0of1.hdf5")
    identity = {"method": "rollout"}
    with PartFile.open_or_create(path, identity, [np.array([0, 1])], (2, 2)) as part:
        part.commit(0, np.array([1, 0]), np.array([1, 1]), np.array([1, 1]), np.ones((2, 2, 2), np.float32))
    other = tmp_path / "results.hdf5.tmp"
    other.write_text("another merge in progress")
    merge_parts([path], str(tmp_path / "results.hdf5"), identity, {})
    assert other.read_text() == "another merge in progress"
    assert read_results(str(tmp_path / "results.hdf5"))[0] == identity
    assert sorted(os.listdir(tmp_path)) == ["results.hdf5", "results.hdf5.tmp", "results.part0of1.hdf5"]
