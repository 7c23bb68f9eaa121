"""Token-level rationale metrics (BERT_rationale_benchmark.metrics, METHODS.md section 6)."""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

import pytest

from BERT_rationale_benchmark import metrics
from BERT_rationale_benchmark.metrics import PRF, f1, prf, score_token_sets


def test_prf_hand_computed():
    # empty prediction: precision and recall 0 by convention, F1 0
    assert prf({1, 2, 3}, set()) == PRF(0.0, 0.0, 0.0)
    # perfect prediction
    assert prf({1, 2, 3}, {1, 2, 3}) == PRF(1.0, 1.0, 1.0)
    # partial overlap: T = {0,1,2,3}, P = {2,3,4}: P = 2/3, R = 1/2, F1 = 2 (2/3)(1/2) / (2/3 + 1/2) = 4/7
    s = prf({0, 1, 2, 3}, {2, 3, 4})
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(1 / 2) and s.f1 == pytest.approx(4 / 7)
    # disjoint
    assert prf({0}, {1}) == PRF(0.0, 0.0, 0.0)
    assert f1(0.5, 0.0) == 0.0 and f1(1.0, 1.0) == 1.0 and f1(0.5, 0.25) == pytest.approx(1 / 3)


def test_macro_and_micro_hand_computed():
    truth = {("a", "a"): {0, 1, 2, 3}, ("b", "b"): {10}}
    pred = {("a", "a"): {2, 3, 4}, ("b", "b"): set(), ("c", "c"): {5}}
    s = score_token_sets(truth, pred)
    assert s.documents == 3  # keys of truth or prediction, as ERASER
    # per document: a = (2/3, 1/2, 4/7), b = (0, 0, 0), c = (0, 0, 0) (no truth)
    assert s.per_document[("a", "a")].f1 == pytest.approx(4 / 7)
    assert s.macro.precision == pytest.approx((2 / 3) / 3)
    assert s.macro.recall == pytest.approx((1 / 2) / 3)
    assert s.macro.f1 == pytest.approx((4 / 7) / 3)  # the mean of per-document F1, not the F1 of the means
    # micro: 2 hits, 4 predicted, 5 true tokens: P = 1/2, R = 2/5, F1 = 2 * 0.2 / 0.9 = 4/9
    assert s.micro.precision == pytest.approx(0.5) and s.micro.recall == pytest.approx(0.4)
    assert s.micro.f1 == pytest.approx(4 / 9)


def _eraser_token_prf(truth_spans, pred_spans):
    """ERASER's reference ``score_hard_rationale_predictions`` on token-level
    rationales, restated with tuples (ann_id, docid, token) and exact fractions."""
    truth = {(a, d, t) for a, d, s, e in truth_spans for t in range(s, e)}
    pred = {(a, d, t) for a, d, s, e in pred_spans for t in range(s, e)}
    micro_p = Fraction(len(truth & pred), len(pred))
    micro_r = Fraction(len(truth & pred), len(truth))
    micro_f1 = 0 if micro_p == 0 or micro_r == 0 else 2 * micro_p * micro_r / (micro_p + micro_r)
    by_t, by_p = defaultdict(set), defaultdict(set)
    for a, d, t in truth:
        by_t[(a, d)].add(t)
    for a, d, t in pred:
        by_p[(a, d)].add(t)
    per = []
    for k in set(by_t) | set(by_p):
        p = Fraction(len(by_t[k] & by_p[k]), len(by_p[k])) if by_p[k] else 0
        r = Fraction(len(by_t[k] & by_p[k]), len(by_t[k])) if by_t[k] else 0
        per.append((p, r, 0 if p == 0 or r == 0 else 2 * p * r / (p + r)))
    n = len(per)
    return (sum(x[0] for x in per) / n, sum(x[1] for x in per) / n, sum(x[2] for x in per) / n), \
        (micro_p, micro_r, micro_f1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_eraser_reference_on_random_spans(seed: int):
    rng = random.Random(seed)
    truth_spans, pred_spans = [], []
    for doc in range(12):
        aid = f"d{doc}"
        for _ in range(rng.randint(1, 3)):
            s = rng.randint(0, 40)
            truth_spans.append((aid, aid, s, s + rng.randint(1, 6)))
        if doc != 5:  # one document without any prediction
            for t in rng.sample(range(50), rng.randint(1, 15)):
                pred_spans.append((aid, aid, t, t + 1))
    (mp, mr, mf), (up, ur, uf) = _eraser_token_prf(truth_spans, pred_spans)
    truth, pred = defaultdict(set), defaultdict(set)
    for a, d, s, e in truth_spans:
        truth[(a, d)].update(range(s, e))
    for a, d, s, e in pred_spans:
        pred[(a, d)].update(range(s, e))
    got = score_token_sets(truth, pred)
    assert (got.macro.precision, got.macro.recall, got.macro.f1) == pytest.approx((float(mp), float(mr), float(mf)))
    assert (got.micro.precision, got.micro.recall, got.micro.f1) == pytest.approx((float(up), float(ur), float(uf)))


# ---------------------------------------------------------------------------------------------------------------------
# files and the command line
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "docs").mkdir(parents=True)
    (d / "docs" / "a.txt").write_text("w0 w1 w2 w3\nw4 w5\n", encoding="utf-8")
    (d / "docs" / "b.txt").write_text("v0 v1 v2\n", encoding="utf-8")
    anns = [{"annotation_id": "a.txt", "classification": "POS",
             "evidences": [[{"docid": "a.txt", "start_token": 0, "end_token": 4, "text": "w0 w1 w2 w3"}]]},
            {"annotation_id": "b.txt", "classification": "NEG",
             "evidences": [[{"docid": "b.txt", "start_token": 2, "end_token": 3, "text": "v2"}]]}]
    for split in ("train", "val", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in anns), encoding="utf-8")
    return d


def _record(ann_id, tokens, cls="POS"):
    return {"annotation_id": ann_id, "classification": cls, "classification_scores": {"NEG": 0.3, "POS": 0.7},
            "rationales": [{"docid": ann_id,
                            "hard_rationale_predictions": [{"start_token": t, "end_token": t + 1} for t in tokens]}]}


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_cli_single_file(data_dir: Path, tmp_path: Path, capsys):
    # a: T = {0,1,2,3}, P = {2,3,4}: (2/3, 1/2, 4/7); b: T = {2}, P = {2}: (1, 1, 1)
    res = _write(tmp_path / "r.json", [_record("a.txt", [2, 3, 4], "POS"), _record("b.txt", [2], "POS")])
    score_file = tmp_path / "s.json"
    assert metrics.main(["--data-dir", str(data_dir), "--split", "test", "--results", str(res),
                         "--score-file", str(score_file)]) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "classification accuracy: 0.5000" in out
    s = json.loads(score_file.read_text())  # the published --score_file layout (issue 23)
    tok = s["token_prf"]
    assert tok["instance_macro"]["f1"] == pytest.approx((4 / 7 + 1) / 2)
    assert tok["instance_macro"]["p"] == pytest.approx((2 / 3 + 1) / 2)
    # micro: 3 hits of 4 predicted and 5 true
    assert tok["instance_micro"]["p"] == pytest.approx(3 / 4) and tok["instance_micro"]["r"] == pytest.approx(3 / 5)
    assert s["classification_scores"]["accuracy"] == 0.5
    # an empty prediction counts as F1 0 for that document
    res2 = _write(tmp_path / "r2.json", [_record("a.txt", [0, 1, 2, 3]), _record("b.txt", [])])
    assert metrics.main(["--data-dir", str(data_dir), "--results", str(res2), "--score-file", str(score_file)]) == 0
    assert json.loads(score_file.read_text())["token_prf"]["instance_macro"]["f1"] == pytest.approx(0.5)
    # a missing document is refused (issue 15: it used to count as F1 0 with exit 0) ...
    res3 = _write(tmp_path / "r3.json", [_record("a.txt", [0, 1, 2, 3])])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        metrics.main(["--data-dir", str(data_dir), "--results", str(res3), "--score-file", str(score_file)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "results for 1 of 2 documents" in err and "b.txt" in err
    assert "--allow-subset" in err and len(err.strip().splitlines()) == 1
    # ... unless asked for: then only the documents present are scored
    assert metrics.main(["--data-dir", str(data_dir), "--results", str(res3), "--score-file", str(score_file),
                         "--allow-subset"]) == 0
    assert "scoring 1 of 2 documents" in capsys.readouterr().out
    s = json.loads(score_file.read_text())
    assert s["token_prf"]["instance_macro"]["f1"] == pytest.approx(1.0)
    assert s["classification_scores"]["prf"]["accuracy"] == 1.0  # one document, POS, predicted POS


def test_cli_results_dir_writes_table_and_plot(data_dir: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    for method, toks in (("transformer_attribution", {"a.txt": [0, 1], "b.txt": [2]}),
                         ("rollout", {"a.txt": [4, 5], "b.txt": [0]})):
        for k in (10, 20):
            _write(run / method / f"identifier_results_{k}.json", [_record(d, t) for d, t in toks.items()])
    assert metrics.main(["--data-dir", str(data_dir), "--results-dir", str(run)]) == 0
    out = capsys.readouterr().out
    # registry order: transformer_attribution before rollout
    assert out.index("| transformer_attribution |") < out.index("| rollout |")
    # TA: a = (1, 1/2, 2/3), b = (1, 1, 1): macro F1 = 5/6
    assert "| transformer_attribution | 83.33 | 83.33 |" in out
    assert "| rollout | 0.00 | 0.00 |" in out
    for name in ("token_f1.md", "token_f1.csv", "token_f1.json", "token_f1.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0
    rows = json.loads((run / "token_f1.json").read_text())
    assert {(r["method"], r["k"]) for r in rows} == {(m, k) for m in ("transformer_attribution", "rollout")
                                                     for k in (10, 20)}
    ta10 = next(r for r in rows if r["method"] == "transformer_attribution" and r["k"] == 10)
    assert ta10["micro_precision"] == pytest.approx(1.0) and ta10["micro_recall"] == pytest.approx(3 / 5)
    assert (run / "token_f1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, message", [
    ("{broken\n", r"r\.json:1: malformed JSON"),
    (json.dumps(_record("zzz.txt", [0])) + "\n", "'zzz.txt' is not in the test split"),
    (json.dumps(_record("a.txt", [6])) + "\n", "not a token range inside 'a.txt' \\(6 tokens\\)"),
    (json.dumps(_record("a.txt", [0])) + "\n" + json.dumps(_record("a.txt", [1])) + "\n", "repeats record 1"),
])
def test_cli_bad_results_exit_2(data_dir: Path, tmp_path: Path, capsys, content: str, message: str):
    res = tmp_path / "r.json"
    res.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        metrics.main(["--data-dir", str(data_dir), "--results", str(res)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


def test_cli_empty_results_dir_exit_2(data_dir: Path, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        metrics.main(["--data-dir", str(data_dir), "--results-dir", str(tmp_path / "empty")])
    assert e.value.code == 2 and "no identifier_results_<k>.json" in capsys.readouterr().err


def test_multi_token_spans_are_expanded():
    recs = [{"annotation_id": "a", "rationales": [{"docid": "a", "hard_rationale_predictions": [
        {"start_token": 2, "end_token": 5}, {"start_token": 4, "end_token": 6}]}]}]
    assert metrics.predicted_token_sets(recs) == {("a", "a"): {2, 3, 4, 5}}
