"""The one registry of explanation methods, shared by every model and CLI.

A CLI offers ``METHOD_CHOICES`` as ``--method`` choices; code calls
:func:`resolve_method` to turn a name or alias into a :class:`Method`.
What each method computes is in ../shared/METHODS.md sections 2 and 3; the
model-specific ``explain`` functions implement it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["EVAL_START_LAYER", "Index", "resolve_index", "Method", "METHODS", "ALIASES", "METHOD_NAMES", "METHOD_CHOICES", "resolve_method", "UnknownMethodError"]


@dataclass(frozen=True)
class Method:
    """One explanation method and what it needs from the model.

    Attributes
    ----------
    name:
        Canonical name (the ``--method`` value).
    label:
        Name used in the papers' tables.
    rule_set:
        LRP rule set of its relevance pass (``"TA"``/``"LRP"``), or None
        when it needs no relevance pass.
    needs_grad:
        Whether it needs the attention gradients d y_c / d A.
    class_specific:
        False for methods whose map ignores the explained class.
    """

    name: str
    label: str
    rule_set: Optional[str]
    needs_grad: bool
    class_specific: bool


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("transformer_attribution", "Transformer attribution (ours)", "TA", True, True),
    Method("generic_attribution", "Generic attention attribution", None, True, True),
    Method("rollout", "Rollout", None, False, False),
    Method("attn_last_layer", "Raw attention", None, False, False),
    Method("attn_gradcam", "GradCAM", None, True, True),
    Method("lrp_last_layer", "Partial LRP", "LRP", False, True),
    Method("lrp", "LRP", "LRP", False, True),
)}

ALIASES: Dict[str, str] = {
    "full_lrp": "lrp",
    "partial_lrp": "lrp_last_layer",
    "last_attn": "attn_last_layer",
}

EVAL_START_LAYER: Dict[str, int] = {"transformer_attribution": 1, "rollout": 1}
"""start_layer the paper's evaluation scripts use (METHODS.md section 2); 0 for the rest."""

METHOD_NAMES: Tuple[str, ...] = tuple(METHODS)
METHOD_CHOICES: Tuple[str, ...] = METHOD_NAMES + tuple(ALIASES)


class UnknownMethodError(ValueError):
    pass


def resolve_method(name: str) -> Method:
    """The :class:`Method` for a canonical name or alias; an unknown name
    raises :class:`UnknownMethodError` listing the valid ones."""
    key = ALIASES.get(name, name)
    try:
        return METHODS[key]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; valid: {', '.join(METHOD_NAMES)} "
            f"(aliases: {', '.join(f'{a}={t}' for a, t in ALIASES.items())})"
        ) from None


Index = Union[None, int, Sequence[int], Tensor]


def resolve_index(index: Index, logits: Tensor) -> Tensor:
    """The explained class per sample, (B,) long: argmax of ``logits`` when
    ``index`` is None, else ``index`` (an int for every sample, or one per
    sample).  Out-of-range classes raise ValueError."""
    B, C = logits.shape
    if index is None:
        return logits.argmax(dim=-1)
    target = torch.as_tensor(index, device=logits.device).reshape(-1)
    if target.is_floating_point() and not bool((target == target.round()).all()):
        raise ValueError(f"class index {target.tolist()} is not a whole number")
    target = target.long()
    if target.numel() == 1:
        target = target.expand(B)
    if target.numel() != B:
        raise ValueError(f"index holds {target.numel()} classes for a batch of {B}")
    if bool(((target < 0) | (target >= C)).any()):
        raise ValueError(f"class index {target.tolist()} out of range: the model has {C} classes (0..{C - 1})")
    return target
