"""VQA perturbation test (METHODS_ICCV.md section 6) for LXMERT, on the scenes stand-in or real data.

    # offline stand-in: questions about generated scenes, the shipped model
    python baselines/LXMERT/vqa_perturbation.py --model-dir samples/synthetic_scenes_lxmert \\
        --scenes 200 --output-dir outputs/vqa_perturbation

    # real data: a local LXMERT VQA directory, VQA v2 questions/annotations, precomputed box features
    python baselines/LXMERT/vqa_perturbation.py --model-dir lxmert-vqa-uncased \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json \\
        --features val2014_boxes36.npz --limit 10000 --output-dir outputs/vqa_perturbation_real

Features file (``--features``, ``.npz``): ``image_ids`` (N,) int, ``features``
(N, K, F) float (the detector's box features, e.g. K = 36 Faster R-CNN boxes,
F = 2048), ``boxes`` (N, K, 4) float: (x0, y0, x1, y1) divided by the image
width/height, as LXMERT expects, and optionally ``num_boxes`` (N,) int.

Protocol (the published LXMERT code, batched here): explain the **predicted**
answer; for each modality (text tokens without [CLS]/[SEP], which are always
kept; or boxes) and each test (positive: most relevant removed first;
negative: least relevant first), at each fraction removed s in
0, .25, .5, .75, .8, .85, .9, .95, 1 keep the top ``int((1 - s) * n)``
tokens/boxes (the kept tokens in their original order, the kept boxes in
relevance order), re-run the model and score its argmax answer with the
VQA soft accuracy min(#annotators who gave it / 3, 1).  Ties follow
``--tie-break`` (modules/ranking.py).  A step that keeps no box passes one
masked-out box.  AUC = 100 * trapz(accuracy, fractions) — the CVPR
convention; the ICCV code prints only the per-step accuracy.  Results:
``results.json``, ``table.md``, ``perturbation.png``; progress is saved after
every batch and a rerun with the same arguments resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
import torch
from tqdm import tqdm

from data.scenes import scene_count_arg  # noqa: E402
from modules.cli import (CLIError, add_device_arg, atomic_write_json, check_array, atomic_write_text, check_memory, check_output_dir,
                         existing_dir, existing_file, file_lock, files_sha256, positive_int, resolve_device, resume_results, run_main)
from modules.explain import explain
from modules.ranking import DEFAULT_TIE_BREAK, TIE_BREAKS, top_k_masks

STEPS: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
Maps = Callable[[object, dict, torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]]


def _engine(method: str, **options) -> Maps:
    """A variant explained by the engine: (text maps (B, T), box maps (B, K)) of the predicted answers."""
    def maps(model, inputs: dict, pred: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        out = explain(model, inputs, method, index=pred, **options)
        return out.text, out.image
    return maps


def _random(model, inputs: dict, pred: torch.Tensor, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference: seeded uniform random relevance (a random removal order)."""
    g = torch.Generator().manual_seed(seed)
    B, T = inputs["input_ids"].shape
    K = inputs["visual_feats"].shape[1]
    return torch.rand(B, T, generator=g).to(pred.device), torch.rand(B, K, generator=g).to(pred.device)


VARIANTS: Dict[str, Maps] = {
    "generic_attribution": _engine("generic_attribution"),
    "generic_no_normalization": _engine("generic_attribution", normalize=False),
    "generic_no_self_in_rule_10": _engine("generic_attribution", self_in_rule_10=False),
    "rollout": _engine("rollout"),
    "attn_last_layer": _engine("attn_last_layer"),
    "attn_gradcam": _engine("attn_gradcam"),
    "transformer_attribution": _engine("transformer_attribution"),
    "lrp_last_layer": _engine("lrp_last_layer"),
    "generic_with_lrp": _engine("generic_attribution", use_lrp=True),
    "random": _random,
}
LABELS = {"generic_attribution": "Ours (generic attribution, ICCV 2021)",
          "generic_no_normalization": "Ours, no normalisation (ablation)",
          "generic_no_self_in_rule_10": "Ours, no self term in rule 10 (ablation)",
          "rollout": "Rollout", "attn_last_layer": "Raw attention", "attn_gradcam": "GradCAM",
          "transformer_attribution": "Transformer attribution (CVPR 2021, LRP)",
          "lrp_last_layer": "Partial LRP",
          "generic_with_lrp": "Ours with LRP (ablation, use_lrp=True)",
          "random": "Random order (reference)"}
TESTS = ("text_positive", "text_negative", "image_positive", "image_negative")


# --------------------------------------------------------------------------
# Data: one item per question
# --------------------------------------------------------------------------
def vqa_soft_accuracy(answer: str, answers: Sequence[str]) -> float:
    """min(#annotators who gave ``answer`` / 3, 1) (VQA v2's accuracy, without its 10-choose-9 averaging)."""
    return min(sum(a == answer for a in answers) / 3.0, 1.0)


def scene_items(count: int, seed: int, split: str = "val") -> List[dict]:
    """Questions about generated scenes with their box features (the stand-in)."""
    from baselines.LXMERT.scene_vqa import scene_boxes
    from data.scenes import generate_scene, scene_questions

    items = []
    for i in range(count):
        sc = generate_scene(i, seed, split)
        feats, pos, _ = scene_boxes(sc)
        for k, q in enumerate(scene_questions(sc)):
            items.append({"id": f"{split}-{i}-{k}", "question": q.question, "answers": [q.answer] * 10,
                          "qtype": q.qtype, "features": feats, "boxes": pos})
    return items


def _read_json(path: str, key: str) -> list:
    """``json[key]`` of a VQA file, which must be a list of objects."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CLIError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CLIError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise CLIError(f"{path}: needs a list {key!r} (VQA v2 layout)")
    for i, r in enumerate(data[key]):
        if not isinstance(r, dict):
            raise CLIError(f"{path}: {key}[{i}] must be an object, got {str(r)[:80]}")
    return data[key]


def _field(record: dict, name: str, kind: type, path: str, field: str):
    if name not in record:
        raise CLIError(f"{path}: {field} lacks field {name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        noun = "an integer" if kind is int else "a string"
        raise CLIError(f"{path}: {field}.{name} must be {noun}, got {value!r}")
    return value


def read_vqa_questions(path: str) -> List[dict]:
    """The ``questions`` of a VQA v2 questions file, each with an integer
    ``question_id`` (unique) and ``image_id`` and a string ``question``."""
    qs = _read_json(path, "questions")
    seen = set()
    for i, q in enumerate(qs):
        qid = _field(q, "question_id", int, path, f"questions[{i}]")
        _field(q, "image_id", int, path, f"questions[{i}]")
        _field(q, "question", str, path, f"questions[{i}]")
        if qid in seen:
            raise CLIError(f"{path}: questions[{i}].question_id: {qid} repeats an earlier question")
        seen.add(qid)
    return qs


def read_vqa_annotations(path: str) -> Dict[int, dict]:
    """The ``annotations`` of a VQA v2 annotations file by question id: each
    an integer ``question_id`` (unique), ``answers`` a list of objects with a
    string ``answer`` (or, without answers, a string ``multiple_choice_answer``),
    ``answer_type`` a string when given."""
    anns: Dict[int, dict] = {}
    for i, a in enumerate(_read_json(path, "annotations")):
        field = f"annotations[{i}]"
        qid = _field(a, "question_id", int, path, field)
        answers = a.get("answers", [])
        if not isinstance(answers, list):
            raise CLIError(f"{path}: {field}.answers must be a list, got {str(answers)[:80]}")
        for j, x in enumerate(answers):
            if not isinstance(x, dict):
                raise CLIError(f"{path}: {field}.answers[{j}] must be an object, got {x!r}")
            _field(x, "answer", str, path, f"{field}.answers[{j}]")
        if not answers:
            _field(a, "multiple_choice_answer", str, path, field)
        if "answer_type" in a:
            _field(a, "answer_type", str, path, field)
        if qid in anns:
            raise CLIError(f"{path}: {field}.question_id: {qid} repeats an earlier annotation")
        anns[qid] = a
    return anns


def read_box_features(path: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids (N,), features (N, K, F), boxes (N, K, 4), num_boxes (N,)) of
    a features ``.npz`` (module docstring), every array checked: present,
    integer/float, shapes consistent, finite, image ids unique, boxes in
    [0, 1] with x0 <= x1 and y0 <= y1 for the counted boxes, 0 <= num_boxes <= K."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("image_ids", "features", "boxes") if k not in data.files]
            if missing:
                raise CLIError(f"{path}: no array {', '.join(missing)} (has {', '.join(data.files) or 'none'})")
            arrays = {k: data[k] for k in ("image_ids", "features", "boxes", "num_boxes") if k in data.files}
    except CLIError:
        raise
    except FileNotFoundError:
        raise CLIError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError) as exc:  # not a zip, truncated, an object array
        raise CLIError(f"{path}: not a readable .npz of arrays ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    feats = check_array(arrays["features"], "features", path, kind="f", ndim=3)
    N, K = feats.shape[:2]
    ids = check_array(arrays["image_ids"], "image_ids", path, kind="i", shape=(N,))
    boxes = check_array(arrays["boxes"], "boxes", path, kind="f", shape=(N, K, 4))
    counts = (check_array(arrays["num_boxes"], "num_boxes", path, kind="i", shape=(N,)) if "num_boxes" in arrays
              else np.full(N, K))
    if len(np.unique(ids)) != N:
        raise CLIError(f"{path}: image_ids: {N - len(np.unique(ids))} ids repeat")
    bad = np.flatnonzero((counts < 0) | (counts > K))
    if bad.size:
        raise CLIError(f"{path}: num_boxes[{bad[0]}]: {counts[bad[0]]} outside 0..{K}")
    used = np.arange(K)[None, :] < counts[:, None]
    b = boxes[used]
    if ((b < -1e-6) | (b > 1 + 1e-6)).any():
        raise CLIError(f"{path}: boxes must be divided by the image width/height, in [0, 1] "
                       f"(found values in [{b.min():.4g}, {b.max():.4g}])")
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise CLIError(f"{path}: boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    return ids, feats, boxes, counts


def real_items(questions: str, annotations: str, features: str, limit: Optional[int]) -> List[dict]:
    """VQA v2 questions/annotations joined with the features file (see the module docstring);
    every file checked on read (one-line error naming the file and the field)."""
    qs = read_vqa_questions(questions)
    anns = read_vqa_annotations(annotations)
    ids, feats, boxes, counts = read_box_features(features)
    where = {int(i): n for n, i in enumerate(ids)}
    items = []
    for q in qs:
        if q["image_id"] not in where or q["question_id"] not in anns:
            continue
        n = where[q["image_id"]]
        k = int(counts[n])
        a = anns[q["question_id"]]
        items.append({"id": str(q["question_id"]), "question": q["question"],
                      "answers": [x["answer"] for x in a.get("answers", [])] or [a["multiple_choice_answer"]],
                      "qtype": a.get("answer_type", "all"), "features": feats[n, :k].astype(np.float32),
                      "boxes": boxes[n, :k].astype(np.float32)})
        if limit and len(items) >= limit:
            break
    if not items:
        raise CLIError("no question has both an annotation and features for its image")
    return items


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------
def pad_batch(token_lists: Sequence[Sequence[int]], feats: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
              device: torch.device) -> dict:
    """LXMERT inputs for a batch of token-id lists and box sets, right-padded;
    a sample without boxes gets one masked-out zero box."""
    B = len(token_lists)
    T = max(len(t) for t in token_lists)
    K = max(1, max(len(f) for f in feats))
    F = np.asarray(feats[0]).shape[-1]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    vf = torch.zeros(B, K, F)
    vp = torch.zeros(B, K, 4)
    vm = torch.zeros(B, K, dtype=torch.long)
    for b, (t, f, p) in enumerate(zip(token_lists, feats, boxes)):
        ids[b, :len(t)] = torch.as_tensor(list(t))
        mask[b, :len(t)] = 1
        if len(f):
            vf[b, :len(f)] = torch.from_numpy(np.asarray(f))
            vp[b, :len(f)] = torch.from_numpy(np.asarray(p))
            vm[b, :len(f)] = 1
    out = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), visual_feats=vf,
               visual_pos=vp, visual_attention_mask=vm)
    return {k: v.to(device) for k, v in out.items()}


def kept(scores: torch.Tensor, fraction_removed: float, positive: bool, tie_break: str, seed: int) -> torch.Tensor:
    """Mask of the items kept at one step: the top int((1 - s) n) by relevance
    (by negated relevance for the positive test); (n,) scores."""
    n = scores.shape[0]
    k = int((1 - fraction_removed) * n)
    return top_k_masks(scores[None], [k], descending=not positive, tie_break=tie_break, seed=seed)[0, 0]


def order_by(scores: torch.Tensor, mask: torch.Tensor, positive: bool) -> List[int]:
    """Kept positions in relevance order (most relevant first; least for the positive test's order of keeping)."""
    idx = torch.nonzero(mask).flatten()
    key = scores[idx]
    return idx[torch.argsort(key, descending=not positive, stable=True)].tolist()


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------
def explain_batch(model, inputs: dict, variant: str, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted answer (B,), text maps (B, T), box maps (B, K)) for one variant."""
    with torch.no_grad():
        pred = model(**inputs).question_answering_score.argmax(-1)
    text, boxes = VARIANTS[variant](model, inputs, pred, seed)
    if not (torch.isfinite(text).all() and torch.isfinite(boxes).all()):
        raise CLIError(f"{variant}: the maps are not finite")
    return pred, text, boxes


def run_batch(model, tokenizer, items: Sequence[dict], variant: str, args, device: torch.device) -> Dict[str, List[List[float]]]:
    """Per-step soft accuracy of every item of the batch for the four tests: test -> (n, steps)."""
    labels = model.config.id2label
    token_lists = [tokenizer(it["question"], truncation=True, max_length=args.max_length)["input_ids"]
                   for it in items]
    inputs = pad_batch(token_lists, [it["features"] for it in items], [it["boxes"] for it in items], device)
    pred, text_maps, box_maps = explain_batch(model, inputs, variant, args.seed)
    out: Dict[str, List[List[float]]] = {t: [[0.0] * len(STEPS) for _ in items] for t in TESTS}
    for test in TESTS:
        modality, direction = test.split("_")
        positive = direction == "positive"
        for s, frac in enumerate(STEPS):
            toks, feats, boxes = [], [], []
            for b, it in enumerate(items):
                ids = token_lists[b]
                if modality == "text":
                    inner = text_maps[b, 1:len(ids) - 1].detach().cpu()
                    keep = kept(inner, frac, positive, args.tie_break, args.tie_seed)
                    toks.append([ids[0]] + [ids[1 + i] for i in torch.nonzero(keep).flatten().tolist()] + [ids[-1]])
                    feats.append(it["features"])
                    boxes.append(it["boxes"])
                else:
                    scores = box_maps[b, :len(it["features"])].detach().cpu()
                    keep = kept(scores, frac, positive, args.tie_break, args.tie_seed)
                    order = order_by(scores, keep, positive)
                    toks.append(ids)
                    feats.append(it["features"][order])
                    boxes.append(it["boxes"][order])
            with torch.no_grad():
                answers = model(**pad_batch(toks, feats, boxes, device)).question_answering_score.argmax(-1)
            for b, it in enumerate(items):
                out[test][b][s] = vqa_soft_accuracy(labels[int(answers[b])], it["answers"])
    return out


def auc(accuracy: Sequence[float]) -> float:
    """100 * trapz(accuracy, fractions removed) (accuracy as fractions)."""
    trapz = getattr(np, "trapezoid", None) or np.trapz
    return float(100 * trapz(np.asarray(accuracy, np.float64), np.asarray(STEPS)))


def summarise(per_item: Dict[str, List[List[float]]]) -> Dict[str, dict]:
    out = {}
    for test, rows in per_item.items():
        acc = np.asarray(rows, np.float64).mean(axis=0) if rows else np.zeros(len(STEPS))
        out[test] = {"accuracy": [round(float(a) * 100, 3) for a in acc], "auc": round(auc(acc), 3)}
    return out


def write_reports(out_dir: str, results: dict) -> None:
    lines = ["| method | text negative AUC (higher better) | text positive AUC (lower better) | "
             "image negative AUC (higher better) | image positive AUC (lower better) | questions |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant, r in results["methods"].items():
        s = r["summary"]
        lines.append(f"| {LABELS[variant]} | {s['text_negative']['auc']:.2f} | {s['text_positive']['auc']:.2f} | "
                     f"{s['image_negative']['auc']:.2f} | {s['image_positive']['auc']:.2f} | {r['count']} |")
    atomic_write_text(os.path.join(out_dir, "table.md"), "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, test in zip(axes, TESTS):
        for variant, r in results["methods"].items():
            ax.plot(STEPS, r["summary"][test]["accuracy"], marker="o", ms=3, label=LABELS[variant])
        ax.set_title(test.replace("_", " "))
        ax.set_xlabel("fraction removed")
        ax.set_ylabel("VQA accuracy (%)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    tmp = os.path.join(out_dir, f".perturbation.{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, os.path.join(out_dir, "perturbation.png"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model-dir", required=True, type=existing_dir,
                   help="local Hugging Face LxmertForQuestionAnswering directory with its tokenizer")
    p.add_argument("--output-dir", required=True, help="results.json, table.md, perturbation.png")
    p.add_argument("--scenes", type=scene_count_arg, default=None,
                   help="stand-in: questions about this many generated validation scenes")
    p.add_argument("--scene-seed", type=int, default=0, help="stand-in: scene seed")
    p.add_argument("--questions", type=existing_file, help="real data: VQA v2 questions JSON")
    p.add_argument("--annotations", type=existing_file, help="real data: VQA v2 annotations JSON")
    p.add_argument("--features", type=existing_file, help="real data: box features .npz (see above)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many questions")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=20, help="question tokens (LXMERT VQA uses 20)")
    p.add_argument("--tie-break", choices=TIE_BREAKS, default=DEFAULT_TIE_BREAK,
                   help="order among equally relevant tokens/boxes (modules/ranking.py)")
    p.add_argument("--tie-seed", type=int, default=0, help="seed of the random tie order")
    p.add_argument("--seed", type=int, default=0, help="seed of the random reference maps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another run (other arguments, weights or data) in --output-dir; "
                        "without it a finished or partial run of the same identity is resumed / reused")
    add_device_arg(p, default="cpu")
    return p


def _identity(args: argparse.Namespace, n_items: int) -> str:
    # --batch-size changes results: the random reference draws (B, T) and (B, K) maps per batch from --seed,
    # and T, K (the padding) are the batch's longest question and box set
    keys = ("scenes", "scene_seed", "questions", "annotations", "features", "limit", "max_length", "tie_break",
            "tie_seed", "seed", "batch_size")
    from modules.checkpoints import model_dir_sha256

    # content, not only paths: other weights or data under the same names are another run
    data = [p for p in (args.questions, args.annotations, args.features) if p is not None]
    text = json.dumps({k: getattr(args, k) for k in keys} | {
        "items": n_items, "model": os.path.abspath(args.model_dir), "model_sha256": model_dir_sha256(args.model_dir),
        "data_sha256": files_sha256(data) if data else None}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    real = [args.questions, args.annotations, args.features]
    if (args.scenes is None) == all(x is None for x in real) or (args.scenes is None and None in real):
        raise CLIError("give either --scenes N (the stand-in) or all of --questions, --annotations and --features")
    device = resolve_device(args.device)
    check_output_dir(args.output_dir, flag="--output-dir")
    from transformers import AutoTokenizer, LxmertForQuestionAnswering

    from modules.checkpoints import load_pretrained, load_pretrained_part

    # the one loader: safe file kinds, one-line errors, finite weights
    model = load_pretrained(LxmertForQuestionAnswering, args.model_dir).to(device).eval()
    tokenizer = load_pretrained_part(AutoTokenizer, args.model_dir, "tokenizer")
    if args.scenes:  # the questions' box features are kept: about 64 KiB a scene
        check_memory(args.scenes * 64 * 1024, f"--scenes {args.scenes}")
    items = scene_items(args.scenes, args.scene_seed) if args.scenes else real_items(*real, args.limit)
    if args.limit:
        items = items[:args.limit]
    if items[0]["features"].shape[-1] != model.config.visual_feat_dim:
        raise CLIError(f"box features have {items[0]['features'].shape[-1]} values, the model expects "
                       f"{model.config.visual_feat_dim}")
    identity = _identity(args, len(items))
    path = os.path.join(args.output_dir, "results.json")
    with file_lock(os.path.join(args.output_dir, ".lock"), what=args.output_dir):
        results = {"identity": identity, "steps": list(STEPS), "tie_break": args.tie_break,
                   "tie_seed": args.tie_seed, "data": "scenes stand-in (not VQA v2)" if args.scenes else "VQA v2",
                   "model": os.path.abspath(args.model_dir), "methods": {}, "partial": {}}
        results = resume_results(path, identity, results, overwrite=args.overwrite)
        for variant in args.methods:
            done = results["partial"].get(variant, {"count": 0, "per_item": {t: [] for t in TESTS}})
            if variant in results["methods"]:
                continue
            bar = tqdm(total=len(items), initial=done["count"], desc=variant)
            for start in range(done["count"], len(items), args.batch_size):
                batch = items[start:start + args.batch_size]
                scores = run_batch(model, tokenizer, batch, variant, args, device)
                for t in TESTS:
                    done["per_item"][t] += scores[t]
                done["count"] += len(batch)
                results["partial"][variant] = done
                atomic_write_json(path, results)
                bar.update(len(batch))
            bar.close()
            results["methods"][variant] = {"count": done["count"], "summary": summarise(done["per_item"])}
            results["partial"].pop(variant, None)
            atomic_write_json(path, results)
        write_reports(args.output_dir, results)
    print(open(os.path.join(args.output_dir, "table.md")).read())
    print(f"wrote {path}, table.md and perturbation.png in {args.output_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
