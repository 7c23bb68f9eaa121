"""Speed of explain_generation: one forward + one gradient per token vs one explanation per token.

For a BART-base-sized encoder-decoder and a GPT-2-small-sized causal LM
(random weights: speed does not depend on them) the script times

* ``generate``: ``model.generate`` alone (greedy, ``--new-tokens`` tokens);
* ``explain_generation``: generation + one recorded forward over the whole
  sequence + one gradient per generated token + the coupled rule per token;
* ``per_token``: generation + one :func:`modules.explain.explain` per
  generated token (a forward and a backward over the prefix each time), the
  naive way to get the same maps;
* ``forward_backward``: one forward+backward over the full sequence (the floor
  of any gradient explanation of one token).

Results go to a JSON file and a small table on stdout.  This is not a test.

    python benchmarks/generation_speed.py --device cpu --threads 2 --out benchmarks/results/cpu2_generation.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from modules.cli import (MAX_THREADS, atomic_write_json, check_output_file, int_range, resolve_device,  # noqa: E402
                         run_main)


def _time(fn: Callable[[], object], repeats: int) -> Dict[str, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "seconds_min": min(times)}


def _models(size: str):
    import transformers as tf

    tf.logging.set_verbosity_error()
    big = size == "base"
    d, layers, heads, vocab = (768, 6, 12, 50265) if big else (64, 2, 4, 1000)
    bart = tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, max_position_embeddings=1024,
        forced_eos_token_id=None, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2)).eval()
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=d, n_layer=2 * layers, n_head=heads,
                                            n_positions=1024, eos_token_id=2, bos_token_id=0,
                                            pad_token_id=1)).eval()
    for m in (bart, gpt2):
        m.generation_config.eos_token_id = None  # always generate the full length
        m.generation_config.forced_eos_token_id = None
    return {"bart": bart, "gpt2": gpt2}


def bench(name: str, model, source_len: int, new_tokens: int, repeats: int, device: torch.device) -> Dict:
    from modules.explain import explain
    from modules.generation import explain_generation

    model.to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (1, source_len), generator=g).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    causal = name == "gpt2"
    with torch.no_grad():
        seq = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1)

    def per_token():
        with torch.no_grad():
            s = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
        P = ids.shape[1]
        for k in range(new_tokens):
            if causal:
                step = {"input_ids": s[:, :P + k], "prompt_length": P}
                explain(model, step, index=s[:, P + k])
            else:
                explain(model, dict(inputs, decoder_input_ids=s[:, :k + 1]), index=s[:, k + 1])

    def forward_backward():
        feed = {"input_ids": seq} if causal else dict(inputs, decoder_input_ids=seq[:, :-1])
        out = model(**feed, use_cache=False)
        out.logits[0, -1].max().backward()
        model.zero_grad(set_to_none=True)

    def generate():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1)

    rows = {
        "generate": _time(generate, repeats),
        "explain_generation": _time(lambda: explain_generation(model, inputs, max_new_tokens=new_tokens), repeats),
        "per_token": _time(per_token, repeats),
        "forward_backward": _time(forward_backward, repeats),
    }
    rows["speedup_vs_per_token"] = rows["per_token"]["seconds"] / rows["explain_generation"]["seconds"]
    rows["explain_minus_generate_over_forward_backward"] = (
        (rows["explain_generation"]["seconds"] - rows["generate"]["seconds"]) / rows["forward_backward"]["seconds"])
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=("base", "tiny"), default="base", help="model size (base: BART-base, GPT-2 small)")
    p.add_argument("--source-length", type=int_range(1, 512), default=32, help="source / prompt tokens (1..512)")
    p.add_argument("--new-tokens", type=int_range(1, 512), default=16, help="generated tokens (1..512)")
    p.add_argument("--repeats", type=int_range(1, 1000), default=3, help="timed runs (median)")
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--models", nargs="+", choices=("bart", "gpt2"), default=["bart", "gpt2"], help="models")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.out:
        check_output_file(args.out, flag="--out")  # before the timings
    torch.set_num_threads(args.threads)
    models = _models(args.size)
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "device": str(device), "size": args.size, "source_length": args.source_length,
               "new_tokens": args.new_tokens, "results": {}}
    for name in args.models:
        results["results"][name] = r = bench(name, models[name], args.source_length, args.new_tokens, args.repeats,
                                             device)
        print(f"{name}: generate {r['generate']['seconds']:.3f}s, explain_generation "
              f"{r['explain_generation']['seconds']:.3f}s, one explain per token {r['per_token']['seconds']:.3f}s "
              f"(x{r['speedup_vs_per_token']:.2f}), one forward+backward {r['forward_backward']['seconds']:.3f}s")
    if args.out:
        atomic_write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
