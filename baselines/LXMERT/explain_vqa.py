"""Explain one VQA answer of a local LXMERT, VisualBERT or ViLT model: the
image map drawn on the picture (boxes or patches) and the question's words
coloured, as a PNG, plus an HTML text heatmap.

    python baselines/LXMERT/explain_vqa.py --model-dir DIR --image IMG.jpg \\
        --question "what is on the table?" --features feats.npz --out OUT.png \\
        [--method generic_attribution] [--use-lrp] [--index ANSWER] [--html OUT.html] [--device cpu]

``--model-dir`` is a folder ``save_pretrained`` wrote (config.json, the
weights, and the tokenizer files) of ``LxmertForQuestionAnswering``,
``VisualBertForQuestionAnswering`` or ``ViltForQuestionAnswering``; nothing is
downloaded.  The explanation is :func:`modules.explain.explain` (ICCV 2021:
METHODS_ICCV.md sections 2 and 3).  The LRP rows (``transformer_attribution``,
``lrp_last_layer``, and ``--use-lrp`` with ``generic_attribution``: "ours with
LRP") run through the LRP scope on all three models (ViLT: ours).

Region inputs (LXMERT, VisualBERT; these models read detector features, not
pixels, and no detector is bundled), one of:

* ``--features feats.npz``: arrays ``features`` (K, D) float - LXMERT's
  ``visual_feats`` (D = ``visual_feat_dim``, 2048 for the released model) or
  VisualBERT's ``visual_embeds`` (D = ``visual_embedding_dim``) - and
  ``boxes`` (K, 4) as (x1, y1, x2, y2) in pixels of ``--image``; optional
  scalar ``normalized`` = 1 when the boxes are already in [0, 1].
* ``--boxes boxes.json``: the same as JSON,
  ``{"boxes": [[x1, y1, x2, y2], ...], "features": [[...], ...], "normalized": false}``.

LXMERT's ``visual_pos`` is the boxes divided by the image (width, height,
width, height): (x1, y1, x2, y2) in [0, 1].  VisualBERT uses the features
only (the boxes are drawn).  ViLT takes pixels: ``--image`` is resized with
the folder's image processor (``preprocessor_config.json``) when present,
else to ``image_size`` x ``image_size``, normalised with mean = std = 0.5;
``--boxes``/``--features`` are refused for it.

Exit status 2 with a one-line message on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from modules.checkpoints import load_pretrained, load_pretrained_part  # noqa: E402
from modules.cli import CLIError, add_device_arg, check_array, check_output_file, open_image, resolve_device, run_main
from modules.methods import ALIASES, ATTENTION_METHODS, resolve_method

__all__ = ["build_parser", "main", "load_regions", "model_type", "load_vqa_model", "explain_vqa"]

MODEL_CLASSES = {"lxmert": "LxmertForQuestionAnswering", "visual_bert": "VisualBertForQuestionAnswering",
                 "vilt": "ViltForQuestionAnswering"}
_OFFERED = ATTENTION_METHODS + ("transformer_attribution", "lrp_last_layer")  # the LRP ones: the LRP scope
METHOD_CHOICES = _OFFERED + tuple(a for a, t in ALIASES.items() if t in _OFFERED)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True, help="local folder of an LXMERT / VisualBERT / ViLT VQA model")
    p.add_argument("--image", required=True, help="the picture (any format Pillow reads)")
    p.add_argument("--question", required=True, help="the question")
    regions = p.add_mutually_exclusive_group()
    regions.add_argument("--boxes", default=None, help="boxes.json: boxes (pixels) and features (LXMERT/VisualBERT)")
    regions.add_argument("--features", default=None, help="feats.npz: features (K, D), boxes (K, 4) in pixels")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--html", default=None, help="output HTML text heatmap (default: --out with .html)")
    p.add_argument("--method", default="generic_attribution", choices=METHOD_CHOICES, help="explanation method")
    p.add_argument("--use-lrp", action="store_true",
                   help="generic_attribution: 'ours with LRP' (A replaced by its LRP relevance, METHODS_ICCV.md)")
    p.add_argument("--index", type=int, default=None, help="answer index to explain (default: the predicted one)")
    add_device_arg(p, default="cpu")
    return p


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
def load_regions(path: str, kind: str, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """(features (K, D) float32, boxes (K, 4) in [0, 1] as (x1, y1, x2, y2))
    from ``--features`` (npz, ``kind="npz"``) or ``--boxes`` (json)."""
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("features", "boxes") if k not in data.files]
                if missing:
                    raise CLIError(f"{path}: no array {', '.join(missing)} (has {', '.join(data.files) or 'none'})")
                # the arrays' dtypes checked as stored (an integer or bool array is not features)
                feats = check_array(data["features"], "features", path, finite=False)
                boxes = check_array(data["boxes"], "boxes", path, finite=False)
                normalized = data["normalized"] if "normalized" in data.files else False
                if "normalized" in data.files and (normalized.shape != () or normalized.dtype.kind != "b"):
                    raise CLIError(f"{path}: normalized must be one boolean, got {normalized.dtype} shape {normalized.shape}")
                normalized = bool(normalized)
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict) or "features" not in data or "boxes" not in data:
                raise CLIError(f"{path}: expected a JSON object with 'boxes' and 'features'")
            feats, boxes = data["features"], data["boxes"]
            normalized = data.get("normalized", False)
            if not isinstance(normalized, bool):
                raise CLIError(f"{path}: normalized must be true or false, got {normalized!r}")
        feats = np.asarray(feats, dtype=np.float32)
        boxes = np.asarray(boxes, dtype=np.float32)
    except CLIError:
        raise
    except FileNotFoundError:
        raise CLIError(f"{path}: file not found") from None
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path}: cannot read the regions ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise CLIError(f"{path}: features must be (K, D) with K >= 1, got shape {feats.shape}")
    if boxes.shape != (feats.shape[0], 4):
        raise CLIError(f"{path}: boxes must be ({feats.shape[0]}, 4) (x1, y1, x2, y2), got shape {boxes.shape}")
    check_array(feats, "features", path)
    check_array(boxes, "boxes", path)
    if not normalized:
        boxes = boxes / np.array([width, height, width, height], dtype=np.float32)
    if (boxes < -1e-6).any() or (boxes > 1 + 1e-6).any():
        raise CLIError(f"{path}: boxes lie outside the image ({width}x{height} pixels)")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise CLIError(f"{path}: boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")
    return feats, np.clip(boxes, 0.0, 1.0)


def model_type(model_dir: str) -> str:
    """The folder's ``model_type`` (one of :data:`MODEL_CLASSES`), read from
    its config.json before any weights are loaded."""
    from modules.checkpoints import hf_model_config

    # the folder, its config and weights checked, the config read before any weights
    return hf_model_config(model_dir, "--model-dir", tuple(MODEL_CLASSES), "a VQA model of LXMERT, VisualBERT, ViLT"
                           ).model_type


def load_vqa_model(model_dir: str, device: torch.device):
    """(model, tokenizer, model_type) from a local folder (no download)."""
    import transformers as tf

    kind = model_type(model_dir)
    bars_were_on = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()  # no "Loading weights" bar on stderr
    try:  # the one loader (modules.checkpoints): safe file kinds, one-line errors, finite weights
        model = load_pretrained(getattr(tf, MODEL_CLASSES[kind]), model_dir)
        tokenizer = load_pretrained_part(tf.AutoTokenizer, model_dir, "tokenizer")
    finally:
        if bars_were_on:
            tf.utils.logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer, kind


def vilt_pixels(model_dir: str, model, image) -> Dict[str, torch.Tensor]:
    """ViLT's pixel_values and pixel_mask: the folder's image processor when
    it has one, else a square resize to ``image_size`` (mean = std = 0.5)."""
    if os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
        import transformers as tf

        try:
            proc = tf.ViltImageProcessor.from_pretrained(model_dir, local_files_only=True)
            out = proc(image, return_tensors="pt")
        except (OSError, ValueError, KeyError) as exc:
            raise CLIError(f"--model-dir {model_dir}: cannot use preprocessor_config.json ({exc})") from None
        return {"pixel_values": out["pixel_values"], "pixel_mask": out["pixel_mask"]}
    size = int(model.config.image_size)
    arr = np.asarray(image.resize((size, size)), dtype=np.float32) / 255.0
    x = torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1)[None]
    return {"pixel_values": x, "pixel_mask": torch.ones(1, size, size, dtype=torch.long)}


# --------------------------------------------------------------------------
# The explanation
# --------------------------------------------------------------------------
def explain_vqa(model, tokenizer, kind: str, question: str, image, regions: Optional[Tuple[np.ndarray, np.ndarray]],
                method: str, index: Optional[int], model_dir: str = "", use_lrp: bool = False) -> Dict[str, Any]:
    """Inputs for ``kind``, :func:`modules.explain.explain_trace`; the maps
    of the one sample (text (T,), image (boxes,) or (gh, gw)), the answer."""
    from modules.explain import explain_trace

    device = next(model.parameters()).device
    enc = tokenizer(question, return_tensors="pt")
    inputs: Dict[str, Any] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        inputs["token_type_ids"] = enc["token_type_ids"]
    if kind in ("lxmert", "visual_bert"):
        feats, boxes = regions
        want = model.config.visual_feat_dim if kind == "lxmert" else model.config.visual_embedding_dim
        if feats.shape[1] != want:
            raise CLIError(f"the regions have {feats.shape[1]} features each; this {kind} model expects {want}")
        f = torch.from_numpy(feats)[None]
        if kind == "lxmert":
            inputs.update(visual_feats=f, visual_pos=torch.from_numpy(boxes)[None])
        else:
            inputs.update(visual_embeds=f)
    else:
        inputs.update(vilt_pixels(model_dir, model, image))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    n_labels = int(getattr(model.config, "num_qa_labels", 0) or model.config.num_labels)
    if index is not None and not 0 <= index < n_labels:
        raise CLIError(f"--index {index} outside 0..{n_labels - 1} (the model has {n_labels} answers)")
    exp = explain_trace(model, inputs, method, index=index, **({"use_lrp": True} if use_lrp else {}))
    answer = int(exp.target[0])
    labels = getattr(model.config, "id2label", None) or {}
    return {"text": exp.maps.text[0], "image": exp.maps.image[0], "answer": answer,
            "label": str(labels.get(answer, answer)), "score": float(exp.score[0])}


def main_body(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from modules import pictures

    if not args.question.strip():
        raise CLIError("--question is empty")
    method = resolve_method(args.method).name
    if args.use_lrp and method != "generic_attribution":
        raise CLIError(f"--use-lrp applies to generic_attribution, not {args.method}")
    device = resolve_device(args.device)
    out = check_output_file(args.out, "--out")
    html_path = args.html or os.path.splitext(out)[0] + ".html"
    check_output_file(html_path, "--html")
    image = open_image(args.image)
    W, H = image.size
    kind = model_type(args.model_dir)
    regions = None
    if kind == "vilt":
        if args.boxes or args.features:
            raise CLIError("ViLT reads the pixels of --image: drop --boxes/--features")
    else:
        if not (args.boxes or args.features):
            raise CLIError(f"{MODEL_CLASSES[kind]} reads region features: give --features feats.npz or "
                           "--boxes boxes.json")
        regions = load_regions(args.features or args.boxes, "npz" if args.features else "json", W, H)
    model, tokenizer, kind = load_vqa_model(args.model_dir, device)
    got = explain_vqa(model, tokenizer, kind, args.question, image, regions, method, args.index, args.model_dir,
                      use_lrp=args.use_lrp)
    if not (torch.isfinite(got["text"]).all() and torch.isfinite(got["image"]).all()):
        raise CLIError("the explanation is not finite (NaN/Inf): check the model weights and inputs")
    if getattr(tokenizer, "is_fast", False):
        words, scores = pictures.question_words(tokenizer, args.question, got["text"])
    else:  # slow tokenizer: wordpieces
        ids = tokenizer(args.question)["input_ids"]
        words = tokenizer.convert_ids_to_tokens(ids)
        scores = [float(v) for v in got["text"].tolist()]
    rgb = np.asarray(image, dtype=np.uint8)
    if regions is not None:
        panel = ("box relevance", pictures.box_map(rgb, regions[1], got["image"], normalized=True))
    else:
        panel = ("patch relevance", pictures.stream_overlays(rgb, {"image": got["image"]})[0][1])
    title = f"Q: {args.question}  A: {got['label']} ({method}{' with LRP' if args.use_lrp else ''})"
    pictures.save_figure(out, [("image", rgb), panel], words, scores, title=title)
    pictures.save_text_html(html_path, words, scores, title=title)
    print(f"answer {got['label']} (logit {got['score']:.4g}); wrote {out} and {html_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(main_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
