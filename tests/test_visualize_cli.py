"""The visualisation CLI writes real PNGs and fails cleanly on bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from baselines.ViT import ViT_LRP as V
from baselines.ViT import visualize

SCRIPT = "baselines/ViT/visualize.py"


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = V.VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=24, depth=2, num_heads=2)
    model.default_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return V.save_model_dir(model, str(tmp_path / "tiny"))


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_writes_overlay_and_grid(model_dir, tmp_path):
    out = tmp_path / "out.png"
    rc = visualize.main(["--image", "samples/flower.jpg", "--weights", model_dir, "--out", str(out),
                         "--all-methods", "--device", "cpu", "--class-index", "3"])
    assert rc == 0
    assert is_png(out) and is_png(tmp_path / "out_all_methods.png")
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0


def run_cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["unreadable", "missing_image", "missing_weights", "bad_class", "bad_start_layer",
                                  "unwritable_out"])
def test_bad_input_exits_2_with_one_line(case, model_dir, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    args = {
        "unreadable": ["--image", str(junk), "--weights", model_dir],
        "missing_image": ["--image", str(tmp_path / "none.png"), "--weights", model_dir],
        "missing_weights": ["--image", "samples/flower.jpg", "--weights", str(tmp_path / "none.pth")],
        "bad_class": ["--image", "samples/flower.jpg", "--weights", model_dir, "--class-index", "5"],
        "bad_start_layer": ["--image", "samples/flower.jpg", "--weights", model_dir, "--start-layer", "-1"],
        "unwritable_out": ["--image", "samples/flower.jpg", "--weights", model_dir, "--out", "/proc/x/o.png"],
    }[case]
    res = run_cli(*args, *(["--out", str(tmp_path / "o.png")] if case != "unwritable_out" else []), "--device", "cpu")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert not (tmp_path / "o.png").exists()


def test_random_model_is_announced(tmp_path):
    res = run_cli("--image", "samples/flower.jpg", "--model", "vit_small_patch16_224", "--out", str(tmp_path / "o.png"),
                  "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert "randomly initialised" in res.stderr


def test_every_method_for_an_unmodified_timm_model(tmp_path):
    """A timm name outside our copies is explained unmodified with every method
    (the LRP ones through the LRP scope)."""
    out = tmp_path / "g.png"
    rc = visualize.main(["--image", "samples/china.jpg", "--model", "test_vit", "--method", "rollout",
                         "--all-methods", "--out", str(out), "--device", "cpu"])
    assert rc == 0 and is_png(out) and is_png(tmp_path / "g_all_methods.png")
    res = run_cli("--image", "samples/china.jpg", "--model", "test_vit", "--method", "transformer_attribution",
                  "--out", str(tmp_path / "r.png"), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert is_png(tmp_path / "r.png")


def test_out_without_extension_says_the_file_it_wrote(model_dir, tmp_path):
    res = run_cli("--image", "samples/flower.jpg", "--weights", model_dir, "--out", str(tmp_path / "noext"),
                  "--device", "cpu", "--method", "rollout")
    assert res.returncode == 0, res.stderr
    assert f"wrote {tmp_path / 'noext.png'}" in res.stdout and is_png(tmp_path / "noext.png")


@pytest.mark.parametrize("device", ["meta", "mps", "nonsense"])
def test_unusable_device_is_one_line(model_dir, tmp_path, device):
    res = run_cli("--image", "samples/flower.jpg", "--weights", model_dir, "--out", str(tmp_path / "o.png"),
                  "--device", device)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1, res.stderr
