"""Explain every image of a validation tree and store the relevance maps in
HDF5, for the perturbation test (../shared/METHODS.md section 5).

    python baselines/ViT/generate_visualizations.py --method transformer_attribution \\
        --imagenet-validation-path /data/imagenet/val --weights vit_base_patch16_224.safetensors

``--model`` may also name an unmodified model - a timm name with a local
checkpoint, or a local Hugging Face image-classifier directory - explained
through the LRP scope with any method it supports, fed at its own input size
(resized, no crop) with its own mean/std from its config::

    python baselines/ViT/generate_visualizations.py --method attnlrp --imagenet-validation-path /data/imagenet/val \\
        --model timm:vit_base_patch16_224 --weights vit_base_patch16_224.augreg.safetensors

writes ``results.hdf5`` in ``--output-dir``: per readable image its dataset
index, ground-truth label, predicted label and relevance map as ``explain``
returns it (patch grid; pixels for ``lrp``), as float16 ``vis`` times a float32
``vis_scale`` plus a float32 ``vis_offset`` per row, with attributes naming method, model, weights hash and
vis-class.  Images are not copied.

Killed at any moment, the same command continues after the last committed
batch; Ctrl-C exits 130 keeping the committed batches.  The identity of a
run includes a hash of every image file's bytes (``dataset_content_sha256``),
so images replaced under the same names are not mixed with old maps; a tree
that reaches one folder by two paths (a symlink loop) is refused, and so
are NaN/Inf logits or maps.  Under ``torchrun --nproc_per_node=N`` each process explains every
N-th batch into ``results.part{rank}of{N}.hdf5``; rank 0 merges them at the
end (or run again with ``--merge``), giving the same file as one process.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # Ctrl-C while torch and the models import: one line, exit 130 (issue 27 item 6)
    from modules.cli import quiet_ctrl_c_while_importing
    quiet_ctrl_c_while_importing()

from datetime import timedelta
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from baselines.ViT.perturbation_data import (RESULTS_NAME, InputError, PartFile, RobustImageDataset, find_parts,
                                             identity_mismatch, merge_parts, open_image_tree, part_path,
                                             read_results, set_tf32, weights_sha256)
from baselines.ViT.perturbation_metrics import eval_start_layer, normalize_input, select_positions
from baselines.ViT.ViT_explanation_generator import explain
from baselines.ViT.ViT_LRP import MODEL_FACTORIES, CheckpointError, load_model
from modules import cli
from modules.checkpoints import read_model_config
from modules.generic import (UNMODIFIED_MODEL_HELP, load_unmodified_image_classifier, model_logits,
                             names_unmodified_model, require_methods)
from modules.methods import METHOD_CHOICES, UnknownMethodError, resolve_method

__all__ = ["build_parser", "main", "run", "default_output_dir", "check_tree", "content_sha256"]

PROCESS_KEYS = ("batch_size", "rank", "world_size")  # identity of a part file only


def default_output_dir(method: str, vis_class: str) -> str:
    """``outputs/perturbation/<method>/<vis-class>`` (canonical method name)."""
    return os.path.join("outputs", "perturbation", resolve_method(method).name, vis_class)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="transformer_attribution", choices=METHOD_CHOICES,
                   help="explanation method (one the model supports)")
    p.add_argument("--imagenet-validation-path", required=True,
                   help="validation images: an ImageFolder tree (root/<class>/<image>) or a torchvision "
                        "ImageNet root (meta.bin and val/)")
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="an LRP copy: " + ", ".join(sorted(MODEL_FACTORIES)) + " (ignored when --weights is a "
                        "model directory with config.json; its mean/std); " + UNMODIFIED_MODEL_HELP
                        + "; images resized (no crop) to that input size")
    p.add_argument("--weights", default=None,
                   help="checkpoint (.safetensors/.pth/.pt) or model directory (config.json + model.safetensors); "
                        "needed for the copies and timm names, optional for a Hugging Face directory")
    p.add_argument("--vis-class", default="top", choices=("top", "target"),
                   help="explain the predicted class (top) or the ground-truth class (target)")
    p.add_argument("--start-layer", type=cli.non_negative_int, default=None,
                   help="first block of the rollout; None: 1 for transformer_attribution and rollout, else 0")
    p.add_argument("--batch-size", type=cli.int_range(1, 4096), default=16,
                   help="images per batch (also the unit of resumption)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; under torchrun 'cuda' means cuda:LOCAL_RANK")
    p.add_argument("--num-workers", type=cli.int_range(0, 64), default=4, help="image-loading worker processes")
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="explain only this many images, evenly spaced over the dataset; None: all")
    p.add_argument("--output-dir", default=None,
                   help="where results.hdf5 goes; None: outputs/perturbation/METHOD/VIS_CLASS")
    p.add_argument("--tf32", action="store_true",
                   help="allow TensorFloat-32 on CUDA (faster, but LRP-based maps drift far from float32)")
    p.add_argument("--merge", action="store_true",
                   help="only merge the complete part files in --output-dir into results.hdf5")
    return p


def _dist_env() -> tuple:
    """(rank, world size, local rank) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _init_distributed() -> None:
    """The process group, only for barriers: gloo works on CPU and GPU alike;
    the long timeout lets a rank that resumed with little left wait for the others."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))


def _barrier() -> None:
    torch.distributed.barrier()


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def check_tree(images) -> None:
    """Refuse a tree that reaches one folder by two paths: a class folder
    holding a symlink to itself (or to a sibling) would multiply its images."""
    seen = {}
    for path, _ in images.samples:
        folder = os.path.dirname(path)
        real = os.path.realpath(folder)
        first = seen.setdefault(real, folder)
        if first != folder:
            raise InputError(f"{images.root} reaches the folder {real} by two paths ({first} and {folder}): "
                             "a symlink loop or a linked duplicate would count its images twice")


def content_sha256(images) -> str:
    """SHA-256 over every image's relative path, label and file bytes: the
    maps depend on the pixels, not only on the names."""
    import hashlib
    h = hashlib.sha256()
    for path, label in tqdm(images.samples, desc="hashing images", leave=False, disable=len(images.samples) < 1000):
        fh = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    fh.update(block)
        except OSError as exc:  # unreadable files are skipped later; their state is part of the identity
            fh.update(f"unreadable: {exc.strerror}".encode())
        h.update(f"{os.path.relpath(path, images.root)}\t{label}\t{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def _read_final(final: str):
    """:func:`read_results` with malformed metadata (bad JSON, not an object)
    reported in one line."""
    try:
        found, info = read_results(final)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{final}: malformed metadata ({cli.one_line(exc)}); delete it to regenerate") from None
    if not isinstance(found, dict):
        raise InputError(f"{final}: malformed metadata (identity is not a JSON object); delete it to regenerate")
    return found, info


def _open_part(path: str, identity: dict, batches, map_shape) -> PartFile:
    """:meth:`PartFile.open_or_create`, with a structurally broken part file
    (missing datasets, short arrays, offsets out of range, bad JSON) reported
    in one line."""
    def broken(why: str) -> InputError:
        return InputError(f"{path}: damaged part file ({why}); delete it to start this part over")
    try:
        part = PartFile.open_or_create(path, identity, batches, map_shape)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        if isinstance(exc, InputError):
            raise
        raise broken(cli.one_line(exc)) from None
    try:
        offsets, done, f = np.asarray(part.offsets), np.asarray(part.done), part.f
        n = len(f["index"])
        if offsets.ndim != 1 or len(offsets) != len(done) + 1 or len(done) != len(batches):
            raise ValueError(f"{len(done)} batch flags and {len(offsets)} offsets for {len(batches)} batches")
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise ValueError("batch offsets out of range")
        for name in ("target", "pred", "valid", "vis", "vis_scale", "vis_offset"):
            if len(f[name]) != n:
                raise ValueError(f"dataset {name!r} has {len(f[name])} rows, expected {n}")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        part.close()
        raise broken(cli.one_line(exc)) from None
    return part


def run(args: argparse.Namespace) -> int:
    """Generate (or merge) the maps; returns the exit status.  A single-process
    run holds a lock on its output folder: a second run into it is refused in
    one line (under torchrun the ranks share the folder, each its own part file)."""
    if _dist_env()[1] > 1:
        return _run(args)
    output_dir = args.output_dir or default_output_dir(resolve_method(args.method).name, args.vis_class)
    if not args.merge:
        cli.check_output_dir(output_dir, flag="--output-dir")  # before any work; creates it
    if os.path.isdir(output_dir):
        with cli.file_lock(output_dir, what=output_dir):
            return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be positive, not {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be positive, not {args.limit}")
    if args.num_workers < 0:
        raise InputError(f"--num-workers must be >= 0, not {args.num_workers}")
    method = resolve_method(args.method)
    rank, world, local_rank = _dist_env()
    output_dir = args.output_dir or default_output_dir(method.name, args.vis_class)

    images = open_image_tree(args.imagenet_validation_path)
    check_tree(images)
    if not args.merge:
        cli.resolve_device(args.device)
        cli.check_output_dir(output_dir, flag="--output-dir")
    unmodified = None
    if names_unmodified_model(args.model, args.weights, MODEL_FACTORIES):
        unmodified = load_unmodified_image_classifier(args.model, args.weights)
        if rank == 0:
            _say(unmodified.description)
        model, sha = unmodified.model, unmodified.weights_sha256
        require_methods(model, [method.name])
        H, W = unmodified.input_size
        depth, num_classes, architecture = unmodified.depth(), unmodified.num_classes, unmodified.name
        mean, std = unmodified.mean, unmodified.std
    else:
        if args.weights is None:
            raise InputError(f"--model {args.model} (an LRP copy) needs --weights: a local checkpoint file or "
                             "model directory; nothing is downloaded")
        try:
            sha = weights_sha256(args.weights)
            if os.path.isdir(args.weights):
                read_model_config(args.weights)  # strings where numbers belong: one line
            model = load_model(args.model, args.weights)
        except CheckpointError as exc:
            raise InputError(str(exc)) from None
        cfg = model.default_cfg
        H, W = (int(v) for v in cfg["input_size"][-2:])
        ph, pw = model.patch_embed.patch_size
        if H % ph or W % pw:
            raise InputError(f"input size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
        depth, num_classes = len(model.blocks), int(model.num_classes)
        architecture = str(cfg.get("architecture", args.model))
        mean, std = cfg["mean"], cfg["std"]
    if args.start_layer is None:
        start_layer = min(eval_start_layer(method.name), depth - 1)
    else:
        start_layer = args.start_layer
    if not 0 <= start_layer < depth:
        raise InputError(f"--start-layer {start_layer} outside 0..{depth - 1} for a model of {depth} blocks")
    if len(images.classes) > num_classes:
        raise InputError(f"{images.root} has {len(images.classes)} classes but the model only {num_classes}")
    if unmodified is not None:  # the model's own grid (Swin: its finest), or pixels
        map_shape = unmodified.map_shape(method.name, start_layer)
    else:
        map_shape = (H, W) if method.to_input else (H // ph, W // pw)

    identity = {
        "method": method.name,
        "model": architecture,
        "weights_sha256": sha,
        "vis_class": args.vis_class,
        "start_layer": int(start_layer),
        "dataset_sha256": images.sha256(),
        "dataset_content_sha256": content_sha256(images),
        "dataset_size": len(images.samples),
        "limit": args.limit,
        "input_size": [H, W],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "map_shape": list(map_shape),
        "tf32": bool(args.tf32),
    }
    info = {"method_label": method.label, "weights": os.path.abspath(args.weights or args.model),
            "dataset_root": images.root, "num_classes": int(num_classes)}
    if unmodified is not None:  # what perturbation_eval.py loads again
        info["model_source"] = unmodified.source
    final = os.path.join(output_dir, RESULTS_NAME)

    if os.path.exists(final):
        found, _ = _read_final(final)
        diff = identity_mismatch(found, identity)
        if diff:
            raise InputError(f"{final} was written with other arguments ({'; '.join(diff)}); "
                             "use another --output-dir or delete it")
        if rank == 0:
            _say(f"{final} is already complete with these arguments; nothing to do")
        return 0

    if args.merge:
        if rank == 0:
            _merge_existing(output_dir, final, identity, info, images)
        return 0

    os.makedirs(output_dir, exist_ok=True)
    positions = select_positions(len(images.samples), args.limit)
    all_batches = [positions[i:i + args.batch_size] for i in range(0, len(positions), args.batch_size)]
    mine = all_batches[rank::world]
    for other, paths in find_parts(output_dir).items():
        if other != world and rank == 0:
            _say(f"warning: ignoring {len(paths)} part file(s) of a {other}-process run in {output_dir}")

    if world > 1:
        _init_distributed()
    set_tf32(args.tf32)
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None and world > 1:  # one GPU per local rank
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        model = model.to(device).eval()
    except RuntimeError as exc:
        raise InputError(f"device {args.device!r}: {exc}".splitlines()[0]) from None
    part_identity = dict(identity, batch_size=args.batch_size, rank=rank, world_size=world)
    with _open_part(part_path(output_dir, rank, world), part_identity, mine, map_shape) as part:
        pending = part.pending()
        if len(pending) < part.num_batches:
            _say(f"resuming {part.path}: {part.num_batches - len(pending)} of {part.num_batches} batches "
                 "already done")
        _explain_batches(part, pending, model, images, identity, start_layer, device, args, rank)

    if world > 1:
        _barrier()
    if rank == 0:
        summary = merge_parts([part_path(output_dir, r, world) for r in range(world)], final, identity, info,
                              images.samples)
        for r in range(world):
            os.remove(part_path(output_dir, r, world))
        _say(f"wrote {final}: {summary['num_images']} images"
             + (f", {summary['num_skipped']} unreadable skipped" if summary["num_skipped"] else ""))
    return 0


def _explain_batches(part: PartFile, pending: List[int], model, images, identity: dict, start_layer: int,
                     device: torch.device, args: argparse.Namespace, rank: int) -> None:
    """Explain and commit each pending batch of ``part``."""
    if not pending:
        return
    dataset = RobustImageDataset(images, identity["input_size"])
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[part.batch_index(j).tolist() for j in pending],
                                         num_workers=args.num_workers)
    map_shape = tuple(identity["map_shape"])
    with cli.workers_ignore_sigint():  # Ctrl-C as the workers start: one line from here, no worker tracebacks
        batches = iter(loader)
    for j, (index, batch, labels, errors) in tqdm(zip(pending, batches), total=len(pending), disable=rank != 0,
                                                  desc=f"{identity['method']} ({identity['vis_class']})"):
        ok = np.array([e == "" for e in errors], dtype=bool)
        for i in np.flatnonzero(~ok):
            _say(f"warning: skipped unreadable image {images.samples[int(index[i])][0]}: {errors[i]}")
        n = len(ok)
        maps = np.zeros((n, *map_shape), dtype=np.float32)
        pred = np.full(n, -1, dtype=np.int64)
        if ok.any():
            keep = torch.from_numpy(ok)
            x = normalize_input(batch[keep].to(device), identity["mean"], identity["std"])
            with torch.no_grad():
                predicted = cli.check_finite(model_logits(model, x), "the model's logits").argmax(dim=-1)
            explained = predicted if args.vis_class == "top" else labels[keep].to(device)
            cam = explain(model, x, identity["method"], index=explained, start_layer=start_layer)
            cli.check_finite(cam, f"{identity['method']} maps of images {index[keep].tolist()}")
            if tuple(cam.shape[1:]) != map_shape:
                raise RuntimeError(f"explain returned maps of {tuple(cam.shape[1:])}, expected {map_shape}")
            maps[ok] = cam.float().cpu().numpy()
            pred[ok] = predicted.cpu().numpy()
        part.commit(j, labels.numpy().astype(np.int64), pred, ok.astype(np.uint8), maps)


def _merge_existing(output_dir: str, final: str, identity: dict, info: dict, images) -> None:
    groups = find_parts(output_dir)
    if not groups:
        raise InputError(f"no part files (results.partRofN.hdf5) in {output_dir}; nothing to merge")
    complete = {w: p for w, p in groups.items() if len(p) == w}
    if not complete:
        w, p = next(iter(groups.items()))
        raise InputError(f"{output_dir} holds {len(p)} of the {w} part files of a {w}-process run; "
                         "rerun that run to finish them")
    world = max(complete)
    summary = merge_parts(complete[world], final, identity, info, images.samples)
    for path in complete[world]:
        os.remove(path)
    _say(f"wrote {final}: {summary['num_images']} images from {world} part files"
         + (f", {summary['num_skipped']} unreadable skipped" if summary["num_skipped"] else ""))


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; bad input exits with status 2 and one line,
    Ctrl-C with 130 (the committed batches are kept: run again to continue)."""
    def body(a):
        parser = build_parser()
        args = parser.parse_args(a)
        return run(args)
    return cli.run_main(body, argv, interrupt_message="interrupted; the committed batches are kept, run the same "
                                                      "command again to continue")


if __name__ == "__main__":
    sys.exit(main())
