"""The synthetic stand-in: determinism, exact masks, writers, and the small-ViT
training script (tiny runs) and its shipped checkpoint."""
import json
import os

import numpy as np
import pytest
import torch

from data import synthetic as S

SIZE = 96


@pytest.fixture(scope="module")
def samples():
    return [S.generate_sample(i, seed=3, size=SIZE, split="val") for i in range(48)]


def test_classes_sorted_and_enough():
    assert len(S.CLASS_NAMES) >= 8
    assert list(S.CLASS_NAMES) == sorted(S.CLASS_NAMES)  # ImageFolder index == label


def test_deterministic_and_independent_of_order(samples):
    again = S.generate_sample(5, seed=3, size=SIZE, split="val")
    np.testing.assert_array_equal(again.image, samples[5].image)
    np.testing.assert_array_equal(again.mask, samples[5].mask)
    images, labels, masks = S.generate_split(4, seed=3, size=SIZE, split="val", start=10)
    for k in range(4):
        np.testing.assert_array_equal(images[k], samples[10 + k].image)
        np.testing.assert_array_equal(masks[k], samples[10 + k].mask)
        assert labels[k] == samples[10 + k].label
    other_seed = S.generate_sample(5, seed=4, size=SIZE, split="val")
    other_split = S.generate_sample(5, seed=3, size=SIZE, split="train")
    assert not np.array_equal(other_seed.image, again.image)
    assert not np.array_equal(other_split.image, again.image)


def test_mask_is_exact_and_object_within_range(samples):
    for i, s in enumerate(samples):
        assert s.image.dtype == np.uint8 and s.image.shape == (SIZE, SIZE, 3)
        assert s.label == i % S.NUM_CLASSES
        assert set(np.unique(s.mask)) <= {0, 1}
        inside = s.mask.astype(bool)
        # the picture is the object's paint exactly on the mask and the background elsewhere
        np.testing.assert_array_equal(s.image[inside], s.foreground[inside])
        np.testing.assert_array_equal(s.image[~inside], s.background[~inside])
        assert 0.045 <= s.mask.mean() <= 0.41, (i, s.mask.mean())
        # the whole object is in the frame
        assert not (s.mask[0].any() or s.mask[-1].any() or s.mask[:, 0].any() or s.mask[:, -1].any())
        # the object stands out: its paint differs from what lies under it
        diff = np.abs(s.foreground[inside].astype(int) - s.background[inside].astype(int)).sum(axis=1)
        assert (diff > 30).mean() > 0.8


def test_backgrounds_are_cluttered(samples):
    for s in samples[:8]:
        bg = s.background.astype(np.float32)
        assert bg.std(axis=(0, 1)).mean() > 5  # textured, not flat
        edges = np.abs(np.diff(bg, axis=1)).sum(axis=2)
        assert (edges > 40).mean() > 0.002  # distractor strokes and pattern edges


def test_shape_geometry():
    n = 400
    disk = S.shape_mask(S.CLASS_NAMES.index("disk"), n, (200.0, 200.0), 120.0, 0.3)
    assert int(disk.sum()) == pytest.approx(np.pi * 120 ** 2, rel=0.015)  # cv2 fills boundary pixels too
    square = S.shape_mask(S.CLASS_NAMES.index("square"), n, (200.0, 200.0), 120.0, 0.0)
    assert int(square.sum()) == pytest.approx(2 * 120 ** 2, rel=0.025)  # circumradius r: side r*sqrt(2)
    ring = S.shape_mask(S.CLASS_NAMES.index("ring"), n, (200.0, 200.0), 120.0, 0.0)
    assert ring[200, 200] == 0 and ring[200, 200 + 100] == 1 and ring[200, 200 + 125] == 0
    # rotating by a quarter turn rotates the mask (square symmetric about the centre pixel)
    tri = S.CLASS_NAMES.index("triangle")
    a = S.shape_mask(tri, 201, (100.0, 100.0), 80.0, 0.0)
    b = S.shape_mask(tri, 201, (100.0, 100.0), 80.0, np.pi / 2)
    assert abs(int(a.sum()) - int(b.sum())) < 0.01 * a.sum()
    assert (np.rot90(a, -1) != b).mean() < 0.01


def test_write_imagefolder_reads_back(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "val"
    manifest = S.write_imagefolder(str(root), 10, seed=1, size=32, split="val")
    ds = ImageFolder(str(root))
    assert ds.classes == list(S.CLASS_NAMES)
    assert len(ds) == 10
    by_index = {int(os.path.basename(p)[:-4]): t for p, t in ds.samples}
    for i in range(10):
        s = S.generate_sample(i, seed=1, size=32, split="val")
        assert by_index[i] == s.label == manifest["labels"][i]
        img, target = ds[[k for k, (p, _) in enumerate(ds.samples) if p.endswith(f"{i:06d}.png")][0]]
        np.testing.assert_array_equal(np.asarray(img), s.image)  # PNG is lossless
    saved = np.load(root / "masks.npz")
    np.testing.assert_array_equal(saved["masks"][3], S.generate_sample(3, seed=1, size=32, split="val").mask)
    assert json.loads((root / "manifest.json").read_text())["seed"] == 1


def test_dataset_normalises():
    ds = S.SyntheticShapes(3, seed=0, size=32, split="val", with_mask=True)
    x, y, m = ds[2]
    s = S.generate_sample(2, 0, 32, "val")
    torch.testing.assert_close(x, torch.from_numpy(s.image.transpose(2, 0, 1) / 255.0 * 2 - 1).float())
    assert y == s.label and torch.equal(m, torch.from_numpy(s.mask.astype(np.int64)))
    with pytest.raises(IndexError):
        ds[3]


def test_cli_writes_both_formats(tmp_path, capsys):
    assert S.main(["--out", str(tmp_path), "--n-val", "8", "--n-train", "8", "--size", "32"]) == 0
    assert (tmp_path / "val_gtsegs.mat").is_file()
    assert len(list((tmp_path / "train").rglob("*.png"))) == 8
    assert len(list((tmp_path / "val").rglob("*.png"))) == 8
    with pytest.raises(SystemExit) as e:
        S.main(["--out", str(tmp_path), "--size", "8"])
    assert e.value.code == 2


# -- the training script ------------------------------------------------------------------------
TINY = ["--size", "32", "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
        "--steps", "4", "--batch-size", "4", "--pool-size", "8", "--n-val", "8", "--eval-every", "2",
        "--warmup", "2", "--num-workers", "0", "--threads", "1", "--device", "cpu", "--quiet", "--min-accuracy", "0"]


def test_dihedral_per_sample():
    from baselines.ViT.train_synthetic import dihedral

    x = torch.arange(2 * 8 * 3 * 4 * 4, dtype=torch.float32).reshape(16, 3, 4, 4)
    k = torch.arange(16) % 8
    out = dihedral(x, k)
    for b in range(16):
        want = torch.rot90(x[b], int(k[b]) % 4, dims=(-2, -1))
        if k[b] >= 4:
            want = torch.flip(want, dims=(-1,))
        torch.testing.assert_close(out[b], want)


def test_training_is_reproducible_and_loads_back(tmp_path):
    from safetensors.torch import load_file

    from modules.checkpoints import file_sha256 as E_sha
    from baselines.ViT.train_synthetic import is_model_dir, load_synthetic_model, main
    from baselines.ViT.ViT_LRP import load_model

    a, b = tmp_path / "a", tmp_path / "b"
    main(TINY + ["--out-dir", str(a)])
    main(TINY + ["--out-dir", str(b)])
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_kwargs"]["img_size"] == [32, 32] and cfg["mean"] == [0.5] * 3
    assert cfg["weights_sha256"] == E_sha(a / "model.safetensors")
    assert is_model_dir(str(a)) and is_model_dir(str(a / "model.safetensors")) and not is_model_dir(str(tmp_path))
    model = load_synthetic_model(str(a / "model.safetensors"))
    assert model.default_cfg["input_size"] == (3, 32, 32) and not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, S.NUM_CLASSES)
        # the project's one loader reads the same folder
        torch.testing.assert_close(load_model("vit_base_patch16_224", str(a))(x), model(x))
    # float16 storage loads into a float32 model
    c = tmp_path / "c"
    main(TINY + ["--out-dir", str(c), "--fp16"])
    assert load_file(str(c / "model.safetensors"))["head.weight"].dtype == torch.float16
    assert next(load_synthetic_model(str(c)).parameters()).dtype == torch.float32


def test_training_cli_errors(tmp_path):
    from baselines.ViT.ViT_LRP import CheckpointError
    from baselines.ViT.train_synthetic import load_synthetic_model, main

    with pytest.raises(SystemExit) as e:
        main(["--size", "30", "--patch-size", "8", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    with pytest.raises(CheckpointError, match="config.json"):
        load_synthetic_model(str(tmp_path))


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "synthetic_vit")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model.safetensors")), reason="no shipped model")
def test_shipped_model_is_accurate():
    from torch.utils.data import DataLoader

    from baselines.ViT.train_synthetic import evaluate_accuracy, load_synthetic_model
    from modules.checkpoints import file_sha256

    cfg = json.loads(open(os.path.join(SHIPPED, "config.json")).read())
    assert cfg["weights_sha256"] == file_sha256(os.path.join(SHIPPED, "model.safetensors"))
    assert os.path.getsize(os.path.join(SHIPPED, "model.safetensors")) < 10e6
    model = load_synthetic_model(SHIPPED)
    n = cfg["data"]["n_val"]
    val = S.SyntheticShapes(n, seed=cfg["data"]["seed"], size=cfg["input_size"][-1], split="val")
    acc = evaluate_accuracy(model, DataLoader(val, batch_size=100), "cpu")
    assert acc >= 0.9
    assert acc == pytest.approx(cfg["val_accuracy"], abs=2 / n)
