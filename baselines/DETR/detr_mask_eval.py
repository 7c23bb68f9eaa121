"""Masks from explanations (METHODS_ICCV.md section 7): COCO-style mask AP of DETR's explanations.

    # offline stand-in: generated scenes with exact instance masks, the shipped detector
    python baselines/DETR/detr_mask_eval.py --model-dir samples/synthetic_scenes_detr --scenes 100 \\
        --output-dir outputs/detr_masks

    # real data: COCO val2017 and a local facebook/detr-resnet-50-style directory
    python baselines/DETR/detr_mask_eval.py --model-dir detr-resnet-50 \\
        --images val2017/ --annotations annotations/instances_val2017.json --output-dir outputs/detr_masks_coco

For every image: keep the queries whose probability (max over the object
classes) exceeds 0.5, explain each with ``--methods`` (the engine's DETR
adapter), turn each map into a mask exactly as the published code does
(min-max, x255, uint8, Otsu, bilinear upsampling, value > 0, crop, resize:
``modules.detection.masks_from_maps``), and score every query — the ones
not kept with an empty mask, as published — with pycocotools' ``segm``
evaluation at IoU thresholds 0.20:0.05:0.95 (the published code lowers them
from 0.50 by hand), reporting COCO's 12 summary numbers.  Beside them (ours):
per ground-truth object, the IoU of the best-overlapping kept mask (mIoU,
the mean over objects) and that mask's pixel accuracy over the image.

Category ids: a model label ``k`` is the annotation file's category whose
``model_index`` is ``k`` when the categories carry that key (the scenes'
files do), else category id ``k`` (DETR's COCO checkpoints use COCO ids).
Results: ``results.json``, ``table.md``, ``masks.png`` (a few images);
per-method detections are saved as they are made and a rerun resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch
from tqdm import tqdm

from data.scenes import check_scenes_memory, scene_count_arg  # noqa: E402
from modules.cli import (CLIError, add_device_arg, atomic_write_json, atomic_write_text, check_output_dir,
                         existing_dir, existing_file, file_lock, files_sha256, open_image, positive_int, probability,
                         resolve_device, resume_results, run_main)

METHODS = ("generic_attribution", "rollout", "attn_last_layer", "attn_gradcam", "transformer_attribution",
           "lrp_last_layer", "generic_with_lrp")
LABELS = {"generic_attribution": "Ours (generic attribution, ICCV 2021)", "rollout": "Rollout",
          "attn_last_layer": "Raw attention", "attn_gradcam": "GradCAM",
          "transformer_attribution": "Transformer attribution (CVPR 2021, LRP)", "lrp_last_layer": "Partial LRP",
          "generic_with_lrp": "Ours with LRP (ablation, use_lrp=True)"}
VARIANTS = {"generic_with_lrp": ("generic_attribution", {"use_lrp": True})}
"""Rows that are a method with options: (engine method, options)."""
LRP_ROWS = ("transformer_attribution", "lrp_last_layer", "generic_with_lrp")
"""Rows whose relevance pass runs in the LRP scope: one explanation per image
(``explain_detections(strategy="repeat")``), the K kept queries as a batch."""
IOU_THRESHOLDS = np.linspace(0.2, 0.95, 16)
STAT_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR_1", "AR_10", "AR_100", "AR_S", "AR_M", "AR_L")


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def coco_segm_stats(gt: dict, detections: List[dict]) -> Dict[str, float]:
    """pycocotools ``segm`` evaluation with IoU thresholds 0.20:0.95; the 12 summary numbers (percent)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        if not detections:
            return {name: 0.0 for name in STAT_NAMES}
        dt = coco.loadRes([dict(d) for d in detections])
        ev = COCOeval(coco, dt, "segm")
        ev.params.imgIds = sorted({img["id"] for img in gt["images"]})
        ev.params.iouThrs = IOU_THRESHOLDS
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: round(float(v) * 100, 3) for name, v in zip(STAT_NAMES, ev.stats)}


def object_scores(gt_masks: List[np.ndarray], pred_masks: List[np.ndarray]) -> List[dict]:
    """Per ground-truth object: IoU of the best-overlapping predicted mask and
    that mask's pixel accuracy over the image (0 and background accuracy when there is none)."""
    out = []
    for g in gt_masks:
        g = g.astype(bool)
        best, acc = 0.0, float((~g).mean())
        for p in pred_masks:
            p = p.astype(bool)
            union = np.logical_or(g, p).sum()
            iou = float(np.logical_and(g, p).sum() / union) if union else 0.0
            if iou > best:
                best, acc = iou, float((g == p).mean())
        out.append({"iou": best, "pixel_accuracy": acc})
    return out


def _category_map(gt: dict) -> Dict[int, int]:
    cats = gt.get("categories", [])
    if cats and all("model_index" in c for c in cats):
        return {int(c["model_index"]): int(c["id"]) for c in cats}
    return {}


def load_data(args) -> tuple:
    """(COCO ground-truth dict, list of (image_id, PIL image))."""
    from PIL import Image

    if args.scenes:
        from data.scenes import coco_dict, generate_scene

        scenes = [generate_scene(i, args.scene_seed, "val") for i in range(args.scenes)]
        gt = coco_dict(scenes, "val")
        pictures = [(img["id"], Image.fromarray(sc.image)) for img, sc in zip(gt["images"], scenes)]
        return gt, pictures
    try:
        with open(args.annotations) as f:
            gt = json.load(f)
        images = gt["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CLIError(f"{args.annotations}: not a COCO instances file ({exc})") from None
    if args.limit:
        images = images[:args.limit]
        keep = {img["id"] for img in images}
        gt = dict(gt, images=images, annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
    pictures = [(img["id"], os.path.join(args.images, img["file_name"])) for img in images]
    return gt, pictures


def gt_masks_of(gt: dict, image_id: int, shape) -> List[np.ndarray]:
    from pycocotools import mask as mask_utils

    out = []
    for a in gt["annotations"]:
        if a["image_id"] != image_id or a.get("iscrowd", 0):
            continue
        seg = a["segmentation"]
        if isinstance(seg, list):
            r = mask_utils.merge(mask_utils.frPyObjects(seg, shape[0], shape[1]))
        elif isinstance(seg.get("counts"), list):
            r = mask_utils.frPyObjects(seg, shape[0], shape[1])
        else:
            r = dict(seg, counts=seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"])
        out.append(mask_utils.decode(r).astype(bool))
    return out


def evaluate_method(model, processor, gt, pictures, method: str, args, device, part_path: str) -> dict:
    """Detections with masks of every image (resumable through ``part_path``), then the scores.

    Every query enters the COCO evaluation (METHODS_ICCV.md section 7, step
    4): the kept ones with their explanation's mask, the others with an
    empty mask, all with their probability and class."""
    from modules.adapters.detr import detection_probabilities, has_no_object_class
    from modules.detection import detection_masks, explain_detections, preprocess

    part = {"done": [], "detections": [], "objects": []}
    if os.path.isfile(part_path):
        with open(part_path) as f:
            part = json.load(f)
    done = set(part["done"])
    cat = _category_map(gt)
    todo = [(iid, pic) for iid, pic in pictures if iid not in done]
    for start in tqdm(range(0, len(todo), args.batch_size), desc=method):
        batch = todo[start:start + args.batch_size]
        images = [pic if not isinstance(pic, str) else open_image(pic) for _, pic in batch]
        inputs, sizes = preprocess(images, processor, shortest=args.shortest, longest=args.longest)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        name, options = VARIANTS.get(method, (method, {}))
        if method in LRP_ROWS:
            options = dict(options, strategy="repeat")
        dets = explain_detections(model, inputs, threshold=args.threshold, method=name, image_sizes=sizes, **options)
        with torch.no_grad():
            probs = detection_probabilities(model(**inputs).logits, has_no_object_class(model))
        scores, labels = probs.max(-1)
        for b, ((iid, _), det) in enumerate(zip(batch, dets)):
            masks = detection_masks(det).numpy() if det.queries.numel() else np.zeros((0, *det.image_size), bool)
            mask_of = {int(q): masks[k] for k, q in enumerate(det.queries.tolist())}
            empty = np.zeros(det.image_size, bool)
            for q in range(scores.shape[1]):
                m = mask_of.get(q, empty)
                part["detections"].append({"image_id": iid, "category_id": cat.get(int(labels[b, q]), int(labels[b, q])),
                                           "score": float(scores[b, q]), "segmentation": rle(m)})
            part["objects"] += object_scores(gt_masks_of(gt, iid, det.image_size), list(masks))
            part["done"].append(iid)
        atomic_write_json(part_path, part)
    stats = coco_segm_stats(gt, part["detections"])
    objs = part["objects"]
    stats["mIoU"] = round(100 * float(np.mean([o["iou"] for o in objs])), 3) if objs else 0.0
    stats["pixel_accuracy"] = round(100 * float(np.mean([o["pixel_accuracy"] for o in objs])), 3) if objs else 0.0
    stats["kept_detections"] = int(sum(1 for d in part["detections"] if d["segmentation"]["counts"] != rle(
        np.zeros(tuple(d["segmentation"]["size"]), bool))["counts"]))
    stats["objects"] = len(objs)
    return stats


def write_table(out_dir: str, results: dict) -> None:
    lines = ["| method | AP (IoU .20:.95) | AP50 | AP75 | AR_100 | mIoU (ours) | pixel acc. (ours) | non-empty masks |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, s in results["methods"].items():
        lines.append(f"| {LABELS.get(m, m)} | {s['AP']:.2f} | {s['AP50']:.2f} | {s['AP75']:.2f} | {s['AR_100']:.2f} | "
                     f"{s['mIoU']:.2f} | {s['pixel_accuracy']:.2f} | {s['kept_detections']} |")
    atomic_write_text(os.path.join(out_dir, "table.md"), "\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model-dir", required=True, type=existing_dir,
                   help="local Hugging Face DetrForObjectDetection / ConditionalDetrForObjectDetection directory")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--scenes", type=scene_count_arg, default=None,
                   help="stand-in: this many generated validation scenes (refused when they would not fit in memory)")
    p.add_argument("--scene-seed", type=int, default=0)
    p.add_argument("--images", type=existing_dir, help="real data: the images folder (COCO val2017)")
    p.add_argument("--annotations", type=existing_file, help="real data: COCO instances JSON")
    p.add_argument("--limit", type=positive_int, default=None, help="real data: the first N images")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--threshold", type=probability, default=0.5, help="keep queries above this probability")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--shortest", type=positive_int, default=None,
                   help="resize the shorter side to this (default: 800 for real data, the scene size for --scenes)")
    p.add_argument("--longest", type=positive_int, default=1333, help="longer side at most this")
    add_device_arg(p, default="cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another run (other arguments, weights or data) in --output-dir; "
                        "without it a finished or partial run of the same identity is resumed / reused")
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    real = (args.images, args.annotations)
    if (args.scenes is None and None in real) or (args.scenes is not None and real != (None, None)):
        raise CLIError("give either --scenes N (the stand-in) or both --images and --annotations")
    if args.scenes:  # the pictures and their masks are kept
        check_scenes_memory(args.scenes, what="--scenes")
    device = resolve_device(args.device)
    check_output_dir(args.output_dir, flag="--output-dir")

    from baselines.DETR.detr_masks import load_detr

    model, processor = load_detr(args.model_dir, device)  # the one loader: one-line errors, finite weights
    gt, pictures = load_data(args)
    if args.shortest is None:
        args.shortest = min(pictures[0][1].size) if args.scenes else 800
    from modules.checkpoints import model_dir_sha256

    # content, not only paths: other weights or annotations under the same names are another run
    identity = hashlib.sha256(json.dumps({
        "scenes": args.scenes, "seed": args.scene_seed, "limit": args.limit, "annotations": args.annotations,
        "threshold": args.threshold, "model": os.path.abspath(args.model_dir),
        "model_sha256": model_dir_sha256(args.model_dir),
        "data_sha256": files_sha256([args.annotations]) if args.annotations else None},
        sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.output_dir, "results.json")
    with file_lock(os.path.join(args.output_dir, ".lock"), what=args.output_dir):
        results = {"identity": identity, "data": "scenes stand-in (not COCO)" if args.scenes else "COCO",
                   "iou_thresholds": [round(float(t), 2) for t in IOU_THRESHOLDS], "threshold": args.threshold,
                   "model": os.path.abspath(args.model_dir), "methods": {}}
        results = resume_results(path, identity, results, overwrite=args.overwrite)
        for method in args.methods:
            if method in results["methods"]:
                continue
            part = os.path.join(args.output_dir, f"{method}.part.json")
            results["methods"][method] = evaluate_method(model, processor, gt, pictures, method, args, device, part)
            atomic_write_json(path, results)
        write_table(args.output_dir, results)
    print(open(os.path.join(args.output_dir, "table.md")).read())
    print(f"wrote {path} and table.md in {args.output_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
