"""Swin in the one engine (issue 10; METHODS.md section 8, the project's own rule).

Every check here is against something computed independently of the
adapter: which tokens each window holds is read from the model itself (its
own shift / pad / partition run on features that carry their token number)
and from the shift arithmetic; which tokens each merged token replaces is
read from the Jacobian of the model's own patch-merging module; the map of
a Swin whose attention is forced to identity is the product of merge
matrices built here.  Tiny random configurations: a 56-pixel image with
4-pixel patches gives a 14 x 14 finest grid, stages 14 -> 7 -> 4 with window
4 (padding to 16 and 8 with shifted windows, an odd merge 7 -> 4, a last
stage clamped to one unshifted window).

Every test runs with torch's default dtype float64 (the ``float64``
fixture: models built and inputs drawn in float64), so the engine and the
references, and batch and singles, agree to ~1e-12 on any CPU (issue 20);
one CPU thread (``one_thread``).  (Hugging Face's Swin takes its eager
softmax in float32 even then; both sides read the same probabilities.)
"""
import pytest
import torch
import transformers as tf
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from modules.adapters import InputsError, adapter_for, supported_models
from modules.adapters.swin import HFSwinAdapter, TimmSwinAdapter, window_index
from modules.attention_capture import UnsupportedModelError
from modules.explain import explain, explain_trace
from modules.methods import ATTENTION_METHODS, METHODS
from modules.trace import AttentionCall, Merge, WindowLayout, propagate_row
from tests.test_generic import _assert_unchanged, _randomize, _snapshot

tf.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread", "float64")
IMG, PATCH, WIN, DIM, B = 56, 4, 4, 8, 3
DEPTHS, HEADS = (2, 2, 2), (1, 2, 2)
STAGES = [(14, 14), (7, 7), (4, 4)]  # feature map of each stage (ceil halving)
SHIFTS = [2, 2, 0]  # odd blocks shift by window // 2; the 4x4 stage is one window: no shift
GRID = STAGES[0]


def timm_v1():
    torch.manual_seed(0)
    return _randomize(SwinTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depths=DEPTHS, num_heads=HEADS,
                                      window_size=WIN, num_classes=5))


def timm_v2():
    torch.manual_seed(0)
    return _randomize(SwinTransformerV2(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depths=DEPTHS,
                                        num_heads=HEADS, window_size=WIN, num_classes=5))


def _hf_kw():
    return dict(image_size=IMG, patch_size=PATCH, embed_dim=DIM, depths=list(DEPTHS), num_heads=list(HEADS),
                window_size=WIN, num_labels=5)


def hf_v1():
    torch.manual_seed(0)
    return _randomize(tf.SwinForImageClassification(tf.SwinConfig(**_hf_kw())))


def hf_v2():
    torch.manual_seed(0)
    return _randomize(tf.Swinv2ForImageClassification(tf.Swinv2Config(**_hf_kw())))


FAMILIES = {"timm_v1": timm_v1, "timm_v2": timm_v2, "hf_v1": hf_v1, "hf_v2": hf_v2}


def images(n=B, seed=1):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        out = model(x) if not isinstance(model, tf.PreTrainedModel) else model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


def is_timm(model):
    return isinstance(model, (SwinTransformer, SwinTransformerV2))


def blocks(model):
    """Every Swin block, in forward order."""
    if is_timm(model):
        return [b for stage in model.layers for b in stage.blocks]
    base = model.swin if isinstance(model, tf.SwinForImageClassification) else model.swinv2
    return [b for stage in base.encoder.layers for b in stage.blocks]


def mergers(model):
    """Every patch-merging module, in forward order, with the stage size it reads."""
    if is_timm(model):  # timm merges at the start of stages 1, 2
        return [(model.layers[i].downsample, STAGES[i - 1]) for i in (1, 2)]
    base = model.swin if isinstance(model, tf.SwinForImageClassification) else model.swinv2
    return [(base.encoder.layers[i].downsample, STAGES[i]) for i in (0, 1)]  # HF: at the end of stages 0, 1


def block_sizes():
    return [size for size, depth in zip(STAGES, DEPTHS) for _ in range(depth)]


# --------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------
def merge_reference(h, w):
    """(N_new, N_old): token (i, j) of the merged map averages the existing (2i + a, 2j + b)."""
    hn, wn = (h + 1) // 2, (w + 1) // 2
    m = torch.zeros(hn * wn, h * w)
    for r in range(h):
        for c in range(w):
            m[(r // 2) * wn + c // 2, r * w + c] = 1.0
    return m / m.sum(dim=1, keepdim=True)


def merge_prediction():
    """(gh, gw): the mean-pooled head's row carried back through the merges alone."""
    v = torch.full((1, STAGES[-1][0] * STAGES[-1][1]), 1.0 / (STAGES[-1][0] * STAGES[-1][1]))
    for (h, w) in reversed(STAGES[:-1]):
        v = v @ merge_reference(h, w)
    return v.reshape(GRID)


def covered_tokens(h, w, win, shift, pad_first, window):
    """Stream tokens of window ``window`` (row-major over the window grid) of a
    block with cyclic shift ``shift`` on an (h, w) map, by the shift arithmetic:
    window position (r, c) of the shifted map holds token ((r + s) mod H, (c + s) mod W)
    (timm shifts the map, then pads it; Hugging Face pads, then shifts the padded map)."""
    hp, wp = -(-h // win) * win, -(-w // win) * win
    i, j = divmod(window, wp // win)
    out = []
    for a in range(win):
        for b in range(win):
            r, c = i * win + a, j * win + b
            if pad_first:
                rr, cc = (r + shift) % hp, (c + shift) % wp
                out.append(rr * w + cc if rr < h and cc < w else -1)
            else:
                out.append(((r + shift) % h) * w + (c + shift) % w if r < h and c < w else -1)
    return out


def observed_windows(model, block, h, w):
    """(nW, w*w) token of each window position as the block itself forms them:
    run its shift / pad / partition on features equal to token number + 1
    (padding reads 0) and read what its attention module receives."""
    if is_timm(model):
        dim, target = block.norm1.normalized_shape[0], block.attn
    else:
        dim, target = block.layernorm_before.normalized_shape[0], block.attention
    ids = torch.arange(1, h * w + 1, dtype=next(block.parameters()).dtype)
    seen = {}
    handle = target.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            if is_timm(model):
                block._attn(ids.reshape(1, h, w, 1).expand(1, h, w, dim).contiguous())
            else:
                feats = ids.reshape(1, h * w, 1).expand(1, h * w, dim).contiguous()
                norm = block.layernorm_before
                if isinstance(model, tf.SwinForImageClassification):  # normalises before the partition
                    block.layernorm_before = nn.Identity()
                try:
                    block(feats, (h, w))
                finally:
                    block.layernorm_before = norm
    finally:
        handle.remove()
    return seen["x"][..., 0].round().long() - 1


# --------------------------------------------------------------------------
# WindowLayout
# --------------------------------------------------------------------------
LAYOUTS = [(8, 8, (4, 4), (0, 0), False), (8, 8, (4, 4), (2, 2), False), (7, 5, (4, 4), (2, 2), False),
           (7, 5, (4, 4), (2, 2), True), (10, 10, (4, 4), (2, 2), True), (6, 9, (3, 2), (1, 1), False)]


@pytest.mark.parametrize("geometry", LAYOUTS)
def test_window_layout_dense_gather_scatter_agree_with_apply(geometry):
    h, w, win, shift, pad_first = geometry
    index = window_index(h, w, win, shift, pad_first)
    layout = WindowLayout(index, h * w)
    real = index[index >= 0]
    assert torch.equal(real.sort().values, torch.arange(h * w))  # each token exactly once
    nW, n = index.shape
    g = torch.Generator().manual_seed(0)
    local = torch.rand(2 * nW, n, n, generator=g)
    v = torch.rand(2, h * w, generator=g)
    dense = layout.dense(local)
    call = AttentionCall("x", torch.zeros(2 * nW, 1, n, n), windows=layout)
    torch.testing.assert_close(call.apply(v, local), (v.unsqueeze(1) @ dense).squeeze(1), atol=1e-12, rtol=1e-12)
    # gather/scatter: a round trip, padding reads 0
    gathered = layout.gather(v)
    assert torch.equal(layout.scatter(gathered), v)
    assert torch.equal(gathered[:, index < 0], torch.zeros(2, int((index < 0).sum())))
    # dense: each window's block in place, zero between windows
    same_window = torch.zeros(h * w, h * w, dtype=torch.bool)
    for k in range(nW):
        t = index[k][index[k] >= 0]
        same_window[t[:, None], t[None, :]] = True
        keep = index[k] >= 0
        assert torch.equal(dense[1][t[:, None], t[None, :]], local[nW + k][keep][:, keep])
    assert torch.equal(dense[:, ~same_window], torch.zeros(2, int((~same_window).sum())))


@pytest.mark.parametrize("geometry", LAYOUTS)
def test_window_index_is_the_shift_arithmetic(geometry):
    h, w, win, shift, pad_first = geometry
    index = window_index(h, w, win, shift, pad_first)
    if win[0] == win[1] and shift[0] == shift[1]:
        for k in range(index.shape[0]):
            assert index[k].tolist() == covered_tokens(h, w, win[0], shift[0], pad_first, k)


# --------------------------------------------------------------------------
# The recorded bookkeeping is the model's own
# --------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_windows_and_merges_are_the_models(family):
    model = FAMILIES[family]()
    stream = explain_trace(model, images(1), "rollout").trace.streams["image"]
    kinds = ["A" if isinstance(op, AttentionCall) else "M" for op in stream.ops]
    assert kinds == ["A", "A", "M", "A", "A", "M", "A", "A"]
    # windows: what each block's attention really receives
    for call, block, (h, w) in zip(stream.calls, blocks(model), block_sizes()):
        assert call.windows.num_tokens == h * w
        assert torch.equal(call.windows.index, observed_windows(model, block, h, w)), call.name
    # the shifted blocks' windows are the shift arithmetic (timm shifts then pads, HF pads then shifts)
    # (stages 0 and 1; HF V2 sizes its last window from the floored grid, 3, on the 4x4 map it gets,
    # which the observed partition above covers)
    for call, (h, w), s in zip(stream.calls[1::2], STAGES[:2], SHIFTS):
        for k in range(call.windows.index.shape[0]):
            assert call.windows.index[k].tolist() == covered_tokens(h, w, WIN, s, not is_timm(model), k)
    # merges: which tokens each merged token depends on (Jacobian of the model's merging module)
    merges = [op for op in stream.ops if isinstance(op, Merge)]
    for op, (module, (h, w)) in zip(merges, mergers(model)):
        torch.testing.assert_close(op.matrix, merge_reference(h, w), atol=0, rtol=0)
        c = module.reduction.in_features // 4
        x = torch.randn(1, h, w, c, requires_grad=True)
        out = module(x) if is_timm(model) else module(x.reshape(1, h * w, c), (h, w))
        out = out.reshape(1, -1, out.shape[-1])
        support = torch.stack([torch.autograd.grad(out[0, n].square().sum(), x, retain_graph=True)[0]
                               .abs().sum(-1).reshape(-1) for n in range(out.shape[1])])
        assert torch.equal(support > 0, merge_reference(h, w) > 0)


@pytest.mark.parametrize("family", ["timm_v1", "hf_v1"])
@pytest.mark.parametrize("layer", [1, 3])  # a shifted block of stage 0 (14x14) and of stage 1 (7x7)
def test_shifted_window_scatter_lands_on_the_tokens_it_covers(family, layer):
    model = FAMILIES[family]()
    stream = explain_trace(model, images(1), "rollout").trace.streams["image"]
    call = stream.calls[layer]
    (h, w), stage = block_sizes()[layer], layer // 2
    n_windows = call.windows.index.shape[0]
    window = n_windows - 1  # the bottom-right window: it holds the tokens the cyclic shift wrapped around
    tokens = [t for t in covered_tokens(h, w, WIN, SHIFTS[stage], not is_timm(model), window) if t >= 0]
    # the finest-grid patches under those tokens (2x2 children per merge)
    cells = {(t // w, t % w) for t in tokens}
    for s in range(stage - 1, -1, -1):
        fh, fw = STAGES[s]
        cells = {(2 * r + a, 2 * c + b) for r, c in cells for a in (0, 1) for b in (0, 1)
                 if 2 * r + a < fh and 2 * c + b < fw}
    expected = torch.zeros(GRID, dtype=torch.bool)
    for r, c in cells:
        expected[r, c] = True
    assert expected.sum() == len(tokens) * 4 ** stage  # no child padding in these windows

    n = WIN * WIN
    only = torch.zeros(n_windows, n, n)
    only[window] = 1.0  # this call attends within that window only; every other call is the identity
    row = propagate_row(stream, lambda c: only if c is call else None)
    assert torch.equal(row.reshape(GRID) != 0, expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_attention_gives_the_merge_prediction(family):
    model = FAMILIES[family]()
    x = images(2)
    want = merge_prediction().expand(2, *GRID)
    # force every attention to the identity where the model applies it (HF Swin: the probabilities it returns)
    handles = []
    for block in blocks(model):
        if is_timm(model):
            target, pick = block.attn.attn_drop, None
        elif isinstance(model, tf.SwinForImageClassification):
            target, pick = block.attention, 1
        else:
            target, pick = block.attention.self.dropout, None

        def force(module, args, out, pick=pick):
            p = out if pick is None else out[pick]
            eye = p * 0 + torch.eye(p.shape[-1])
            return eye if pick is None else (out[0], eye)
        handles.append(target.register_forward_hook(force))
    try:
        for method in ("rollout", "attn_last_layer"):
            torch.testing.assert_close(explain(model, x, method), want, atol=1e-12, rtol=1e-9)
        trace = explain_trace(model, x, "generic_attribution").trace
    finally:
        for h in handles:
            h.remove()
    # generic attribution on the identity: Abar = mean_h max(G * I, 0); with G = 1 every layer is I + I
    stream = trace.streams["image"]
    for call in stream.calls:
        assert torch.equal(call.probs, torch.eye(call.probs.shape[-1]).expand_as(call.probs))
        call.grad = torch.ones_like(call.probs)
    generic = METHODS["generic_attribution"].compute
    L = len(stream.calls)
    torch.testing.assert_close(generic(stream, 0, trace).reshape(2, *GRID), 2.0 ** L * want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(generic(stream, 2, trace).reshape(2, *GRID), 2.0 ** (L - 2) * want, atol=1e-10,
                               rtol=1e-10)
    for call in stream.calls:
        call.grad = torch.zeros_like(call.probs)  # Abar = 0: R = I, the merges alone
    torch.testing.assert_close(generic(stream, 0, trace).reshape(2, *GRID), want, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("family", ["timm_v1", "hf_v2"])  # the two pad/shift orders
def test_generic_and_rollout_equal_a_dense_reference(family):
    """R as full (N_s x N_0) matrices: each window's map put in place by the
    partition the block itself forms, merges built here; the mean row."""
    model = FAMILIES[family]()
    x = images(2)
    windows = [observed_windows(model, b, h, w) for b, (h, w) in zip(blocks(model), block_sizes())]

    def reference(trace, local_matrix):
        stream = trace.streams["image"]
        calls = iter(zip(stream.calls, windows))
        r = torch.eye(GRID[0] * GRID[1]).expand(2, -1, -1)
        for s, depth in enumerate(DEPTHS):
            for _ in range(depth):
                call, index = next(calls)
                local = local_matrix(call)  # (2 * nW, w, w)
                n = r.shape[1]
                dense = torch.zeros(2, n, n)
                for b in range(2):
                    for k in range(index.shape[0]):
                        keep = index[k] >= 0
                        t = index[k][keep]
                        dense[b][t[:, None], t[None, :]] = local[b * index.shape[0] + k][keep][:, keep]
                r = dense @ r
            if s + 1 < len(DEPTHS):
                r = merge_reference(*STAGES[s]) @ r
        return r.mean(dim=1).reshape(2, *GRID)

    trace = explain_trace(model, x, "generic_attribution").trace
    want = reference(trace, lambda c: torch.eye(c.probs.shape[-1]) + (c.grad * c.probs).clamp(min=0).mean(dim=1))
    torch.testing.assert_close(explain(model, x, "generic_attribution"), want, atol=1e-10, rtol=1e-10)
    trace = explain_trace(model, x, "rollout").trace

    def rollout_local(c):
        m = torch.eye(c.probs.shape[-1]) + c.probs.mean(dim=1)
        return m / m.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(explain(model, x, "rollout"), reference(trace, rollout_local), atol=1e-12, rtol=1e-9)


# --------------------------------------------------------------------------
# Every family: shapes, batch = singles, model as found
# --------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_shapes_batch_invariance_and_restoration(family):
    model = FAMILIES[family]()
    if is_timm(model):  # the fused path must come back on
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
    x = images()
    before_logits = logits(model, x)
    before = _snapshot(model)
    for method in ATTENTION_METHODS:
        maps = explain(model, x, method)
        _assert_unchanged(before, _snapshot(model))
        assert maps.shape == (B, *GRID) and torch.isfinite(maps).all() and not maps.requires_grad, method
        if METHODS[method].normalized:  # GradCAM: min-max normalised (all 0 when every head's weight is negative)
            assert maps.min() >= 0 and maps.max() <= 1, method
        else:
            assert (maps > 0).any(), method
        singles = torch.cat([explain(model, x[i:i + 1], method) for i in range(B)])
        torch.testing.assert_close(maps, singles, atol=1e-10, rtol=1e-9)
    assert torch.equal(logits(model, x), before_logits)
    _assert_unchanged(before, _snapshot(model))
    if is_timm(model):
        assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


def test_adapters_listed_and_one_line_errors():
    families = [f for f, *_ in supported_models()]
    assert TimmSwinAdapter.family in families and HFSwinAdapter.family in families
    assert isinstance(adapter_for(timm_v1()), TimmSwinAdapter) and isinstance(adapter_for(hf_v2()), HFSwinAdapter)
    # the LRP methods run through the LRP scope (tests/test_lrp_scope.py covers them on every Swin)
    model = timm_v1()
    assert "lrp" in adapter_for(model).methods()
    # Hugging Face Swin pads an image that is no multiple of the patch: explained on the padded grid,
    # the padded pixels stated (issue 26 item 5, tests/test_input_sizes.py)
    assert explain_trace(hf_v1(), torch.randn(1, 3, IMG + 2, IMG), "rollout").pixel_extent == (0, 0, IMG + 4, IMG)
    with pytest.raises(InputsError, match="the model takes 56x56"):
        explain(model, torch.randn(1, 3, IMG + 4, IMG + 4))
    with pytest.raises(UnsupportedModelError, match="global_pool"):
        adapter_for(SwinTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depths=DEPTHS, num_heads=HEADS,
                                    window_size=WIN, num_classes=5, global_pool="max"))
    with pytest.raises(UnsupportedModelError, match="no classification head"):
        adapter_for(SwinTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depths=DEPTHS, num_heads=HEADS,
                                    window_size=WIN, num_classes=0))
