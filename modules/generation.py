"""Explain what a generation model generated: one map per generated token.

    from modules.generation import explain_generation, generation_html
    out = explain_generation(model, tokenizer(["a source sentence"], return_tensors="pt"), max_new_tokens=10)
    out.tokens        # (B, K) the generated ids
    out.source        # (B, K, S) text source / (B, K, gh, gw) image patches: one map per generated token
    out.target        # (B, K, T) over the earlier target tokens (out.target_ids)

For every generated token k the explained value is the raw logit of that
token at the decoder position that produced it (METHODS.md section 8; the
rule: METHODS_ICCV.md section 4 with encoder tokens for the image tokens and
decoder tokens for the queries, see :mod:`modules.adapters.generation`).

Generation is greedy: ``model.generate(do_sample=False, num_beams=1)`` with
the model's own generation config (its logits processors, e.g. a forced
end-of-sequence token, apply; the explained id is the id generated, whatever
chose it).  The explanation then runs **one** forward pass over the whole
generated sequence (every attention probability recorded with its graph) and
one gradient per generated position (``torch.autograd.grad`` with
``retain_graph``), instead of one forward and backward per token.

Token conventions:

* encoder-decoders: ``target_ids`` = the decoder inputs ``[start, g_1 ..
  g_{K-1}]`` (K tokens); token g_k (k = 1..K) is predicted at decoder position
  k-1, so ``target[b, k-1, j]`` is 0 for j > k-1 (causality); the entry
  j = k-1 carries R_dd's identity (the token read at that position);
* decoder-only: the source is the prompt (left-padded in the batch: its
  padding columns are 0), ``target_ids`` = ``[g_1 .. g_{K-1}]`` (K-1 tokens),
  token g_k is predicted at the prompt's last column + k-1, so
  ``target[b, k-1, j]`` is 0 for j >= k-1.

``generated[b, k]`` is False after a sample's end-of-sequence token (the
padding ``generate`` appends once a sample has finished): those maps are 0.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from modules.adapters import InputsError, adapter_for, model_device
from modules.adapters.generation import CausalLMAdapter, GenerationAdapter, Seq2SeqAdapter
from modules.methods import Method

__all__ = ["GenerationExplanation", "explain_generation", "generation_html", "left_pad"]


@dataclass
class GenerationExplanation:
    """What :func:`explain_generation` returns (all tensors detached, on the model's device).

    Attributes
    ----------
    tokens:
        (B, K) the generated ids.
    generated:
        (B, K) bool: True up to and including a sample's end-of-sequence token.
    source:
        (B, K, S) relevance of the source tokens for each generated token
        (text; padding 0) or (B, K, gh, gw) of the image patches.
    target:
        (B, K, T) relevance of the target tokens ``target_ids`` (earlier ones).
    source_ids:
        (B, S) the source tokens (None for images); decoder-only: the
        left-padded prompt.
    source_mask:
        (B, S) bool real source tokens (None for images).
    target_ids:
        (B, T) the target tokens the target maps run over.
    scores:
        (B, K) the explained logits.
    method:
        The method's canonical name.
    """

    tokens: Tensor
    generated: Tensor
    source: Tensor
    target: Tensor
    source_ids: Optional[Tensor]
    source_mask: Optional[Tensor]
    target_ids: Tensor
    scores: Tensor
    method: str


def left_pad(input_ids: Tensor, attention_mask: Tensor, pad_id: int = 0):
    """Move each row's real tokens (one run, left- or right-padded) to the
    right end: the padding ``generate`` needs for decoder-only models."""
    B, N = input_ids.shape
    real = attention_mask.bool()
    n = real.sum(dim=1)
    cols = torch.arange(N, device=input_ids.device)
    first = torch.where(real, cols, N).amin(dim=1)
    # destination column of source column c: c - first + (N - n)
    shift = (N - n) - first
    ids = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(attention_mask)
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, N)
    dest = (cols[None, :] + shift[:, None])
    keep = real
    ids[rows[keep], dest[keep]] = input_ids[keep]
    mask[rows[keep], dest[keep]] = 1
    return ids, mask


def _ended(tokens: Tensor, eos: Optional[Union[int, Sequence[int]]]) -> Tensor:
    """(B, K) bool: the token is generated (at or before the first end-of-sequence token)."""
    if eos is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    ids = torch.as_tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=tokens.device)
    is_eos = torch.isin(tokens, ids).int()
    before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before k
    return before == 0


def _eos(model: nn.Module) -> Any:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return eos


def explain_generation(model: nn.Module, inputs: Any, max_new_tokens: int = 20,
                       method: Union[str, Method] = "generic_attribution", **options: Any) -> GenerationExplanation:
    """Greedy-generate, then explain every generated token (METHODS.md section 8).

    Parameters
    ----------
    model:
        ``BartForConditionalGeneration``, ``T5ForConditionalGeneration``,
        ``VisionEncoderDecoderModel``, ``GPT2LMHeadModel``,
        ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, unmodified (left as found).
    inputs:
        The dict a tokenizer returns (``input_ids``, ``attention_mask``;
        decoder-only prompts may be left- or right-padded: they are
        left-aligned for generation) or an image processor's
        (``pixel_values``), or the tensor itself.
    max_new_tokens:
        At most this many tokens per sample (fewer when every sample ended).
    method:
        ``generic_attribution`` (default), ``rollout``, ``attn_last_layer``,
        ``attn_gradcam``.
    **options:
        The method's options (``normalize``, ``self_in_rule_10``, ``nan_guard``).

    Returns
    -------
    GenerationExplanation
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    adapter = adapter_for(model)
    if not isinstance(adapter, GenerationAdapter):
        raise InputsError(f"{type(model).__name__} is no generation model; supported: "
                          + ", ".join(Seq2SeqAdapter.examples + CausalLMAdapter.examples))
    m = adapter.check_method(method, options)
    device = model_device(model)
    image = isinstance(adapter, Seq2SeqAdapter) and adapter.image
    main = "pixel_values" if image else "input_ids"
    src = dict(inputs) if not isinstance(inputs, Tensor) else {main: inputs}
    if not isinstance(src.get(main), Tensor):
        raise InputsError(f"inputs hold no {main!r} tensor")
    src = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in src.items()
           if k in (main, "attention_mask")}
    if not image:
        if src[main].dim() != 2:
            raise InputsError(f"input_ids must be (B, N), got shape {tuple(src[main].shape)}")
        if src.get("attention_mask") is None:
            src["attention_mask"] = torch.ones_like(src[main])
    causal = isinstance(adapter, CausalLMAdapter)
    if causal:
        pad = getattr(model.config, "pad_token_id", None)
        src[main], src["attention_mask"] = left_pad(src[main], src["attention_mask"], 0 if pad is None else pad)

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            extra = {}
            if getattr(model.generation_config, "pad_token_id", None) is None:
                eos = _eos(model)
                extra["pad_token_id"] = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0
            seq = model.generate(**src, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, **extra)
    finally:
        model.train(was_training)

    if causal:
        P = src[main].shape[1]
        tokens = seq[:, P:]
        K = tokens.shape[1]
        full = {"input_ids": seq[:, :P + K - 1],
                "attention_mask": torch.cat([src["attention_mask"],
                                             torch.ones_like(tokens[:, :K - 1], dtype=src["attention_mask"].dtype)], 1),
                "prompt_length": src["attention_mask"].sum(dim=1)}
        target_ids = seq[:, P:P + K - 1]
    else:
        tokens = seq[:, 1:]
        K = tokens.shape[1]
        full = dict(src, decoder_input_ids=seq[:, :K])
        target_ids = seq[:, :K]
    generated = _ended(tokens, _eos(model))

    feed = adapter.prepare(full, None)
    B = tokens.shape[0]
    arange = torch.arange(B, device=device)
    if causal:
        base = feed["_prompt_end"] - 1  # the prompt's last column (the same for every sample: left-aligned)
    else:
        base = torch.zeros(B, dtype=torch.long, device=device)
    source_maps: List[Tensor] = []
    target_maps: List[Tensor] = []
    scores: List[Tensor] = []
    shift = 0  # logits row = decoder column - shift
    kwargs = {}
    if causal and "logits_to_keep" in inspect.signature(model.forward).parameters:
        # only the explained positions (the last K columns) go through the (large) output layer: each of the
        # K gradients then skips the dense backward of the vocabulary projection at every prompt position
        kwargs["logits_to_keep"] = K
        shift = full["input_ids"].shape[1] - K
    with adapter.recording(m) as cap, torch.enable_grad():
        output = model(**adapter.model_kwargs(feed), use_cache=False, return_dict=True, **kwargs)
        logits = output.logits
        records = list(cap.records)
        probs = [r.probs for r in records]
        detached = [(r.name, r.probs.detach()) for r in records]
        for k in range(K):
            rows = base + k
            score = logits[arange, rows - shift].gather(1, tokens[:, k:k + 1]).squeeze(1)
            scores.append(score.detach())
            coupled = adapter.coupled(feed, detached, rows)
            if m.needs_grad:
                grads = torch.autograd.grad(score.sum(), probs, retain_graph=k < K - 1, allow_unused=True)
                for call, p, g in zip(coupled.calls, probs, grads):
                    call.grad = torch.zeros_like(p) if g is None else g.detach()
            with torch.no_grad():
                maps = m.compute_coupled(coupled, **options)
            source_maps.append(maps["source"])
            target_maps.append(maps["target"])
    source = torch.stack(source_maps, dim=1)
    target = torch.stack(target_maps, dim=1)
    keep = generated.to(source.dtype)
    source = source * keep.reshape(B, K, *([1] * (source.dim() - 2)))
    if causal:
        P = src[main].shape[1]
        source, target = source[:, :, :P], target[:, :, P:P + K - 1]
    target = target * keep[:, :, None]
    return GenerationExplanation(
        tokens=tokens, generated=generated, source=source.detach(), target=target.detach(),
        source_ids=None if image else src[main], source_mask=None if image else src["attention_mask"].bool(),
        target_ids=target_ids, scores=torch.stack(scores, dim=1), method=m.name)


def generation_html(source_words: Sequence[str], source_scores: Sequence[Sequence[float]],
                    generated_words: Sequence[str], title: Optional[str] = None) -> str:
    """One HTML page: the source sentence coloured once per generated word.

    ``source_scores[k]`` holds one score per source word for generated word
    k.  Each section is :func:`modules.text_heatmap.render_html`'s
    body (its colours, legend and tooltips), under a heading naming the
    generated word; the page keeps render_html's head and style.
    """
    from modules.text_heatmap import render_html
    import html as _html

    if len(source_scores) != len(generated_words):
        raise ValueError(f"{len(source_scores)} score rows for {len(generated_words)} generated words")
    head, bodies = None, []
    for k, (word, scores) in enumerate(zip(generated_words, source_scores)):
        page = render_html(source_words, scores, title=f"{k + 1}. {word!r}")
        top, rest = page.split("<body>\n", 1)
        head = head or top
        bodies.append(f'<section class="generated">\n{rest.split("</body>", 1)[0]}</section>\n')
    if head is None:  # nothing generated: the source alone
        page = render_html(source_words, [0.0] * len(source_words), title=title)
        return page
    heading = f"<h1>{_html.escape(title)}</h1>\n" if title else ""
    sentence = " ".join(_html.escape(w) for w in generated_words)
    return (f"{head}<body>\n{heading}<p class=\"output\"><b>generated:</b> {sentence}</p>\n"
            + "".join(bodies) + "</body>\n</html>\n")
