"""Synthetic scenes (data/scenes.py): determinism, exact masks and boxes,
questions with the objects they depend on, and the writers' formats."""
import json
import os

import numpy as np
import pytest

from data import scenes as SC
from data.synthetic import shape_mask

CFG = SC.SceneConfig(size=64, min_objects=1, max_objects=4, max_occlusion=0.4)


@pytest.fixture(scope="module")
def scenes():
    return [SC.generate_scene(i, seed=5, split="val", config=CFG) for i in range(24)]


def _obj(i, label, colour, mask, size="small"):
    mask = mask.astype(np.uint8)
    ys, xs = np.nonzero(mask)
    return SC.SceneObject(id=i, label=label, shape=SC.CLASS_NAMES[label], colour=colour, size=size, mask=mask,
                          shape_mask=mask, box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                          centroid=(float(xs.mean()), float(ys.mean())), area=int(mask.sum()))


@pytest.fixture()
def hand_scene():
    """20x20: a red disk (id 0) top-left, a blue square (id 1) bottom-right,
    a red square (id 2) top-right."""
    disk = SC.CLASS_NAMES.index("disk")
    square = SC.CLASS_NAMES.index("square")
    m0, m1, m2 = (np.zeros((20, 20), np.uint8) for _ in range(3))
    m0[1:5, 1:5] = 1    # centroid (2.5, 2.5)
    m1[14:18, 12:16] = 1  # centroid (13.5, 15.5)
    m2[2:4, 14:18] = 1  # centroid (15.5, 2.5)
    objs = [_obj(0, disk, "red", m0), _obj(1, square, "blue", m1, "large"), _obj(2, square, "red", m2)]
    return SC.Scene(image=np.zeros((20, 20, 3), np.uint8), objects=objs, background=np.zeros((20, 20, 3), np.uint8),
                    index=3, seed=1, split="val", config=SC.SceneConfig(size=32))


def test_deterministic_and_independent(scenes):
    again = SC.generate_scene(7, seed=5, split="val", config=CFG)
    np.testing.assert_array_equal(again.image, scenes[7].image)
    assert [o.record() for o in again.objects] == [o.record() for o in scenes[7].objects]
    assert SC.scene_questions(again, 2) == SC.scene_questions(scenes[7], 2)
    assert not np.array_equal(SC.generate_scene(7, seed=6, split="val", config=CFG).image, again.image)
    assert not np.array_equal(SC.generate_scene(7, seed=5, split="train", config=CFG).image, again.image)


def test_masks_are_the_visible_pixels_and_boxes_exact(scenes):
    n_occluded = 0
    for sc in scenes:
        covered = np.zeros(sc.image.shape[:2], bool)
        for o in reversed(sc.objects):  # from the top: an object's visible pixels are its shape minus later shapes
            p = o.params
            redrawn = shape_mask(o.label, CFG.size, (p["center_x"], p["center_y"]), p["radius"], p["angle"])
            np.testing.assert_array_equal(redrawn, o.shape_mask)
            np.testing.assert_array_equal(o.mask, (redrawn.astype(bool) & ~covered).astype(np.uint8))
            covered |= redrawn.astype(bool)
            rows, cols = np.flatnonzero(o.mask.any(axis=1)), np.flatnonzero(o.mask.any(axis=0))
            assert o.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            assert o.area == int(o.mask.sum()) >= CFG.min_visible
            assert o.occlusion == pytest.approx(1 - o.mask.sum() / redrawn.sum())
            assert o.occlusion <= CFG.max_occlusion + 1e-9
            n_occluded += o.occlusion > 0
        # the picture is the background exactly where no object is
        np.testing.assert_array_equal(sc.image[~covered], sc.background[~covered])
        inst = sc.instance_map
        for o in sc.objects:
            np.testing.assert_array_equal(inst == o.id + 1, o.mask.astype(bool))
        assert len(sc.objects) >= 1
    assert n_occluded > 0  # some objects are partly hidden


def test_separated_distinct_scenes():
    cfg = SC.SceneConfig(size=96, min_objects=2, max_objects=2, distinct_classes=True, separated=True, gap=2)
    for i in range(20):
        sc = SC.generate_scene(i, seed=0, split="val", config=cfg)
        a, b = sc.objects
        assert a.label != b.label and a.occlusion == 0 and b.occlusion == 0
        ya, xa = np.nonzero(a.mask)
        yb, xb = np.nonzero(b.mask)
        d = np.sqrt((ya[:, None] - yb[None]) ** 2 + (xa[:, None] - xb[None]) ** 2).min()
        assert d > 2  # more than the gap apart
        np.testing.assert_array_equal(sc.labels, np.isin(np.arange(8), [a.label, b.label]).astype(np.float32))


def test_relations_by_hand(hand_scene):
    d, bs, rs = hand_scene.objects
    assert SC.relation_holds(d, bs, "left of") is True
    assert SC.relation_holds(d, bs, "right of") is False
    assert SC.relation_holds(d, bs, "above") is True
    assert SC.relation_holds(bs, d, "below") is True
    assert SC.relation_holds(d, rs, "above") is None  # same row: centroids 0 px apart
    assert SC.relation_holds(rs, bs, "left of") is None  # 2 px apart < margin 4


def test_questions_by_hand(hand_scene):
    expected = {  # question -> (answer, token indices, objects)
        "what colour is the disk?": ("red", [4], [0]),
        "what shape is the blue object?": ("square", [4], [1]),
        "is the disk left of the blue square?": ("yes", [2, 3, 6, 7], [0, 1]),
        "is the disk right of the blue square?": ("no", [2, 3, 6, 7], [0, 1]),
        "is the disk above the blue square?": ("yes", [2, 3, 5, 6], [0, 1]),
        "is the disk below the blue square?": ("no", [2, 3, 5, 6], [0, 1]),
        "is the blue square right of the disk?": ("yes", [2, 3, 4, 7], [0, 1]),
        "is the blue square left of the disk?": ("no", [2, 3, 4, 7], [0, 1]),
        "is the blue square below the disk?": ("yes", [2, 3, 4, 6], [0, 1]),
        "is the blue square above the disk?": ("no", [2, 3, 4, 6], [0, 1]),
        "is the blue square below the red square?": ("yes", [2, 3, 4, 6, 7], [1, 2]),
        "is the blue square above the red square?": ("no", [2, 3, 4, 6, 7], [1, 2]),
        "is the red square above the blue square?": ("yes", [2, 3, 4, 6, 7], [1, 2]),
        "is the red square below the blue square?": ("no", [2, 3, 4, 6, 7], [1, 2]),
        "is the disk left of the red square?": ("yes", [2, 3, 6, 7], [0, 2]),
        "is the disk right of the red square?": ("no", [2, 3, 6, 7], [0, 2]),
        "is the red square right of the disk?": ("yes", [2, 3, 4, 7], [0, 2]),
        "is the red square left of the disk?": ("no", [2, 3, 4, 7], [0, 2]),
        "how many squares are there?": ("2", [2], [1, 2]),
        "how many red objects are there?": ("2", [2], [0, 2]),
        "how many blue objects are there?": ("1", [2], [1]),
        "how many disks are there?": ("1", [2], [0]),
        "is there a square?": ("yes", [3], [1, 2]),
        "is there a red square?": ("yes", [3, 4], [2]),
        "is there a blue disk?": ("no", [3, 4], []),
        "is there a star?": ("no", [3], []),
    }
    seen = set()
    for index in range(40):  # different question draws for the same objects
        hand_scene.index = index
        qs = SC.scene_questions(hand_scene, per_type=3)
        for q in qs:
            assert q.tokens == q.question[:-1].split() + ["?"]
            if q.question in expected:
                assert (q.answer, q.token_indices, q.objects) == expected[q.question], q.question
                seen.add(q.question)
        types = [q.qtype for q in qs]
        # the only unique shape is the disk; the only unique colour is blue
        assert types.count("colour") == 1 and types.count("shape") == 1
        assert types.count("existence") == 3 and types.count("count") == 3 and types.count("relation") == 3
    assert {"what colour is the disk?", "what shape is the blue object?", "how many squares are there?"} <= seen
    assert len([q for q in seen if q.startswith("is the")]) >= 8
    assert SC.scene_caption(hand_scene) == "a small red disk, a large blue square and a small red square."


def _independent_answer(q, sc):
    """Re-answer a question from its words and the objects (independent of the templates' code)."""
    w, objs = q.tokens[:-1], sc.objects
    if w[0] == "is" and w[1] == "there":
        match = [o.id for o in objs if o.shape == w[-1] and (len(w) == 4 or o.colour == w[3])]
        return ("yes" if match else "no"), match
    if w[:2] == ["how", "many"]:
        if w[3] == "objects":
            match = [o.id for o in objs if o.colour == w[2]]
        else:
            match = [o.id for o in objs if SC._plural(o.shape) == w[2]]
        return str(len(match)), match
    if w[:2] == ["what", "colour"]:
        (o,) = [o for o in objs if o.shape == w[4]]
        return o.colour, [o.id]
    if w[:2] == ["what", "shape"]:
        (o,) = [o for o in objs if o.colour == w[4]]
        return o.shape, [o.id]
    rel_at = next(i for i, t in enumerate(w) if t in ("left", "right", "above", "below"))
    rel = " ".join(w[rel_at:rel_at + 2]) if w[rel_at] in ("left", "right") else w[rel_at]
    da, db = w[2:rel_at], w[rel_at + len(rel.split()) + 1:]

    def find(desc):
        (o,) = [o for o in objs if o.shape == desc[-1] and (len(desc) == 1 or o.colour == desc[0])]
        return o

    a, b = find(da), find(db)
    axis = 0 if rel in ("left of", "right of") else 1
    sign = 1 if rel in ("left of", "above") else -1
    return ("yes" if sign * (b.centroid[axis] - a.centroid[axis]) > 0 else "no"), sorted([a.id, b.id])


def test_questions_agree_with_an_independent_reading(scenes):
    counts = {}
    for sc in scenes:
        for q in SC.scene_questions(sc, per_type=2):
            assert (q.answer, q.objects) == _independent_answer(q, sc), q.question
            counts[q.qtype] = counts.get(q.qtype, 0) + 1
    assert set(counts) == {"existence", "count", "colour", "shape", "relation"}


def test_coco_round_trip_through_pycocotools(tmp_path, scenes):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    path = SC.write_coco(str(tmp_path / "instances_val.json"), scenes[:6], "val")
    coco = COCO(path)
    assert sorted(coco.getCatIds()) == list(range(1, 9))
    for sc in scenes[:6]:
        iid = sc.index + 1
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[iid]))
        assert len(anns) == len(sc.objects)
        for ann in anns:
            o = sc.objects[ann["object_id"]]
            assert ann["category_id"] == o.label + 1 and ann["colour"] == o.colour
            np.testing.assert_array_equal(coco.annToMask(ann), o.mask)
            x0, y0, x1, y1 = o.box
            assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
            rle = coco.annToRLE(ann)
            np.testing.assert_allclose(mask_utils.toBbox(rle), ann["bbox"])
            assert mask_utils.area(rle) == ann["area"] == o.area
    # polygons: approximate but close to the exact masks
    coco_p = COCO(SC.write_coco(str(tmp_path / "poly.json"), scenes[:6], "val", mask_format="polygon"))
    for ann in coco_p.loadAnns(coco_p.getAnnIds()):
        sc = scenes[ann["image_id"] - 1]
        m, truth = coco_p.annToMask(ann).astype(bool), sc.objects[ann["object_id"]].mask.astype(bool)
        assert (m & truth).sum() / (m | truth).sum() > 0.6


def test_vqa_layout(tmp_path, scenes):
    qp, ap = SC.write_vqa(str(tmp_path / "q.json"), str(tmp_path / "a.json"), scenes[:5], "val", per_type=1)
    with open(qp) as fh:
        qs = json.load(fh)
    with open(ap) as fh:
        an = json.load(fh)
    assert qs["task_type"] == "Open-Ended" and an["data_subtype"] == "val"
    assert [q["question_id"] for q in qs["questions"]] == [a["question_id"] for a in an["annotations"]]
    assert len({q["question_id"] for q in qs["questions"]}) == len(qs["questions"])
    for q, a in zip(qs["questions"], an["annotations"]):
        assert q["image_id"] == a["image_id"]
        assert len(a["answers"]) == 10 and {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
        assert a["answer_type"] in ("yes/no", "number", "other")
        assert a["answer_annotation_ids"] == [a["image_id"] * 10 + o for o in a["answer_objects"]]
        assert all(0 <= t < len(a["question_tokens"]) for t in a["answer_token_indices"])


def test_cli_writes_every_format(tmp_path):
    from data.imagenet_seg import check_gtsegs_file, read_sample

    out = tmp_path / "scenes"
    assert SC.main(["--out-dir", str(out), "--split", "val", "--count", "4", "--seed", "2", "--size", "48",
                    "--quiet"]) == 0
    ann = out / "annotations"
    for name in ("instances_val.json", "captions_val.json", "v2_OpenEnded_scenes_val_questions.json",
                 "v2_scenes_val_annotations.json"):
        assert (ann / name).is_file(), name
    assert sorted(os.listdir(out / "val")) == [f"{i:06d}.png" for i in range(4)]
    assert check_gtsegs_file(str(out / "val_gtsegs.mat")) == 4
    import h5py
    import cv2

    cfg = SC.SceneConfig(size=48)
    with h5py.File(out / "val_gtsegs.mat", "r") as f:
        img, mask = read_sample(f, 2)
    sc = SC.generate_scene(2, seed=2, split="val", config=cfg)
    np.testing.assert_array_equal(img, sc.image)
    np.testing.assert_array_equal(mask, (sc.instance_map > 0).astype(np.uint8))
    png = cv2.imread(str(out / "val" / "000002.png"))[..., ::-1]
    np.testing.assert_array_equal(png, sc.image)
    manifest = json.loads((out / "imagefolder_val" / "manifest.json").read_text())
    assert manifest["labels"][2] == sc.labels.astype(int).tolist()
    with open(out / "val_scenes.json") as fh:
        rec = json.load(fh)["scenes"][2]
    assert rec["objects"] == json.loads(json.dumps([o.record() for o in sc.objects]))


def test_cli_bad_input_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        SC.main(["--out-dir", str(tmp_path), "--count", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        SC.main(["--out-dir", str(tmp_path), "--count", "2", "--max-objects", "6"])
    assert e.value.code == 2
    assert "max_objects" in capsys.readouterr().err
