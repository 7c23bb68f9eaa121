"""Faithfulness benchmark: is each method's map faithful to the model? (issue 24)

Every registry method the model supports (plus a seeded random map as a
control) is held to the tests of :mod:`modules.faithfulness`, on the
explained class = the model's prediction:

* flipping curves on the logit (MoRF / LeRF, patches for images, tokens for
  text; baseline: images ``zero`` / ``mean`` / ``blur``, text the
  tokenizer's ``[MASK]`` or ``[UNK]``), their areas and the faithfulness
  score AUC(LeRF) - AUC(MoRF) of the logit and of the probability;
* ROAD (images only: noisy linear imputation, MoRF and LeRF, softmax
  probability of the explained class; patch maps upsampled bilinearly);
* cascading model-parameter randomisation (head, blocks last to first,
  embeddings; Spearman per stage, SSIM for images);
* complexity: sparseness (Gini of |map|) and entropy.

Image maps are compared on the patch grid (pixel maps summed per patch) for
flipping, randomisation and complexity, so that every method is on the same
units.  Images (``--weights``: a model folder such as samples/synthetic_vit
or a checkpoint for ``--model``; ``--image-dir`` an ImageFolder tree or
``--synthetic N`` generated shapes); text (``--text-model``: a fine-tuned
BERT folder with its tokenizer; ``--eraser-dir`` an ERASER folder and
``--split``).  Nothing is downloaded.  Examples (the stand-ins)::

    python baselines/faithfulness_eval.py --weights samples/synthetic_vit --synthetic 16 \\
        --output-dir outputs/demo/faithfulness/image --device cpu
    python baselines/faithfulness_eval.py --text-model outputs/demo/eraser/run/classifier \\
        --eraser-dir outputs/demo/eraser/data --split test --limit 16 --output-dir outputs/demo/faithfulness/text

Outputs in ``--output-dir``: ``results.json`` (written after every method
and batch, atomically; a rerun with the same arguments resumes from it, one
with other arguments is refused), ``tables.md`` (one table per metric),
``curves.png`` (mean MoRF / LeRF logit curves per method) and
``randomization.png``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from modules import cli
from modules import faithfulness as FA
from modules.ranking import TIE_BREAKS

__all__ = ["CONTROL", "build_parser", "main", "summarize", "format_tables"]

CONTROL = "random"
"""The control 'method': a seeded uniform random map that ignores the model."""

FORMAT = "transformer-explainability/faithfulness/1"


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
class Task:
    """One modality: the model, the samples, how to batch and explain them."""

    text = False

    def __init__(self, model, device, names: List[str], identity: Dict[str, Any]):
        self.model, self.device, self.names, self.identity = model, device, names, identity

    def methods(self) -> Tuple[str, ...]:
        from modules.explain import supported_methods

        return supported_methods(self.model)


class ImageTask(Task):
    def __init__(self, args, device):
        from baselines.ViT.imagenet_seg_eval import load_model

        model, info = load_model(args.model, args.weights, str(device))
        cfg = getattr(model, "default_cfg", {}) or {}
        self.size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224))[1:])
        self.mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32).view(3, 1, 1)
        self.patch = int(model.patch_embed.patch_size[0]) if hasattr(model, "patch_embed") else 16
        if args.synthetic:
            self.paths = None
            names = [f"synthetic:{args.synthetic_seed}:val:{i}" for i in range(args.synthetic)]
            source = {"synthetic": args.synthetic, "synthetic_seed": args.synthetic_seed}
        else:
            from baselines.ViT.perturbation_data import open_image_tree

            tree = open_image_tree(args.image_dir)
            pick = np.sort(np.random.default_rng(args.seed).permutation(len(tree.samples))[:args.limit])
            self.paths = [tree.samples[i][0] for i in pick]
            names = [os.path.relpath(p, tree.root) for p in self.paths]
            # content, not only names: other pictures under the same names are another run
            source = {"image_dir": os.path.abspath(args.image_dir), "tree_sha256": tree.sha256(),
                      "images_sha256": cli.files_sha256(self.paths)}
        super().__init__(model, device, names, dict(info, **source, size=list(self.size)))

    def load(self, ids: Sequence[int]) -> Dict[str, Any]:
        from data.synthetic import generate_sample

        imgs = []
        for i in ids:
            if self.paths is None:
                seed = int(self.names[i].split(":")[1])
                arr = generate_sample(int(self.names[i].split(":")[-1]), seed, self.size[0], "val").image
                x = torch.from_numpy(arr.astype(np.float32).transpose(2, 0, 1) / 255.0)
                if tuple(x.shape[1:]) != self.size:
                    x = torch.nn.functional.interpolate(x[None], size=self.size, mode="bilinear",
                                                        align_corners=False)[0]
            else:
                from baselines.ViT.perturbation_data import load_image

                x = load_image(self.paths[i], self.size)
            imgs.append((x - self.mean) / self.std)
        return {"x": torch.stack(imgs).to(self.device)}

    def forward_input(self, batch):
        return batch["x"]

    def explain(self, model, batch, method: str, target: torch.Tensor, seed: int) -> torch.Tensor:
        """Maps on the patch grid (B, gh, gw), float32 CPU (pixel maps summed per patch)."""
        x = batch["x"]
        B, _, H, W = x.shape
        gh, gw = H // self.patch, W // self.patch
        if method == CONTROL:
            g = torch.Generator().manual_seed(seed)
            return torch.rand(B, gh, gw, generator=g)
        from modules.explain import explain
        from modules.methods import EVAL_START_LAYER

        maps = explain(model, x, method, index=target.to(x.device), start_layer=EVAL_START_LAYER.get(method, 0))
        maps = cli.check_finite(maps.detach().float().cpu(), f"{method} maps")
        if tuple(maps.shape[-2:]) == (H, W) and (H, W) != (gh, gw):
            maps = maps.reshape(B, gh, self.patch, gw, self.patch).sum(dim=(2, 4))
        return maps

    def pixel_maps(self, maps: torch.Tensor, batch) -> torch.Tensor:
        from modules.explain import upsample

        return upsample(maps, tuple(batch["x"].shape[-2:]))


class TextTask(Task):
    text = True

    def __init__(self, args, device):
        from transformers import AutoTokenizer

        from BERT_rationale_benchmark.utils import annotation_docid, load_flattened_documents, load_split

        d = args.text_model
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise cli.CLIError(f"{d}: no usable tokenizer ({cli.one_line(exc)})") from None
        try:
            if args.unmodified:
                from transformers import AutoModelForSequenceClassification as Cls
            else:
                from BERT_explainability.modules.BERT.BertForSequenceClassification import \
                    BertForSequenceClassification as Cls
            model = Cls.from_pretrained(d, local_files_only=True) if args.unmodified else Cls.from_pretrained(d)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise cli.CLIError(f"{d}: cannot load the classifier ({cli.one_line(exc)})") from None
        model = model.to(device).eval()
        anns = load_split(args.eraser_dir, args.split)
        if not anns:
            raise cli.CLIError(f"the {args.split} split of {args.eraser_dir} is empty")
        pick = np.sort(np.random.default_rng(args.seed).permutation(len(anns))[:args.limit])
        anns = [anns[i] for i in pick]
        docs = load_flattened_documents(args.eraser_dir, {annotation_docid(a) for a in anns})
        self.encoded = [self.tokenizer(docs[annotation_docid(a)], is_split_into_words=True, truncation=True,
                                       max_length=args.max_length)["input_ids"] for a in anns]
        # never flipped: [CLS], [SEP], padding ([UNK] is a word of the text; [MASK] does not occur)
        tk = self.tokenizer
        self.special = sorted({i for i in (tk.cls_token_id, tk.sep_token_id, tk.pad_token_id) if i is not None})
        base = self.tokenizer.mask_token_id if args.text_baseline == "mask" else self.tokenizer.unk_token_id
        if base is None:
            raise cli.CLIError(f"the tokenizer of {d} has no [{args.text_baseline.upper()}] token")
        self.baseline_id = int(base)
        # content identity: the folder's config and weights (any file kind), the documents' wordpieces and labels
        from modules.checkpoints import model_dir_sha256

        data = json.dumps([[a.annotation_id, a.classification, e] for a, e in zip(anns, self.encoded)])
        super().__init__(model, device, [a.annotation_id for a in anns],
                         {"text_model": os.path.abspath(d), "model_sha256": model_dir_sha256(d),
                          "eraser_dir": os.path.abspath(args.eraser_dir), "split": args.split,
                          "data_sha256": hashlib.sha256(data.encode()).hexdigest(),
                          "unmodified": bool(args.unmodified)})

    def load(self, ids: Sequence[int]) -> Dict[str, Any]:
        pad = self.tokenizer.pad_token_id or 0
        n = max(len(self.encoded[i]) for i in ids)
        input_ids = torch.full((len(ids), n), pad, dtype=torch.long)
        att = torch.zeros((len(ids), n), dtype=torch.long)
        for r, i in enumerate(ids):
            input_ids[r, :len(self.encoded[i])] = torch.tensor(self.encoded[i])
            att[r, :len(self.encoded[i])] = 1
        valid = att.bool() & ~torch.isin(input_ids, torch.tensor(self.special))
        return {"inputs": {"input_ids": input_ids.to(self.device), "attention_mask": att.to(self.device)},
                "valid": valid}

    def forward_input(self, batch):
        return batch["inputs"]

    def explain(self, model, batch, method: str, target: torch.Tensor, seed: int) -> torch.Tensor:
        valid = batch["valid"]
        if method == CONTROL:
            g = torch.Generator().manual_seed(seed)
            return torch.rand(valid.shape, generator=g) * valid
        from modules.explain import explain

        # start_layer None: the published BERT conventions (transformer attribution from the last layer)
        maps = explain(model, batch["inputs"], method, index=target.to(self.device))
        return cli.check_finite(maps.detach().float().cpu(), f"{method} maps")


# --------------------------------------------------------------------------
# One method on one batch
# --------------------------------------------------------------------------
def _seed(base: int, *parts: Any) -> int:
    return (int(base) + zlib.crc32(":".join(str(p) for p in parts).encode())) % (2 ** 63)


def _floats(t: Optional[torch.Tensor]) -> Any:
    if t is None:
        return None
    a = t.detach().cpu().to(torch.float64).numpy()
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in a] if a.ndim == 2 else \
        [None if not np.isfinite(v) else float(v) for v in a]


def evaluate_batch(task: Task, batch, ids: Sequence[int], method: str, args) -> Dict[str, Any]:
    """Every test of one method on one batch: a JSON-ready record."""
    model = task.model
    inputs = task.forward_input(batch)
    with torch.no_grad():
        target = FA.model_logits(model, inputs).argmax(1).cpu()
    seed = _seed(args.seed, method, ids[0])
    maps = task.explain(model, batch, method, target, seed)
    rec: Dict[str, Any] = {"ids": list(map(int, ids)), "target": target.tolist()}
    t0 = time.time()
    if task.text:
        valid = batch["valid"]
        flip = FA.flipping(model, inputs, maps.to(torch.float64), target, baseline=task.baseline_id,
                           steps=args.steps, valid=valid, tie_break=args.tie_break, seed=args.tie_seed,
                           batch_size=args.batch_size * 4)
        flat = [maps[i][valid[i]] for i in range(len(ids))]
        rec["sparseness"] = _floats(torch.cat([FA.sparseness(m[None]) for m in flat]))
        rec["entropy"] = _floats(torch.cat([FA.entropy(m[None]) for m in flat]))
    else:
        flip = FA.flipping(model, inputs, maps.to(torch.float64), target, baseline=args.baseline, steps=args.steps,
                           tie_break=args.tie_break, seed=args.tie_seed, batch_size=args.batch_size * 4)
        rec["sparseness"] = _floats(FA.sparseness(maps))
        rec["entropy"] = _floats(FA.entropy(maps))
    rec["flip"] = {o: {"logit": _floats(flip[o].logit), "prob": _floats(flip[o].prob)} for o in FA.ORDERS}
    rec["fractions"] = _floats(flip["morf"].fractions)
    rec["seconds_flip"] = round(time.time() - t0, 3)
    if not task.text and args.road_limit != 0:
        t0 = time.time()
        k = len(ids) if args.road_limit is None else max(0, min(len(ids), args.road_limit - ids[0]))
        if k > 0:
            pix = task.pixel_maps(maps[:k], batch).to(torch.float64)
            xk = inputs[:k]
            gen = torch.Generator().manual_seed(_seed(args.seed, "road", method, ids[0]))
            rec["road"] = {o: _floats(FA.road(model, xk, pix, target[:k], fractions=args.road_fractions, order=o,
                                              noise=args.road_noise, generator=gen, tie_break=args.tie_break,
                                              seed=args.tie_seed, batch_size=args.batch_size * 4))
                           for o in FA.ORDERS}
        rec["seconds_road"] = round(time.time() - t0, 3)
    if args.randomization_limit != 0:
        t0 = time.time()
        k = len(ids) if args.randomization_limit is None else max(0, min(len(ids), args.randomization_limit - ids[0]))
        if k > 0:
            sub = _take(task, batch, k)

            def explain_fn(m, _inputs, t):
                return task.explain(m, sub, method, t, seed)

            res = FA.cascading_randomization(model, task.forward_input(sub), explain_fn, index=target[:k],
                                             mask=sub["valid"] if task.text else None)
            rec["randomization"] = {"stages": res["stages"], "spearman": _floats(res["spearman"]),
                                    "ssim": _floats(res["ssim"])}
        rec["seconds_randomization"] = round(time.time() - t0, 3)
    return rec


def _take(task: Task, batch, k: int):
    if task.text:
        return {"inputs": {n: v[:k] for n, v in batch["inputs"].items()}, "valid": batch["valid"][:k]}
    return {"x": batch["x"][:k]}


# --------------------------------------------------------------------------
# Summary, tables, plots
# --------------------------------------------------------------------------
def _mean(values: List[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarize(records: Dict[str, Dict[str, Any]], methods: Sequence[str]) -> Dict[str, Any]:
    """Per method: mean curves, AUCs, faithfulness, ROAD, randomisation, complexity."""
    out: Dict[str, Any] = {}
    for m in methods:
        recs = [r for k, r in sorted(records.items(), key=lambda kv: int(kv[0].split("@")[1]))
                if k.split("@")[0] == m]
        if not recs:
            continue
        fr = torch.tensor(recs[0]["fractions"], dtype=torch.float64)
        s: Dict[str, Any] = {"n": sum(len(r["ids"]) for r in recs), "fractions": recs[0]["fractions"]}
        for q in ("logit", "prob"):
            for o in FA.ORDERS:
                c = torch.tensor(sum((r["flip"][o][q] for r in recs), []), dtype=torch.float64)
                s[f"curve_{o}_{q}"] = c.mean(0).tolist()
                s[f"auc_{o}_{q}"] = float(FA.auc(c, fr).mean())
            s[f"faithfulness_{q}"] = s[f"auc_lerf_{q}"] - s[f"auc_morf_{q}"]
        road = [r["road"] for r in recs if "road" in r]
        if road:
            for o in FA.ORDERS:
                c = np.array(sum((r[o] for r in road), []), dtype=np.float64)
                s[f"road_{o}"] = c.mean(0).tolist()
                s[f"road_{o}_mean"] = float(c.mean())
            s["road_n"] = int(len(sum((r["morf"] for r in road), [])))
            s["road_lerf_minus_morf"] = s["road_lerf_mean"] - s["road_morf_mean"]
        rnd = [r["randomization"] for r in recs if "randomization" in r]
        if rnd:
            s["rand_stages"] = rnd[0]["stages"]
            rho = np.array([sum((r["spearman"][j] for r in rnd), []) for j in range(len(rnd[0]["stages"]))],
                           dtype=np.float64)
            s["rand_spearman"] = [_mean([None if np.isnan(v) else float(v) for v in row]) for row in rho]
            if rnd[0]["ssim"] is not None:
                ss = np.array([sum((r["ssim"][j] for r in rnd), []) for j in range(len(rnd[0]["stages"]))],
                              dtype=np.float64)
                s["rand_ssim"] = [_mean([None if np.isnan(v) else float(v) for v in row]) for row in ss]
            s["rand_n"] = int(rho.shape[1]) if rho.size else 0
        s["sparseness"] = _mean(sum((r["sparseness"] for r in recs), []))
        s["entropy"] = _mean(sum((r["entropy"] for r in recs), []))
        out[m] = s
    return out


def _label(m: str) -> str:
    if m == CONTROL:
        return "Random map (control)"
    from modules.methods import METHODS

    return METHODS[m].label if m in METHODS else m


def _f(v: Optional[float], d: int = 3) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def format_tables(summary: Dict[str, Any], title: str, unit: str, baseline: str, n: int) -> str:
    ms = list(summary)
    L = [f"# {title}", "",
         f"{n} samples, the explained class = the model's prediction; {unit} flipped to {baseline}.", "",
         "## Flipping (area under the curve over the flipped share 0..1)", "",
         "| method | AUC MoRF logit (lower better) | AUC LeRF logit (higher better) | faithfulness logit "
         "(LeRF - MoRF) | AUC MoRF prob | AUC LeRF prob | faithfulness prob |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for m in ms:
        s = summary[m]
        L.append(f"| {_label(m)} | {_f(s['auc_morf_logit'])} | {_f(s['auc_lerf_logit'])} | "
                 f"{_f(s['faithfulness_logit'])} | {_f(s['auc_morf_prob'])} | {_f(s['auc_lerf_prob'])} | "
                 f"{_f(s['faithfulness_prob'])} |")
    if any("road_morf" in summary[m] for m in ms):
        fr = None
        L += ["", "## ROAD (noisy linear imputation; probability of the explained class)", ""]
        for m in ms:
            if "road_morf" in summary[m]:
                fr = len(summary[m]["road_morf"])
                L[-1:] = [f"{summary[m]['road_n']} images.", ""]
                break
        L += ["| method | MoRF mean (lower better) | LeRF mean (higher better) | LeRF - MoRF | MoRF per fraction |",
              "|---|---:|---:|---:|---|"]
        for m in ms:
            s = summary[m]
            if "road_morf" in s:
                L.append(f"| {_label(m)} | {_f(s['road_morf_mean'])} | {_f(s['road_lerf_mean'])} | "
                         f"{_f(s['road_lerf_minus_morf'])} | {' '.join(_f(v, 2) for v in s['road_morf'])} |")
    if any("rand_stages" in summary[m] for m in ms):
        first = next(summary[m] for m in ms if "rand_stages" in summary[m])
        stages = first["rand_stages"]
        L += ["", "## Cascading randomisation (Spearman of each map with the original; near 0 = the map follows "
              "the weights)", "", f"{first['rand_n']} samples; stages randomised cumulatively, head first.", "",
              "| method | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
        for m in ms:
            s = summary[m]
            if "rand_stages" in s:
                L.append(f"| {_label(m)} | " + " | ".join(_f(v, 2) for v in s["rand_spearman"]) + " |")
        if any("rand_ssim" in summary[m] for m in ms):
            L += ["", "SSIM with the original map after each stage:", "",
                  "| method | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
            for m in ms:
                if "rand_ssim" in summary[m]:
                    L.append(f"| {_label(m)} | " + " | ".join(_f(v, 2) for v in summary[m]["rand_ssim"]) + " |")
    L += ["", "## Complexity", "", "| method | sparseness (Gini of abs map) | entropy (nats) |", "|---|---:|---:|"]
    for m in ms:
        L.append(f"| {_label(m)} | {_f(summary[m]['sparseness'])} | {_f(summary[m]['entropy'])} |")
    return "\n".join(L) + "\n"


def _plots(out_dir: str, summary: Dict[str, Any], title: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, o in zip(axes, FA.ORDERS):
        for m, s in summary.items():
            ax.plot(s["fractions"], s[f"curve_{o}_logit"], label=_label(m), lw=1.2,
                    ls="--" if m == CONTROL else "-")
        ax.set_title(f"{o.upper()} ({'most' if o == 'morf' else 'least'} relevant first)", fontsize=9)
        ax.set_xlabel("share of units flipped")
    axes[0].set_ylabel("logit of the explained class (mean)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "curves.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    if any("rand_stages" in s for s in summary.values()):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for m, s in summary.items():
            if "rand_stages" in s:
                ax.plot(range(len(s["rand_stages"])), [np.nan if v is None else v for v in s["rand_spearman"]],
                        marker="o", label=_label(m), ls="--" if m == CONTROL else "-")
                ax.set_xticks(range(len(s["rand_stages"])))
                ax.set_xticklabels(s["rand_stages"], rotation=30, fontsize=7)
        ax.set_ylabel("Spearman with the original map")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
        ax.set_title(title + ": cascading randomisation", fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "randomization.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def _fractions(text: str) -> Tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals or any(not 0 < v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"fractions must lie strictly between 0 and 1: {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    from baselines.ViT.ViT_LRP import MODEL_FACTORIES

    p = argparse.ArgumentParser(
        description="Faithfulness of every method's maps: flipping curves (MoRF/LeRF logit, AUC), ROAD, cascading "
                    "randomisation and complexity (issue 24).",
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=110),
        epilog=__doc__.split("Examples (the stand-ins)::")[1].split("Outputs in")[0])
    img = p.add_argument_group("images")
    cli.add_weights_arg(img, help="model folder (config.json + model.safetensors, e.g. samples/synthetic_vit) or "
                                  "a checkpoint for --model")
    img.add_argument("--model", default="vit_base_patch16_224", choices=sorted(MODEL_FACTORIES),
                     help="factory model of a checkpoint file (ignored for a model folder) (default: %(default)s)")
    img.add_argument("--image-dir", type=cli.existing_dir, help="ImageFolder tree (root/<class>/<image>)")
    img.add_argument("--synthetic", type=cli.int_range(1, 10 ** 7), default=None,
                     help="use N (1..10**7) generated shapes (data/synthetic.py, val split) instead of --image-dir")
    img.add_argument("--synthetic-seed", type=cli.non_negative_int, default=0, help="seed of --synthetic")
    img.add_argument("--baseline", choices=FA.IMAGE_BASELINES, default="zero",
                     help="what a flipped patch becomes: 0 in the normalised input (the mean colour), the image's "
                          "channel means, or a Gaussian blur (default: %(default)s)")
    img.add_argument("--road-fractions", type=_fractions, default=FA.ROAD_FRACTIONS,
                     help="ROAD removal fractions, comma-separated (default: 0.1,...,0.9)")
    img.add_argument("--road-noise", type=cli.non_negative_float, default=0.01, help="ROAD imputation noise")
    img.add_argument("--road-limit", type=cli.non_negative_int, default=None,
                     help="run ROAD on the first N samples only (0: skip; default: all)")
    txt = p.add_argument_group("text")
    txt.add_argument("--text-model", type=cli.existing_dir, help="fine-tuned BERT classifier folder with tokenizer")
    txt.add_argument("--unmodified", action="store_true",
                     help="load --text-model as transformers builds it (attention methods only), not the LRP copy")
    txt.add_argument("--eraser-dir", type=cli.existing_dir, help="ERASER folder (docs/, <split>.jsonl)")
    txt.add_argument("--split", default="test", help="ERASER split (default: %(default)s)")
    txt.add_argument("--max-length", type=cli.positive_int, default=128, help="wordpieces per document")
    txt.add_argument("--text-baseline", choices=("mask", "unk"), default="mask",
                     help="token a flipped token becomes (default: [MASK])")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods (default: every one the model supports, plus the random control)")
    p.add_argument("--no-control", action="store_true", help="leave out the random-map control")
    p.add_argument("--limit", type=cli.positive_int, default=32,
                   help="samples (a seeded choice from --image-dir / the split) (default: %(default)s)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="samples per batch (default: %(default)s)")
    p.add_argument("--steps", type=cli.positive_int, default=16,
                   help="points of the flipping curves after 0 (default: %(default)s)")
    p.add_argument("--randomization-limit", type=cli.non_negative_int, default=None,
                   help="randomisation test on the first N samples only (0: skip; default: all)")
    p.add_argument("--tie-break", choices=tuple(t for t in TIE_BREAKS if t != "topk"), default="random",
                   help="order among equal relevance (modules/ranking.py) (default: %(default)s)")
    p.add_argument("--tie-seed", type=cli.non_negative_int, default=0, help="seed of the random tie rule")
    cli.add_seed_arg(p)
    p.add_argument("--output-dir", default=os.path.join("outputs", "faithfulness"), help="where results go")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another run (other arguments, weights or data) in --output-dir; "
                        "without it a finished or partial run of the same identity is resumed / reused")
    cli.add_device_arg(p)
    cli.add_threads_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _identity(args, task: Task, methods: Sequence[str]) -> str:
    keys = ("baseline", "road_fractions", "road_noise", "road_limit", "text_baseline", "max_length", "limit",
            "batch_size", "steps", "randomization_limit", "tie_break", "tie_seed", "seed", "synthetic_seed")
    blob = {"format": FORMAT, "task": task.identity, "methods": list(methods), "samples": task.names,
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in keys}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    image = args.weights is not None
    if image == (args.text_model is not None):
        raise cli.CLIError("give either --weights (images) or --text-model (text)")
    if image and (args.image_dir is None) == (args.synthetic is None):
        raise cli.CLIError("images need either --image-dir or --synthetic N")
    if not image and args.eraser_dir is None:
        raise cli.CLIError("--text-model needs --eraser-dir")
    cli.apply_threads(args.threads)
    cli.set_tf32(False)
    device = cli.resolve_device(args.device)
    out_dir = cli.check_output_dir(args.output_dir, flag="--output-dir")
    with cli.file_lock(out_dir, what=f"--output-dir {out_dir}"):
        cli.remove_stale_temporaries(out_dir)
        task: Task = ImageTask(args, device) if image else TextTask(args, device)
        supported = task.methods()
        if args.methods:
            from modules.methods import resolve_method

            methods = [resolve_method(m).name if m != CONTROL else m for m in args.methods]
            missing = [m for m in methods if m != CONTROL and m not in supported]
            if missing:
                raise cli.CLIError(f"{type(task.model).__name__} does not support {', '.join(missing)} "
                                   f"(it supports {', '.join(supported)})")
        else:
            methods = list(supported) + ([] if args.no_control else [CONTROL])
        identity = _identity(args, task, methods)
        path = os.path.join(out_dir, "results.json")
        results = cli.resume_results(path, identity, {"format": FORMAT, "identity": identity, "records": {}},
                                     overwrite=args.overwrite)
        records = results["records"]
        n = len(task.names)
        t_start = time.time()
        for start in range(0, n, args.batch_size):
            ids = list(range(start, min(n, start + args.batch_size)))
            batch = None
            for m in methods:
                key = f"{m}@{start}"
                if key in records:
                    continue
                if batch is None:
                    batch = task.load(ids)
                t0 = time.time()
                rec = evaluate_batch(task, batch, ids, m, args)
                rec["seconds"] = round(time.time() - t0, 3)
                records[key] = rec
                cli.atomic_write_json(path, results)
                if not args.quiet:
                    print(f"{m} samples {ids[0]}..{ids[-1]}: {rec['seconds']:.1f} s", flush=True)
        summary = summarize(records, methods)
        kind = "images" if image else "text"
        title = (f"Faithfulness, {kind}: {task.identity.get('model', type(task.model).__name__)}"
                 if image else f"Faithfulness, text: {os.path.basename(os.path.normpath(args.text_model))}")
        unit = f"patches ({task.patch} px)" if image else "wordpieces (never [CLS], [SEP], padding)"
        base = {"zero": "0 (the normalisation mean colour)", "mean": "each image's channel means",
                "blur": "a Gaussian blur"}[args.baseline] if image else f"[{args.text_baseline.upper()}]"
        tables = format_tables(summary, title, unit, base, n)
        cli.atomic_write_text(os.path.join(out_dir, "tables.md"), tables)
        results.update({"summary": summary, "methods": methods, "machine": _machine(device), "task": task.identity,
                        "samples": task.names, "seconds_this_run": round(time.time() - t_start, 1),
                        "seconds_total": round(sum(r["seconds"] for r in records.values()), 1)})
        cli.atomic_write_json(path, results)
        _plots(out_dir, summary, title)
        if not args.quiet:
            print(tables)
            print(f"results in {out_dir} ({results['seconds_total']:.0f} s of evaluation)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
