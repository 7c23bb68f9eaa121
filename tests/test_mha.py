"""``nn.MultiheadAttention``'s fused call as explicit steps (issue 26, item 3).

:func:`modules.mha.multi_head_attention` against torch's own
``F.multi_head_attention_forward`` (outputs and returned weights, float64,
every mask kind, separate projections, unbatched inputs); inside the LRP
scope, ``nn.MultiheadAttention`` is decomposed like
``scaled_dot_product_attention``: for every rule set its relevance (and the
gradient pass) equals that of the same attention written as plain torch
calls, and its probabilities are recorded.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modules.layers as layers
from modules.lrp_scope import UnsupportedOperationError, relevance_scope
from modules.mha import mha_module_forward, multi_head_attention

E, H, L, S, B = 8, 2, 5, 4, 3


@pytest.fixture
def no_stabiliser(monkeypatch):
    monkeypatch.setattr(layers, "EPS", 0.0)


def _mha(seed=0, **kw):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, dtype=torch.float64, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def _rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _torch_and_ours(m, q, k, v, **kw):
    want = m(q, k, v, **kw)
    got = mha_module_forward(m, None, q, k, v, **kw)
    return got, want


@pytest.mark.parametrize("batch_first", [False, True])
def test_explicit_attention_equals_torch_for_every_mask_kind(batch_first):
    m = _mha(batch_first=batch_first)
    x = _rand(B, L, E) if batch_first else _rand(L, B, E)
    kv = _rand(B, S, E, seed=2) if batch_first else _rand(S, B, E, seed=2)
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)  # open_clip's text mask
    float_mask = _rand(L, S, seed=3)
    bool_mask = _rand(L, S, seed=4) > 0.8
    bool_mask[:, 0] = False  # no fully blocked row
    per_head = _rand(B * H, L, S, seed=5)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, -2:] = True
    float_padding = torch.zeros(B, S, dtype=torch.float64).masked_fill(padding, float("-inf"))
    cases = [(x, x, x, dict(attn_mask=causal)), (x, kv, kv, dict(attn_mask=float_mask)),
             (x, kv, kv, dict(attn_mask=bool_mask, key_padding_mask=padding)),
             (x, kv, kv, dict(attn_mask=per_head, key_padding_mask=float_padding)),
             (x, kv, kv, dict(need_weights=True, average_attn_weights=False)),
             (x, x, x, dict(attn_mask=causal, is_causal=True, need_weights=False))]
    for q, k, v, kw in cases:
        (got, got_w), (want, want_w) = _torch_and_ours(m, q, k, v, **kw)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=str(kw))
        if want_w is None:
            assert got_w is None
        else:
            torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=1e-10, msg=str(kw))


def test_separate_projections_and_unbatched_inputs():
    m = _mha(kdim=6, vdim=3)
    q, k, v = _rand(L, B, E), _rand(S, B, 6, seed=2), _rand(S, B, 3, seed=3)
    (got, got_w), (want, want_w) = _torch_and_ours(m, q, k, v)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=1e-10)
    m = _mha()
    x = _rand(L, E)
    (got, got_w), (want, want_w) = _torch_and_ours(m, x, x, x, key_padding_mask=torch.tensor([0, 0, 0, 1, 0]).bool())
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=1e-10)


def test_recorded_probabilities_are_the_attention():
    m = _mha(batch_first=True)
    x = _rand(B, L, E)
    seen = []
    _, w = mha_module_forward(m, seen.append, x, x, x, average_attn_weights=False)
    assert len(seen) == 1 and seen[0].shape == (B, H, L, L)
    torch.testing.assert_close(seen[0], w, atol=0, rtol=0)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(B, H, L, dtype=torch.float64))


def test_scope_decomposes_multihead_attention_by_its_rules(no_stabiliser):
    """In the LRP scope, ``nn.MultiheadAttention`` (batch_first, a causal -inf
    mask plus a finite one) gives the relevance / gradient of the same
    attention written as plain torch calls, for every rule set."""
    m = _mha(batch_first=True)
    x = _rand(B, L, E)
    R = _rand(B, L, E, seed=7)
    causal = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    finite = _rand(L, L, seed=8)
    d = E // H

    def explicit(t):
        wq, wk, wv = m.in_proj_weight.chunk(3)
        bq, bk, bv = m.in_proj_bias.chunk(3)
        q, k, v = (F.linear(t, w, b).reshape(B, L, H, d).transpose(1, 2) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
        scores = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(d))
        scores = (scores + finite).masked_fill(torch.isinf(causal), float("-inf"))
        out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, L, E)
        return F.linear(out, m.out_proj.weight, m.out_proj.bias)

    for rule_set in ("TA", "LRP", "AttnLRP", "CPLRP"):
        for relevance in (False, True):
            got = []
            for fn in (lambda t: m(t, t, t, attn_mask=causal + finite, need_weights=False)[0], explicit):
                leaf = x.clone().requires_grad_(True)
                with relevance_scope(m, rule_set) as state:
                    y = fn(leaf)
                state.relevance = relevance
                got.append((y.detach(), torch.autograd.grad(y, leaf, R)[0], list(state.attentions)))
            (y1, r1, att), (y2, r2, _) = got
            torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-10, msg=rule_set)
            torch.testing.assert_close(r1, r2, atol=1e-12, rtol=1e-10, msg=f"{rule_set} relevance={relevance}")
            assert len(att) == 1 and att[0][1].shape == (B, H, L, L)
            assert bool((att[0][1][..., causal.isinf()] == 0).all())
    assert all(p.requires_grad for p in m.parameters())  # flags restored


def test_what_it_cannot_decompose_is_refused_in_one_line():
    m = _mha(add_bias_kv=True, batch_first=True)
    x = _rand(B, L, E).requires_grad_(True)
    with pytest.raises(UnsupportedOperationError, match="bias_k") as err:
        with relevance_scope(m, "TA"):
            m(x, x, x)
    assert "\n" not in str(err.value)
    m = _mha(dropout=0.5, batch_first=True).train()
    with pytest.raises(ValueError, match="attention dropout"):
        mha_module_forward(m, None, x, x, x)
    with pytest.raises(ValueError, match="is_causal without"):
        multi_head_attention(x, x, x, E, H, m.in_proj_weight, None, None, None, False, 0.0, m.out_proj.weight, None,
                             is_causal=True)
