"""Train the multi-object scene classifier stand-in (``samples/synthetic_scenes_vit``).

Our :class:`~baselines.ViT.ViT_LRP.VisionTransformer` (96x96 input, patch 8,
4 blocks of width 96, 4 heads, as ``samples/synthetic_vit``) learns which of
the eight shape classes are present in a scene of :mod:`data.scenes`
(one logit per class; by default softmax cross-entropy against soft targets,
the present classes sharing the target equally, which keeps the
single-object model's softmax head; ``--loss bce`` for independent
binary cross-entropy).  By default it starts from the single-object model
``samples/synthetic_vit`` (its sha256 is recorded) and is fine-tuned on a
pool of generated scenes of 1-3 objects (possibly occluding each other),
each drawn under a random rotation by a multiple of 90 degrees and
mirroring.  A training-only dense loss speeds learning up: a linear layer on
each final patch token names the class of the object covering the patch
(or background), from the scenes' exact masks; it is dropped when the model
is saved, so the shipped model is the plain classifier.  Everything is
seeded, so the same commands on the same software and thread count
reproduce the shipped model, trained in three stages (each run's
``config.json`` records its command and how its starting model was made)::

    python baselines/ViT/train_scenes.py --out-dir stage1 --pool-size 10000 --steps 3000 --lr 1e-3
    python baselines/ViT/train_scenes.py --init stage1 --out-dir stage2 --pool-size 10000 \\
        --steps 1600 --lr 2e-3 --seed 1
    python baselines/ViT/train_scenes.py --init stage2 --out-dir samples/synthetic_scenes_vit \\
        --pool-size 10000 --steps 1500 --lr 1.5e-3 --seed 2

Validation: two-object scenes of two different classes, apart from each
other (the scenes of the class-specificity benchmark), and the share of them
whose two classes are the model's top 2 (``top_k_all_present``: for a scene
with k distinct classes, every present class is among the k highest logits)
and are among its top 3 (``top_k_plus_1_all_present``).
``config.json`` records the command, the data seed, this accuracy and the
training history; the folder loads with
:func:`baselines.ViT.ViT_LRP.load_model_dir`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.ViT.train_synthetic import (DEFAULT_SAMPLE_DIR, HALF, dihedral, load_synthetic_model, save_model,
                                           sincos_pos_embed)
from baselines.ViT.ViT_LRP import VisionTransformer
from data.scenes import CLASS_NAMES, NUM_CLASSES, SCENE_VERSION, SceneConfig, SceneDataset, generate_scene
from modules.checkpoints import weights_sha256
from modules.training import command_line, eval_due, set_lr, track_loss, warmup_cosine_lr

__all__ = ["DEFAULT_OUT_DIR", "VAL_CONFIG", "top_k_all_present", "scene_loss", "evaluate", "patch_targets", "make_pool", "train", "build_parser",
           "main"]

DEFAULT_OUT_DIR = os.path.join(os.path.dirname(DEFAULT_SAMPLE_DIR), "synthetic_scenes_vit")
VAL_CONFIG = SceneConfig(size=96, min_objects=2, max_objects=2, distinct_classes=True, separated=True)
"""Validation scenes: two objects of different classes, apart from each other."""


def top_k_all_present(logits: torch.Tensor, labels: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """(B,) bool: every present class (``labels`` (B, C) multi-hot) is among
    the k + ``extra`` highest ``logits`` (B, C), k = the number of present
    classes (``extra`` 0: the present classes are exactly the top k).

    Ties are broken by ``torch.topk`` (lowest index first)."""
    out = torch.zeros(logits.shape[0], dtype=torch.bool)
    present = labels > 0.5
    for b in range(logits.shape[0]):
        k = int(present[b].sum())
        if k == 0:
            continue
        top = set(torch.topk(logits[b], min(k + extra, logits.shape[1])).indices.tolist())
        out[b] = set(present[b].nonzero().flatten().tolist()) <= top
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str) -> Dict[str, float]:
    """Shares of scenes with every present class in the top k
    (``top_k_all_present``) and in the top k + 1 (``top_k_plus_1_all_present``),
    mean per-class accuracy at logit 0, and the count of scenes over
    ``loader`` ((image, multi-hot) batches)."""
    model.eval()
    hits = hits1 = correct = total = n = 0
    for x, y in loader:
        logits = model(x.to(device)).float().cpu()
        hits += int(top_k_all_present(logits, y).sum())
        hits1 += int(top_k_all_present(logits, y, extra=1).sum())
        correct += int(((logits > 0) == (y > 0.5)).sum())
        total += int(y.numel())
        n += int(y.shape[0])
    return {"top_k_all_present": hits / max(n, 1), "top_k_plus_1_all_present": hits1 / max(n, 1),
            "label_accuracy": correct / max(total, 1), "n_scenes": n}


def scene_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "soft_ce") -> torch.Tensor:
    """``soft_ce``: cross-entropy of the softmax against the present classes
    sharing the target equally (1/k each); ``bce``: binary cross-entropy of
    each logit against the multi-hot labels."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels)
    if kind != "soft_ce":
        raise ValueError(f"unknown loss {kind!r}")
    target = labels / labels.sum(dim=1, keepdim=True).clamp(min=1)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def patch_targets(class_map: np.ndarray, patch: int, min_pixels: int) -> np.ndarray:
    """(gh, gw) int64 class of each patch of a (H, W) ``class_map`` (-1 for
    background): the class covering most of the patch's pixels when it
    covers at least ``min_pixels`` of them, else 8 (background)."""
    H, W = class_map.shape
    onehot = np.zeros((H, W, NUM_CLASSES), np.int32)
    fg = class_map >= 0
    onehot[fg, class_map[fg]] = 1
    counts = onehot.reshape(H // patch, patch, W // patch, patch, NUM_CLASSES).sum(axis=(1, 3))
    best = counts.argmax(axis=-1)
    return np.where(counts.max(axis=-1) >= min_pixels, best, NUM_CLASSES).astype(np.int64)


def make_pool(n: int, seed: int, config: SceneConfig, patch: int = 8, quiet: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` scenes of the ``train`` split: uint8 (n, 3, H, W),
    multi-hot (n, 8) and the patch classes (n, gh, gw) of :func:`patch_targets`
    (a patch is an object's when the object covers a quarter of it)."""
    from tqdm import tqdm

    S = config.size
    xs = torch.empty((n, 3, S, S), dtype=torch.uint8)
    ys = torch.empty((n, NUM_CLASSES), dtype=torch.float32)
    ps = torch.empty((n, S // patch, S // patch), dtype=torch.int64)
    for i in tqdm(range(n), desc="generating training scenes", disable=quiet, leave=False):
        sc = generate_scene(i, seed, "train", config)
        cmap = np.full((S, S), -1, np.int64)
        for o in sc.objects:
            cmap[o.mask.astype(bool)] = o.label
        xs[i] = torch.from_numpy(sc.image.transpose(2, 0, 1).copy())
        ys[i] = torch.from_numpy(sc.labels)
        ps[i] = torch.from_numpy(patch_targets(cmap, patch, max(1, patch * patch // 4)))
    return xs, ys, ps


def _cached_pool(args: argparse.Namespace, cfg: SceneConfig, patch: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`make_pool`, read from / written to ``args.pool_cache`` when given
    (the file records what it holds and is regenerated when that differs)."""
    key = {"n": args.pool_size, "seed": args.data_seed, "config": dict(cfg.__dict__), "patch": patch,
           "scene_version": SCENE_VERSION}
    path = getattr(args, "pool_cache", None)
    if path and os.path.isfile(path):
        with np.load(path) as f:
            if json.loads(str(f["key"])) == key:
                return torch.from_numpy(f["x"]), torch.from_numpy(f["y"]), torch.from_numpy(f["p"])
    x, y, p = make_pool(args.pool_size, args.data_seed, cfg, patch, args.quiet)
    if path:
        np.savez(path, x=x.numpy(), y=y.numpy(), p=p.numpy(), key=json.dumps(key))
    return x, y, p


def _batches(pool_x: torch.Tensor, pool_y: torch.Tensor, pool_p: torch.Tensor, steps: int, batch_size: int,
             seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, pool_x.shape[0], (batch_size,), generator=g)
        k = torch.randint(0, 8, (batch_size,), generator=g)
        x = (pool_x[idx].float() / 255.0 - 0.5) / 0.5  # mean = std = 0.5
        yield dihedral(x, k), pool_y[idx], dihedral(pool_p[idx][:, None], k)[:, 0]


def _initial_model(args: argparse.Namespace) -> Tuple[VisionTransformer, Dict]:
    if args.init != "none":
        model = load_synthetic_model(args.init, "cpu")
        kw = model.patch_embed
        if tuple(kw.img_size) != (args.size, args.size) or model.head.out_features != len(CLASS_NAMES):
            raise ValueError(f"--init {args.init}: model input {tuple(kw.img_size)} / {model.head.out_features} "
                             f"classes does not fit --size {args.size} and {len(CLASS_NAMES)} classes")
        info = {"init": os.path.relpath(os.path.abspath(args.init)), "init_sha256": weights_sha256(args.init)}
        try:  # a model from this script: keep how it was made, so a staged recipe stays reproducible
            with open(os.path.join(args.init, "config.json")) as fh:
                made = json.load(fh)
            info["init_command"] = made.get("command")
            info["init_training_seconds"] = (made.get("history") or {}).get("train_seconds")
            if isinstance(made.get("history"), dict) and made["history"].get("init"):
                info["init_of_init"] = {k: made["history"].get(k) for k in ("init", "init_sha256", "init_command")}
        except (OSError, ValueError, AttributeError):
            pass
        return model, info
    model = VisionTransformer(img_size=args.size, patch_size=args.patch_size, in_chans=3, num_classes=len(CLASS_NAMES),
                              embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                              mlp_ratio=args.mlp_ratio, qkv_bias=True, distilled=False)
    with torch.no_grad():
        model.pos_embed[0, model.num_prefix_tokens:] = sincos_pos_embed(model.patch_embed.grid_size, model.embed_dim)
    return model, {"init": "none"}


def train(args: argparse.Namespace) -> Tuple[VisionTransformer, Dict]:
    """Train as ``args`` says; returns the model (eval mode) and a record of
    the run (losses, validation figures, seconds)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model, init = _initial_model(args)
    model = model.to(args.device).train()
    aux = nn.Linear(model.embed_dim, NUM_CLASSES + 1).to(args.device) if args.patch_loss > 0 else None
    named = list(model.named_parameters()) + (list(aux.named_parameters(prefix="aux")) if aux is not None else [])
    decay = [p for n, p in named if p.dim() > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in named if not (p.dim() > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    train_cfg = SceneConfig(size=args.size, min_objects=args.min_objects, max_objects=args.max_objects)
    val_cfg = SceneConfig(**dict(VAL_CONFIG.__dict__, size=args.size))
    val_loader = DataLoader(SceneDataset(args.n_val, seed=args.data_seed, split="val", config=val_cfg),
                            batch_size=100, shuffle=False)
    history: Dict = dict(init, loss=[], val={})
    start = time.time()
    patch = model.patch_embed.patch_size[0]
    pool_x, pool_y, pool_p = _cached_pool(args, train_cfg, patch)
    history["pool_seconds"] = round(time.time() - start, 1)
    bar = tqdm(_batches(pool_x, pool_y, pool_p, args.steps, args.batch_size, args.seed + 1), total=args.steps,
               desc="training", disable=args.quiet)
    running = None
    for step, (x, y, pt) in enumerate(bar):
        set_lr(opt, warmup_cosine_lr(step, args.lr, args.warmup, args.steps, cosine_after_warmup=True))
        feats = model.forward_features(x.to(args.device))
        loss = scene_loss(model.forward_head(feats), y.to(args.device), args.loss)
        if aux is not None:  # training-only dense loss: each patch token names the object under it
            tokens = feats[:, model.num_prefix_tokens:]
            loss = loss + args.patch_loss * F.cross_entropy(aux(tokens).flatten(0, 1), pt.to(args.device).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        running = track_loss(history["loss"], running, value, step, bar)
        if eval_due(step, args.eval_every, args.steps):
            r = evaluate(model, val_loader, args.device)
            history["val"][step + 1] = r
            msg = (f"step {step + 1}: top-k {r['top_k_all_present']:.3f}, top-(k+1) "
                   f"{r['top_k_plus_1_all_present']:.3f}, label acc {r['label_accuracy']:.3f}, "
                   f"loss {running:.3f} ({time.time() - start:.0f} s)")
            bar.write(msg) if not args.quiet else print(msg, flush=True)
            if args.checkpoint_dir:  # the model so far, loadable like the final one
                save_model(model, args.checkpoint_dir, run_config(args, dict(history, steps_done=step + 1), r))
            model.train()
    model.eval()
    history["train_seconds"] = round(time.time() - start, 1)
    history["final"] = evaluate(model, val_loader, args.device)
    return model, history


def run_config(args: argparse.Namespace, history: Dict, final: Dict, argv: Optional[Sequence[str]] = None) -> Dict:
    """What ``config.json`` records besides the model: data, training
    arguments and command, the validation figures and the history."""
    return {
        "architecture": "synthetic_scenes_vit",
        "mean": list(HALF), "std": list(HALF),
        "input_size": [3, args.size, args.size],
        "class_names": list(CLASS_NAMES),
        "multi_label": True,
        "data": {"generator": "data/scenes.py", "scene_version": SCENE_VERSION, "seed": args.data_seed,
                 "train_split": "train", "train_objects": [args.min_objects, args.max_objects],
                 "pool_size": args.pool_size, "val_split": "val", "val_config": dict(VAL_CONFIG.__dict__, size=args.size),
                 "n_val": args.n_val},
        "training": dict(vars(args)),
        "val_top_k_all_present": final["top_k_all_present"],
        "val_top_k_plus_1_all_present": final["top_k_plus_1_all_present"],
        "val_label_accuracy": final["label_accuracy"],
        "history": history,
        "torch_version": torch.__version__,
        "command": command_line(__file__, argv),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train the multi-label ViT stand-in on synthetic scenes (data/scenes.py) "
                                            "and save model.safetensors + config.json.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="where to write the model folder")
    p.add_argument("--init", default=DEFAULT_SAMPLE_DIR,
                   help="model folder to start from (the single-object stand-in), or 'none' for a fresh model")
    p.add_argument("--size", type=int, default=96, help="image side (pixels)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch side (with --init none)")
    p.add_argument("--embed-dim", type=int, default=96, help="token width (with --init none)")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks (with --init none)")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads (with --init none)")
    p.add_argument("--mlp-ratio", type=float, default=2.0, help="MLP width / token width (with --init none)")
    p.add_argument("--min-objects", type=int, default=1, help="fewest objects per training scene")
    p.add_argument("--max-objects", type=int, default=3, help="most objects per training scene")
    p.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--pool-size", type=int, default=10000, help="training scenes generated once and reused "
                                                                "under random 90-degree rotations and mirroring")
    p.add_argument("--loss", choices=("soft_ce", "bce"), default="soft_ce",
                   help="soft_ce: softmax cross-entropy with the present classes sharing the target; "
                        "bce: multi-label binary cross-entropy")
    p.add_argument("--patch-loss", type=float, default=1.0,
                   help="weight of the training-only dense loss (a linear layer on each final patch token "
                        "predicts the class of the object under the patch, or background; not saved); 0: off")
    p.add_argument("--checkpoint-dir", default=None,
                   help="also save the model at every validation here (its config records steps_done)")
    p.add_argument("--pool-cache", default=None, help="optional .npz to keep the generated pool in between runs")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (matrices only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the scenes")
    p.add_argument("--n-val", type=int, default=400, help="two-object validation scenes")
    p.add_argument("--eval-every", type=int, default=500, help="validate every N steps (0: only at the end)")
    p.add_argument("--min-accuracy", type=float, default=0.8,
                   help="exit with status 1 (model still saved) if the final top-k share is lower")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device (the shipped model was trained on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (progress lines still printed)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "n_val", "threads", "size", "pool_size", "patch_size", "embed_dim",
                 "depth", "num_heads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 1 <= args.min_objects <= args.max_objects <= 4:
        parser.error("need 1 <= --min-objects <= --max-objects <= 4")
    for name in ("warmup", "eval_every"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    from data.scenes import MAX_COUNT, MAX_SIZE, check_scenes_memory
    from modules.cli import MAX_THREADS, CLIError, check_output_dir, resolve_device
    if args.size > MAX_SIZE or args.pool_size > MAX_COUNT or args.n_val > MAX_COUNT or args.threads > MAX_THREADS:
        parser.error(f"--size must be at most {MAX_SIZE}, --pool-size and --n-val at most {MAX_COUNT}, --threads at "
                     f"most {MAX_THREADS}")
    try:  # everything that can be refused is refused before the scenes are generated
        resolve_device(args.device)
        check_scenes_memory(args.pool_size + args.n_val, args.size, args.max_objects, what="--pool-size + --n-val")
        check_output_dir(args.out_dir, flag="--out-dir")
        if args.checkpoint_dir is not None:
            check_output_dir(args.checkpoint_dir, flag="--checkpoint-dir")
    except CLIError as exc:
        parser.exit(2, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    try:
        model, history = train(args)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"error: {str(exc).splitlines()[0]}\n")
    final = history["final"]
    config = run_config(args, history, final, argv)
    weights, cfg_path = save_model(model, args.out_dir, config)
    print(f"two-object validation scenes: both classes the top 2 for {final['top_k_all_present']:.4f}, in the top 3 "
          f"for {final['top_k_plus_1_all_present']:.4f} of {final['n_scenes']}; label accuracy {final['label_accuracy']:.4f}; trained "
          f"{history['train_seconds']:.0f} s; wrote {weights} ({os.path.getsize(weights) / 1e6:.2f} MB)")
    if final["top_k_all_present"] < args.min_accuracy:
        print(f"warning: top-k share {final['top_k_all_present']:.4f} is below --min-accuracy {args.min_accuracy}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
