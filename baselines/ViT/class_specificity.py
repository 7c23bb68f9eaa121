"""Class-specificity benchmark: does a method's map follow the explained class?

(Ours; neither paper has it, though the CVPR paper's signature figure - a
dog and a cat, a different map for each - is its qualitative version.)

For every picture holding two objects of different classes, every method
explains each of the two classes (whatever the model predicts); each map is
brought to the input's resolution (bilinear) and scored against the two
objects' regions (:mod:`baselines.ViT.class_specificity_metrics`):

* pointing game - the map's maximum lies inside the explained class's
  object (share of the picture-class pairs), and the share of pictures
  where both maps point to their own object;
* class sensitivity - the map for A puts more positive relevance on A than
  on B **and** the map for B more on B than on A (share of pictures; a
  method that ignores the class scores 0 by construction);
* own-object share - positive relevance on the explained object over that
  on both objects (mean).

Each figure is also given for the pictures whose two classes are the
model's two highest logits ("recognised").

Input: a COCO-style instances JSON and its image folder.  The offline
stand-in is written by ``data/scenes.py``::

    python data/scenes.py --out-dir outputs/demo/scenes --split val --count 200 --seed 0 \\
        --min-objects 2 --max-objects 2 --distinct-classes --separated --formats coco
    python baselines/ViT/class_specificity.py --annotations outputs/demo/scenes/annotations/instances_val.json \\
        --image-dir outputs/demo/scenes/val --weights samples/synthetic_scenes_vit --output-dir outputs/demo/class_specificity

``--model`` may also name an unmodified model - a timm name with a local
checkpoint, or a local Hugging Face image-classifier directory - explained
through the LRP scope with every method it supports (the default
``--methods``), fed at its own input size with its own mean/std from its
config.

Outputs in ``--output-dir``: ``results.json``, ``table.md``, ``plot.png``,
``overlays/`` (a map per class per method for the first pictures),
``per_image.jsonl`` (one line per picture, appended as it goes; with
``--resume`` the pictures already there are skipped) and ``run.json`` (the
run's identity, checked on resume).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch

from baselines.ViT.class_specificity_metrics import class_sensitive, own_share, pointing_hits, positive_mass
from baselines.ViT.ViT_explanation_generator import explain, upsample
from baselines.ViT.ViT_LRP import MODEL_FACTORIES, CheckpointError
from modules.cli import (CLIError, atomic_write_json, atomic_write_text, check_output_dir, file_lock, files_sha256,
                         prepare_run_folder, resolve_device)
from modules.explain import supported_methods
from modules.generic import UNMODIFIED_MODEL_HELP, model_logits, require_methods
from modules.methods import EVAL_START_LAYER, METHOD_NAMES, METHODS, UnknownMethodError, resolve_method

__all__ = ["TABLE_ORDER", "PairDataError", "Pair", "check_coco", "read_pairs", "load_pair", "explain_pair_batch",
           "summarize", "format_table", "build_parser", "main"]

TABLE_ORDER: Tuple[str, ...] = ("rollout", "attn_last_layer", "attn_gradcam", "lrp", "lrp_last_layer",
                                "generic_attribution", "transformer_attribution")

EPILOG = """\
expected input (--annotations, COCO-style instances JSON; --image-dir holds the files):
  {"images": [{"id": 1, "file_name": "dog_and_cat.jpg", "width": 640, "height": 480}, ...],
   "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [x, y, w, h],
                    "segmentation": RLE or polygons (optional: without it the box is the region)}, ...],
   "categories": [{"id": 2, "name": "tiger cat", "model_index": 282}, ...]}
  Pictures whose annotations cover exactly two categories are used (several boxes of a
  category are united); other pictures are skipped and counted.  A category's model output
  is its "model_index", else the model's class of the same name (model folders with
  class_names, Hugging Face directories with id2label), else an error.  Pictures are
  resized to the model's input size (no crop), regions with nearest-neighbour.  Real-data
  example (ImageNet pictures with two annotated classes, a local ViT-B checkpoint):
    python baselines/ViT/class_specificity.py --annotations pairs.json --image-dir pictures/ \\
        --model vit_base_patch16_224 --weights vit_base_patch16_224.pth --device cuda
  The same with timm's own model, unmodified (LRP through the scope), or a Hugging Face directory:
    ... --model timm:vit_base_patch16_224 --weights vit_base_patch16_224.pth
    ... --model ./my-hf-vit
"""


class PairDataError(ValueError):
    """An annotations file or picture that cannot be used (one-line message)."""


@dataclass
class Pair:
    """One picture with two classes: ``image_id``, ``path``, the two model
    class indices ``classes`` and their category names ``names``, and the
    annotations of each class (``anns[k]`` for ``classes[k]``)."""

    image_id: int
    path: str
    classes: Tuple[int, int]
    names: Tuple[str, str]
    anns: Tuple[List[Dict], List[Dict]]
    height: int
    width: int


def read_pairs(annotations: str, image_dir: str, class_names: Sequence[str] = (),
               num_classes: Optional[int] = None) -> Tuple[List[Pair], Dict[str, int]]:
    """The usable pictures of a COCO-style file (see ``--help``) and counts of
    what was skipped.  Raises :class:`PairDataError` on a file that is
    missing, not JSON, or lacks images/annotations/categories, and on a
    category that maps to no model output."""
    if not os.path.isfile(annotations):
        raise PairDataError(f"{annotations}: file not found (a COCO-style instances JSON)")
    if not os.path.isdir(image_dir):
        raise PairDataError(f"{image_dir}: not a folder (the pictures of {os.path.basename(annotations)})")
    try:
        with open(annotations) as fh:
            data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PairDataError(f"{annotations}: not JSON ({exc})") from None
    index_of = {name: i for i, name in enumerate(class_names)}
    _, anns_by_image, _ = check_coco(data, annotations)
    cats: Dict[int, Tuple[int, str]] = {}
    for i, c in enumerate(data["categories"]):
        cid, name = c["id"], str(c.get("name", c["id"]))
        if "model_index" in c:
            idx = c["model_index"]
        elif name in index_of:
            idx = index_of[name]
        else:
            raise PairDataError(f"{annotations}: category {cid} ({name!r}) has no 'model_index' and the model has "
                                "no class of that name")
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0 or (num_classes is not None and idx >= num_classes):
            raise PairDataError(f"{annotations}: categories[{i}].model_index: category {cid} ({name!r}) maps to output "
                                f"{idx!r}, outside the model's 0..{(num_classes or 1) - 1}")
        cats[cid] = (idx, name)
    pairs, skipped = [], {"not_two_classes": 0}
    for img in data["images"]:
        iid, fname = img["id"], img["file_name"]
        anns = anns_by_image.get(iid, [])
        groups: Dict[int, List[Dict]] = {}
        for a in anns:
            groups.setdefault(cats[int(a["category_id"])][0], []).append(a)
        if len(groups) != 2:
            skipped["not_two_classes"] += 1
            continue
        (ca, la), (cb, lb) = sorted(groups.items())
        name_of = {idx: name for idx, name in cats.values()}
        pairs.append(Pair(iid, os.path.join(image_dir, fname), (ca, cb), (name_of[ca], name_of[cb]), (la, lb),
                          img.get("height", 0), img.get("width", 0)))
    return pairs, skipped


def _int_field(value, field: str, where: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PairDataError(f"{where}: {field} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise PairDataError(f"{where}: {field}: {value} < {minimum}")
    return value


def _number_list(value, n: Optional[int], field: str, where: str, what: str) -> None:
    ok = isinstance(value, list) and (n is None or len(value) == n) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)
    if not ok:
        raise PairDataError(f"{where}: {field} must be {what}, got {str(value)[:80]}")


def _check_segmentation(seg, field: str, where: str) -> None:
    """Polygons (lists of >= 3 finite (x, y) pairs) or an RLE {"size": [h, w], "counts": str or list of ints}."""
    if isinstance(seg, list):
        for k, poly in enumerate(seg):
            _number_list(poly, None, f"{field}[{k}]", where, "a polygon: a list of finite numbers")
            if len(poly) < 6 or len(poly) % 2:
                raise PairDataError(f"{where}: {field}[{k}] must hold >= 3 (x, y) pairs, got {len(poly)} numbers")
    elif isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
            raise PairDataError(f"{where}: {field}.size must be [height, width] non-negative integers, got {size!r}")
        counts = seg.get("counts")
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts))):
            raise PairDataError(f"{where}: {field}.counts must be a string or a list of non-negative integers")
    else:
        raise PairDataError(f"{where}: {field} must be polygons (a list) or an RLE (an object), got {seg!r}")


def _record(item, field: str, where: str, required: Sequence[str]) -> None:
    if not isinstance(item, dict):
        raise PairDataError(f"{where}: {field} must be an object, got {str(item)[:80]}")
    for name in required:
        if name not in item:
            raise PairDataError(f"{where}: {field} lacks field {name!r}")


def check_coco(data, where: str) -> Tuple[Dict[int, Dict], Dict[int, List[Dict]], Dict[int, Dict]]:
    """Check a COCO instances dict field by field (one-line :class:`PairDataError`
    naming ``where`` and the field, e.g. ``annotations[3].bbox``); returns
    (images by id, annotations by image id, categories by id)."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise PairDataError(f"{where}: needs lists 'images', 'annotations' and 'categories' (COCO layout)")
    categories: Dict[int, Dict] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c:
            raise PairDataError(f"{where}: categories[{i}] must be an object with an integer 'id', got {str(c)[:80]}")
        cid = _int_field(c["id"], f"categories[{i}].id", where)
        if "name" in c and not isinstance(c["name"], str):
            raise PairDataError(f"{where}: categories[{i}].name must be a string, got {c['name']!r}")
        if cid in categories:
            raise PairDataError(f"{where}: categories[{i}].id: {cid} repeats an earlier category")
        categories[cid] = c
    images: Dict[int, Dict] = {}
    for i, img in enumerate(data["images"]):
        _record(img, f"images[{i}]", where, ("id", "file_name"))
        iid = _int_field(img["id"], f"images[{i}].id", where)
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise PairDataError(f"{where}: images[{i}].file_name must be a non-empty string, got {img['file_name']!r}")
        for field in ("height", "width"):
            if field in img:
                _int_field(img[field], f"images[{i}].{field}", where, minimum=0)
        if iid in images:
            raise PairDataError(f"{where}: images[{i}].id: {iid} repeats an earlier image")
        images[iid] = img
    by_image: Dict[int, List[Dict]] = {}
    for i, a in enumerate(data["annotations"]):
        _record(a, f"annotations[{i}]", where, ("image_id", "category_id"))
        iid = _int_field(a["image_id"], f"annotations[{i}].image_id", where)
        cid = _int_field(a["category_id"], f"annotations[{i}].category_id", where)
        if iid not in images:
            raise PairDataError(f"{where}: annotations[{i}].image_id: {iid} is no image's id")
        if cid not in categories:
            raise PairDataError(f"{where}: annotations[{i}].category_id: {cid} is no category's id")
        if "bbox" in a:
            _number_list(a["bbox"], 4, f"annotations[{i}].bbox", where, "4 finite numbers [x, y, width, height]")
            if a["bbox"][2] < 0 or a["bbox"][3] < 0:
                raise PairDataError(f"{where}: annotations[{i}].bbox: negative width or height {a['bbox'][2:]}")
        if a.get("segmentation"):
            _check_segmentation(a["segmentation"], f"annotations[{i}].segmentation", where)
        elif "bbox" not in a:
            raise PairDataError(f"{where}: annotations[{i}] has neither a segmentation nor a bbox")
        by_image.setdefault(iid, []).append(a)
    return images, by_image, categories


def _region(anns: List[Dict], h: int, w: int) -> np.ndarray:
    """Union of the annotations' masks (segmentation when given, else the filled box), (h, w) bool."""
    out = np.zeros((h, w), bool)
    for a in anns:
        seg = a.get("segmentation")
        if seg:
            from pycocotools import mask as mask_utils

            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            out |= mask_utils.decode(rle).astype(bool)
        else:
            x, y, bw, bh = (float(v) for v in a["bbox"])
            out[max(0, int(round(y))):int(round(y + bh)), max(0, int(round(x))):int(round(x + bw))] = True
    return out


def load_pair(pair: Pair, size: Tuple[int, int], mean: Sequence[float], std: Sequence[float]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The picture resized to ``size`` (H, W) and normalised, (3, H, W), and
    the two regions resized with nearest neighbour, (2, H, W) bool."""
    import cv2

    bgr = cv2.imread(pair.path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise PairDataError(f"{pair.path}: missing or not a picture")
    h, w = bgr.shape[:2]
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    regions = [_region(anns, h, w) for anns in pair.anns]
    if (h, w) != tuple(size):
        rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA if h > size[0] else cv2.INTER_LINEAR)
        regions = [cv2.resize(r.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
                   for r in regions]
    x = (rgb.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(np.stack(regions))


def _maps(model, x: torch.Tensor, method: str, index: torch.Tensor) -> torch.Tensor:
    maps = explain(model, x, method, index=index.to(x.device), start_layer=EVAL_START_LAYER.get(method, 0))
    if tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
        maps = upsample(maps, tuple(x.shape[-2:]))
    return maps.detach().float().cpu()


def explain_pair_batch(model, x: torch.Tensor, regions: torch.Tensor, classes: torch.Tensor,
                       methods: Sequence[str]) -> Tuple[List[Dict], Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """Explain both classes of each picture with every method and score them.

    ``x`` (B, 3, H, W) on the model's device, ``regions`` (B, 2, H, W) bool,
    ``classes`` (B, 2) long.  Returns one record per picture (``top2``, and
    per method the two pointing hits, the four masses, class sensitivity
    and the two own-object shares) and the maps (method -> (maps for the
    first class, maps for the second), CPU)."""
    with torch.no_grad():
        logits = model_logits(model, x).float().cpu()
    top2 = torch.topk(logits, 2, dim=1).indices.sort(dim=1).values
    recognised = (top2 == classes.sort(dim=1).values).all(dim=1)
    ra, rb = regions[:, 0], regions[:, 1]
    recs = [{"top2": bool(recognised[i]), "logits": [round(float(logits[i, c]), 4) for c in classes[i]],
             "methods": {}} for i in range(x.shape[0])]
    all_maps = {}
    for m in methods:
        ma, mb = _maps(model, x, m, classes[:, 0]), _maps(model, x, m, classes[:, 1])
        all_maps[m] = (ma, mb)
        hit_a, hit_b = pointing_hits(ma, ra), pointing_hits(mb, rb)
        sens = class_sensitive(ma, mb, ra, rb)
        masses = [positive_mass(ma, ra), positive_mass(ma, rb), positive_mass(mb, rb), positive_mass(mb, ra)]
        sa, sb = own_share(ma, ra, rb), own_share(mb, rb, ra)
        for i, r in enumerate(recs):
            r["methods"][m] = {"pointing": [bool(hit_a[i]), bool(hit_b[i])], "sensitive": bool(sens[i]),
                               "own_share": [float(sa[i]), float(sb[i])],
                               "mass": [float(v[i]) for v in masses]}
    return recs, all_maps


def summarize(records: Sequence[Dict], methods: Sequence[str]) -> Dict:
    """Per method, over all pictures and over the recognised ones: pointing
    game (share of picture-class pairs), both pointed (share of pictures),
    class sensitivity (share of pictures), own-object share (mean); with the
    counts."""
    def block(recs: Sequence[Dict]) -> Dict:
        out = {}
        for m in methods:
            rs = [r["methods"][m] for r in recs]
            n = len(rs)
            out[m] = {"n_images": n,
                      "pointing_game": sum(sum(r["pointing"]) for r in rs) / (2 * n) if n else None,
                      "both_pointed": sum(all(r["pointing"]) for r in rs) / n if n else None,
                      "class_sensitivity": sum(r["sensitive"] for r in rs) / n if n else None,
                      "own_share": sum(sum(r["own_share"]) for r in rs) / (2 * n) if n else None}
        return out

    rec = [r for r in records if r["top2"]]
    return {"all": block(records), "recognised": block(rec), "n_images": len(records), "n_recognised": len(rec),
            "recognised_share": len(rec) / len(records) if records else None}


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(summary: Dict, methods: Sequence[str], title: str = "") -> str:
    """Markdown: one row per method (paper order), the figures in %."""
    lines = ([title, ""] if title else []) + [
        "| method | class-specific | pointing game | both pointed | class sensitivity | own-object share "
        f"| class sensitivity, recognised ({summary['n_recognised']}) |",
        "|---|:---:|---:|---:|---:|---:|---:|"]
    order = [m for m in TABLE_ORDER if m in methods] + [m for m in methods if m not in TABLE_ORDER]
    for m in order:
        a, r = summary["all"][m], summary["recognised"][m]
        lines.append(f"| {METHODS[m].label} | {'yes' if METHODS[m].class_specific else 'no'} | "
                     f"{_pct(a['pointing_game'])} | {_pct(a['both_pointed'])} | {_pct(a['class_sensitivity'])} | "
                     f"{_pct(a['own_share'])} | {_pct(r['class_sensitivity'])} |")
    return "\n".join(lines)


def _plot(path: str, summary: Dict, methods: Sequence[str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [m for m in TABLE_ORDER if m in methods] + [m for m in methods if m not in TABLE_ORDER]
    keys = [("pointing_game", "pointing game"), ("both_pointed", "both pointed"),
            ("class_sensitivity", "class sensitivity")]
    fig, ax = plt.subplots(figsize=(1.3 * len(order) + 2, 3.6))
    width = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        vals = [100 * (summary["all"][m][key] or 0.0) for m in order]
        ax.bar(np.arange(len(order)) + (k - 1) * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(order)))
    ax.set_xticklabels([METHODS[m].label.replace(" (ours)", "\n(ours)") for m in order], fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _overlay(path: str, image: torch.Tensor, regions: torch.Tensor, names: Sequence[str], maps: Dict,
             methods: Sequence[str], mean, std, title: str) -> str:
    from baselines.ViT.visualization import draw_outline, overlay, save_grid, to_display_image

    img = to_display_image(image, mean, std)
    base = (img * 255).round().astype(np.uint8)
    colours = ((255, 255, 255), (255, 0, 255))
    outlined = draw_outline(draw_outline(base, regions[0].numpy(), colours[0]), regions[1].numpy(), colours[1])
    rows = [[(f"{names[0]} (white)\n{names[1]} (magenta)", outlined)]]
    for m in methods:
        row = []
        for k in range(2):
            # pixel-level LRP maps have a few extreme values: clip every map for the eye
            pic = overlay(img, maps[m][k].numpy(), clip_percentile=99.5)
            row.append((f"{METHODS[m].label}:\n{names[k]}", draw_outline(pic, regions[k].numpy(), colours[k])))
        rows.append(row)
    return save_grid(path, rows, title=title)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({platform.machine()})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Class-specificity benchmark of ViT explanations on pictures with two classes: pointing game "
                    "and class sensitivity for every method (ours, beyond both papers).",
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=110), epilog=EPILOG)
    p.add_argument("--annotations", required=True, help="COCO-style instances JSON (layout below)")
    p.add_argument("--image-dir", required=True, help="folder of the pictures named in the JSON")
    p.add_argument("--weights", default=None, help="model folder (config.json + model.safetensors, e.g. "
                   "samples/synthetic_scenes_vit) or a local checkpoint file for --model (needed for the copies and "
                   "timm names, optional for a Hugging Face directory); nothing is downloaded")
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="an LRP copy: " + ", ".join(sorted(MODEL_FACTORIES)) + " (the factory model for a checkpoint "
                        "file; ignored for a model folder; its mean/std); " + UNMODIFIED_MODEL_HELP
                        + " (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to compare (default: every method the model supports: "
                        + " ".join(METHOD_NAMES) + " for the copies)")
    p.add_argument("--output-dir", default=os.path.join("outputs", "class_specificity"),
                   help="where results go (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="pictures per batch (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N usable pictures (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--num-overlays", type=int, default=2, help="pictures drawn with a map per class per method "
                   "(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="skip the pictures already in --output-dir/per_image.jsonl "
                   "(refused when the model's weights, the pictures or the methods differ)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --output-dir")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj)


def _read_done(path: str) -> Dict[int, Dict]:
    """The records of ``per_image.jsonl`` by image id, for ``--resume``.

    Only newline-terminated lines count: a run stopped while writing leaves
    its last line cut short (or whole but without its newline), and the file
    is truncated after its last newline before the resumed run appends, so
    that picture is scored again and no appended record joins a torn one on
    one line (which would make both unreadable to the next resume).
    """
    done: Dict[int, Dict] = {}
    if not os.path.isfile(path):
        return done
    with open(path, "r+b") as fh:
        data = fh.read()
        whole = data.rfind(b"\n") + 1
        if whole < len(data):
            fh.truncate(whole)
    for line in data[:whole].splitlines():
        try:
            r = json.loads(line)
            done[int(r["image_id"])] = r
        except (ValueError, KeyError, TypeError):
            continue  # not a record of ours
    return done


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the benchmark; returns the summary written to results.json (bad
    input: one line on stderr, exit 2)."""
    with contextlib.ExitStack() as stack:  # the output folder's lock, released on return or error
        return _main(argv, stack)


def _main(argv: Optional[Sequence[str]], stack: contextlib.ExitStack) -> Dict:
    from tqdm import tqdm

    from baselines.ViT.imagenet_seg_eval import load_eval_model

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or (args.limit is not None and args.limit <= 0) or args.num_overlays < 0:
        parser.exit(2, "error: --batch-size and --limit must be positive, --num-overlays non-negative\n")
    if args.threads is not None:
        if args.threads <= 0:
            parser.exit(2, "error: --threads must be positive\n")
        torch.set_num_threads(args.threads)
    try:
        methods = (None if args.methods is None else
                   list(dict.fromkeys(resolve_method(m).name for m in args.methods)))
        device = resolve_device(args.device)
        check_output_dir(args.output_dir, flag="--output-dir")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        model, info = load_eval_model(args.model, args.weights, str(device))
        if methods is None:
            methods = [m for m in METHOD_NAMES if m in supported_methods(model)]
        require_methods(model, methods, flag="--methods")
        size, mean, std = tuple(info["input_size"]), info["mean"], info["std"]
        pairs, skipped = read_pairs(args.annotations, args.image_dir, info["class_names"] or (),
                                    info["num_classes"])
        if not pairs:
            raise PairDataError(f"{args.annotations}: no picture with exactly two annotated classes "
                                f"(skipped: {skipped})")
        if args.limit is not None:
            pairs = pairs[:args.limit]
        # pictures are keyed by image id, so a run may be resumed with another --limit; the identity holds the
        # content of every usable picture and of the annotations (another --image-dir is another run)
        all_pairs, _ = read_pairs(args.annotations, args.image_dir, info["class_names"] or (), info["num_classes"])
        identity = {"annotations": os.path.abspath(args.annotations), "methods": methods,
                    "model": info["model"], "weights_sha256": info["weights_sha256"], "input_size": list(size),
                    "data_sha256": files_sha256([args.annotations] + [p.path for p in all_pairs])}
        lines_path = os.path.join(args.output_dir, "per_image.jsonl")
        stack.enter_context(file_lock(args.output_dir, what=f"--output-dir {args.output_dir}"))  # one run per folder
        resume = prepare_run_folder(args.output_dir, identity, resume=args.resume, overwrite=args.overwrite,
                                    finished=("results.json",), partial=("per_image.jsonl",))
        done: Dict[int, Dict] = {}
        if resume:
            done = _read_done(lines_path)
            print(f"resuming: {len(done)} of {len(pairs)} pictures already scored")
        elif os.path.exists(lines_path):
            os.remove(lines_path)  # --overwrite, or a record without results
        todo = [p for p in pairs if p.image_id not in done]
        start = time.time()
        overlays = []
        with open(lines_path, "a") as out:
            bar = tqdm(range(0, len(todo), args.batch_size), desc="class specificity", disable=args.quiet,
                       unit="batch")
            for b in bar:
                chunk = todo[b:b + args.batch_size]
                loaded = [load_pair(p, size, mean, std) for p in chunk]
                x = torch.stack([t[0] for t in loaded]).to(device)
                regions = torch.stack([t[1] for t in loaded])
                classes = torch.tensor([p.classes for p in chunk], dtype=torch.long)
                recs, maps = explain_pair_batch(model, x, regions, classes, methods)
                for p, r in zip(chunk, recs):
                    r.update(image_id=p.image_id, file=os.path.basename(p.path), classes=list(p.classes),
                             names=list(p.names))
                    out.write(json.dumps(r) + "\n")
                    done[p.image_id] = r
                out.flush()
                for i, p in enumerate(chunk):
                    if len(overlays) < args.num_overlays and pairs.index(p) < args.num_overlays:
                        overlays.append(_overlay(
                            os.path.join(args.output_dir, "overlays", f"image_{p.image_id}.png"), x[i].cpu(),
                            regions[i], p.names, {m: (maps[m][0][i], maps[m][1][i]) for m in methods}, methods,
                            mean, std, f"{os.path.basename(p.path)}: a map per class"))
    except (PairDataError, CheckpointError, UnknownMethodError, CLIError, OSError) as exc:
        _fail(str(exc).splitlines()[0])
    except ValueError as exc:
        _fail(str(exc).splitlines()[0])
    records = [done[p.image_id] for p in pairs if p.image_id in done]
    summary = summarize(records, methods)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    title = (f"Class specificity: {info['model']} on {os.path.basename(args.annotations)}, {len(records)} pictures "
             f"with two classes; both classes the top 2 for {summary['n_recognised']} "
             f"({_pct(summary['recognised_share'])}%); {device}, {stamp}")
    results = {"model": info["model"], "weights": info["weights"], "weights_sha256": info["weights_sha256"],
               "annotations": identity["annotations"], "image_dir": os.path.abspath(args.image_dir),
               "skipped": skipped, "input_size": list(size), "methods": methods,
               "start_layers": {m: EVAL_START_LAYER.get(m, 0) for m in methods},
               "class_specific": {m: METHODS[m].class_specific for m in methods}, **summary,
               "device": str(device), "machine": _machine(device), "torch": torch.__version__, "date": stamp,
               "seconds_this_run": round(time.time() - start, 2),
               "overlays": [os.path.relpath(p, args.output_dir) for p in overlays]}
    _write_json(os.path.join(args.output_dir, "results.json"), results)
    table = format_table(summary, methods, title)
    atomic_write_text(os.path.join(args.output_dir, "table.md"), table + "\n")
    _plot(os.path.join(args.output_dir, "plot.png"), summary, methods,
          f"{info['model']}: {len(records)} two-class pictures")
    print(table)
    print(f"wrote {os.path.join(args.output_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
