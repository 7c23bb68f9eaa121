"""Scope / copy cost of the LRP methods in process CPU time, round robin (issue 21).

``benchmarks/explain_speed.py`` times wall clock, which on a shared machine
swings with the other processes' load.  This times the copy
(``baselines.ViT.ViT_LRP``) and the unmodified timm model through the LRP
scope alternately, one thread, in CPU time of this process (user + system,
page faults included), and reports the median of the per-round ratios, the
wall-clock ratios and the minor page faults beside them.  The first row is
the forward alone: timm's plain forward (no_grad) against its forward in the
scope (rule set TA, with the gradient graph): the scope's overhead on a
forward.

    python benchmarks/scope_cpu_ratio.py --batch-size 8 --out benchmarks/results/X.json

Random weights: speed does not depend on them.  This is not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Optional, Sequence

import torch


def build_parser() -> argparse.ArgumentParser:
    from baselines.ViT.ViT_LRP import _CONFIGS
    from modules import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224", choices=sorted(_CONFIGS),
                   help="a ViT the copy builds; timm builds the same architecture, unmodified")
    p.add_argument("--batch-size", type=cli.int_range(1, 256), default=8, help="images per call (1-256)")
    p.add_argument("--methods", nargs="+", default=["transformer_attribution", "lrp_last_layer", "lrp"],
                   choices=["transformer_attribution", "lrp_last_layer", "lrp", "attnlrp", "cplrp"])
    p.add_argument("--rounds", type=cli.int_range(1, 100), default=3, help="copy/scope alternations (1-100)")
    p.add_argument("--cpu", default="", help="the machine, in words, for the record")
    p.add_argument("--out", default="outputs/benchmarks/scope_cpu_ratio.json",
                   help="JSON written after each row (a partial run keeps its rows)")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from modules import cli

    args = build_parser().parse_args(argv)
    cli.check_output_file(args.out, "--out")  # before minutes of timing
    import timm

    from baselines.ViT.ViT_LRP import create_model
    from modules.explain import explain
    from modules.lrp_scope import relevance_scope

    torch.set_num_threads(1)
    torch.manual_seed(0)
    copy = create_model(args.model).eval()
    tm = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch_size, *copy.default_cfg["input_size"])

    def fwd_plain():
        with torch.no_grad():
            tm(x)

    def fwd_scope():
        with relevance_scope(tm, "TA"):
            tm(x.detach().requires_grad_(True))

    fns = {"timm forward (no_grad) vs forward in LRP scope (TA, gradient graph)": (fwd_plain, fwd_scope)}
    for m in args.methods:
        fns[m] = ((lambda m=m: explain(copy, x, m)), (lambda m=m: explain(tm, x, m)))

    def meas(f):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c, t = time.process_time(), time.perf_counter()
        f()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return time.process_time() - c, time.perf_counter() - t, r1.ru_minflt - r0.ru_minflt

    res = {"model": args.model, "batch_size": args.batch_size, "threads": 1, "torch": torch.__version__,
           "cpu": args.cpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_before": os.getloadavg(), "rows": []}
    for k, (a, b) in fns.items():
        a()
        b()
        rows = []
        for _ in range(args.rounds):
            ma, mb = meas(a), meas(b)
            rows.append({"copy_cpu_s": ma[0], "scope_cpu_s": mb[0], "copy_wall_s": ma[1], "scope_wall_s": mb[1],
                         "copy_faults": ma[2], "scope_faults": mb[2]})
            print(f"   {k}: cpu {ma[0]:.2f}/{mb[0]:.2f} wall {ma[1]:.2f}/{mb[1]:.2f} faults {ma[2]}/{mb[2]}",
                  flush=True)
        r = {"what": k, "cpu_ratio_median": statistics.median(r["scope_cpu_s"] / r["copy_cpu_s"] for r in rows),
             "wall_ratio_median": statistics.median(r["scope_wall_s"] / r["copy_wall_s"] for r in rows),
             "rounds": rows}
        res["rows"].append(r)
        print(f"{k} batch {args.batch_size}: cpu ratio {r['cpu_ratio_median']:.3f} wall ratio "
              f"{r['wall_ratio_median']:.3f}", flush=True)
        res["load_after"] = os.getloadavg()
        cli.atomic_write_text(args.out, json.dumps(res, indent=1))  # after each row: partial runs keep theirs
    print(f"wrote {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from modules import cli

    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
