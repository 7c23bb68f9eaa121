"""Each LRP rule against an independent re-statement of its formula (METHODS.md §1).

The references below are written elementwise with einsum over explicit
contribution tensors, not with the library's matrix shortcuts, and run in
float64 so that any disagreement is a formula error, not rounding.
"""
import pytest
import torch
import torch.nn.functional as F

from modules import layers as L

DT = torch.float64


def ref_safe_div(a, b):
    out = torch.zeros(torch.broadcast_shapes(a.shape, b.shape), dtype=a.dtype)
    a, b = torch.broadcast_tensors(a, b)
    flat_a, flat_b, flat_o = a.reshape(-1), b.reshape(-1), out.view(-1)
    for i in range(flat_a.numel()):
        bi = float(flat_b[i])
        if bi == 0.0:
            flat_o[i] = 0.0
        else:
            den = bi + 1e-9
            flat_o[i] = float(flat_a[i]) / (den if den != 0.0 else 1e-9)
    return out


def contributions(x, w):
    """c[..., j, i] = x+_i W+_ji and x-_i W-_ji, the two alpha-beta parts."""
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    return torch.einsum("...i,ji->...ji", xp, wp), torch.einsum("...i,ji->...ji", xn, wn)


def ref_alpha_beta_shared(x, w, R):
    cp, cn = contributions(x, w)
    c = cp + cn
    s = ref_safe_div(R, c.sum(-1))
    return torch.einsum("...ji,...j->...i", c, s)


def ref_alpha_beta_separate(x, w, R):
    cp, cn = contributions(x, w)
    sp, sn = ref_safe_div(R, cp.sum(-1)), ref_safe_div(R, cn.sum(-1))
    return torch.einsum("...ji,...j->...i", cp, sp) + torch.einsum("...ji,...j->...i", cn, sn)


@pytest.fixture(params=[0, 1, 2])
def seed(request):
    torch.manual_seed(request.param)
    return request.param


def test_safe_div_matches_definition():
    a = torch.tensor([1.0, 2.0, -3.0, 4.0, 5.0], dtype=DT)
    b = torch.tensor([2.0, 0.0, -1e-9, -4.0, 1e-3], dtype=DT)
    assert torch.equal(L.safe_div(a, b), ref_safe_div(a, b))
    assert L.safe_div(a, b)[1] == 0.0 and L.safe_div(a, b)[2] == -3.0 / 1e-9


@pytest.mark.parametrize("shared", [True, False])
def test_alpha_beta_linear(seed, shared):
    x = torch.randn(4, 5, 7, dtype=DT)
    w = torch.randn(6, 7, dtype=DT)
    R = torch.randn(4, 5, 6, dtype=DT)
    x[0, 0, :3] = 0.0  # exact zeros in the input
    got = L.alpha_beta(x, w, R, shared_denominator=shared)
    ref = (ref_alpha_beta_shared if shared else ref_alpha_beta_separate)(x, w, R)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_alpha_beta_with_forward_product(seed):
    x, w, R = torch.randn(4, 9, dtype=DT), torch.randn(3, 9, dtype=DT), torch.randn(4, 3, dtype=DT)
    got = L.alpha_beta(x, w, R, shared_denominator=True, z=x @ w.t())
    torch.testing.assert_close(got, ref_alpha_beta_shared(x, w, R), atol=1e-9, rtol=0)


def test_alpha_beta_float32_close_to_exact(seed):
    """The three-product evaluation of the TA rule stays accurate in float32
    (float32 is the point here): against the float64 reference it differs by
    at most 3.3e-7 (values up to 2.1, seeds 0-5 measured), so 3e-6."""
    x, w, R = torch.randn(4, 10, 64), torch.randn(32, 64), torch.rand(4, 10, 32)
    got = L.alpha_beta(x, w, R, shared_denominator=True).double()
    ref = ref_alpha_beta_shared(x.double(), w.double(), R.double())
    torch.testing.assert_close(got, ref, atol=3e-6, rtol=0)


@pytest.mark.parametrize("shared", [True, False])
def test_linear_module_uses_rule_set(seed, shared):
    lin = L.Linear(7, 5).double()
    x = torch.randn(4, 3, 7, dtype=DT)
    R = torch.randn(4, 3, 5, dtype=DT)
    with L.explanation_state("TA" if shared else "LRP"):
        y = lin(x)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))
        got = lin.relprop(R)
    ref = (ref_alpha_beta_shared if shared else ref_alpha_beta_separate)(x, lin.weight.detach(), R)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_linear_ta_conserves_without_bias(seed):
    lin = L.Linear(16, 8, bias=False).double()
    x, R = torch.randn(4, 16, dtype=DT), torch.rand(4, 8, dtype=DT)
    with L.explanation_state("TA"):
        lin(x)
        got = lin.relprop(R)
    # float64; what leaks is the 1e-9 stabiliser (measured up to 2.3e-9 relative), not rounding (~1e-16)
    torch.testing.assert_close(got.sum(-1), R.sum(-1), rtol=1e-6, atol=0)


def ref_conv_alpha_beta_separate(x, w, R, stride):
    """Loop over output positions; every receptive field is a Linear."""
    B, C, H, W_ = x.shape
    O, _, kh, kw = w.shape
    out = torch.zeros_like(x)
    for oy in range(R.shape[2]):
        for ox in range(R.shape[3]):
            ys, xs = oy * stride, ox * stride
            patch = x[:, :, ys:ys + kh, xs:xs + kw].reshape(B, -1)
            r = ref_alpha_beta_separate(patch, w.reshape(O, -1), R[:, :, oy, ox])
            out[:, :, ys:ys + kh, xs:xs + kw] += r.reshape(B, C, kh, kw)
    return out


def test_conv2d_alpha_beta_overlapping_fields(seed):
    conv = L.Conv2d(4, 5, kernel_size=3, stride=2).double()
    x = torch.randn(3, 4, 9, 9, dtype=DT)
    with L.explanation_state("LRP"):
        y = conv(x)
        R = torch.randn(y.shape, dtype=DT)
        got = conv.relprop(R)
    ref = ref_conv_alpha_beta_separate(x, conv.weight.detach(), R, stride=2)
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def ref_z_beta_patches(x, w, R, p):
    """z^B for a non-overlapping patch convolution, per sample and per patch."""
    B, C, H, W_ = x.shape
    O = w.shape[0]
    wf = w.reshape(O, -1)
    wp, wn = wf.clamp(min=0), wf.clamp(max=0)
    out = torch.zeros_like(x)
    for b in range(B):
        lo, hi = x[b].min(), x[b].max()
        for gy in range(H // p):
            for gx in range(W_ // p):
                patch = x[b, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(-1)
                low, high = torch.full_like(patch, float(lo)), torch.full_like(patch, float(hi))
                c = patch[None] * wf - low[None] * wp - high[None] * wn  # (O, in)
                z = c.sum(-1)
                s = R[b, :, gy, gx] / (z + 1e-9)
                out[b, :, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p] = (c * s[:, None]).sum(0).reshape(C, p, p)
    return out


@pytest.mark.parametrize("rule_set", ["TA", "LRP"])
def test_z_beta_first_layer(seed, rule_set):
    conv = L.Conv2d(3, 6, kernel_size=4, stride=4).double()
    x = torch.randn(3, 3, 8, 12, dtype=DT)
    x[1] *= 5.0  # per-sample bounds must differ
    with L.explanation_state(rule_set):
        y = conv(x)
        R = torch.rand(y.shape, dtype=DT)
        got = conv.relprop(R)
    torch.testing.assert_close(got, ref_z_beta_patches(x, conv.weight.detach(), R, 4), atol=1e-9, rtol=0)


@pytest.mark.parametrize("transpose_v", [False, True])
def test_matmul_gradient_times_input(seed, transpose_v):
    u = torch.randn(4, 2, 5, 3, dtype=DT)
    v = torch.randn(4, 2, 5 if transpose_v else 3, 3 if transpose_v else 6, dtype=DT)
    mm = L.MatMul(transpose_v=transpose_v)
    with L.explanation_state("TA"):
        z = mm(u, v)
        R = torch.randn(z.shape, dtype=DT)
        ru, rv = mm.relprop(R)
    vv = v.transpose(-2, -1) if transpose_v else v
    s = ref_safe_div(R, torch.einsum("bhik,bhkj->bhij", u, vv))
    ref_u = torch.einsum("bhik,bhkj,bhij->bhik", u, vv, s)
    ref_vv = torch.einsum("bhik,bhkj,bhij->bhkj", u, vv, s)
    torch.testing.assert_close(ru, ref_u, atol=1e-9, rtol=0)
    torch.testing.assert_close(rv, ref_vv.transpose(-2, -1) if transpose_v else ref_vv, atol=1e-9, rtol=0)
    # each input receives the whole relevance (hence the halving in attention)
    # (float64; the 1e-9 stabiliser leaks up to 3.9e-7 of these sums, measured: not rounding)
    torch.testing.assert_close(ru.sum((1, 2, 3)), R.sum((1, 2, 3)), rtol=1e-6, atol=1e-6)


def test_add_lrp_plain_split(seed):
    a, b, R = torch.randn(4, 3, 5, dtype=DT), torch.randn(4, 3, 5, dtype=DT), torch.randn(4, 3, 5, dtype=DT)
    add = L.Add()
    with L.explanation_state("LRP"):
        add(a, b)
        ra, rb = add.relprop(R)
    s = ref_safe_div(R, a + b)
    torch.testing.assert_close(ra, a * s, atol=1e-9, rtol=0)
    torch.testing.assert_close(rb, b * s, atol=1e-9, rtol=0)


def test_add_ta_rescaled_per_sample(seed):
    a, b, R = torch.randn(4, 3, 5, dtype=DT), torch.randn(4, 3, 5, dtype=DT), torch.rand(4, 3, 5, dtype=DT)
    add = L.Add()
    with L.explanation_state("TA"):
        add(a, b)
        ra, rb = add.relprop(R)
    for n in range(4):  # one sample at a time, by hand
        s = ref_safe_div(R[n], a[n] + b[n])
        pa, pb = a[n] * s, b[n] * s
        sa, sb, sr = pa.sum(), pb.sum(), R[n].sum()
        fa = float(ref_safe_div(sa.abs()[None], (sa.abs() + sb.abs())[None])[0]) * sr
        fb = float(ref_safe_div(sb.abs()[None], (sa.abs() + sb.abs())[None])[0]) * sr
        torch.testing.assert_close(ra[n], pa * ref_safe_div(fa[None], sa[None])[0], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(rb[n], pb * ref_safe_div(fb[None], sb[None])[0], atol=1e-9, rtol=1e-9)
        # totals add up to the sample's relevance, split in proportion |sum R_a| : |sum R_b|
        torch.testing.assert_close(ra[n].sum() + rb[n].sum(), sr, atol=1e-9, rtol=1e-9)
        # (float64; the 1e-9 stabiliser moves the ratio by up to 2.6e-7, measured; rounding ~1e-15)
        torch.testing.assert_close(ra[n].sum() / rb[n].sum(), sa.abs() / sb.abs(), rtol=1e-6, atol=0)


def test_clone_sums_branches_zero_where_input_zero():
    x = torch.tensor([[1.0, 0.0, -2.0]], dtype=DT)
    c = L.Clone()
    with L.explanation_state("TA"):
        x1, x2 = c(x, 2)
        assert x1 is x and x2 is x
        r = c.relprop([torch.tensor([[1.0, 2.0, 3.0]], dtype=DT), torch.tensor([[0.5, 0.5, 0.5]], dtype=DT)])
    assert torch.equal(r, torch.tensor([[1.5, 0.0, 3.5]], dtype=DT))


def test_token_select_places_relevance_at_token():
    x = torch.randn(2, 4, 3)
    sel = L.TokenSelect(1)
    with L.explanation_state("TA"):
        assert torch.equal(sel(x), x[:, 1])
        r = sel.relprop(torch.ones(2, 3))
    assert torch.equal(r[:, 1], torch.ones(2, 3)) and r.sum() == 6


def test_identity_layers_pass_relevance():
    R = torch.randn(2, 3)
    for mod in (L.LayerNorm(3), L.GELU(), L.Softmax(dim=-1), L.Dropout(0.1), L.Tanh(), L.Identity()):
        assert mod.relprop(R) is R


def test_state_is_scoped():
    lin = L.Linear(3, 2)
    x = torch.randn(2, 3)
    lin(x)
    assert L.current_state() is None
    with L.explanation_state("LRP") as state:
        lin(x)
        assert state.inputs[lin][0] is x
    assert L.current_state() is None and not state.inputs
    with pytest.raises(RuntimeError, match="explanation_state"):
        lin.relprop(torch.ones(2, 2))
    with pytest.raises(ValueError, match="TA, LRP"):
        with L.explanation_state("XYZ"):
            pass
