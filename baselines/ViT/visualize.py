"""Explain one image with a ViT/DeiT and write the heatmap overlay as PNG.

    python baselines/ViT/visualize.py --image samples/catdog.png \
        --method transformer_attribution --model vit_base_patch16_224 \
        --weights vit_base_patch16_224.safetensors --out outputs/catdog.png

``--all-methods`` writes a grid with every method side by side.
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

EVAL_START_LAYER = {"transformer_attribution": 1, "rollout": 1}  # as the evaluation scripts


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


def read_image(path: str, size: Sequence[int]) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1], resized (no crop) to ``size`` = (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
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
    p.add_argument("--class-index", type=int, default=None, help="class to explain (default: the prediction)")
    p.add_argument("--model", default="vit_base_patch16_224", choices=sorted(MODEL_FACTORIES),
                   help="architecture (ignored when --weights is a model directory with config.json)")
    p.add_argument("--weights", default=None,
                   help="checkpoint (.safetensors/.pth/.pt) or model directory; without it the model is random")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first block of the rollout (default: 1 for transformer_attribution and rollout, else 0)")
    p.add_argument("--out", default=None, help="output PNG (default: outputs/visualize/<image>_<method>.png)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p


def run(args: argparse.Namespace) -> List[str]:
    if args.weights is not None and not os.path.exists(args.weights):
        raise InputError(f"weights not found: {args.weights}")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device {args.device!r} is not usable: {exc}") from None
    try:
        model = load_model(args.model, args.weights)
    except (CheckpointError, ValueError) as exc:
        raise InputError(str(exc)) from None
    if args.weights is None:
        print(f"warning: no --weights given: {args.model} is randomly initialised, its maps mean nothing",
              file=sys.stderr)
    model = model.to(device).eval()
    cfg = model.default_cfg
    size = tuple(cfg["input_size"][1:])
    if args.class_index is not None and not 0 <= args.class_index < model.num_classes:
        raise InputError(f"--class-index {args.class_index} out of range: the model has {model.num_classes} "
                         f"classes (0..{model.num_classes - 1})")
    image = read_image(args.image, size)
    mean, std = np.asarray(cfg["mean"], np.float32), np.asarray(cfg["std"], np.float32)
    x = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1).copy())[None].to(device)

    with torch.no_grad():
        logits = model(x)
    target = int(logits.argmax(-1)) if args.class_index is None else args.class_index
    names = class_names(model.num_classes)
    label = names[target] if names else f"class {target}"
    prob = float(torch.softmax(logits, -1)[0, target])

    def heat(method: str) -> np.ndarray:
        start = args.start_layer if args.start_layer is not None else EVAL_START_LAYER.get(method, 0)
        start = min(start, len(model.blocks) - 1)
        cam = explain(model, x, method, index=target, start_layer=start)
        if cam.shape[-2:] != x.shape[-2:]:
            cam = upsample(cam, x.shape[-2:])
        return normalize(cam)[0].cpu().numpy()

    method = resolve_method(args.method).name
    stem = os.path.splitext(os.path.basename(args.image))[0]
    out = args.out or os.path.join("outputs", "visualize", f"{stem}_{method}.png")
    title = f"{label} (p={prob:.2f}) - {os.path.basename(args.image)}"
    written = [save_grid(out, [[("image", (image * 255).astype(np.uint8)),
                                (METHODS[method].label, overlay(image, heat(method)))]], title=title)]
    if args.all_methods:
        cells = [("image", (image * 255).astype(np.uint8))]
        cells += [(METHODS[m].label, overlay(image, heat(m))) for m in METHOD_NAMES]
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
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
