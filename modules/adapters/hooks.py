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

import torch
from torch import Tensor, nn

from modules.adapters import Adapter, UnsupportedModelError
from modules.attention_capture import AttentionCapture, AttentionLayer, AttentionRecord, capture_attention
from modules.lrp_scope import ScopeState, relevance_scope
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

    # -- LRP on the unmodified model (METHODS.md section 10) -----------------
    @contextlib.contextmanager
    def forward_scope(self, method: Method, feed: Dict[str, Any], recorder: Any) -> Iterator[Optional[ScopeState]]:
        """The LRP scope around the forward of a method with a rule set: the
        explained input made a leaf, the rules attached to the operations."""
        if method.rule_set is None:
            yield None
            return
        state = ScopeState(method.rule_set, gradient=method.needs_grad)  # no gradient pass: no second graph
        recorder.scope = state
        with contextlib.ExitStack() as stack:
            self.attach_input(feed, stack)
            stack.enter_context(relevance_scope(self.model, method.rule_set, state))
            yield state

    def attach_input(self, feed: Dict[str, Any], stack: contextlib.ExitStack) -> None:
        """Make the explained inputs leaves that require grad (``feed["_leaf"]``,
        by stream): the pixels of an image model (``"image"``); for text
        (``"text"``) the output of the model's input embeddings (a scoped
        forward hook), and the tensor entering its encoder is kept in
        ``feed["_encoder_input"]`` (where full LRP's text map is read,
        METHODS.md section 3).  An image-text model has both."""
        leaves: Dict[str, Tensor] = {}
        feed["_leaf"] = leaves
        if isinstance(feed.get("pixel_values"), Tensor):
            leaves["image"] = feed["pixel_values"] = feed["pixel_values"].detach().requires_grad_(True)
        if not isinstance(feed.get("input_ids"), Tensor):
            return

        def make_leaf(module, args, output):
            leaves["text"] = output.detach().requires_grad_(True)
            return leaves["text"]

        stack.callback(self.input_embeddings().register_forward_hook(make_leaf).remove)
        encoder_input = self.encoder_input_module()
        if encoder_input is not None:
            def keep(module, args, output):
                feed["_encoder_input"] = output if isinstance(output, Tensor) else output[0]
            stack.callback(encoder_input.register_forward_hook(keep).remove)

    def input_embeddings(self) -> nn.Module:
        """The word-embedding module (Hugging Face ``get_input_embeddings``; a
        two-tower model's text tower's)."""
        for owner in (self.model, getattr(self.model, "text_model", None)):
            try:
                emb = owner.get_input_embeddings() if owner is not None else None
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(emb, nn.Module):
                return emb
        raise UnsupportedModelError(f"{type(self.model).__name__}: no input embeddings found for the LRP methods")

    def encoder_input_module(self) -> Optional[nn.Module]:
        """The module whose output enters the first layer (Hugging Face:
        ``base_model.embeddings``), None when the word embeddings do."""
        base = getattr(self.model, "base_model", None)
        emb = getattr(base, "embeddings", None)
        return emb if isinstance(emb, nn.Module) else None

    @contextlib.contextmanager
    def relevance_pass(self, recorder: Any) -> Iterator[None]:
        state: ScopeState = recorder.scope
        state.relevance = True
        try:
            yield
        finally:
            state.relevance = False

    def relprop(self, seed, stop, feed, recorder, streams, logits=None):
        """The relevance pass from ``logits`` (seed one-hot, value 1) through
        the scope's rules: each needed attention call's relevance, and the
        input relevance when ``stop`` is None."""
        to_input = stop is None
        needed: List[AttentionCall] = []
        if not to_input:
            for stream in streams.values():
                cross = [op for op in stream.ops if isinstance(op, AttentionCall) and not op.is_self]
                needed += stream.calls[stop:] + [c for c in cross if c not in stream.calls[stop:]]
        inputs = self.inputs_for_relevance(feed) if to_input else {}
        targets = [c.probs for c in needed] + list(inputs.values())
        with self.relevance_pass(recorder):
            got = torch.autograd.grad(logits, targets, seed.to(logits.dtype), allow_unused=True)
        for call, r in zip(needed, got):
            call.relevance = torch.zeros_like(call.probs) if r is None else r
        if not to_input:
            return None
        rel = {k: torch.zeros_like(t) if r is None else r for (k, t), r in zip(inputs.items(), got[len(needed):])}
        return _per_stream({k: r.sum(dim=1) if k == "image" else r.sum(dim=-1) for k, r in rel.items()})

    def inputs_for_relevance(self, feed: Dict[str, Any]) -> Dict[str, Tensor]:
        """Where full LRP reads each stream's input relevance."""
        out = dict(feed["_leaf"])
        if "_encoder_input" in feed:
            out["text"] = feed["_encoder_input"]
        return out

    def gradient_relevance(self, feed, leaf, grad):
        """Input x modified gradient (AttnLRP, CP-LRP): summed over colour
        channels (pixels) or the hidden size (word embeddings)."""
        return _per_stream({k: (x * g).sum(dim=1) if k == "image" else (x * g).sum(dim=-1)
                            for (k, x), g in zip(leaf.items(), grad)})


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


def _per_stream(rel: Dict[str, Tensor]) -> Any:
    """One stream: its tensor; several: the dict (read by stream name)."""
    return next(iter(rel.values())) if len(rel) == 1 else rel

def module_path(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise KeyError(type(module).__name__)
