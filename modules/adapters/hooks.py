"""The adapter base for models as timm or Hugging Face built them, unmodified.

Attention is recorded by scoped hooks (:func:`modules.attention_capture.capture_attention`):
inside the context the model runs in eval mode with its attention computed
explicitly (timm ``fused_attn`` off, Hugging Face ``eager``), every
attention module's probabilities are recorded with their graph, and on exit
every hook, flag and implementation is put back.  Subclasses say which
modules attend (:meth:`HookAdapter.attention_layers`), how to feed inputs and
how the head reads the tokens.
"""
from __future__ import annotations

import contextlib
from functools import cached_property
from typing import Any, Dict, Iterator, List, Optional, Sequence

from torch import nn

from modules.adapters import Adapter
from modules.attention_capture import AttentionCapture, AttentionLayer, AttentionRecord, capture_attention
from modules.methods import Method
from modules.trace import AttentionCall

__all__ = ["HookAdapter"]


class HookAdapter(Adapter):
    """An unmodified model: attention and gradients only (no LRP pass)."""

    copy = False
    library = "huggingface"

    @cached_property
    def layers(self) -> List[AttentionLayer]:
        return self.attention_layers()

    def attention_layers(self) -> List[AttentionLayer]:
        raise NotImplementedError

    def stream_of(self, name: str) -> str:
        """The stream of the tokens an attention module attends over."""
        return "main"

    def layer_calls(self) -> Dict[str, int]:
        """Attention calls per stream in one forward pass (a module shared
        by several layers, as in ALBERT, counts once per call)."""
        counts: Dict[str, int] = {}
        for layer in self.layers:
            if not layer.cross:
                s = self.stream_of(layer.name)
                counts[s] = counts.get(s, 0) + self.calls_per_module(layer)
        return counts

    def calls_per_module(self, layer: AttentionLayer) -> int:
        return 1

    def depths(self) -> Dict[str, int]:
        return self.layer_calls()

    @contextlib.contextmanager
    def recording(self, method: Method) -> Iterator[AttentionCapture]:
        with capture_attention(self.model, layers=self.layers, family=self.library) as cap:
            yield cap

    def calls(self, cap: AttentionCapture, prefix: Optional[str] = None) -> List[AttentionCall]:
        """The recorded calls (of the modules under ``prefix``), in forward order."""
        records: Sequence[AttentionRecord] = cap.select(prefix)
        out = []
        for r in records:
            s = self.stream_of(r.name)
            out.append(AttentionCall(r.name, r.probs, s, s))
        expected = sum(n for s, n in self.layer_calls().items()
                       if prefix is None or any(self.stream_of(layer.name) == s and layer.name.startswith(prefix)
                                                for layer in self.layers))
        self_calls = [c for c in out if c.is_self]
        if len(self_calls) != expected:
            raise RuntimeError(f"{type(self.model).__name__}: recorded {len(self_calls)} attention maps for "
                               f"{expected} attention layers")
        return out


def module_path(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise KeyError(type(module).__name__)
