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


def _edit_identity(f, fn):
    import json
    identity = json.loads(f.attrs["identity_json"])
    f.attrs["identity_json"] = json.dumps(fn(identity))


def _replace(name, fn):
    def edit(f):
        data = fn(f[name][()])
        del f[name]
        f[name] = data
    return edit


def _set_first(value):
    def fn(x):
        x[0] = value
        return x
    return fn


def _all_nan(f):
    f["vis"][...] = np.nan


HOSTILE_RESULTS = {  # issue 27 finding 5: each refused in one line naming the field, never evaluated
    "identity not JSON": (lambda f: f.attrs.__setitem__("identity_json", "{not json"), "not JSON"),
    "identity a list": (lambda f: f.attrs.__setitem__("identity_json", "[1, 2]"), "JSON object"),
    "identity without method": (lambda f: _edit_identity(f, lambda i: {k: v for k, v in i.items() if k != "method"}),
                                "'method'"),
    "index beyond the images": (_replace("index", _set_first(10 ** 6)), "outside"),
    "negative index": (_replace("index", _set_first(-1)), "negative"),
    "scales short": (_replace("vis_scale", lambda x: x[:-1]), "'vis_scale' has"),
    "maps short": (_replace("vis", lambda x: x[:-1]), "'vis' must be"),
    "all-NaN maps": (_all_nan, "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RESULTS))
def test_hostile_results_files_are_refused_in_one_line(generated, tmp_path, capsys, case):
    import h5py
    tree, model, out = generated
    edit, message = HOSTILE_RESULTS[case]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with h5py.File(bad / "results.hdf5", "r+") as f:
        edit(f)
    before = (bad / "results.hdf5").read_bytes()
    capsys.readouterr()
    assert pe.main(["--results", str(bad), "--imagenet-validation-path", tree, "--weights", model, "--neg",
                    "--device", "cpu", "--output-dir", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and message in err, err
    assert (bad / "results.hdf5").read_bytes() == before
    assert not (tmp_path / "eval" / "negative").exists() or not os.listdir(tmp_path / "eval" / "negative")
