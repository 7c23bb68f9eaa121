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


def build_parser() -> argparse.ArgumentParser:
    from baselines.ViT.ViT_LRP import MODEL_FACTORIES
    from modules import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", choices=sorted(MODEL_FACTORIES),
                   help="the LRP copy to build (ignored for a model directory)")
    p.add_argument("--weights", type=cli.existing_path, default=None,
                   help="checkpoint or model directory (random weights without)")
    cli.add_device_arg(p)
    p.add_argument("--images", type=cli.int_range(1, 1024), default=16, help="random-noise images (seeded; 1-1024)")
    p.add_argument("--out", default="outputs/benchmarks/device_consistency.json")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from modules import cli

    args = build_parser().parse_args(argv)
    device = cli.resolve_device(args.device)
    cli.check_output_file(args.out, "--out")  # before minutes of work
    cli.set_tf32(False)
    torch.manual_seed(0)
    model = load_model(args.model, args.weights).eval()
    size = model.default_cfg["input_size"]
    cli.check_memory(args.images * 4 * 3 * int(torch.tensor(size).prod()), f"--images {args.images}")
    x = torch.rand(args.images, *size) * 2 - 1
    with torch.no_grad():
        index = model(x).argmax(-1)
    report = {"model": args.weights or args.model, "device": str(device), "images": args.images, "methods": {}}
    for method in METHOD_NAMES:
        cpu = explain(model, x, method, index=index)
        dev = explain(model.to(device), x.to(device), method, index=index.to(device)).cpu()
        model.cpu()
        f64 = explain(model.double(), x.double(), method, index=index)
        model.float()
        report["methods"][method] = {"device_vs_cpu": compare(dev, cpu), "float64_vs_float32_cpu": compare(f64, cpu)}
        r = report["methods"][method]
        print(f"{method:<26} {device} vs cpu: max {r['device_vs_cpu']['max_abs_diff']:.2e} "
              f"corr {r['device_vs_cpu']['mean_correlation']:.6f} | fp64 vs fp32: max "
              f"{r['float64_vs_float32_cpu']['max_abs_diff']:.2e} corr {r['float64_vs_float32_cpu']['mean_correlation']:.6f}",
              flush=True)
    cli.atomic_write_json(args.out, report)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input exits 2 with one line (:func:`modules.cli.run_main`)."""
    from modules import cli

    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
