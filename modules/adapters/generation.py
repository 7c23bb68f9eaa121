"""Generation models, unmodified: explain the logit of one vocabulary id at one decoder position.

Families (Hugging Face, as built):

* **encoder-decoders** — ``BartForConditionalGeneration``,
  ``T5ForConditionalGeneration`` (text to text) and
  ``VisionEncoderDecoderModel`` (image to text, e.g. a ViT encoder with a
  GPT-2 or BERT decoder with cross-attention).  A :class:`~modules.trace.Coupled`
  trace of two streams, ``"source"`` (encoder tokens or image tokens, padding
  from ``attention_mask``) and ``"target"`` (decoder tokens, padding from
  ``decoder_attention_mask``), one group per attention call in forward order:
  every encoder self-attention, then per decoder layer its (causal)
  self-attention and its cross-attention (target -> source).  With
  ``generic_attribution`` this is METHODS_ICCV.md section 4's DETR rule with
  encoder tokens for the image tokens and decoder tokens for the queries
  (METHODS.md section 8, the project's own extension): R_ss <- R_ss + Abar R_ss
  per encoder layer; per decoder layer R_dd <- R_dd + Abar_dd R_dd,
  R_ds <- R_ds + Abar_dd R_ds, then R_ds <- R_ds + nan_to_zero(Rbar_dd^T Abar_ds Rbar_ss).
  Outputs: ``source`` = row t of R_ds (text: (B, S), padding 0; image:
  (B, gh, gw), prefix tokens such as [CLS] take part in the propagation and are
  dropped at the read-out), ``target`` = row t of R_dd (B, T) over the decoder
  input tokens (entry t carries the identity's 1; entries after t are 0 by
  causality, not by masking).
* **decoder-only causal LMs** — ``GPT2LMHeadModel``, ``LlamaForCausalLM``,
  ``Qwen2ForCausalLM``: a Coupled trace with the one stream ``"target"`` (every
  self-attention; the generic rule is R <- R + Abar R, METHODS.md section 8,
  last-token pooling).  The sequence is a prompt followed by a continuation;
  outputs: ``source`` = row t over the prompt's columns, ``target`` = row t
  over the continuation's columns, both (B, N) in the input's columns
  (padding and the other part 0).

The explained value (METHODS.md section 8): the raw logit ``logits[b, t, c]``
of vocabulary id c at decoder position t (the logit that predicts the token
after position t).  Chosen through the inputs and ``index``:

* ``inputs["decoder_input_ids"]`` (encoder-decoders; default: the decoder
  start token alone, i.e. the first generated token is explained);
* ``inputs["position"]``: t, an int or one per sample, counted over the
  sample's real tokens (0 = its first real target token; left padding is
  skipped); default: its last real target token;
* ``inputs["prompt_length"]`` (decoder-only): how many of the sample's real
  tokens are the prompt (the source); default: all of them (the explained
  position's continuation is then empty);
* ``index``: the vocabulary id, an int or one per sample; default: the argmax
  of ``logits[b, t]``, i.e. the id greedy decoding generates there.

Padding: sources right-padded (``attention_mask``); decoder targets
right-padded; decoder-only inputs left- or right-padded (position ids are
computed from the attention mask, as ``generate`` does), so a padded batch
gives each sample's maps.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.adapters import InputsError, check_images, check_text, feed_dict, hf_class, model_device, register_adapter
from modules.adapters.hooks import HookAdapter, module_path
from modules.attention_capture import AttentionLayer, UnsupportedModelError, hf_attention_specs
from modules.methods import resolve_index
from modules.trace import AttentionCall, Coupled, Output

__all__ = ["Seq2SeqAdapter", "CausalLMAdapter", "SEQ2SEQ_CLASSES", "CAUSAL_LM_CLASSES", "GenerationAdapter"]

SEQ2SEQ_CLASSES: Tuple[str, ...] = ("BartForConditionalGeneration", "T5ForConditionalGeneration",
                                    "VisionEncoderDecoderModel")
CAUSAL_LM_CLASSES: Tuple[str, ...] = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")

# the last component of a cross-attention module's path
_CROSS_NAMES = ("encoder_attn", "EncDecAttention", "crossattention")
# attention modules of models that declare none in _can_record_outputs: class -> index of the probabilities
_UNDECLARED = {"BartAttention": 1}
_EXTRA_KEYS = ("position", "prompt_length")


def _specs(pretrained: nn.Module, key: str) -> list:
    """(target_class, class_name, index, layer_name) of ``_can_record_outputs[key]``."""
    records = getattr(pretrained, "_can_record_outputs", None) or {}
    if key == "attentions":
        return hf_attention_specs(pretrained)
    saved = records.get(key)
    if saved is None:
        return []
    # the same conversion as for "attentions", on the cross-attention entry
    holder = type("_Holder", (), {"_can_record_outputs": {"attentions": saved}})()
    return hf_attention_specs(holder)


def _matches(module: nn.Module, name: str, spec) -> bool:
    target, class_name, _, layer_name = spec
    hit = (target is not None and isinstance(module, target)) or (class_name is not None and name.endswith(class_name))
    if hit and layer_name is not None:
        hit = f".{layer_name.strip('.')}." in f".{name}."
    return hit


def generation_layers(model: nn.Module) -> List[AttentionLayer]:
    """Every attention module of a generation model, self- and cross-attention
    (``cross=True``), found from each sub-model's ``_can_record_outputs``
    (``attentions``, ``cross_attentions``), or by class for models that declare
    none (BART: a cross-attention is named ``encoder_attn``)."""
    from transformers import PreTrainedModel

    found: List[AttentionLayer] = []

    def walk(module: nn.Module, name: str, specs: Dict[str, list]) -> None:
        if name:
            for kind in ("cross_attentions", "attentions"):
                for spec in specs[kind]:
                    if _matches(module, name, spec):
                        found.append(AttentionLayer(name, module, module, spec[2], cross=kind == "cross_attentions"))
                        return
            index = _UNDECLARED.get(type(module).__name__)
            if index is not None:
                found.append(AttentionLayer(name, module, module, index,
                                            cross=name.rsplit(".", 1)[-1] in _CROSS_NAMES))
                return
        for child_name, child in module.named_children():
            path = f"{name}.{child_name}" if name else child_name
            walk(child, path, _all_specs(child) if isinstance(child, PreTrainedModel) else specs)

    def _all_specs(m: nn.Module) -> Dict[str, list]:
        return {"attentions": _specs(m, "attentions"), "cross_attentions": _specs(m, "cross_attentions")}

    walk(model, "", _all_specs(model))
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__}: no attention modules found")
    return found


def _positions(value: Any, B: int, lengths: Tensor, what: str, device: torch.device) -> Tensor:
    """(B,) non-negative whole numbers below ``lengths`` (an int for all samples or one per sample)."""
    if isinstance(value, bool):
        raise InputsError(f"{what} {value!r} is not a whole number")
    try:
        t = torch.as_tensor(value, device=device).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InputsError(f"{what} must be an int or one int per sample, got {type(value).__name__}") from None
    if t.dtype == torch.bool or (t.is_floating_point() and not bool((t == t.round()).all())):
        raise InputsError(f"{what} {t.tolist()} is not a whole number")
    t = t.long()
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise InputsError(f"{what} holds {t.numel()} values for a batch of {B}")
    if bool(((t < 0) | (t >= lengths)).any()):
        raise InputsError(f"{what} {t.tolist()} outside the samples' real tokens (lengths {lengths.tolist()})")
    return t


def _contiguous_start(real: Tensor, what: str) -> Tensor:
    """(B,) column of each sample's first real token; the real tokens must be one run (left or right padding)."""
    B, N = real.shape
    cols = torch.arange(N, device=real.device)
    first = torch.where(real, cols, N).amin(dim=1)
    last = torch.where(real, cols, -1).amax(dim=1)
    if bool(((last - first + 1) != real.sum(dim=1)).any()):
        raise InputsError(f"{what}: the real tokens (attention_mask = 1) of a sample must be one run "
                          "(left or right padding only)")
    return first


class GenerationAdapter(HookAdapter):
    """Shared by the two families: recording every attention call, the
    explained logit at position t, the coupled trace."""

    library = "huggingface"
    examples: Tuple[str, ...] = ()
    classes: Tuple[str, ...] = ()
    no_lrp_because = ("the LRP read-outs of generation (relevance per generated token, down to the source's "
                      "and the earlier targets' token embeddings) are not built")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, cls.classes) is not None

    def attention_layers(self) -> List[AttentionLayer]:
        return generation_layers(self.model)

    def depths(self) -> Dict[str, int]:
        return {}  # every layer takes part: no start layer

    def model_kwargs(self, feed: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in feed.items() if not k.startswith("_")}

    def forward(self, feed, method):
        return self.model(**self.model_kwargs(feed), use_cache=False, return_dict=True)

    def score(self, feed, output, index):
        """Logits (B, V) at each sample's explained position, the explained id, its one-hot seed."""
        logits = output.logits
        rows = feed["_rows"]
        at = logits[torch.arange(logits.shape[0], device=logits.device), rows]
        target = resolve_index(index, at, what="token")
        return at, target, F.one_hot(target, at.shape[-1]).to(at.dtype)

    def streams(self, feed, cap) -> Coupled:
        return self.coupled(feed, [(r.name, r.probs) for r in cap.records], feed["_rows"])

    def _calls(self, records: Sequence[Tuple[str, Tensor]]) -> List[List[AttentionCall]]:
        layers = {layer.name: layer for layer in self.layers}
        groups = []
        for name, probs in records:
            layer = layers[name]
            if layer.cross:
                groups.append([AttentionCall(name, probs, "target", "source")])
            else:
                s = self.stream_of(name)
                groups.append([AttentionCall(name, probs, s, s)])
        if len(groups) != len(self.layers):
            raise RuntimeError(f"{type(self.model).__name__}: recorded {len(groups)} attention calls for "
                               f"{len(self.layers)} attention modules")
        return groups

    def coupled(self, feed: Dict[str, Any], records: Sequence[Tuple[str, Tensor]], rows: Tensor) -> Coupled:
        """The coupled trace of the recorded ``(name, probs)`` calls with the
        read-out at the (B,) absolute decoder columns ``rows``."""
        raise NotImplementedError


def _one_hot(rows: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    return F.one_hot(rows, n).to(dtype)


@register_adapter
class Seq2SeqAdapter(GenerationAdapter):
    family = "Hugging Face encoder-decoders for generation (unmodified)"
    classes = SEQ2SEQ_CLASSES
    examples = SEQ2SEQ_CLASSES
    notes = ("logit of a token at decoder position t: METHODS_ICCV.md section 4's rule with encoder tokens for the "
             "image tokens (METHODS.md section 8, ours); maps .source (B, S) or (B, gh, gw), .target (B, T)")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.kind = hf_class(model, SEQ2SEQ_CLASSES)
        self.image = self.kind == "VisionEncoderDecoderModel"
        encoder = model.get_encoder()
        self.encoder_prefix = module_path(model, encoder) + "."

    def stream_of(self, name: str) -> str:
        return "source" if name.startswith(self.encoder_prefix) else "target"

    def _start_token(self) -> int:
        cfg = self.model.config
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is None and getattr(cfg, "decoder", None) is not None:
            start = getattr(cfg.decoder, "decoder_start_token_id", None) or getattr(cfg.decoder, "bos_token_id", None)
        if start is None:
            raise InputsError(f"{self.kind}: config.decoder_start_token_id is not set; pass decoder_input_ids")
        return int(start)

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        main = "pixel_values" if self.image else "input_ids"
        if isinstance(inputs, Mapping):
            extra = {k: inputs[k] for k in _EXTRA_KEYS if k in inputs}
            inputs = {k: v for k, v in inputs.items() if k not in _EXTRA_KEYS}
        else:
            extra = {}
        if "prompt_length" in extra:
            raise InputsError(f"{self.kind}: prompt_length applies to decoder-only models; the source is the "
                              "encoder's input")
        device = model_device(self.model)
        feed = feed_dict(inputs, main, device)
        if self.image:
            patch = self.model.config.encoder.patch_size
            patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
            feed["_grid"] = check_images(feed["pixel_values"], patch, self.kind)
            B = feed["pixel_values"].shape[0]
        else:
            feed["_source"] = check_text(feed, self.kind)
            B = feed["input_ids"].shape[0]
        dec = feed.get("decoder_input_ids")
        if dec is None:
            dec = feed["decoder_input_ids"] = torch.full((B, 1), self._start_token(), dtype=torch.long, device=device)
        if not isinstance(dec, Tensor) or dec.dim() != 2 or dec.shape[0] != B:
            raise InputsError(f"{self.kind}: decoder_input_ids must be (B, T) with B = {B}, got "
                              f"{tuple(dec.shape) if isinstance(dec, Tensor) else type(dec).__name__}")
        dmask = feed.get("decoder_attention_mask")
        if dmask is None:
            target = torch.ones_like(dec, dtype=torch.bool)
        else:
            if dmask.shape != dec.shape:
                raise InputsError(f"{self.kind}: decoder_attention_mask {tuple(dmask.shape)} does not match "
                                  f"decoder_input_ids {tuple(dec.shape)}")
            target = dmask.bool()
            if bool((target[:, 0] == 0).any()) or _contiguous_start(target, self.kind).ne(0).any():
                raise InputsError(f"{self.kind}: decoder targets must be right-padded")
        feed["_target"] = target
        lengths = target.sum(dim=1)
        if "position" in extra and extra["position"] is not None:
            feed["_rows"] = _positions(extra["position"], B, lengths, "position", device)
        else:
            feed["_rows"] = lengths - 1
        return feed

    def coupled(self, feed, records, rows) -> Coupled:
        groups = self._calls(records)
        src_calls = [g[0] for g in groups if g[0].query == "source"]
        if not src_calls:
            raise RuntimeError(f"{self.kind}: no encoder attention was recorded")
        first = groups[0][0].probs
        dtype, device = first.dtype, first.device
        B = first.shape[0]
        S = src_calls[0].probs.shape[-1]
        target = feed["_target"]
        T = target.shape[1]
        if self.image:
            gh, gw = feed["_grid"]
            prefix = S - gh * gw
            if prefix < 0:
                raise RuntimeError(f"{self.kind}: {S} encoder tokens do not hold a {gh}x{gw} patch grid")
            source = torch.ones(B, S, dtype=torch.bool, device=device)
            src_cols = source.clone()
            src_cols[:, :prefix] = False
            grid = (gh, gw)
        else:
            source = feed["_source"]
            src_cols, grid = torch.ones_like(source), None
        w = _one_hot(rows, T, dtype)
        outputs = {"source": Output("target", w, "source", src_cols, grid=grid),
                   "target": Output("target", w, "target", torch.ones_like(target))}
        return Coupled(groups, {"source": S, "target": T}, {"source": source, "target": target}, outputs)


@register_adapter
class CausalLMAdapter(GenerationAdapter):
    family = "Hugging Face causal language models (unmodified)"
    classes = CAUSAL_LM_CLASSES
    examples = CAUSAL_LM_CLASSES
    notes = ("logit of a token at position t, last-token pooling (METHODS.md section 8, ours); maps .source over "
             "the prompt and .target over the continuation, (B, N) each")

    def stream_of(self, name: str) -> str:
        return "target"

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        what = type(self.model).__name__
        if isinstance(inputs, Mapping):
            extra = {k: inputs[k] for k in _EXTRA_KEYS if k in inputs}
            inputs = {k: v for k, v in inputs.items() if k not in _EXTRA_KEYS}
        else:
            extra = {}
        device = model_device(self.model)
        feed = feed_dict(inputs, "input_ids", device)
        real = check_text(feed, what)
        start = _contiguous_start(real, what)
        if feed.get("position_ids") is None:  # as generate() does: left padding does not shift positions
            feed["position_ids"] = (feed["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        B = real.shape[0]
        lengths = real.sum(dim=1)
        if extra.get("prompt_length") is not None:
            prompt = _positions(extra["prompt_length"], B, lengths + 1, "prompt_length", device)
        else:
            prompt = lengths
        if extra.get("position") is not None:
            pos = _positions(extra["position"], B, lengths, "position", device)
        else:
            pos = lengths - 1
        feed["_real"], feed["_rows"], feed["_prompt_end"] = real, start + pos, start + prompt
        return feed

    def coupled(self, feed, records, rows) -> Coupled:
        groups = self._calls(records)
        first = groups[0][0].probs
        real = feed["_real"]
        B, N = real.shape
        cols = torch.arange(N, device=real.device)[None, :]
        prompt = cols < feed["_prompt_end"][:, None]
        w = _one_hot(rows, N, first.dtype)
        outputs = {"source": Output("target", w, "target", prompt),
                   "target": Output("target", w, "target", ~prompt)}
        return Coupled(groups, {"target": N}, {"target": real}, outputs)
