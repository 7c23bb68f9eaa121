"""Offline perturbation table (../shared/METHODS.md section 5) on the synthetic
stand-in: every method, positive and negative, one AUC table.

    python baselines/ViT/demo_perturbation.py

uses the small ViT in ``samples/synthetic_vit`` and the stand-in's validation
split as an ``ImageFolder`` tree (written by ``data/synthetic.py`` into
``--data-dir`` when missing, with the seed, size and count recorded in the
model's config.json).  For each method it runs ``generate_visualizations.py``
then ``perturbation_eval.py --pos`` and ``--neg`` with ``--tie-break`` (both
resumable: a rerun skips finished work), and prints and writes ``table.md`` /
``table.json``.  ``--compare-tie-breaks`` also re-scores the same stored maps
with every tie rule (``OUTPUT_DIR/METHOD/VIS_CLASS/ties/RULE``) and writes
``tie_breaks.md`` / ``tie_breaks.json``: the AUCs under each rule, the largest
per-step accuracy difference between rules and the share of removed pixels
that were tied (issue 16).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch

from baselines.ViT import generate_visualizations as gv
from baselines.ViT import perturbation_eval as pe
from baselines.ViT.perturbation_data import RESULTS_NAME, read_results
from baselines.ViT.perturbation_metrics import DEFAULT_TIE_BREAK, DEFAULT_TIE_SEED, DIRECTIONS, TIE_BREAKS
from baselines.ViT.ViT_LRP import CheckpointError, load_model
from modules.cli import (CLIError, atomic_write_json, atomic_write_text, check_output_dir, int_range,
                         non_negative_int, positive_int, resolve_device)

MAX_DEMO_IMAGES = 10 ** 6
"""Most stand-in images --n-val writes (to disk, one at a time)."""
from modules.methods import METHOD_CHOICES, METHOD_NAMES, METHODS, resolve_method

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_WEIGHTS = os.path.join(REPO, "samples", "synthetic_vit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="model directory (config.json + model.safetensors)")
    p.add_argument("--data-dir", default=os.path.join("outputs", "demo", "data", "val"),
                   help="validation ImageFolder tree; written with data/synthetic.py when missing")
    p.add_argument("--n-val", type=int_range(1, MAX_DEMO_IMAGES), default=None,
                   help=f"images to write when --data-dir is missing (1..{MAX_DEMO_IMAGES}); None: the model config's "
                        "n_val, else 400")
    p.add_argument("--output-dir", default=os.path.join("outputs", "demo", "perturbation"),
                   help="maps go to OUTPUT_DIR/METHOD/VIS_CLASS; the table to OUTPUT_DIR")
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_CHOICES, help="methods")
    p.add_argument("--vis-class", default="top", choices=("top", "target"), help="explained class")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only this many images (evenly spaced)")
    p.add_argument("--batch-size", type=positive_int, default=50, help="images per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="image-loading worker processes")
    p.add_argument("--tie-break", default=DEFAULT_TIE_BREAK, choices=TIE_BREAKS,
                   help="order among pixels of equal relevance (see perturbation_eval.py --help)")
    p.add_argument("--tie-seed", type=int, default=DEFAULT_TIE_SEED, help="seed of the random tie order")
    p.add_argument("--compare-tie-breaks", action="store_true",
                   help="also score the same maps with every tie rule and write tie_breaks.md")
    return p


class _Failed(Exception):
    """A step failed (it printed its one-line error); carries its exit status."""


def _finished(results: Dict, identity: Dict, direction: str, tie_break: str, tie_seed: int) -> bool:
    """Whether ``results`` (a results.json) already holds ``direction`` for
    these maps under this tie rule and seed."""
    return (direction in results and results.get("maps") == identity and results.get("tie_break") == tie_break
            and results.get("tie_seed") == (tie_seed if tie_break == "random" else None))


def score(maps_dir: str, out: str, name: str, tie_break: str, tie_seed: int, common: List[str]) -> Dict:
    """Both directions of ``perturbation_eval.py`` on the maps in ``maps_dir``
    into ``out`` (skipping a direction already done there); returns results.json."""
    json_path = os.path.join(out, pe.JSON_NAME)
    results: Dict = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            results = json.load(f)
    identity, _ = read_results(os.path.join(maps_dir, RESULTS_NAME))
    for flag, direction in (("--pos", "positive"), ("--neg", "negative")):
        if _finished(results, identity, direction, tie_break, tie_seed):
            continue  # done by an earlier run on these maps with this rule
        status = pe.main(["--results", maps_dir, flag, "--method", name, "--output-dir", out, "--tie-break",
                          tie_break, "--tie-seed", str(tie_seed),
                          "--overwrite"] + common)  # the demo owns the folder and found this direction not done
        if status:
            raise _Failed(status)
    with open(json_path) as f:
        return json.load(f)


def format_tie_table(rows: List[Dict], vis_class: str, n: int, seed: int) -> str:
    """Markdown table of the effect of the tie rule (issue 16)."""
    rules = " / ".join(TIE_BREAKS)
    lines = [f"Perturbation AUC under each tie rule ({vis_class} class, {n} images; random seed {seed}). "
             "'Largest step difference': the largest difference in accuracy at one step between any two rules, "
             "in points. 'Tied': the largest share, over the steps, of removed pixels that were tied with a kept "
             "pixel (what the rule decided).", "",
             f"| method | negative AUC ({rules}) | positive AUC ({rules}) | largest step difference neg / pos "
             "| tied neg / pos (%) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        neg = " / ".join(f"{r['auc'][t]['negative']:.2f}" for t in TIE_BREAKS)
        pos = " / ".join(f"{r['auc'][t]['positive']:.2f}" for t in TIE_BREAKS)
        lines.append(f"| {r['label']} (`{r['method']}`) | {neg} | {pos} | {r['max_step_diff']['negative']:.2f} / "
                     f"{r['max_step_diff']['positive']:.2f} | {100 * r['tied_max']['negative']:.1f} / "
                     f"{100 * r['tied_max']['positive']:.1f} |")
    return "\n".join(lines)


def compare_tie_breaks(maps_dir: str, name: str, main_results: Dict, main_rule: str, seed: int,
                       common: List[str]) -> Dict:
    """Score the maps in ``maps_dir`` with every tie rule (the main run's rule
    is reused) and summarise the differences for one method."""
    per_rule = {}
    for rule in TIE_BREAKS:
        per_rule[rule] = main_results if rule == main_rule else \
            score(maps_dir, os.path.join(maps_dir, "ties", rule), name, rule, seed, common)
    row: Dict = {"method": name, "label": METHODS[name].label, "auc": {}, "accuracy": {}, "tied_share": {},
                 "max_step_diff": {}, "tied_max": {}}
    for rule, res in per_rule.items():
        row["auc"][rule] = {d: res[d]["auc"] for d in DIRECTIONS}
        row["accuracy"][rule] = {d: res[d]["accuracy"] for d in DIRECTIONS}
        row["tied_share"][rule] = {d: res[d]["tied_share"] for d in DIRECTIONS}
    for d in DIRECTIONS:
        acc = [per_rule[t][d]["accuracy"] for t in TIE_BREAKS]
        row["max_step_diff"][d] = 100 * max(max(a[i] for a in acc) - min(a[i] for a in acc)
                                            for i in range(len(acc[0])))
        row["tied_max"][d] = max(max(per_rule[t][d]["tied_share"]) for t in TIE_BREAKS)
    return row


def ensure_data(data_dir: str, cfg: Dict, size: int, n_val: Optional[int]) -> None:
    """Write the stand-in's validation split as an ImageFolder tree if absent."""
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        return
    try:
        from data.synthetic import write_imagefolder
    except ModuleNotFoundError:  # an editable install made before data/ existed
        sys.path.insert(0, REPO)
        from data.synthetic import write_imagefolder

    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    n = n_val or int(data.get("n_val", 400))
    seed, split = int(data.get("seed", 0)), str(data.get("val_split", "val"))
    print(f"writing {n} synthetic {split} images (seed {seed}, {size}x{size}) to {data_dir}", file=sys.stderr)
    write_imagefolder(data_dir, n, seed=seed, size=size, split=split, quiet=False)


def format_table(rows: List[Dict], vis_class: str, n: int, tie_break: str = DEFAULT_TIE_BREAK,
                 tie_seed: int = DEFAULT_TIE_SEED) -> str:
    """Markdown table of the AUCs (METHODS §5: higher is better for negative,
    lower for positive)."""
    ties = f"ties: {tie_break}" + (f", seed {tie_seed}" if tie_break == "random" else "")
    lines = [f"Perturbation AUC ({vis_class} class, {n} images, {ties}; negative: higher is better, "
             "positive: lower is better)", "",
             "| method | accuracy (%) | negative AUC | positive AUC |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} (`{r['method']}`) | {100 * r['accuracy']:.1f} | {r['negative']:.2f} | "
                     f"{r['positive']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.isdir(args.weights):
        print(f"error: model directory not found: {args.weights} "
              "(train it with: python baselines/ViT/train_synthetic.py --out-dir samples/synthetic_vit)",
              file=sys.stderr)
        return 2
    try:
        model = load_model("vit_base_patch16_224", args.weights)
        with open(os.path.join(args.weights, "config.json")) as f:
            cfg = json.load(f)
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    try:  # refused before the data are written
        resolve_device(args.device)
        check_output_dir(args.output_dir, flag="--output-dir")
        if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
            raise CLIError(f"--data-dir {args.data_dir}: exists and is not a directory")
        if not (os.path.isdir(args.data_dir) and os.listdir(args.data_dir)):
            check_output_dir(args.data_dir, create=False, flag="--data-dir")
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_data(args.data_dir, cfg, int(model.default_cfg["input_size"][-1]), args.n_val)

    if args.tie_seed < 0:
        print(f"error: --tie-seed must be non-negative, not {args.tie_seed}", file=sys.stderr)
        return 2
    rows, tie_rows = [], []
    common = ["--weights", args.weights, "--batch-size", str(args.batch_size), "--device", args.device,
              "--num-workers", str(args.num_workers)]
    for name in dict.fromkeys(resolve_method(m).name for m in args.methods):
        out = os.path.join(args.output_dir, name, args.vis_class)
        gen = ["--method", name, "--imagenet-validation-path", args.data_dir, "--vis-class", args.vis_class,
               "--output-dir", out] + common
        if args.limit is not None:
            gen += ["--limit", str(args.limit)]
        status = gv.main(gen)
        if status:
            return status
        try:
            results = score(out, out, name, args.tie_break, args.tie_seed, common[2:])
            if args.compare_tie_breaks:
                tie_rows.append(compare_tie_breaks(out, name, results, args.tie_break, args.tie_seed, common[2:]))
        except _Failed as exc:
            return int(exc.args[0])
        rows.append({"method": name, "label": METHODS[name].label, "accuracy": results["negative"]["accuracy"][0],
                     "negative": results["negative"]["auc"], "positive": results["positive"]["auc"],
                     "num_images": results["negative"]["num_images"]})
    table = format_table(rows, args.vis_class, rows[0]["num_images"] if rows else 0, args.tie_break, args.tie_seed)
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "table.md"), table + "\n")
    atomic_write_json(os.path.join(args.output_dir, "table.json"), rows)
    print(table)
    if args.compare_tie_breaks:
        ties = format_tie_table(tie_rows, args.vis_class, rows[0]["num_images"] if rows else 0, args.tie_seed)
        atomic_write_text(os.path.join(args.output_dir, "tie_breaks.md"), ties + "\n")
        atomic_write_json(os.path.join(args.output_dir, "tie_breaks.json"), tie_rows)
        print(ties)
    return 0


if __name__ == "__main__":
    sys.exit(main())
