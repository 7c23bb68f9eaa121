"""Train the generation stand-in: a tiny Hugging Face BART that translates scene captions into French.

    python baselines/generation/train_scenes_translation.py --out-dir samples/synthetic_translation_bart

Sources are captions in the template of ``data/scenes.py`` ("a large red
disk, a small blue star and a small white ring."), targets their French
("un grand disque rouge, une petite étoile bleue et un petit anneau blanc.").
The translation reorders words (French colours follow the noun) and makes
words agree with the noun's gender (un/une, grand/grande, bleu/bleue), so
an explanation has something to find: the source words a generated word
relied on, which are not always the word in the same place.

Word-level tokenizer (``data.scenes.word_tokenizer``, accents kept);
targets start with [CLS] (the decoder start) and end with [SEP] (end of
sequence).  Deterministic on the CPU for a given seed and thread count (the
schedule is counted in steps; ``--minutes`` only caps the time).  The model
directory records in its ``config.json`` under ``"standin"`` the command,
the data seed and the exact-match accuracy of greedy generation on held-out
captions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch
from tqdm import tqdm

from data.scenes import CLASS_NAMES, COLOUR_NAMES, SIZES, join_phrases, word_tokenizer
from data.scenes import scene_count_arg  # noqa: E402
from modules.cli import check_memory, int_range, positive_int, run_main
from modules.training import (add_run_args, optimizer_step, parse_run_args, save_standin, shuffled_batches,
                              warmup_cosine_lr)

__all__ = ["FRENCH_SHAPES", "FRENCH_COLOURS", "FRENCH_SIZES", "translate", "sample_pairs", "build_tokenizer",
           "make_model", "exact_match"]

# shape -> (noun, gender); colour and size -> (masculine, feminine)
FRENCH_SHAPES: Dict[str, Tuple[str, str]] = {
    "arrow": ("flèche", "f"), "crescent": ("croissant", "m"), "cross": ("croix", "f"), "disk": ("disque", "m"),
    "ring": ("anneau", "m"), "square": ("carré", "m"), "star": ("étoile", "f"), "triangle": ("triangle", "m")}
FRENCH_COLOURS: Dict[str, Tuple[str, str]] = {
    "red": ("rouge", "rouge"), "orange": ("orange", "orange"), "yellow": ("jaune", "jaune"),
    "green": ("vert", "verte"), "cyan": ("cyan", "cyan"), "blue": ("bleu", "bleue"),
    "purple": ("violet", "violette"), "white": ("blanc", "blanche")}
FRENCH_SIZES: Dict[str, Tuple[str, str]] = {"small": ("petit", "petite"), "large": ("grand", "grande")}

Obj = Tuple[str, str, str]  # (size, colour, shape)


def translate(objects: Sequence[Obj]) -> Tuple[str, str]:
    """(English caption, French caption) of objects named left to right."""
    en, fr = [], []
    for size, colour, shape in objects:
        noun, gender = FRENCH_SHAPES[shape]
        k = 0 if gender == "m" else 1
        en.append(f"a {size} {colour} {shape}")
        fr.append(f"{('un', 'une')[k]} {FRENCH_SIZES[size][k]} {noun} {FRENCH_COLOURS[colour][k]}")
    return join_phrases(en), join_phrases(fr, "et")


def sample_pairs(n: int, seed: int, split: str = "train", max_objects: int = 4) -> List[Tuple[str, str]]:
    """``n`` random (English, French) caption pairs of 1..max_objects objects;
    the held-out split draws from another stream (and may repeat a training
    sentence only by chance: 128 phrases, 128**k sentences)."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "test": 2}[split]])
    sizes, pairs = list(SIZES), []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        objs = [(sizes[rng.integers(len(sizes))], COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                 CLASS_NAMES[rng.integers(len(CLASS_NAMES))]) for _ in range(k)]
        pairs.append(translate(objs))
    return pairs


def build_tokenizer():
    """One word-level tokenizer for both languages (accents kept)."""
    words = ["a", "and", ",", ".", *SIZES, *COLOUR_NAMES, *CLASS_NAMES, "un", "une", "et"]
    for table in (FRENCH_SIZES, FRENCH_COLOURS):
        words += [w for pair in table.values() for w in pair]
    words += [noun for noun, _ in FRENCH_SHAPES.values()]
    return word_tokenizer(list(dict.fromkeys(words)), strip_accents=False,
                          model_input_names=("input_ids", "attention_mask"))  # BART takes no token types


def make_model(vocab_size: int, d_model: int = 64, layers: int = 2):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                     decoder_ffn_dim=2 * d_model, max_position_embeddings=48, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                     decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = 2, 2, 3, 0
    gen.max_new_tokens, gen.num_beams, gen.do_sample = 40, 1, False
    gen.forced_bos_token_id = gen.forced_eos_token_id = None
    return model


def encode(tokenizer, pairs: Sequence[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Sources as the tokenizer gives them; labels = the target without its
    leading [CLS] (the decoder start), padding -100."""
    src = tokenizer([s for s, _ in pairs], padding=True, return_tensors="pt")
    tgt = tokenizer([t for _, t in pairs], padding=True, return_tensors="pt")
    labels = tgt["input_ids"][:, 1:].masked_fill(tgt["attention_mask"][:, 1:] == 0, -100)
    return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}


@torch.no_grad()
def exact_match(model, tokenizer, pairs: Sequence[Tuple[str, str]], device: torch.device,
                batch_size: int = 128) -> float:
    """Share of sources whose greedy translation equals the reference word for word."""
    model.eval()
    hits = 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        src = tokenizer([p[0] for p in chunk], padding=True, return_tensors="pt").to(device)
        out = model.generate(**src, max_new_tokens=40)
        for row, (_, ref) in zip(out, chunk):
            got = tokenizer.decode(row, skip_special_tokens=True).split()
            hits += got == tokenizer.decode(tokenizer(ref)["input_ids"], skip_special_tokens=True).split()
    return hits / max(len(pairs), 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", required=True, help="model directory to write (save_pretrained + tokenizer)")
    p.add_argument("--train-pairs", type=scene_count_arg, default=20000)
    p.add_argument("--val-pairs", type=scene_count_arg, default=500)
    p.add_argument("--steps", type=positive_int, default=3000, help="optimiser steps (warm-up, then cosine)")
    p.add_argument("--d-model", type=int_range(16, 1024), default=64)
    add_run_args(p, minutes=15.0, batch_size=64, lr=1e-3, eval_every=500)
    return p


def _main(argv: Optional[Sequence[str]]) -> int:
    args, device = parse_run_args(build_parser(), argv)
    n = args.train_pairs + args.val_pairs  # sentence pairs and their ids are kept: about 1 KiB a pair
    check_memory(n * 1024, f"--train-pairs + --val-pairs {n}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    train = sample_pairs(args.train_pairs, args.seed, "train")
    val = sample_pairs(args.val_pairs, args.seed, "val")
    model = make_model(len(tokenizer.get_vocab()), args.d_model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = np.random.default_rng(args.seed)
    step, start, history = 0, time.time(), []
    bar = tqdm(total=args.steps, desc="training", mininterval=5)
    try:
        for idx in shuffled_batches(g, len(train), args.batch_size, args.steps, args.minutes * 60, start):
            model.train()
            batch = {k: v.to(device) for k, v in encode(tokenizer, [train[i] for i in idx]).items()}
            loss = model(**batch).loss
            optimizer_step(opt, loss, model.parameters(), 1.0, step,
                           lr=warmup_cosine_lr(step, args.lr, 100, args.steps, pi_times_step_first=True))
            step += 1
            bar.update(1)
            if step % args.eval_every == 0:
                rec = {"step": step, "minutes": round((time.time() - start) / 60, 2),
                       "loss": round(float(loss.detach()), 4),
                       "exact_match": exact_match(model, tokenizer, val[:200], device)}
                history.append(rec)
                bar.write(str(rec))
    finally:
        bar.close()
    acc = exact_match(model, tokenizer, val, device)
    print(f"exact match on {len(val)} held-out captions: {acc:.3f}", flush=True)
    save_standin(args.out_dir, model, tokenizer, script=__file__, argv=argv, seed=args.seed, steps=step, start=start,
                 threads=args.threads, history=history,
                 what="translation stand-in: scene captions (data/scenes.py template) into French; not a real "
                      "translator",
                 train_pairs=args.train_pairs, val_pairs=args.val_pairs, val_exact_match=acc)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
