"""Every score of the published ERASER scorer (issue 23): BERT_rationale_benchmark.eraser_scores and metrics.py.

Hand-made cases with known answers (IOU F1 around 0.5, AUPRC with ties,
comprehensiveness / sufficiency / AOPC from a classifier stub of known
probabilities, entropy and KL), then an independent re-computation of every
score on generated results (exact fractions, pairwise counts, scipy and
sklearn as oracles; none of eraser_scores' functions) equal to 1e-12, the
published --score_file layout, and bad input as a one-line error.
"""
from __future__ import annotations

import json
import math
import random
import warnings
from collections import defaultdict
from fractions import Fraction
from itertools import chain
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from BERT_rationale_benchmark import eraser_scores as es
from BERT_rationale_benchmark import metrics
from BERT_rationale_benchmark.utils import load_documents

TOL = 1e-12


# ---------------------------------------------------------------------------------------------------------------------
# hand-made cases
# ---------------------------------------------------------------------------------------------------------------------
def test_iou_f1_partial_overlaps_around_one_half():
    truth = [("a", "a", 0, 4), ("a", "a", 10, 12), ("b", "b", 0, 3), ("c", "c", 0, 4)]
    pred = [("a", "a", 2, 4),    # IOU 2/4 = 0.5: a hit at 0.5 (>=), not at 0.6
            ("a", "a", 9, 12),   # IOU 2/3: a hit at both
            ("a", "a", 20, 21),  # IOU 0
            ("b", "b", 1, 4),    # IOU 2/4 = 0.5
            ("c", "c", 2, 5)]    # IOU 2/5 = 0.4: never
    at_half, at_06 = es.partial_match_score(truth, pred, [0.5, 0.6])
    assert at_half["threshold"] == 0.5 and at_06["threshold"] == 0.6
    # 0.5: hits a 2, b 1, c 0; truth spans 4, predicted 5
    assert at_half["micro"]["p"] == pytest.approx(3 / 5, abs=TOL) and at_half["micro"]["r"] == pytest.approx(3 / 4)
    assert at_half["micro"]["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35, abs=TOL)
    # macro: recall over keys with truth (a 2/2, b 1/1, c 0/1), precision over keys with predictions (a 2/3, b 1, c 0)
    mr, mp = (1 + 1 + 0) / 3, (2 / 3 + 1 + 0) / 3
    assert at_half["macro"]["r"] == pytest.approx(mr, abs=TOL) and at_half["macro"]["p"] == pytest.approx(mp, abs=TOL)
    assert at_half["macro"]["f1"] == pytest.approx(2 * mr * mp / (mr + mp), abs=TOL)  # the F1 of the averages
    # 0.6: only a's second span
    assert at_06["micro"]["p"] == pytest.approx(1 / 5) and at_06["micro"]["r"] == pytest.approx(1 / 4)
    assert at_06["macro"]["r"] == pytest.approx((1 / 2) / 3) and at_06["macro"]["p"] == pytest.approx((1 / 3) / 3)


def test_iou_quirk_two_halves_are_two_hits_for_one_true_span():
    (s,) = es.partial_match_score([("a", "a", 0, 4)], [("a", "a", 0, 2), ("a", "a", 2, 4)], [0.5])
    assert s["micro"]["r"] == 2.0 and s["micro"]["p"] == 1.0  # recall above 1, as the published script computes


def test_exact_and_token_prf_hand_computed():
    truth = [("a", "a", 0, 4), ("b", "b", 2, 3)]
    pred = [("a", "a", 0, 4), ("a", "a", 5, 6), ("b", "b", 0, 1)]
    exact = es.hard_prf(truth, pred)
    # micro: 1 exact match of 3 predicted, 2 true; macro: a (1/2, 1, 2/3), b (0, 0, 0)
    assert exact["instance_micro"] == pytest.approx({"p": 1 / 3, "r": 1 / 2, "f1": 0.4})
    assert exact["instance_macro"] == pytest.approx({"p": 1 / 4, "r": 1 / 2, "f1": 1 / 3})
    tok = es.hard_prf(es.token_level(truth), es.token_level(pred))
    # tokens: a T={0,1,2,3} P={0,1,2,3,5}: (4/5, 1, 8/9); b T={2} P={0}: 0
    assert tok["instance_micro"] == pytest.approx({"p": 4 / 6, "r": 4 / 5, "f1": 2 * (2 / 3) * 0.8 / (2 / 3 + 0.8)})
    assert tok["instance_macro"]["f1"] == pytest.approx((8 / 9) / 2, abs=TOL)


def test_auprc_ap_and_roc_auc_with_ties():
    truth, scores = [True, False, True, False], [0.9, 0.5, 0.5, 0.1]
    # thresholds 0.9 / 0.5 (one true and one false tied) / 0.1: P = 1, 2/3, 1/2 at R = 1/2, 1, 1
    precision, recall = es.pr_curve(truth, scores)
    assert precision == pytest.approx([1 / 2, 2 / 3, 1, 1]) and recall == pytest.approx([1, 1, 1 / 2, 0])
    assert es.auprc(truth, scores) == pytest.approx(0.5 * (2 / 3 + 1) / 2 + 0.5 * 1, abs=TOL)  # 11/12
    assert es.average_precision(truth, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=TOL)  # 5/6
    assert es.roc_auc(truth, scores) == pytest.approx(3.5 / 4, abs=TOL)  # the tied pair counts one half
    # every score tied: one point (1/3, 1), then (1, 0)
    assert es.auprc([True, False, False], [0.3, 0.3, 0.3]) == pytest.approx((1 / 3 + 1) / 2, abs=TOL)
    assert es.roc_auc([True, False, False], [0.3, 0.3, 0.3]) == pytest.approx(0.5, abs=TOL)
    # no true token: recall 1 at every threshold (sklearn >= 1.1), area 1/2
    assert es.auprc([False, False], [0.9, 0.1]) == pytest.approx(0.5, abs=TOL)
    # averages: auprc over every document, AP and ROC AUC only over documents with both classes
    soft = es.soft_scores([(truth, scores), ([False, False], [0.9, 0.1])])
    assert soft["auprc"] == pytest.approx((11 / 12 + 0.5) / 2, abs=TOL)
    assert soft["average_precision"] == pytest.approx(5 / 6, abs=TOL) and soft["roc_auc_score"] == pytest.approx(0.875)
    assert math.isnan(es.soft_scores([([False], [0.2])])["average_precision"])  # no document left: NaN, as published


def test_auprc_equals_sklearn_on_ties():
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score
    rng = random.Random(3)
    for _ in range(60):
        n = rng.randint(2, 30)
        truth = [rng.random() < 0.3 for _ in range(n)]
        scores = [rng.choice([0.0, 0.1, 0.2, 0.5, 1.0]) for _ in range(n)]  # many ties
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, r, _ = precision_recall_curve([int(t) for t in truth], scores)
        assert es.auprc(truth, scores) == pytest.approx(auc(r, p), abs=TOL)
        if any(truth) and not all(truth):
            assert es.average_precision(truth, scores) == pytest.approx(
                average_precision_score([int(t) for t in truth], scores), abs=TOL)
            assert es.roc_auc(truth, scores) == pytest.approx(roc_auc_score([int(t) for t in truth], scores), abs=TOL)


def test_entropy_and_kl_hand_computed():
    assert es.entropy([0.5, 0.5]) == pytest.approx(math.log(2), abs=TOL)
    assert es.entropy([2.0, 2.0]) == pytest.approx(math.log(2), abs=TOL)  # renormalised, as scipy
    assert es.entropy([1.0, 0.0]) == 0.0
    assert es.kl_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3)
    assert es.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3),
                                                                       abs=TOL)
    assert es.kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    from scipy.stats import entropy
    rng = random.Random(0)
    for _ in range(50):
        p, q = [rng.random() for _ in range(3)], [rng.random() + 1e-3 for _ in range(3)]
        assert es.entropy(p) == pytest.approx(float(entropy(p)), abs=TOL)
        assert es.kl_divergence(p, q) == pytest.approx(float(entropy(p, q)), abs=TOL)


def _faith_record(aid, cls, full, comp, suff, bins):
    dist = lambda pos: {"NEG": 1 - pos, "POS": pos}  # noqa: E731
    return {"annotation_id": aid, "classification": cls, "classification_scores": dist(full),
            "comprehensiveness_classification_scores": dist(comp), "sufficiency_classification_scores": dist(suff),
            "thresholded_scores": [{"threshold": t, "comprehensiveness_classification_scores": dist(c),
                                    "sufficiency_classification_scores": dist(s)} for t, (c, s) in bins.items()],
            "rationales": [{"docid": aid, "hard_rationale_predictions": [{"start_token": 0, "end_token": 1}]}]}


def test_comprehensiveness_sufficiency_aopc_entropy_kl_known_probabilities():
    anns = [SimpleNamespace(annotation_id="a", classification="POS"),
            SimpleNamespace(annotation_id="b", classification="NEG")]
    # P(POS): a predicted POS (0.8), b predicted NEG (P(POS) 0.1, so P(NEG) 0.9)
    recs = [_faith_record("a", "POS", 0.8, 0.4, 0.7, {0.1: (0.6, 0.75), 0.5: (0.3, 0.8)}),
            _faith_record("b", "NEG", 0.1, 0.5, 0.1, {0.5: (0.6, 0.2), 0.1: (0.3, 0.1)})]
    out = es.score_classifications(recs, anns, [0.1, 0.5])
    assert out["accuracy"] == 1.0 and out["prf"]["POS"]["f1-score"] == 1.0
    # comprehensiveness: a 0.8 - 0.4, b 0.9 - 0.5; sufficiency: a 0.8 - 0.7, b 0.9 - 0.9
    assert out["comprehensiveness"] == pytest.approx(0.4, abs=TOL)
    assert out["sufficiency"] == pytest.approx(0.05, abs=TOL)
    H = lambda p: -p * math.log(p) - (1 - p) * math.log(1 - p)  # noqa: E731
    assert out["comprehensiveness_entropy"] == pytest.approx(((H(0.8) - H(0.4)) + (H(0.1) - H(0.5))) / 2, abs=TOL)
    assert out["sufficiency_entropy"] == pytest.approx(((H(0.8) - H(0.7)) + 0) / 2, abs=TOL)
    KL = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))  # noqa: E731, KL(p || q)
    assert out["comprehensiveness_kl"] == pytest.approx((KL(0.4, 0.8) + KL(0.5, 0.1)) / 2, abs=TOL)  # KL(reduced||full)
    assert out["sufficiency_kl"] == pytest.approx((KL(0.7, 0.8) + 0) / 2, abs=TOL)
    # AOPC, bins in increasing threshold order whatever the file's order: a (0.2, 0.5), b (0.9-0.7, 0.9-0.4)
    assert out["comprehensiveness_aopc_points"] == pytest.approx([(0.2 + 0.2) / 2, (0.5 + 0.5) / 2], abs=TOL)
    assert out["comprehensiveness_aopc"] == pytest.approx(0.35, abs=TOL)
    # sufficiency bins: a (0.8-0.75, 0.8-0.8), b (0.9-0.9, 0.9-0.8)
    assert out["sufficiency_aopc_points"] == pytest.approx([0.025, 0.05], abs=TOL)
    assert out["sufficiency_aopc"] == pytest.approx(0.0375, abs=TOL)
    assert out["aopc_thresholds"] == [0.1, 0.5]
    # only the listed bins count (exact float equality): 0.5 alone
    only = es.score_classifications(recs, anns, [0.5])
    assert only["comprehensiveness_aopc"] == pytest.approx(0.5, abs=TOL)


class _Stub(torch.nn.Module):
    """A classifier of known probabilities: logit(POS) = 1 per 'good' wordpiece, -1 per 'bad' one."""

    def __init__(self, good: int, bad: int):
        super().__init__()
        self.good, self.bad, self.num_labels = good, bad, 2

    def forward(self, input_ids, attention_mask=None):
        m = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        z = ((input_ids == self.good) & (m > 0)).sum(1).float() - ((input_ids == self.bad) & (m > 0)).sum(1).float()
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(z), z], dim=1))


def test_pipeline_faithfulness_with_a_stub_of_known_probabilities():
    from BERT_rationale_benchmark.models.pipeline import bert_pipeline as bp
    # ids: 0 pad, 1 [CLS], 2 [SEP], 10 good, 11 bad, 12 filler; word 3 has two wordpieces
    words = ["good", "meh", "good", "badly", "meh", "good", "meh", "meh", "meh", "meh"]
    ids = [1, 10, 12, 10, 11, 11, 12, 10, 12, 12, 12, 12, 2]
    word_ids = [None, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, None]
    doc = bp.EncodedDoc("d", "d", 1, words, ids, word_ids, 10, False)
    scores = [0.9, 0.0, 0.8, 0.7, 0.1, 0.6, 0.05, 0.04, 0.03, 0.02]  # ranks: 0, 2, 3, 5, 4, 1, ...
    stub = _Stub(10, 11)
    full = bp.predict(stub, [doc], 4, 0, torch.device("cpu"))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert float(full[0, 1]) == pytest.approx(sig(3 - 2), abs=1e-6)
    (faith,) = bp.faithfulness_probs(stub, [doc], [scores], [2, 3], [0.1, 0.5], full, 4, 0, torch.device("cpu"))
    # k=2: words 0 and 2 (two 'good'): removed -> 1 good, 2 bad; kept -> 2 good
    comp, suff = faith["k"][2]
    assert comp[1] == pytest.approx(sig(1 - 2), abs=1e-6) and suff[1] == pytest.approx(sig(2), abs=1e-6)
    # k=3 adds word 3 (two 'bad' wordpieces, deleted together)
    comp, suff = faith["k"][3]
    assert comp[1] == pytest.approx(sig(1), abs=1e-6) and suff[1] == pytest.approx(sig(2 - 2), abs=1e-6)
    # bins: ceil(0.1 * 10) = 1 word, ceil(0.5 * 10) = 5 words (0, 2, 3, 5, 4)
    assert es.aopc_bin_size(0.1, 10) == 1 and es.aopc_bin_size(0.5, 10) == 5 and es.aopc_bin_size(0.1, 70) == 7
    comp, suff = faith["bins"][0.1]
    assert comp[1] == pytest.approx(sig(2 - 2), abs=1e-6) and suff[1] == pytest.approx(sig(1), abs=1e-6)
    comp, suff = faith["bins"][0.5]
    assert comp[1] == pytest.approx(sig(0), abs=1e-6) and suff[1] == pytest.approx(sig(3 - 2), abs=1e-6)
    assert bp.reduced_input_ids(doc, [0, 3], keep=False) == [1, 12, 10, 12, 10, 12, 12, 12, 12, 2]
    assert bp.reduced_input_ids(doc, [0, 3], keep=True) == [1, 10, 11, 11, 2]
    # the record: soft scores over every document token (unseen ones get the lowest), sentence maxima
    short = bp.EncodedDoc("d", "d", 1, words + ["cut", "off"], ids, word_ids, 10, True)
    rec = bp._result_record(short, [0, 2], full[0], ["NEG", "POS"], scores + [None, None], [4, 4, 4], faith, 2)
    soft = rec["rationales"][0]["soft_rationale_predictions"]
    assert len(soft) == 12 and soft[10:] == [0.0, 0.0] and soft[:10] == scores
    assert rec["rationales"][0]["soft_sentence_predictions"] == [0.9, 0.6, 0.03]
    assert [b["threshold"] for b in rec["thresholded_scores"]] == [0.1, 0.5]
    assert rec["comprehensiveness_classification_scores"]["POS"] == pytest.approx(sig(-1), abs=1e-6)
    assert "thresholded_scores" not in bp._result_record(short, [0, 2], full[0], ["NEG", "POS"], scores, None, faith,
                                                           20)  # a k without re-runs carries no faithfulness field


# ---------------------------------------------------------------------------------------------------------------------
# generated results, scored twice: metrics.py and an independent re-computation
# ---------------------------------------------------------------------------------------------------------------------
THRESHOLDS = [0.01, 0.05, 0.1, 0.2, 0.5]


def _generate(root: Path, seed: int, n_docs: int = 14):
    rng = random.Random(seed)
    data = root / "data"
    (data / "docs").mkdir(parents=True)
    anns, results = [], []
    for i in range(n_docs):
        docid = f"doc{i}"
        sentences = [[f"w{j}" for j in range(rng.randint(2, 9))] for _ in range(rng.randint(1, 5))]
        (data / "docs" / docid).write_text("\n".join(" ".join(s) for s in sentences) + "\n")
        n = sum(map(len, sentences))
        starts = [sum(map(len, sentences[:j])) for j in range(len(sentences))]  # first token of each sentence
        evidences = []
        for _ in range(rng.randint(0 if i == 3 else 1, 3)):  # doc3: no evidence at all
            sj = rng.randrange(len(sentences))
            s = starts[sj] + rng.randrange(len(sentences[sj]))
            e = min(n, s + rng.randint(1, 4))
            evidences.append([{"docid": docid, "start_token": s, "end_token": e, "text": "",
                               "start_sentence": sj, "end_sentence": sj + 1}])
        label = rng.choice(["NEG", "POS", "MIX"]) if i else "MIX"
        anns.append({"annotation_id": docid, "classification": label, "evidences": evidences, "docids": [docid]})
        spans, t = [], 0
        while t < n:  # disjoint predicted spans of 1-3 tokens
            if rng.random() < 0.35:
                e = min(n, t + rng.randint(1, 3))
                spans.append({"start_token": t, "end_token": e})
                t = e
            t += 1
        if i == 0 and not spans:
            spans = [{"start_token": 0, "end_token": 1}]

        def dist():
            w = [rng.random() + 0.01 for _ in range(3)]
            return dict(zip(["MIX", "NEG", "POS"], [x / sum(w) for x in w]))
        full = dist()
        rec = {"annotation_id": docid,
               "rationales": [{"docid": docid, "hard_rationale_predictions": spans if i != 5 else [],
                               "soft_rationale_predictions": [rng.choice([0.0, 0.25, 0.5, rng.random()])
                                                              for _ in range(n)],
                               "soft_sentence_predictions": [rng.choice([0.1, 0.9, rng.random()])
                                                             for _ in sentences]}],
               "classification": max(full, key=full.get), "classification_scores": full,
               "comprehensiveness_classification_scores": dist(), "sufficiency_classification_scores": dist(),
               "thresholded_scores": [{"threshold": th, "comprehensiveness_classification_scores": dist(),
                                       "sufficiency_classification_scores": dist()}
                                      for th in rng.sample(THRESHOLDS, len(THRESHOLDS))]}
        results.append(rec)
    for split in ("train", "val", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in anns))
    path = root / "identifier_results_10.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    return data, path, anns, results


def _reference(data: Path, anns, results):
    """Every published score, recomputed without eraser_scores: sets of tokens and exact fractions for the
    rationale scores, pairwise counts for the curves, numpy / scipy / sklearn for the rest."""
    from scipy.stats import entropy
    from sklearn.metrics import classification_report
    docs = load_documents(data)
    flat = {d: list(chain.from_iterable(s)) for d, s in docs.items()}
    F = Fraction

    def f1(p, r):
        return 0 if p == 0 or r == 0 else 2 * p * r / (p + r)

    truth = {(a["annotation_id"], ev["docid"], ev["start_token"], ev["end_token"])
             for a in anns for g in a["evidences"] for ev in g}
    pred = {(r["annotation_id"], rat["docid"], p["start_token"], p["end_token"])
            for r in results for rat in r["rationales"] for p in rat["hard_rationale_predictions"]}

    def prf(T, P):
        hit = len(T & P)
        out = {"instance_micro": {"p": F(hit, len(P)), "r": F(hit, len(T))}}
        out["instance_micro"]["f1"] = f1(out["instance_micro"]["p"], out["instance_micro"]["r"])
        keys = {x[:2] for x in T} | {x[:2] for x in P}
        per = []
        for k in keys:
            t, p = {x for x in T if x[:2] == k}, {x for x in P if x[:2] == k}
            pp = F(len(t & p), len(p)) if p else F(0)
            rr = F(len(t & p), len(t)) if t else F(0)
            per.append((pp, rr, f1(pp, rr)))
        out["instance_macro"] = {n: sum(x[j] for x in per) / len(per) for j, n in enumerate("p r f1".split())}
        return out

    ref = {"rationale_prf": prf(truth, pred),
           "token_prf": prf({(a, d, t, t + 1) for a, d, s, e in truth for t in range(s, e)},
                            {(a, d, t, t + 1) for a, d, s, e in pred for t in range(s, e)})}
    # IOU F1 with token sets, as the published script
    ious = defaultdict(list)
    for a, d, s, e in pred:
        best = F(0)
        for a2, d2, s2, e2 in truth:
            if (a2, d2) == (a, d):
                u = set(range(s, e)) | set(range(s2, e2))
                best = max(best, F(len(set(range(s, e)) & set(range(s2, e2))), len(u)) if u else F(0))
        ious[(a, d)].append(best)
    n_truth = defaultdict(int)
    for a, d, s, e in truth:
        n_truth[(a, d)] += 1
    tp = {k: sum(1 for x in v if x >= F(1, 2)) for k, v in ious.items()}
    mr, mp = F(sum(tp.values()), sum(n_truth.values())), F(sum(tp.values()), len(pred))
    Mr = sum(F(tp.get(k, 0), n) for k, n in n_truth.items()) / len(n_truth)
    Mp = sum(F(tp[k], len(v)) for k, v in ious.items()) / len(ious)
    ref["iou_scores"] = [{"threshold": 0.5, "micro": {"p": mp, "r": mr, "f1": f1(mr, mp)},
                          "macro": {"p": Mp, "r": Mr, "f1": f1(Mr, Mp)}}]

    def curves(t, s):
        """AUPRC (trapezoids over the exact PR points), AP and ROC AUC (Mann-Whitney), in fractions."""
        s = [F(x) for x in s]
        pos = sum(t)
        points = []
        for th in sorted(set(s)):
            sel = [ti for ti, si in zip(t, s) if si >= th]
            points.append((F(sum(sel), len(sel)), F(sum(sel), pos) if pos else F(1)))
        points.append((F(1), F(0)))
        auprc = sum((r0 - r1) * (p0 + p1) / 2 for (p0, r0), (p1, r1) in zip(points, points[1:]))
        ap = sum((r0 - r1) * p0 for (p0, r0), (p1, r1) in zip(points, points[1:]))  # sum (R_n - R_n+1) P_n
        neg = len(t) - pos
        roc = None
        if pos and neg:
            wins = sum(F(1) if si > sj else F(1, 2) if si == sj else F(0)
                       for ti, si in zip(t, s) if ti for tj, sj in zip(t, s) if not tj)
            roc = wins / (pos * neg)
        return auprc, ap, roc

    for field, name, sentences in (("soft_rationale_predictions", "token_soft_metrics", False),
                                   ("soft_sentence_predictions", "sentence_soft_metrics", True)):
        au, aps, rocs = [], [], []
        for r in results:
            (rat,) = r["rationales"]
            d = rat["docid"]
            n = len(docs[d]) if sentences else len(flat[d])
            t = [0] * n
            ann = next(a for a in anns if a["annotation_id"] == r["annotation_id"])
            for g in ann["evidences"]:
                for ev in g:
                    lo, hi = (ev["start_sentence"], ev["end_sentence"]) if sentences else (ev["start_token"],
                                                                                           ev["end_token"])
                    for j in range(lo, hi):
                        t[j] = 1
            a, p, c = curves(t, rat[field])
            au.append(a)
            if 0 < sum(t) < n:
                aps.append(p)
                rocs.append(c)
        ref[name] = {"auprc": sum(au) / len(au), "average_precision": sum(aps) / len(aps),
                     "roc_auc_score": sum(rocs) / len(rocs)}
    labels = sorted({a["classification"] for a in anns})
    by_id = {r["annotation_id"]: r for r in results}
    y = [a["classification"] for a in anns]
    yhat = [by_id[a["annotation_id"]]["classification"] for a in anns]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = classification_report(y, yhat, labels=labels, output_dict=True, zero_division=0)
    cs = {"accuracy": np.mean([a == b for a, b in zip(y, yhat)]), "prf": report}
    for name in ("comprehensiveness", "sufficiency"):
        field = f"{name}_classification_scores"
        drop = [r["classification_scores"][r["classification"]] - r[field][r["classification"]] for r in results]
        cs[name] = np.mean(drop)
        cs[f"{name}_entropy"] = np.mean([entropy(list(r["classification_scores"].values()))
                                         - entropy(list(r[field].values())) for r in results])
        keys = [list(r["classification_scores"]) for r in results]
        cs[f"{name}_kl"] = np.mean([entropy([r[field][c] for c in k], [r["classification_scores"][c] for c in k])
                                    for r, k in zip(results, keys)])
        table = np.array([[r["classification_scores"][r["classification"]] - b[field][r["classification"]]
                           for b in sorted(r["thresholded_scores"], key=lambda b: b["threshold"])] for r in results])
        cs[f"{name}_aopc"] = table.mean()
        cs[f"{name}_aopc_points"] = table.mean(axis=0).tolist()
    cs["aopc_thresholds"] = THRESHOLDS
    ref["classification_scores"] = cs
    return ref


def _assert_close(got, want, path="scores"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{path}[{i}]")
    else:
        assert isinstance(got, (int, float)) and abs(float(got) - float(want)) <= TOL, f"{path}: {got} != {float(want)}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_score_equals_an_independent_recomputation(tmp_path: Path, seed: int, capsys):
    data, path, anns, results = _generate(tmp_path, seed)
    out = tmp_path / "scores.json"
    assert metrics.main(["--data-dir", str(data), "--split", "test", "--results", str(path),
                         "--score-file", str(out)]) == 0
    got = json.loads(out.read_text())
    want = _reference(data, anns, results)
    _assert_close(got, want)
    assert "token_soft_metrics.auprc" in capsys.readouterr().out


PUBLISHED_LAYOUT = {
    "iou_scores": None, "rationale_prf": {"instance_micro", "instance_macro"},
    "token_prf": {"instance_micro", "instance_macro"},
    "token_soft_metrics": {"auprc", "average_precision", "roc_auc_score"},
    "sentence_soft_metrics": {"auprc", "average_precision", "roc_auc_score"},
    "classification_scores": {"accuracy", "prf", "comprehensiveness", "sufficiency", "comprehensiveness_entropy",
                              "comprehensiveness_kl", "sufficiency_entropy", "sufficiency_kl", "aopc_thresholds",
                              "comprehensiveness_aopc", "comprehensiveness_aopc_points", "sufficiency_aopc",
                              "sufficiency_aopc_points"},
}


def test_score_file_has_the_published_keys_and_nesting(tmp_path: Path):
    data, path, _, _ = _generate(tmp_path, 4)
    out = tmp_path / "s.json"
    assert metrics.main(["--data-dir", str(data), "--results", str(path), "--score-file", str(out),
                         "--iou-thresholds", "0.5", "0.25"]) == 0
    text = out.read_text()
    s = json.loads(text)
    assert set(s) == set(PUBLISHED_LAYOUT)
    for key, sub in PUBLISHED_LAYOUT.items():
        if sub is not None:
            assert set(s[key]) == sub, key
    assert [x["threshold"] for x in s["iou_scores"]] == [0.5, 0.25]
    assert all(set(x) == {"threshold", "micro", "macro"} and set(x["micro"]) == {"p", "r", "f1"}
               for x in s["iou_scores"])
    assert set(s["token_prf"]["instance_macro"]) == {"p", "r", "f1"}
    assert set(s["classification_scores"]["prf"]) == {"MIX", "NEG", "POS", "accuracy", "macro avg", "weighted avg"}
    assert set(s["classification_scores"]["prf"]["POS"]) == {"precision", "recall", "f1-score", "support"}
    assert text == json.dumps(s, indent=4, sort_keys=True) + "\n"  # json.dump(indent=4, sort_keys=True), as published


def test_sections_follow_the_first_record(tmp_path: Path, capsys):
    data, path, anns, results = _generate(tmp_path, 5)
    for r in results:
        for f in ("comprehensiveness_classification_scores", "sufficiency_classification_scores",
                  "thresholded_scores"):
            del r[f]
        del r["rationales"][0]["soft_sentence_predictions"]
    results[0]["rationales"][0]["hard_rationale_predictions"] = []  # QUIRK 3: the first record decides
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    out = tmp_path / "s.json"
    assert metrics.main(["--data-dir", str(data), "--results", str(path), "--score-file", str(out)]) == 0
    s = json.loads(out.read_text())
    assert set(s) == {"token_soft_metrics", "classification_scores"}
    assert s["classification_scores"]["comprehensiveness"] is None
    assert s["classification_scores"]["sufficiency_aopc"] is None
    assert "hard rationale scores skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, never a partial score
# ---------------------------------------------------------------------------------------------------------------------
def _break_missing_field(results):
    del results[4]["sufficiency_classification_scores"]


def _break_missing_soft(results):
    del results[2]["rationales"][0]["soft_rationale_predictions"]


def _break_soft_length(results):
    results[1]["rationales"][0]["soft_rationale_predictions"].append(0.5)


def _break_class(results):
    del results[3]["comprehensiveness_classification_scores"]["NEG"]


def _break_bin(results):
    results[2]["thresholded_scores"] = [b for b in results[2]["thresholded_scores"] if b["threshold"] != 0.2]


def _break_bin_set(results):
    results[3]["thresholded_scores"].append(dict(results[3]["thresholded_scores"][0], threshold=0.3))


def _break_label(results):
    results[1]["classification"] = "MAYBE"


def _break_overlap(results):
    results[0]["rationales"][0]["hard_rationale_predictions"] = [{"start_token": 0, "end_token": 2},
                                                                 {"start_token": 1, "end_token": 3}]


def _break_nan(results):
    results[0]["rationales"][0]["soft_rationale_predictions"][0] = float("nan")


def _break_missing_document(results):
    del results[6]


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_field, r"record 5 \('doc4'\) lacks 'sufficiency_classification_scores'"),
    (_break_missing_soft, r"record 3 \('doc2'\) lacks 'soft_rationale_predictions'"),
    (_break_soft_length, r"has \d+ scores for the \d+ tokens of 'doc1'"),
    (_break_class, r"'comprehensiveness_classification_scores' lacks class\(es\) NEG"),
    (_break_bin, r"lacks the AOPC threshold\(s\) 0.2"),
    (_break_bin_set, r"record 4 \('doc3'\): 'thresholded_scores' thresholds .* differ from record 1's"),
    (_break_label, r"classification 'MAYBE' is not a label of the split"),
    (_break_overlap, r"overlap"),
    (_break_nan, r"finite numbers"),
    (_break_missing_document, r"results for 13 of 14 documents"),
])
def test_bad_results_are_one_line_exit_2(tmp_path: Path, capsys, breaker, message):
    import re
    data, path, _, results = _generate(tmp_path, 0)
    breaker(results)
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    out = tmp_path / "s.json"
    with pytest.raises(SystemExit) as e:
        metrics.main(["--data-dir", str(data), "--results", str(path), "--score-file", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists()


def test_bad_thresholds_are_refused(tmp_path: Path, capsys):
    data, path, _, _ = _generate(tmp_path, 0)
    for flags in (["--aopc-thresholds", "0.1", "0.1"], ["--aopc-thresholds", "0"], ["--iou-thresholds", "1.5"]):
        with pytest.raises(SystemExit) as e:
            metrics.main(["--data-dir", str(data), "--results", str(path)] + flags)
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline's files, scored
# ---------------------------------------------------------------------------------------------------------------------
def test_pipeline_files_carry_every_field_and_score(tmp_path: Path, capsys):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_bert_pipeline import SPECIALS, _write_tiny_bert

    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
    from BERT_rationale_benchmark import synthetic_reviews
    from BERT_rationale_benchmark.models.pipeline import bert_pipeline as bp
    from BERT_rationale_benchmark.utils import load_flattened_documents
    data = tmp_path / "data"
    synthetic_reviews.generate(data, n_train=6, n_val=2, n_test=5, seed=7)
    words = sorted({w for d in load_flattened_documents(data).values() for w in d})
    model_dir = _write_tiny_bert(tmp_path / "bert", SPECIALS + words)
    params = {"pretrained": str(model_dir), "max_length": 40, "classes": ["NEG", "POS"], "seed": 0,
              "train": {"batch_size": 4, "lr": 1e-3, "epochs": 1, "select_on_val": False, "eval_batch_size": 8},
              "explain": {"batch_size": 4, "k": [5, 10], "heatmaps": 0, "faithfulness_k": [5]}}
    pf = tmp_path / "params.json"
    pf.write_text(json.dumps(params))
    out = tmp_path / "run"
    assert bp.main(["--data-dir", str(data), "--output-dir", str(out), "--model-params", str(pf),
                    "--method", "rollout", "--device", "cpu"]) == 0
    docs = load_flattened_documents(data)
    sents = load_documents(data)
    recs = [json.loads(x) for x in (out / "rollout" / "identifier_results_5.json").read_text().splitlines()]
    assert json.loads((out / "rollout" / "run.json").read_text())["faithfulness_k"] == [5]
    model = BertForSequenceClassification.from_pretrained(str(out / "classifier")).eval()
    tok = bp.load_tokenizer(out / "classifier")
    for r in recs:
        rat = r["rationales"][0]
        assert len(rat["soft_rationale_predictions"]) == len(docs[r["annotation_id"]])
        assert len(rat["soft_sentence_predictions"]) == len(sents[r["annotation_id"]])
        assert [b["threshold"] for b in r["thresholded_scores"]] == THRESHOLDS
        # comprehensiveness = the classifier on the words that reached it, the top-k deleted, re-tokenised
        top = {s["start_token"] for s in rat["hard_rationale_predictions"]}
        kept = [w for i, w in enumerate(docs[r["annotation_id"]][:r["words_seen"]]) if i not in top]
        enc = tok(kept, is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            p = torch.softmax(model(**enc).logits, -1)[0]
        assert r["comprehensiveness_classification_scores"]["POS"] == pytest.approx(float(p[1]), abs=1e-5)
    later = json.loads((out / "rollout" / "identifier_results_10.json").read_text().splitlines()[0])
    assert "thresholded_scores" not in later and "soft_rationale_predictions" in later["rationales"][0]
    assert metrics.main(["--data-dir", str(data), "--results-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method (k=5) | token F1 | IOU F1 | token AUPRC |" in printed and "| rollout |" in printed
    table = json.loads((out / "eraser_scores.json").read_text())
    assert table["rollout"]["5"]["classification_scores"]["comprehensiveness_aopc"] is not None
    assert table["rollout"]["10"]["classification_scores"]["comprehensiveness"] is None
    assert (out / "eraser_scores.md").is_file()
