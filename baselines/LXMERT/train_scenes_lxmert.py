"""Train the VQA stand-in: a small Hugging Face LxmertForQuestionAnswering on the synthetic scenes.

    python baselines/LXMERT/train_scenes_lxmert.py --out-dir samples/synthetic_scenes_lxmert

Questions and answers come from ``data/scenes.py`` (existence, count, colour,
shape, relation), box features from the fixed extractor of
``baselines/LXMERT/scene_vqa.py``.  Deterministic on the CPU for a given
seed and thread count.  The model directory (``save_pretrained`` +
tokenizer) records in its ``config.json`` under ``"standin"`` the training
command, the data seed and the validation accuracy per question type.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch
from tqdm import tqdm

from baselines.LXMERT.scene_vqa import (ANSWERS, FEATURE_DIM, FEATURE_VERSION, MAX_BOXES, build_tokenizer,
                                        encode_questions, scene_boxes)
from data.scenes import SCENE_VERSION, generate_scene, scene_questions
from data.scenes import scene_count_arg  # noqa: E402
from modules.cli import check_memory, int_range, positive_int, run_main
from modules.training import (add_run_args, optimizer_step, parse_run_args, save_standin, shuffled_batches,
                              warmup_cosine_lr)

QTYPES = ("existence", "count", "colour", "shape", "relation")


def build_split(split: str, count: int, seed: int, tokenizer, background_boxes: int = 2, per_type: int = 1,
                progress: bool = True) -> Dict[str, np.ndarray]:
    """Every question of ``count`` scenes as arrays: input_ids, attention_mask,
    token_type_ids (n, 16); visual_feats (n, MAX_BOXES, FEATURE_DIM);
    visual_pos (n, MAX_BOXES, 4); visual_attention_mask (n, MAX_BOXES);
    label (n,); qtype (n,); scene (n,)."""
    questions, labels, qtypes, scenes, feats, poss, vmask = [], [], [], [], [], [], []
    for i in tqdm(range(count), desc=f"{split} scenes", disable=not progress, leave=False):
        sc = generate_scene(i, seed, split)
        f, p, _ = scene_boxes(sc, background_boxes)
        fpad = np.zeros((MAX_BOXES, FEATURE_DIM), np.float32)
        ppad = np.zeros((MAX_BOXES, 4), np.float32)
        m = np.zeros(MAX_BOXES, np.int64)
        fpad[:len(f)], ppad[:len(p)], m[:len(f)] = f, p, 1
        for q in scene_questions(sc, per_type):
            questions.append(q.question)
            labels.append(ANSWERS.index(q.answer))
            qtypes.append(QTYPES.index(q.qtype))
            scenes.append(i)
            feats.append(fpad)
            poss.append(ppad)
            vmask.append(m)
    out = encode_questions(tokenizer, questions)
    out.update(visual_feats=np.stack(feats), visual_pos=np.stack(poss), visual_attention_mask=np.stack(vmask),
               label=np.asarray(labels), qtype=np.asarray(qtypes), scene=np.asarray(scenes))
    return out


MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "visual_feats", "visual_pos", "visual_attention_mask")


def batches(data: Dict[str, np.ndarray], idx: np.ndarray, device: torch.device):
    return {k: torch.from_numpy(data[k][idx]).to(device) for k in MODEL_KEYS}


@torch.no_grad()
def accuracy_by_type(model, data: Dict[str, np.ndarray], device: torch.device, batch_size: int = 256) -> Dict[str, float]:
    """Accuracy of the argmax answer per question type (and overall)."""
    model.eval()
    correct = np.zeros(len(data["label"]), bool)
    for start in range(0, len(data["label"]), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data["label"])))
        pred = model(**batches(data, idx, device)).question_answering_score.argmax(-1).cpu().numpy()
        correct[idx] = pred == data["label"][idx]
    out = {t: float(correct[data["qtype"] == k].mean()) for k, t in enumerate(QTYPES) if (data["qtype"] == k).any()}
    out["all"] = float(correct.mean())
    return out


def make_model(vocab_size: int, hidden: int = 128, layers=(2, 1, 2)):
    from transformers import LxmertConfig, LxmertForQuestionAnswering

    cfg = LxmertConfig(vocab_size=vocab_size, hidden_size=hidden, num_attention_heads=4, intermediate_size=2 * hidden,
                       l_layers=layers[0], r_layers=layers[1], x_layers=layers[2], visual_feat_dim=FEATURE_DIM,
                       visual_pos_dim=4, num_qa_labels=len(ANSWERS), hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, max_position_embeddings=32,
                       id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)})
    return LxmertForQuestionAnswering(cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", required=True, help="model directory to write (save_pretrained + tokenizer)")
    p.add_argument("--train-scenes", type=scene_count_arg, default=6000, help="training scenes (split 'train')")
    p.add_argument("--val-scenes", type=scene_count_arg, default=600, help="validation scenes (split 'val')")
    p.add_argument("--max-steps", type=positive_int, default=100000, help="stop after this many steps")
    p.add_argument("--cosine-steps", type=positive_int, default=None,
                   help="warm up for 100 steps, then a cosine decay reaching 0 at this step (default: constant lr)")
    p.add_argument("--hidden", type=int_range(16, 1024), default=128)
    add_run_args(p, minutes=18.0, batch_size=128, lr=5e-4, eval_every=500)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args, device = parse_run_args(build_parser(), argv)
    n = args.train_scenes + args.val_scenes  # the questions' box features are kept: about 64 KiB a scene
    check_memory(n * 64 * 1024, f"--train-scenes + --val-scenes {n}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    t0 = time.time()
    train = build_split("train", args.train_scenes, args.seed, tokenizer)
    val = build_split("val", args.val_scenes, args.seed, tokenizer)
    print(f"{len(train['label'])} training and {len(val['label'])} validation questions "
          f"({time.time() - t0:.0f} s to build)", flush=True)
    model = make_model(tokenizer.vocab_size, args.hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = np.random.default_rng(args.seed)
    step, start, history = 0, time.time(), []
    labels = torch.from_numpy(train["label"])
    bar = tqdm(total=args.max_steps, desc="training", mininterval=5)
    try:
        for idx in shuffled_batches(g, len(train["label"]), args.batch_size, args.max_steps, args.minutes * 60, start):
            model.train()
            out = model(**batches(train, idx, device), labels=labels[idx].to(device))
            # without --cosine-steps the rate stays --lr; counted in steps, so the run stays deterministic
            lr = warmup_cosine_lr(step, args.lr, 100, args.cosine_steps) if args.cosine_steps else None
            optimizer_step(opt, out.loss, model.parameters(), 1.0, step, lr=lr)
            step += 1
            bar.update(1)
            if step % args.eval_every == 0:
                acc = accuracy_by_type(model, val, device)
                history.append({"step": step, "minutes": round((time.time() - start) / 60, 2), **acc})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    finally:
        bar.close()
    acc = accuracy_by_type(model, val, device)
    majority = {t: float(np.bincount(val["label"][val["qtype"] == k]).max() / max((val["qtype"] == k).sum(), 1))
                for k, t in enumerate(QTYPES) if (val["qtype"] == k).any()}
    print("validation accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    model.eval()
    save_standin(args.out_dir, model, tokenizer, script=__file__, argv=argv, seed=args.seed, steps=step, start=start,
                 threads=args.threads, history=history,
                 what="VQA stand-in on the synthetic scenes of data/scenes.py (not VQA v2)",
                 scene_version=SCENE_VERSION, feature_version=FEATURE_VERSION, train_scenes=args.train_scenes,
                 val_scenes=args.val_scenes, val_accuracy=acc, majority_baseline=majority)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
