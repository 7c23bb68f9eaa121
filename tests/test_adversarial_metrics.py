"""ERASER metrics and readers given incomplete, empty or odd files (issue 15, classes 4 and 6)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from BERT_rationale_benchmark import metrics, synthetic_reviews
from BERT_rationale_benchmark.utils import ERASERFormatError, annotations_from_jsonl, load_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eraser16") / "data"
    synthetic_reviews.generate(d, n_train=2, n_val=2, n_test=16, seed=5)
    return d


def _records(data, n, k=3):
    out = []
    for ann in load_split(data, "test")[:n]:
        out.append({"annotation_id": ann.annotation_id, "classification": ann.classification,
                    "rationales": [{"docid": ann.annotation_id,
                                    "hard_rationale_predictions": [{"start_token": t, "end_token": t + 1}
                                                                   for t in range(k)]}]})
    return out


def _write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        metrics.main(argv)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return e.value.code, err


def test_three_of_sixteen_documents_is_refused(data, tmp_path, capsys):
    res = _write(tmp_path / "r.json", _records(data, 3))
    code, err = _exit(["--data-dir", str(data), "--results", str(res)], capsys)
    assert code == 2 and "results for 3 of 16 documents" in err and "missing 13" in err


def test_incomplete_file_in_a_results_dir_is_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    _write(run / "rollout" / "identifier_results_10.json", _records(data, 16))
    _write(run / "rollout" / "identifier_results_20.json", _records(data, 15))
    code, err = _exit(["--data-dir", str(data), "--results-dir", str(run)], capsys)
    assert code == 2 and "identifier_results_20.json: results for 15 of 16" in err
    assert not (run / "token_f1.json").exists()
    assert metrics.main(["--data-dir", str(data), "--results-dir", str(run), "--allow-subset"]) == 0


def test_empty_results_file_is_refused_even_as_a_subset(data, tmp_path, capsys):
    res = tmp_path / "r.json"
    res.write_text("\n")
    for extra in ([], ["--allow-subset"]):
        code, err = _exit(["--data-dir", str(data), "--results", str(res)] + extra, capsys)
        assert code == 2 and "no records" in err


def test_complete_results_score_as_before(data, tmp_path, capsys):
    res = _write(tmp_path / "r.json", _records(data, 16))
    assert metrics.main(["--data-dir", str(data), "--results", str(res)]) == 0
    assert "16 documents" in capsys.readouterr().out


def test_unwritable_score_file_is_refused_before_scoring(data, tmp_path, capsys):
    res = _write(tmp_path / "r.json", _records(data, 16))
    blocker = tmp_path / "f"
    blocker.write_text("")
    code, err = _exit(["--data-dir", str(data), "--results", str(res), "--score-file", str(blocker / "s.json")],
                      capsys)
    assert code == 2 and "--score-file" in err


def test_missing_results_dir_is_one_line(data, tmp_path, capsys):
    code, err = _exit(["--data-dir", str(data), "--results-dir", str(tmp_path / "none")], capsys)
    assert code == 2


@pytest.mark.parametrize("evidence, ok", [
    ({"start_sentence": None, "end_sentence": None}, True),
    ({"text": None}, True),
    ({"text": ["two", "words"]}, True),
    ({"start_sentence": "3"}, False),
    ({"end_sentence": 1.5}, False),
    ({"text": 7}, False),
])
def test_evidence_optional_fields(tmp_path, evidence, ok):
    ev = dict({"docid": "a.txt", "start_token": 0, "end_token": 2, "text": "x y", "start_sentence": 0,
               "end_sentence": 1}, **evidence)
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"annotation_id": "a.txt", "classification": "POS", "evidences": [[ev]]}) + "\n")
    if ok:
        (ann,) = annotations_from_jsonl(path)
        (group,) = ann.evidences
        assert group[0].start_sentence == (ev["start_sentence"] if ev["start_sentence"] is not None else -1)
    else:
        with pytest.raises(ERASERFormatError, match=r"test.jsonl:1: evidence"):
            annotations_from_jsonl(path)


def test_null_start_sentence_through_the_cli(tmp_path, capsys):
    d = tmp_path / "d"
    synthetic_reviews.generate(d, n_train=1, n_val=1, n_test=2, seed=1)
    lines = [json.loads(line) for line in (d / "test.jsonl").read_text().splitlines()]
    for rec in lines:
        for group in rec["evidences"]:
            for ev in group:
                ev["start_sentence"] = ev["end_sentence"] = None
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    res = _write(tmp_path / "r.json", _records(d, 2))
    assert metrics.main(["--data-dir", str(d), "--results", str(res)]) == 0
