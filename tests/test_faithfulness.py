"""modules/faithfulness.py against its peers (pytorch-grad-cam's ROAD, Quantus's
PixelFlipping, MPRT, Sparseness, Complexity and skimage's SSIM) and against
hand-made cases (issue 24).

Float policy (tests/conftest.py): two paths are compared in float64.  The
peers that cannot run in float64 are wrapped so that only their inputs pass
through float32 (values exactly representable there) and the model runs in
float64; where a peer itself rounds (pytorch-grad-cam builds the ROAD
right-hand side from a float32 image and rounds the solution to float32) the
tolerance stands above the gap measured on that case, stated beside it.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from modules import faithfulness as FA
from modules.ranking import tie_permutation

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantus():
    """Quantus, installed by make without its opencv-python (Makefile, setup.py)."""
    return pytest.importorskip("quantus", reason="Quantus is a test oracle: pip install --no-deps quantus==0.6.0 "
                                                 "(make test does)")


class F64(nn.Module):
    """Runs a float64 model on whatever dtype a peer hands it (peers cast inputs to float32)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.double())


def conv_net(H=10, W=10, classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * H * W, classes)).double().eval()


# --------------------------------------------------------------------------
# ROAD
# --------------------------------------------------------------------------
def test_removal_count():
    assert [FA.removal_count(f, 100) for f in FA.ROAD_FRACTIONS] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert FA.removal_count(0.25, 10) == 3 and FA.removal_count(0.0, 7) == 0 and FA.removal_count(1.0, 7) == 7
    with pytest.raises(ValueError):
        FA.removal_count(1.5, 10)


def test_imputation_system_equals_grad_cam_in_float64():
    """The sparse system, built by grad-cam's own code on a float64 image, solved: equal to 1e-12."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer, neighbors_weights

    g = torch.Generator().manual_seed(1)
    for H, W, f in ((10, 10, 0.5), (7, 12, 0.9), (9, 9, 0.1)):
        x = torch.randn(3, H, W, dtype=torch.float64, generator=g)
        removed = torch.rand(H, W, generator=g) < f
        A, b = NoisyLinearImputer.setup_sparse_system((~removed).double().numpy(), x.numpy(), neighbors_weights)
        ref = x.numpy().reshape(3, -1).copy()
        ref[:, removed.reshape(-1).numpy()] = np.asarray(spsolve(csc_matrix(A), b)).reshape(-1, 3).T
        mine = FA.linear_impute(x, removed)
        np.testing.assert_allclose(mine.reshape(3, -1), ref, rtol=0, atol=1e-12)
        assert np.array_equal(mine.reshape(3, -1)[:, ~removed.reshape(-1).numpy()],
                              x.numpy().reshape(3, -1)[:, ~removed.reshape(-1).numpy()])


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_noise0_equals_grad_cam(order):
    """road(noise=0) == grad-cam's ROAD{Most,Least}RelevantFirst(NoisyLinearImputer(noise=0)),
    softmax target, return_diff=False, percentile p = 100 (1 - f).

    10 x 10 images: grad-cam removes N - ceil((N - 1) p / 100) pixels (all >= its
    np.percentile threshold), which is exactly floor(f N + 0.5) for N = 100 at every
    default fraction (asserted); other sizes differ by one pixel at some fractions.
    grad-cam computes in float32 (image, right-hand side, solution); measured gap to
    our float64 imputation on this case: 1.2e-7 on pixels, 8e-9 on probabilities,
    hence the tolerances 5e-7 / 1e-7."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                  RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    B, H, W = 3, 10, 10
    model = F64(conv_net(H, W)).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, H, W, generator=g)  # float32: what grad-cam's imputer accepts
    maps = torch.rand(B, H, W, dtype=torch.float64, generator=g)
    idx = [1, 2, 3]
    mine = FA.road(model, x.double(), maps, index=idx, order=order, noise=0.0)
    cls = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    ref = []
    for f in FA.ROAD_FRACTIONS:
        p = round(100 * (1 - f))
        n = H * W
        assert n - math.ceil((n - 1) * p / 100) == FA.removal_count(f, n)
        metric = PerturbationConfidenceMetric(cls(p, NoisyLinearImputer(noise=0)))
        r = metric(x, maps.numpy(), [ClassifierOutputSoftmaxTarget(i) for i in idx], model, return_diff=False)
        ref.append(np.asarray(r, np.float64))
    ref = np.stack(ref, 1)
    assert mine.shape == (B, len(FA.ROAD_FRACTIONS)) and mine.dtype == torch.float64
    np.testing.assert_allclose(mine.numpy(), ref, rtol=0, atol=1e-7)
    # the perturbed images themselves
    metric = PerturbationConfidenceMetric(cls(30, NoisyLinearImputer(noise=0)))
    _, vis = metric(x, maps.numpy(), [ClassifierOutputSoftmaxTarget(i) for i in idx], model,
                    return_visualization=True, return_diff=False)
    morf = order == "morf"
    for i in range(B):
        from modules.ranking import ranking_order

        removed = torch.zeros(H * W, dtype=torch.bool)
        removed[ranking_order(maps[i].reshape(1, -1), descending=morf)[0, :70]] = True
        mine_img = FA.linear_impute(x[i].double(), removed.reshape(H, W))
        np.testing.assert_allclose(mine_img, vis[i].double().numpy(), rtol=0, atol=5e-7)


def test_road_noise_batch_equals_singles_and_draws():
    model = conv_net(12, 12)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=g)
    maps = torch.rand(4, 12, 12, dtype=torch.float64, generator=g)
    fr = (0.2, 0.6)
    batch = FA.road(model, x, maps, fractions=fr, noise=0.05, generator=torch.Generator().manual_seed(7))
    gs = torch.Generator().manual_seed(7)
    singles = torch.cat([FA.road(model, x[i:i + 1], maps[i:i + 1], fractions=fr, noise=0.05, generator=gs)
                         for i in range(4)])
    np.testing.assert_allclose(batch.numpy(), singles.numpy(), rtol=0, atol=1e-12)
    clean = FA.road(model, x, maps, fractions=fr, noise=0.0)
    assert not torch.allclose(batch, clean)
    # index=None explains the predicted class; an explicit index of the same classes agrees
    pred = model(x).argmax(1)
    np.testing.assert_array_equal(FA.road(model, x, maps, pred, fractions=fr, noise=0.0).numpy(), clean.numpy())
    with pytest.raises(ValueError):
        FA.road(model, x, maps[:, :6], fractions=fr)
    with pytest.raises(ValueError):
        FA.road(model, x, maps, order="random")
    with pytest.raises(ValueError):
        FA.road(model, x, maps, tie_break="topk")


# --------------------------------------------------------------------------
# Flipping
# --------------------------------------------------------------------------
@pytest.mark.parametrize("softmax", [True, False])
def test_flip_curves_equal_quantus_pixel_flipping(softmax):
    """Patch flipping == Quantus PixelFlipping with features_in_step = C p^2 on a map
    constant within patches (distinct between them), baseline 0.0, abs/normalise off.
    Quantus's curve starts after the first step (ours at 0 flipped); its AUC is the
    trapezoid with dx = 1 over those points (ours over the share 0..1, from 0).  Float64 throughout (inputs float32-exact)."""
    quantus = _quantus()

    B, C, H, W, p = 3, 3, 12, 12, 4
    net = conv_net(H, W)
    model = F64(net).eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, C, H, W, generator=g).double()
    patch_maps = torch.rand(B, H // p, W // p, dtype=torch.float64, generator=g)
    y = np.array([0, 3, 4])
    mine = FA.flip_curves(net, x, patch_maps, index=torch.as_tensor(y), baseline="zero")
    pixel = patch_maps.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].numpy()
    metric = quantus.PixelFlipping(features_in_step=C * p * p, perturb_baseline=0.0, abs=False, normalise=False,
                                   disable_warnings=True)
    ref = np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=y, a_batch=pixel.copy(), softmax=softmax,
                            channel_first=True, device="cpu"))
    got = (mine.prob if softmax else mine.logit).numpy()
    assert got.shape == (B, (H // p) * (W // p) + 1)
    np.testing.assert_allclose(got[:, 1:], ref, rtol=0, atol=1e-12)
    # Quantus's calculate_auc is np.trapz(curve, dx=1), gone in NumPy 2.4 (the call raises
    # AttributeError there), so its AUC is restated with np.trapezoid
    ours = FA.auc(torch.from_numpy(got[:, 1:]), torch.arange(got.shape[1] - 1, dtype=torch.float64))
    np.testing.assert_allclose(ours.numpy(), np.trapezoid(ref, dx=1, axis=1), rtol=0, atol=1e-12)
    # pixel units: the same map at pixel resolution with patch_size pools to the same curve
    mine_px = FA.flip_curves(net, x, patch_maps.repeat_interleave(p, 1).repeat_interleave(p, 2), index=y, patch_size=p)
    np.testing.assert_allclose(mine_px.logit.numpy(), mine.logit.numpy(), rtol=0, atol=1e-12)


def test_flip_restatement_baselines_and_steps():
    """Mean / blur baselines and coarse steps against a plain loop (Quantus recomputes its
    'mean' baseline from the already-perturbed image, over all channels: not comparable)."""
    B, C, H, W = 2, 3, 12, 12
    net = conv_net(H, W)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    maps = torch.rand(B, 3, 3, dtype=torch.float64, generator=g)
    base_mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    for baseline in ("mean", "blur", 0.5):
        c = FA.flip_curves(net, x, maps, baseline=baseline, steps=3, order="lerf")
        base = base_mean if baseline == "mean" else (torch.full_like(x, 0.5) if baseline == 0.5
                                                     else FA._gaussian_blur(x, 2.0))
        assert c.counts.tolist() == [[0, 3, 6, 9]] * B
        target = net(x).argmax(1)
        for b in range(B):
            order = torch.argsort(maps[b].reshape(-1), stable=True)  # ascending, no ties (random floats)
            for s, k in enumerate([0, 3, 6, 9]):
                xi = x[b].clone()
                for u in order[:k].tolist():
                    r, q = divmod(u, 3)
                    xi[:, 4 * r:4 * r + 4, 4 * q:4 * q + 4] = base[b, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4]
                with torch.no_grad():
                    ref = net(xi[None])[0, target[b]]
                assert abs(float(c.logit[b, s]) - float(ref)) < 1e-12
    blurred = FA._gaussian_blur(torch.ones(1, 3, 12, 12, dtype=torch.float64), 2.0)
    np.testing.assert_allclose(blurred.numpy(), 1.0, atol=1e-12)  # a blur keeps a constant image


def test_input_gradient_on_linear_model_gives_the_best_morf_curve():
    """Linear logit, zero baseline: removing a patch lowers the logit by exactly its
    gradient x input sum, so that map reaches the minimum over all k-subsets at every
    k (brute force over the 2^9 subsets) and its LeRF curve the maximum; on an
    all-ones image the plain input gradient is the same map."""
    torch.manual_seed(0)
    H = W = 6
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 4)).double().eval()
    g = torch.Generator().manual_seed(6)
    for x in (torch.randn(1, 3, H, W, dtype=torch.float64, generator=g), torch.ones(1, 3, H, W, dtype=torch.float64)):
        x = x.clone().requires_grad_(True)
        target = int(lin(x).argmax())
        lin(x)[0, target].backward()
        grad = x.grad.detach()
        gxi = (grad * x.detach()).sum(1)
        units = gxi.reshape(3, 2, 3, 2).sum(dim=(1, 3)).reshape(-1)  # 3 x 3 patches of 2 x 2
        maps = [gxi] if x.detach().ne(1).any() else [gxi, grad.sum(1)]
        for m in maps:
            res = FA.flipping(lin, x.detach(), m, index=target, patch_size=2)
            logits0 = float(lin(x.detach())[0, target])
            for k in range(10):
                drops = [sum(units[list(s)].tolist()) for s in itertools.combinations(range(9), k)]
                assert abs(float(res["morf"].logit[0, k]) - (logits0 - max(drops))) < 1e-10
                assert abs(float(res["lerf"].logit[0, k]) - (logits0 - min(drops))) < 1e-10
            assert float(res["faithfulness"]["logit"][0]) > 0
        # and a random map does no better
        rnd = FA.flipping(lin, x.detach(), torch.rand(1, 3, 3, dtype=torch.float64, generator=g), index=target)
        assert float(rnd["auc"]["morf"]["logit"][0]) >= float(res["auc"]["morf"]["logit"][0]) - 1e-12


def test_constant_map_hits_the_tie_rule():
    """A constant map ranks every patch equal: the tie rule alone orders them, the same way
    for MoRF and LeRF (faithfulness 0), in tie_permutation order ('random') or raster order."""
    B, H, W = 2, 8, 8
    net = conv_net(H, W)
    x = torch.randn(B, 3, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    const = torch.ones(B, 4, 4, dtype=torch.float64)
    for rule, seed in (("random", 0), ("random", 5), ("raster", 0)):
        res = FA.flipping(net, x, const, tie_break=rule, seed=seed)
        np.testing.assert_array_equal(res["morf"].logit.numpy(), res["lerf"].logit.numpy())
        assert float(res["faithfulness"]["logit"].abs().max()) == 0.0
        order = tie_permutation(16, seed) if rule == "random" else torch.arange(16)
        graded = torch.zeros(B, 16, dtype=torch.float64)
        graded[:, order] = torch.arange(16, 0, -1, dtype=torch.float64)  # the tie order as distinct scores
        ref = FA.flip_curves(net, x, graded.reshape(B, 4, 4))
        np.testing.assert_allclose(res["morf"].logit.numpy(), ref.logit.numpy(), rtol=0, atol=1e-12)
    a = FA.flip_curves(net, x, const, seed=0)
    b = FA.flip_curves(net, x, const, seed=1)
    assert not torch.equal(a.logit, b.logit)  # the seed decides among ties
    with pytest.raises(ValueError):
        FA.flip_curves(net, x, const, tie_break="topk")


def test_image_flipping_batch_equals_singles():
    net = conv_net(8, 8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=g)
    maps = torch.rand(3, 4, 4, dtype=torch.float64, generator=g)
    for baseline in ("zero", "mean", "blur"):
        batch = FA.flipping(net, x, maps, baseline=baseline, steps=5, batch_size=4)
        for i in range(3):
            one = FA.flipping(net, x[i:i + 1], maps[i:i + 1], baseline=baseline, steps=5)
            for order in ("morf", "lerf"):
                np.testing.assert_allclose(batch[order].logit[i].numpy(), one[order].logit[0].numpy(),
                                           rtol=0, atol=1e-12)
                np.testing.assert_allclose(batch[order].prob[i].numpy(), one[order].prob[0].numpy(),
                                           rtol=0, atol=1e-12)


def _tiny_hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).double().eval()


def test_text_token_flipping_restatement_and_batch_equals_singles():
    """Tokens flipped to the [MASK] id in relevance order, never [CLS] / [SEP] / padding;
    batch with padding == each text alone == a plain loop."""
    model = _tiny_hf_bert()
    MASK = 4
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3], [2, 20, 21, 22, 3, 0, 0]])
    att = (ids != 0).long()
    maps = torch.rand(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    res = FA.flipping(model, {"input_ids": ids, "attention_mask": att}, maps, baseline=MASK)
    assert res["morf"].counts.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 1, 2, 2, 3]]
    for i, n in ((0, 7), (1, 5)):
        one = FA.flipping(model, {"input_ids": ids[i:i + 1, :n], "attention_mask": att[i:i + 1, :n]},
                          maps[i:i + 1, :n], baseline=MASK, steps=5)
        for order in ("morf", "lerf"):
            np.testing.assert_allclose(res[order].logit[i].numpy(), one[order].logit[0].numpy(), rtol=0, atol=1e-10)
        target = int(res["morf"].target[i])
        inner = list(range(1, n - 1))
        ranked = sorted(inner, key=lambda j: -float(maps[i, j]))
        for s, k in enumerate(res["morf"].counts[i].tolist()):
            t = ids[i:i + 1, :n].clone()
            t[0, ranked[:k]] = MASK
            with torch.no_grad():
                ref = model(input_ids=t, attention_mask=att[i:i + 1, :n]).logits[0, target]
            assert abs(float(res["morf"].logit[i, s]) - float(ref)) < 1e-10
    with pytest.raises(ValueError):
        FA.flip_curves(model, {"input_ids": ids, "attention_mask": att}, maps, baseline="mask")


# --------------------------------------------------------------------------
# Randomisation
# --------------------------------------------------------------------------
def _grad_x_input(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    out = FA.model_logits(model, x)
    out.gather(1, target.reshape(-1, 1).to(out.device)).sum().backward()
    return (x.grad * x).sum(1).detach()


def test_spearman_and_ssim_equal_scipy_skimage_quantus():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity
    _quantus()
    from quantus.functions.similarity_func import correlation_spearman, ssim as q_ssim

    g = torch.Generator().manual_seed(11)
    a = torch.rand(4, 9, 10, dtype=torch.float64, generator=g)
    b = a + 0.3 * torch.rand(4, 9, 10, dtype=torch.float64, generator=g)
    b[0] = b[0].round(decimals=1)  # ties
    rho = FA.spearman(a, b)
    for i in range(4):
        assert abs(float(rho[i]) - spearmanr(a[i].reshape(-1), b[i].reshape(-1))[0]) < 1e-12
    np.testing.assert_allclose(rho.numpy(), correlation_spearman(a.reshape(4, -1).numpy(), b.reshape(4, -1).numpy(),
                                                                 batched=True), rtol=0, atol=1e-12)
    s = FA.ssim(a, b)
    for i in range(4):
        R = float(max(a[i].max(), b[i].max()) - min(a[i].min(), b[i].min()))
        assert abs(float(s[i]) - structural_similarity(a[i].numpy(), b[i].numpy(), data_range=R)) < 1e-12
    np.testing.assert_allclose(s.numpy(), q_ssim(a.numpy(), b.numpy(), batched=True), rtol=0, atol=1e-12)
    assert float(FA.ssim(a, a).min()) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(float(FA.spearman(torch.ones(1, 5), torch.rand(1, 5))[0]))


def test_cascading_randomization_equals_quantus_mprt():
    """Quantus MPRT (top down over every module with reset_parameters, each reset under
    torch.manual_seed(seed + 1), Spearman of the maps) == ours with one module per stage
    and stage_seeds = [seed + 1] * stages; abs and normalise off; float64 model."""
    quantus = _quantus()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5)).double().eval()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 3, 8, 8, generator=g).double()
    y = net(x).argmax(1)

    def explain_fn(model, inputs, targets):
        return _grad_x_input(model, inputs, targets)

    def q_explain(model, inputs, targets, **kw):
        model = model if isinstance(model, F64) else F64(model)
        return _grad_x_input(model, torch.as_tensor(inputs), torch.as_tensor(targets))[:, None].numpy()

    before = {k: v.clone() for k, v in net.state_dict().items()}
    stages = [(n, [f"{n}.weight", f"{n}.bias"]) for n, m in reversed(list(net.named_modules()))
              if hasattr(m, "reset_parameters")]
    mine = FA.cascading_randomization(net, x, explain_fn, stages=stages, stage_seeds=[43] * len(stages))
    metric = quantus.MPRT(abs=False, normalise=False, seed=42, disable_warnings=True, return_last_correlation=False)
    ref = metric(model=F64(net).eval(), x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, explain_func=q_explain,
                 device="cpu")
    names = [n for n in ref if n != "original"]
    assert [f"net.{n}" for n, _ in stages] == names
    for j, n in enumerate(names):
        np.testing.assert_allclose(mine["spearman"][j].numpy(), np.asarray(ref[n]), rtol=0, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model given is untouched


def test_randomizing_every_layer_decorrelates_gradient_x_input_but_not_a_fixed_prior():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                        nn.Linear(64, 6)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    x = torch.randn(8, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    prior = (-((yy - 5.5) ** 2 + (xx - 5.5) ** 2) / 20).exp().double()

    def centre(model, inputs, targets):
        return prior.expand(len(inputs), 12, 12)

    res = FA.cascading_randomization(net, x, lambda m, i, t: _grad_x_input(m, i, t), seed=1)
    assert len(res["stages"]) == 3  # one per Linear, last first (no block container)
    assert float(res["spearman"][-1].abs().mean()) < 0.2
    assert res["ssim"] is not None and float(res["ssim"][-1].mean()) < 0.5
    fixed = FA.cascading_randomization(net, x, centre, seed=1)
    np.testing.assert_allclose(fixed["spearman"].numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(fixed["ssim"].numpy(), 1.0, atol=1e-12)


def test_randomization_stages_of_vit_and_bert():
    from tests.conftest import tiny_vit

    vit = tiny_vit(depth=3)
    stages = FA.randomization_stages(vit)
    assert [n for n, _ in stages] == ["head", "blocks.2", "blocks.1", "blocks.0", "embeddings"]
    assert set(stages[0][1]) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert {"cls_token", "pos_embed"} <= set(stages[-1][1])
    assert sorted(sum((p for _, p in stages), [])) == sorted(n for n, _ in vit.named_parameters())
    bert = _tiny_hf_bert()
    names = [n for n, _ in FA.randomization_stages(bert)]
    assert names == ["head", "bert.encoder.layer.1", "bert.encoder.layer.0", "embeddings"]
    # randomize_stage: seeded, restores the global random state, changes exactly the stage's parameters
    a, b = tiny_vit(depth=3), tiny_vit(depth=3)
    state = torch.get_rng_state()
    FA.randomize_stage(a, stages[-1][1], 5)
    assert torch.equal(state, torch.get_rng_state())
    FA.randomize_stage(b, stages[-1][1], 5)
    ref = tiny_vit(depth=3).state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
        assert torch.equal(v, ref[k]) == (k not in stages[-1][1])


def test_randomization_with_a_registry_method_on_the_vit_copy():
    from modules.explain import explain
    from tests.conftest import tiny_vit

    vit = tiny_vit(depth=2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    res = FA.cascading_randomization(vit, x, lambda m, i, t: explain(m, i, "transformer_attribution", index=t))
    assert res["spearman"].shape == (4, 2) and res["ssim"] is None  # 4 x 4 patch maps: below SSIM's 7 x 7 window
    assert torch.isfinite(res["spearman"]).all()


# --------------------------------------------------------------------------
# Complexity
# --------------------------------------------------------------------------
def test_sparseness_and_entropy_equal_quantus_and_hand_values():
    """Quantus Sparseness = Gini of |a| / max|a| + 1e-7 (its epsilon; the max over the batch), Complexity = entropy
    with p log(p + 1e-12): equal to ours on the same inputs to 1e-12 / 1e-9 (the epsilon's
    effect on the entropy of these maps is below 1e-10)."""
    quantus = _quantus()

    g = torch.Generator().manual_seed(15)
    a = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g)
    x = np.zeros((4, 3, 8, 8))
    y = np.zeros(4, int)
    q_s = np.asarray(quantus.Sparseness(disable_warnings=True)(model=None, x_batch=x, y_batch=y,
                                                              a_batch=a.numpy().copy()))
    norm = a.abs() / a.abs().max()  # Quantus's normalise_by_max divides by the whole batch's max
    np.testing.assert_allclose(FA.sparseness(norm + 1e-7).numpy(), q_s, rtol=0, atol=1e-12)
    assert float((FA.sparseness(a) - torch.from_numpy(q_s)).abs().max()) < 1e-5  # what the epsilon moves
    q_c = np.asarray(quantus.Complexity(disable_warnings=True)(model=None, x_batch=x, y_batch=y,
                                                              a_batch=a.numpy().copy()))
    np.testing.assert_allclose(FA.entropy(a).numpy(), q_c, rtol=0, atol=1e-9)
    n = 64
    one_hot = torch.zeros(1, n, dtype=torch.float64)
    one_hot[0, 3] = -2.0
    assert float(FA.sparseness(one_hot)[0]) == pytest.approx(1 - 1 / n, abs=1e-12)
    assert float(FA.sparseness(torch.full((1, n), 3.0))[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(FA.entropy(torch.full((1, n), 3.0))[0]) == pytest.approx(math.log(n), abs=1e-12)
    assert float(FA.entropy(one_hot)[0]) == 0.0
    assert float(FA.sparseness(torch.zeros(1, n))[0]) == 0.0 and math.isnan(float(FA.entropy(torch.zeros(1, n))[0]))


def test_randomization_batch_equals_singles():
    """The randomised weights depend on the stage seeds only, so every sample's Spearman and
    SSIM are the same in a batch and alone."""
    net = conv_net(8, 8)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(16))

    def fn(m, i, t):
        return _grad_x_input(m, i, t)

    batch = FA.cascading_randomization(net, x, fn, seed=3)
    for i in range(3):
        one = FA.cascading_randomization(net, x[i:i + 1], fn, seed=3)
        np.testing.assert_allclose(one["spearman"][:, 0].numpy(), batch["spearman"][:, i].numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(one["ssim"][:, 0].numpy(), batch["ssim"][:, i].numpy(), rtol=0, atol=1e-12)
