"""ERASER readers (BERT_rationale_benchmark.utils) and the synthetic stand-in generator (METHODS.md section 6)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from BERT_rationale_benchmark import synthetic_reviews
from BERT_rationale_benchmark.utils import (Annotation, ERASERFormatError, Evidence, MissingDocumentError,
                                            annotation_docid, annotations_from_jsonl, check_evidence_offsets,
                                            load_datasets, load_documents, load_flattened_documents, load_jsonl,
                                            load_split, write_jsonl)


def _ann_line(ann_id: str, label: str, spans, docid=None) -> str:
    docid = docid or ann_id
    ev = [[{"docid": docid, "start_token": s, "end_token": e, "text": t}] for s, e, t in spans]
    return json.dumps({"annotation_id": ann_id, "classification": label, "evidences": ev,
                       "query": "What is the sentiment of this review?", "docids": None})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A hand-written ERASER directory with known offsets."""
    docs = tmp_path / "docs"
    docs.mkdir()
    # blank lines are dropped, runs of spaces do not make empty tokens
    (docs / "posR_000.txt").write_text("a truly wonderful film .\n\nthe cast  is superb .\n", encoding="utf-8")
    (docs / "negR_000.txt").write_text("dull and boring .\nskip it\n", encoding="utf-8")
    (tmp_path / "train.jsonl").write_text(
        _ann_line("posR_000.txt", "POS", [(1, 3, "truly wonderful"), (8, 9, "superb")]) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(
        _ann_line("negR_000.txt", "NEG", [(0, 3, "dull and boring")]) + "\n\n", encoding="utf-8")
    return tmp_path


def test_hand_written_tree(tree: Path):
    train, val, test = load_datasets(tree)
    assert [a.annotation_id for a in train] == ["posR_000.txt"] and val == [] and len(test) == 1
    ann = train[0]
    assert isinstance(ann, Annotation) and ann.classification == "POS"
    assert ann.all_evidences() == (Evidence("posR_000.txt", 1, 3, "truly wonderful"),
                                   Evidence("posR_000.txt", 8, 9, "superb"))
    assert ann.evidence_tokens() == {"posR_000.txt": {1, 2, 8}}
    assert annotation_docid(ann) == "posR_000.txt"
    docs = load_documents(tree)
    assert docs["posR_000.txt"] == [["a", "truly", "wonderful", "film", "."], ["the", "cast", "is", "superb", "."]]
    flat = load_flattened_documents(tree, ["posR_000.txt"])
    assert list(flat) == ["posR_000.txt"]
    assert flat["posR_000.txt"][1:3] == ["truly", "wonderful"] and flat["posR_000.txt"][8] == "superb"
    check_evidence_offsets(train + test, load_flattened_documents(tree))


def test_generated_tree_offsets_match_phrases(tmp_path: Path):
    counts = synthetic_reviews.generate(tmp_path, n_train=8, n_val=2, n_test=4, seed=3)
    assert counts == {"train": 8, "val": 2, "test": 4}
    train, val, test = load_datasets(tmp_path)
    assert [len(train), len(val), len(test)] == [8, 2, 4]
    assert [a.classification for a in test] == ["NEG", "POS", "NEG", "POS"]
    docs = load_flattened_documents(tmp_path)
    assert len(docs) == 14
    check_evidence_offsets(train + val + test, docs)
    lexicon = {"POS": set(synthetic_reviews.POSITIVE_PHRASES), "NEG": set(synthetic_reviews.NEGATIVE_PHRASES)}
    for ann in train + val + test:
        evs = ann.all_evidences()
        assert 2 <= len(evs) <= 5
        for ev in evs:
            # the span covers exactly the lexicon phrase, of the label's polarity
            assert " ".join(docs[ev.docid][ev.start_token:ev.end_token]) == ev.text
            assert ev.text in lexicon[ann.classification]
        # no phrase of the other polarity anywhere in the document
        text = " " + " ".join(docs[annotation_docid(ann)]) + " "
        other = lexicon["NEG" if ann.classification == "POS" else "POS"]
        assert not any(f" {p} " in text for p in other)


def test_generator_is_deterministic(tmp_path: Path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 5), (b, 5), (c, 6)):
        synthetic_reviews.generate(d, n_train=4, n_val=1, n_test=2, seed=seed)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()


def test_generator_cli(tmp_path: Path, capsys):
    assert synthetic_reviews.main(["--out-dir", str(tmp_path / "d"), "--train", "2", "--val", "0", "--test", "2"]) == 0
    assert "wrote 4 reviews" in capsys.readouterr().out
    assert load_split(tmp_path / "d", "val") == []
    with pytest.raises(SystemExit) as e:
        synthetic_reviews.main(["--out-dir", str(tmp_path / "e"), "--train", "-1"])
    assert e.value.code == 2


def test_malformed_line_names_file_and_line(tree: Path):
    path = tree / "test.jsonl"
    path.write_text(_ann_line("negR_000.txt", "NEG", [(0, 1, "dull")]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ERASERFormatError, match=r"test\.jsonl:2: malformed JSON"):
        annotations_from_jsonl(path)
    with pytest.raises(ERASERFormatError, match=r"test\.jsonl:2: malformed JSON"):
        load_split(tree, "test")
    with pytest.raises(ERASERFormatError, match=r"test\.jsonl:2: malformed JSON"):
        load_jsonl(path)


@pytest.mark.parametrize("line, message", [
    ('["a list"]', "expected a JSON object"),
    ('{"classification": "NEG"}', "lacks field 'annotation_id'"),
    ('{"annotation_id": "x", "classification": "NEG", "evidences": [[{"docid": "x", "start_token": 3}]]}',
     "lacks field 'end_token'"),
    ('{"annotation_id": "x", "classification": "NEG", "evidences": [[{"docid": "x", "start_token": 3, '
     '"end_token": 1}]]}', "not 0 <= start <= end"),
    ('{"annotation_id": "x", "classification": "NEG", "evidences": [[{"docid": "x", "start_token": "3", '
     '"end_token": 4}]]}', "must be an integer"),
])
def test_bad_records_name_file_and_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "val.jsonl"
    path.write_text("\n" + line + "\n", encoding="utf-8")  # blank first line: the record is on line 2
    with pytest.raises(ERASERFormatError, match=rf"val\.jsonl:2: .*{message}"):
        annotations_from_jsonl(path)


def test_repeated_annotation_id(tmp_path: Path):
    path = tmp_path / "train.jsonl"
    line = _ann_line("a.txt", "POS", [])
    path.write_text(line + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ERASERFormatError, match=r"train\.jsonl:2: .*'a\.txt' repeats line 1"):
        annotations_from_jsonl(path)


def test_missing_document_names_docid(tree: Path):
    with pytest.raises(MissingDocumentError, match="posR_999.txt"):
        load_documents(tree, ["posR_000.txt", "posR_999.txt"])
    with pytest.raises(MissingDocumentError, match="negR_000.txt"):
        check_evidence_offsets(load_split(tree, "test"), {})


def test_evidence_past_document_end(tree: Path):
    (tree / "test.jsonl").write_text(_ann_line("negR_000.txt", "NEG", [(5, 7, "x")]) + "\n", encoding="utf-8")
    with pytest.raises(ERASERFormatError, match=r"negR_000\.txt.*past the end.*6 tokens"):
        check_evidence_offsets(load_split(tree, "test"), load_flattened_documents(tree))


def test_docs_jsonl_and_multi_document_annotation(tmp_path: Path):
    write_jsonl([{"docid": "d1", "document": "one two\nthree"}], tmp_path / "docs.jsonl")
    assert load_flattened_documents(tmp_path) == {"d1": ["one", "two", "three"]}
    with pytest.raises(MissingDocumentError, match="'d2'"):
        load_documents(tmp_path, ["d2"])
    ann = Annotation("q1", "POS", ((Evidence("d1", 0, 1), Evidence("d2", 0, 1)),))
    with pytest.raises(ERASERFormatError, match="2 documents"):
        annotation_docid(ann)
    assert annotation_docid(Annotation("q2", "NEG", ())) == "q2"  # no evidence: the id names the document
