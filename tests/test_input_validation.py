"""Structured inputs validated on read (issue 27 item 4): ERASER annotation
lines and documents, COCO instances files (class specificity), VQA v2
questions/annotations and box-feature ``.npz`` files (VQA perturbation,
explain_vqa).  Each bad file is hand-made with one defect (wrong type,
missing field, out of range, NaN, wrong shape); the reader must raise the
exact one-line message naming the file and the field, and the CLI that reads
it must print that line alone and exit 2.  Valid files load as before."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from BERT_rationale_benchmark import metrics
from BERT_rationale_benchmark.utils import ERASERFormatError, load_documents, load_split
from modules.cli import CLIError


def _one_line_exit_2(err: str, message: str) -> None:
    assert err == f"error: {message}\n", err  # the message alone: one line, no traceback


# --------------------------------------------------------------------------
# ERASER
# --------------------------------------------------------------------------
def _eraser_dir(tmp_path: Path, record) -> Path:
    d = tmp_path / "eraser"
    (d / "docs").mkdir(parents=True)
    (d / "docs" / "a.txt").write_text("w0 w1 w2 w3 w4\nw5 w6 w7 w8 w9\n", encoding="utf-8")
    line = record if isinstance(record, str) else json.dumps(record)
    (d / "test.jsonl").write_text(line + "\n", encoding="utf-8")
    return d


def _ev(**change):
    return {"annotation_id": "a.txt", "classification": "POS",
            "evidences": [[dict({"docid": "a.txt", "start_token": 1, "end_token": 3, "text": "w1 w2"}, **change)]]}


ERASER_BAD = [
    ({"annotation_id": 3, "classification": "POS"}, "annotation_id must be a string, got 3"),
    ({"annotation_id": "a.txt"}, "annotation lacks field 'classification'"),
    ({"annotation_id": "a.txt", "classification": "POS", "evidences": {"docid": "a.txt"}},
     "evidences must be a list, got {'docid': 'a.txt'}"),
    ({"annotation_id": "a.txt", "classification": "POS", "evidences": [[{"docid": "a.txt", "start_token": 1}]]},
     "evidences[0][0] lacks field 'end_token'"),
    (_ev(start_token=9, end_token=7), "evidences[0][0].end_token: 7 < start_token 9 (not 0 <= start <= end)"),
    (_ev(start_token=-2), "evidences[0][0].start_token: -2 < 0 (not 0 <= start <= end)"),
    (_ev(start_token=True), "evidences[0][0].start_token must be an integer, got True"),
    (_ev(end_token=float("nan")), "evidences[0][0].end_token must be an integer, got nan"),
    (_ev(docid="../a.txt"), "evidences[0][0].docid '../a.txt' is not a file name of docs/ (empty, '.', '..' or a "
                            "path separator)"),
    (_ev(start_sentence="0"), "evidences[0][0].start_sentence must be an integer, got '0'"),
    (dict(_ev(), query_type=7), "query_type must be a string or null, got 7"),
]


@pytest.mark.parametrize("record, message", ERASER_BAD, ids=[m.split(" ")[0] for _, m in ERASER_BAD])
def test_eraser_bad_annotation_is_one_line_naming_file_line_and_field(tmp_path, capsys, record, message):
    d = _eraser_dir(tmp_path, record)
    expected = f"{d / 'test.jsonl'}:1: {message}"
    with pytest.raises(ERASERFormatError) as e:
        load_split(d, "test")
    assert str(e.value) == expected
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"annotation_id": "a.txt", "rationales": []}) + "\n")
    with pytest.raises(SystemExit) as e:
        metrics.main(["--data-dir", str(d), "--split", "test", "--results", str(results)])
    assert e.value.code == 2
    _one_line_exit_2(capsys.readouterr().err, expected)


def test_eraser_document_not_utf8_and_docs_jsonl_fields(tmp_path):
    d = _eraser_dir(tmp_path, _ev())
    (d / "docs" / "a.txt").write_bytes(b"w0 w1 \xff\xfe w2\n")
    with pytest.raises(ERASERFormatError) as e:
        load_documents(d, ["a.txt"])
    assert str(e.value) == f"{d / 'docs' / 'a.txt'}: not UTF-8 text (byte 6)"
    j = tmp_path / "j"
    j.mkdir()
    (j / "docs.jsonl").write_text('{"docid": "a.txt", "document": "w0 w1"}\n{"docid": "b.txt", "document": 5}\n')
    with pytest.raises(ERASERFormatError) as e:
        load_documents(j)
    assert str(e.value) == f"{j / 'docs.jsonl'}:2: document must be a string, got 5"


def test_eraser_valid_file_loads_as_before(tmp_path):
    """Both groupings ERASER writes (a list of groups, a bare evidence), null sentence indices and a token list
    as text, read into the same records as before the checks."""
    rec = {"annotation_id": "a.txt", "classification": "POS", "query": "q", "query_type": None, "docids": ["a.txt"],
           "evidences": [[{"docid": "a.txt", "start_token": 1, "end_token": 3, "text": ["w1", "w2"],
                           "start_sentence": None, "end_sentence": 0}],
                         {"docid": "a.txt", "start_token": 5, "end_token": 5, "text": ""}]}
    (ann,) = load_split(_eraser_dir(tmp_path, rec), "test")
    assert ann.annotation_id == "a.txt" and ann.docids == ("a.txt",) and ann.query_type is None
    assert [(e.start_token, e.end_token, e.text, e.start_sentence, e.end_sentence) for e in ann.all_evidences()] == [
        (1, 3, "w1 w2", -1, 0), (5, 5, "", -1, -1)]
    assert ann.evidence_tokens() == {"a.txt": {1, 2}}


# --------------------------------------------------------------------------
# COCO instances (class specificity)
# --------------------------------------------------------------------------
COCO = {"images": [{"id": 1, "file_name": "x.png", "height": 8, "width": 8}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [4, 4, 3.5, 4],
                         "segmentation": [[4, 4, 7, 4, 7, 7]]}],
        "categories": [{"id": 1, "name": "a", "model_index": 0}, {"id": 2, "name": "b", "model_index": 1}]}


def _coco(path: str, value):
    out = copy.deepcopy(COCO)
    *keys, last = path
    node = out
    for k in keys:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return out


COCO_BAD = [
    (("images", 0, "id"), "1", "images[0].id must be an integer, got '1'"),
    (("images", 0, "file_name"), KeyError, "images[0] lacks field 'file_name'"),
    (("images", 0, "height"), -8, "images[0].height: -8 < 0"),
    (("annotations", 1, "bbox"), [4, float("nan"), 4, 4],
     "annotations[1].bbox must be 4 finite numbers [x, y, width, height], got [4, nan, 4, 4]"),
    (("annotations", 0, "bbox"), [0, 0, 4], "annotations[0].bbox must be 4 finite numbers [x, y, width, height], "
                                            "got [0, 0, 4]"),
    (("annotations", 0, "bbox"), [0, 0, -4, 4], "annotations[0].bbox: negative width or height [-4, 4]"),
    (("annotations", 0, "category_id"), 7, "annotations[0].category_id: 7 is no category's id"),
    (("annotations", 0, "image_id"), 3, "annotations[0].image_id: 3 is no image's id"),
    (("annotations", 1, "segmentation"), [[4, 4, 7]], "annotations[1].segmentation[0] must hold >= 3 (x, y) pairs, "
                                                      "got 3 numbers"),
    (("annotations", 1, "segmentation"), {"size": [8], "counts": "x"},
     "annotations[1].segmentation.size must be [height, width] non-negative integers, got [8]"),
    (("categories", 1, "id"), 1, "categories[1].id: 1 repeats an earlier category"),
    (("categories", 1, "model_index"), 9, "categories[1].model_index: category 2 ('b') maps to output 9, outside "
                                          "the model's 0..7"),
]


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    from baselines.ViT.ViT_LRP import VisionTransformer, save_model_dir

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, num_classes=8, embed_dim=16, depth=1, num_heads=2,
                              mlp_ratio=2.0, qkv_bias=True).eval()
    path = str(tmp_path_factory.mktemp("tiny_vit"))
    save_model_dir(model, path, extra={"mean": [0.5] * 3, "std": [0.5] * 3})
    return path


@pytest.mark.parametrize("where, value, message", COCO_BAD, ids=[m.split(" ")[0] for *_, m in COCO_BAD])
def test_coco_bad_field_is_one_line(tmp_path, capsys, tiny_vit_dir, where, value, message):
    from baselines.ViT import class_specificity as CS

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(_coco(where, value)))
    with pytest.raises(CS.PairDataError) as e:
        CS.read_pairs(str(path), str(tmp_path), (), 8)
    assert str(e.value) == f"{path}: {message}"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        CS.main(["--annotations", str(path), "--image-dir", str(tmp_path), "--weights", tiny_vit_dir,
                 "--output-dir", str(out), "--device", "cpu", "--quiet"])
    assert e.value.code == 2
    _one_line_exit_2(capsys.readouterr().err, f"{path}: {message}")
    assert not (out / "results.json").exists()


def test_coco_valid_file_reads_as_before(tmp_path):
    from baselines.ViT import class_specificity as CS

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(COCO))
    (pair,), skipped = CS.read_pairs(str(path), str(tmp_path), (), 8)
    assert skipped == {"not_two_classes": 0}
    assert (pair.image_id, pair.classes, pair.names, pair.height, pair.width) == (1, (0, 1), ("a", "b"), 8, 8)
    assert [a["id"] for a in pair.anns[0]] == [1] and [a["id"] for a in pair.anns[1]] == [2]


def test_torn_last_line_of_per_image_jsonl_is_dropped_and_cut_on_resume(tmp_path):
    """A run stopped mid-write leaves a cut line (or a whole record without its newline): resume scores that
    picture again and truncates the file there, so the next append starts on a line of its own."""
    from baselines.ViT import class_specificity as CS

    good = json.dumps({"image_id": 1, "s": 0.5}) + "\n" + json.dumps({"image_id": 2, "s": 0.25}) + "\n"
    for tail in ('{"image_id": 3, "s"', json.dumps({"image_id": 3, "s": 1.0})):
        path = tmp_path / "per_image.jsonl"
        path.write_text(good + tail)
        done = CS._read_done(str(path))
        assert sorted(done) == [1, 2] and done[2]["s"] == 0.25
        assert path.read_text() == good


# --------------------------------------------------------------------------
# VQA v2 questions / annotations / box features (vqa_perturbation, explain_vqa)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lxmert_dir(tmp_path_factory):
    from baselines.LXMERT.scene_vqa import build_tokenizer
    from baselines.LXMERT.train_scenes_lxmert import make_model

    d = tmp_path_factory.mktemp("lxmert")
    tok = build_tokenizer()
    torch.manual_seed(0)
    make_model(tok.vocab_size, hidden=32, layers=(1, 1, 1)).eval().save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


def _vqa_files(tmp_path: Path, questions=None, annotations=None, **arrays):
    from baselines.LXMERT.scene_vqa import FEATURE_DIM

    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    f = tmp_path / "f.npz"
    q.write_text(json.dumps(questions or {"questions": [
        {"question_id": 11, "image_id": 5, "question": "is there a disk ?"},
        {"question_id": 12, "image_id": 6, "question": "how many objects are there ?"},
        {"question_id": 13, "image_id": 9, "question": "is there a disk ?"}]}))  # no features for image 9
    a.write_text(json.dumps(annotations or {"annotations": [
        {"question_id": 11, "answers": [{"answer": "yes"}] * 9 + [{"answer": "no"}], "answer_type": "yes/no"},
        {"question_id": 12, "multiple_choice_answer": "2"}]}))
    rng = np.random.default_rng(0)
    base = {"image_ids": np.array([5, 6]), "features": rng.random((2, 3, FEATURE_DIM), dtype=np.float32),
            "boxes": np.tile(np.array([0.1, 0.2, 0.5, 0.6], np.float32), (2, 3, 1)), "num_boxes": np.array([2, 3])}
    base.update(arrays)
    np.savez(f, **{k: v for k, v in base.items() if v is not None})
    return q, a, f, base


def _nan_features():
    from baselines.LXMERT.scene_vqa import FEATURE_DIM

    x = np.ones((2, 3, FEATURE_DIM), np.float32)
    x[1, 2, 7] = np.nan
    return x


VQA_BAD = [
    (dict(questions={"questions": [{"question_id": "11", "image_id": 5, "question": "?"}]}), "q",
     "questions[0].question_id must be an integer, got '11'"),
    (dict(questions={"questions": [{"question_id": 11, "image_id": 5}]}), "q", "questions[0] lacks field 'question'"),
    (dict(questions={"qs": []}), "q", "needs a list 'questions' (VQA v2 layout)"),
    (dict(annotations={"annotations": [{"question_id": 11}]}), "a",
     "annotations[0] lacks field 'multiple_choice_answer'"),
    (dict(annotations={"annotations": [{"question_id": 11, "answers": [{"answer": 2}]}]}), "a",
     "annotations[0].answers[0].answer must be a string, got 2"),
    (dict(features=np.ones((2, 3, 4), np.int64)), "f", "features must be a float array, got dtype int64"),
    (dict(features=np.ones((2, 3), np.float32)), "f", "features must have 3 dimensions, got shape (2, 3)"),
    (dict(features=_nan_features()), "f", "features: 1 of 1884 values are NaN or Inf"),
    (dict(boxes=np.zeros((2, 2, 4), np.float32)), "f", "boxes must have shape (2, 3, 4), got (2, 2, 4)"),
    (dict(boxes=None), "f", "no array boxes (has image_ids, features, num_boxes)"),
    (dict(image_ids=np.array([5.0, 6.0])), "f", "image_ids must be an integer array, got dtype float64"),
    (dict(image_ids=np.array([5, 5])), "f", "image_ids: 1 ids repeat"),
    (dict(num_boxes=np.array([2, 4])), "f", "num_boxes[1]: 4 outside 0..3"),
    (dict(boxes=np.full((2, 3, 4), 20.0, np.float32)), "f",
     "boxes must be divided by the image width/height, in [0, 1] (found values in [20, 20])"),
    (dict(features=np.array([None, 1], dtype=object)), "f",
     "not a readable .npz of arrays (Object arrays cannot be loaded when allow_pickle=False)"),
]


@pytest.mark.parametrize("change, which, message", VQA_BAD, ids=[m.split(" ")[0] for *_, m in VQA_BAD])
def test_vqa_bad_file_is_one_line_naming_the_field(tmp_path, change, which, message):
    from baselines.LXMERT import vqa_perturbation as vp

    files = dict(zip("qaf", _vqa_files(tmp_path, **change)[:3]))
    with pytest.raises(CLIError) as e:
        vp.real_items(str(files["q"]), str(files["a"]), str(files["f"]), None)
    assert str(e.value) == f"{files[which]}: {message}"


@pytest.mark.parametrize("change, which, message", [VQA_BAD[0], VQA_BAD[7], VQA_BAD[12]], ids=["q", "nan", "range"])
def test_vqa_perturbation_cli_exits_2_with_the_line(tmp_path, capsys, lxmert_dir, change, which, message):
    from baselines.LXMERT import vqa_perturbation as vp

    files = dict(zip("qaf", _vqa_files(tmp_path, **change)[:3]))
    out = tmp_path / "out"
    code = vp.main(["--model-dir", lxmert_dir, "--questions", str(files["q"]), "--annotations", str(files["a"]),
                    "--features", str(files["f"]), "--output-dir", str(out), "--methods", "random"])
    assert code == 2
    _one_line_exit_2(capsys.readouterr().err, f"{files[which]}: {message}")
    assert not (out / "results.json").exists()


def test_vqa_valid_files_join_as_before(tmp_path):
    from baselines.LXMERT import vqa_perturbation as vp

    q, a, f, arrays = _vqa_files(tmp_path)
    items = vp.real_items(str(q), str(a), str(f), None)
    assert [(it["id"], it["question"], it["qtype"]) for it in items] == [
        ("11", "is there a disk ?", "yes/no"), ("12", "how many objects are there ?", "all")]
    assert items[0]["answers"] == ["yes"] * 9 + ["no"] and items[1]["answers"] == ["2"]
    np.testing.assert_array_equal(items[0]["features"], arrays["features"][0, :2])
    np.testing.assert_array_equal(items[1]["boxes"], arrays["boxes"][1, :3])
    assert [it["id"] for it in vp.real_items(str(q), str(a), str(f), 1)] == ["11"]


def test_vqa_perturbation_identity_holds_the_batch_size(tmp_path, capsys, lxmert_dir):
    """The random reference draws its maps per batch: another --batch-size is another run, refused without
    --overwrite (it was reused as finished before)."""
    from baselines.LXMERT import vqa_perturbation as vp

    out = tmp_path / "out"
    argv = ["--model-dir", lxmert_dir, "--scenes", "1", "--output-dir", str(out), "--methods", "random"]
    assert vp.main(argv + ["--batch-size", "2"]) == 0
    before = (out / "results.json").read_bytes()
    assert vp.main(argv + ["--batch-size", "2"]) == 0 and (out / "results.json").read_bytes() == before
    capsys.readouterr()
    assert vp.main(argv + ["--batch-size", "3"]) == 2
    assert "holds results of other arguments" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


EXPLAIN_BAD = [
    (dict(features=np.ones((2, 4), np.int32)), "features must be a float array, got dtype int32"),
    (dict(boxes=np.array([[0, 0, 4, 4], [0, np.inf, 4, 4]], np.float32)), "boxes: 1 of 8 values are NaN or Inf"),
    (dict(normalized=np.array([1, 0])), "normalized must be one boolean, got int64 shape (2,)"),
    (dict(boxes=np.ones((3, 4), np.float32)), "boxes must be (2, 4) (x1, y1, x2, y2), got shape (3, 4)"),
]


@pytest.mark.parametrize("change, message", EXPLAIN_BAD, ids=[m.split(" ")[0] for _, m in EXPLAIN_BAD])
def test_explain_vqa_regions_bad_npz(tmp_path, change, message):
    from baselines.LXMERT.explain_vqa import load_regions

    arrays = dict({"features": np.ones((2, 4), np.float32), "boxes": np.array([[0, 0, 4, 4], [2, 2, 8, 8]],
                                                                                np.float32)}, **change)
    path = tmp_path / "r.npz"
    np.savez(path, **arrays)
    with pytest.raises(CLIError) as e:
        load_regions(str(path), "npz", 8, 8)
    assert str(e.value) == f"{path}: {message}"


def test_explain_vqa_cli_bad_npz_exits_2(tmp_path, capsys, lxmert_dir):
    from PIL import Image

    from baselines.LXMERT import explain_vqa as ev

    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    path = tmp_path / "r.npz"
    np.savez(path, features=np.full((2, 4), np.nan, np.float32), boxes=np.zeros((2, 4), np.float32))
    assert ev.main(["--model-dir", lxmert_dir, "--image", str(img), "--question", "is there a disk ?",
                    "--features", str(path), "--out", str(tmp_path / "o.png")]) == 2
    _one_line_exit_2(capsys.readouterr().err, f"{path}: features: 8 of 8 values are NaN or Inf")
