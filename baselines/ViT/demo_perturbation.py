"""Offline perturbation table (../shared/METHODS.md section 5) on the synthetic
stand-in: every method, positive and negative, one AUC table.

    python baselines/ViT/demo_perturbation.py

uses the small ViT in ``samples/synthetic_vit`` and the stand-in's validation
split as an ``ImageFolder`` tree (written by ``data/synthetic.py`` into
``--data-dir`` when missing, with the seed, size and count recorded in the
model's config.json).  For each method it runs ``generate_visualizations.py``
then ``perturbation_eval.py --pos`` and ``--neg`` (both resumable: a rerun
skips finished work), and prints and writes ``table.md`` / ``table.json``.
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
from baselines.ViT.ViT_LRP import CheckpointError, load_model
from modules.methods import METHOD_CHOICES, METHOD_NAMES, METHODS, resolve_method

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_WEIGHTS = os.path.join(REPO, "samples", "synthetic_vit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="model directory (config.json + model.safetensors)")
    p.add_argument("--data-dir", default=os.path.join("outputs", "demo", "data", "val"),
                   help="validation ImageFolder tree; written with data/synthetic.py when missing")
    p.add_argument("--n-val", type=int, default=None,
                   help="images to write when --data-dir is missing; None: the model config's n_val, else 400")
    p.add_argument("--output-dir", default=os.path.join("outputs", "demo", "perturbation"),
                   help="maps go to OUTPUT_DIR/METHOD/VIS_CLASS; the table to OUTPUT_DIR")
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_CHOICES, help="methods")
    p.add_argument("--vis-class", default="top", choices=("top", "target"), help="explained class")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many images (evenly spaced)")
    p.add_argument("--batch-size", type=int, default=50, help="images per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--num-workers", type=int, default=0, help="image-loading worker processes")
    return p


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


def format_table(rows: List[Dict], vis_class: str, n: int) -> str:
    """Markdown table of the AUCs (METHODS §5: higher is better for negative,
    lower for positive)."""
    lines = [f"Perturbation AUC ({vis_class} class, {n} images; negative: higher is better, "
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
    ensure_data(args.data_dir, cfg, int(model.default_cfg["input_size"][-1]), args.n_val)

    rows = []
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
        results = {}
        json_path = os.path.join(out, pe.JSON_NAME)
        if os.path.isfile(json_path):
            with open(json_path) as f:
                results = json.load(f)
        identity, _ = read_results(os.path.join(out, RESULTS_NAME))
        for flag, direction in (("--pos", "positive"), ("--neg", "negative")):
            if direction in results and results.get("maps") == identity:
                continue  # done by an earlier run on these maps
            status = pe.main(["--results", out, flag, "--method", name] + common[2:])
            if status:
                return status
        with open(json_path) as f:
            results = json.load(f)
        rows.append({"method": name, "label": METHODS[name].label, "accuracy": results["negative"]["accuracy"][0],
                     "negative": results["negative"]["auc"], "positive": results["positive"]["auc"],
                     "num_images": results["negative"]["num_images"]})
    table = format_table(rows, args.vis_class, rows[0]["num_images"] if rows else 0)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output_dir, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
