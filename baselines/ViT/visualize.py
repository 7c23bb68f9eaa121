"""Explain one image with a ViT/DeiT and write the heatmap overlay as PNG.

    python baselines/ViT/visualize.py --image samples/china.jpg \
        --method transformer_attribution --model vit_base_patch16_224 \
        --weights vit_base_patch16_224.safetensors --out outputs/china.png

``--all-methods`` writes a grid with every method side by side.  With
``--method generic_attribution`` the model may also be any timm model name or
a local Hugging Face image-classification directory, explained unmodified
(modules/generic.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from baselines.ViT.ViT_explanation_generator import explain, normalize, upsample
from baselines.ViT.ViT_LRP import MODEL_FACTORIES, CheckpointError, load_model
from baselines.ViT.visualization import overlay, save_grid
from modules.methods import METHOD_CHOICES, METHOD_NAMES, METHODS, resolve_method
from modules.methods import EVAL_START_LAYER



class InputError(Exception):
    """Bad input: reported in one line with exit status 2."""


def class_names(num_classes: int) -> Optional[List[str]]:
    """ImageNet-1k class names (shipped with torchvision) for 1000-class models."""
    if num_classes != 1000:
        return None
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES
    except ImportError:  # pragma: no cover - torchvision moved it
        return None
    return list(_IMAGENET_CATEGORIES)


def read_image(path: str, size: Sequence[int], crop_pct: float = 1.0, interpolation: str = "bilinear") -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] of ``size`` = (H, W): resized (no crop),
    or with ``crop_pct`` < 1 resized to size / crop_pct and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    resample = {"nearest": Image.NEAREST, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}.get(
        interpolation, Image.BILINEAR)
    h, w = int(size[0]), int(size[1])
    try:
        with Image.open(path) as img:
            rh, rw = int(round(h / crop_pct)), int(round(w / crop_pct))
            img = img.convert("RGB").resize((rw, rh), resample)
            top, left = (rh - h) // 2, (rw - w) // 2
            img = img.crop((left, top, left + w, top + h))
            return np.asarray(img, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--method", default="transformer_attribution", choices=METHOD_CHOICES,
                   help="explanation method")
    p.add_argument("--all-methods", action="store_true", help="also write a grid with every method")
    p.add_argument("--class-index", type=int, default=None, help="class to explain; None: the prediction")
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="architecture: " + ", ".join(sorted(MODEL_FACTORIES)) + " (ignored when --weights is a "
                        "model directory with config.json); with --method generic_attribution also any timm "
                        "model name or a local Hugging Face directory")
    p.add_argument("--weights", default=None,
                   help="checkpoint (.safetensors/.pth/.pt) or model directory; without it the model is random")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first block of the rollout; None: 1 for transformer_attribution and rollout, else 0")
    p.add_argument("--out", default=None, help="output PNG; None: outputs/visualize/<image>_<method>.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p


def _is_our_model(args: argparse.Namespace) -> bool:
    if args.weights is not None and os.path.isfile(os.path.join(args.weights, "config.json")):
        return True  # a model directory written by save_model_dir
    return args.model in MODEL_FACTORIES


def _load(args: argparse.Namespace):
    """(model, explain function, preprocessing, class names, description)."""
    if _is_our_model(args):
        try:
            model = load_model(args.model, args.weights)
        except (CheckpointError, ValueError) as exc:
            raise InputError(str(exc)) from None
        cfg = model.default_cfg
        prep = dict(size=tuple(cfg["input_size"][1:]), mean=cfg["mean"], std=cfg["std"])
        random = args.weights is None
        names = cfg.get("class_names") or class_names(model.num_classes)
        return model, explain, prep, names, len(model.blocks), random
    if args.all_methods or resolve_method(args.method).name != "generic_attribution":
        raise InputError(f"{args.model!r} is not one of our model copies ({', '.join(sorted(MODEL_FACTORIES))}); "
                         "other models are explained unmodified with --method generic_attribution only")
    from modules.generic import GenericModelError, explain_any, load_generic_model

    try:
        loaded = load_generic_model(args.model, args.weights)
    except GenericModelError as exc:
        raise InputError(str(exc)) from None
    if loaded.modality != "image":
        raise InputError(f"{args.model}: a {loaded.modality} model; this script explains image classifiers")
    print(loaded.description, file=sys.stderr)

    def explain_generic(model, x, method, index=None, start_layer=0):
        return explain_any(model, x, index=index, start_layer=start_layer)

    prep = dict(size=tuple(loaded.input_size[1:]), mean=loaded.mean, std=loaded.std,
                crop_pct=loaded.crop_pct, interpolation=loaded.interpolation)
    labels = loaded.labels
    names = [labels.get(i, f"class {i}") for i in range(max(labels) + 1)] if labels else None
    depth = len(getattr(loaded.model, "blocks", [])) or 10**9
    return loaded.model, explain_generic, prep, names, depth, "random" in loaded.description


def run(args: argparse.Namespace) -> List[str]:
    if args.weights is not None and not os.path.exists(args.weights):
        raise InputError(f"weights not found: {args.weights}")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device {args.device!r} is not usable: {exc}") from None
    model, explain_fn, prep, names, depth, random = _load(args)
    if random:
        print(f"warning: no --weights given: {args.model} is randomly initialised, its maps mean nothing",
              file=sys.stderr)
    model = model.to(device).eval()
    image = read_image(args.image, prep["size"], prep.get("crop_pct", 1.0), prep.get("interpolation", "bilinear"))
    mean, std = np.asarray(prep["mean"], np.float32), np.asarray(prep["std"], np.float32)
    x = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1).copy())[None].to(device)

    with torch.no_grad():
        logits = model(x)
        logits = getattr(logits, "logits", logits)
    num_classes = logits.shape[-1]
    if args.class_index is not None and not 0 <= args.class_index < num_classes:
        raise InputError(f"--class-index {args.class_index} out of range: the model has {num_classes} "
                         f"classes (0..{num_classes - 1})")
    target = int(logits.argmax(-1)) if args.class_index is None else args.class_index
    label = names[target] if names and target < len(names) else f"class {target}"
    prob = float(torch.softmax(logits, -1)[0, target])

    if args.start_layer is not None and not 0 <= args.start_layer < depth:
        raise InputError(f"--start-layer {args.start_layer} outside the model's blocks 0..{depth - 1}")

    def heat(method: str) -> np.ndarray:
        if args.start_layer is not None:
            start = args.start_layer
        else:  # the evaluation scripts' default, for models of at least two blocks
            start = min(EVAL_START_LAYER.get(method, 0), depth - 1)
        cam = explain_fn(model, x, method, index=target, start_layer=start)
        if cam.shape[-2:] != x.shape[-2:]:
            cam = upsample(cam, x.shape[-2:])
        return normalize(cam)[0].cpu().numpy()

    def picture(method: str) -> np.ndarray:
        # full LRP's pixel maps have a few extreme values: clip them for the eye
        return overlay(image, heat(method), clip_percentile=99.5 if method == "lrp" else None)

    method = resolve_method(args.method).name
    stem = os.path.splitext(os.path.basename(args.image))[0]
    out = args.out or os.path.join("outputs", "visualize", f"{stem}_{method}.png")
    title = f"{label} (p={prob:.2f}) - {os.path.basename(args.image)}"
    written = [save_grid(out, [[("image", (image * 255).astype(np.uint8)),
                                (METHODS[method].label, picture(method))]], title=title)]
    if args.all_methods:
        cells = [("image", (image * 255).astype(np.uint8))]
        cells += [(METHODS[m].label, picture(m)) for m in METHOD_NAMES]
        grid_path = os.path.splitext(out)[0] + "_all_methods.png"
        written.append(save_grid(grid_path, [cells[:4], cells[4:]], title=title))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            written = run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output cannot be written
        print(f"error: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
