"""Offline demo of the segmentation test on the synthetic stand-in (no network, no GPU).

1. writes the stand-in's validation split under ``<out-dir>/data/`` if it is
   not there yet (``val_gtsegs.mat`` in the gtsegs_ijcv.mat layout and a
   ``val/`` ImageFolder tree), at the model's input size;
2. loads the shipped model ``samples/synthetic_vit`` (or trains one into
   ``<out-dir>/synthetic_vit`` when it is missing: minutes on a CPU);
3. runs ``imagenet_seg_eval.py --all-methods`` on it, prints the table and
   writes results and overlay grids (every method side by side, ground-truth
   outline drawn) under ``<out-dir>/segmentation/``.

This is the stand-in, not ImageNet: the numbers say how well each method
finds a known object, for a small ViT trained on synthetic shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from baselines.ViT import imagenet_seg_eval
from baselines.ViT.train_synthetic import DEFAULT_SAMPLE_DIR, is_model_dir, load_synthetic_model
from modules import cli
from data.synthetic import GENERATOR_VERSION, write_gtsegs_mat, write_imagefolder

__all__ = ["prepare_data", "build_parser", "main"]


def _mat_matches(path: str, n: int, seed: int, size: int) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: json.loads(v) for k, v in f["synthetic"].attrs.items()}
    except (OSError, KeyError, ValueError):
        return False
    return (attrs.get("n"), attrs.get("seed"), attrs.get("size"), attrs.get("generator_version")) == \
        (n, seed, size, GENERATOR_VERSION)


def prepare_data(root: str, n: int, seed: int = 0, size: int = 96, imagefolder: bool = True) -> str:
    """Make sure ``root/val_gtsegs.mat`` (and ``root/val/``) hold the ``n``
    validation images of ``seed`` at ``size``; (re)writes what is missing or
    stale.  Returns the ``.mat`` path."""
    mat = os.path.join(root, "val_gtsegs.mat")
    if not _mat_matches(mat, n, seed, size):
        print(f"writing {n} stand-in images ({size}x{size}, seed {seed}) to {mat}")
        write_gtsegs_mat(mat, n, seed=seed, size=size, split="val")
    folder = os.path.join(root, "val")
    if imagefolder:
        manifest = os.path.join(folder, "manifest.json")
        current = None
        if os.path.isfile(manifest):
            with open(manifest) as fh:
                m = json.load(fh)
            current = (m.get("n"), m.get("seed"), m.get("size"), m.get("generator_version"))
        if current != (n, seed, size, GENERATOR_VERSION):
            write_imagefolder(folder, n, seed=seed, size=size, split="val")
    return mat


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Segmentation test of every method on the offline synthetic stand-in.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join("outputs", "demo"), help="where data and results go")
    p.add_argument("--weights", default=None,
                   help="model folder (model.safetensors + config.json); default: the shipped "
                        f"{os.path.relpath(DEFAULT_SAMPLE_DIR)}, or one trained into <out-dir>/synthetic_vit "
                        "when that is missing")
    p.add_argument("--n-images", type=cli.int_range(1, 100_000), default=400, help="stand-in validation images")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 31 - 1), default=0, help="seed of the stand-in images")
    p.add_argument("--batch-size", type=cli.int_range(1, 4096), default=32, help="images per batch")
    p.add_argument("--num-overlays", type=cli.int_range(0, 1000), default=6, help="images in the overlay grid")
    cli.add_threads_arg(p, default=2)
    p.add_argument("--device", default="cpu", help="torch device (the demo is sized for a CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.resolve_device(args.device)
    if args.weights is not None and not is_model_dir(args.weights):  # a model named but unusable: never train over it
        raise cli.CLIError(f"--weights {args.weights}: not a model folder (model.safetensors + config.json with "
                           "model_kwargs)")
    cli.check_output_dir(args.out_dir, flag="--out-dir")
    cli.apply_threads(args.threads)
    weights = args.weights if args.weights is not None else DEFAULT_SAMPLE_DIR
    if not is_model_dir(weights):
        weights = os.path.join(args.out_dir, "synthetic_vit")
        if not is_model_dir(weights):
            print(f"no model at {DEFAULT_SAMPLE_DIR}: training one into {weights} (a few minutes on a CPU)")
            from baselines.ViT import train_synthetic

            code = train_synthetic.main(["--out-dir", weights, "--device", args.device, "--threads",
                                         str(args.threads)])
            if code not in (0, 1):  # 1: trained, below --min-accuracy (still saved)
                return code
    size = int(load_synthetic_model(weights).default_cfg["input_size"][-1])
    mat = prepare_data(os.path.join(args.out_dir, "data"), args.n_images, args.seed, size)
    print("This is the synthetic stand-in, not ImageNet.")
    imagenet_seg_eval.main([
        "--imagenet-seg-path", mat, "--weights", weights, "--all-methods",
        "--output-dir", os.path.join(args.out_dir, "segmentation"), "--batch-size", str(args.batch_size),
        "--device", args.device, "--num-overlays", str(args.num_overlays), "--threads", str(args.threads),
        "--overwrite",  # the demo owns its output folder: a rerun with other --n-images replaces it
        *(["--quiet"] if args.quiet else [])])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input exits 2 with one line (:func:`modules.cli.run_main`)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
