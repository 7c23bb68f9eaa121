"""BERT sequence classifier built from the LRP layer library.

Same parameter names as ``transformers.BertForSequenceClassification``
(``bert.*``, ``classifier.*``), so Hugging Face state dicts load strictly both
ways; :meth:`BertForSequenceClassification.from_pretrained` reads a local
Hugging Face model directory without touching the network.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from modules.checkpoints import (HF_INDEX_FILES, HF_WEIGHT_FILES, CheckpointError, check_state_finite, mismatch_report,
                                 read_model_dir_state)
from BERT_explainability.modules.BERT.BERT import BertModel
from modules import layers as L
from modules.adapters import check_text, feed_dict, model_device, one_hot_rows, register_adapter
from modules.adapters.native import CopyAdapter
from modules.trace import Readout, Stream

__all__ = ["BertForSequenceClassification", "CheckpointError", "read_hf_weights", "convert_hf_state_dict"]

WEIGHT_FILES = HF_WEIGHT_FILES
INDEX_FILES = HF_INDEX_FILES


class BertForSequenceClassification(nn.Module):
    """BERT + dropout + linear classifier on the pooled [CLS] state.

    Parameters
    ----------
    config:
        A ``transformers.BertConfig``; ``config.num_labels`` sets the
        classifier size.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if getattr(config, "classifier_dropout", None) is not None \
            else config.hidden_dropout_prob
        self.dropout = L.Dropout(p)
        self.classifier = L.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    # -- construction ---------------------------------------------------------------------------
    def init_weights(self, module: Optional[nn.Module] = None) -> None:
        """Hugging Face's initialisation (normal(0, initializer_range) weights,
        zero biases, unit LayerNorm) for ``module`` (default: the whole model)."""
        std = getattr(self.config, "initializer_range", 0.02)
        for m in (module or self).modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_pretrained(cls, local_dir: str, num_labels: Optional[int] = None) -> "BertForSequenceClassification":
        """Load a local Hugging Face BERT directory (``config.json`` and
        ``model.safetensors`` or ``pytorch_model.bin``, possibly sharded).

        Keys of ``BertForSequenceClassification`` (``bert.*``,
        ``classifier.*``) and of an encoder-only ``BertModel`` (no prefix)
        are both accepted; old ``gamma``/``beta`` names are renamed and
        pre-training heads (``cls.*``) dropped.  Without classifier weights
        the head is freshly initialised and a ``UserWarning`` says so; so is
        a missing pooler.  ``num_labels`` overrides the config's (a
        checkpoint classifier of another size is an error).  Returns the
        model in eval mode.

        Raises
        ------
        FileNotFoundError
            ``local_dir`` or its ``config.json`` / weights are missing.
        CheckpointError
            The weights do not fit the configuration.
        """
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"model directory not found: {local_dir}")
        if not os.path.isfile(os.path.join(local_dir, "config.json")):
            raise FileNotFoundError(f"{local_dir} holds no config.json")
        config = BertConfig.from_pretrained(local_dir, local_files_only=True)
        if num_labels is not None:
            if num_labels < 1:
                raise ValueError(f"num_labels must be >= 1, got {num_labels}")
            if num_labels != config.num_labels:
                config.num_labels = num_labels
        model = cls(config)
        state = convert_hf_state_dict(read_hf_weights(local_dir))
        own = model.state_dict()

        fresh = []
        for prefix, what in (("classifier.", "classifier head"), ("bert.pooler.", "pooler")):
            own_keys = [k for k in own if k.startswith(prefix)]
            if not any(k in state for k in own_keys):
                fresh.append(what)
                for k in own_keys:
                    state[k] = own[k]  # keep the fresh initialisation
        wrong = [k for k in state if k.startswith("classifier.") and k in own and state[k].shape != own[k].shape]
        if wrong:
            raise CheckpointError(
                f"{local_dir}: its classifier has {state['classifier.weight'].shape[0]} labels, "
                f"num_labels={config.num_labels} was asked for")
        check_state_finite(state, local_dir)
        problems = mismatch_report(own, state)
        if problems:
            raise CheckpointError(f"{local_dir} does not fit BertForSequenceClassification: {problems}")
        model.load_state_dict(state, strict=True)
        if fresh:
            warnings.warn(f"{local_dir} holds no weights for the {' and '.join(fresh)}: freshly initialised "
                          f"({config.num_labels} labels); fine-tune before trusting its predictions",
                          UserWarning, stacklevel=2)
        model.name_or_path = local_dir
        return model.eval()

    def save_pretrained(self, out_dir: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` in Hugging Face's layout
        (readable by ``transformers.BertForSequenceClassification.from_pretrained``)."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        self.config.architectures = ["BertForSequenceClassification"]
        self.config.save_pretrained(out_dir)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    # -- forward and relevance ------------------------------------------------------------------
    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> SequenceClassifierOutput:
        """Logits (B, num_labels) as ``out.logits`` (also ``out[0]`` without
        labels); with ``labels``, ``out.loss`` is Hugging Face's loss
        (cross-entropy, or MSE for one label) and ``out[0]`` the loss."""
        pooled = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           position_ids=position_ids, inputs_embeds=inputs_embeds).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).reshape(-1))
            else:
                loss = F.cross_entropy(logits, labels.reshape(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def relprop(self, R: Tensor, stop_layer: Optional[int] = None) -> Optional[Tensor]:
        """Propagate relevance R (B, num_labels) from the logits.

        Classifier -> pooler tanh (identity) -> pooler dense -> [CLS]
        selection -> encoder layers (METHODS.md section 3).  Every layer's
        attention relevance lands in the active explanation state.  Returns
        the relevance at the encoder input (the embeddings' output),
        (B, N, D); with ``stop_layer=s`` the pass ends once layer s's
        attention relevance is known and returns None.
        """
        return self.bert.relprop(self.classifier.relprop(R), stop_layer=stop_layer)


# ------------------------------------------------------------------------------------------------
# Hugging Face weights
# ------------------------------------------------------------------------------------------------
def read_hf_weights(local_dir: str) -> Dict[str, Tensor]:
    """Tensors of a Hugging Face model directory: ``model.safetensors`` or
    ``pytorch_model.bin`` (``torch.load(weights_only=True)``), or the shards
    named by an ``*.index.json`` (validated): the one reader,
    :func:`modules.checkpoints.read_model_dir_state`."""
    return read_model_dir_state(local_dir)


_DROP = re.compile(r"^(cls\.|bert\.embeddings\.(position_ids|token_type_ids)$)")


def convert_hf_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Hugging Face BERT keys -> this model's keys.

    Encoder-only keys get the ``bert.`` prefix; ``LayerNorm.gamma/beta``
    become ``weight/bias``; pre-training heads (``cls.*``) and the
    ``position_ids`` / ``token_type_ids`` buffers of older checkpoints are
    dropped.
    """
    out: Dict[str, Tensor] = {}
    for key, value in state.items():
        if not (key.startswith("bert.") or key.startswith("classifier.") or key.startswith("cls.")):
            key = "bert." + key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if _DROP.match(key):
            continue
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# How modules.explain explains this copy (every method, METHODS.md section 3)
# ------------------------------------------------------------------------------------------------


@register_adapter
class BertCopyAdapter(CopyAdapter):
    """The BERT copy: [CLS] row with the published BERT conventions
    (METHODS.md section 3), every wordpiece a column, padding masked."""

    family = "BERT LRP copy (BERT_explainability...BertForSequenceClassification)"
    examples = ("BertForSequenceClassification (copy)",)
    stream_name = "text"
    attention_prefix = "bert.encoder.layer"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, BertForSequenceClassification)

    def depths(self):
        return {"text": len(self.model.bert.encoder.layer)}

    def prepare(self, inputs, index):
        feed = feed_dict(inputs, "input_ids", model_device(self.model))
        feed["real"] = check_text(feed, "BertForSequenceClassification")
        return feed

    def forward(self, feed, method):
        # the word embeddings as a leaf, so the attention maps have a graph
        # even when every parameter is frozen
        embeds = self.model.bert.embeddings.word_embeddings(feed["input_ids"]).detach()
        if method.needs_grad or method.input_gradient:
            embeds.requires_grad_(True)
        feed["_leaf"] = embeds
        return self.model(inputs_embeds=embeds, attention_mask=feed["attention_mask"],
                          token_type_ids=feed.get("token_type_ids")).logits

    def streams(self, feed, state):
        calls = self.calls(state)
        real = feed["real"]
        B, N = real.shape
        readout = Readout(one_hot_rows(B, N, 0, real.device, calls[0].probs.dtype), torch.ones_like(real),
                          self_column=0, token_mask=real)
        return {"text": Stream("text", list(calls), readout, text_conventions=True)}

    def run_relprop(self, seed, stop, feed):
        r = self.model.relprop(seed, stop_layer=stop)
        return None if r is None else r.sum(dim=-1)

    def gradient_relevance(self, feed, leaf, grad):
        return (leaf * grad).sum(dim=-1)  # word embeddings x gradient, summed over the hidden size