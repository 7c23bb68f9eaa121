"""Train the detector stand-in: a small Hugging Face Conditional DETR (or DETR) on the synthetic scenes.

    python baselines/DETR/train_scenes_detr.py --out-dir samples/synthetic_scenes_detr

Settings follow what ../shared/STANDINS.md measured on this kind of machine:
a tiny ResNet from a ``ResNetConfig`` (basic blocks, widths 32/64/128,
stride 16), d_model 128, 8 heads, 3 encoder and 3 decoder layers,
feed-forward 512, 10 queries, dropout 0, the decoder's auxiliary losses,
AdamW 2.5e-4, weight decay 1e-4, 100 warm-up steps then cosine, gradient
clip 0.1, batch 32, horizontal flips, and — used in training only, not part
of the saved model — an auxiliary box-classification loss: RoI-align (3x3)
features of every ground-truth box from the backbone's last map, a small
classifier, cross-entropy with weight 2 (plain DETR does not learn the
classes in 20 CPU minutes without it).

Hugging Face's DETR replaces the backbone's batch norm by a frozen version and
freezes its first stage; a backbone trained from scratch trains with ordinary
batch norm here (every parameter trainable), and the learned statistics are
copied into the frozen layers before saving (the reloaded model's outputs
are checked against the trained one).  The directory's ``config.json``
records under ``"standin"`` the command, the data seed and the validation
AP50 (with and without class-wise suppression at IoU 0.5).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.scenes import NUM_CLASSES, SCENE_VERSION, SceneConfig, generate_scene
from data.scenes import check_scenes_memory, scene_count_arg  # noqa: E402
from modules.cli import CLIError, int_range, positive_int, run_main
from modules.training import (add_run_args, optimizer_step, parse_run_args, save_standin, shuffled_batches,
                              warmup_cosine_lr)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def scene_pool(count: int, seed: int, split: str, size: int) -> Dict[str, object]:
    """Pictures (n, H, W, 3) uint8 and per picture its labels and boxes
    (normalised cx, cy, w, h, as DETR's loss expects)."""
    images, labels, boxes = [], [], []
    cfg = SceneConfig(size=size)
    for i in tqdm(range(count), desc=f"{split} scenes", leave=False):
        sc = generate_scene(i, seed, split, cfg)
        images.append(sc.image)
        labels.append(np.asarray([o.label for o in sc.objects], np.int64))
        b = np.asarray([o.box for o in sc.objects], np.float32).reshape(-1, 4) / size
        boxes.append(np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                               b[:, 3] - b[:, 1]], axis=1))
    return {"images": np.stack(images), "labels": labels, "boxes": boxes}


def to_pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def make_model(kind: str = "conditional_detr", queries: int = 10, d_model: int = 128):
    import transformers as tf

    backbone = tf.ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128], depths=[2, 2, 2],
                               layer_type="basic", out_features=["stage3"], downsample_in_first_stage=False)
    cls, cfg_cls = {"conditional_detr": (tf.ConditionalDetrForObjectDetection, tf.ConditionalDetrConfig),
                    "detr": (tf.DetrForObjectDetection, tf.DetrConfig)}[kind]
    cfg = cfg_cls(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=d_model,
                  encoder_layers=3, decoder_layers=3, encoder_attention_heads=8, decoder_attention_heads=8,
                  encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, num_queries=queries,
                  num_labels=NUM_CLASSES, dropout=0.0, auxiliary_loss=True, attn_implementation="eager",
                  id2label={i: n for i, n in enumerate(__import__("data.scenes", fromlist=["CLASS_NAMES"]).CLASS_NAMES)})
    return cls(cfg)


def thaw_batch_norm(model: nn.Module) -> List[str]:
    """Swap the backbone's frozen batch norms for trainable ``nn.BatchNorm2d``
    (same values) and make every backbone parameter trainable; returns the swapped paths."""
    swapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__.endswith("FrozenBatchNorm2d"):
                bn = nn.BatchNorm2d(child.weight.shape[0], eps=getattr(child, "epsilon", 1e-5))
                with torch.no_grad():
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                    bn.running_mean.copy_(child.running_mean)
                    bn.running_var.copy_(child.running_var)
                setattr(module, child_name, bn)
                swapped.append(f"{name}.{child_name}" if name else child_name)
    for p in model.parameters():
        p.requires_grad_(True)
    return swapped


def frozen_copy(model: nn.Module, kind: str, queries: int, d_model: int) -> nn.Module:
    """A fresh model (frozen batch norms, as Hugging Face builds it) holding the trained weights and statistics."""
    fresh = make_model(kind, queries, d_model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"frozen copy: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return fresh.eval()


class BoxClassifier(nn.Module):
    """Training-only auxiliary head: RoI-align 3x3 of the backbone's last map per ground-truth box -> class."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * 9, 256), nn.ReLU(), nn.Linear(256, classes))

    def forward(self, feature_map: torch.Tensor, boxes_xyxy: List[torch.Tensor]) -> torch.Tensor:
        from torchvision.ops import roi_align

        scale = feature_map.shape[-1]
        rois = roi_align(feature_map, [b * scale for b in boxes_xyxy], output_size=3, aligned=True)
        return self.net(rois)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-12)


def class_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Indices kept by class-wise non-maximum suppression."""
    keep = []
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        while len(idx):
            keep.append(idx[0])
            idx = idx[1:][box_iou(boxes[idx[:1]], boxes[idx[1:]])[0] < iou] if len(idx) > 1 else idx[1:]
    return np.asarray(sorted(keep), np.int64)


def ap50(predictions: List[dict], pool: Dict[str, object], nms: bool) -> float:
    """COCO-style AP at IoU 0.5 (101-point interpolation), mean over classes."""
    per_class: Dict[int, List] = {c: [] for c in range(NUM_CLASSES)}
    n_gt = np.zeros(NUM_CLASSES, int)
    for i, p in enumerate(predictions):
        gt = cxcywh_to_xyxy(torch.from_numpy(pool["boxes"][i])).numpy()
        gl = pool["labels"][i]
        for c in gl:
            n_gt[c] += 1
        keep = class_nms(p["boxes"], p["scores"], p["labels"]) if nms and len(p["scores"]) else np.arange(len(p["scores"]))
        used = np.zeros(len(gl), bool)
        for j in keep[np.argsort(-p["scores"][keep], kind="stable")]:
            c = p["labels"][j]
            cand = np.where((gl == c) & ~used)[0]
            hit = False
            if len(cand):
                ious = box_iou(p["boxes"][j:j + 1], gt[cand])[0]
                if ious.max() >= 0.5:
                    used[cand[ious.argmax()]] = True
                    hit = True
            per_class[c].append((p["scores"][j], hit))
    aps = []
    for c in range(NUM_CLASSES):
        if n_gt[c] == 0:
            continue
        det = sorted(per_class[c], key=lambda t: -t[0])
        tp = np.cumsum([h for _, h in det]) if det else np.zeros(0)
        fp = np.cumsum([not h for _, h in det]) if det else np.zeros(0)
        recall = tp / n_gt[c] if len(det) else np.zeros(0)
        precision = tp / np.maximum(tp + fp, 1e-12) if len(det) else np.zeros(0)
        for k in range(len(precision) - 2, -1, -1):
            precision[k] = max(precision[k], precision[k + 1])
        points = [precision[np.searchsorted(recall, r, side="left")] if np.any(recall >= r) else 0.0
                  for r in np.linspace(0, 1, 101)]
        aps.append(float(np.mean(points)))
    return float(np.mean(aps)) if aps else 0.0


@torch.no_grad()
def predict(model, pool, device, batch_size: int = 64, threshold: float = 0.05) -> List[dict]:
    model.eval()
    out = []
    for s in range(0, len(pool["images"]), batch_size):
        x = to_pixels(pool["images"][s:s + batch_size]).to(device)
        res = model(pixel_values=x)
        prob = res.logits.softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)
        for b in range(x.shape[0]):
            keep = scores[b] > threshold
            out.append({"scores": scores[b][keep].cpu().numpy(), "labels": labels[b][keep].cpu().numpy(),
                        "boxes": cxcywh_to_xyxy(res.pred_boxes[b][keep]).clamp(0, 1).cpu().numpy()})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", required=True, help="model directory to write (save_pretrained)")
    p.add_argument("--kind", choices=("conditional_detr", "detr"), default="conditional_detr")
    p.add_argument("--train-scenes", type=scene_count_arg, default=8000)
    p.add_argument("--val-scenes", type=scene_count_arg, default=200)
    p.add_argument("--size", type=int_range(64, 512), default=96, help="picture side (pixels)")
    p.add_argument("--max-steps", type=positive_int, default=100000)
    p.add_argument("--cosine-steps", type=positive_int, default=None,
                   help="decay the learning rate over this many steps (deterministic; training stops there) "
                        "instead of over the --minutes budget (the default: how many steps that is depends on "
                        "the machine)")
    p.add_argument("--queries", type=int_range(1, 100), default=10)
    p.add_argument("--d-model", type=int_range(16, 512), default=128)
    p.add_argument("--aux-weight", type=float, default=2.0, help="weight of the auxiliary box-classification loss")
    add_run_args(p, minutes=20.0, batch_size=32, lr=2.5e-4, eval_every=500)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args, device = parse_run_args(build_parser(), argv)
    check_scenes_memory(args.train_scenes + args.val_scenes, args.size, what="--train-scenes + --val-scenes")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = scene_pool(args.train_scenes, args.seed, "train", args.size)
    val = scene_pool(args.val_scenes, args.seed, "val", args.size)
    model = make_model(args.kind, args.queries, args.d_model)
    thaw_batch_norm(model)
    model.to(device)
    feats: Dict[str, torch.Tensor] = {}
    backbone = model.model.backbone
    encoder = getattr(backbone, "conv_encoder", backbone).model  # DETR wraps the encoder once more
    hook = encoder.register_forward_hook(lambda m, a, out: feats.__setitem__(
        "map", (out.feature_maps if hasattr(out, "feature_maps") else out)[-1]))
    aux = BoxClassifier(encoder.channels[-1], NUM_CLASSES).to(device)
    params = list(model.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    total = min(args.max_steps, args.cosine_steps or args.max_steps)
    g = np.random.default_rng(args.seed)
    step, start, history = 0, time.time(), []
    bar = tqdm(total=total, desc="training", mininterval=5)
    budget = args.minutes * 60
    try:
        for idx in shuffled_batches(g, len(train["images"]), args.batch_size, total, budget, start):
            images = train["images"][idx]
            flip = g.random(len(idx)) < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
            labels = []
            for k, i in enumerate(idx):
                b = train["boxes"][i].copy()
                if flip[k]:
                    b[:, 0] = 1.0 - b[:, 0]
                labels.append({"class_labels": torch.from_numpy(train["labels"][i]).to(device),
                               "boxes": torch.from_numpy(b).to(device)})
            model.train()
            aux.train()
            out = model(pixel_values=to_pixels(np.ascontiguousarray(images)).to(device), labels=labels)
            loss = out.loss
            if args.aux_weight > 0:
                logits = aux(feats["map"], [cxcywh_to_xyxy(t["boxes"]) for t in labels])
                target = torch.cat([t["class_labels"] for t in labels])
                loss = loss + args.aux_weight * nn.functional.cross_entropy(logits, target)
            # warm-up then cosine over --cosine-steps, or over the time budget (reproducible only in steps)
            lr = warmup_cosine_lr(step, args.lr, 100, args.cosine_steps, peak_last=True,
                                  progress=None if args.cosine_steps else (time.time() - start) / budget)
            optimizer_step(opt, loss, params, 0.1, step, lr=lr)
            step += 1
            bar.update(1)
            if step % args.eval_every == 0:
                preds = predict(model, val, device)
                rec = {"step": step, "minutes": round((time.time() - start) / 60, 2),
                       "ap50": ap50(preds, val, False), "ap50_nms": ap50(preds, val, True)}
                history.append(rec)
                bar.write(str(rec))
    finally:
        bar.close()
        hook.remove()
    model.eval()
    frozen = frozen_copy(model, args.kind, args.queries, args.d_model).to(device)
    x = to_pixels(val["images"][:4]).to(device)
    with torch.no_grad():
        diff = float((frozen(pixel_values=x).logits - model(pixel_values=x).logits).abs().max())
    if diff > 1e-3:
        raise CLIError(f"the frozen copy differs from the trained model by {diff:.2e}; nothing saved")
    preds = predict(frozen, val, device)
    result = {"ap50": ap50(preds, val, False), "ap50_class_nms_iou0.5": ap50(preds, val, True)}
    print(f"validation: {result}", flush=True)
    save_standin(args.out_dir, frozen, script=__file__, argv=argv, seed=args.seed, steps=step, start=start,
                 threads=args.threads, history=history,
                 what="detector stand-in on the synthetic scenes of data/scenes.py (not COCO)",
                 scene_version=SCENE_VERSION, size=args.size, val_scenes=args.val_scenes, val=result,
                 frozen_copy_max_logit_difference=diff, mean=list(MEAN), std=list(STD))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
