"""VQA perturbation test (METHODS_ICCV.md section 6): metric values by hand,
the kept sets, and the CLI end to end on a few scenes with a tiny model."""
import json

import numpy as np
import pytest
import torch

from baselines.LXMERT import vqa_perturbation as vp
from baselines.LXMERT.scene_vqa import ANSWERS, FEATURE_DIM, build_tokenizer
from baselines.LXMERT.train_scenes_lxmert import make_model


def test_soft_accuracy_and_auc_by_hand():
    assert vp.vqa_soft_accuracy("red", ["red"] * 10) == 1.0
    assert vp.vqa_soft_accuracy("red", ["red", "red"] + ["blue"] * 8) == pytest.approx(2 / 3)
    assert vp.vqa_soft_accuracy("red", ["blue"] * 10) == 0.0
    # steps 0, .25, .5, .75, .8, .85, .9, .95, 1 with accuracy 1 then 0 from .5 on:
    acc = [1, 1, 0, 0, 0, 0, 0, 0, 0]
    # trapezoids: [0, .25] -> .25, [.25, .5] -> .125, rest 0
    assert vp.auc(acc) == pytest.approx(37.5)
    assert vp.auc([1] * 9) == pytest.approx(100.0)


def test_kept_sets_follow_the_published_rule():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7])
    # negative test keeps the most relevant: int((1 - .5) * 4) = 2 -> positions 0, 3
    assert torch.nonzero(vp.kept(scores, 0.5, positive=False, tie_break="raster", seed=0)).flatten().tolist() == [0, 3]
    # positive test removes the most relevant first: keeps the 2 least relevant -> 1, 2
    assert torch.nonzero(vp.kept(scores, 0.5, positive=True, tie_break="raster", seed=0)).flatten().tolist() == [1, 2]
    assert not vp.kept(scores, 1.0, positive=True, tie_break="raster", seed=0).any()
    assert vp.kept(scores, 0.0, positive=True, tie_break="raster", seed=0).all()
    # kept boxes are passed in relevance order (least relevant first in the positive test)
    assert vp.order_by(scores, torch.tensor([True, True, True, False]), positive=True) == [1, 2, 0]
    assert vp.order_by(scores, torch.tensor([True, True, True, False]), positive=False) == [0, 2, 1]


def test_pad_batch_gives_a_masked_box_when_none_is_kept():
    feats = [np.zeros((0, 5), np.float32), np.ones((2, 5), np.float32)]
    boxes = [np.zeros((0, 4), np.float32), np.ones((2, 4), np.float32)]
    out = vp.pad_batch([[2, 7, 3], [2, 3]], feats, boxes, torch.device("cpu"))
    assert out["visual_feats"].shape == (2, 2, 5)
    assert out["visual_attention_mask"].tolist() == [[0, 0], [1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lxmert")
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = make_model(tok.vocab_size, hidden=32, layers=(1, 1, 2)).eval()
    assert model.config.visual_feat_dim == FEATURE_DIM and model.config.num_qa_labels == len(ANSWERS)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


def test_cli_end_to_end_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "vqa"
    argv = ["--model-dir", tiny_model_dir, "--scenes", "1", "--output-dir", str(out), "--methods",
            "generic_attribution", "random", "--batch-size", "16", "--device", "cpu"]
    assert vp.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"generic_attribution", "random"}
    for r in res["methods"].values():
        for test in vp.TESTS:
            acc = r["summary"][test]["accuracy"]
            assert len(acc) == len(vp.STEPS) and all(0 <= a <= 100 for a in acc)
            # the first step removes nothing: every method scores the unperturbed accuracy
            assert acc[0] == res["methods"]["random"]["summary"][test]["accuracy"][0]
    assert (out / "table.md").is_file() and (out / "perturbation.png").is_file()
    before = (out / "results.json").read_text()
    assert vp.main(argv) == 0  # finished work is kept, nothing recomputed
    assert (out / "results.json").read_text() == before


def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert vp.main(["--model-dir", tiny_model_dir, "--output-dir", str(tmp_path / "x")]) == 2
    assert "give either --scenes" in capsys.readouterr().err
    assert vp.main(["--model-dir", str(tmp_path), "--scenes", "1", "--output-dir", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_shipped_vqa_standin_loads_and_keeps_its_recorded_accuracy():
    """samples/synthetic_scenes_lxmert: re-measure the recorded validation accuracy on its first 40 scenes."""
    import os

    from transformers import AutoTokenizer, LxmertForQuestionAnswering

    from baselines.LXMERT.train_scenes_lxmert import accuracy_by_type, build_split

    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "synthetic_scenes_lxmert")
    model = LxmertForQuestionAnswering.from_pretrained(d, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert tok.convert_tokens_to_ids("disk") != tok.convert_tokens_to_ids("[UNK]")  # the vocabulary survived
    record = model.config.standin
    val = build_split("val", 40, record["data_seed"], tok, progress=False)
    acc = accuracy_by_type(model, val, torch.device("cpu"))
    assert abs(acc["all"] - record["val_accuracy"]["all"]) < 0.12
