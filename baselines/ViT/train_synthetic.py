"""Train a small ViT on the synthetic shapes stand-in, and load it back.

The model is our :class:`~baselines.ViT.ViT_LRP.VisionTransformer` (default
96x96 input, patch 8, 4 blocks of width 96, 4 heads), trained from scratch on
the CPU on images of :mod:`data.synthetic`: a pool of 20,480 training
images is generated once and each step draws 32 of them at random, each
under a random rotation by a multiple of 90 degrees and mirroring; AdamW with
warm-up and cosine decay, label smoothing, a 2-D sine-cosine start for the
position embedding.  Everything is seeded, so the same command on the same
software (and thread count) reproduces ``samples/synthetic_vit``::

    python baselines/ViT/train_synthetic.py --out-dir samples/synthetic_vit

A model folder holds ``model.safetensors`` and ``config.json`` (constructor
arguments, mean/std, class names, how it was trained, its validation
accuracy); :func:`load_synthetic_model` rebuilds the model from either path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from baselines.ViT.ViT_LRP import CONFIG_NAME, WEIGHTS_NAME, VisionTransformer, load_model_dir, save_model_dir
from modules import cli
from modules.checkpoints import file_sha256, read_model_config
from modules.training import command_line, eval_due, set_lr, track_loss, warmup_cosine_lr
from data.synthetic import CLASS_NAMES, GENERATOR_VERSION, SyntheticShapes

__all__ = ["CONFIG_FORMAT", "MODEL_FILE", "CONFIG_FILE", "DEFAULT_SAMPLE_DIR", "model_kwargs_from_args",
           "is_model_dir", "load_synthetic_model", "save_model", "evaluate_accuracy", "train", "main"]

CONFIG_FORMAT = "transformer-explainability/vit-config/1"
MODEL_FILE = WEIGHTS_NAME
CONFIG_FILE = CONFIG_NAME
DEFAULT_SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "samples", "synthetic_vit")
HALF = (0.5, 0.5, 0.5)


def _model_folder(path: str) -> str:
    """The folder of a model given as the folder or as its weights file."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def is_model_dir(path: str) -> bool:
    """True when ``path`` is a model folder (or the ``model.safetensors`` in
    one) whose ``config.json`` holds the constructor arguments."""
    if not os.path.isdir(path) and os.path.basename(path) != MODEL_FILE:
        return False
    cfg = os.path.join(_model_folder(path), CONFIG_FILE)
    try:
        with open(cfg) as fh:
            return isinstance(json.load(fh).get("model_kwargs"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def load_synthetic_model(path: str, device: str = "cpu") -> VisionTransformer:
    """Rebuild a saved model from its folder (or its ``model.safetensors``)
    with :func:`~baselines.ViT.ViT_LRP.load_model_dir`.

    The model is in eval mode, in float32 (even when stored in float16), and
    carries ``default_cfg`` (``input_size``, ``mean``, ``std``, plus
    ``class_names``) like the factory models.  Raises
    :class:`~baselines.ViT.ViT_LRP.CheckpointError` naming the file and what
    is wrong.
    """
    folder = _model_folder(path)
    read_model_config(folder)  # strings or absurd numbers in config.json: one-line CheckpointError
    model = load_model_dir(folder)
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as fh:
            names = json.load(fh).get("class_names", ())
    except (OSError, ValueError, AttributeError):
        names = ()
    model.default_cfg = dict(model.default_cfg, class_names=tuple(names))
    return model.to(device).eval()


def save_model(model: VisionTransformer, out_dir: str, config: Dict, fp16: bool = False) -> Tuple[str, str]:
    """Write the model folder with :func:`~baselines.ViT.ViT_LRP.save_model_dir`
    (float16 storage with ``fp16``); ``config.json`` also gets ``config``,
    a format tag and the weights' sha256."""
    import shutil
    import tempfile

    model.default_cfg = {"architecture": config.get("architecture", "synthetic_vit"),
                         "mean": tuple(config.get("mean", HALF)), "std": tuple(config.get("std", HALF))}
    os.makedirs(out_dir, exist_ok=True)
    # both files are written in a temporary folder beside them, then each is renamed into place:
    # a kill leaves the previous model (or none), never a truncated file
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".model.", suffix=".tmp")
    try:
        save_model_dir(model, tmp, extra=dict(config, format=CONFIG_FORMAT), half=fp16)
        with open(os.path.join(tmp, CONFIG_FILE)) as fh:
            written = json.load(fh)
        written.update(weights_sha256=file_sha256(os.path.join(tmp, MODEL_FILE)),
                       weights_dtype="float16" if fp16 else "float32")
        with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
            json.dump(written, fh, indent=2)
            fh.write("\n")
        weights, cfg_path = os.path.join(out_dir, MODEL_FILE), os.path.join(out_dir, CONFIG_FILE)
        os.replace(os.path.join(tmp, MODEL_FILE), weights)
        os.replace(os.path.join(tmp, CONFIG_FILE), cfg_path)  # config last: it names the weights' sha256
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return weights, cfg_path


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader, device: str) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` ((image, label) batches)."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=-1).cpu()
        correct += int((pred == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def model_kwargs_from_args(args: argparse.Namespace) -> Dict:
    return dict(img_size=args.size, patch_size=args.patch_size, in_chans=3, num_classes=len(CLASS_NAMES),
                embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio,
                qkv_bias=True, distilled=False)


class _RawShapes(SyntheticShapes):
    """Generated samples as uint8 (3, H, W) tensors (for the training pool)."""

    def __getitem__(self, i: int):
        from data.synthetic import generate_sample

        s = generate_sample(self.start + i, self.seed, self.size, self.split)
        return torch.from_numpy(s.image.transpose(2, 0, 1).copy()), s.label


def make_pool(n: int, seed: int, size: int, num_workers: int = 0, quiet: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of the ``train`` split: uint8 (n, 3, H, W) and labels (n,)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(_RawShapes(n, seed=seed, size=size, split="train"), batch_size=256, shuffle=False,
                        num_workers=num_workers)
    xs, ys = [], []
    for x, y in tqdm(loader, desc="generating training images", disable=quiet, leave=False):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-sample symmetry of the square: sample b is rotated by 90 * (k[b] % 4)
    degrees and mirrored when k[b] >= 4 (every shape class is closed under these)."""
    out = x.clone()
    for v in range(8):
        sel = (k == v).nonzero(as_tuple=True)[0]
        if sel.numel():
            y = torch.rot90(x[sel], v % 4, dims=(-2, -1))
            out[sel] = torch.flip(y, dims=(-1,)) if v >= 4 else y
    return out


def _pool_batches(pool_x: torch.Tensor, pool_y: torch.Tensor, steps: int, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, pool_x.shape[0], (batch_size,), generator=g)
        k = torch.randint(0, 8, (batch_size,), generator=g)
        x = (pool_x[idx].float() / 255.0 - 0.5) / 0.5  # mean = std = 0.5
        yield dihedral(x, k), pool_y[idx]


def sincos_pos_embed(grid: Tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code (MAE), (gh*gw, dim): half the
    channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"embedding width {dim} is not a multiple of 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        ang = pos[:, None] * omega[None]
        parts += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(parts, dim=1).float()


def train(args: argparse.Namespace) -> Tuple[VisionTransformer, Dict]:
    """Train from scratch as ``args`` says; returns the model (eval mode) and
    a record of the run (losses, accuracies, seconds).

    With ``--pool-size N`` the first N training images are generated once
    and batches are drawn from them at random (seeded), each image under a
    random rotation by a multiple of 90 degrees and mirroring; with 0 every
    step gets new images.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model = VisionTransformer(**model_kwargs_from_args(args))
    if args.sincos_init:  # start from a 2-D position code (learned afterwards)
        with torch.no_grad():
            model.pos_embed[0, model.num_prefix_tokens:] = sincos_pos_embed(model.patch_embed.grid_size,
                                                                            model.embed_dim)
    model = model.to(args.device)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    val_set = SyntheticShapes(args.n_val, seed=args.data_seed, size=args.size, split="val", mean=HALF, std=HALF)
    val_loader = DataLoader(val_set, batch_size=100, shuffle=False, num_workers=0)
    history: Dict = {"loss": [], "val_accuracy": {}}
    start = time.time()
    if args.pool_size:
        pool_x, pool_y = make_pool(args.pool_size, args.data_seed, args.size, args.num_workers, args.quiet)
        history["pool_seconds"] = round(time.time() - start, 1)
        batches = _pool_batches(pool_x, pool_y, args.steps, args.batch_size, args.seed + 1)
    else:
        train_set = SyntheticShapes(args.steps * args.batch_size, seed=args.data_seed, size=args.size,
                                    split="train", mean=HALF, std=HALF)
        batches = DataLoader(train_set, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                             drop_last=True)
    model.train()
    bar = tqdm(batches, total=args.steps, desc="training", disable=args.quiet)
    running = None
    for step, (x, y) in enumerate(bar):
        set_lr(opt, warmup_cosine_lr(step, args.lr, args.warmup, args.steps, cosine_after_warmup=True))
        loss = F.cross_entropy(model(x.to(args.device)), y.to(args.device), label_smoothing=args.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            raise cli.NonFiniteError(f"training diverged: the loss is {value} at step {step + 1}; nothing saved "
                                     "(lower --lr)")
        running = track_loss(history["loss"], running, value, step, bar)
        if eval_due(step, args.eval_every, args.steps):
            acc = evaluate_accuracy(model, val_loader, args.device)
            history["val_accuracy"][step + 1] = acc
            bar.write(f"step {step + 1}: validation accuracy {acc:.4f}, loss {running:.3f} "
                      f"({time.time() - start:.0f} s)")
            model.train()
    model.eval()
    history["train_seconds"] = round(time.time() - start, 1)
    history["final_val_accuracy"] = evaluate_accuracy(model, val_loader, args.device)
    return model, history


MAX_SIZE = 512
"""Largest --size: a 512x512 image is 4096 tokens of patch 8; beyond, a CPU run takes hours."""
MAX_POOL_BYTES = 8 << 30
"""Largest training pool (uint8 pixels held in memory)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a small ViT on the synthetic shapes stand-in (CPU, minutes) "
                                            "and save model.safetensors + config.json.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", default=DEFAULT_SAMPLE_DIR,
                   help="where to write the model folder (checked for writing before training)")
    p.add_argument("--size", type=cli.int_range(16, MAX_SIZE), default=96, help="image side (pixels)")
    p.add_argument("--patch-size", type=cli.int_range(1, MAX_SIZE), default=8, help="ViT patch side (pixels)")
    p.add_argument("--embed-dim", type=cli.int_range(4, 4096), default=96, help="token width")
    p.add_argument("--depth", type=cli.int_range(1, 64), default=4, help="transformer blocks")
    p.add_argument("--num-heads", type=cli.int_range(1, 256), default=4, help="attention heads")
    p.add_argument("--mlp-ratio", type=cli.float_range(0.0, 64.0, lo_open=True), default=2.0,
                   help="MLP hidden width / token width")
    p.add_argument("--steps", type=cli.int_range(1, 10_000_000), default=5000, help="optimiser steps")
    p.add_argument("--batch-size", type=cli.int_range(1, 65536), default=32, help="training batch size")
    p.add_argument("--pool-size", type=cli.non_negative_int, default=20480,
                   help="training images generated once and reused with random 90-degree rotations and "
                        "mirroring (0: new images every step)")
    p.add_argument("--lr", type=cli.positive_float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--warmup", type=cli.non_negative_int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=cli.non_negative_float, default=0.05,
                   help="AdamW weight decay (matrices only)")
    p.add_argument("--sincos-init", type=int, choices=(0, 1), default=1,
                   help="1: initialise the position embedding with a 2-D sine-cosine code")
    p.add_argument("--label-smoothing", type=cli.float_range(0.0, 1.0, hi_open=True), default=0.1,
                   help="cross-entropy label smoothing")
    p.add_argument("--seed", type=cli.int_range(0, 2 ** 63 - 1), default=0, help="seed of the model initialisation")
    p.add_argument("--data-seed", type=cli.int_range(0, 2 ** 31 - 1), default=0, help="seed of the synthetic images")
    p.add_argument("--n-val", type=cli.int_range(1, 1_000_000), default=400, help="validation images")
    p.add_argument("--eval-every", type=cli.non_negative_int, default=500,
                   help="validate every N steps (0: only at the end)")
    p.add_argument("--min-accuracy", type=cli.probability, default=0.9,
                   help="exit with status 1 (model still saved) if final validation accuracy is lower")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16")
    cli.add_threads_arg(p, default=2)
    p.add_argument("--num-workers", type=cli.int_range(0, 64), default=1, help="data-generation worker processes")
    cli.add_device_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks that argparse types cannot make; ``parser.error`` (exit 2)."""
    if args.patch_size > args.size or args.size % args.patch_size:
        parser.error(f"--size {args.size} is not a multiple of --patch-size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        parser.error(f"--embed-dim {args.embed_dim} is not divisible by --num-heads {args.num_heads}")
    if args.sincos_init and args.embed_dim % 4:
        parser.error(f"--sincos-init 1 needs --embed-dim a multiple of 4, not {args.embed_dim}")
    pool_bytes = args.pool_size * 3 * args.size * args.size
    if pool_bytes > MAX_POOL_BYTES:
        parser.error(f"--pool-size {args.pool_size} at --size {args.size} needs {pool_bytes / 2 ** 30:.1f} GiB "
                     f"of memory (limit {MAX_POOL_BYTES >> 30} GiB); use a smaller pool or 0")
    if args.batch_size * 3 * args.size * args.size * 4 > MAX_POOL_BYTES:
        parser.error(f"--batch-size {args.batch_size} at --size {args.size} does not fit in memory")


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    args.device = str(cli.resolve_device(args.device))
    cli.check_output_dir(args.out_dir, flag="--out-dir")  # before minutes of training, not after
    cli.apply_threads(args.threads)
    cli.set_tf32(False)
    try:
        model, history = train(args)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted during training; nothing was saved (training keeps no checkpoints)") \
            from None
    for name, p in model.named_parameters():
        cli.check_finite(p.detach(), f"the trained weight {name}")
    config = {
        "architecture": "synthetic_vit",
        "input_size": [3, args.size, args.size],
        "mean": list(HALF), "std": list(HALF),
        "class_names": list(CLASS_NAMES),
        "data": {"generator": "data/synthetic.py", "generator_version": GENERATOR_VERSION,
                 "seed": args.data_seed, "train_split": "train", "val_split": "val", "n_val": args.n_val},
        "training": {k: v for k, v in vars(args).items() if k not in ("out_dir", "quiet")},
        "val_accuracy": history["final_val_accuracy"],
        "history": history,
        "torch_version": torch.__version__,
        "command": command_line(__file__, argv),
    }
    with cli.file_lock(args.out_dir, blocking=True):
        weights, cfg_path = save_model(model, args.out_dir, config, fp16=args.fp16)  # two runs never mix files
    if args.fp16:  # report the accuracy of what was stored
        reloaded = load_synthetic_model(args.out_dir, args.device)
        from torch.utils.data import DataLoader

        val = DataLoader(SyntheticShapes(args.n_val, seed=args.data_seed, size=args.size, split="val",
                                         mean=HALF, std=HALF), batch_size=100)
        config["val_accuracy_float32"] = config["val_accuracy"]
        config["val_accuracy"] = evaluate_accuracy(reloaded, val, args.device)
        with cli.file_lock(args.out_dir, blocking=True):
            weights, cfg_path = save_model(model, args.out_dir, config, fp16=True)
    size_mb = os.path.getsize(weights) / 1e6
    print(f"validation accuracy {config['val_accuracy']:.4f} on {args.n_val} images; "
          f"trained {history['train_seconds']:.0f} s; wrote {weights} ({size_mb:.2f} MB) and {cfg_path}")
    if config["val_accuracy"] < args.min_accuracy:
        print(f"warning: validation accuracy {config['val_accuracy']:.4f} is below --min-accuracy "
              f"{args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train and save; bad flags or an unusable --out-dir / --device exit 2
    before training, Ctrl-C exits 130, a final accuracy below
    --min-accuracy exits 1 (the model is still saved)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
