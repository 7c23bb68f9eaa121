"""Positive / negative perturbation test on stored relevance maps
(../shared/METHODS.md section 5).

    python baselines/ViT/perturbation_eval.py --results outputs/perturbation/rollout/top --neg

reads ``results.hdf5`` (from ``generate_visualizations.py``) and the images it
names, upsamples and min-max normalises each map, and for p = 0.1 ... 0.9
sets the top (``--pos``) or bottom (``--neg``) k = int(H*W*p) pixels to 0
before normalisation.  Pixels of equal relevance are ordered by
``--tie-break`` (:mod:`modules.ranking`): ``random`` (default; a seeded
permutation of the pixel positions, the same on every device), ``topk``
(``torch.topk`` as the published loop calls it, on the evaluation device) or
``raster`` (the top rows first).  Writes to ``--output-dir`` (default: next to
results.hdf5): ``results.json`` (accuracy at p = 0, 0.1, ..., 0.9, the AUC
of each direction run so far, the tie rule and seed, and per step the share
of removed pixels that were tied with a kept one), ``<direction>/model_hits.npy``,
``<direction>/perturbations_hits.npy`` (per-image hits, as the published
script), ``<direction>/tied_share.npy`` (per image and step) and
``perturbation.png`` (accuracy against the removed fraction, both directions
when both were run).  ``--pos`` and ``--neg`` may run at the same time on the
same output folder: the files are written under unique temporary names and
renamed, and the read-modify-write of results.json and the plot is locked.
Each direction is a run folder (issue 27): a second run of the same
direction into it is refused while the first runs; ``<direction>/run.json``
records its identity (the maps file's content hash, which covers the
model's and the images', and the tie rule); finished results (the
direction's, or results.json entries of other maps or another tie rule)
are replaced only with ``--overwrite``; ``--resume`` reuses them after
checking that identity.

Maps of an unmodified model (``generate_visualizations.py --model`` a timm
name or a Hugging Face directory) are evaluated with that same model, loaded
again from what results.hdf5 records (or ``--model``/``--weights``, whose
hash must match), at its own input size and mean/std as recorded.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from baselines.ViT.perturbation_data import (RESULTS_NAME, InputError, RobustImageDataset, decode_maps,
                                             open_image_tree, read_results, set_tf32, weights_sha256)
from baselines.ViT.perturbation_metrics import (DEFAULT_TIE_BREAK, DEFAULT_TIE_SEED, DIRECTIONS, PERTURBATION_STEPS,
                                                TIE_BREAKS, auc, normalize_input, pixels_to_remove, prepare_maps,
                                                removal_masks, remove_masked, tied_share)
from baselines.ViT.ViT_LRP import MODEL_FACTORIES, CheckpointError, load_model
from modules.cli import (atomic_write_bytes, atomic_write_json, file_lock, files_sha256, int_range, prepare_run_folder,
                         resolve_device, run_main, workers_ignore_sigint)
from modules.generic import UNMODIFIED_MODEL_HELP, load_unmodified_image_classifier, model_logits
from modules.methods import METHOD_CHOICES, resolve_method

__all__ = ["perturbation_hits", "evaluate", "update_results", "plot_results", "write_outputs", "build_parser",
           "main", "run"]

FRACTIONS: Tuple[float, ...] = (0.0,) + PERTURBATION_STEPS
JSON_NAME = "results.json"
PLOT_NAME = "perturbation.png"
LOCK_NAME = ".results.json.lock"


def output_lock(output_dir: str):
    """Exclusive lock on ``output_dir`` (``flock`` of ``.results.json.lock``,
    :func:`modules.cli.file_lock`, waiting for it) held while one run writes
    its outputs, so that concurrent runs (``--pos`` and ``--neg``) update
    results.json and the plot one after the other."""
    return file_lock(os.path.join(output_dir, LOCK_NAME), blocking=True, what=output_dir)


def _save_npy(path: str, array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())


def perturbation_hits(model, images: Tensor, maps: Tensor, targets: Tensor, mean: Sequence[float],
                      std: Sequence[float], direction: str, steps: Sequence[float] = PERTURBATION_STEPS,
                      tie_break: str = DEFAULT_TIE_BREAK,
                      tie_seed: int = DEFAULT_TIE_SEED) -> Tuple[Tensor, Tensor, Tensor]:
    """Hits of one batch before and after each perturbation step.

    Parameters
    ----------
    model:
        Classifier taking normalised (B, C, H, W) images (logits, or a
        Hugging Face output holding them).
    images:
        (B, C, H, W) in [0, 1], on the model's device.
    maps:
        (B, h, w) relevance as stored (any scale); upsampled and normalised here.
    targets:
        (B,) ground-truth labels.
    mean, std:
        The model's input normalisation.
    direction:
        ``positive`` (remove the most relevant pixels first) or ``negative``.
    steps:
        The removed fractions p.
    tie_break, tie_seed:
        Order among pixels of equal relevance (:mod:`modules.ranking`):
        ``random`` (seeded), ``topk`` (the published ``torch.topk``, on the
        images' device) or ``raster``.

    Returns
    -------
    (hits0, hits, tied)
        (B,) bool: prediction == target on the unperturbed images; (S, B)
        bool: the same after removing ``int(H*W*p)`` pixels for each p;
        (S, B) float: share of the removed pixels that were tied with a kept
        pixel (:func:`modules.ranking.tied_share`: what the rule decided).
    """
    H, W = images.shape[-2:]
    vis = prepare_maps(maps.to(images.device), (H, W))
    removed = removal_masks(vis, direction, [pixels_to_remove(H, W, p) for p in steps], tie_break, tie_seed)
    flat = vis.flatten(1)
    with torch.no_grad():
        hits0 = model_logits(model, normalize_input(images, mean, std)).argmax(dim=-1) == targets
        hits, tied = [], []
        for mask in removed:
            perturbed = remove_masked(images, mask)
            hits.append(model_logits(model, normalize_input(perturbed, mean, std)).argmax(dim=-1) == targets)
            tied.append(tied_share(flat, mask))
    return hits0, torch.stack(hits), torch.stack(tied)


def check_index(index: np.ndarray, n_images: int, results_path: str) -> None:
    """Refuse image numbers outside the tree (never Python's wrap-around)."""
    if len(index) and (index.min() < 0 or index.max() >= n_images):
        raise InputError(f"{results_path}: dataset 'index' names images outside 0..{n_images - 1}")


def evaluate(model, results_path: str, images, mean: Sequence[float], std: Sequence[float], direction: str,
             batch_size: int, device: torch.device, num_workers: int = 0,
             input_size: Optional[Tuple[int, int]] = None, tie_break: str = DEFAULT_TIE_BREAK,
             tie_seed: int = DEFAULT_TIE_SEED) -> Dict:
    """Run :func:`perturbation_hits` over every row of ``results_path``.

    Returns a dict with ``model_hits`` (n,), ``perturbations_hits`` (S, n)
    (float, NaN for an image unreadable now, which is left out of the
    accuracies), ``tied`` (S, n) (share of tied removed pixels),
    ``accuracy`` (acc_0, acc_0.1, ..., acc_0.9), ``auc``, ``tied_share``
    (mean of ``tied`` per step), ``num_images`` and ``num_left_out``.
    """
    with h5py.File(results_path, "r") as f:
        index, target = f["index"][()], f["target"][()]
        if input_size is None:
            input_size = tuple(int(v) for v in f.attrs["input_size"])
        vis, vis_scale, vis_offset = f["vis"], f["vis_scale"][()], f["vis_offset"][()]
        n = len(index)
        check_index(index, len(images.samples), results_path)
        model_hits = np.full(n, np.nan)
        pert_hits = np.full((len(PERTURBATION_STEPS), n), np.nan)
        tied = np.full((len(PERTURBATION_STEPS), n), np.nan)
        starts = list(range(0, n, batch_size))
        dataset = RobustImageDataset(images, input_size)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[index[a:a + batch_size].tolist() for a in starts],
                                             num_workers=num_workers)
        with workers_ignore_sigint():  # Ctrl-C as the workers start: one line, no worker tracebacks
            batches = iter(loader)
        for a, (idx, batch, labels, errors) in tqdm(zip(starts, batches), total=len(starts), desc=direction):
            b = a + len(idx)
            if not np.array_equal(labels.numpy(), target[a:b]):
                raise InputError(f"labels of images {idx.tolist()} differ from those in {results_path}")
            ok = np.array([e == "" for e in errors], dtype=bool)
            for i in np.flatnonzero(~ok):
                tqdm.write(f"warning: left out unreadable image {images.samples[int(idx[i])][0]}: {errors[i]}",
                           file=sys.stderr)
            if not ok.any():
                continue
            keep = torch.from_numpy(ok)
            maps = torch.from_numpy(decode_maps(vis[a:b], vis_scale[a:b], vis_offset[a:b])[ok])
            h0, h, t = perturbation_hits(model, batch[keep].to(device), maps, labels[keep].to(device), mean, std,
                                         direction, tie_break=tie_break, tie_seed=tie_seed)
            rows = np.arange(a, b)[ok]
            model_hits[rows] = h0.cpu().numpy()
            pert_hits[:, rows] = h.cpu().numpy()
            tied[:, rows] = t.cpu().numpy()
    counted = ~np.isnan(model_hits)
    if not counted.any():
        raise InputError("no readable image to evaluate")
    accuracy = [float(model_hits[counted].mean())] + [float(v) for v in pert_hits[:, counted].mean(axis=1)]
    return {"model_hits": model_hits, "perturbations_hits": pert_hits, "tied": tied, "accuracy": accuracy,
            "auc": auc(accuracy, FRACTIONS), "tied_share": [float(v) for v in tied[:, counted].mean(axis=1)],
            "num_images": int(counted.sum()), "num_left_out": int((~counted).sum())}


#: Header keys that must agree for two directions to share one results.json.
SAME_RUN_KEYS: Tuple[str, ...] = ("maps", "tie_break", "tie_seed")


def update_results(output_dir: str, header: Dict, direction: str, result: Dict) -> Dict:
    """Add one direction's accuracies, AUC and tied shares to ``results.json``
    (written atomically under a unique temporary name); entries of other maps
    or of another tie rule or seed (another header) are dropped with a
    warning.  Concurrent runs must hold :func:`output_lock` around this
    read-modify-write (:func:`write_outputs` does)."""
    path = os.path.join(output_dir, JSON_NAME)
    data: Dict = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        differs = [k for k in SAME_RUN_KEYS if data.get(k) != header.get(k)]
        if differs:
            stale = [d for d in DIRECTIONS if d in data]
            if stale:
                what = "other maps" if "maps" in differs else \
                    f"another tie rule ({', '.join(f'{k} {data.get(k)!r}' for k in differs)})"
                tqdm.write(f"warning: {path} held results of {what}; dropping {', '.join(stale)}", file=sys.stderr)
            data = {}
    data.update(header)
    data["fractions"] = list(FRACTIONS)
    data[direction] = {"accuracy": result["accuracy"], "auc": result["auc"], "num_images": result["num_images"],
                       "num_left_out": result["num_left_out"], "tie_break": header.get("tie_break"),
                       "tie_seed": header.get("tie_seed"), "tied_share": result.get("tied_share"),
                       "device": header.get("device")}
    atomic_write_json(path, data)
    return data


def plot_results(data: Dict, path: str) -> str:
    """Accuracy (%) against the removed fraction, one line per direction run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for direction, style in zip(DIRECTIONS, ("o-", "s--")):
        if direction in data:
            r = data[direction]
            ax.plot(data["fractions"], [100 * a for a in r["accuracy"]], style,
                    label=f"{direction} (AUC {r['auc']:.2f})")
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{data.get('method_label', data.get('method'))} ({data.get('vis_class')}, "
                 f"ties: {data.get('tie_break')})")
    ax.set_xlim(0, max(FRACTIONS))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(output_dir: str, header: Dict, direction: str, result: Dict) -> Dict:
    """Write one direction's files under :func:`output_lock`: the per-image
    ``.npy`` arrays, results.json (:func:`update_results`) and the plot of
    every direction it then holds.  Returns the results.json contents."""
    os.makedirs(os.path.join(output_dir, direction), exist_ok=True)
    with output_lock(output_dir):
        for name, key in (("model_hits.npy", "model_hits"), ("perturbations_hits.npy", "perturbations_hits"),
                          ("tied_share.npy", "tied")):
            _save_npy(os.path.join(output_dir, direction, name), result[key])
        data = update_results(output_dir, header, direction, result)
        plot_results(data, os.path.join(output_dir, PLOT_NAME))
    return data


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y"):
        return True
    if value in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results", default=None,
                   help="results.hdf5 or its directory; None: outputs/perturbation/METHOD/VIS_CLASS, "
                        "as generate_visualizations.py writes it")
    p.add_argument("--method", default=None, choices=METHOD_CHOICES,
                   help="expected method of the maps (checked; locates the default --results)")
    p.add_argument("--vis-class", default=None, choices=("top", "target"),
                   help="expected vis-class of the maps (checked; locates the default --results)")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--pos", action="store_true", help="positive perturbation: remove the most relevant first")
    direction.add_argument("--neg", nargs="?", const=True, default=None, type=_bool,
                           help="negative perturbation: remove the least relevant first; the direction when neither "
                                "flag is given, as in the published script; '--neg false' means --pos")
    p.add_argument("--imagenet-validation-path", default=None,
                   help="the images; None: the tree recorded in results.hdf5 (must be the same images)")
    p.add_argument("--model", default=None,
                   help="architecture; None: the one recorded in results.hdf5 (an LRP copy: "
                        + ", ".join(sorted(MODEL_FACTORIES)) + "; " + UNMODIFIED_MODEL_HELP + ")")
    p.add_argument("--weights", default=None,
                   help="checkpoint or model directory; None: the one recorded (its hash must match)")
    p.add_argument("--batch-size", type=int_range(1, 4096), default=16, help="images per batch (1-4096)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--num-workers", type=int_range(0, 64), default=4, help="image-loading worker processes (0-64)")
    p.add_argument("--output-dir", default=None, help="where results go; None: the directory of results.hdf5")
    p.add_argument("--tie-break", default=DEFAULT_TIE_BREAK, choices=TIE_BREAKS,
                   help="order among pixels of equal relevance: random = a seeded permutation of the pixel "
                        "positions (the same on every device); topk = torch.topk as the published loop calls it "
                        "(on --device); raster = the top rows first")
    p.add_argument("--tie-seed", type=int, default=DEFAULT_TIE_SEED, help="seed of the random tie order")
    p.add_argument("--tf32", action="store_true",
                   help="allow TensorFloat-32 on CUDA (faster; predictions may then differ from the stored ones)")
    p.add_argument("--resume", action="store_true",
                   help="reuse this direction's finished results in --output-dir (same maps file, images, model and "
                        "tie rule; checked), or run it when a killed run left none")
    p.add_argument("--overwrite", action="store_true",
                   help="replace finished results in --output-dir (this direction's, and results.json entries of "
                        "other maps or another tie rule)")
    return p


def run(args: argparse.Namespace) -> Dict:
    """Evaluate one direction; returns the updated results.json contents."""
    direction = "positive" if args.pos or args.neg is False else "negative"
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, not {args.batch_size}")
    if args.tie_seed < 0:
        raise InputError(f"--tie-seed must be non-negative, not {args.tie_seed}")
    results = args.results
    if results is None:
        if args.method is None:
            raise InputError("give --results, or --method (and --vis-class) to find the default one")
        results = os.path.join("outputs", "perturbation", resolve_method(args.method).name, args.vis_class or "top")
    if os.path.isdir(results):
        results = os.path.join(results, RESULTS_NAME)
    identity, info = read_results(results)
    for key in ("method", "vis_class", "model", "weights_sha256", "dataset_sha256"):  # what this run reads
        if not isinstance(identity.get(key), str):
            raise InputError(f"{results}: identity_json field {key!r} must be a string, got {identity.get(key)!r}")
    if args.method is not None and resolve_method(args.method).name != identity["method"]:
        raise InputError(f"{results} holds maps of method {identity['method']!r}, not "
                         f"{resolve_method(args.method).name!r}")
    if args.vis_class is not None and args.vis_class != identity["vis_class"]:
        raise InputError(f"{results} holds maps of vis-class {identity['vis_class']!r}, not {args.vis_class!r}")

    images = open_image_tree(args.imagenet_validation_path or info["dataset_root"])
    from baselines.ViT.generate_visualizations import check_tree, content_sha256

    check_tree(images)  # a symlink loop would count images twice
    if images.sha256() != identity["dataset_sha256"]:
        raise InputError(f"{images.root} is not the image tree {results} was made from "
                         f"(its file list differs from {info.get('dataset_root')})")
    if "dataset_content_sha256" in identity and content_sha256(images) != identity["dataset_content_sha256"]:
        raise InputError(f"{images.root}: images changed since {results} was made (same names, other bytes); "
                         "make the maps again")
    weights = args.weights or info.get("weights")
    if weights is None or not os.path.exists(weights):
        raise InputError(f"weights {weights} not found; pass --weights")
    if str(identity["model"]).startswith(("timm:", "huggingface:")):  # an unmodified model
        model = _load_unmodified(args, identity, info, weights, results)
    else:
        if args.model is not None and args.model not in MODEL_FACTORIES:
            raise InputError(f"{results} holds maps of the LRP copy {identity['model']!r}, not of --model "
                             f"{args.model}; the copies: {', '.join(sorted(MODEL_FACTORIES))}")
        try:
            same = weights_sha256(weights) == identity["weights_sha256"]
        except CheckpointError as exc:
            raise InputError(str(exc)) from None
        if not same:
            raise InputError(f"{weights} is not the model {results} was made with (weights hash differs)")
        name = args.model or (identity["model"] if identity["model"] in MODEL_FACTORIES else "vit_base_patch16_224")
        try:
            model = load_model(name, weights)
        except CheckpointError as exc:
            raise InputError(str(exc)) from None
    set_tf32(args.tf32)
    try:
        device = resolve_device(args.device)  # one-line refusals: meta, absent CUDA/MPS, unknown names
        model = model.to(device).eval()
    except RuntimeError as exc:
        raise InputError(f"device {args.device!r}: {exc}".splitlines()[0]) from None

    with h5py.File(results, "r") as f:  # before the run folder records anything
        check_index(f["index"][()], len(images.samples), results)
    out = args.output_dir or os.path.dirname(os.path.abspath(results))
    folder = os.path.join(out, direction)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--output-dir {out}: cannot create {folder} ({exc.strerror or exc})") from None
    tie_seed = args.tie_seed if args.tie_break == "random" else None
    header = {"method": identity["method"], "method_label": info.get("method_label", identity["method"]),
              "vis_class": identity["vis_class"], "model": identity["model"], "results_hdf5": os.path.abspath(results),
              "maps": identity, "tie_break": args.tie_break, "tie_seed": tie_seed, "device": device.type}
    # the run folder (issue 27): one run of a direction at a time (--pos and --neg may run together), its
    # identity (the maps file's bytes, which hold the model's and the images' hashes, and the tie rule)
    # recorded and checked on --resume, finished results never replaced without --overwrite
    run_identity = {"direction": direction, "maps": identity, "results_sha256": files_sha256([results]),
                    "tie_break": args.tie_break, "tie_seed": tie_seed}
    with file_lock(folder, what=f"--output-dir {out} ({direction})"):
        _check_shared_results(out, header, direction, args.overwrite)
        reuse = prepare_run_folder(folder, run_identity, resume=args.resume, overwrite=args.overwrite,
                                   finished=("perturbations_hits.npy", "model_hits.npy"), partial=(),
                                   flag="--output-dir")
        if reuse:
            data = _finished_results(out, header, direction)
            if data is not None:
                print(f"{identity['method']} {identity['vis_class']} {direction}: reusing the finished results "
                      f"in {out} (same maps, images, model and tie rule): AUC {data[direction]['auc']:.2f}")
                return data
        result = evaluate(model, results, images, identity["mean"], identity["std"], direction, args.batch_size,
                          device, args.num_workers, tuple(identity["input_size"]), args.tie_break, args.tie_seed)
        data = write_outputs(out, header, direction, result)
    acc = " ".join(f"{100 * a:.1f}" for a in result["accuracy"])
    tied = max(result["tied_share"])
    print(f"{identity['method']} {identity['vis_class']} {direction}: accuracy (%) at p=0..0.9: {acc}; "
          f"AUC {result['auc']:.2f} over {result['num_images']} images (ties: {args.tie_break}, "
          f"at most {100 * tied:.1f}% of the removed pixels tied)")
    return data


def _read_json_dict(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_shared_results(out: str, header: Dict, direction: str, overwrite: bool) -> None:
    """Refuse, before any work, to drop the other direction's finished entry
    of results.json made from other maps or under another tie rule (what
    :func:`update_results` would do) unless ``overwrite``."""
    path = os.path.join(out, JSON_NAME)
    data = _read_json_dict(path) if os.path.isfile(path) else {}
    if data is None:
        if not overwrite:
            raise InputError(f"{path}: unreadable; pass --overwrite to replace it")
        return
    differs = [k for k in SAME_RUN_KEYS if data.get(k) != header.get(k)]
    stale = [d for d in DIRECTIONS if d in data and d != direction]
    if differs and stale and not overwrite:
        what = "other maps" if "maps" in differs else \
            f"another tie rule ({', '.join(f'{k} {data.get(k)!r}' for k in differs)})"
        raise InputError(f"--output-dir {out} holds {', '.join(stale)} results of {what} in {JSON_NAME}; pass "
                         "--overwrite to replace them or use another --output-dir")


def _finished_results(out: str, header: Dict, direction: str) -> Optional[Dict]:
    """results.json when it holds ``direction`` of these maps under this tie
    rule (a run to reuse), else None."""
    data = _read_json_dict(os.path.join(out, JSON_NAME))
    if data is None or direction not in data or any(data.get(k) != header.get(k) for k in SAME_RUN_KEYS):
        return None
    return data


def _load_unmodified(args: argparse.Namespace, identity: Dict, info: Dict, weights: str, results: str):
    """The unmodified model the maps were made with: ``--model`` or the
    recorded source, ``--weights`` or the recorded weights (a directory
    stands for the model itself); refused unless it is the same model
    (architecture and weights hash)."""
    source = args.model or info.get("model_source")
    if not isinstance(source, str) or not source or source == "-1":
        raise InputError(f"{results} does not record which {identity['model']} model made it; pass --model")
    got = load_unmodified_image_classifier(source, weights, require_weights=False)
    if got.name != identity["model"] or got.weights_sha256 != identity["weights_sha256"]:
        raise InputError(f"{got.source} is not the model {results} was made with "
                         + ("(weights hash differs)" if got.name == identity["model"]
                            else f"({got.name}, the maps: {identity['model']})"))
    return got.model


def _main(argv: Optional[List[str]]) -> int:
    run(build_parser().parse_args(argv))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; bad input exits with status 2 and one line,
    Ctrl-C with 130 and one line (:func:`modules.cli.run_main`)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
