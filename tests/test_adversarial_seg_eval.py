"""imagenet_seg_eval.py / data/imagenet_seg.py given bad files, bad numbers and a busy output folder (issue 15)."""
from __future__ import annotations

import json
import os
import shutil
import sys

import h5py
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from baselines.ViT import imagenet_seg_eval as E
from data.imagenet_seg import ImagenetSegmentation, SegmentationDataError, check_gtsegs_file
from data.synthetic import write_gtsegs_mat
from modules import cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_seg_eval import _run, setup  # noqa: E402,F401  (setup is a fixture)


def _exit(fn, capsys):
    try:
        fn()
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert "Traceback" not in err
    return code, lines


def test_empty_mat_is_refused(tmp_path, setup, capsys):
    mat = tmp_path / "empty.mat"
    with h5py.File(mat, "w") as f:
        f.create_dataset("/value/img", shape=(0, 1), dtype=h5py.ref_dtype)
        f.create_dataset("/value/gt", shape=(0, 1), dtype=h5py.ref_dtype)
    with pytest.raises(SegmentationDataError, match="holds no images"):
        check_gtsegs_file(str(mat))
    root, weights, _ = setup
    code, lines = _exit(lambda: E.main(["--imagenet-seg-path", str(mat), "--weights", weights, "--output-dir",
                                        str(tmp_path / "o"), "--device", "cpu", "--quiet"]), capsys)
    assert code == 2 and len(lines) == 1 and "holds no images" in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


def test_huge_image_entry_is_refused_without_reading_it(tmp_path):
    mat = tmp_path / "bomb.mat"
    with h5py.File(mat, "w") as f:
        img = f.create_dataset("refs/img0", shape=(3, 20000, 20000), dtype=np.uint8, chunks=(1, 256, 256))
        mask = f.create_dataset("refs/mask0", shape=(20000, 20000), dtype=np.uint8, chunks=(256, 256))
        holder = f.create_dataset("refs/gt0", shape=(1, 1), dtype=h5py.ref_dtype)
        holder[0, 0] = mask.ref
        f.create_dataset("/value/img", data=np.array([[img.ref]], dtype=h5py.ref_dtype))
        f.create_dataset("/value/gt", data=np.array([[holder.ref]], dtype=h5py.ref_dtype))
    assert os.path.getsize(mat) < 1e6
    ds = ImagenetSegmentation(str(mat))
    with pytest.raises(SegmentationDataError, match="more than .* pixels"):
        ds[0]


def test_finished_run_of_another_method_is_not_replaced(setup, tmp_path, capsys):
    out = tmp_path / "o"
    _run(setup, out, "--method", "rollout", "--limit", "4")
    before = {n: (out / n).read_bytes() for n in ("results.json", "table.md", "progress.json")}
    code, lines = _exit(lambda: _run(setup, out, "--method", "attn_last_layer", "--limit", "4"), capsys)
    assert code == 2 and len(lines) == 1 and "holds the finished results of another run" in lines[0]
    assert "--overwrite" in lines[0]
    assert {n: (out / n).read_bytes() for n in before} == before
    # the same finished run may be repeated; another one only with --overwrite
    assert _run(setup, out, "--method", "rollout", "--limit", "4")["method"] == "rollout"
    assert (out / "results_rollout.json").exists()
    assert _run(setup, out, "--method", "attn_last_layer", "--limit", "4", "--overwrite")["method"] == \
        "attn_last_layer"
    assert not (out / "results_rollout.json").exists()  # the replaced run leaves nothing behind
    assert not (out / "overlays" / "rollout").exists()


def test_results_without_progress_are_not_replaced(setup, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    code, lines = _exit(lambda: _run(setup, out, "--method", "rollout", "--limit", "2"), capsys)
    assert code == 2 and "without progress.json" in lines[0]


def test_unfinished_run_needs_resume_or_overwrite(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    original = E.relevance_maps
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*a, **k)
    monkeypatch.setattr(E, "relevance_maps", interrupt)
    code, lines = _exit(lambda: _run(setup, out, "--method", "rollout", "--batch-size", "2", "--limit", "6"), capsys)
    assert code == 130 and len(lines) == 1 and "interrupted after 2 of 6 images" in lines[0]
    assert json.loads((out / "progress.json").read_text())["n_images_done"] == 2
    monkeypatch.setattr(E, "relevance_maps", original)
    code, lines = _exit(lambda: _run(setup, out, "--method", "rollout", "--batch-size", "2", "--limit", "6"), capsys)
    assert code == 2 and "unfinished run of this same evaluation (2 of 6 images)" in lines[0]
    assert _run(setup, out, "--method", "rollout", "--batch-size", "2", "--limit", "6", "--resume")["n_images"] == 6


def test_replaced_data_file_is_not_resumed(setup, tmp_path, capsys):
    root, weights, _ = setup
    mat = str(tmp_path / "val.mat")
    write_gtsegs_mat(mat, 6, seed=0, size=40, split="val")
    out = tmp_path / "o"
    argv = ["--imagenet-seg-path", mat, "--weights", weights, "--output-dir", str(out), "--device", "cpu",
            "--quiet", "--method", "rollout"]
    E.main(argv)
    write_gtsegs_mat(mat, 6, seed=1, size=40, split="val")  # other pixels, same name and count
    code, lines = _exit(lambda: E.main(argv + ["--resume"]), capsys)
    assert code == 2 and "data_sha256" in lines[0]


def test_nan_weights_give_no_table(setup, tmp_path, capsys):
    root, weights, mat = setup
    bad = tmp_path / "nan_model"
    shutil.copytree(weights, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["head.weight"][:] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    out = tmp_path / "o"
    code, lines = _exit(lambda: E.main(["--imagenet-seg-path", mat, "--weights", str(bad), "--output-dir", str(out),
                                        "--device", "cpu", "--quiet", "--method", "transformer_attribution"]), capsys)
    assert code == 2 and len(lines) == 1 and "NaN or Inf" in lines[0]
    assert not (out / "results.json").exists() and not (out / "table.md").exists()


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-3"), ("--limit", "0"),
                                         ("--threads", "100000"), ("--num-workers", "-1"), ("--save-every", "-1"),
                                         ("--num-overlays", "-2")])
def test_bad_numbers_exit_2(setup, tmp_path, capsys, flag, value):
    code, lines = _exit(lambda: _run(setup, tmp_path / "o", flag, value), capsys)
    assert code == 2 and flag in lines[-1]


@pytest.mark.parametrize("device", ["meta", "cuda:9", "nonsense"])
def test_bad_device_one_line(setup, tmp_path, capsys, device):
    root, weights, mat = setup
    code, lines = _exit(lambda: E.main(["--imagenet-seg-path", mat, "--weights", weights, "--output-dir",
                                        str(tmp_path), "--device", device, "--quiet"]), capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --device")


def test_output_dir_under_a_file_and_busy_folder(setup, tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("")
    code, lines = _exit(lambda: _run(setup, blocker / "o"), capsys)
    assert code == 2 and "--output-dir" in lines[0]
    out = tmp_path / "busy"
    out.mkdir()
    with cli.file_lock(str(out)):
        code, lines = _exit(lambda: _run(setup, out, "--limit", "2"), capsys)
    assert code == 2 and "in use by another run" in lines[0]


def test_garbage_progress_file_is_one_line(setup, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "progress.json").write_text("{truncated")
    code, lines = _exit(lambda: _run(setup, out, "--resume"), capsys)
    assert code == 2 and len(lines) == 1 and "progress.json: unreadable" in lines[0]
    (out / "progress.json").write_text(json.dumps({"identity": None}))
    code, lines = _exit(lambda: _run(setup, out, "--resume"), capsys)
    assert code == 2 and "belongs to another run" in lines[0]
