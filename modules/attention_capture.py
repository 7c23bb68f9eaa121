"""Record the self-attention probabilities of an unmodified timm or Hugging Face model.

The generic method (../shared/METHODS.md section 2, ``generic_attribution``)
needs every block's attention probabilities ``A_l`` (B, H, N, N) and their
gradients ``d score / d A_l``; nothing else.  :func:`capture_attention` gets
them from a model exactly as its library built it:

* **timm** ``VisionTransformer`` (and ``VisionTransformerDistilled``, the
  DeiT models): each block's ``timm.layers.Attention`` computes the
  probabilities only on its unfused path, so ``fused_attn`` is switched off
  inside the context; a forward hook on the block's ``attn_drop`` (applied
  right after the softmax, identity in eval mode) records its output, the
  tensor that multiplies the values.
* **Hugging Face** models: every attention module that the model declares
  under ``_can_record_outputs["attentions"]`` returns ``(output, weights)``;
  with eager attention ``weights`` is the probability tensor that multiplies
  the values.  The attention implementation of every config the model holds
  is set to ``"eager"`` inside the context.  ``output_attentions`` is **not**
  used (and switched off in the configs inside the context): it makes
  transformers install permanent hooks of its own.

Inside the context the model is in eval mode and every parameter requires
grad (so a graph exists even for a frozen model; gradients are taken with
:func:`torch.autograd.grad`, so no ``.grad`` is ever written).  On exit every
hook is removed and the training flags, ``requires_grad`` flags, ``fused_attn``
flags and attention implementations are put back as they were.

Example
-------
>>> with capture_attention(model) as cap:                  # doctest: +SKIP
...     logits = model(images)
...     cap.compute_gradients((logits * one_hot).sum())
...     A, G = cap.attentions(), cap.gradients()
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "AttentionLayer",
    "AttentionRecord",
    "AttentionCapture",
    "UnsupportedModelError",
    "find_attention_layers",
    "capture_attention",
    "hf_attention_specs",
    "hf_attention_layers",
    "dropout_after_softmax_layers",
]

_LOOKED_FOR = (
    "a timm VisionTransformer/VisionTransformerDistilled whose blocks[i].attn are timm.layers.Attention, "
    "or a Hugging Face PreTrainedModel declaring self-attention modules in _can_record_outputs['attentions'] "
    "(e.g. ViT/DeiT image classifiers, BERT/RoBERTa/DistilBERT sequence classifiers, CLIPModel)"
)


class UnsupportedModelError(TypeError):
    """The model holds no self-attention layer this module knows how to record."""


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention layer of a model.

    Attributes
    ----------
    name:
        Dotted module path of the attention module (``"blocks.3.attn"``,
        ``"vit.layers.3.attention"``, ``"text_model.encoder.layers.0.self_attn"``).
    module:
        The attention module itself.
    hook_module:
        The module whose forward hook sees the probabilities (timm: the
        attention's ``attn_drop``; Hugging Face: the attention module).
    index:
        Position of the probabilities in ``hook_module``'s output tuple, or
        None when the output is the probability tensor itself.
    """

    name: str
    module: nn.Module
    hook_module: nn.Module
    index: Optional[int]
    cross: bool = False  # queries from another stream (non-square maps allowed)
    call_kwargs: Optional[dict] = None  # keyword arguments forced on the module's calls (scoped)
    forward: Optional[Callable] = None  # a recording forward that replaces the module's (scoped)


@dataclass
class AttentionRecord:
    """What one call of an attention layer produced.

    ``probs`` is the (B, H, N, N) probability tensor as the forward pass used
    it (part of the autograd graph); ``grad`` is filled by
    :meth:`AttentionCapture.compute_gradients`.
    """

    name: str
    module: nn.Module
    probs: Tensor
    grad: Optional[Tensor] = None


@dataclass
class AttentionCapture:
    """The records of one :func:`capture_attention` context.

    Attributes
    ----------
    family:
        ``"timm"`` or ``"huggingface"``.
    layers:
        Every self-attention layer found, in module order.
    records:
        One :class:`AttentionRecord` per attention call, in forward order.
    """

    family: str
    layers: List[AttentionLayer]
    records: List[AttentionRecord] = field(default_factory=list)

    def select(self, prefix: Optional[str] = None) -> List[AttentionRecord]:
        """Records of the layers whose name starts with ``prefix`` (all when None),
        in forward order (for CLIP: ``"vision_model."`` / ``"text_model."``)."""
        if prefix is None:
            return list(self.records)
        return [r for r in self.records if r.name.startswith(prefix)]

    def attentions(self, prefix: Optional[str] = None) -> List[Tensor]:
        """Attention probabilities (B, H, N, N), detached, in forward order."""
        return [r.probs.detach() for r in self.select(prefix)]

    def gradients(self, prefix: Optional[str] = None) -> List[Tensor]:
        """Their gradients from :meth:`compute_gradients`, in forward order."""
        recs = self.select(prefix)
        if any(r.grad is None for r in recs):
            raise RuntimeError("no gradients yet: call compute_gradients(score) first")
        return [r.grad for r in recs]

    def compute_gradients(self, score: Tensor) -> None:
        """Gradient of the scalar ``score`` with respect to every recorded
        probability tensor (``torch.autograd.grad``: no ``.grad`` is written).

        For per-sample gradients make ``score`` the sum over the batch of one
        value per sample (a one-hot seed per row), as METHODS.md section 2 says.
        An attention map the score does not depend on gets a zero gradient.
        """
        if not self.records:
            raise RuntimeError("no attention was recorded: run the model's forward pass inside the context")
        if score.dim() != 0:
            raise ValueError(f"score must be a scalar (sum the per-sample values), got shape {tuple(score.shape)}")
        probs = [r.probs for r in self.records]
        if not score.requires_grad or not all(p.requires_grad for p in probs):
            raise RuntimeError("the attention probabilities carry no autograd graph: run the forward pass with "
                               "gradients enabled (not under torch.no_grad() or torch.inference_mode())")
        grads = torch.autograd.grad(score, probs, allow_unused=True)
        for r, g in zip(self.records, grads):
            r.grad = torch.zeros_like(r.probs) if g is None else g.detach()


# --------------------------------------------------------------------------
# Finding the attention layers
# --------------------------------------------------------------------------
def _timm_layers(model: nn.Module) -> Optional[List[AttentionLayer]]:
    """The attention layers of a timm ViT, None if ``model`` is no timm ViT."""
    if "timm" not in sys.modules:  # a timm model implies timm was imported
        return None
    from timm.layers import Attention
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return None
    layers = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, Attention) or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise UnsupportedModelError(
                f"{type(model).__name__}: blocks[{i}].attn is {type(attn).__name__}, not timm.layers.Attention "
                f"(looked for {_LOOKED_FOR})")
        layers.append(AttentionLayer(f"blocks.{i}.attn", attn, attn.attn_drop, None))
    return layers


def hf_attention_specs(pretrained: nn.Module) -> list:
    """(target_class, class_name, index, layer_name) for each ``attentions``
    entry of a Hugging Face model's ``_can_record_outputs``."""
    specs = (getattr(pretrained, "_can_record_outputs", None) or {}).get("attentions")
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        specs = [specs]
    out = []
    for s in specs:
        if isinstance(s, type):
            out.append((s, None, 1, None))
        elif isinstance(s, str):
            out.append((None, s, 1, None))
        else:  # transformers' OutputRecorder
            out.append((getattr(s, "target_class", None), getattr(s, "class_name", None),
                        getattr(s, "index", 1), getattr(s, "layer_name", None)))
    return out


def hf_attention_layers(model: nn.Module) -> Optional[List[AttentionLayer]]:
    """The self-attention layers of a Hugging Face model (each sub-model
    uses its own ``_can_record_outputs``, as transformers does), None if
    ``model`` is no Hugging Face model."""
    if "transformers" not in sys.modules:
        return None
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    found: List[AttentionLayer] = []

    def matches(module: nn.Module, name: str, spec) -> bool:
        target, class_name, _, layer_name = spec
        hit = (target is not None and isinstance(module, target)) or \
              (class_name is not None and name.endswith(class_name))
        if hit and layer_name is not None:
            hit = f".{layer_name.strip('.')}." in f".{name}."
        return hit

    def walk(module: nn.Module, name: str, specs: list) -> None:
        for spec in specs:
            if name and matches(module, name, spec):
                found.append(AttentionLayer(name, module, module, spec[2]))
                return  # an attention module holds no further attention modules
        for child_name, child in module.named_children():
            child_path = f"{name}.{child_name}" if name else child_name
            walk(child, child_path, hf_attention_specs(child) if isinstance(child, PreTrainedModel) else specs)

    walk(model, "", hf_attention_specs(model))
    return found


def dropout_after_softmax_layers(model: nn.Module, class_name: str) -> List[AttentionLayer]:
    """Every ``class_name`` module of ``model``, recorded at its ``dropout``
    child, which is applied to the probabilities right after the softmax
    (identity in eval mode): the attention classes that no
    ``_can_record_outputs`` names (DeBERTa-v2, VisualBERT, ViLT).  A module
    without that child is a one-line :class:`UnsupportedModelError`."""
    layers = []
    for name, module in model.named_modules():
        if type(module).__name__ == class_name:
            drop = getattr(module, "dropout", None)
            if not isinstance(drop, nn.Module):
                raise UnsupportedModelError(f"{name} ({class_name}) has no dropout module after its softmax")
            layers.append(AttentionLayer(name, module, drop, None))
    return layers


def find_attention_layers(model: nn.Module) -> Tuple[str, List[AttentionLayer]]:
    """The family (``"timm"``/``"huggingface"``) and self-attention layers of
    ``model``; an unsupported model raises :class:`UnsupportedModelError`
    naming its class and what was looked for."""
    for family, finder in (("timm", _timm_layers), ("huggingface", hf_attention_layers)):
        layers = finder(model)
        if layers is None:
            continue
        if not layers:
            raise UnsupportedModelError(f"{type(model).__name__}: no self-attention layers found "
                                        f"(looked for {_LOOKED_FOR})")
        return family, layers
    raise UnsupportedModelError(f"unsupported model {type(model).__name__}: looked for {_LOOKED_FOR}")


# --------------------------------------------------------------------------
# The context
# --------------------------------------------------------------------------
def _hf_configs(model: nn.Module) -> list:
    """Every Hugging Face config reachable from the model's modules (and
    their sub-configs), each once."""
    from transformers import PretrainedConfig

    seen: dict = {}
    stack = [m.config for m in model.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", None) or {}:
            sub = getattr(cfg, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)
    return list(seen.values())


def _set_and_restore(stack: contextlib.ExitStack, items: Sequence, get: Callable, put: Callable, value) -> None:
    """Set ``put(item, value)`` for every item now, and schedule putting the
    old values back when ``stack`` closes."""
    old = [(item, get(item)) for item in items]

    def restore() -> None:
        for item, v in old:
            put(item, v)

    stack.callback(restore)
    for item in items:
        put(item, value)


@contextlib.contextmanager
def capture_attention(model: nn.Module, eval_mode: bool = True, layers: Optional[Sequence[AttentionLayer]] = None,
                      family: Optional[str] = None) -> Iterator[AttentionCapture]:
    """Record every self-attention layer's probabilities while the context is open.

    Parameters
    ----------
    model:
        A supported timm or Hugging Face model (see :func:`find_attention_layers`).
    eval_mode:
        Run in eval mode (dropout off, as METHODS.md assumes); every module's
        training flag is restored on exit.

    Yields
    ------
    AttentionCapture
        Its ``records`` fill up as the model runs; call
        ``compute_gradients(score)`` before leaving the context.

    On exit the model is exactly as it was: no hook left, training,
    ``requires_grad``, timm ``fused_attn`` and Hugging Face attention
    implementation restored (also when an exception leaves the context).

    ``layers`` (with ``family``) overrides :func:`find_attention_layers`: an
    adapter that knows its model's attention modules passes them here.
    """
    if layers is None:
        family, layers = find_attention_layers(model)
    capture = AttentionCapture(family or "huggingface", list(layers))
    with contextlib.ExitStack() as stack:
        if eval_mode:
            _set_and_restore(stack, list(model.modules()), lambda m: m.training,
                             lambda m, v: setattr(m, "training", v), False)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        _set_and_restore(stack, frozen, lambda p: p.requires_grad, lambda p, v: p.requires_grad_(v), True)
        fused = [layer.module for layer in layers if hasattr(layer.module, "fused_attn")]
        _set_and_restore(stack, fused, lambda m: m.fused_attn, lambda m, v: setattr(m, "fused_attn", v), False)
        if "transformers" in sys.modules:
            configs = _hf_configs(model)
            _set_and_restore(stack, configs, lambda c: c._attn_implementation_internal,
                             lambda c, v: setattr(c, "_attn_implementation_internal", v), "eager")
            # a config asking for attentions/hidden states would make transformers
            # install its own (permanent) capturing hooks during the forward pass
            for attr in ("_output_attentions", "output_hidden_states"):
                _set_and_restore(stack, [c for c in configs if hasattr(c, attr)], lambda c, a=attr: getattr(c, a),
                                 lambda c, v, a=attr: setattr(c, a, v), False)
        for layer in layers:
            if layer.forward is not None:  # a scoped instance attribute, deleted on exit
                layer.module.forward = _bound_recording_forward(capture, layer)
                stack.callback(delattr, layer.module, "forward")
                continue
            if layer.call_kwargs:
                pre = layer.module.register_forward_pre_hook(_kwargs_forcer(layer.call_kwargs), with_kwargs=True)
                stack.callback(pre.remove)
            handle = layer.hook_module.register_forward_hook(_recorder(capture, layer))
            stack.callback(handle.remove)
        yield capture


def _kwargs_forcer(forced: dict) -> Callable:
    def hook(module: nn.Module, args, kwargs):
        return args, {**kwargs, **forced}
    return hook


def _bound_recording_forward(capture: AttentionCapture, layer: AttentionLayer) -> Callable:
    def forward(*args, **kwargs):
        def record(probs: Tensor) -> None:
            capture.records.append(AttentionRecord(layer.name, layer.module, probs))
        return layer.forward(layer.module, record, *args, **kwargs)
    return forward


def _recorder(capture: AttentionCapture, layer: AttentionLayer) -> Callable:
    def hook(module: nn.Module, args, output) -> None:
        probs = output if layer.index is None else output[layer.index]
        if not isinstance(probs, Tensor) or probs.dim() != 4 or (probs.shape[-1] != probs.shape[-2]
                                                                   and not layer.cross):
            got = type(probs).__name__ if not isinstance(probs, Tensor) else f"shape {tuple(probs.shape)}"
            raise RuntimeError(f"{layer.name} ({type(layer.module).__name__}) gave no (B, H, N, N) attention "
                               f"probabilities ({got}); does it use eager attention?")
        capture.records.append(AttentionRecord(layer.name, layer.module, probs))
    return hook
