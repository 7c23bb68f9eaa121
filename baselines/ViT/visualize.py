"""Explain one image with a ViT/DeiT (or any supported image model) and write the heatmap overlay as PNG.

    python baselines/ViT/visualize.py --image samples/china.jpg \
        --method transformer_attribution --model vit_base_patch16_224 \
        --weights vit_base_patch16_224.safetensors --out outputs/china.png

``--all-methods`` writes a grid with every method the model supports, side
by side.  ``--model`` is one of our LRP copies (every method), or any timm
model name or local Hugging Face image-classification directory, explained
unmodified with the methods that need only attention and gradients
(generic_attribution, rollout, attn_last_layer, attn_gradcam); the one
engine is :func:`modules.explain.explain`.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from baselines.ViT.ViT_LRP import MODEL_FACTORIES, CheckpointError, load_model
from baselines.ViT.visualization import overlay, save_grid
from modules.aggregation import minmax_normalize
from modules.cli import CLIError, add_device_arg, check_output_file, open_image, resolve_device, run_main
from modules.explain import explain, supported_methods, upsample
from modules.adapters import adapter_for
from modules.methods import EVAL_START_LAYER, METHOD_CHOICES, METHOD_NAMES, METHODS, resolve_method

InputError = CLIError  # the name this script used before the shared plumbing


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
    from PIL import Image

    resample = {"nearest": Image.NEAREST, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}.get(
        interpolation, Image.BILINEAR)
    h, w = int(size[0]), int(size[1])
    img = open_image(path)  # one-line errors: missing, unreadable, decompression bomb
    rh, rw = int(round(h / crop_pct)), int(round(w / crop_pct))
    img = img.resize((rw, rh), resample)
    top, left = (rh - h) // 2, (rw - w) // 2
    img = img.crop((left, top, left + w, top + h))
    return np.asarray(img, dtype=np.float32) / 255.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--method", default=None, choices=METHOD_CHOICES,
                   help="explanation method; default: transformer_attribution for our copies, "
                        "generic_attribution for unmodified models")
    p.add_argument("--all-methods", action="store_true",
                   help="also write a grid with every method the model supports")
    p.add_argument("--class-index", type=int, default=None, help="class to explain; None: the prediction")
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="our LRP copies: " + ", ".join(sorted(MODEL_FACTORIES)) + " (every method; ignored when "
                        "--weights is a model directory with config.json); or any timm model name or local Hugging "
                        "Face image-classification directory, explained unmodified (attention methods)")
    p.add_argument("--weights", default=None,
                   help="checkpoint (.safetensors/.pth/.pt) or model directory; without it the model is random")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first block of the rollout; None: 1 for transformer_attribution and rollout, else 0")
    p.add_argument("--out", default=None,
                   help="output PNG (.png is added when missing); None: outputs/visualize/<image>_<method>.png")
    add_device_arg(p)
    return p


def _is_our_model(args: argparse.Namespace) -> bool:
    if args.weights is not None and os.path.isfile(os.path.join(args.weights, "config.json")):
        return True  # a model directory written by save_model_dir
    return args.model in MODEL_FACTORIES


def _load(args: argparse.Namespace):
    """(model, preprocessing, class names, description, random)."""
    if _is_our_model(args):
        try:
            model = load_model(args.model, args.weights)
        except (CheckpointError, ValueError) as exc:
            raise CLIError(str(exc)) from None
        cfg = model.default_cfg
        prep = dict(size=tuple(cfg["input_size"][1:]), mean=cfg["mean"], std=cfg["std"])
        names = cfg.get("class_names") or class_names(model.num_classes)
        return model, prep, names, args.weights is None
    from modules.generic import GenericModelError, load_generic_model

    try:
        loaded = load_generic_model(args.model, args.weights)
    except GenericModelError as exc:
        raise CLIError(str(exc)) from None
    if loaded.modality != "image":
        raise CLIError(f"{args.model}: a {loaded.modality} model; this script explains image classifiers")
    print(loaded.description, file=sys.stderr)
    prep = dict(size=tuple(loaded.input_size[1:]), mean=loaded.mean, std=loaded.std,
                crop_pct=loaded.crop_pct, interpolation=loaded.interpolation)
    labels = loaded.labels
    names = [labels.get(i, f"class {i}") for i in range(max(labels) + 1)] if labels else None
    return loaded.model, prep, names, "random" in loaded.description


def _output_path(args: argparse.Namespace, method: str) -> str:
    stem = os.path.splitext(os.path.basename(args.image))[0]
    out = args.out or os.path.join("outputs", "visualize", f"{stem}_{method}.png")
    if os.path.isdir(out):  # never a file named after a folder, beside it
        raise CLIError(f"--out {out}: is a directory, expected a .png file name")
    return out if out.lower().endswith(".png") else out + ".png"


def run(args: argparse.Namespace) -> List[str]:
    if args.weights is not None and not os.path.exists(args.weights):
        raise CLIError(f"weights not found: {args.weights}")
    device = resolve_device(args.device)
    model, prep, names, random = _load(args)
    supported = supported_methods(model)
    method = resolve_method(args.method).name if args.method else (
        "transformer_attribution" if "transformer_attribution" in supported else "generic_attribution")
    if method not in supported:
        raise CLIError(f"{type(model).__name__} does not support --method {method} (it needs an LRP pass this "
                       f"model does not offer); it supports: {', '.join(supported)}")
    out = check_output_file(_output_path(args, method), flag="--out")
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
    if not bool(torch.isfinite(logits).all()):
        raise CLIError("the model's logits are not finite (NaN or Inf weights?); no picture written")
    num_classes = logits.shape[-1]
    if args.class_index is not None and not 0 <= args.class_index < num_classes:
        raise CLIError(f"--class-index {args.class_index} out of range: the model has {num_classes} "
                       f"classes (0..{num_classes - 1})")
    target = int(logits.argmax(-1)) if args.class_index is None else args.class_index
    label = names[target] if names and target < len(names) else f"class {target}"
    prob = float(torch.softmax(logits, -1)[0, target])

    depth = min(adapter_for(model).depths().values())
    if args.start_layer is not None and not 0 <= args.start_layer < depth:
        raise CLIError(f"--start-layer {args.start_layer} outside the model's blocks 0..{depth - 1}")

    def heat(name: str) -> np.ndarray:
        if args.start_layer is not None:
            start = args.start_layer
        else:  # the evaluation scripts' default, for models of at least two blocks
            start = min(EVAL_START_LAYER.get(name, 0), depth - 1)
        cam = explain(model, x, name, index=target, start_layer=start)
        if not bool(torch.isfinite(cam).all()):
            raise CLIError(f"the {name} map is not finite; no picture written")
        if cam.shape[-2:] != x.shape[-2:]:
            cam = upsample(cam, x.shape[-2:])
        return minmax_normalize(cam)[0].cpu().numpy()

    def picture(name: str) -> np.ndarray:
        # full LRP's pixel maps have a few extreme values: clip them for the eye
        return overlay(image, heat(name), clip_percentile=99.5 if METHODS[name].to_input else None)

    title = f"{label} (p={prob:.2f}) - {os.path.basename(args.image)}"
    written = [save_grid(out, [[("image", (image * 255).astype(np.uint8)),
                                (METHODS[method].label, picture(method))]], title=title)]
    if args.all_methods:
        cells = [("image", (image * 255).astype(np.uint8))]
        cells += [(METHODS[m].label, picture(m)) for m in METHOD_NAMES if m in supported]
        skipped = [m for m in METHOD_NAMES if m not in supported]
        if skipped:
            print(f"note: {type(model).__name__} does not support {', '.join(skipped)} (LRP copies only)",
                  file=sys.stderr)
        grid_path = os.path.splitext(out)[0] + "_all_methods.png"
        written.append(save_grid(grid_path, [cells[:4], cells[4:]] if len(cells) > 4 else [cells], title=title))
    return written


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        written = run(args)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
