"""generate_visualizations.py: contents, resumption after SIGKILL, torchrun
sharding and merging, and bad input."""
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from baselines.ViT import generate_visualizations as gv
from baselines.ViT.perturbation_data import decode_maps, load_image, open_image_tree, part_path
from baselines.ViT.perturbation_metrics import normalize_input
from baselines.ViT.ViT_explanation_generator import explain
from baselines.ViT.ViT_LRP import load_model
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # any pytest import mode
from perturbation_helpers import make_model_dir, make_tree  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "baselines", "ViT", "generate_visualizations.py")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    return make_tree(base / "tree"), make_model_dir(base / "model"), base


def args(tree, model, out, *extra, batch=4):
    return ["--imagenet-validation-path", tree, "--weights", model, "--output-dir", str(out), "--batch-size",
            str(batch), "--num-workers", "0", "--device", "cpu", *extra]


def read_all(path):
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f}
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    return data, attrs


def assert_same_file(a, b):
    (da, aa), (db, ab) = read_all(a), read_all(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert np.array_equal(da[k], db[k]), k
    assert aa == ab


MAPS = ("vis", "vis_scale", "vis_offset")


def assert_same_results(a, b):
    """Two runs in different processes: every index, class and attribute equal, the maps
    equal up to their float16 storage.  Bytes are equal where a float path computes the
    same bits in every process (measured: the default, one thread, ATen's default and AVX2
    kernels); MKL's reproducible mode without STRICT (make test-portable's fourth run)
    rounds by memory alignment, and a row of another process then differed in its last
    float16 bit."""
    (da, aa), (db, ab) = read_all(a), read_all(b)
    assert sorted(da) == sorted(db) and aa == ab
    for k in da:
        if k not in MAPS:
            assert np.array_equal(da[k], db[k]), k
    assert_maps_close(decode_maps(*(da[k] for k in MAPS)), decode_maps(*(db[k] for k in MAPS)).astype(np.float64))


def assert_maps_close(stored, expected):
    """Equal up to float16 rounding relative to each row's largest value."""
    peak = np.abs(expected).reshape(len(expected), -1).max(axis=1).reshape(-1, 1, 1)
    assert np.all(np.abs(stored - expected) <= 1e-3 * peak + 1e-30)


def env1():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


@pytest.fixture(scope="module")
def reference(setup):
    tree, model, base = setup
    out = base / "reference"
    assert gv.main(args(tree, model, out, "--method", "transformer_attribution", batch=2)) == 0
    return out / "results.hdf5"


# -- contents -----------------------------------------------------------------------------------
def test_rows_are_explain_of_each_image(setup, reference):
    tree, model_dir, base = setup
    data, attrs = read_all(reference)
    images = open_image_tree(tree)
    assert data["index"].tolist() == list(range(15))
    assert data["target"].tolist() == [label for _, label in images.samples]
    assert data["vis"].dtype == np.float16 and data["vis"].shape == (15, 4, 4)
    assert attrs["method"] == "transformer_attribution" and attrs["vis_class"] == "top"
    assert attrs["start_layer"] == 1 and attrs["model"] == "tiny_vit" and len(attrs["weights_sha256"]) == 64
    model = load_model("vit_base_patch16_224", model_dir)
    x = torch.stack([load_image(p, (32, 32)) for p, _ in images.samples[:5]])
    x = normalize_input(x, [0.5] * 3, [0.5] * 3)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    assert data["pred"][:5].tolist() == pred.tolist()
    cam = explain(model, x, "transformer_attribution", index=pred, start_layer=1)
    assert_maps_close(decode_maps(data["vis"][:5], data["vis_scale"][:5], data["vis_offset"][:5]), cam.numpy())


def test_image_loading_matches_torchvision_imagefolder(setup):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tree = setup[0]
    ds = ImageFolder(tree, transform=transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()]))
    images = open_image_tree(tree)
    assert images.samples == ds.samples and images.classes == ds.classes
    for i in (0, 7):
        assert torch.equal(load_image(images.samples[i][0], (32, 32)), ds[i][0])


def test_vis_class_target_lrp_and_limit(setup):
    tree, model_dir, base = setup
    out = base / "lrp_target"
    assert gv.main(args(tree, model_dir, out, "--method", "full_lrp", "--vis-class", "target", "--limit", "6")) == 0
    data, attrs = read_all(out / "results.hdf5")
    assert attrs["method"] == "lrp" and attrs["limit"] == 6
    assert data["index"].tolist() == [0, 2, 5, 7, 10, 12]
    assert data["vis"].shape == (6, 32, 32)  # pixels for lrp
    images = open_image_tree(tree)
    model = load_model("vit_base_patch16_224", model_dir)
    x = normalize_input(torch.stack([load_image(images.samples[i][0], (32, 32)) for i in data["index"]]),
                        [0.5] * 3, [0.5] * 3)
    target = torch.from_numpy(data["target"])  # the ground-truth class
    # in the script's batches of 4: full LRP in float32 amplifies rounding, and a batch of 6 moved
    # a row by more than the float16 storage under MKL's reproducible mode (make test-portable)
    cam = torch.cat([explain(model, x[i:i + 4], "lrp", index=target[i:i + 4]) for i in (0, 4)])
    assert_maps_close(decode_maps(data["vis"], data["vis_scale"], data["vis_offset"]), cam.numpy())


# -- resumption ---------------------------------------------------------------------------------
# SIGKILLs itself as the fourth batch starts: the kill lands after exactly three finished
# batches whatever the machine's speed (a kill timed from outside raced the run on a loaded
# machine)
KILLED_RUNNER = """
import os, signal, sys
import baselines.ViT.generate_visualizations as gv
_explain, calls = gv.explain, []
def dies_on_fourth(*a, **k):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return _explain(*a, **k)
gv.explain = dies_on_fourth
sys.exit(gv.main(sys.argv[1:]))
"""


def batch_done(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return f["batch_done"][()]
    except (OSError, KeyError):
        return None


def test_sigkill_then_rerun_equals_uninterrupted(setup, reference, monkeypatch):
    tree, model, base = setup
    out = base / "killed"
    part = part_path(str(out), 0, 1)
    proc = subprocess.run([sys.executable, "-c", KILLED_RUNNER,
                           *args(tree, model, out, "--method", "transformer_attribution", batch=2)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    done = batch_done(part)
    assert not (out / "results.hdf5").exists()
    assert done.sum() == 3 and len(done) == 8
    with h5py.File(part, "r") as f:  # what the killed run finished (batches 0-2: rows 0-5)
        rows = int(f["batch_offsets"][3])
        finished = {k: f[k][:rows] for k in MAPS}

    calls = []
    real = gv.explain
    monkeypatch.setattr(gv, "explain", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert gv.main(args(tree, model, out, "--method", "transformer_attribution", batch=2)) == 0
    assert len(calls) == len(done) - done.sum()  # finished batches were not recomputed
    assert not os.path.exists(part)
    with h5py.File(out / "results.hdf5", "r") as f:  # and kept to the byte
        for k in MAPS:
            assert np.array_equal(f[k][:rows], finished[k]), k
    assert_same_results(out / "results.hdf5", reference)
    # a third run finds the job complete and changes nothing
    calls.clear()
    assert gv.main(args(tree, model, out, "--method", "transformer_attribution", batch=2)) == 0
    assert not calls


def test_part_file_of_other_arguments_is_refused(setup, monkeypatch, capsys):
    tree, model, base = setup
    out = base / "interrupted"

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gv, "merge_parts", crash)
    assert gv.main(args(tree, model, out, "--method", "rollout", batch=4)) == 130  # Ctrl-C: one line, exit 130
    monkeypatch.undo()
    capsys.readouterr()
    assert gv.main(args(tree, model, out, "--method", "rollout", batch=5)) == 2
    err = capsys.readouterr().err
    assert "batch_size: file has 4, this run 5" in err and len(err.strip().splitlines()) == 1
    assert gv.main(args(tree, model, out, "--method", "rollout", batch=4) + ["--merge"]) == 0
    assert (out / "results.hdf5").exists() and not os.path.exists(part_path(str(out), 0, 1))


# -- torchrun -----------------------------------------------------------------------------------
def test_torchrun_two_processes_equal_one(setup, reference):
    tree, model, base = setup
    out = base / "torchrun"
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node=2", SCRIPT,
           *args(tree, model, out, "--method", "transformer_attribution", batch=2)]
    proc = subprocess.run(cmd, cwd=REPO, env=env1(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["results.hdf5"]  # parts merged and removed
    assert_same_results(out / "results.hdf5", reference)


def test_merge_of_two_ranks_and_merge_flag(setup, reference, monkeypatch):
    """The rank logic without launching: rank 1 then rank 0 in this process
    (the process group replaced by no-ops); rank 0's merge is interrupted
    once, then ``--merge`` finishes the job."""
    tree, model, base = setup
    out = base / "ranks"
    monkeypatch.setattr(gv, "_init_distributed", lambda: None)
    monkeypatch.setattr(gv, "_barrier", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        if rank == 0:
            monkeypatch.setattr(gv, "merge_parts", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
            assert gv.main(args(tree, model, out, "--method", "transformer_attribution", batch=2)) == 130
        else:
            assert gv.main(args(tree, model, out, "--method", "transformer_attribution", batch=2)) == 0
    monkeypatch.undo()
    with h5py.File(part_path(str(out), 1, 2), "r") as f:
        assert f["index"][()].tolist() == [2, 3, 6, 7, 10, 11, 14]  # batches 1, 3, 5, 7 of 2
    assert gv.main(args(tree, model, out, "--method", "transformer_attribution", batch=2) + ["--merge"]) == 0
    assert_same_file(out / "results.hdf5", reference)


# -- bad input ----------------------------------------------------------------------------------
def test_unreadable_image_is_reported_and_skipped(setup, tmp_path, capsys):
    tree, model, base = setup
    import shutil

    bad_tree = tmp_path / "tree"
    shutil.copytree(tree, bad_tree)
    bad = bad_tree / "c1" / "2.png"
    bad.write_bytes(b"this is not a png")
    out = tmp_path / "out"
    assert gv.main(args(str(bad_tree), model, out, "--method", "attn_last_layer")) == 0
    err = capsys.readouterr().err
    assert f"skipped unreadable image {bad}" in err
    data, attrs = read_all(out / "results.hdf5")
    assert 7 not in data["index"].tolist() and len(data["index"]) == 14
    assert data["skipped_index"].tolist() == [7] and attrs["num_skipped"] == 1
    assert [p.decode() if isinstance(p, bytes) else p for p in data["skipped_path"]] == [str(bad)]


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "splits"])
def test_bad_directories(setup, tmp_path, capsys, case):
    tree, model, base = setup
    path = tmp_path / case
    if case != "missing":
        path.mkdir()
    if case == "no_images":
        (path / "c0").mkdir()
        (path / "c0" / "notes.txt").write_text("x")
    if case == "splits":
        (path / "train").mkdir()
        (path / "val").mkdir()
    assert gv.main(args(str(path), model, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert {"missing": "not found", "empty": "no class sub-directories", "no_images": "no images",
            "splits": "split folders"}[case] in err


def test_results_of_another_method_is_refused(setup, reference, capsys):
    tree, model, base = setup
    out = os.path.dirname(reference)
    assert gv.main(args(tree, model, out, "--method", "rollout", batch=2)) == 2
    err = capsys.readouterr().err.strip()
    assert "method: file has 'transformer_attribution', this run 'rollout'" in err
    assert len(err.splitlines()) == 1


def test_cli_exit_status_2_without_traceback(setup, tmp_path):
    tree, model, base = setup
    proc = subprocess.run([sys.executable, SCRIPT, *args(str(tmp_path / "nowhere"), model, tmp_path / "o")],
                          cwd=REPO, env=env1(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: image directory not found")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, *args(tree, str(tmp_path / "nomodel"), tmp_path / "o")],
                          cwd=REPO, env=env1(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "weights not found" in proc.stderr and "Traceback" not in proc.stderr
