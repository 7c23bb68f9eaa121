"""train_synthetic.py and modules/checkpoints.py given bad flags, bad files and interruptions (issue 15)."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from baselines.ViT import train_synthetic as ts
from modules.checkpoints import (CheckpointError, check_state_finite, read_model_config, read_sharded_state_dict,
                                 read_state_dict)

TINY = ["--size", "32", "--patch-size", "8", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
        "--steps", "4", "--batch-size", "4", "--pool-size", "8", "--n-val", "8", "--eval-every", "2",
        "--warmup", "2", "--num-workers", "0", "--threads", "1", "--device", "cpu", "--quiet", "--min-accuracy", "0"]


def _with(flag, value, *more, base=None):
    argv = list(TINY if base is None else base)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return _with(*more, base=argv) if more else argv


@pytest.fixture
def no_training(monkeypatch):
    def forbidden(args):
        raise AssertionError("training started before the inputs were checked")
    monkeypatch.setattr(ts, "train", forbidden)


def _code_and_err(fn, capsys):
    try:
        code = fn()
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("flag, value", [
    ("--threads", "100000"), ("--threads", "0"), ("--size", "100000"), ("--size", "8"),
    ("--lr", "nan"), ("--lr", "-1"), ("--min-accuracy", "1.5"), ("--label-smoothing", "1"),
    ("--seed", "-1"), ("--data-seed", "-3"), ("--steps", "0"), ("--batch-size", "-8"), ("--pool-size", "-1"),
    ("--mlp-ratio", "inf"), ("--num-workers", "-1"), ("--embed-dim", "abc"),
])
def test_bad_numbers_exit_2_before_training(flag, value, tmp_path, capsys, no_training):
    code, err = _code_and_err(lambda: ts.main(_with(flag, value) + ["--out-dir", str(tmp_path / "o")]), capsys)
    assert code == 2 and flag in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--embed-dim", "6", "--num-heads", "2", "--sincos-init", "1"], "multiple of 4"),
    (["--pool-size", "10000000", "--size", "256"], "GiB"),
    (["--patch-size", "64"], "not a multiple of --patch-size"),
])
def test_inconsistent_flags_exit_2(argv, message, tmp_path, capsys, no_training):
    code, err = _code_and_err(lambda: ts.main(_with(*argv) + ["--out-dir", str(tmp_path / "o")]), capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:9", "nonsense"])
def test_unusable_device_one_line(device, tmp_path, capsys, no_training):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS present")
    if device == "cuda:9" and torch.cuda.device_count() > 9:
        pytest.skip("ten GPUs present")
    code, err = _code_and_err(lambda: ts.main(_with("--device", device) + ["--out-dir", str(tmp_path)]), capsys)
    assert code == 2 and err.startswith("error: --device") and len(err.strip().splitlines()) == 1


def test_out_dir_under_a_regular_file_is_refused_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _code_and_err(lambda: ts.main(TINY + ["--out-dir", str(blocker / "model")]), capsys)
    assert code == 2 and "--out-dir" in err and "is a file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_refused_before_training(tmp_path, capsys, no_training):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err = _code_and_err(lambda: ts.main(TINY + ["--out-dir", str(ro)]), capsys)
    finally:
        ro.chmod(0o700)
    assert code == 2 and "cannot write" in err


def test_nan_loss_saves_nothing(tmp_path, capsys, monkeypatch):
    real = ts.F.cross_entropy
    monkeypatch.setattr(ts.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    code, err = _code_and_err(lambda: ts.main(TINY + ["--out-dir", str(tmp_path / "o")]), capsys)
    assert code == 2 and "training diverged" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt)
    try:
        code, err = _code_and_err(lambda: ts.main(TINY + ["--out-dir", str(tmp_path / "o")]), capsys)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped as a traceback")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130 and len(lines) == 1 and lines[0].startswith("interrupted")


def test_a_finished_model_survives_a_second_run_that_fails(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert ts.main(TINY + ["--out-dir", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes(), (out / "config.json").read_bytes()
    real = ts.F.cross_entropy
    monkeypatch.setattr(ts.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    assert ts.main(TINY + ["--out-dir", str(out)]) == 2
    assert ((out / "model.safetensors").read_bytes(), (out / "config.json").read_bytes()) == before
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temporary or lock file left


# ----------------------------------------------------------------------------
# model folders and checkpoint files
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "model"
    assert ts.main(TINY + ["--out-dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("key, value, message", [
    ("embed_dim", "16", "model_kwargs.embed_dim must be an integer"),
    ("depth", 0, "model_kwargs.depth must be an integer in 1.."),
    ("num_heads", 3, "model_kwargs.embed_dim must be a multiple of num_heads 3"),
    ("img_size", [32, "32"], "model_kwargs.img_size must be"),
    ("img_size", [36, 36], "a multiple of patch_size"),
    ("mlp_ratio", "2.0", "model_kwargs.mlp_ratio must be a finite positive number"),
    ("eps", -1e-6, "model_kwargs.eps must be"),
    ("qkv_bias", "yes", "model_kwargs.qkv_bias must be true or false"),
])
def test_config_json_with_wrong_types_is_one_line(model_dir, tmp_path, key, value, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_kwargs"][key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        ts.load_synthetic_model(str(bad))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_json_std_and_json_errors(model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["std"] = [0.5, 0.0, 0.5]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="std must be three finite numbers > 0"):
        read_model_config(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON file"):
        read_model_config(str(bad))
    assert read_model_config(str(model_dir))["model_kwargs"]["depth"] == 1


def test_wrong_shape_checkpoint_is_one_line(model_dir, tmp_path):
    from safetensors.torch import load_file
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    state["head.weight"] = torch.zeros(3, 3)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch head.weight") as e:
        ts.load_synthetic_model(str(bad))
    assert "\n" not in str(e.value)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_hostile_pickle_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "training_state.pt"
    path.write_bytes(pickle.dumps({"model": _Boom()}))
    with pytest.raises(CheckpointError, match="weights_only=True") as e:
        read_state_dict(str(path))
    assert "\n" not in str(e.value)


def test_shard_index_validation(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    state = read_sharded_state_dict(str(index))
    assert set(state) == {"a", "b"} and torch.equal(state["a"], torch.ones(2))
    for content, message in ((json.dumps({"metadata": {}}), "needs a non-empty 'weight_map'"),
                             ("{oops", "not valid JSON"),
                             (json.dumps([1, 2]), "weight_map"),
                             (json.dumps({"weight_map": {"a": 3}}), "must map tensor names"),
                             (json.dumps({"weight_map": {"a": "../s1.safetensors"}}), "not a file in the index"),
                             (json.dumps({"weight_map": {"a": "nope.safetensors"}}), "checkpoint not found"),
                             (json.dumps({"weight_map": {"c": "s1.safetensors"}}), "in no shard")):
        index.write_text(content)
        with pytest.raises(CheckpointError, match=message):
            read_sharded_state_dict(str(index))


def test_check_state_finite(tmp_path):
    check_state_finite({"a": torch.ones(3), "ids": torch.arange(3)}, "x")
    with pytest.raises(CheckpointError, match=r"x: tensor 'w' holds 1 NaN/Inf values of 4"):
        check_state_finite({"a": torch.ones(3), "w": torch.tensor([0.0, float("inf"), 1.0, 2.0])}, "x")


def test_two_runs_into_one_folder_never_mix_weights_and_config(tmp_path):
    """Saving is serialised by a lock: whatever order, config.json names the sha256 of the weights beside it."""
    import threading

    from modules.checkpoints import file_sha256
    out = tmp_path / "o"
    codes = []
    threads = [threading.Thread(target=lambda s=s: codes.append(ts.main(_with("--seed", str(s)) +
                                                                       ["--out-dir", str(out)])))
               for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [0, 0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["weights_sha256"] == file_sha256(str(out / "model.safetensors"))


def test_sharded_checkpoint_through_read_state_dict_and_its_hash(tmp_path):
    from modules.checkpoints import file_sha256, weights_sha256
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    assert set(read_state_dict(str(index))) == {"a", "b"}
    assert weights_sha256(str(index)) == file_sha256(str(index), str(tmp_path / "s1.safetensors"),
                                                     str(tmp_path / "s2.safetensors"))
    index.write_text(json.dumps({"metadata": {"total_size": 1}}))  # no weight_map
    with pytest.raises(CheckpointError, match="weight_map"):
        read_state_dict(str(index))
    with pytest.raises(CheckpointError, match="weight_map"):
        weights_sha256(str(index))
