"""Train the image-text stand-in: a tiny Hugging Face CLIPModel on the synthetic scenes and their captions.

    python baselines/CLIP/train_scenes_clip.py --out-dir samples/synthetic_scenes_clip \\
        --init-vision samples/synthetic_scenes_vit

Pictures come from ``data/scenes.py`` (1-4 objects, 96x96), captions from
``scene_caption`` ("a large red disk, a small blue star and a small white
ring.").  The vision tower has the shipped scenes classifier's shape (patch
8, width 96, 4 blocks, 4 heads) and, with ``--init-vision``, starts from its
weights (a ViT copy model directory; CLIP's extra pre-LayerNorm starts as
the identity's nearest LayerNorm and is trained); the text tower (2 blocks)
and both projections start random.  Loss: CLIP's symmetric contrastive
loss.  The text of a training picture is its caption or, with probability
``--phrase-prob``, one of its objects alone ("a large red disk."), so that
the model also learns to match one object's phrase to the picture (another
picture of the batch may hold the same object: a false negative the loss
tolerates).  No flips: a flip would reorder a caption's objects.

Word-level tokenizer (``data.scenes.word_tokenizer``; [CLS] starts and
[SEP] ends a caption, and CLIP's text model pools at the first [SEP]); a
``CLIPImageProcessor`` with the classifier's normalisation (mean = std =
0.5) is saved beside.  Deterministic on the CPU for a given seed and thread
count (the schedule is counted in steps; ``--minutes`` only caps the time).
``config.json`` records under ``"standin"`` the command, data seed, and
caption retrieval accuracy on held-out scenes.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from data.scenes import CLASS_NAMES, COLOUR_NAMES, SCENE_VERSION, SIZES, SceneConfig, generate_scene, scene_caption, \
    word_tokenizer
from data.scenes import check_scenes_memory, scene_count_arg  # noqa: E402
from modules.checkpoints import file_sha256
from modules.cli import CLIError, float_range, positive_int, run_main
from modules.training import (add_run_args, optimizer_step, parse_run_args, save_standin, shuffled_batches,
                              warmup_cosine_lr)

__all__ = ["CAPTION_WORDS", "build_tokenizer", "make_model", "vision_from_vit_copy", "scene_captions_pool",
           "to_pixels", "retrieval_accuracy"]

CAPTION_WORDS = ("a", "an", "and", ",", ".", *SIZES, *COLOUR_NAMES, *CLASS_NAMES, "empty", "textured", "background")
MEAN = STD = (0.5, 0.5, 0.5)


def build_tokenizer():
    """Word-level tokenizer over the caption vocabulary (no token types: CLIP takes none)."""
    return word_tokenizer(CAPTION_WORDS, model_input_names=("input_ids", "attention_mask"))


def make_model(vocab_size: int, image_size: int = 96, patch: int = 8, width: int = 96, vision_layers: int = 4,
               text_layers: int = 2, heads: int = 4, projection: int = 64):
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads, hidden_act="gelu",
                  layer_norm_eps=1e-6, attention_dropout=0.0)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab_size, num_hidden_layers=text_layers, max_position_embeddings=32,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3, **common),
                     vision_config=dict(image_size=image_size, patch_size=patch, num_hidden_layers=vision_layers,
                                        **common),
                     projection_dim=projection)
    return CLIPModel(cfg)


@torch.no_grad()
def vision_from_vit_copy(clip, vit) -> None:
    """Copy a ViT copy's weights (``baselines.ViT.ViT_LRP.VisionTransformer``,
    same width, depth, heads, patch) into ``clip.vision_model``.  The patch
    projection's bias (CLIP's has none) moves into the patch positions; CLIP's
    pre-LayerNorm has no counterpart and keeps its initial value."""
    v = clip.vision_model
    emb = v.embeddings
    emb.patch_embedding.weight.copy_(vit.patch_embed.proj.weight)
    emb.class_embedding.copy_(vit.cls_token[0, 0])
    pos = vit.pos_embed[0].clone()
    pos[1:] += vit.patch_embed.proj.bias
    emb.position_embedding.weight.copy_(pos)
    for layer, blk in zip(v.encoder.layers, vit.blocks, strict=True):
        layer.layer_norm1.load_state_dict(blk.norm1.state_dict())
        layer.layer_norm2.load_state_dict(blk.norm2.state_dict())
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)):
            getattr(layer.self_attn, name).weight.copy_(w)
            getattr(layer.self_attn, name).bias.copy_(b)
        layer.self_attn.out_proj.load_state_dict(blk.attn.proj.state_dict())
        layer.mlp.fc1.load_state_dict(blk.mlp.fc1.state_dict())
        layer.mlp.fc2.load_state_dict(blk.mlp.fc2.state_dict())
    v.post_layernorm.load_state_dict(vit.norm.state_dict())


def scene_captions_pool(count: int, seed: int, split: str, size: int = 96) -> Dict[str, object]:
    """Pictures (n, H, W, 3) uint8, their captions and each one's object phrases
    ("a large red disk."), scenes of 1-4 objects."""
    cfg = SceneConfig(size=size)
    images, captions, phrases = [], [], []
    for i in tqdm(range(count), desc=f"{split} scenes", leave=False):
        sc = generate_scene(i, seed, split, cfg)
        images.append(sc.image)
        captions.append(scene_caption(sc))
        phrases.append([f"a {o.phrase}." for o in sc.objects])
    return {"images": np.stack(images), "captions": captions, "phrases": phrases}


def to_pixels(images: np.ndarray) -> Tensor:
    """uint8 (n, H, W, 3) -> (n, 3, H, W) normalised as the image processor does."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, pool: Dict[str, object], device: torch.device,
                       batch_size: int = 256) -> Dict[str, float]:
    """Image -> caption and caption -> image top-1 among all held-out pairs
    (a caption shared by several pictures counts for each of them)."""
    model.eval()
    img, txt = [], []
    for s in range(0, len(pool["captions"]), batch_size):
        img.append(_features(model.get_image_features(pixel_values=to_pixels(pool["images"][s:s + batch_size]).to(device))))
        enc = tokenizer(pool["captions"][s:s + batch_size], padding=True, return_tensors="pt").to(device)
        txt.append(_features(model.get_text_features(**enc)))
    img = torch.nn.functional.normalize(torch.cat(img), dim=-1)
    txt = torch.nn.functional.normalize(torch.cat(txt), dim=-1)
    sim = img @ txt.T
    caps = np.asarray(pool["captions"])
    same = torch.from_numpy(caps[:, None] == caps[None, :]).to(sim.device)
    i2t = same[torch.arange(len(caps)), sim.argmax(1)].float().mean().item()
    t2i = same[torch.arange(len(caps)), sim.argmax(0)].float().mean().item()
    return {"image_to_caption_top1": i2t, "caption_to_image_top1": t2i, "chance": 1.0 / len(caps)}


def _features(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output  # transformers 5 may return an output object


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", required=True, help="model directory to write (save_pretrained + tokenizer + processor)")
    p.add_argument("--init-vision", default=None,
                   help="ViT copy model directory (e.g. samples/synthetic_scenes_vit) to start the vision tower from")
    p.add_argument("--train-scenes", type=scene_count_arg, default=8000)
    p.add_argument("--val-scenes", type=scene_count_arg, default=500)
    p.add_argument("--steps", type=positive_int, default=1500, help="optimiser steps (warm-up, then cosine)")
    p.add_argument("--phrase-prob", type=float_range(0.0, 1.0), default=0.5,
                   help="probability that a training picture's text is one of its objects instead of its caption")
    add_run_args(p, minutes=15.0, batch_size=64, lr=5e-4, eval_every=250)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args, device = parse_run_args(build_parser(), argv)
    check_scenes_memory(args.train_scenes + args.val_scenes, what="--train-scenes + --val-scenes")
    if args.init_vision:  # refused before any scene is generated
        from baselines.ViT.ViT_LRP import load_model_dir

        vit_init = load_model_dir(args.init_vision)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = make_model(len(tokenizer.get_vocab()))
    init = {"init_vision": None}
    if args.init_vision:
        from baselines.ViT.ViT_LRP import load_model_dir

        vit = vit_init
        vcfg = model.config.vision_config
        if (vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size[0], vit.patch_embed.img_size[0]) != \
                (vcfg.hidden_size, vcfg.num_hidden_layers, vcfg.patch_size, vcfg.image_size):
            raise CLIError(f"--init-vision {args.init_vision}: width/depth/patch/size do not fit the CLIP vision tower "
                           f"({vcfg.hidden_size}/{vcfg.num_hidden_layers}/{vcfg.patch_size}/{vcfg.image_size})")
        vision_from_vit_copy(model, vit)
        init = {"init_vision": os.path.relpath(os.path.abspath(args.init_vision)),
                "init_vision_sha256": file_sha256(os.path.join(args.init_vision, "model.safetensors"))}
    model.to(device)
    train = scene_captions_pool(args.train_scenes, args.seed, "train")
    val = scene_captions_pool(args.val_scenes, args.seed, "val")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    g = np.random.default_rng(args.seed)
    step, start, history = 0, time.time(), []
    bar = tqdm(total=args.steps, desc="training", mininterval=5)
    try:
        for idx in shuffled_batches(g, len(train["captions"]), args.batch_size, args.steps, args.minutes * 60, start):
            model.train()
            texts = [train["phrases"][i][g.integers(len(train["phrases"][i]))]
                     if train["phrases"][i] and g.random() < args.phrase_prob else train["captions"][i] for i in idx]
            enc = tokenizer(texts, padding=True, return_tensors="pt").to(device)
            loss = model(**enc, pixel_values=to_pixels(train["images"][idx]).to(device), return_loss=True).loss
            optimizer_step(opt, loss, model.parameters(), 1.0, step,
                           lr=warmup_cosine_lr(step, args.lr, 100, args.steps, pi_times_step_first=True))
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(1)
            if step % args.eval_every == 0:
                rec = {"step": step, "minutes": round((time.time() - start) / 60, 2),
                       "loss": round(float(loss.detach()), 4),
                       **retrieval_accuracy(model, tokenizer, val, device)}
                history.append(rec)
                bar.write(str(rec))
    finally:
        bar.close()
    acc = retrieval_accuracy(model, tokenizer, val, device)
    print("held-out retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    from transformers import CLIPImageProcessor

    size = model.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=list(MEAN), image_std=list(STD))
    save_standin(args.out_dir, model, tokenizer, processor, script=__file__, argv=argv, seed=args.seed, steps=step,
                 start=start, threads=args.threads, history=history,
                 what="image-text stand-in on the synthetic scenes of data/scenes.py and their captions (not CLIP's "
                      "data)",
                 scene_version=SCENE_VERSION, train_scenes=args.train_scenes, val_scenes=args.val_scenes,
                 mean=list(MEAN), std=list(STD), **init, val_retrieval=acc)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
