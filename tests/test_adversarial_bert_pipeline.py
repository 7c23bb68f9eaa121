"""bert_pipeline.py under SIGKILL, Ctrl-C and hostile parameter / state files (issue 15).

The kill test runs the pipeline in forked children (torch and transformers
are imported once, here), kills each with SIGKILL at a chosen moment, runs it
again, and finally compares every output file byte for byte with an
uninterrupted run (timing fields of the two JSON logs excepted).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from BERT_rationale_benchmark import synthetic_reviews
from BERT_rationale_benchmark.models.pipeline import bert_pipeline as bp
from BERT_rationale_benchmark.utils import load_flattened_documents

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_bert_pipeline import SPECIALS, _write_tiny_bert  # noqa: E402

TIMED_JSON = {"summary_test.json", "training_log.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eraser_kill")
    data = root / "data"
    synthetic_reviews.generate(data, n_train=8, n_val=4, n_test=4, seed=2)
    words = sorted({w for doc in load_flattened_documents(data).values() for w in doc})
    model_dir = _write_tiny_bert(root / "bert", SPECIALS + words, dropout=0.1)  # dropout: the RNG matters
    params = {"pretrained": str(model_dir), "max_length": 40, "classes": ["NEG", "POS"], "seed": 0,
              "train": {"batch_size": 4, "lr": 1e-3, "epochs": 2, "select_on_val": True, "eval_batch_size": 8},
              "explain": {"batch_size": 4, "k": [10, 20], "heatmaps": 2}}
    params_file = root / "params.json"
    params_file.write_text(json.dumps(params))
    return {"root": root, "data": data, "params": params_file, "params_dict": params}


def _argv(tiny, out):
    return ["--data-dir", str(tiny["data"]), "--output-dir", str(out), "--model-params", str(tiny["params"]),
            "--method", "transformer_attribution", "--device", "cpu"]


def _child(argv, kill_at):
    """Runs in a forked process: install the kill point, then the pipeline."""
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP pools do not survive fork
    import sys
    sys.stdout = sys.stderr = open(os.devnull, "w")
    calls = {}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(name, n):
        calls[name] = calls.get(name, 0) + 1
        return calls[name] == n

    kind, n = kill_at if kill_at else (None, 0)
    if kind == "adam_step":  # during an epoch
        original_step = torch.optim.Adam.step

        def step(self, *a, **k):
            if counted(kind, n):
                die()
            return original_step(self, *a, **k)
        torch.optim.Adam.step = step
    elif kind in ("state_written", "state_unrenamed"):  # just after / just before the checkpoint's rename
        original_replace = os.replace

        def replace(src, dst, *a, **k):
            hit = str(dst).endswith(bp.STATE_FILE) and counted(kind, n)
            if hit and kind == "state_unrenamed":
                die()
            result = original_replace(src, dst, *a, **k)
            if hit:
                die()
            return result
        os.replace = replace
    elif kind == "tokenizer_save":  # classifier weights written, tokenizer not yet
        from transformers import PreTrainedTokenizerBase

        def save(self, *a, **k):
            die()
        PreTrainedTokenizerBase.save_pretrained = save
    elif kind == "explain":  # during the explanations
        from BERT_explainability.modules.BERT import ExplanationGenerator
        original_explain = ExplanationGenerator.explain

        def explain(*a, **k):
            if counted(kind, n):
                die()
            return original_explain(*a, **k)
        ExplanationGenerator.explain = explain
    elif kind == "heatmap":  # while a method's folder is being written
        original_heatmaps = bp._write_heatmaps

        def heatmaps(*a, **k):
            if counted(kind, n):
                die()
            return original_heatmaps(*a, **k)
        bp._write_heatmaps = heatmaps
    code = bp.main(argv)
    os._exit(code)


def _run(argv, kill_at=None) -> int:
    proc = mp.get_context("fork").Process(target=_child, args=(argv, kill_at))
    proc.start()
    proc.join(240)
    assert not proc.is_alive(), "pipeline child hung"
    return proc.exitcode


def _tree(root: Path):
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name in TIMED_JSON:
                obj = json.loads(data)
                obj.pop("seconds", None)
                for m in obj.get("methods", {}).values():
                    m.pop("seconds", None)
                data = json.dumps(obj, sort_keys=True).encode()
            files[str(p.relative_to(root))] = data
        elif p.is_dir() and not any(p.iterdir()):
            files[str(p.relative_to(root)) + "/"] = b""
    return files


def test_sigkill_at_several_moments_resumes_byte_for_byte(tiny):
    reference = tiny["root"] / "reference"
    assert _run(_argv(tiny, reference)) == 0
    expected = _tree(reference)
    assert "classifier/tokenizer.json" in expected and "transformer_attribution/identifier_results_20.json" in expected
    assert not any(".tmp" in name or "training" in name.split("/")[0] for name in expected)

    out = tiny["root"] / "killed"
    chain = [("adam_step", 1),        # before the first optimiser step
             ("adam_step", 2),        # epoch 1, second batch
             ("state_written", 1),    # right after the epoch-1 checkpoint
             ("adam_step", 1),        # epoch 2 of the resumed run
             ("state_unrenamed", 1),  # the epoch-2 checkpoint written, not yet renamed
             ("tokenizer_save", 1),   # classifier weights saved, tokenizer not
             ("explain", 1),          # first explanation batch
             ("heatmap", 2)]          # half of the method folder written
    for kill_at in chain:
        assert _run(_argv(tiny, out), kill_at) == -signal.SIGKILL, kill_at
        cls_dir = out / "classifier"
        assert not cls_dir.exists() or {"config.json", "model.safetensors", "tokenizer.json"} <= \
            {p.name for p in cls_dir.iterdir()}, f"half-written classifier after {kill_at}"
    assert _run(_argv(tiny, out)) == 0
    got = _tree(out)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if got[name] != expected[name]]
    assert different == []


def test_ctrl_c_exits_130_in_one_line_and_keeps_the_epochs(tiny, capsys, monkeypatch):
    out = tiny["root"] / "ctrl_c"
    original_step = torch.optim.Adam.step
    calls = []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # epoch 2, after the epoch-1 checkpoint
            raise KeyboardInterrupt
        return original_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    try:
        with pytest.raises(SystemExit) as e:
            bp.main(_argv(tiny, out))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped as a traceback")
    assert e.value.code == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s" not in line
           and "%|" not in line]
    assert len(err) == 1 and err[0].startswith("interrupted")
    state = torch.load(out / bp.TRAINING_DIR / bp.STATE_FILE, weights_only=True)
    assert state["epoch"] == 0 and not (out / "classifier").exists()


def _params(tiny, tmp_path, **changes):
    params = json.loads(json.dumps(tiny["params_dict"]))
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        (params[section] if section else params)[name] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(params))
    return path


@pytest.mark.parametrize("change, message", [
    ({"train__batch_size": -8}, "train.batch_size must be positive, got -8"),
    ({"train__batch_size": 0}, "train.batch_size must be positive"),
    ({"train__eval_batch_size": -1}, "train.eval_batch_size must be positive"),
    ({"explain__batch_size": "4"}, "explain.batch_size must be an integer, got '4'"),
    ({"max_length": 0}, "max_length must be >= 3, got 0"),
    ({"max_length": "512"}, "max_length must be an integer"),
    ({"max_length": 40.5}, "max_length must be an integer"),
    ({"train__epochs": 0}, "train.epochs must be positive"),
    ({"train__lr": "1e-3"}, "train.lr must be a number"),
    ({"train__lr": -1e-3}, "train.lr must be positive"),
    ({"train__lr": 0}, "train.lr must be positive"),
    ({"seed": -1}, "seed must be in [0, "),
    ({"seed": True}, "seed must be an integer"),
    ({"explain__heatmaps": -2}, "explain.heatmaps must be non-negative"),
    ({"explain__k": [10, "20"]}, "explain.k must be a list of positive integers"),
    ({"explain__k": [0]}, "explain.k must be a list of positive integers"),
    ({"train__select_on_val": "yes"}, "train.select_on_val must be true or false"),
    ({"train__batchsize": 4}, "unknown train parameter(s) batchsize"),
    ({"classes": "NEG,POS"}, "classes must be a list of strings"),
    ({"pretrained": 3}, "pretrained must be a non-empty string"),
])
def test_bad_parameter_files_exit_2_before_work(tiny, tmp_path, capsys, change, message):
    path = _params(tiny, tmp_path, **change)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, out)[:4] + ["--model-params", str(path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # refused before any work


def test_train_section_must_be_an_object(tiny, tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(dict(tiny["params_dict"], train=[1, 2])))
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, tmp_path / "o")[:4] + ["--model-params", str(path)])
    assert e.value.code == 2 and "train must be a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:7", "nonsense"])
def test_unusable_devices_one_line(tiny, tmp_path, capsys, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS present")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("eight GPUs present")
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, tmp_path / "o")[:-2] + ["--device", device])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --device") and len(err.strip().splitlines()) == 1


def test_threads_out_of_range(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, tmp_path / "o") + ["--threads", "100000"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def _hostile_pickle(path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))
    path.write_bytes(pickle.dumps({"model": Boom()}))


@pytest.mark.parametrize("kind", ["hostile", "truncated", "foreign", "wrong_shape"])
def test_broken_training_state_is_one_line(tiny, tmp_path, capsys, kind):
    out = tmp_path / "out"
    state = out / bp.TRAINING_DIR / bp.STATE_FILE
    state.parent.mkdir(parents=True)
    if kind == "hostile":
        _hostile_pickle(state)
        message = "not a training state this pipeline wrote"
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(3)}}, state)
        state.write_bytes(state.read_bytes()[:50])
        message = "not a training state this pipeline wrote"
    elif kind == "foreign":
        torch.save({"model": {"w": torch.zeros(3)}, "epoch": 0}, state)
        message = "training state lacks"
    else:
        torch.save({"model": {"w": torch.zeros(3)}, "optimizer": {}, "epoch": 0, "log": "{}", "rng": {}}, state)
        message = "does not fit the model"
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, out))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_incomplete_classifier_folder_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    cls_dir = out / "classifier"
    cls_dir.mkdir(parents=True)
    (cls_dir / "config.json").write_text("{}")
    (cls_dir / "model.safetensors").write_bytes(b"x")  # an older version killed before the tokenizer
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, out))
    assert e.value.code == 2 and "incomplete classifier folder" in capsys.readouterr().err


def test_output_dir_under_a_file_is_refused(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, blocker / "out"))
    assert e.value.code == 2 and "not a directory" in capsys.readouterr().err


def test_nan_weights_are_refused_not_scored(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "nan_bert"
    bad.mkdir()
    for f in Path(tiny["params_dict"]["pretrained"]).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[key][5:] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, out) + ["--pretrained", str(bad)])
    err = capsys.readouterr().err
    # refused as the weights load (modules.checkpoints, issue 27), before any fine-tuning step
    assert e.value.code == 2 and err.count("\n") == 1 and "word_embeddings.weight' holds" in err and "NaN/Inf" in err
    assert not (out / "classifier").exists() and not (out / "transformer_attribution").exists()


def test_nan_classifier_logits_are_refused(tiny, tmp_path, capsys):
    """A saved classifier whose weights hold NaN: no accuracy, no rationales, exit 2."""
    from safetensors.torch import load_file, save_file
    out = tmp_path / "out"
    cls_dir = out / "classifier"
    cls_dir.mkdir(parents=True)
    src = Path(tiny["params_dict"]["pretrained"])
    for f in src.iterdir():
        (cls_dir / f.name).write_bytes(f.read_bytes())
    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
    with pytest.warns(UserWarning):
        model = BertForSequenceClassification.from_pretrained(str(src), num_labels=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["classifier.bias"][:] = float("inf")
    state["classifier.weight"][:] = 0.0
    state["classifier.bias"][0] = -float("inf")
    model.load_state_dict(state)
    model.save_pretrained(str(cls_dir))
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(cls_dir))
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "logits" in err and "NaN or Inf" in err
    assert not (out / "transformer_attribution").exists() and not (out / "summary_test.json").exists()


def test_a_second_run_into_a_busy_output_dir_is_refused(tiny, tmp_path, capsys):
    from modules import cli
    out = tmp_path / "out"
    out.mkdir()
    with cli.file_lock(str(out)):
        with pytest.raises(SystemExit) as e:
            bp.main(_argv(tiny, out))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "in use by another run" in err and len(err.strip().splitlines()) == 1


def test_saved_classifier_is_not_reused_for_other_data_or_parameters(tiny, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--output-dir", str(out), "--model-params", str(tiny["params"]),
            "--method", "rollout", "--device", "cpu"]
    assert bp.main(argv) == 0
    assert (out / "classifier" / bp.IDENTITY_FILE).is_file()
    assert bp.main(argv) == 0  # same data and parameters: reused
    assert "using the trained classifier" in capsys.readouterr().out
    # other training parameters
    other = tmp_path / "p.json"
    other.write_text(json.dumps(dict(tiny["params_dict"], train=dict(tiny["params_dict"]["train"], lr=5e-4))))
    with pytest.raises(SystemExit) as e:
        bp.main(argv[:4] + ["--model-params", str(other)] + argv[6:])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "fine-tuned on other data or with other parameters (differs in: train)" in err
    # the same names, other training labels
    lines = (data / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["classification"] = "NEG" if rec["classification"] == "POS" else "POS"
    (data / "train.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(SystemExit) as e:
        bp.main(argv)
    assert e.value.code == 2 and "differs in: data_sha256" in capsys.readouterr().err


def test_resume_state_of_other_parameters_is_refused(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    original_step = torch.optim.Adam.step
    calls = []

    def step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original_step(self, *a, **k)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(SystemExit):
        bp.main(_argv(tiny, out))
    monkeypatch.undo()
    other = tmp_path / "p.json"
    other.write_text(json.dumps(dict(tiny["params_dict"], seed=7)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        bp.main(_argv(tiny, out)[:4] + ["--model-params", str(other), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "was written for other data or parameters (differs in: seed)" in err


def test_metrics_refuse_method_folders_of_different_runs(tiny, tmp_path, capsys):
    """A method folder left by a run with another classifier is not tabled beside fresh ones."""
    import shutil

    from BERT_rationale_benchmark import metrics
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["--data-dir", str(tiny["data"]), "--model-params", str(tiny["params"]), "--device", "cpu"]
    assert bp.main(base + ["--output-dir", str(a), "--method", "rollout"]) == 0
    other = tmp_path / "p.json"
    other.write_text(json.dumps(dict(tiny["params_dict"], seed=3)))  # another classifier
    assert bp.main(["--data-dir", str(tiny["data"]), "--model-params", str(other), "--device", "cpu",
                    "--output-dir", str(b), "--method", "attn_last_layer"]) == 0
    assert json.loads((a / "rollout" / bp.RUN_FILE).read_text())["split"] == "test"
    assert metrics.main(["--data-dir", str(tiny["data"]), "--results-dir", str(a)]) == 0
    shutil.copytree(b / "attn_last_layer", a / "attn_last_layer")  # stale folder of another run
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        metrics.main(["--data-dir", str(tiny["data"]), "--results-dir", str(a)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "come from different runs (differ in: classifier_sha256)" in err
    with pytest.raises(SystemExit) as e:
        metrics.main(["--data-dir", str(tiny["data"]), "--results-dir", str(b), "--split", "val"])
    assert e.value.code == 2 and "scored as 'val'" in capsys.readouterr().err
