"""How far float32 maps on another device are from the CPU's, per method.

Explains the same images on the CPU and on ``--device`` (TF32 off) for a
fixed class, and reports per method the worst difference relative to each
map's range after min-max normalisation, and the mean per-image Pearson
correlation.  A float64 run on the CPU gives the rounding-only reference.

    python benchmarks/device_consistency.py --weights samples/synthetic_vit --device cuda

Not a test: LRP-based maps are discontinuous in their inputs (sign switches,
near-zero denominators), so how much they move is a property of the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from baselines.ViT.ViT_explanation_generator import explain, normalize
from baselines.ViT.ViT_LRP import load_model
from modules.methods import METHOD_NAMES


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = normalize(a.float()).flatten(1), normalize(b.float()).flatten(1)
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1) + 1e-12)
    return {"max_abs_diff": float((a - b).abs().max()), "mean_correlation": float(corr.mean())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--weights", default=None, help="checkpoint or model directory (random weights without)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=16, help="random-noise images (seeded)")
    p.add_argument("--out", default="outputs/benchmarks/device_consistency.json")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = load_model(args.model, args.weights).eval()
    x = torch.rand(args.images, *model.default_cfg["input_size"]) * 2 - 1
    with torch.no_grad():
        index = model(x).argmax(-1)
    report = {"model": args.weights or args.model, "device": args.device, "images": args.images, "methods": {}}
    for method in METHOD_NAMES:
        cpu = explain(model, x, method, index=index)
        dev = explain(model.to(args.device), x.to(args.device), method, index=index.to(args.device)).cpu()
        model.cpu()
        f64 = explain(model.double(), x.double(), method, index=index)
        model.float()
        report["methods"][method] = {"device_vs_cpu": compare(dev, cpu), "float64_vs_float32_cpu": compare(f64, cpu)}
        r = report["methods"][method]
        print(f"{method:<26} {args.device} vs cpu: max {r['device_vs_cpu']['max_abs_diff']:.2e} "
              f"corr {r['device_vs_cpu']['mean_correlation']:.6f} | fp64 vs fp32: max "
              f"{r['float64_vs_float32_cpu']['max_abs_diff']:.2e} corr {r['float64_vs_float32_cpu']['mean_correlation']:.6f}",
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
