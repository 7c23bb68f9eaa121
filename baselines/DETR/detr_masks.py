"""Explain every detection of a DETR model and draw boxes, labels and masks.

    python baselines/DETR/detr_masks.py --model-dir models/detr-resnet-50 \
        --image samples/street.jpg --out outputs/street_masks.png

Loads a local Hugging Face ``DetrForObjectDetection`` or
``ConditionalDetrForObjectDetection`` directory (never downloads; its image
processor when the directory has one, else DETR's evaluation transform:
shorter side 800, longer at most 1333, ImageNet mean/std), keeps the queries
whose probability exceeds ``--threshold``, explains each with ``--method``
(METHODS_ICCV.md section 4) and turns each explanation into a mask exactly as
the published code does (section 7: min-max, x255, uint8, Otsu, bilinear
upsampling, value > 0, resize to the image).  Writes the picture (one PNG per
image: ``OUT`` for one image, ``OUT_STEM-<i>.png`` for several) and a JSON
file of the detections beside it (``OUT`` with ``.json``).  Bad input: one
line, exit 2.

Its outputs are a run folder's (issue 27): one run at a time per ``OUT``
(a lock file ``.<OUT stem>.json.lock`` beside it), the JSON records the
run's identity (content hashes of the model folder and the images, and the
flags that change the pictures), finished pictures are never replaced
without ``--overwrite``, and ``--resume`` continues a killed run after its
last whole batch (checked against that identity; the result is the same
as an uninterrupted run's).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modules.cli import (CLIError, add_device_arg, atomic_write_bytes, atomic_write_json, check_finite,  # noqa: E402
                         check_output_file, file_lock, files_sha256, one_line, open_image, positive_int, probability,
                         resolve_device, run_main)
from modules.methods import ALIASES, ATTENTION_METHODS, COUPLED_LRP_METHODS, resolve_method  # noqa: E402

COLORS = [(0, 114, 189), (217, 83, 25), (237, 177, 32), (126, 47, 142), (119, 172, 48), (77, 190, 238)]
"""The published visualisation colours (DETR/mask_generator.py), 0-255."""

DETR_TYPES = {"detr": "DetrForObjectDetection", "conditional_detr": "ConditionalDetrForObjectDetection"}


def build_parser() -> argparse.ArgumentParser:
    from modules.detection import STRATEGIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True, help="local Hugging Face DETR / Conditional DETR directory")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    p.add_argument("--out", required=True, help="output PNG (several images: OUT_STEM-<i>.png); JSON beside it")
    p.add_argument("--threshold", type=probability, default=0.5,
                   help="keep queries whose probability (max over the object classes) is above this")
    offered = tuple(ATTENTION_METHODS) + COUPLED_LRP_METHODS
    methods = list(offered) + [a for a, t in ALIASES.items() if t in offered]
    p.add_argument("--method", default="generic_attribution", choices=methods,
                   help="explanation method (transformer_attribution, lrp_last_layer: the LRP scope, one "
                        "explanation per image)")
    p.add_argument("--use-lrp", action="store_true",
                   help="generic_attribution: 'ours with LRP' (A replaced by its LRP relevance, METHODS_ICCV.md)")
    p.add_argument("--published-nan-guard", action="store_true",
                   help="generic_attribution: drop a whole Eq. 10 addition that holds a NaN, as the published DETR "
                        "generator does (default: only the NaN rows of R bar are zeroed; modules/iccv.py bimodal_rule)")
    p.add_argument("--strategy", default="retain", choices=STRATEGIES,
                   help="how the kept queries' gradients are taken (modules/detection.py)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass")
    p.add_argument("--shortest", type=positive_int, default=800,
                   help="shorter image side (DETR transform; ignored when the directory has an image processor)")
    p.add_argument("--longest", type=positive_int, default=1333, help="longer side at most (likewise)")
    p.add_argument("--alpha", type=probability, default=0.45, help="mask opacity")
    add_device_arg(p)
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run with the same model, images and flags after its last whole batch")
    p.add_argument("--overwrite", action="store_true", help="replace the pictures and JSON of an earlier run")
    return p


def output_paths(out: str, n: int) -> Tuple[List[str], str]:
    """The PNG per image and the JSON file."""
    stem, _ = os.path.splitext(out)
    pngs = [out] if n == 1 else [f"{stem}-{i}.png" for i in range(n)]
    return pngs, stem + ".json"


def load_detr(model_dir: str, device: torch.device):
    """(model, image processor or None) of a local directory; :class:`CLIError` otherwise."""
    from modules.checkpoints import hf_model_config, load_pretrained
    import transformers as tf

    # the folder, its config and weights checked, the config read before any weights
    config = hf_model_config(model_dir, "--model-dir", tuple(DETR_TYPES), "DETR")
    model_type = config.model_type
    config.use_pretrained_backbone = False  # the directory's weights hold the backbone: never fetch others
    sub = getattr(config, "backbone_config", None)
    if sub is not None and hasattr(sub, "use_pretrained_backbone"):
        sub.use_pretrained_backbone = False
    cls = getattr(tf, DETR_TYPES[model_type])
    model = load_pretrained(cls, model_dir, config=config)  # the one loader: one-line errors, finite weights
    processor = None
    if os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
        try:
            processor = tf.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise CLIError(f"--model-dir {model_dir}: unreadable image processor ({one_line(exc)})") from None
    return model.to(device).eval(), processor


def draw(image, det, masks: torch.Tensor, names: Dict[int, str], alpha: float):
    """The image with each detection's mask (coloured, ``alpha``), box and label."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = np.asarray(image.convert("RGB"), dtype=np.float32)
    for k in range(masks.shape[0]):
        color = np.asarray(COLORS[k % len(COLORS)], dtype=np.float32)
        m = masks[k].numpy()
        canvas[m] = (1 - alpha) * canvas[m] + alpha * color
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width = max(1, round(min(out.size) / 200))
    for k in range(masks.shape[0]):
        color = COLORS[k % len(COLORS)]
        x0, y0, x1, y1 = det.boxes_xyxy[k].tolist()
        pen.rectangle([x0, y0, x1, y1], outline=color, width=width)
        label = int(det.labels[k])
        text = f"{names.get(label, str(label))} {float(det.scores[k]):.2f}"
        pen.text((x0 + width + 1, y0 + width + 1), text, fill=color, font=font)
    return out


def run_identity(args: argparse.Namespace, strategy: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """What the pictures and the JSON depend on: the model folder's and the
    images' content, and the flags that change them (the batch size too:
    a padded batch's maps may differ from an image's alone in the last bits)."""
    from modules.checkpoints import model_dir_sha256

    return {"model_sha256": model_dir_sha256(args.model_dir), "images_sha256": files_sha256(args.image),
            "images": [os.path.abspath(p) for p in args.image], "method": resolve_method(args.method).name,
            "threshold": args.threshold, "strategy": strategy, "options": dict(options), "alpha": args.alpha,
            "shortest": args.shortest, "longest": args.longest, "batch_size": args.batch_size}


def previous_records(args: argparse.Namespace, identity: Dict[str, Any], pngs: List[str],
                     json_path: str) -> List[Dict[str, Any]]:
    """The records of an earlier run into the same ``--out`` to keep: none
    when there is none or ``--overwrite``; with ``--resume``, its whole
    batches when it has this identity.  Refuses (one line) ``--resume`` over
    another run and any earlier output without ``--resume`` / ``--overwrite``."""
    present = [p for p in pngs + [json_path] if os.path.exists(p)]
    if args.overwrite or not present:
        return []
    old = None
    if os.path.isfile(json_path):
        import json

        try:
            with open(json_path, encoding="utf-8") as fh:
                old = json.load(fh)
        except (OSError, ValueError):
            old = None
    if not args.resume:
        raise CLIError(f"--out {args.out}: {', '.join(present)} exist(s) from an earlier run; pass --resume to "
                       "continue it or --overwrite to replace it")
    if not isinstance(old, dict) or old.get("identity") != identity or not isinstance(old.get("images"), list):
        raise CLIError(f"--out {args.out}: {json_path} holds another run (other model, images or flags); --resume "
                       "would mix them: use another --out, or --overwrite")
    done = len(old["images"]) // args.batch_size * args.batch_size  # whole batches: as an uninterrupted run
    return old["images"][:done]


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    pngs, json_path = output_paths(args.out, len(args.image))
    for path in pngs + [json_path]:
        check_output_file(path, flag="--out")
    options = {}
    if args.published_nan_guard:
        if args.method != "generic_attribution":
            raise CLIError(f"--published-nan-guard applies to generic_attribution, not {args.method}")
        options["nan_guard"] = "published"
    strategy = args.strategy
    if args.use_lrp:
        if args.method != "generic_attribution":
            raise CLIError(f"--use-lrp applies to generic_attribution, not {args.method}")
        options["use_lrp"] = True
    if args.use_lrp or resolve_method(args.method).name in COUPLED_LRP_METHODS:
        strategy = "repeat"  # the relevance pass runs in the LRP scope, one explanation per image
    images = [open_image(path) for path in args.image]  # one-line errors before any work
    model, processor = load_detr(args.model_dir, device)
    lock = os.path.join(os.path.dirname(os.path.abspath(json_path)), f".{os.path.basename(json_path)}.lock")
    with file_lock(lock, what=f"--out {args.out}"):
        return _explain_all(args, device, images, model, processor, strategy, options, pngs, json_path)


def _explain_all(args, device, images, model, processor, strategy, options, pngs, json_path) -> int:
    identity = run_identity(args, strategy, options)
    records = previous_records(args, identity, pngs, json_path)
    if records:
        print(f"resuming after {len(records)} of {len(images)} image(s)")
    torch.set_grad_enabled(True)
    from modules.detection import detection_masks, explain_detections, preprocess

    names = {int(k): v for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    for start in range(len(records), len(images), args.batch_size):
        chunk = images[start:start + args.batch_size]
        if processor is not None:
            inputs, sizes = preprocess(chunk, processor)
        else:
            inputs, sizes = preprocess(chunk, shortest=args.shortest, longest=args.longest)
        dets = explain_detections(model, inputs, threshold=args.threshold, method=args.method, image_sizes=sizes,
                                  strategy=strategy, **options)
        for i, det in enumerate(dets):
            n = start + i
            check_finite(det.maps, f"{args.image[n]}: explanation maps")
            masks = detection_masks(det)
            buf = io.BytesIO()
            draw(images[n], det, masks, names, args.alpha).save(buf, format="PNG")
            atomic_write_bytes(pngs[n], buf.getvalue())
            print(f"{args.image[n]}: {det.queries.numel()} detection(s) -> {pngs[n]}")
            records.append({
                "image": args.image[n], "out": pngs[n], "size": list(det.image_size),
                "detections": [{
                    "query": int(det.queries[k]), "label": int(det.labels[k]),
                    "label_name": names.get(int(det.labels[k]), str(int(det.labels[k]))),
                    "score": float(det.scores[k]),
                    "box_cxcywh": [float(v) for v in det.boxes[k]],
                    "box_xyxy": [float(v) for v in det.boxes_xyxy[k]],
                    "mask_pixels": int(masks[k].sum()),
                } for k in range(det.queries.numel())],
            })
            atomic_write_json(json_path, {"identity": identity, "model_dir": args.model_dir, "method": args.method,
                                          "threshold": args.threshold, "strategy": args.strategy,
                                          "nan_guard": options.get("nan_guard", True),
                                          "images": records})
    print(f"wrote {json_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
