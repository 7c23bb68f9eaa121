"""The adapter base of the project's LRP model copies.

A copy records its attention natively: inside an
:func:`~modules.layers.explanation_state` each attention module appends its
probabilities (and itself) to the state, and ``relprop`` leaves each
module's attention relevance there.  Subclasses (next to each copy, e.g.
``baselines/ViT/ViT_LRP.py``) say how to feed inputs, how to run ``relprop``
and how the head reads the tokens.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

from modules.adapters import Adapter
from modules.layers import ExplanationState, explanation_state
from modules.methods import Method
from modules.trace import AttentionCall, Stream

__all__ = ["CopyAdapter"]


class CopyAdapter(Adapter):
    """Adapter of a model copy built from :mod:`modules.layers` (every method)."""

    copy = True
    stream_name = "main"
    attention_prefix = "layers"

    @contextlib.contextmanager
    def recording(self, method: Method) -> Iterator[ExplanationState]:
        relprop = method.rule_set is not None and not method.input_gradient
        with explanation_state(rule_set=method.rule_set or "TA", save_inputs=relprop) as state:
            yield state

    def calls(self, state: ExplanationState) -> List[AttentionCall]:
        """One :class:`AttentionCall` per recorded attention module call, in forward order."""
        depth = sum(self.depths().values())
        if len(state.attentions) != depth:
            raise RuntimeError(f"recorded {len(state.attentions)} attention maps for {depth} layers")
        s = self.stream_name
        return [AttentionCall(f"{self.attention_prefix}.{i}", a, s, s) for i, a in enumerate(state.attentions)]

    def fill_relevance(self, state: ExplanationState, streams: Dict[str, Stream]) -> None:
        """Copy each attention module's relevance from the state onto its call."""
        calls = [c for stream in streams.values() for c in stream.calls]
        for call, module in zip(calls, state.attention_modules):
            call.relevance = state.attention_relevance.get(module)

    def run_relprop(self, seed: Any, stop: Any, feed: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def relprop(self, seed, stop, feed, recorder, streams, logits=None):
        out = self.run_relprop(seed, stop, feed)
        self.fill_relevance(recorder, streams)
        return out
