"""The DETR stand-in's training script and the masks-from-explanations
evaluation (METHODS_ICCV.md section 7): metric values by hand on a toy, and
both CLIs end to end on a few scenes with a tiny model."""
import json

import numpy as np
import pytest

from baselines.DETR import detr_mask_eval as dme
from baselines.DETR import train_scenes_detr as tsd


def _toy_gt():
    a = np.zeros((20, 20), np.uint8)
    a[2:7, 2:7] = 1  # 25 pixels, class 1
    b = np.zeros((20, 20), np.uint8)
    b[10:15, 10:20] = 1  # 50 pixels, class 2
    gt = {"images": [{"id": 1, "width": 20, "height": 20, "file_name": "x.png"}],
          "annotations": [{"id": 11, "image_id": 1, "category_id": 1, "segmentation": dme.rle(a), "area": 25.0,
                           "bbox": [2, 2, 5, 5], "iscrowd": 0},
                          {"id": 12, "image_id": 1, "category_id": 2, "segmentation": dme.rle(b), "area": 50.0,
                           "bbox": [10, 10, 10, 5], "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    return gt, a, b


def test_mask_ap_on_a_two_object_toy_by_hand():
    gt, a, b = _toy_gt()
    half = np.zeros_like(b)
    half[10:15, 10:16] = 1
    half[10, 16] = 1  # 31 of b's 50 pixels: IoU 0.62
    dets = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": dme.rle(a)},
            {"image_id": 1, "category_id": 2, "score": 0.8, "segmentation": dme.rle(half)}]
    stats = dme.coco_segm_stats(gt, dets)
    # class 1 matched at all 16 thresholds (AP 1); class 2 at the 9 thresholds 0.20..0.60 (AP 9/16)
    assert stats["AP"] == pytest.approx(100 * (1 + 9 / 16) / 2, abs=1e-3)
    assert stats["AP50"] == pytest.approx(100.0) and stats["AP75"] == pytest.approx(50.0)
    # an empty mask for a query that was not kept adds nothing at any threshold
    stats2 = dme.coco_segm_stats(gt, dets + [{"image_id": 1, "category_id": 1, "score": 0.1,
                                               "segmentation": dme.rle(np.zeros_like(a))}])
    assert stats2["AP"] == pytest.approx(stats["AP"], abs=1e-3)


def test_object_scores_by_hand():
    g = np.zeros((4, 4), bool)
    g[0, :] = True  # 4 pixels
    p = np.zeros((4, 4), bool)
    p[0, :2] = True
    p[1, :2] = True  # 2 inside, 2 outside
    (score,) = dme.object_scores([g], [np.zeros_like(g), p])
    assert score["iou"] == pytest.approx(2 / 6)
    assert score["pixel_accuracy"] == pytest.approx(12 / 16)  # 2 missed + 2 extra of 16
    (none,) = dme.object_scores([g], [])
    assert none == {"iou": 0.0, "pixel_accuracy": 12 / 16}


def test_class_nms_and_ap50_by_hand():
    boxes = np.asarray([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    keep = tsd.class_nms(boxes, np.asarray([0.9, 0.8, 0.7]), np.asarray([0, 0, 0]))
    assert keep.tolist() == [0, 2]  # the second box overlaps the first (IoU 0.81)
    pool = {"boxes": [np.asarray([[0.5, 0.5, 0.2, 0.2]], np.float32)], "labels": [np.asarray([3])]}
    perfect = [{"boxes": np.asarray([[0.4, 0.4, 0.6, 0.6]], np.float32), "scores": np.asarray([0.9]),
                "labels": np.asarray([3])}]
    assert tsd.ap50(perfect, pool, nms=False) == pytest.approx(1.0)
    wrong = [dict(perfect[0], labels=np.asarray([2]))]
    assert tsd.ap50(wrong, pool, nms=False) == pytest.approx(0.0)


@pytest.fixture(scope="module")
def tiny_detr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("detr") / "model"
    argv = ["--out-dir", str(d), "--train-scenes", "8", "--val-scenes", "4", "--max-steps", "2", "--batch-size", "4",
            "--eval-every", "100", "--queries", "5", "--d-model", "32", "--size", "64"]
    assert tsd.main(argv) == 0  # also checks the frozen copy against the trained model
    return str(d)


def test_training_writes_a_loadable_model_with_its_record(tiny_detr_dir):
    cfg = json.load(open(f"{tiny_detr_dir}/config.json"))
    assert cfg["model_type"] == "conditional_detr" and cfg["standin"]["steps"] == 2
    assert cfg["standin"]["frozen_copy_max_logit_difference"] <= 1e-3
    assert "ap50" in cfg["standin"]["val"]


def test_mask_eval_cli_end_to_end_and_resume(tiny_detr_dir, tmp_path):
    out = tmp_path / "masks"
    argv = ["--model-dir", tiny_detr_dir, "--scenes", "2", "--output-dir", str(out), "--methods",
            "generic_attribution", "--threshold", "0.0", "--batch-size", "2"]
    assert dme.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    stats = res["methods"]["generic_attribution"]
    assert set(dme.STAT_NAMES) <= set(stats) and stats["objects"] > 0
    assert res["iou_thresholds"][0] == 0.2 and res["iou_thresholds"][-1] == 0.95
    before = (out / "results.json").read_text()
    assert dme.main(argv) == 0
    assert (out / "results.json").read_text() == before


def test_mask_eval_bad_input(tiny_detr_dir, tmp_path, capsys):
    assert dme.main(["--model-dir", tiny_detr_dir, "--output-dir", str(tmp_path / "x")]) == 2
    assert "give either --scenes" in capsys.readouterr().err
    assert dme.main(["--model-dir", str(tmp_path), "--scenes", "1", "--output-dir", str(tmp_path / "y")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_shipped_detector_loads_and_keeps_its_recorded_ap50():
    """samples/synthetic_scenes_detr: re-measure AP50 on the first 60 of its validation scenes."""
    import os

    import torch
    import transformers as tf

    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "synthetic_scenes_detr")
    model = tf.ConditionalDetrForObjectDetection.from_pretrained(d, local_files_only=True).eval()
    record = model.config.standin
    pool = tsd.scene_pool(60, record["data_seed"], "val", record["size"])
    ap = tsd.ap50(tsd.predict(model, pool, torch.device("cpu")), pool, nms=False)
    assert abs(ap - record["val"]["ap50"]) < 0.12


def test_training_with_a_step_schedule_is_deterministic(tmp_path):
    """--cosine-steps: the learning rate follows the step count, not the clock, so two runs give the same weights."""
    import torch
    from safetensors.torch import load_file

    def train(name):
        d = tmp_path / name
        argv = ["--out-dir", str(d), "--train-scenes", "8", "--val-scenes", "2", "--cosine-steps", "3", "--batch-size",
                "4", "--eval-every", "100", "--queries", "5", "--d-model", "32", "--size", "64"]
        assert tsd.main(argv) == 0
        assert json.load(open(d / "config.json"))["standin"]["steps"] == 3
        return load_file(str(d / "model.safetensors"))

    a, b = train("a"), train("b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
