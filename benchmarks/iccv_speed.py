"""Speed of the ICCV 2021 explanations beside one forward+backward of the same model (issue 11).

One function per model (``bench_detr``, ...; register it in ``MODELS``), each
returning rows ``{"model", "batch", "what", "seconds", ...}``; the script
adds the ratio to the model's forward+backward at the same batch size and
writes a JSON file and a Markdown table.

    python benchmarks/iccv_speed.py --models detr --batch-sizes 1 8 --threads 2 --device cpu
    python benchmarks/iccv_speed.py --models lxmert --batch-sizes 1 8 --threads 2 --device cpu

LXMERT: ``LxmertForQuestionAnswering(LxmertConfig())`` — base size (9 language,
5 object-relationship, 5 cross layers, hidden 768), random weights, 20 question
tokens and 36 boxes of 2048 features; forward, forward+backward and every
attention method (the predicted answer explained).

DETR: ``DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False))``
— DETR-R50 sized (timm ResNet-50 backbone built offline, 6+6 layers, 100
queries), random weights (speed does not depend on them), input 800x1066.
Rows: forward (no graph); forward+backward (the explained logit's
``.backward()`` to every trainable parameter, as training would); every
attention method through :func:`modules.explain.explain` (one query per
image); and K queries of one image explained from one forward pass by each
strategy of :mod:`modules.detection` (``retain``: K backward passes with
``retain_graph``; ``batched``: one vectorised backward,
``is_grads_batched``; ``repeat``: the image repeated K times, one
forward+backward).  This is not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from modules.cli import (atomic_write_json, atomic_write_text, check_output_file, non_negative_int, positive_int,
                         resolve_device, run_main)


LRP_METHODS = ("transformer_attribution", "lrp_last_layer")
"""The coupled-stream LRP methods (METHODS_ICCV.md sections 2, 4), timed beside the attention methods."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(fns: Sequence[Tuple[str, Callable[[], object]]], device: torch.device, warmup: int,
              repeats: int) -> Dict[str, Dict[str, float]]:
    """Median and minimum wall time of each ``fn``, measured round-robin:
    every repeat runs all of them once in turn, so a change of the machine's
    load during the run (a shared machine) falls on every row alike."""
    for _ in range(warmup):
        for _, fn in fns:
            fn()
    _sync(device)
    times: Dict[str, List[float]] = {name: [] for name, _ in fns}
    for _ in range(repeats):
        for name, fn in fns:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"seconds": statistics.median(t), "seconds_min": min(t), "seconds_all": t, "repeats": len(t)}
            for name, t in times.items()}


# --------------------------------------------------------------------------
# DETR
# --------------------------------------------------------------------------
def bench_detr(batch_sizes: Sequence[int], device: torch.device, warmup: int, repeats: int,
               queries: int = 3, size: Sequence[int] = (800, 1066), methods: Optional[Sequence[str]] = None,
               strategies: Sequence[str] = ("retain", "batched", "repeat")) -> List[dict]:
    """DETR-R50 sized, random weights: forward, forward+backward, each attention
    method (one query per image), and ``queries`` queries of one image per strategy."""
    import transformers as tf

    from modules.detection import explain_queries
    from modules.explain import explain
    from modules.methods import ATTENTION_METHODS

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = tf.DetrForObjectDetection(tf.DetrConfig(use_pretrained_backbone=False)).to(device).eval()
    methods = list(ATTENTION_METHODS if methods is None else methods)
    rows: List[dict] = []
    for B in batch_sizes:
        x = torch.randn(B, 3, *size, device=device)
        mask = torch.ones(B, *size, dtype=torch.long, device=device)
        inputs = {"pixel_values": x, "pixel_mask": mask}

        def forward() -> None:
            with torch.no_grad():
                model(**inputs)

        def forward_backward() -> None:
            out = model(**inputs)
            out.logits[:, 0, 0].sum().backward()
            model.zero_grad(set_to_none=True)

        fns: List[Tuple[str, Callable[[], object]]] = [("forward", forward), ("forward+backward", forward_backward)]
        fns += [(f"explain {m} (1 query per image)", lambda m=m: explain(model, inputs, m, index=0)) for m in methods]
        fns += [(f"explain {m} (1 query per image, LRP scope)", lambda m=m: explain(model, inputs, m, index=0))
                for m in LRP_METHODS]
        fns.append(("explain generic_attribution use_lrp=True (1 query per image, LRP scope)",
                    lambda: explain(model, inputs, "generic_attribution", index=0, use_lrp=True)))
        if queries and B == 1:
            qs = [list(range(queries))]
            fns += [(f"{queries} queries, strategy={s}", lambda s=s: explain_queries(model, inputs, qs, strategy=s))
                    for s in strategies]
        for what, t in time_rows(fns, device, warmup, repeats).items():
            rows.append({"model": "DETR-R50 (random weights)", "input": f"{size[0]}x{size[1]}", "batch": B,
                         "what": what, **t})
            print(f"  batch {B:>2}  {what:<40} {t['seconds']:8.2f} s  (runs: "
                  f"{', '.join(f'{v:.1f}' for v in t['seconds_all'])})", flush=True)
    return rows


# --------------------------------------------------------------------------
# LXMERT
# --------------------------------------------------------------------------
def bench_lxmert(batch_sizes: Sequence[int], device: torch.device, warmup: int, repeats: int,
                 tokens: int = 20, boxes: int = 36, methods: Optional[Sequence[str]] = None, **_: object) -> List[dict]:
    """LXMERT base size (``LxmertConfig()`` defaults: 9 language, 5 object, 5 cross layers, hidden 768,
    3129 answers, 2048-value box features), random weights, ``tokens`` question tokens and ``boxes``
    boxes: forward, forward+backward, and every attention method (the predicted answer explained)."""
    import transformers as tf

    from modules.explain import explain
    from modules.methods import ATTENTION_METHODS

    tf.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = tf.LxmertForQuestionAnswering(tf.LxmertConfig()).to(device).eval()
    methods = list(ATTENTION_METHODS if methods is None else methods)
    rows: List[dict] = []
    for B in batch_sizes:
        g = torch.Generator().manual_seed(B)
        inputs = {"input_ids": torch.randint(1000, 20000, (B, tokens), generator=g).to(device),
                  "attention_mask": torch.ones(B, tokens, dtype=torch.long, device=device),
                  "visual_feats": torch.randn(B, boxes, 2048, generator=g).to(device),
                  "visual_pos": torch.rand(B, boxes, 4, generator=g).to(device)}

        def forward() -> None:
            with torch.no_grad():
                model(**inputs)

        def forward_backward() -> None:
            out = model(**inputs).question_answering_score
            out.gather(1, out.argmax(-1, keepdim=True)).sum().backward()
            model.zero_grad(set_to_none=True)

        fns: List[Tuple[str, Callable[[], object]]] = [("forward", forward), ("forward+backward", forward_backward)]
        fns += [(f"explain {m}", lambda m=m: explain(model, inputs, m)) for m in methods]
        # the LRP rows (the relevance pass through the LRP scope, rule set TA)
        fns += [(f"explain {m} (LRP scope)", lambda m=m: explain(model, inputs, m)) for m in LRP_METHODS]
        fns.append(("explain generic_attribution use_lrp=True (LRP scope)",
                    lambda: explain(model, inputs, "generic_attribution", use_lrp=True)))
        for what, t in time_rows(fns, device, warmup, repeats).items():
            rows.append({"model": "LXMERT base (random weights)", "input": f"{tokens} tokens, {boxes} boxes",
                         "batch": B, "what": what, **t})
            print(f"  batch {B:>2}  {what:<40} {t['seconds']:8.2f} s", flush=True)
    return rows


MODELS: Dict[str, Callable[..., List[dict]]] = {"detr": bench_detr, "lxmert": bench_lxmert}
"""Model name -> benchmark function (add LXMERT etc. here)."""


def with_ratios(rows: List[dict]) -> List[dict]:
    """Each row's time over its model's forward+backward at the same batch size."""
    floor = {(r["model"], r["batch"]): r["seconds"] for r in rows if r["what"] == "forward+backward"}
    for r in rows:
        f = floor.get((r["model"], r["batch"]))
        r["ratio_to_forward_backward"] = None if not f else r["seconds"] / f
    return rows


def table(rows: List[dict], meta: dict) -> str:
    lines = [f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s), device {meta['device']}.",
             "", "| model | input | batch | what | seconds (median) | x forward+backward |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio_to_forward_backward")
        lines.append(f"| {r['model']} | {r.get('input', '')} | {r['batch']} | {r['what']} | {r['seconds']:.2f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--queries", type=non_negative_int, default=3, help="DETR: queries of one image per strategy row (0: none)")
    p.add_argument("--methods", nargs="+", default=None, help="attention methods to time (default: all)")
    p.add_argument("--out", default="benchmarks/results/iccv_speed.json", help="JSON; the table goes beside it (.md)")
    return p


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_file(args.out, flag="--out")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s) visible"
                       + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    rows: List[dict] = []
    for name in args.models:
        print(f"{name}:", flush=True)
        kwargs = {"queries": args.queries, "methods": args.methods} if name == "detr" else {"methods": args.methods}
        rows += MODELS[name](args.batch_sizes, device, args.warmup, args.repeats, **kwargs)
        with_ratios(rows)
        atomic_write_json(args.out, {"meta": meta, "rows": rows})  # incremental: each model as it finishes
    stem = os.path.splitext(args.out)[0]
    atomic_write_text(stem + ".md", table(rows, meta))
    print(table(rows, meta))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
