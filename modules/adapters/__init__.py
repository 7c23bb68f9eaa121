"""Model adapters: one small class per model family.

An adapter knows how to feed a family's inputs, where its attention is
recorded (natively in the project's LRP copies, by scoped hooks in models
as timm or Hugging Face built them), which row its head reads, its prefix
tokens and its patch grid.  It turns one call into a
:class:`~modules.trace.Trace`; the methods never see the model.

Adapters register themselves with :func:`register_adapter`, in the order
they should be tried; :func:`adapter_for` picks the first that matches.
:func:`supported_models` lists them (the README's list is generated from it).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, ClassVar, Collection, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.aggregation import check_start_layer
from modules.attention_capture import UnsupportedModelError
from modules.methods import ATTENTION_METHODS, METHOD_NAMES, Index, Method, resolve_index, resolve_method
from modules.trace import AttentionCall, Coupled, Stream, Trace, last_call

__all__ = ["Adapter", "CoupledLRP", "register_adapter", "adapter_for", "supported_models", "copies_offering",
           "UnsupportedModelError", "UnsupportedMethodError", "InputsError", "model_device"]


class UnsupportedMethodError(ValueError):
    """The method needs something this model cannot give (an LRP pass)."""


class InputsError(ValueError):
    """Inputs that do not fit the model (one-line message)."""


_REGISTRY: List[Type["Adapter"]] = []


def register_adapter(cls: Type["Adapter"]) -> Type["Adapter"]:
    """Class decorator: make ``cls`` available to :func:`adapter_for`."""
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def _load_library_adapters() -> None:
    """Register the timm / Hugging Face adapters once their library is in use
    (a model of theirs implies the library was imported)."""
    if "timm" in sys.modules:
        import modules.adapters.timm_models  # noqa: F401
    if "transformers" in sys.modules:
        import modules.adapters.hf_models  # noqa: F401
        import modules.adapters.lxmert  # noqa: F401
        import modules.adapters.generation  # noqa: F401
        import modules.adapters.detr  # noqa: F401
        import modules.adapters.vlm  # noqa: F401
    if "open_clip" in sys.modules:
        import modules.adapters.open_clip_models  # noqa: F401
    if "transformers" in sys.modules:
        import modules.adapters.generic_hf  # noqa: F401
    if "timm" in sys.modules or "transformers" in sys.modules:
        try:
            import modules.adapters.swin  # noqa: F401
        except ImportError:  # pragma: no cover - written in its own step
            pass


def adapter_for(model: nn.Module) -> "Adapter":
    """The adapter of ``model``'s family; :class:`UnsupportedModelError` naming
    what is supported otherwise."""
    _load_library_adapters()
    for cls in sorted(_REGISTRY, key=lambda c: c.fallback):  # the generic path only where no adapter applies
        if cls.matches(model):
            return cls(model)
    raise UnsupportedModelError(f"unsupported model {type(model).__name__}; supported: "
                                + "; ".join(f"{c.family} ({', '.join(c.examples)})" for c in _ordered()))


def _ordered() -> List[Type["Adapter"]]:
    """The registered adapters, copies first, then by family name (a stable order for lists)."""
    return sorted(_REGISTRY, key=lambda c: (not c.copy, c.family))


def supported_models() -> List[Tuple[str, Sequence[str], Tuple[str, ...], str]]:
    """(family, example classes, methods, notes) of every registered adapter."""
    import timm  # noqa: F401
    import transformers  # noqa: F401
    _load_library_adapters()
    import modules.adapters.open_clip_models  # noqa: F401  (listed whether or not open_clip is installed)
    try:
        import baselines.ViT.ViT_LRP  # noqa: F401  (the copies register their own adapters)
        import BERT_explainability.modules.BERT.BertForSequenceClassification  # noqa: F401
    except ImportError:  # pragma: no cover - installed without the copies
        pass
    return [(c.family, tuple(c.examples), c.method_names(), c.notes) for c in _ordered()]


def copies_offering(method: str) -> List[str]:
    """The families (model copies and unmodified families) that run ``method``."""
    supported_models()
    return [c.family for c in _ordered() if method in c.method_names()]


@functools.lru_cache(maxsize=None)
def _transformers_classes(cls: type) -> Tuple[str, ...]:
    """Names of the classes of ``cls``'s MRO defined by transformers (once per class)."""
    return tuple(c.__name__ for c in cls.__mro__ if c.__module__.startswith("transformers."))


def hf_class(model: nn.Module, names: Collection[str]) -> Optional[str]:
    """The first class of ``model``'s MRO from transformers whose name is in
    ``names`` (subclasses of a supported class included), else None: the
    one Hugging Face class lookup of the adapters."""
    for name in _transformers_classes(type(model)):
        if name in names:
            return name
    return None


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Adapter:
    """Base class: how one model family is explained.

    Subclasses set the class attributes and implement :meth:`matches`,
    :meth:`depths`, :meth:`prepare`, :meth:`recording`, :meth:`forward` and
    :meth:`streams` (and :meth:`relprop` for copies).
    """

    family: ClassVar[str] = ""
    examples: ClassVar[Sequence[str]] = ()
    copy: ClassVar[bool] = False  # True: an LRP copy (every method)
    fallback: ClassVar[bool] = False  # True: the generic path, tried after every other adapter
    notes: ClassVar[str] = ""
    options: ClassVar[Tuple[str, ...]] = ()  # explain() options the adapter takes (see configure)

    def __init__(self, model: nn.Module):
        self.model = model
        self.settings: Dict[str, Any] = {}

    def configure(self, **options: Any) -> None:
        """Options of :func:`modules.explain.explain` that change how the
        streams are built (names in :attr:`options`, accepted by the method
        too); kept in ``self.settings`` for :meth:`streams`."""
        self.settings.update(options)

    # -- what the family is --------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    lrp: ClassVar[bool] = False  # True: an unmodified family the LRP scope covers (every method)
    no_lrp_because: ClassVar[str] = ""  # why a family without the LRP methods lacks them (said when one is asked)

    @classmethod
    def method_names(cls) -> Tuple[str, ...]:
        return METHOD_NAMES if cls.copy or cls.lrp else ATTENTION_METHODS

    def methods(self) -> Tuple[str, ...]:
        return self.method_names()

    def check_method(self, method: Union[str, Method], options: Dict[str, Any]) -> Method:
        """The one check of a method and its options, for every entry point
        (:func:`modules.explain.explain`, detections, generation): the
        :class:`Method`, or a one-line error — an option the method does not
        take (ValueError), a method this family does not run
        (:class:`UnsupportedMethodError`, naming what it runs and, for an
        LRP method, the families that offer it)."""
        m = resolve_method(method)
        unknown = sorted(set(options) - set(m.options))
        if unknown:
            raise ValueError(f"{m.name} takes no option {', '.join(unknown)}"
                             + (f" (it takes {', '.join(m.options)})" if m.options else ""))
        if m.name not in self.methods():
            name = type(self.model).__name__
            because = f": {self.no_lrp_because}" if self.no_lrp_because else ""
            why = (f" needs an LRP pass, which {name} does not offer yet{because} (families that do: "
                   f"{'; '.join(copies_offering(m.name))})" if m.needs_copy else f" does not run on {name}")
            raise UnsupportedMethodError(f"{m.name}{why}; {name} supports {', '.join(self.methods())}")
        return m

    def depths(self) -> Dict[str, int]:
        """Number of self-attention layers of each stream (for the start-layer check)."""
        raise NotImplementedError

    # -- one call ------------------------------------------------------------
    def prepare(self, inputs: Any, index: Index) -> Dict[str, Any]:
        """Check the inputs and build what :meth:`forward` feeds (on the model's device)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def recording(self, method: Method) -> Iterator[Any]:
        """A context in which the forward pass records its attention calls."""
        raise NotImplementedError
        yield  # pragma: no cover

    def forward(self, feed: Dict[str, Any], method: Method) -> Any:
        raise NotImplementedError

    def score(self, feed: Dict[str, Any], output: Any, index: Index) -> Tuple[Tensor, Tensor, Tensor]:
        """(logits (B, C), target (B,), one-hot seed (B, C)) of the explained output."""
        logits = output if isinstance(output, Tensor) else output.logits
        if logits.dim() != 2:
            raise RuntimeError(f"{type(self.model).__name__} returned logits of shape {tuple(logits.shape)}, "
                               "not (B, classes)")
        target = resolve_index(index, logits)
        return logits, target, F.one_hot(target, logits.shape[-1]).to(logits.dtype)

    def streams(self, feed: Dict[str, Any], recorder: Any) -> Dict[str, Stream]:
        raise NotImplementedError

    def relprop(self, seed: Tensor, stop: Optional[int], feed: Dict[str, Any], recorder: Any,
                streams: Dict[str, Stream], logits: Optional[Tensor] = None) -> Optional[Tensor]:
        """LRP pass from the logits, down to attention layer ``stop`` (None:
        to the input).  Fills each call's ``relevance`` and returns the input
        relevance as a pixel map (B, H, W) or a token row (B, N), or None when
        stopped early.  ``logits``: the forward's output with its graph (the
        scope's relevance pass runs backward from it)."""
        raise NotImplementedError

    def forward_scope(self, method: Method, feed: Dict[str, Any], recorder: Any) -> Any:
        """A context around :meth:`forward` only (the LRP scope of unmodified
        models; nothing for the copies)."""
        return contextlib.nullcontext()

    def relevance_pass(self, recorder: Any) -> Any:
        """A context in which backward passes carry relevance (or a rule
        set's modified gradient) instead of the gradient."""
        return contextlib.nullcontext()

    def gradient_relevance(self, feed: Dict[str, Any], leaf: Tensor, grad: Tensor) -> Tensor:
        """Input relevance of a gradient rule set (copies only): the input
        ``leaf`` times its gradient, summed over channels / the hidden size."""
        raise NotImplementedError

    # -- the template --------------------------------------------------------
    def record(self, inputs: Any, method: Method, index: Index, start_layer: Optional[int]) -> Trace:
        """Forward pass, the gradients and relevance ``method`` needs, as a :class:`Trace`."""
        feed = self.prepare(inputs, index)
        with self.recording(method) as recorder, torch.set_grad_enabled(
                method.needs_grad or method.input_gradient or (method.rule_set is not None and not self.copy)):
            with self.forward_scope(method, feed, recorder):
                output = self.forward(feed, method)
            logits, target, one_hot = self.score(feed, output, index)
            streams = self.streams(feed, recorder)
            if isinstance(streams, Coupled):
                return self._record_coupled(streams, method, logits, target, one_hot, recorder)
            needed: List[AttentionCall] = []
            stops: List[int] = []
            starts: Dict[str, int] = {}
            for name, stream in streams.items():
                calls = stream.calls
                if not calls:
                    raise RuntimeError(f"{type(self.model).__name__}: no attention was recorded")
                start = starts[name] = method.default_start_layer(stream) if start_layer is None else start_layer
                check_start_layer(start, len(calls))
                cross = [op for op in stream.ops if isinstance(op, AttentionCall) and not op.is_self]
                chosen = [last_call(stream)] if method.last_layer_only else calls[start:] + cross
                needed += chosen
                stops.append(len(calls) - 1 if method.last_layer_only else start)
            score = (logits * one_hot).sum(dim=-1)
            # an LRP scope around the forward without a rule set of the method's own:
            # generic_attribution(use_lrp=True) on the single-stream VLMs (CoupledLRP)
            lrp = method.rule_set is not None or getattr(recorder, "scope", None) is not None
            if method.needs_grad:
                # per-sample seed: one-hot(c_b) in row b, so sample b gets d y_{b,c_b} / d A
                probs = [c.probs for c in needed]
                if not score.requires_grad or not all(p.requires_grad for p in probs):
                    raise RuntimeError("the attention probabilities carry no autograd graph: run outside "
                                       "torch.no_grad() / torch.inference_mode()")
                grads = torch.autograd.grad(score.sum(), probs, allow_unused=True, retain_graph=lrp)
                for call, g in zip(needed, grads):
                    call.grad = torch.zeros_like(call.probs) if g is None else g.detach()
            input_relevance = None
            if method.input_gradient:
                # one modified backward pass: the relevance is input x gradient (METHODS.md section 9)
                leaf = feed["_leaf"]  # a tensor (copies), or a dict by stream
                leaves = list(leaf.values()) if isinstance(leaf, dict) else [leaf]
                with self.relevance_pass(recorder):
                    grads = torch.autograd.grad(score.sum(), leaves, allow_unused=True)
                grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
                if isinstance(leaf, dict):
                    input_relevance = self.gradient_relevance(feed, {k: v.detach() for k, v in leaf.items()}, grads)
                else:
                    input_relevance = self.gradient_relevance(feed, leaf.detach(), grads[0])
            elif lrp:
                stop = None if method.to_input else min(stops)
                with torch.no_grad():
                    input_relevance = self.relprop(one_hot.detach(), stop, feed, recorder, streams, logits=logits)
            for stream in streams.values():
                for op in stream.ops:
                    if isinstance(op, AttentionCall):
                        op.probs = op.probs.detach()
        return Trace(logits.detach(), target, score.detach(), streams, input_relevance, starts=starts)

    def _record_coupled(self, coupled: Coupled, method: Method, logits: Tensor, target: Tensor,
                        one_hot: Tensor, recorder: Any = None) -> Trace:
        """Gradients and, when the forward ran in an LRP scope, the relevance
        of every call of a coupled trace (inside the recording context).

        The relevance pass starts at the explained logit with value 1 (the
        published ``model.relprop(one_hot_vector)``) and reads R_A at every
        recorded probability tensor, the gradient pass ``d y_c / d A`` from
        the same forward (the scope's switches read ``state.relevance``)."""
        if method.compute_coupled is None:
            raise UnsupportedMethodError(f"{method.name} has no definition for {type(self.model).__name__}'s "
                                         f"coupled streams")
        score = (logits * one_hot).sum(dim=-1)
        calls = coupled.calls
        lrp = getattr(recorder, "scope", None) is not None
        probs = [c.probs for c in calls]
        if (method.needs_grad or lrp) and (not score.requires_grad or not all(p.requires_grad for p in probs)):
            raise RuntimeError("the attention probabilities carry no autograd graph: run outside "
                               "torch.no_grad() / torch.inference_mode()")
        if method.needs_grad:
            grads = torch.autograd.grad(score.sum(), probs, allow_unused=True, retain_graph=lrp)
            for call, g in zip(calls, grads):
                call.grad = torch.zeros_like(call.probs) if g is None else g.detach()
        if lrp:
            with self.relevance_pass(recorder):
                rel = torch.autograd.grad(logits, probs, one_hot.detach().to(logits.dtype), allow_unused=True)
            for call, r in zip(calls, rel):
                call.relevance = torch.zeros_like(call.probs) if r is None else r.detach()
        for call in calls:
            call.probs = call.probs.detach()
        return Trace(logits.detach(), target, score.detach(), {}, None, coupled)


class CoupledLRP:
    """Mixin of the adapters of the ICCV 2021 models (coupled streams: LXMERT,
    DETR; single stream: VisualBERT, and ViLT as ours) whose LRP pass is
    the scope of :mod:`modules.lrp_scope` on the unmodified model: the
    methods with an ICCV definition that need relevance
    (:data:`modules.methods.COUPLED_LRP_METHODS`), the option ``use_lrp`` of
    ``generic_attribution`` ("ours with LRP"), and the rule set the
    published code uses (:attr:`Method.coupled_rule_set`, TA: one
    ``layers_ours`` per model, VisualBERT's ``BERT_ours`` included)."""

    options: ClassVar[Tuple[str, ...]] = ("use_lrp",)

    @classmethod
    def method_names(cls) -> Tuple[str, ...]:
        from modules.methods import COUPLED_LRP_METHODS

        return tuple(m for m in METHOD_NAMES if m in ATTENTION_METHODS or m in COUPLED_LRP_METHODS)

    def configure(self, **options: Any) -> None:
        use = options.get("use_lrp", False)
        if not isinstance(use, bool):
            raise ValueError(f"use_lrp={use!r} is not True or False")
        super().configure(**options)

    def coupled_rule_set(self, method: Method) -> Optional[str]:
        from modules.methods import COUPLED_LRP_RULE_SET

        if method.coupled_rule_set is not None:
            return method.coupled_rule_set
        if method.rule_set is not None:
            return method.rule_set
        if self.settings.get("use_lrp"):
            if method.name != "generic_attribution":  # pragma: no cover - explain() refuses it before
                raise ValueError(f"use_lrp applies to generic_attribution, not {method.name}")
            return COUPLED_LRP_RULE_SET
        return None

    def forward_scope(self, method: Method, feed: Dict[str, Any], recorder: Any) -> Any:
        import dataclasses

        rule_set = self.coupled_rule_set(method)
        return super().forward_scope(dataclasses.replace(method, rule_set=rule_set), feed, recorder)


# --------------------------------------------------------------------------
# Small shared pieces of the adapters
# --------------------------------------------------------------------------
def feed_dict(inputs: Any, main_key: str, device: torch.device) -> Dict[str, Any]:
    """The model's keyword arguments: a tensor becomes ``{main_key: tensor}``,
    a mapping (a Hugging Face ``BatchEncoding`` / ``BatchFeature``) a dict;
    tensors move to ``device``."""
    from collections.abc import Mapping

    if isinstance(inputs, Tensor):
        feed = {main_key: inputs}
    elif isinstance(inputs, Mapping):
        feed = dict(inputs)
    else:
        raise InputsError(f"inputs must be a tensor or the dict a Hugging Face processor/tokenizer returns, "
                          f"got {type(inputs).__name__}")
    if not isinstance(feed.get(main_key), Tensor):
        raise InputsError(f"inputs hold no {main_key!r} tensor (keys: {', '.join(map(str, feed)) or 'none'})")
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in feed.items()}


def check_images(images: Tensor, patch: Tuple[int, int], what: str) -> Tuple[int, int]:
    """(gh, gw) of a (B, C, H, W) batch whose sides are multiples of the patch size."""
    if images.dim() != 4:
        raise InputsError(f"{what}: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    H, W = images.shape[-2:]
    ph, pw = patch
    if H % ph or W % pw:
        raise InputsError(f"{what}: image size {H}x{W} is not a multiple of the patch size {ph}x{pw}")
    return H // ph, W // pw


def one_hot_rows(batch: int, tokens: int, row: Any, device: torch.device, dtype=torch.float32) -> Tensor:
    """(B, N) read-out weights with a single 1 per sample at ``row`` (an int
    or a (B,) tensor of positions)."""
    w = torch.zeros(batch, tokens, dtype=dtype, device=device)
    rows = torch.as_tensor(row, device=device).long().reshape(-1).expand(batch)
    w[torch.arange(batch, device=device), rows] = 1
    return w


def column_mask(batch: int, tokens: int, first: int, device: torch.device) -> Tensor:
    """(B, N) True from column ``first`` on (the patch columns after the prefix tokens)."""
    cols = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    cols[:, first:] = True
    return cols


def check_text(feed: Dict[str, Any], what: str) -> Tensor:
    """Validate ``input_ids`` (B, N) and ``attention_mask`` (default: all 1)
    in ``feed`` (filled in place); returns the (B, N) bool mask of real tokens."""
    ids = feed["input_ids"]
    if ids.dim() != 2:
        raise InputsError(f"{what}: input_ids must be (B, N), got shape {tuple(ids.shape)}")
    mask = feed.get("attention_mask")
    if mask is None:
        mask = feed["attention_mask"] = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise InputsError(f"{what}: attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    real = mask.bool()
    if not bool(real.any(dim=1).all()):
        raise InputsError(f"{what}: a sample has no token with attention_mask = 1")
    return real


def supported_models_markdown() -> str:
    """The README's table of supported models, generated from the registered
    adapters (``python -m modules.adapters`` prints it)."""
    from modules.methods import METHODS

    lines = ["| family | classes | methods | notes |", "|---|---|---|---|"]
    for family, examples, methods, notes in supported_models():
        names = "every method" if set(methods) == set(METHODS) else ", ".join(f"`{m}`" for m in methods)
        lines.append(f"| {family} | {', '.join(examples)} | {names} | {notes} |")
    return "\n".join(lines) + "\n"
