"""LXMERT (co-attention), unmodified: ``transformers.LxmertForQuestionAnswering``.

Every ``LxmertAttention`` passes its probabilities through its ``dropout``
module right after the softmax; a forward hook there records them (eval
mode: the probabilities themselves).  The x-layers' single cross-attention
module fires twice per layer, language queries first (METHODS_ICCV.md
section 2), so its records alternate text->image, image->text.

The trace follows the published generator (``generate_ours``): language
encoder, object-relationship encoder, then each cross layer as one group
of both cross directions (computed from the same state) followed by the
language and the visual self-attention; in the last cross layer only the
language-query cross-attention and the language self-attention (the answer
head reads the pooled language [CLS]).  Outputs: ``text`` = [CLS] row of
R_tt with its own entry 0 ([SEP] included, padding 0), ``image`` = [CLS] row
of R_ti, one value per box.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List

import torch
from torch import nn

from modules.adapters import CoupledLRP, InputsError, feed_dict, hf_class, model_device, one_hot_rows, register_adapter
from modules.adapters.hooks import HookAdapter
from modules.attention_capture import AttentionLayer
from modules.trace import AttentionCall, Coupled, Output

__all__ = ["LxmertAdapter"]


@register_adapter
class LxmertAdapter(CoupledLRP, HookAdapter):
    family = "Hugging Face LXMERT (unmodified)"
    examples = ("LxmertForQuestionAnswering",)
    notes = ("co-attention: the ICCV 2021 rules (METHODS_ICCV.md section 2); maps .text (B, T), .image (B, boxes); "
             "transformer attribution, partial LRP and generic_attribution(use_lrp=True) through the LRP scope "
             "(rule set TA, as the published layers)")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, ("LxmertForQuestionAnswering",)) is not None

    def attention_layers(self) -> List[AttentionLayer]:
        layers = []
        for name, module in self.model.named_modules():
            if type(module).__name__ == "LxmertAttention":
                layers.append(AttentionLayer(name, module, module.dropout, None, cross=".visual_attention." in name))
        return layers

    def depths(self) -> Dict[str, int]:
        return {}  # every layer takes part: no start layer

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        if not isinstance(inputs, Mapping):
            raise InputsError("LXMERT needs a dict: input_ids, attention_mask, visual_feats, visual_pos")
        feed = feed_dict(inputs, "input_ids", model_device(self.model))
        for key in ("visual_feats", "visual_pos"):
            if not isinstance(feed.get(key), torch.Tensor) or feed[key].dim() != 3:
                raise InputsError(f"LXMERT needs {key} of shape (B, boxes, ...)")
        B, T = feed["input_ids"].shape
        boxes = feed["visual_feats"].shape[1]
        if feed.get("attention_mask") is None:
            feed["attention_mask"] = torch.ones_like(feed["input_ids"])
        if feed.get("visual_attention_mask") is None:
            feed["visual_attention_mask"] = torch.ones(B, boxes, dtype=torch.long, device=feed["input_ids"].device)
        return feed

    def attach_input(self, feed, stack) -> None:
        """The LRP scope's explained inputs: the word embeddings (text) and
        the box features (image; the box positions stay constants, as the
        published relprop, which passes the visual relevance through
        ``visn_fc`` only)."""
        super().attach_input(feed, stack)
        feed["_leaf"]["image"] = feed["visual_feats"] = feed["visual_feats"].detach().requires_grad_(True)

    def forward(self, feed, method):
        return self.model(**{k: v for k, v in feed.items() if not k.startswith("_")}, return_dict=True)

    def score(self, feed, output, index):
        return super().score(feed, output.question_answering_score, index)

    def streams(self, feed, cap) -> Coupled:
        x_layers = len(self.model.lxmert.encoder.x_layers)
        groups: List[List[AttentionCall]] = []
        pending_cross: Dict[str, int] = {}
        for r in cap.records:
            name = r.name
            if ".visual_attention." in name:
                k = int(name.split(".x_layers.")[1].split(".")[0])
                seen = pending_cross.get(name, 0)
                pending_cross[name] = seen + 1
                query, key = ("text", "image") if seen == 0 else ("image", "text")
                if k == x_layers - 1 and query == "image":
                    continue  # the last layer's visual-query cross attention does not reach [CLS]
                call = AttentionCall(name, r.probs, query, key)
                if seen == 0:
                    groups.append([call])
                else:
                    groups[-1].append(call)
                continue
            if ".encoder.layer." in name or ".lang_self_att." in name:
                stream = "text"
            else:
                stream = "image"
            if ".visn_self_att." in name and int(name.split(".x_layers.")[1].split(".")[0]) == x_layers - 1:
                continue  # skipped in the last cross layer, as published
            groups.append([AttentionCall(name, r.probs, stream, stream)])
        text_mask = feed["attention_mask"].bool()
        image_mask = feed["visual_attention_mask"].bool()
        B, T = text_mask.shape
        dtype = groups[0][0].probs.dtype
        cls_row = one_hot_rows(B, T, 0, text_mask.device, dtype)
        outputs = {
            "text": Output("text", cls_row, "text", torch.ones_like(text_mask), zero_self=True),
            "image": Output("text", cls_row, "image", torch.ones_like(image_mask)),
        }
        return Coupled(groups, {"text": T, "image": image_mask.shape[1]}, {"text": text_mask, "image": image_mask},
                       outputs)
