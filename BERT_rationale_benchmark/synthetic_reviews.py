"""An offline stand-in for ERASER Movie Reviews: generated reviews in the ERASER format.

Each review is a few sentences of neutral filler (plot, setting, crew) with
sentiment sentences inserted at random places.  The sentiment sentences
carry a phrase drawn from a positive or a negative lexicon, the same polarity
as the review's label; the **evidence spans are exactly those phrases** (the
frame words around them, such as "overall , it is", are not evidence).  A
model can only tell the label from the lexicon phrases, so an explanation
that finds them scores high token F1 (../shared/METHODS.md section 6).

The output directory has the layout of the real data::

    out_dir/train.jsonl  val.jsonl  test.jsonl  docs/<docid>

Generation is deterministic for a given seed.  Usage::

    python BERT_rationale_benchmark/synthetic_reviews.py --out-dir outputs/eraser_demo/data
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules import cli  # noqa: E402

__all__ = ["POSITIVE_PHRASES", "NEGATIVE_PHRASES", "QUERY", "Review", "make_review", "generate", "build_parser",
           "main"]

QUERY = "What is the sentiment of this review?"

POSITIVE_PHRASES: Tuple[str, ...] = (
    "a masterpiece", "brilliantly acted", "wonderful", "deeply moving", "a delight from start to finish",
    "superb performances", "beautifully shot", "genuinely funny", "highly recommended", "an absolute joy",
    "gripping", "outstanding", "charming and witty", "a must see", "terrific", "stunning visuals",
    "smart and heartfelt", "excellent", "a real treat", "masterful direction", "thrilling", "delightful",
    "an instant classic", "powerful and touching", "a joy to watch",
)
NEGATIVE_PHRASES: Tuple[str, ...] = (
    "a total mess", "painfully boring", "terrible", "poorly acted", "a waste of time", "awful dialogue",
    "dull and lifeless", "utterly predictable", "a disaster", "badly written", "tedious", "laughably bad",
    "clumsy direction", "forgettable", "a complete failure", "weak performances", "unbearably slow",
    "disappointing", "embarrassing", "poorly edited", "incoherent", "a dreadful bore", "lazy and cheap",
    "ugly and pointless", "a chore to sit through",
)
# sentiment sentences: the phrase replaces {p}; the frame words are not evidence
FRAMES: Tuple[str, ...] = (
    "overall , it is {p} .", "the acting is {p} .", "honestly , this movie is {p} .", "{p} .",
    "in the end the film feels {p} .", "i thought the whole thing was {p} .", "the result is {p} .",
    "from the first scene it is {p} .", "as a whole the picture is {p} .", "my verdict : {p} .",
)
SUBJECTS = ("the film", "the story", "the director", "the main character", "the second act", "the script",
            "the cast", "the opening", "the camera", "the sequel", "her brother", "the old man", "the crew",
            "the narrator", "the villain")
VERBS = ("follows", "introduces", "returns to", "takes place in", "moves between", "describes", "visits",
         "begins with", "ends with", "focuses on", "cuts to", "explains", "remembers", "leaves")
OBJECTS = ("a small town", "a family in the city", "the events of one summer", "an old friend", "a long journey",
           "the history of the band", "a farm near the coast", "two brothers", "a school in the north",
           "the night of the party", "a trip to the mountains", "the hotel", "a ship at sea", "the local police",
           "a wedding", "three days in march", "the office", "a train station")
EXTRAS = ("", "", "", "during the war", "after the opening scene", "in the last hour", "with a few flashbacks",
          "for about two hours", "before the credits", "in black and white", "on a rainy evening",
          "according to the press notes", "in the original novel")


@dataclass(frozen=True)
class Review:
    """One generated review: sentences of tokens and its evidence spans
    ``(start_token, end_token, text)`` over the flattened tokens."""

    label: str
    sentences: Tuple[Tuple[str, ...], ...]
    evidences: Tuple[Tuple[int, int, int, str], ...]  # (start_token, end_token, sentence, text)


def _filler(rng: random.Random) -> List[str]:
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(EXTRAS)}".split()
    if rng.random() < 0.25:
        words += [","] + f"and {rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
    return words + ["."]


def make_review(rng: random.Random, label: str, n_filler: int, n_sentiment: int) -> Review:
    """A review of ``n_filler`` neutral sentences with ``n_sentiment``
    sentiment sentences (phrases of ``label``'s polarity) at random positions."""
    lexicon = POSITIVE_PHRASES if label == "POS" else NEGATIVE_PHRASES
    kinds = ["filler"] * n_filler + ["sentiment"] * n_sentiment
    rng.shuffle(kinds)
    phrases = rng.sample(lexicon, n_sentiment)
    sentences: List[Tuple[str, ...]] = []
    evidences = []
    offset = 0
    for kind in kinds:
        if kind == "filler":
            words = _filler(rng)
        else:
            phrase = phrases.pop()
            before, after = rng.choice(FRAMES).split("{p}")
            pre, ptoks, post = before.split(), phrase.split(), after.split()
            words = pre + ptoks + post
            start = offset + len(pre)
            evidences.append((start, start + len(ptoks), len(sentences), phrase))
        sentences.append(tuple(words))
        offset += len(words)
    return Review(label, tuple(sentences), tuple(evidences))


def generate(out_dir: str | Path, n_train: int = 300, n_val: int = 40, n_test: int = 60, seed: int = 0,
             min_filler: int = 2, max_filler: int = 5, min_sentiment: int = 2, max_sentiment: int = 5,
             long_fraction: float = 0.05, long_filler: int = 14) -> Dict[str, int]:
    """Write an ERASER-format directory of generated reviews.

    Labels alternate NEG/POS within each split (balanced).  A fraction
    ``long_fraction`` of the reviews get ``long_filler`` filler sentences so
    that some exceed a short model input and are truncated, as in the real data.

    Returns
    -------
    dict
        Number of annotations per split.
    """
    out = Path(out_dir)
    docs = out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    counts = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines = []
        for i in range(n):
            label = ("NEG", "POS")[i % 2]
            n_filler = long_filler if rng.random() < long_fraction else rng.randint(min_filler, max_filler)
            review = make_review(rng, label, n_filler, rng.randint(min_sentiment, max_sentiment))
            docid = f"{label.lower()}_{split}_{i:04d}.txt"
            (docs / docid).write_text("\n".join(" ".join(s) for s in review.sentences) + "\n", encoding="utf-8")
            evidences = [[{"docid": docid, "start_token": s, "end_token": e, "start_sentence": sent,
                           "end_sentence": sent + 1, "text": text}] for s, e, sent, text in review.evidences]
            lines.append(json.dumps({"annotation_id": docid, "classification": label, "docids": None,
                                     "evidences": evidences, "query": QUERY, "query_type": None}))
        (out / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        counts[split] = n
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate an ERASER-format stand-in for Movie Reviews: neutral "
                                     "filler plus lexicon sentiment phrases that are the evidence spans.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="directory to write {train,val,test}.jsonl and docs/ into")
    parser.add_argument("--train", type=cli.int_range(0, 1_000_000), default=300, help="training reviews")
    parser.add_argument("--val", type=cli.int_range(0, 1_000_000), default=40, help="validation reviews")
    parser.add_argument("--test", type=cli.int_range(0, 1_000_000), default=60, help="test reviews")
    parser.add_argument("--seed", type=cli.int_range(0, 2 ** 63 - 1), default=0,
                        help="random seed (same seed, same files)")
    parser.add_argument("--long-fraction", type=cli.probability, default=0.05,
                        help="fraction of long reviews (14 filler sentences) that a short model input truncates")
    return parser


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cli.check_output_dir(args.out_dir, flag="--out-dir")
    try:
        counts = generate(args.out_dir, args.train, args.val, args.test, args.seed, long_fraction=args.long_fraction)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; the files written so far are incomplete: run the same command again") \
            from None
    print(f"wrote {sum(counts.values())} reviews to {args.out_dir} "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input exits 2 with one line, Ctrl-C 130 (:func:`modules.cli.run_main`)."""
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
