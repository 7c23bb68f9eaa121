"""One explanation's passes, shared by every model copy's ``explain``.

:func:`record` runs the forward pass inside an :func:`~modules.layers.explanation_state`,
takes the attention gradients d y_c / d A_l with a per-sample one-hot seed
and runs the relevance pass that the method needs; the model-specific
``explain`` then only combines what was recorded (METHODS.md sections 2, 3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.layers import explanation_state
from modules.methods import Index, Method, resolve_index

__all__ = ["Recording", "record"]


@dataclass
class Recording:
    """What one explanation recorded (all detached)."""

    logits: Tensor
    target: Tensor  # (B,) explained class per sample
    attentions: List[Tensor]  # A_l, (B, H, N, N), l = 0 .. L-1
    grads: Dict[int, Tensor] = field(default_factory=dict)  # l -> d y_c / d A_l
    relevance: Dict[int, Tensor] = field(default_factory=dict)  # l -> Rattn_l
    input_relevance: Optional[Tensor] = None  # what relprop returned (full LRP only)


def record(method: Method, forward: Callable[[], Tensor],
           relprop: Callable[[Tensor, Optional[int]], Optional[Tensor]],
           depth: int, start_layer: int, index: Index = None) -> Recording:
    """Forward pass, attention gradients and relevance pass for ``method``.

    Parameters
    ----------
    forward:
        Runs the model and returns the logits (B, classes).  It must make the
        attention maps part of an autograd graph when gradients are enabled
        (feed a leaf that requires grad), so frozen models work too.
    relprop:
        ``relprop(R, stop)`` propagates the output relevance R; with ``stop``
        = l it may end once layer l's attention relevance is known.
    depth, start_layer:
        Number of attention layers; first layer whose gradients and
        relevance the method needs.
    """
    last = depth - 1
    with explanation_state(rule_set=method.rule_set or "TA", save_inputs=method.rule_set is not None) as state:
        with torch.set_grad_enabled(method.needs_grad):
            logits = forward()
        target = resolve_index(index, logits)
        one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        attn = list(state.attentions)
        if len(attn) != depth:
            raise RuntimeError(f"recorded {len(attn)} attention maps for {depth} layers")
        out = Recording(logits.detach(), target, [a.detach() for a in attn])
        if method.needs_grad:
            layers = [last] if method.name == "attn_gradcam" else list(range(start_layer, depth))
            # per-sample seed: one-hot(c_b) in row b, so sample b gets d y_{b,c_b} / d A
            grads = torch.autograd.grad((logits * one_hot).sum(), [attn[i] for i in layers])
            out.grads = dict(zip(layers, grads))
        if method.rule_set is not None:
            stop = {"transformer_attribution": start_layer, "lrp_last_layer": last}.get(method.name)
            with torch.no_grad():
                out.input_relevance = relprop(one_hot, stop)
            out.relevance = {i: state.attention_relevance[mod] for i, mod in enumerate(state.attention_modules)
                             if mod in state.attention_relevance}
    return out
