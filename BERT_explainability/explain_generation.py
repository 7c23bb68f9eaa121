"""Greedy-generate from a text and colour the source sentence for each generated word (HTML).

Example (a local Hugging Face directory: config.json, weights, a fast tokenizer)::

    python BERT_explainability/explain_generation.py --model-dir DIR \\
        --text "the quick brown fox" --max-new-tokens 8 --out out.html

Text encoder-decoders (BART, T5) colour their encoder input; decoder-only
language models (GPT-2, Llama, Qwen2) their prompt.  For each generated token
the map is the relevance of the source tokens for that token's logit at the
position that produced it (../shared/METHODS.md section 8, the project's own
extension of METHODS_ICCV.md section 4), from :func:`modules.generation.explain_generation`
(one forward over the generated sequence, one gradient per generated token).
Wordpiece relevance is mapped to words as the maximum over a word's pieces
(special tokens skipped), rendered with ``text_heatmap.render_html``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):
    # run as ``python BERT_explainability/explain_generation.py``: Python puts this file's folder first on
    # sys.path, where BERT_explainability/modules would shadow the top-level ``modules`` package.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

from modules.cli import CLIError, add_device_arg, int_range, run_main  # noqa: E402

METHODS = ("generic_attribution", "rollout", "attn_last_layer", "attn_gradcam")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Greedy generation from a text, with the source sentence coloured by its relevance for each "
                    "generated word (HTML).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", required=True, default=argparse.SUPPRESS,
                        help="local Hugging Face directory (config.json, weights, a fast tokenizer) of a "
                             "BART/T5 encoder-decoder or a GPT-2/Llama/Qwen2 causal language model")
    parser.add_argument("--text", required=True, default=argparse.SUPPRESS,
                        help="the source sentence (encoder input, or the prompt of a decoder-only model)")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output HTML file")
    parser.add_argument("--max-new-tokens", type=int_range(1, 1024), default=10,
                        help="generate at most this many tokens (greedy)")
    parser.add_argument("--method", choices=METHODS, default="generic_attribution",
                        help="explanation method (METHODS_ICCV.md sections 1, 4; METHODS.md section 8)")
    add_device_arg(parser)
    return parser


def _load(model_dir: str, device):
    """(model, tokenizer) of a local directory; CLIError with one line otherwise."""
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return _load_quietly(model_dir, device)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _load_quietly(model_dir: str, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from modules.checkpoints import check_model_dir, load_pretrained, load_pretrained_part

    check_model_dir(model_dir)
    config = load_pretrained_part(AutoConfig, model_dir, "config (config.json)")
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = load_pretrained(auto, model_dir)  # the one loader: one-line errors, finite weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CLIError(f"cannot load a tokenizer from {model_dir}: {str(exc).splitlines()[0] if str(exc) else exc}")
    if not getattr(tokenizer, "is_fast", False):
        raise CLIError(f"{model_dir}: a fast tokenizer (tokenizer.json) is needed for word alignment")
    return model.to(device).eval(), tokenizer


def _run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.text.strip():
        raise CLIError("--text is empty")
    from modules.checkpoints import check_model_dir
    from modules.cli import atomic_write_text, check_output_file, resolve_device

    check_model_dir(args.model_dir, "--model-dir")  # the folder, its config and weights

    device = resolve_device(args.device)
    check_output_file(args.out, flag="--out")

    import torch

    from BERT_explainability.text_heatmap import encoding_words, word_scores
    from modules.adapters import InputsError, adapter_for
    from modules.adapters.generation import CausalLMAdapter, Seq2SeqAdapter
    from modules.attention_capture import UnsupportedModelError
    from modules.generation import explain_generation, generation_html

    from modules.cli import register_input_error

    register_input_error(InputsError)
    model, tokenizer = _load(args.model_dir, device)
    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        adapter = None
    if not isinstance(adapter, (Seq2SeqAdapter, CausalLMAdapter)) or getattr(adapter, "image", False):
        raise CLIError(f"{type(model).__name__} is not a supported text generation model (supported: "
                       + ", ".join(c for c in Seq2SeqAdapter.examples + CausalLMAdapter.examples
                                   if c != "VisionEncoderDecoderModel") + ")")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    enc = tokenizer(args.text, return_tensors="pt", truncation=bool(limit), max_length=limit)
    if enc["input_ids"].shape[1] == 0:
        raise CLIError("the text holds no token the tokenizer keeps")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and int(enc["input_ids"].max()) >= vocab:
        raise CLIError(f"the tokenizer of {args.model_dir} produces ids beyond the model's vocabulary ({vocab})")
    words = encoding_words(args.text, enc)
    if not words:
        raise CLIError("the text holds no word the tokenizer keeps")
    inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
    out = explain_generation(model, inputs, max_new_tokens=args.max_new_tokens, method=args.method)
    if not bool(torch.isfinite(out.source).all()):
        raise CLIError(f"the {args.method} relevance is not finite (NaN or Inf weights?); no heatmap written")
    kept = int(out.generated[0].sum())
    ids = out.tokens[0, :kept].tolist()
    generated = [tokenizer.decode([i]).strip() or tokenizer.convert_ids_to_tokens(i) or f"[{i}]" for i in ids]
    word_ids = enc.word_ids(0)
    rows = [word_scores(out.source[0, k].cpu(), word_ids) for k in range(kept)]
    title = f"{args.method}: {type(model).__name__}, {kept} generated token(s)"
    atomic_write_text(args.out, generation_html(words, rows, generated, title=title))
    print(f"generated: {tokenizer.decode(ids)!r}")
    print(f"wrote {args.out} ({kept} generated tokens, {len(words)} source words, method {args.method})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; exit status 0, or 2 with one line on bad input."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
