"""ImageNet-segmentation test of ViT explanations (../shared/METHODS.md section 4).

For every image of a ``gtsegs_ijcv.mat``-layout file: resize to the model's
input size (224x224 for ViT-B; no crop), normalise with the model's mean/std
(0.5/0.5 for ViT-B), explain the **predicted** class, upsample the patch map
bilinearly to the input size, min-max normalise per image, threshold at the
map's mean, and score against the nearest-neighbour-resized mask: pooled
pixel accuracy, pooled IoU averaged over {background, foreground}, and
per-image average precision averaged over images
(:mod:`baselines.ViT.segmentation_metrics`).

The real benchmark::

    python baselines/ViT/imagenet_seg_eval.py --imagenet-seg-path gtsegs_ijcv.mat \\
        --model vit_base_patch16_224 --weights vit_base_patch16_224.pth --all-methods

An unmodified model (a timm name with a local checkpoint, or a local Hugging
Face image-classifier directory), explained through the LRP scope with every
method it supports, fed with its own input size and mean/std (from its
config) instead of the copies' 0.5/0.5::

    python baselines/ViT/imagenet_seg_eval.py --imagenet-seg-path gtsegs_ijcv.mat \\
        --model timm:vit_base_patch16_224 --weights vit_base_patch16_224.augreg.safetensors --all-methods
    python baselines/ViT/imagenet_seg_eval.py --imagenet-seg-path gtsegs_ijcv.mat --model ./my-hf-vit --all-methods

The offline stand-in (``data/synthetic.py``; the model folder carries its own
configuration, so ``--model`` is not needed)::

    python baselines/ViT/imagenet_seg_eval.py --imagenet-seg-path outputs/demo/data/val_gtsegs.mat \\
        --weights samples/synthetic_vit --all-methods --output-dir outputs/demo/segmentation

Outputs in ``--output-dir``: ``results.json`` (metrics, method(s), model,
weights sha256, number of images, seconds), ``results_<method>.json`` per
method, ``table.md``, ``progress.json`` (running sums, rewritten every
``--save-every`` batches; ``--resume`` continues from it) and overlay PNGs
under ``overlays/`` (every method side by side, ground-truth outline drawn).

An output folder holding another run's results (other methods, weights or
data; the data identified by the sha256 of the file's bytes) is refused
unless ``--overwrite``; Ctrl-C saves the progress of the finished batches and
exits 130 (``--resume`` continues).  Maps or logits holding NaN/Inf are
refused, not scored.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from baselines.ViT.segmentation_metrics import SegmentationScores
from baselines.ViT.ViT_explanation_generator import explain, upsample
from baselines.ViT.ViT_LRP import MODEL_FACTORIES, CheckpointError
from baselines.ViT.ViT_LRP import load_model as load_vit
from data.imagenet_seg import ImagenetSegmentation, SegmentationDataError
from modules import cli
from modules.checkpoints import file_sha256, weights_sha256
from modules.generic import (UNMODIFIED_MODEL_HELP, load_unmodified_image_classifier, model_logits,
                             names_unmodified_model, require_methods)
from modules.explain import supported_methods
from modules.methods import (EVAL_START_LAYER, METHOD_CHOICES, METHOD_NAMES, METHODS, UnknownMethodError,
                             resolve_method)

__all__ = ["EVAL_START_LAYER", "PAPER_RESULTS", "TABLE_ORDER", "load_model", "load_eval_model", "relevance_maps",
           "evaluate", "format_table", "main"]

PAPER_RESULTS: Dict[str, Tuple[float, float, float]] = {
    "rollout": (73.54, 84.76, 55.42),
    "attn_last_layer": (67.84, 80.24, 46.37),
    "attn_gradcam": (64.44, 71.60, 40.82),
    "lrp": (51.09, 55.68, 32.89),
    "lrp_last_layer": (76.31, 84.67, 57.94),
    "transformer_attribution": (79.70, 86.03, 61.95),
}
"""Published ViT-Base results on ImageNet-segmentation: pixel acc., mAP, mIoU (%)."""

TABLE_ORDER: Tuple[str, ...] = ("rollout", "attn_last_layer", "attn_gradcam", "lrp", "lrp_last_layer",
                                "generic_attribution", "transformer_attribution")
"""Row order of the paper's table (generic attribution, from the ICCV paper, added)."""


class EvalError(cli.CLIError):
    """A user-facing problem (bad input, mismatched resume state): one line, exit 2."""


def load_model(model_name: str, weights: str, device: str):
    """The model to explain and a description of it.

    ``weights`` is a model folder from ``train_synthetic.py`` (or the
    ``model.safetensors`` in one), whose ``config.json`` defines the model
    (``model_name`` is then ignored), or a checkpoint file for the factory
    model ``model_name`` (``.pth``/``.pt``/``.bin`` read with
    ``weights_only=True``, or ``.safetensors``).  Returns (model in eval
    mode on ``device``, dict with model name, weights path and sha256).
    """
    from baselines.ViT.train_synthetic import MODEL_FILE, is_model_dir, load_synthetic_model

    if is_model_dir(weights):
        model = load_synthetic_model(weights, device)
        path = os.path.join(weights, MODEL_FILE) if os.path.isdir(weights) else weights
        name = model.default_cfg.get("architecture", "synthetic_vit")
    else:
        if os.path.isdir(weights):
            raise CheckpointError(f"{weights}: a folder without a model config.json; pass a checkpoint file")
        if not os.path.isfile(weights):
            raise CheckpointError(f"checkpoint not found: {weights}")
        model = load_vit(model_name, weights)
        path, name = weights, model_name
    return model.to(device).eval(), {"model": name, "weights": os.path.abspath(path),
                                     "weights_sha256": weights_sha256(weights)}


def load_eval_model(model_name: str, weights: Optional[str], device: str):
    """The model to explain and what the evaluation records and feeds: one of
    the LRP copies (:func:`load_model`) or an unmodified timm / Hugging Face
    image classifier (:func:`modules.generic.load_unmodified_image_classifier`,
    chosen by :func:`modules.generic.names_unmodified_model`).

    Returns (model in eval mode on ``device``, dict with ``model`` (the copy's
    architecture, ``timm:<name>`` or ``huggingface:<Class>``), ``weights``,
    ``weights_sha256``, ``input_size`` (H, W), ``mean``, ``std``,
    ``num_classes``, ``class_names`` (or None) and ``unmodified``).
    """
    if names_unmodified_model(model_name, weights, MODEL_FACTORIES):
        got = load_unmodified_image_classifier(model_name, weights)
        print(got.description, file=sys.stderr)
        return got.model.to(device).eval(), {
            "model": got.name, "weights": got.weights or got.source, "weights_sha256": got.weights_sha256,
            "input_size": got.input_size, "mean": got.mean, "std": got.std, "num_classes": got.num_classes,
            "class_names": got.class_names, "unmodified": True}
    if weights is None:
        raise CheckpointError(f"--model {model_name} (an LRP copy) needs --weights: a local checkpoint file or "
                              "model folder; nothing is downloaded")
    model, info = load_model(model_name, weights, device)
    cfg = model.default_cfg
    return model, dict(info, input_size=tuple(cfg["input_size"][-2:]), mean=cfg["mean"], std=cfg["std"],
                       num_classes=int(model.head.out_features), class_names=cfg.get("class_names"),
                       unmodified=False)


def relevance_maps(model, images: torch.Tensor, method: str) -> torch.Tensor:
    """Raw relevance of the predicted class at the input's resolution:
    (B, H, W) float32 on the CPU (maps of any (B, h, w) grid - patches,
    Swin's finest grid - upsampled bilinearly; pixel maps kept)."""
    maps = explain(model, images, method, index=None, start_layer=EVAL_START_LAYER.get(method, 0))
    if tuple(maps.shape[-2:]) != tuple(images.shape[-2:]):
        maps = upsample(maps, tuple(images.shape[-2:]))
    return cli.check_finite(maps.float().cpu(), f"{method} relevance maps")


def _write_json(path: str, obj) -> None:
    cli.atomic_write_json(path, obj)


def format_table(results: Dict[str, Dict[str, float]], title: str = "", paper: bool = False) -> str:
    """A Markdown table like the paper's: pixel accuracy, mAP, mIoU (%) per
    method; with ``paper`` the published ViT-Base numbers beside them."""
    head = "| method | pixel acc. | mAP | mIoU |" + (" paper (ViT-B, ImageNet) |" if paper else "")
    sep = "|---|---:|---:|---:|" + ("---:|" if paper else "")
    lines = ([title, ""] if title else []) + [head, sep]
    order = [m for m in TABLE_ORDER if m in results] + [m for m in results if m not in TABLE_ORDER]
    for m in order:
        r = results[m]
        row = f"| {METHODS[m].label} | {100 * r['pixel_accuracy']:.2f} | {100 * r['mAP']:.2f} | {100 * r['mIoU']:.2f} |"
        if paper:
            p = PAPER_RESULTS.get(m)
            row += f" {p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f} |" if p else " - |"
        lines.append(row)
    return "\n".join(lines)


def _overlay_rows(store: List[Dict], methods: Sequence[str], mean, std) -> List[List[Tuple[str, np.ndarray]]]:
    from baselines.ViT.visualization import draw_outline, overlay, to_display_image

    rows = []
    for item in store:
        image = to_display_image(item["image"], mean, std)
        base = (image * 255).round().astype(np.uint8)
        row = [(f"#{item['index']} (truth outlined)", draw_outline(base, item["mask"]))]
        for m in methods:
            # full LRP's pixel maps have a few extreme values: clip them for the eye
            pic = overlay(image, item["maps"][m], clip_percentile=99.5 if METHODS[m].to_input else None)
            row.append((METHODS[m].label, draw_outline(pic, item["mask"])))
        if len(methods) == 1:
            pred = (item["pred"][methods[0]][..., None] * np.array([255, 255, 255])).astype(np.uint8)
            row.append(("map > mean", draw_outline(pred, item["mask"], color=(255, 0, 0))))
        rows.append(row)
    return rows


def _save_overlays(out_dir: str, store: List[Dict], methods: Sequence[str], mean, std, title: str) -> List[str]:
    from baselines.ViT.visualization import save_grid, save_png

    if not store:
        return []
    rows = _overlay_rows(store, methods, mean, std)
    paths = [save_grid(os.path.join(out_dir, "overlays", "grid.png"), rows, title=title)]
    for item, row in zip(store, rows):
        for (name, rgb), m in zip(row[1:], methods):
            paths.append(save_png(os.path.join(out_dir, "overlays", m, f"{item['index']:05d}.png"), rgb))
    return paths


def evaluate(model, dataset: ImagenetSegmentation, methods: Sequence[str], device: str, batch_size: int = 8,
             num_workers: int = 0, output_dir: Optional[str] = None, num_overlays: int = 6,
             save_every: int = 20, identity: Optional[Dict] = None, resume: Optional[Dict] = None,
             progress: bool = True, title: str = "", mean: Optional[Sequence[float]] = None,
             std: Optional[Sequence[float]] = None) -> Dict:
    """Run the test for ``methods`` in one pass over ``dataset``.

    Every batch is loaded once and explained by every method.  With
    ``output_dir``, the running sums go to ``progress.json`` every
    ``save_every`` batches and at the end (with ``identity``, to check a
    resume against), and the first ``num_overlays`` images' maps to overlay
    PNGs.  ``resume`` is a progress dict to continue from (the images it
    counted are skipped).  ``mean``/``std`` undo the normalisation for the
    overlays (default: ``model.default_cfg``'s, as the copies carry them).

    Returns a dict: ``scores`` (method -> metrics), ``seconds`` (method ->
    explanation and scoring time), ``n_images``, ``accuracy`` (top-1 on the
    stand-in's labels, when the file has them, else None), ``overlays``
    (paths written).
    """
    from tqdm import tqdm

    if resume:
        scores = {m: SegmentationScores.from_state(resume["scores"][m]) for m in methods}
        seconds = {m: float(resume["seconds"][m]) for m in methods}
        correct, counted = int(resume.get("correct", 0)), int(resume.get("counted", 0))
    else:
        scores = {m: SegmentationScores() for m in methods}
        seconds = {m: 0.0 for m in methods}
        correct = counted = 0
    done = scores[methods[0]].n_images
    labels = dataset.labels()
    loader = DataLoader(dataset.subset(dataset.indices[done:]), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    if mean is None or std is None:
        mean, std = model.default_cfg["mean"], model.default_cfg["std"]
    want = max(0, num_overlays - done) if output_dir else 0
    store: List[Dict] = []
    overlays: List[str] = []

    counts = {"correct": correct, "counted": counted}

    def snapshot() -> Dict:
        """The progress record of every finished batch (all methods have seen the same images)."""
        return {"identity": identity, "complete": False, "n_images_done": scores[methods[0]].n_images,
                "scores": {m: s.state() for m, s in scores.items()}, "seconds": dict(seconds),
                "metrics_so_far": {m: s.result() for m, s in scores.items()},
                "correct": counts["correct"], "counted": counts["counted"]}

    def checkpoint(record: Optional[Dict] = None, final: bool = False) -> None:
        if output_dir:
            _write_json(os.path.join(output_dir, "progress.json"), dict(record or snapshot(), complete=final))

    last = snapshot()
    bar = tqdm(loader, total=len(loader), desc="segmentation test", disable=not progress, unit="batch")
    try:
        for b, (x, gt, idx) in enumerate(bar):
            x = x.to(device, non_blocking=True)
            correct, counted = counts["correct"], counts["counted"]
            if labels is not None:
                with torch.no_grad():
                    pred = cli.check_finite(model_logits(model, x), "the model's logits").argmax(dim=-1).cpu()
                correct += int((pred == torch.as_tensor(labels[idx.numpy()])).sum())
                counted += len(idx)
            outs = {}
            for m in methods:
                t0 = time.perf_counter()
                outs[m] = scores[m].update(relevance_maps(model, x, m), gt)
                seconds[m] += time.perf_counter() - t0
            counts.update(correct=correct, counted=counted)
            last = snapshot()  # every method has this batch: safe to save
            if len(store) < want:
                for i in range(min(want - len(store), len(idx))):
                    store.append({"index": int(idx[i]), "image": x[i].cpu(),
                                  "mask": gt[i].numpy().astype(np.uint8),
                                  "maps": {m: outs[m]["maps"][i] for m in methods},
                                  "pred": {m: outs[m]["pred"][i] for m in methods}})
                if len(store) >= want:
                    overlays = _save_overlays(output_dir, store, methods, mean, std, title)
            first = scores[methods[0]].result()
            bar.set_postfix(pixAcc=f"{first['pixel_accuracy']:.3f}", mIoU=f"{first['mIoU']:.3f}",
                            mAP=f"{first['mAP']:.3f}")
            if save_every and (b + 1) % save_every == 0:
                checkpoint(last)
    except KeyboardInterrupt:
        bar.close()
        checkpoint(last)
        raise KeyboardInterrupt(f"interrupted after {last['n_images_done']} of {done + len(loader.dataset)} images; "
                                + ("progress.json keeps them: run the same command with --resume" if output_dir
                                   else "nothing saved")) from None
    if store and not overlays:
        overlays = _save_overlays(output_dir, store, methods, mean, std, title)
    checkpoint(final=True)
    return {"scores": {m: s.result() for m, s in scores.items()}, "seconds": seconds,
            "n_images": scores[methods[0]].n_images,
            "accuracy": (counts["correct"] / counts["counted"]) if counts["counted"] else None,
            "overlays": overlays}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="ImageNet-segmentation test of ViT explanations (pixel accuracy, mIoU, mAP; METHODS.md §4).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--imagenet-seg-path", required=True,
                   help="gtsegs_ijcv.mat, or a stand-in written by data/synthetic.py in the same layout")
    p.add_argument("--method", default="transformer_attribution", choices=METHOD_CHOICES,
                   help="explanation method (one the model supports)")
    p.add_argument("--all-methods", action="store_true",
                   help="evaluate every method the model supports in one pass over the data")
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="an LRP copy: " + ", ".join(sorted(MODEL_FACTORIES)) + " (the factory model for a "
                        "checkpoint file; ignored for a model folder with config.json; METHODS.md section 4's "
                        "fixed resize and the folder's mean/std, 0.5/0.5 for ViT-B); " + UNMODIFIED_MODEL_HELP
                        + "; resized (no crop) to that input size")
    p.add_argument("--weights", default=None,
                   help="local checkpoint file (.pth/.pt/.bin/.safetensors) or a model folder from "
                        "train_synthetic.py (e.g. samples/synthetic_vit); needed for the copies and timm names, "
                        "optional for a Hugging Face directory; nothing is downloaded")
    p.add_argument("--batch-size", type=cli.int_range(1, 4096), default=8, help="images per batch")
    cli.add_device_arg(p)
    p.add_argument("--num-workers", type=cli.int_range(0, 64), default=0, help="DataLoader worker processes")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--output-dir", default=os.path.join("outputs", "imagenet_seg"), help="where results go")
    p.add_argument("--num-overlays", type=cli.int_range(0, 1000), default=6, help="images drawn as overlay PNGs")
    p.add_argument("--save-every", type=cli.non_negative_int, default=20,
                   help="write progress.json every N batches (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --output-dir/progress.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another run (other methods, weights or data) in --output-dir")
    cli.add_threads_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({platform.machine()})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


RESULT_FILES = ("progress.json", "results.json", "table.md")


def _previous_run(output_dir: str) -> Tuple[Optional[Dict], List[str]]:
    """The progress record in ``output_dir`` (None if absent) and the result
    files there; an unreadable progress.json is an :class:`EvalError`."""
    present = [n for n in RESULT_FILES if os.path.isfile(os.path.join(output_dir, n))]
    path = os.path.join(output_dir, "progress.json")
    if "progress.json" not in present:
        return None, present
    try:
        with open(path) as fh:
            record = json.load(fh)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise EvalError(f"{path}: unreadable ({cli.one_line(exc)}); remove it or pass --overwrite") from None
    return record, present


def _remove_previous_results(output_dir: str) -> None:
    """``--overwrite``: delete another run's result files (its per-method
    JSON and overlays included), so none of them is mistaken for this run's."""
    import shutil
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name in RESULT_FILES or (name.startswith("results_") and name.endswith(".json")):
            os.remove(path)
        elif name == "overlays" and os.path.isdir(path):
            shutil.rmtree(path)


def _check_previous_run(args, identity: Dict, n_total: int) -> Optional[Dict]:
    """What the output folder already holds decides: resume (``--resume``,
    same identity), start (nothing there, the same finished run, or
    ``--overwrite``), or refuse (another run's results, an unfinished run
    without ``--resume``).  Returns the progress record to resume from."""
    record, present = _previous_run(args.output_dir)
    if record is None:
        if present and not args.overwrite:
            raise EvalError(f"{args.output_dir} holds {', '.join(present)} of a run without progress.json; "
                            "use another --output-dir or pass --overwrite")
        if present:
            _remove_previous_results(args.output_dir)
        return None
    old = record.get("identity") or {}
    diff = sorted(k for k in set(identity) | set(old) if old.get(k) != identity.get(k))
    if diff:
        if args.resume:
            raise EvalError(f"{args.output_dir}/progress.json belongs to another run (differs in: "
                            f"{', '.join(diff)}); remove it or drop --resume")
        if not args.overwrite:
            what = "finished" if record.get("complete") else "unfinished"
            raise EvalError(f"{args.output_dir} holds the {what} results of another run (methods "
                            f"{', '.join(map(str, old.get('methods', [])))}; differs in: {', '.join(diff)}); "
                            "use another --output-dir or pass --overwrite to replace them")
        _remove_previous_results(args.output_dir)
        return None
    if args.resume:
        for key in ("scores", "seconds", "n_images_done"):
            if key not in record:
                raise EvalError(f"{args.output_dir}/progress.json lacks {key!r}; remove it or drop --resume")
        print(f"resuming after {record['n_images_done']} of {n_total} images")
        return record
    if not record.get("complete") and not args.overwrite:
        raise EvalError(f"{args.output_dir} holds an unfinished run of this same evaluation "
                        f"({record.get('n_images_done', 0)} of {n_total} images): pass --resume to continue "
                        "or --overwrite to start over")
    return None


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the test; returns the summary written to results.json.  Bad
    input exits 2 with one line; Ctrl-C saves the finished batches and exits 130."""
    out: Dict = {}

    def body(a):
        out["summary"] = _main(a)
        return 0
    code = cli.run_main(body, argv)
    if code:
        raise SystemExit(code)
    return out["summary"]


def _main(argv: Optional[Sequence[str]]) -> Dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.apply_threads(args.threads)
    device = cli.resolve_device(args.device)
    cli.set_tf32(False)  # reproducible maps: LRP-based relevance amplifies TF32 rounding (README)
    cli.check_output_dir(args.output_dir, flag="--output-dir")
    with cli.file_lock(args.output_dir, what=args.output_dir):  # one run per output folder
        return _evaluate_into(args, device)


def _evaluate_into(args, device) -> Dict:
    try:
        model, info = load_eval_model(args.model, args.weights, str(device))
        supported = supported_methods(model)
        methods = ([m for m in TABLE_ORDER if m in supported] + [m for m in METHOD_NAMES
                                                                 if m in supported and m not in TABLE_ORDER]
                   if args.all_methods else [resolve_method(args.method).name])
        require_methods(model, methods)
        size, mean, std = tuple(info["input_size"]), info["mean"], info["std"]
        dataset = ImagenetSegmentation(args.imagenet_seg_path, size=size, mean=mean, std=std)
        if args.limit is not None:
            dataset = dataset.subset(dataset.indices[:args.limit])
        identity = {"data": os.path.abspath(args.imagenet_seg_path),
                    "data_sha256": file_sha256(args.imagenet_seg_path), "n_images": len(dataset),
                    "methods": methods, "model": info["model"], "weights_sha256": info["weights_sha256"],
                    "input_size": list(size), "mean": list(mean), "std": list(std),
                    "start_layers": {m: EVAL_START_LAYER.get(m, 0) for m in methods}}
        resume = _check_previous_run(args, identity, len(dataset))
        start = time.time()
        out = evaluate(model, dataset, methods, str(device), args.batch_size, args.num_workers, args.output_dir,
                       args.num_overlays, args.save_every, identity=identity, resume=resume,
                       progress=not args.quiet,
                       title=f"{info['model']} on {os.path.basename(args.imagenet_seg_path)}", mean=mean, std=std)
    except (ValueError, KeyError, TypeError) as exc:  # e.g. a malformed progress.json given to --resume
        if isinstance(exc, cli.input_error_types()):
            raise
        raise EvalError(cli.one_line(exc)) from None
    elapsed = time.time() - start + (sum(resume["seconds"].values()) if resume else 0.0)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    common = {"model": info["model"], "weights": info["weights"], "weights_sha256": info["weights_sha256"],
              "data": identity["data"], "n_images": out["n_images"], "input_size": list(size),
              "mean": list(mean), "std": list(std), "device": str(device), "torch": torch.__version__,
              "machine": _machine(device), "threads": torch.get_num_threads(),
              "date": stamp}
    if out["accuracy"] is not None:
        common["classification_accuracy"] = out["accuracy"]
    for m in methods:
        _write_json(os.path.join(args.output_dir, f"results_{m}.json"),
                    dict(common, method=m, label=METHODS[m].label, start_layer=EVAL_START_LAYER.get(m, 0),
                         metrics=out["scores"][m], seconds=round(out["seconds"][m], 2)))
    summary = dict(common, methods=methods, seconds=round(elapsed, 2),
                   results={m: dict(out["scores"][m], seconds=round(out["seconds"][m], 2),
                                    start_layer=EVAL_START_LAYER.get(m, 0)) for m in methods},
                   overlays=[os.path.relpath(p, args.output_dir) for p in out["overlays"]])
    if len(methods) == 1:
        summary.update(method=methods[0], label=METHODS[methods[0]].label, metrics=out["scores"][methods[0]])
    _write_json(os.path.join(args.output_dir, "results.json"), summary)
    title = (f"Segmentation test: {info['model']} on {os.path.basename(args.imagenet_seg_path)}, "
             f"{out['n_images']} images, {size[0]}x{size[1]}, {device} ({elapsed:.0f} s)")
    if out["accuracy"] is not None:
        title += f"; classification accuracy {100 * out['accuracy']:.1f}%"
    table = format_table(out["scores"], title,
                         paper=info["model"] in ("vit_base_patch16_224", "timm:vit_base_patch16_224"))
    cli.atomic_write_text(os.path.join(args.output_dir, "table.md"), table + "\n")
    print(table)
    print(f"wrote {os.path.join(args.output_dir, 'results.json')}")
    return summary


if __name__ == "__main__":
    main()
