"""perturbation_eval.py refuses stale or broken inputs (issue 15, classes 3, 4 and 6)."""
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from baselines.ViT import generate_visualizations as gv
from baselines.ViT import perturbation_eval as pe
from baselines.ViT.perturbation_data import InputError, encode_maps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # any pytest import mode
from perturbation_helpers import make_model_dir, make_tree  # noqa: E402


@pytest.fixture()
def generated(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=2, per_class=2)
    model = make_model_dir(tmp_path / "model", num_classes=2)
    out = tmp_path / "maps"
    assert gv.main(["--imagenet-validation-path", tree, "--weights", model, "--method", "rollout",
                    "--output-dir", str(out), "--batch-size", "4", "--num-workers", "0", "--device", "cpu"]) == 0
    return tree, model, out


def test_images_replaced_under_the_same_names_are_refused(generated, capsys):
    tree, model, out = generated
    path = os.path.join(tree, "c0", "0.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)  # same name, other pixels
    assert pe.main(["--results", str(out), "--imagenet-validation-path", tree, "--weights", model, "--neg",
                    "--device", "cpu"]) == 2
    assert "images changed" in capsys.readouterr().err


def test_a_symlink_loop_is_refused(generated, capsys):
    tree, model, out = generated
    os.symlink(os.path.join(tree, "c0"), os.path.join(tree, "c0", "loop"))
    assert pe.main(["--results", str(out), "--imagenet-validation-path", tree, "--weights", model, "--neg",
                    "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_non_finite_maps_are_not_stored_as_zeros():
    maps = np.ones((2, 3, 3), np.float32)
    maps[1, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        encode_maps(maps)
