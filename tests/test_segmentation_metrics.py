"""Scores of the segmentation test (METHODS.md §4) on hand-computed tiny masks,
and against a re-statement of the published code's formulas."""
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from baselines.ViT.segmentation_metrics import (SegmentationScores, average_precision, intersection_union,
                                                pixel_counts, prepare_maps, segmentation_scores, threshold_maps)

GT = np.array([[[0, 0, 0, 0],
                [0, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 0]]], dtype=np.uint8)  # 4 foreground, 12 background pixels


def test_perfect_map_scores_one():
    r = segmentation_scores(GT.astype(np.float32) * 5 + 2, GT)  # any affine map of the mask
    assert r == pytest.approx({"pixel_accuracy": 1.0, "mIoU": 1.0, "mAP": 1.0, "IoU_background": 1.0,
                               "IoU_foreground": 1.0, "n_images": 1})


def test_inverted_map_scores_zero_and_half_ap():
    r = segmentation_scores(1.0 - GT, GT)
    assert r["pixel_accuracy"] == 0.0 and r["mIoU"] == 0.0
    # scores [1-map, map] = [gt, 1-gt] rank all 16 positives below all 16 negatives:
    # the only recall step is at the end, precision 16/32
    assert r["mAP"] == pytest.approx(0.5)


def test_constant_map_is_all_background_without_nan():
    for value in (0.0, 3.0, np.nan):
        r = segmentation_scores(np.full(GT.shape, value, np.float32), GT)
        assert all(np.isfinite(v) for v in r.values())
        assert r["pixel_accuracy"] == pytest.approx(12 / 16)
        assert r["IoU_background"] == pytest.approx(12 / 16) and r["IoU_foreground"] == 0.0
        assert r["mIoU"] == pytest.approx(0.375)
        # map -> 0: score 1 on the 16 entries labelled [gt == 0] (12 positives), score 0 on the 16
        # labelled [gt == 1] (4 positives); threshold 1: recall 12/16, precision 12/16;
        # threshold 0: recall 1, precision 16/32
        assert r["mAP"] == pytest.approx(0.75 * 0.75 + 0.25 * 0.5)


def test_graded_map_hand_computed():
    maps = np.array([[[0.9, 0.1], [0.4, 0.6]]], np.float32)  # normalised: [[1, 0], [0.375, 0.625]], mean 0.5
    gt = np.array([[[1, 0], [1, 0]]], np.uint8)
    norm = prepare_maps(maps)
    np.testing.assert_allclose(norm, [[[1.0, 0.0], [0.375, 0.625]]], atol=1e-6)  # float32 storage: 6e-8 off at most
    pred = threshold_maps(norm)
    np.testing.assert_array_equal(pred, [[[True, False], [False, True]]])
    assert pixel_counts(pred, gt) == (2, 4)
    inter, union = intersection_union(pred, gt)
    np.testing.assert_array_equal(inter, [1, 1])
    np.testing.assert_array_equal(union, [3, 3])
    r = segmentation_scores(maps, gt)
    assert r["mIoU"] == pytest.approx(1 / 3) and r["pixel_accuracy"] == pytest.approx(0.5)
    s = norm.reshape(-1)
    ap = average_precision_score(np.r_[gt.reshape(-1) == 0, gt.reshape(-1) == 1], np.r_[1 - s, s])
    assert r["mAP"] == pytest.approx(ap)
    np.testing.assert_allclose(average_precision(norm, gt), [ap])


def test_iou_is_pooled_over_images_and_ap_is_averaged():
    # image 1: truth [1 1 0 0], map [1 0 0 0] -> prediction [1 0 0 0]
    # image 2: truth [1 0 0 0], map [4 3 2 1] -> normalised [1 2/3 1/3 0], mean 1/2 -> prediction [1 1 0 0]
    gt = np.array([[[1, 1, 0, 0]], [[1, 0, 0, 0]]], np.uint8)
    maps = np.array([[[1.0, 0.0, 0.0, 0.0]], [[4.0, 3.0, 2.0, 1.0]]], np.float32)
    s = SegmentationScores()
    s.update(maps, gt)
    # image 1: bg inter 2 union 3, fg inter 1 union 2; image 2: bg inter 2 union 3, fg inter 1 union 2
    r = s.result()
    assert r["IoU_background"] == pytest.approx(4 / 6) and r["IoU_foreground"] == pytest.approx(2 / 4)
    assert r["pixel_accuracy"] == pytest.approx(6 / 8)
    aps = [average_precision_score(np.r_[g.reshape(-1) == 0, g.reshape(-1) == 1], np.r_[1 - m.reshape(-1), m.reshape(-1)])
           for m, g in zip(prepare_maps(maps), gt)]
    assert r["mAP"] == pytest.approx(np.mean(aps))
    # pooled, not the mean of per-image ratios: a lopsided pair tells them apart
    s2 = SegmentationScores()
    s2.update(np.array([[[1.0, 0.0]]]), np.array([[[1, 0]]]))
    s2.update(np.array([[[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]]), np.array([[[0, 1, 1, 1, 1, 1, 1, 1]]]))
    fg = s2.result()["IoU_foreground"]
    assert fg == pytest.approx((1 + 0) / (1 + 8)) and fg != pytest.approx((1 + 0) / 2)


def _upstream_inter_union(pred, target, nclass=2):
    """batch_intersection_union of the published utils/metrices.py (classes shifted by 1, histogram)."""
    predict = pred.astype(np.int64) + 1
    target = target.astype(np.int64) + 1
    predict = predict * (target > 0).astype(predict.dtype)
    intersection = predict * (predict == target)
    area_inter, _ = np.histogram(intersection, bins=nclass, range=(1, nclass))
    area_pred, _ = np.histogram(predict, bins=nclass, range=(1, nclass))
    area_lab, _ = np.histogram(target, bins=nclass, range=(1, nclass))
    return area_inter, area_pred + area_lab - area_inter


def test_matches_published_formulas_on_random_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 12, 12)).astype(np.float32) * rng.uniform(0.5, 3, (5, 1, 1))
    gt = (rng.random((5, 12, 12)) < 0.3).astype(np.uint8)
    s = SegmentationScores()
    s.update(torch.from_numpy(maps), torch.from_numpy(gt.astype(np.int64)))  # tensors are accepted too
    tot_i, tot_u, correct, ap = np.zeros(2), np.zeros(2), 0, []
    for m, g in zip(maps, gt):
        res = (m - m.min()) / (m.max() - m.min())
        # no pixel within 1e-4 of the threshold (measured >= 9.6e-4), where the float32 normalisations
        # here and in prepare_maps (float64, then cast) differ by <= 3e-8: no pixel can flip
        assert np.abs(res - res.mean()).min() > 1e-4
        p = res > res.mean()
        i, u = _upstream_inter_union(p, g)
        tot_i, tot_u = tot_i + i, tot_u + u
        correct += np.sum((p.astype(int) + 1) == (g.astype(int) + 1))
        output_ap = np.stack([1 - res, res])  # (2, H, W) against one-hot targets, as get_ap_scores
        onehot = np.stack([g == 0, g == 1])
        ap.append(average_precision_score(onehot.reshape(-1), output_ap.reshape(-1)))
    r = s.result()
    assert r["pixel_accuracy"] == pytest.approx(correct / gt.size)
    assert r["mIoU"] == pytest.approx(np.mean(tot_i / tot_u))
    assert r["mAP"] == pytest.approx(np.mean(ap))


def test_prepare_maps_is_per_sample():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(4, 6, 6)) * np.array([1, 10, 100, 0.1])[:, None, None]
    together = prepare_maps(maps)
    alone = np.concatenate([prepare_maps(m[None]) for m in maps])
    np.testing.assert_array_equal(together, alone)  # elementwise per row: the same bits on any CPU
    assert together.min() == 0.0 and together.max() == 1.0


def test_state_round_trip_and_empty_result():
    assert SegmentationScores().result()["mAP"] == 0.0  # nothing seen: zeros, no NaN
    s = SegmentationScores()
    s.update(np.random.default_rng(2).random((3, 5, 5)), np.eye(5, dtype=np.uint8)[None].repeat(3, 0))
    again = SegmentationScores.from_state(s.state())
    assert again.result() == s.result()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_scores(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        prepare_maps(np.zeros((1, 1, 4, 4)))
