"""Speed of each explanation method beside the forward+backward floor.

For each batch size: images/s of every method, of a forward pass, and of a
forward+backward pass of the same model (the floor any gradient-based
explanation pays), plus peak memory.  Results go to a JSON file.

    python benchmarks/explain_speed.py --model vit_base_patch16_224 --batch-sizes 1 --device cpu
    python benchmarks/explain_speed.py --batch-sizes 1 32 --device cuda

With ``--timm-model NAME`` (default: the same architecture from timm) the
unmodified timm model is timed too, side by side in the same run: its
forward, its forward inside the LRP scope (the scope's per-op overhead),
its forward+backward and every ``--methods`` entry it supports through the
engine (attention methods by hooks, LRP methods through the scope; rows
``timm:...``, ratios to the timm model's own forward+backward).
``--timm-model none`` skips it.

Random weights: speed does not depend on them.  This is not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from baselines.ViT.ViT_LRP import MODEL_FACTORIES, create_model
from modules.explain import explain, supported_methods
from modules.lrp_scope import relevance_scope
from modules.methods import METHOD_NAMES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs, and peak memory."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times), "seconds_min": min(times)}
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def build_parser() -> argparse.ArgumentParser:
    from modules import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", choices=sorted(MODEL_FACTORIES))
    p.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    p.add_argument("--batch-sizes", nargs="+", type=cli.int_range(1, 1024), default=[1, 32],
                   help="images per call (1-1024 each)")
    cli.add_device_arg(p)
    p.add_argument("--warmup", type=cli.int_range(0, 1000), default=2, help="untimed calls first (0-1000)")
    p.add_argument("--repeats", type=cli.int_range(1, 1000), default=5, help="timed calls (1-1000)")
    cli.add_threads_arg(p)
    p.add_argument("--timm-model", default=None,
                   help="unmodified timm model to time beside the copy (default: --model; 'none' skips)")
    p.add_argument("--out", default="outputs/benchmarks/explain_speed.json",
                   help="JSON rewritten after each batch size (a partial run keeps its rows)")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from modules import cli

    args = build_parser().parse_args(argv)
    device = cli.resolve_device(args.device)
    cli.check_output_file(args.out, "--out")  # before minutes of timing
    cli.apply_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).to(device).eval()
    size = model.default_cfg["input_size"]
    timm_model = None
    timm_name = args.model if args.timm_model is None else args.timm_model
    if timm_name != "none":
        import timm

        timm_model = timm.create_model(timm_name, pretrained=False).to(device).eval()
    info = {
        "model": args.model, "timm_model": timm_name, "device": str(device), "dtype": "float32", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d"), "results": [],
    }
    print(f"{args.model} on {info['gpu'] or info['machine']} ({device}), torch {torch.__version__}, "
          f"{info['threads']} threads", flush=True)
    for bs in args.batch_sizes:
        x = torch.randn(bs, *size, device=device)

        def forward():
            with torch.no_grad():
                model(x)

        def forward_backward():
            """A training-style step: gradients for the input and every parameter."""
            model.zero_grad(set_to_none=True)
            logits = model(x.requires_grad_(True))
            logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()

        rows: Dict[str, Dict[str, float]] = {}
        rows["forward"] = time_fn(forward, device, args.warmup, args.repeats)
        rows["forward+backward"] = time_fn(forward_backward, device, args.warmup, args.repeats)
        model.zero_grad(set_to_none=True)
        for method in args.methods:
            rows[method] = time_fn(lambda: explain(model, x, method), device, args.warmup, args.repeats)
        floor = rows["forward+backward"]["seconds"]
        if timm_model is not None:
            def timm_forward_backward():
                timm_model.zero_grad(set_to_none=True)
                logits = timm_model(x.requires_grad_(True))
                logits.gather(1, logits.argmax(-1, keepdim=True)).sum().backward()

            rows["timm:forward+backward"] = time_fn(timm_forward_backward, device, args.warmup, args.repeats)
            timm_model.zero_grad(set_to_none=True)

            def timm_forward():
                with torch.no_grad():
                    timm_model(x)

            def timm_forward_in_scope():
                """The LRP scope's per-op cost on a forward alone (rules attached, no backward)."""
                with relevance_scope(timm_model, "TA"):
                    timm_model(x.detach().requires_grad_(True))

            rows["timm:forward"] = time_fn(timm_forward, device, args.warmup, args.repeats)
            rows["timm:forward in LRP scope"] = time_fn(timm_forward_in_scope, device, args.warmup, args.repeats)
            offered = supported_methods(timm_model)
            for method in [m for m in args.methods if m in offered]:  # LRP methods through the scope
                rows[f"timm:{method}"] = time_fn(lambda: explain(timm_model, x, method), device, args.warmup,
                                                 args.repeats)
        if timm_model is not None:
            # side by side, round robin: copy and scope alternate, so a machine whose load drifts
            # affects both; the median of the per-round ratios
            for method in [m for m in args.methods if m in offered and m in METHOD_NAMES]:
                ratios = []
                for _ in range(args.repeats):
                    a = time_fn(lambda: explain(model, x, method), device, 0, 1)["seconds"]
                    b = time_fn(lambda: explain(timm_model, x, method), device, 0, 1)["seconds"]
                    ratios.append(b / a)
                rows[f"scope/copy:{method}"] = {"seconds": float("nan"), "ratio": statistics.median(ratios),
                                               "ratios": ratios}
        print(f"\nbatch {bs}:  {'what':<36}{'images/s':>10}{'s/batch':>10}{'x fwd+bwd':>11}", flush=True)
        for name, r in rows.items():
            if name.startswith("scope/copy:"):
                info["results"].append({"batch_size": bs, "what": name, **r})
                print(f"{'':12}{name:<36}  scope time / copy time, round robin: median {r['ratio']:.3f}", flush=True)
                continue
            r["images_per_second"] = bs / r["seconds"]
            own_floor = rows["timm:forward+backward"]["seconds"] if name.startswith("timm:") else floor
            r["ratio_to_forward_backward"] = r["seconds"] / own_floor
            info["results"].append({"batch_size": bs, "what": name, **r})
            print(f"{'':12}{name:<36}{r['images_per_second']:>10.2f}{r['seconds']:>10.4f}"
                  f"{r['ratio_to_forward_backward']:>11.2f}", flush=True)
        cli.atomic_write_text(args.out, json.dumps(info, indent=2))  # after each batch size: partial runs keep theirs
    print(f"\nwrote {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input exits 2 with one line (:func:`modules.cli.run_main`)."""
    from modules import cli

    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
