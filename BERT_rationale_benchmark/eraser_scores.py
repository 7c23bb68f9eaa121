"""Every score of the ERASER benchmark's published metric script, from one results file.

The published scorer is ``rationale_benchmark/metrics.py`` of the ERASER
benchmark (DeYoung et al., ACL 2020; copied unchanged, plus a debugging
print, into Transformer-Explainability as ``BERT_rationale_benchmark/metrics.py``).
This module restates its definitions (written here, not copied) and
:func:`score_file` returns a dict with **the keys and nesting of its
``--score_file`` output**, so the two can be compared directly::

    iou_scores              [{"threshold", "micro": {p, r, f1}, "macro": {p, r, f1}}]   hard rationales
    rationale_prf           {"instance_micro": {p, r, f1}, "instance_macro": {p, r, f1}}  exact span match
    token_prf               the same, spans expanded into tokens
    token_soft_metrics      {"auprc", "average_precision", "roc_auc_score"}   soft_rationale_predictions
    sentence_soft_metrics   the same per sentence                               soft_sentence_predictions
    classification_scores   {"accuracy", "prf" (sklearn's classification_report dict),
                             "comprehensiveness", "sufficiency", their "_entropy" and "_kl" variants,
                             "aopc_thresholds", "comprehensiveness_aopc", "comprehensiveness_aopc_points",
                             "sufficiency_aopc", "sufficiency_aopc_points"}

A section is present when the first record carries its field, as in the
published script; unlike it, a field carried by some records and not by
others, a distribution missing a class, a score list of the wrong length or
a missing AOPC bin is refused (:class:`~BERT_rationale_benchmark.utils.ERASERFormatError`,
one line through the command line) before anything is scored.

Quirks of the published script, kept on purpose (each is also marked
``QUIRK`` where it is implemented):

1. **IOU F1** (``partial_match_score``): each predicted span is matched to its
   best-overlapping true span; it is a true positive when that IOU is
   >= the threshold, and the true positives divide the number of *true spans*
   for recall. Two predicted halves of one true span (IOU exactly 0.5 each)
   are two true positives for one true span, so recall can exceed 1. Macro
   recall averages over the (annotation, document) pairs with truth, macro
   precision over those with predictions, and macro F1 is the F1 of the two
   averages (not the mean of per-document F1, unlike ``token_prf``).
2. ``rationale_prf`` / ``token_prf`` micro precision divides by the number of
   predictions unguarded (the published script fails on a file without any;
   only scored when the first record has predictions).
3. A section is scored or skipped by looking at the **first record only**
   (e.g. no hard rationale scores at all when the first record has no
   predicted span); we say so on the console.
4. **AUPRC** (``_auprc``) is the trapezoidal area under sklearn's
   precision-recall curve (``precision_recall_curve`` + ``auc``), not average
   precision; it averages over *every* document, while ``average_precision``
   and ``roc_auc_score`` skip documents whose truth is all one class. For a
   document without any true token sklearn >= 1.1 sets recall to 1 at every
   threshold (AUPRC 0.5 when scores are not all tied); older sklearn gave NaN.
   We follow the installed sklearn's rule (recall 1). With every document
   skipped the published averages are NaN.
5. **Comprehensiveness / sufficiency** measure the probability of the
   *predicted* class (``classification``), whatever class the explanation
   explains; entropy variants are H(full) - H(reduced) with scipy's
   ``entropy`` (each distribution renormalised to sum 1, natural log); the
   KL variants are KL(reduced || full), ``entropy(reduced, full)``.
6. **AOPC** keeps the bins of ``thresholded_scores`` whose threshold is
   *exactly equal* (float ==) to one of ``aopc_thresholds``, in increasing
   threshold order, and averages the drop over bins and documents (no 0 %
   bin, unlike Samek et al.'s AOPC); ``aopc_thresholds`` is reported as given
   while the points are in increasing threshold order.
7. The classification labels are those of the split's annotations (a
   predicted class outside them crashes the published script; here it is a
   one-line error). ``tokens_to_flip`` is computed by the published script
   but never reported; it is not read here.

NaN and infinite values (e.g. KL with a zero probability in the full
distribution, or an average over no documents), which the published script
writes as the non-standard ``NaN`` / ``Infinity``, are written as ``null``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from BERT_rationale_benchmark.utils import Annotation, ERASERFormatError

__all__ = [
    "IOU_THRESHOLDS", "AOPC_THRESHOLDS", "Span", "truth_spans", "predicted_spans", "token_level",
    "partial_match_score", "hard_prf", "pr_curve", "trapezoid_auc", "auprc", "average_precision", "roc_auc",
    "soft_scores", "truth_flags", "entropy", "kl_divergence", "classification_report", "score_classifications",
    "aopc_scores", "check_fields", "score_file", "finite_or_none", "aopc_bin_size",
]

IOU_THRESHOLDS: Tuple[float, ...] = (0.5,)
AOPC_THRESHOLDS: Tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5)

Span = Tuple[str, str, int, int]  # (annotation_id, docid, start_token, end_token), end exclusive
Key = Tuple[str, str]

FAITHFULNESS_FIELDS = ("comprehensiveness_classification_scores", "sufficiency_classification_scores")


def _f1(p: float, r: float) -> float:
    return 0.0 if p == 0 or r == 0 else 2 * p * r / (p + r)


def aopc_bin_size(threshold: float, n_words: int) -> int:
    """Words in an AOPC bin: ceil(threshold * n_words), the threshold read as
    its decimal (10 % of 70 words is 7, where float arithmetic gives 7.000000000000001 -> 8)."""
    return math.ceil(Fraction(repr(float(threshold))) * n_words)


# ---------------------------------------------------------------------------------------------------------------------
# hard rationales
# ---------------------------------------------------------------------------------------------------------------------
def truth_spans(annotations: Iterable[Annotation]) -> List[Span]:
    """Every human evidence span (groups flattened)."""
    return [(a.annotation_id, ev.docid, ev.start_token, ev.end_token) for a in annotations for ev in a.all_evidences()]


def predicted_spans(results: Iterable[Mapping[str, Any]]) -> List[Span]:
    """Every ``hard_rationale_predictions`` span of every record."""
    return [(r["annotation_id"], rat["docid"], p["start_token"], p["end_token"])
            for r in results for rat in r["rationales"] for p in rat.get("hard_rationale_predictions") or []]


def token_level(spans: Iterable[Span]) -> List[Span]:
    """Each span cut into one-token spans."""
    return [(a, d, t, t + 1) for a, d, s, e in spans for t in range(s, e)]


def _by_key(spans: Iterable[Span]) -> Dict[Key, Set[Span]]:
    out: Dict[Key, Set[Span]] = defaultdict(set)
    for sp in spans:
        out[(sp[0], sp[1])].add(sp)  # a repeated identical span counts once (the published spans are a set)
    return out


def partial_match_score(truth: Sequence[Span], pred: Sequence[Span],
                        thresholds: Sequence[float] = IOU_THRESHOLDS) -> List[Dict[str, Any]]:
    """IOU F1 at each threshold (the published ``partial_match_score``; quirk 1 of the module doc)."""
    by_truth, by_pred = _by_key(truth), _by_key(pred)
    n_truth = {k: len(v) for k, v in by_truth.items()}
    n_pred = {k: len(v) for k, v in by_pred.items()}
    best: Dict[Key, List[float]] = {}
    for k, preds in by_pred.items():
        ious = []
        for _, _, ps, pe in preds:
            b = 0.0
            for _, _, ts, te in by_truth.get(k, ()):
                inter = max(0, min(pe, te) - max(ps, ts))
                union = (pe - ps) + (te - ts) - inter
                iou = inter / union if union else 0.0
                b = max(b, iou)
            ious.append(b)
        best[k] = ious
    out = []
    for th in thresholds:
        # QUIRK: every predicted span over the threshold is a hit, even several for one true span
        tp = {k: sum(1 for x in v if x >= th) for k, v in best.items()}
        total_tp, total_truth, total_pred = sum(tp.values()), sum(n_truth.values()), sum(n_pred.values())
        micro_r = total_tp / total_truth if total_truth else 0.0
        micro_p = total_tp / total_pred if total_pred else 0.0
        # QUIRK: recall averaged over keys with truth, precision over keys with predictions, F1 of the averages
        rs = [tp.get(k, 0) / n for k, n in n_truth.items()]
        ps = [tp.get(k, 0) / n for k, n in n_pred.items()]
        macro_r = sum(rs) / len(rs) if rs else 0.0
        macro_p = sum(ps) / len(ps) if ps else 0.0
        out.append({"threshold": th,
                    "micro": {"p": micro_p, "r": micro_r, "f1": _f1(micro_r, micro_p)},
                    "macro": {"p": macro_p, "r": macro_r, "f1": _f1(macro_r, macro_p)}})
    return out


def hard_prf(truth: Sequence[Span], pred: Sequence[Span]) -> Dict[str, Dict[str, float]]:
    """Exact-match precision / recall / F1 of spans (the published
    ``score_hard_rationale_predictions``): micro over all spans, macro the
    mean of per-(annotation, document) P, R and F1 over keys of truth or prediction."""
    t_all, p_all = set(truth), set(pred)
    if not p_all or not t_all:  # QUIRK 2: the published script divides unguarded here
        raise ERASERFormatError("no predicted spans or no true spans: the published script cannot score this "
                                "(it divides by zero)")
    hit = len(t_all & p_all)
    micro_p, micro_r = hit / len(p_all), hit / len(t_all)
    by_truth, by_pred = _by_key(t_all), _by_key(p_all)
    per = []
    for k in set(by_truth) | set(by_pred):
        t, p = by_truth.get(k, set()), by_pred.get(k, set())
        ip = len(t & p) / len(p) if p else 0.0
        ir = len(t & p) / len(t) if t else 0.0
        per.append((ip, ir, _f1(ip, ir)))
    n = len(per)
    return {"instance_micro": {"p": micro_p, "r": micro_r, "f1": _f1(micro_p, micro_r)},
            "instance_macro": {"p": sum(x[0] for x in per) / n, "r": sum(x[1] for x in per) / n,
                               "f1": sum(x[2] for x in per) / n}}


# ---------------------------------------------------------------------------------------------------------------------
# soft rationales: precision-recall and ROC curves as sklearn computes them
# ---------------------------------------------------------------------------------------------------------------------
def _cumulative_counts(truth: Sequence[bool], scores: Sequence[float]) -> Tuple[List[int], List[int]]:
    """True and false positives above each distinct score, highest score first (ties form one step)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tps, fps = [], []
    tp = fp = 0
    for j, i in enumerate(order):
        if truth[i]:
            tp += 1
        else:
            fp += 1
        if j + 1 == len(order) or scores[order[j + 1]] != scores[i]:
            tps.append(tp)
            fps.append(fp)
    return tps, fps


def pr_curve(truth: Sequence[bool], scores: Sequence[float]) -> Tuple[List[float], List[float]]:
    """(precision, recall) as ``sklearn.metrics.precision_recall_curve``
    (>= 1.1): one point per distinct score from the lowest threshold up, then (1, 0).
    Without any true item recall is 1 at every threshold (sklearn's rule)."""
    tps, fps = _cumulative_counts(truth, scores)
    total = tps[-1] if tps else 0
    precision = [tp / (tp + fp) if tp + fp else 0.0 for tp, fp in zip(tps, fps)]
    recall = [tp / total if total else 1.0 for tp in tps]
    return precision[::-1] + [1.0], recall[::-1] + [0.0]


def trapezoid_auc(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under y(x) by the trapezoidal rule, x monotonic in either
    direction (``sklearn.metrics.auc``)."""
    area = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2.0 for i in range(len(x) - 1))
    increasing = all(x[i + 1] >= x[i] for i in range(len(x) - 1))
    decreasing = all(x[i + 1] <= x[i] for i in range(len(x) - 1))
    if not (increasing or decreasing):
        raise ValueError("x is neither increasing nor decreasing")
    return area if increasing else -area


def auprc(truth: Sequence[bool], scores: Sequence[float]) -> float:
    """Trapezoidal area under the precision-recall curve of one document (quirk 4)."""
    precision, recall = pr_curve(truth, scores)
    return trapezoid_auc(recall, precision)


def average_precision(truth: Sequence[bool], scores: Sequence[float]) -> float:
    """sklearn's ``average_precision_score``: sum over thresholds of (R_n - R_{n-1}) P_n."""
    precision, recall = pr_curve(truth, scores)
    return max(0.0, -sum((recall[i + 1] - recall[i]) * precision[i] for i in range(len(recall) - 1)))


def roc_auc(truth: Sequence[bool], scores: Sequence[float]) -> float:
    """sklearn's ``roc_auc_score`` of one document (both classes present)."""
    tps, fps = _cumulative_counts(truth, scores)
    if not tps or tps[-1] == 0 or fps[-1] == 0:
        raise ValueError("ROC AUC needs both classes")
    fpr = [0.0] + [f / fps[-1] for f in fps]
    tpr = [0.0] + [t / tps[-1] for t in tps]
    return trapezoid_auc(fpr, tpr)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def soft_scores(pairs: Sequence[Tuple[Sequence[bool], Sequence[float]]]) -> Dict[str, float]:
    """``auprc`` (mean over every document; 0 with none), ``average_precision``
    and ``roc_auc_score`` (means over documents with both classes; NaN with
    none), the published ``score_soft_tokens`` (quirk 4)."""
    if not pairs:
        return {"auprc": 0.0, "average_precision": 0.0, "roc_auc_score": 0.0}
    both = [(t, s) for t, s in pairs if any(t) and not all(t)]
    return {"auprc": _mean([auprc(t, s) for t, s in pairs]),
            "average_precision": _mean([average_precision(t, s) for t, s in both]),
            "roc_auc_score": _mean([roc_auc(t, s) for t, s in both])}


def truth_flags(annotations: Sequence[Annotation], lengths: Mapping[str, int],
                sentences: bool = False) -> Dict[Key, List[bool]]:
    """Per (annotation, document): True for each token (or sentence) inside a human evidence span."""
    out: Dict[Key, List[bool]] = {}
    for ann in annotations:
        for ev in ann.all_evidences():
            flags = out.setdefault((ann.annotation_id, ev.docid), [False] * lengths[ev.docid])
            start, end = (ev.start_sentence, ev.end_sentence) if sentences else (ev.start_token, ev.end_token)
            if sentences and not (0 <= start <= end <= len(flags)) and start != -1:
                raise ERASERFormatError(f"annotation {ann.annotation_id!r}: evidence sentences [{start}, {end}) "
                                        f"outside document {ev.docid!r} ({len(flags)} sentences)")
            for i in range(max(start, 0), end):
                flags[i] = True
    return out


# ---------------------------------------------------------------------------------------------------------------------
# classification and faithfulness
# ---------------------------------------------------------------------------------------------------------------------
def entropy(p: Sequence[float]) -> float:
    """Shannon entropy (nats) of ``p`` renormalised to sum 1 (``scipy.stats.entropy(p)``)."""
    s = sum(p)
    return sum(-(x / s) * math.log(x / s) if x > 0 else 0.0 for x in p)


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) (nats), both renormalised (``scipy.stats.entropy(p, q)``); inf where q is 0 and p is not."""
    sp, sq = sum(p), sum(q)
    total = 0.0
    for a, b in zip(p, q):
        a, b = a / sp, b / sq
        if a > 0:
            total += a * math.log(a / b) if b > 0 else math.inf
    return total


def classification_report(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> Dict[str, Any]:
    """sklearn's ``classification_report(..., output_dict=True)``: per label
    precision, recall, f1-score, support; accuracy; macro and weighted averages
    (an undefined precision or recall is 0, sklearn's default)."""
    report: Dict[str, Any] = {}
    rows = []
    for lab in labels:
        tp = sum(1 for t, p in zip(truth, predicted) if t == lab and p == lab)
        n_pred = sum(1 for p in predicted if p == lab)
        support = sum(1 for t in truth if t == lab)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / support if support else 0.0
        row = {"precision": prec, "recall": rec, "f1-score": _f1(prec, rec), "support": support}
        report[lab] = row
        rows.append(row)
    total = sum(r["support"] for r in rows)
    report["accuracy"] = sum(1 for t, p in zip(truth, predicted) if t == p) / len(truth)
    for name, weights in (("macro avg", [1.0] * len(rows)), ("weighted avg", [r["support"] for r in rows])):
        w = sum(weights)
        report[name] = {m: (sum(x * r[m] for x, r in zip(weights, rows)) / w if w else 0.0)
                        for m in ("precision", "recall", "f1-score")}
        report[name]["support"] = total
    return report


def _drop(r: Mapping[str, Any], reduced: Mapping[str, float]) -> float:
    cls = r["classification"]
    return r["classification_scores"][cls] - reduced[cls]


def aopc_scores(results: Sequence[Mapping[str, Any]], thresholds: Sequence[float],
                field: str) -> Tuple[float, List[float]]:
    """Mean drop of the predicted class's probability over the AOPC bins and
    documents, and the mean per bin (increasing threshold; quirk 6)."""
    wanted = set(thresholds)
    table = []
    for r in results:
        bins = sorted((b for b in r["thresholded_scores"] if b["threshold"] in wanted), key=lambda b: b["threshold"])
        table.append([_drop(r, b[field]) for b in bins])
    flat = [x for row in table for x in row]
    points = [_mean([row[j] for row in table]) for j in range(len(table[0]))] if table else []
    return _mean(flat), points


def score_classifications(results: Sequence[Mapping[str, Any]], annotations: Sequence[Annotation],
                          aopc_thresholds: Sequence[float] = AOPC_THRESHOLDS) -> Dict[str, Any]:
    """The published ``score_classifications``: accuracy, per-class report, and
    the faithfulness scores present in the first record (quirks 5-7)."""
    labels = sorted({a.classification for a in annotations})
    by_id = {r["annotation_id"]: r for r in results}
    truth = [a.classification for a in annotations]
    predicted = [by_id[a.annotation_id]["classification"] for a in annotations]
    out: Dict[str, Any] = {"accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(truth),
                           "prf": classification_report(truth, predicted, labels)}
    first = results[0]
    for name, field in (("comprehensiveness", FAITHFULNESS_FIELDS[0]), ("sufficiency", FAITHFULNESS_FIELDS[1])):
        if first.get(field) is not None:
            out[name] = _mean([_drop(r, r[field]) for r in results])
            out[f"{name}_entropy"] = _mean([entropy(list(r["classification_scores"].values()))
                                            - entropy(list(r[field].values())) for r in results])
            keys = [list(r["classification_scores"]) for r in results]
            out[f"{name}_kl"] = _mean([kl_divergence([r[field][c] for c in k],
                                                     [r["classification_scores"][c] for c in k])
                                       for r, k in zip(results, keys)])
        else:
            out[name] = out[f"{name}_entropy"] = out[f"{name}_kl"] = None
    if first.get("thresholded_scores") is not None:
        out["aopc_thresholds"] = list(aopc_thresholds)
        for name, field in (("comprehensiveness", FAITHFULNESS_FIELDS[0]), ("sufficiency", FAITHFULNESS_FIELDS[1])):
            out[f"{name}_aopc"], out[f"{name}_aopc_points"] = aopc_scores(results, aopc_thresholds, field)
    else:
        for key in ("aopc_thresholds", "comprehensiveness_aopc", "comprehensiveness_aopc_points", "sufficiency_aopc",
                    "sufficiency_aopc_points"):
            out[key] = None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# validation and the whole score file
# ---------------------------------------------------------------------------------------------------------------------
OPTIONAL_RECORD_FIELDS = ("classification", "classification_scores") + FAITHFULNESS_FIELDS + ("thresholded_scores",)
OPTIONAL_RATIONALE_FIELDS = ("soft_rationale_predictions", "soft_sentence_predictions")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_distribution(d: Any, where: str, field: str, classes: Optional[Set[str]]) -> Set[str]:
    if not isinstance(d, dict) or not d:
        raise ERASERFormatError(f"{where}: {field!r} must be a non-empty object of class -> probability")
    bad = [k for k, v in d.items() if not (_is_number(v) and v >= 0)]
    if bad:
        raise ERASERFormatError(f"{where}: {field!r} has a non-finite or negative score for {bad[0]!r}")
    if sum(d.values()) <= 0:
        raise ERASERFormatError(f"{where}: {field!r} sums to 0")
    keys = set(d)
    if classes is not None and keys != classes:
        missing, extra = sorted(classes - keys), sorted(keys - classes)
        what = (f"lacks class(es) {', '.join(missing)}" if missing else "") + \
            ("; " if missing and extra else "") + (f"has unexpected class(es) {', '.join(extra)}" if extra else "")
        raise ERASERFormatError(f"{where}: {field!r} {what} (expected {', '.join(sorted(classes))})")
    return keys


def check_fields(results: Sequence[Mapping[str, Any]], path: Any, annotations: Sequence[Annotation],
                 token_counts: Mapping[str, int], sentence_counts: Optional[Mapping[str, int]] = None,
                 aopc_thresholds: Sequence[float] = AOPC_THRESHOLDS) -> None:
    """Refuse a results file the published scores would be partial or wrong
    on (the records' ids, docids and spans are checked by
    :func:`BERT_rationale_benchmark.metrics.load_results`):

    * an optional field present in some records and not in others;
    * overlapping predicted spans in one document (the published check);
    * a soft score list whose length is not its document's token (sentence) count, or non-finite;
    * a ``classification`` outside the split's labels; a probability
      distribution that lacks a class, differs from the record's
      ``classification_scores`` classes or from the first record's;
    * ``thresholded_scores`` lacking one of ``aopc_thresholds``, repeating one, or with
      other thresholds than the first record's.
    """
    if not results:
        raise ERASERFormatError(f"{path}: no records")
    labels = {a.classification for a in annotations}
    for field in OPTIONAL_RECORD_FIELDS:
        having = [i for i, r in enumerate(results) if r.get(field) is not None]
        if having and len(having) != len(results):
            i = next(i for i, r in enumerate(results) if r.get(field) is None)
            raise ERASERFormatError(f"{path}: record {i + 1} ({results[i]['annotation_id']!r}) lacks {field!r}, which "
                                    f"{len(having)} of {len(results)} records have (a field must be in every "
                                    f"record or in none)")
    for field in OPTIONAL_RATIONALE_FIELDS:
        rats = [(i, rat) for i, r in enumerate(results) for rat in r["rationales"]]
        having = [x for x in rats if x[1].get(field) is not None]
        if having and len(having) != len(rats):
            i, rat = next(x for x in rats if x[1].get(field) is None)
            raise ERASERFormatError(f"{path}: record {i + 1} ({results[i]['annotation_id']!r}) lacks {field!r} for "
                                    f"document {rat['docid']!r} (a field must be in every rationale or in none)")
    first = results[0]
    need_scores = any(first.get(f) is not None for f in FAITHFULNESS_FIELDS + ("thresholded_scores",))
    if need_scores and (first.get("classification_scores") is None or first.get("classification") is None):
        raise ERASERFormatError(f"{path}: faithfulness scores need 'classification' and 'classification_scores' "
                                "in every record")
    if first.get("thresholded_scores") is not None and not all(first.get(f) is not None
                                                               for f in FAITHFULNESS_FIELDS):
        raise ERASERFormatError(f"{path}: 'thresholded_scores' needs 'comprehensiveness_classification_scores' and "
                                "'sufficiency_classification_scores' (the published verification)")
    classes: Optional[Set[str]] = None
    wanted = list(aopc_thresholds)
    first_bins: Optional[Set[float]] = None
    for n, r in enumerate(results, start=1):
        where = f"{path}: record {n} ({r['annotation_id']!r})"
        docids = [rat["docid"] for rat in r["rationales"]]
        if len(set(docids)) != len(docids):
            raise ERASERFormatError(f"{where}: a document appears twice in 'rationales'")
        for rat in r["rationales"]:
            spans = sorted({(p["start_token"], p["end_token"]) for p in rat.get("hard_rationale_predictions") or []})
            for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
                if s2 < e1:
                    raise ERASERFormatError(f"{where}: predicted spans [{s1}, {e1}) and [{s2}, {e2}) of "
                                            f"{rat['docid']!r} overlap (the published scorer refuses overlaps)")
            for field, counts, unit in (("soft_rationale_predictions", token_counts, "tokens"),
                                        ("soft_sentence_predictions", sentence_counts, "sentences")):
                scores = rat.get(field)
                if scores is None:
                    continue
                if counts is None:
                    raise ERASERFormatError(f"{where}: {field!r} given but no sentence counts to check it against")
                if not isinstance(scores, list) or not all(_is_number(x) for x in scores):
                    raise ERASERFormatError(f"{where}: {field!r} must be a list of finite numbers")
                if len(scores) != counts[rat["docid"]]:
                    raise ERASERFormatError(f"{where}: {field!r} has {len(scores)} scores for the "
                                            f"{counts[rat['docid']]} {unit} of {rat['docid']!r}")
        if r.get("classification") is not None:
            if not isinstance(r["classification"], str) or r["classification"] not in labels:
                raise ERASERFormatError(f"{where}: classification {r['classification']!r} is not a label of the "
                                        f"split ({', '.join(sorted(labels))})")
        if r.get("classification_scores") is not None:
            keys = _check_distribution(r["classification_scores"], where, "classification_scores", classes)
            if classes is None:
                classes = keys
                if not labels <= classes:
                    raise ERASERFormatError(f"{where}: 'classification_scores' lacks class(es) "
                                            f"{', '.join(sorted(labels - classes))} of the split")
            for field in FAITHFULNESS_FIELDS:
                if r.get(field) is not None:
                    _check_distribution(r[field], where, field, classes)
        if r.get("thresholded_scores") is not None:
            bins = r["thresholded_scores"]
            if not isinstance(bins, list) or not all(isinstance(b, dict) and _is_number(b.get("threshold"))
                                                     for b in bins):
                raise ERASERFormatError(f"{where}: 'thresholded_scores' must be a list of objects with a 'threshold'")
            present = [b["threshold"] for b in bins]
            repeated = sorted({t for t in present if present.count(t) > 1})
            if repeated:
                raise ERASERFormatError(f"{where}: 'thresholded_scores' repeats threshold {repeated[0]}")
            missing = [t for t in wanted if t not in present]
            if missing:
                raise ERASERFormatError(f"{where}: 'thresholded_scores' lacks the AOPC threshold(s) "
                                        f"{', '.join(map(str, missing))} (has {', '.join(map(str, sorted(present)))})")
            if first_bins is None:
                first_bins = set(present)
            elif set(present) != first_bins:  # the published verification: one set of thresholds for all
                raise ERASERFormatError(f"{where}: 'thresholded_scores' thresholds {sorted(present)} differ from "
                                        f"record 1's {sorted(first_bins)}")
            for b in bins:
                for field in FAITHFULNESS_FIELDS:
                    if field not in b:
                        raise ERASERFormatError(f"{where}: thresholded score {b['threshold']} lacks {field!r}")
                    _check_distribution(b[field], f"{where}, threshold {b['threshold']}", field, classes)


def _has_hard(results: Sequence[Mapping[str, Any]]) -> bool:
    rats = results[0].get("rationales") or []
    return bool(rats) and bool(rats[0].get("hard_rationale_predictions"))


def _has_soft(results: Sequence[Mapping[str, Any]], field: str) -> bool:
    rats = results[0].get("rationales") or []
    return bool(rats) and rats[0].get(field) is not None


def _paired(results, flags: Dict[Key, List[bool]], lengths: Mapping[str, int], field: str):
    pairs = []
    for r in results:
        for rat in r["rationales"]:
            key = (r["annotation_id"], rat["docid"])
            # a document without evidence is all False (the published rule)
            pairs.append((flags.get(key, [False] * lengths[rat["docid"]]), rat[field]))
    return pairs


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def score_file(results: Sequence[Mapping[str, Any]], annotations: Sequence[Annotation],
               token_counts: Mapping[str, int], sentence_counts: Optional[Mapping[str, int]] = None,
               iou_thresholds: Sequence[float] = IOU_THRESHOLDS, aopc_thresholds: Sequence[float] = AOPC_THRESHOLDS,
               notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """Every published score of ``results`` (validated by :func:`check_fields`)
    against ``annotations``, as the published ``--score_file`` nests them.
    ``notes`` collects a line for each section skipped because the first record lacks its field."""
    notes = notes if notes is not None else []
    scores: Dict[str, Any] = {}
    if _has_hard(results):
        truth, pred = truth_spans(annotations), predicted_spans(results)
        if iou_thresholds:
            scores["iou_scores"] = partial_match_score(truth, pred, iou_thresholds)
        scores["rationale_prf"] = hard_prf(truth, pred)
        scores["token_prf"] = hard_prf(token_level(truth), token_level(pred))
    else:
        notes.append("the first record has no hard rationale predictions: hard rationale scores skipped "
                     "(as the published script)")
    if _has_soft(results, "soft_rationale_predictions"):
        flags = truth_flags(annotations, token_counts)
        scores["token_soft_metrics"] = soft_scores(_paired(results, flags, token_counts, "soft_rationale_predictions"))
    else:
        notes.append("no soft_rationale_predictions: token AUPRC skipped")
    if _has_soft(results, "soft_sentence_predictions") and sentence_counts is not None:
        flags = truth_flags(annotations, sentence_counts, sentences=True)
        scores["sentence_soft_metrics"] = soft_scores(_paired(results, flags, sentence_counts,
                                                              "soft_sentence_predictions"))
    if results[0].get("classification") is not None:
        scores["classification_scores"] = score_classifications(results, annotations, aopc_thresholds)
    else:
        notes.append("no classification: classification and faithfulness scores skipped")
    return finite_or_none(scores)
