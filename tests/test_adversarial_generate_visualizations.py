"""generate_visualizations.py given broken HDF5 metadata, NaN weights, replaced images, symlink loops,
bad numbers and Ctrl-C (issue 15)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from baselines.ViT import generate_visualizations as gv
from baselines.ViT.perturbation_data import part_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from perturbation_helpers import make_model_dir, make_tree  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen_adv")
    return make_tree(base / "tree", per_class=2), make_model_dir(base / "model"), base


def args(tree, model, out, *extra, batch=2):
    return ["--imagenet-validation-path", tree, "--weights", model, "--output-dir", str(out), "--batch-size",
            str(batch), "--num-workers", "0", "--device", "cpu", "--method", "rollout", *extra]


def _lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]


@pytest.fixture(scope="module")
def finished(setup):
    tree, model, base = setup
    out = base / "finished"
    assert gv.main(args(tree, model, out)) == 0
    return out / "results.hdf5"


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.attrs.__setitem__("identity_json", "{not json"), "malformed metadata"),
    (lambda f: f.attrs.__setitem__("identity_json", json.dumps([1, 2])), "malformed metadata"),
    (lambda f: f.attrs.__delitem__("identity_json"), "not a relevance-map file"),
    (lambda f: f.__delitem__("vis_scale"), "lacks the dataset 'vis_scale'"),
])
def test_malformed_results_metadata_is_one_line(setup, finished, tmp_path, capsys, damage, message):
    tree, model, base = setup
    out = tmp_path / "o"
    out.mkdir()
    shutil.copy(finished, out / "results.hdf5")
    with h5py.File(out / "results.hdf5", "r+") as f:
        damage(f)
    assert gv.main(args(tree, model, out)) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and message in lines[0], lines


def _interrupted_part(setup, out, monkeypatch):
    tree, model, base = setup
    monkeypatch.setattr(gv, "merge_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert gv.main(args(tree, model, out)) == 130
    monkeypatch.undo()
    return part_path(str(out), 0, 1)


@pytest.mark.parametrize("damage", ["short_offsets", "short_vis", "offsets_out_of_range", "no_batch_done",
                                    "bad_json"])
def test_damaged_part_file_is_one_line(setup, tmp_path, capsys, monkeypatch, damage):
    tree, model, base = setup
    out = tmp_path / "o"
    path = _interrupted_part(setup, out, monkeypatch)
    with h5py.File(path, "r+") as f:
        if damage == "short_offsets":
            data = f["batch_offsets"][()][:-1]
            del f["batch_offsets"]
            f["batch_offsets"] = data
        elif damage == "short_vis":
            data = f["vis"][()][:-1]
            del f["vis"]
            f["vis"] = data
        elif damage == "offsets_out_of_range":
            f["batch_offsets"][-1] = 10 ** 6
        elif damage == "no_batch_done":
            del f["batch_done"]
        else:
            f.attrs["identity_json"] = "{oops"
    capsys.readouterr()
    assert gv.main(args(tree, model, out)) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and ("damaged part file" in lines[0] or "malformed" in lines[0]
                                or "delete it" in lines[0]), lines


def test_ctrl_c_keeps_committed_batches(setup, tmp_path, capsys, monkeypatch):
    tree, model, base = setup
    out = tmp_path / "o"
    calls = []
    real = gv.explain

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(gv, "explain", interrupt)
    assert gv.main(args(tree, model, out)) == 130
    lines = _lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("interrupted")
    with h5py.File(part_path(str(out), 0, 1), "r") as f:
        assert f["batch_done"][()].tolist()[:2] == [1, 0]
    monkeypatch.undo()
    assert gv.main(args(tree, model, out)) == 0
    assert (out / "results.hdf5").exists()


def test_nan_weights_are_refused(setup, tmp_path, capsys):
    tree, model, base = setup
    bad = tmp_path / "nan_model"
    shutil.copytree(model, bad)
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k in state if k.endswith("qkv.weight"))
    state[key][:] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    out = tmp_path / "o"
    assert gv.main(args(tree, str(bad), out)) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and "NaN or Inf" in lines[0]
    assert not (out / "results.hdf5").exists()


def test_replaced_images_change_the_identity(setup, tmp_path, capsys, monkeypatch):
    tree, model, base = setup
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    out = tmp_path / "o"
    monkeypatch.setattr(gv, "merge_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert gv.main(args(str(copy), model, out)) == 130
    monkeypatch.undo()
    img = copy / "c0" / "0.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)  # same name, other pixels
    capsys.readouterr()
    assert gv.main(args(str(copy), model, out)) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and "dataset_content_sha256" in lines[0]


def test_symlink_loop_is_refused(setup, tmp_path, capsys):
    tree, model, base = setup
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    os.symlink(copy / "c1", copy / "c1" / "again")  # a class folder holding a link to itself
    assert gv.main(args(str(copy), model, tmp_path / "o")) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and "by two paths" in lines[0]


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-4"), ("--limit", "0"),
                                         ("--num-workers", "-1"), ("--start-layer", "-1"), ("--limit", "x")])
def test_bad_numbers_exit_2(setup, tmp_path, capsys, flag, value):
    tree, model, base = setup
    with pytest.raises(SystemExit) as e:
        gv.main(args(tree, model, tmp_path / "o", flag, value))
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "cuda:9", "nonsense"])
def test_bad_device_before_work(setup, tmp_path, capsys, device):
    tree, model, base = setup
    argv = args(tree, model, tmp_path / "o")
    argv[argv.index("--device") + 1] = device
    assert gv.main(argv) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: --device")


def test_config_json_with_a_string_is_one_line(setup, tmp_path, capsys):
    tree, model, base = setup
    bad = tmp_path / "m"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_kwargs"]["depth"] = "2"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert gv.main(args(tree, str(bad), tmp_path / "o")) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and "model_kwargs.depth must be an integer" in lines[0]


def test_second_run_into_a_busy_folder_is_refused(setup, tmp_path, capsys):
    from modules import cli
    tree, model, base = setup
    out = tmp_path / "o"
    out.mkdir()
    with cli.file_lock(str(out)):
        assert gv.main(args(tree, model, out)) == 2
    lines = _lines(capsys)
    assert len(lines) == 1 and "in use by another run" in lines[0]
    assert os.listdir(out) == []  # nothing written, no lock file
