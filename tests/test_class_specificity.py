"""Class-specificity benchmark: metric values on hand-made maps, the CLI end to
end on generated scenes with a tiny random model, and the shipped scene
classifier (samples/synthetic_scenes_vit)."""
import json
import os

import numpy as np
import pytest
import torch

from baselines.ViT import class_specificity as CS
from baselines.ViT.class_specificity_metrics import class_sensitive, own_share, pointing_hits, positive_mass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "samples", "synthetic_scenes_vit")

T = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731  one map -> a batch of one
R = lambda a: torch.tensor(a, dtype=torch.bool)[None]  # noqa: E731

RA = R([[0, 1, 1], [0, 0, 0]])
RB = R([[1, 0, 0], [1, 0, 0]])
MA = T([[0, 3, 1], [-2, 0, 0]])  # on A: 3 + 1 = 4; on B: 0 + max(-2, 0) = 0
MB = T([[2, 1, 0], [5, -1, 0]])  # on B: 2 + 5 = 7; on A: 1 + 0 = 1


def test_positive_mass_by_hand():
    assert positive_mass(MA, RA).tolist() == [4.0]
    assert positive_mass(MA, RB).tolist() == [0.0]
    assert positive_mass(MB, RB).tolist() == [7.0]
    assert positive_mass(MB, RA).tolist() == [1.0]
    batch = positive_mass(torch.cat([MA, MB]), torch.cat([RA, RA]))
    assert batch.tolist() == [4.0, 1.0]


def test_pointing_game_by_hand():
    assert pointing_hits(MA, RA).tolist() == [True]  # max 3 at (0, 1), inside A
    assert pointing_hits(MA, RB).tolist() == [False]
    assert pointing_hits(MB, RB).tolist() == [True]  # max 5 at (1, 0), inside B
    tie = T([[4, 0, 4], [0, 0, 0]])  # maxima at (0, 0) in B and (0, 2) in A
    assert pointing_hits(tie, RA).tolist() == [False] and pointing_hits(tie, RB).tolist() == [False]
    assert pointing_hits(tie, RA | RB).tolist() == [True]
    flat = torch.zeros(1, 2, 3)
    assert pointing_hits(flat, RA).tolist() == [False]
    assert pointing_hits(flat, torch.ones(1, 2, 3, dtype=torch.bool)).tolist() == [True]
    neg = T([[-1, -3, -5], [-0.5, -2, -2]])  # max -0.5 at (1, 0), inside B
    assert pointing_hits(neg, RB).tolist() == [True]


def test_class_sensitivity_by_hand():
    assert class_sensitive(MA, MB, RA, RB).tolist() == [True]  # 4 > 0 and 7 > 1
    assert class_sensitive(MB, MA, RA, RB).tolist() == [False]  # swapped maps: 1 > 7 fails
    # a class-independent map can never be sensitive
    for m in (MA, MB, T([[1, 1, 1], [1, 1, 1]])):
        assert class_sensitive(m, m, RA, RB).tolist() == [False]
    # ties are not more: map for A with 2 on A and 2 on B
    even = T([[0, 2, 0], [2, 0, 0]])
    assert class_sensitive(even, MB, RA, RB).tolist() == [False]
    # batch: one sensitive, one not
    out = class_sensitive(torch.cat([MA, MB]), torch.cat([MB, MA]), torch.cat([RA, RA]), torch.cat([RB, RB]))
    assert out.tolist() == [True, False]


def test_own_share_by_hand():
    assert own_share(MA, RA, RB).tolist() == [1.0]
    assert own_share(MB, RB, RA).tolist() == [pytest.approx(7 / 8)]
    assert own_share(MB, RA, RB).tolist() == [pytest.approx(1 / 8)]
    assert own_share(torch.zeros(1, 2, 3), RA, RB).tolist() == [0.5]


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        positive_mass(torch.zeros(1, 2, 3), torch.zeros(1, 3, 2, dtype=torch.bool))


def _rec(top2, **methods):
    return {"top2": top2, "methods": {m: {"pointing": p, "sensitive": s, "own_share": o, "mass": [0, 0, 0, 0]}
                                      for m, (p, s, o) in methods.items()}}


def test_summarize_by_hand():
    recs = [_rec(True, rollout=([True, False], False, [0.5, 0.5])),
            _rec(False, rollout=([True, True], True, [0.75, 1.0])),
            _rec(True, rollout=([False, False], False, [0.25, 0.0]))]
    s = CS.summarize(recs, ["rollout"])
    a, r = s["all"]["rollout"], s["recognised"]["rollout"]
    assert s["n_images"] == 3 and s["n_recognised"] == 2 and s["recognised_share"] == pytest.approx(2 / 3)
    assert a["pointing_game"] == pytest.approx(3 / 6)
    assert a["both_pointed"] == pytest.approx(1 / 3)
    assert a["class_sensitivity"] == pytest.approx(1 / 3)
    assert a["own_share"] == pytest.approx(3.0 / 6)
    assert r["pointing_game"] == pytest.approx(1 / 4) and r["class_sensitivity"] == 0.0
    assert r["own_share"] == pytest.approx(1.25 / 4)


# --------------------------------------------------------------------------
# End to end on generated scenes with a tiny random model
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    from data.scenes import main as scenes_main

    out = tmp_path_factory.mktemp("scenes")
    assert scenes_main(["--out-dir", str(out), "--split", "val", "--count", "4", "--seed", "1", "--size", "48",
                        "--min-objects", "2", "--max-objects", "2", "--distinct-classes", "--separated",
                        "--formats", "coco", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from baselines.ViT.ViT_LRP import VisionTransformer, save_model_dir
    from data.scenes import CLASS_NAMES

    torch.manual_seed(0)
    model = VisionTransformer(img_size=48, patch_size=8, num_classes=8, embed_dim=16, depth=2, num_heads=2,
                              mlp_ratio=2.0, qkv_bias=True).eval()
    path = str(tmp_path_factory.mktemp("tiny_model"))
    save_model_dir(model, path, extra={"class_names": list(CLASS_NAMES), "mean": [0.5] * 3, "std": [0.5] * 3})
    return path


def _run(scene_data, model_dir, out, *extra):
    return CS.main(["--annotations", str(scene_data / "annotations" / "instances_val.json"),
                    "--image-dir", str(scene_data / "val"), "--weights", model_dir, "--output-dir", str(out),
                    "--device", "cpu", "--batch-size", "2", "--num-overlays", "1", "--threads", "1", "--quiet", *extra])


def test_cli_end_to_end_and_resume(scene_data, tiny_model_dir, tmp_path, capsys):
    from data.scenes import SceneConfig, generate_scene

    out = tmp_path / "run"
    res = _run(scene_data, tiny_model_dir, out, "--limit", "2")
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_images"] == 2 and saved["methods"] == list(CS.METHOD_NAMES)
    for f in ("table.md", "plot.png", "per_image.jsonl", "overlays/image_1.png"):
        assert (out / f).is_file(), f
    lines = [json.loads(x) for x in (out / "per_image.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in lines] == [1, 2]
    # the classes and regions are the scene's own objects
    sc = generate_scene(0, seed=1, split="val", config=SceneConfig(size=48, min_objects=2, max_objects=2,
                                                                  distinct_classes=True, separated=True))
    assert lines[0]["classes"] == sorted(o.label for o in sc.objects)
    for m in ("rollout", "attn_last_layer"):  # class-independent: 0 by construction, same maps for both classes
        assert saved["all"][m]["class_sensitivity"] == 0.0
        for r in lines:
            assert r["methods"][m]["mass"][0] == r["methods"][m]["mass"][3]
            assert r["methods"][m]["mass"][1] == r["methods"][m]["mass"][2]
    # the summary is the mean of the per-image lines
    ta = [r["methods"]["transformer_attribution"] for r in lines]
    assert saved["all"]["transformer_attribution"]["pointing_game"] == pytest.approx(
        sum(sum(t["pointing"]) for t in ta) / 4)
    # resume: the scored pictures are kept, the rest are added
    capsys.readouterr()
    res2 = _run(scene_data, tiny_model_dir, out, "--resume")
    assert "resuming: 2 of 4" in capsys.readouterr().out
    assert res2["n_images"] == 4
    lines2 = [json.loads(x) for x in (out / "per_image.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in lines2] == [1, 2, 3, 4] and lines2[:2] == lines
    assert res["weights_sha256"] == res2["weights_sha256"]


def test_real_layout_with_boxes_and_model_index(scene_data, tiny_model_dir, tmp_path):
    """User-provided layout: boxes only (no segmentation), categories mapped by model_index."""
    coco = json.loads((scene_data / "annotations" / "instances_val.json").read_text())
    for a in coco["annotations"]:
        del a["segmentation"]
    coco["categories"] = [{"id": c["id"] + 100, "name": f"thing {c['id']}", "model_index": c["model_index"]}
                          for c in coco["categories"]]
    for a in coco["annotations"]:
        a["category_id"] += 100
    coco["images"].append({"id": 99, "file_name": "000000.png"})  # no annotations: skipped
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(coco))
    pairs, skipped = CS.read_pairs(str(path), str(scene_data / "val"), (), 8)
    assert len(pairs) == 4 and skipped["not_two_classes"] == 1
    x, regions = CS.load_pair(pairs[0], (48, 48), (0.5,) * 3, (0.5,) * 3)
    anns = pairs[0].anns[0]
    x0, y0, w, h = (int(v) for v in anns[0]["bbox"])
    expect = np.zeros((48, 48), bool)
    expect[y0:y0 + h, x0:x0 + w] = True
    np.testing.assert_array_equal(regions[0].numpy(), expect)
    res = CS.main(["--annotations", str(path), "--image-dir", str(scene_data / "val"), "--weights", tiny_model_dir,
                   "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--methods", "rollout",
                   "generic_attribution", "--num-overlays", "0", "--quiet"])
    assert res["n_images"] == 4 and res["skipped"]["not_two_classes"] == 1


def test_bad_input_exits_2(scene_data, tiny_model_dir, tmp_path, capsys):
    for extra in (["--annotations", str(tmp_path / "missing.json")],
                  ["--methods", "no_such_method"]):
        args = ["--annotations", str(scene_data / "annotations" / "instances_val.json"),
                "--image-dir", str(scene_data / "val"), "--weights", tiny_model_dir,
                "--output-dir", str(tmp_path / "o"), "--quiet"] + extra
        with pytest.raises(SystemExit) as e:
            CS.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "zebra"}]}))
    with pytest.raises(CS.PairDataError, match="no 'model_index'"):
        CS.read_pairs(str(bad), str(scene_data / "val"), ("disk",), 8)


# --------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(SHIPPED), reason="samples/synthetic_scenes_vit not shipped yet")
def test_shipped_scene_model_loads_and_its_accuracy_holds():
    from torch.utils.data import DataLoader

    from baselines.ViT.train_scenes import VAL_CONFIG, evaluate
    from baselines.ViT.ViT_LRP import load_model_dir
    from data.scenes import SceneConfig, SceneDataset

    with open(os.path.join(SHIPPED, "config.json")) as fh:
        cfg = json.load(fh)
    assert os.path.getsize(os.path.join(SHIPPED, "model.safetensors")) < 5e6
    model = load_model_dir(SHIPPED)
    assert model.default_cfg["class_names"] == cfg["class_names"]
    recorded = cfg["val_top_k_all_present"]
    data = cfg["data"]
    assert data["val_config"] == dict(VAL_CONFIG.__dict__)
    n = 60  # the first 60 of the recorded validation scenes
    ds = SceneDataset(n, seed=data["seed"], split=data["val_split"], config=SceneConfig(**data["val_config"]))
    got = evaluate(model, DataLoader(ds, batch_size=30), "cpu")
    assert abs(got["top_k_all_present"] - recorded) <= 0.12, (got, recorded)
    if "val_top_k_plus_1_all_present" in cfg:
        assert abs(got["top_k_plus_1_all_present"] - cfg["val_top_k_plus_1_all_present"]) <= 0.12


# --------------------------------------------------------------------------
# The training script: its measures by hand, and a tiny deterministic run
# --------------------------------------------------------------------------
def test_top_k_and_loss_by_hand():
    import math

    from baselines.ViT.train_scenes import scene_loss, top_k_all_present

    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    labels = torch.tensor([[1.0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    assert top_k_all_present(logits, labels).tolist() == [True, False, False, True]
    assert top_k_all_present(logits, labels, extra=1).tolist() == [True, True, False, True]  # top 3 {0, 2, 1}; top 2 {0, 2}
    assert scene_loss(torch.zeros(1, 2), torch.ones(1, 2)).item() == pytest.approx(math.log(2))
    assert scene_loss(torch.tensor([[math.log(3), 0.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        -math.log(0.75))
    # soft targets: two present classes share the target
    assert scene_loss(torch.tensor([[math.log(3), 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])).item() == \
        pytest.approx(-(0.5 * math.log(0.6) + 0.5 * math.log(0.2)))
    assert scene_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), "bce").item() == pytest.approx(math.log(2))


def test_tiny_training_run_is_deterministic_and_loadable(tmp_path):
    from baselines.ViT.train_scenes import main as train_main
    from baselines.ViT.ViT_LRP import load_model_dir

    args = ["--init", "none", "--size", "32", "--patch-size", "8", "--embed-dim", "16", "--depth", "1",
            "--num-heads", "2", "--steps", "3", "--pool-size", "8", "--n-val", "4", "--eval-every", "0",
            "--min-accuracy", "0", "--data-seed", "3", "--quiet"]
    assert train_main(args[:-7] + ["--eval-every", "2", "--checkpoint-dir", str(tmp_path / "ckpt"),
                                   "--out-dir", str(tmp_path / "c")] + args[-5:]) == 0
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["history"]["steps_done"] == 2
    for name in ("a", "b"):
        assert train_main(args + ["--out-dir", str(tmp_path / name)]) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["command"].startswith("python baselines/ViT/train_scenes.py --init none")
    assert cfg["data"]["seed"] == 3 and 0.0 <= cfg["val_top_k_all_present"] <= 1.0
    a, b = load_model_dir(str(tmp_path / "a")), load_model_dir(str(tmp_path / "b"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    assert a.default_cfg["class_names"] == cfg["class_names"]


def test_patch_targets_by_hand():
    from baselines.ViT.train_scenes import patch_targets

    cmap = np.array([[0, 0, -1, -1],
                     [0, -1, -1, 3],
                     [5, 5, 3, 3],
                     [5, 1, 3, -1]])
    assert patch_targets(cmap, 2, 2).tolist() == [[0, 8], [5, 3]]
    assert patch_targets(cmap, 2, 4).tolist() == [[8, 8], [8, 8]]  # no class covers all 4 pixels
    assert patch_targets(cmap, 4, 1).tolist() == [[3]]  # class 3: 5 pixels, the most
