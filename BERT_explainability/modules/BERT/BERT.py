"""BERT encoder built from the LRP layer library (:mod:`modules.layers`).

A copy of Hugging Face ``transformers``' ``BertModel`` (encoder only: no
cross-attention, no cache, absolute position embeddings) with exactly its
parameter names, so ``load_state_dict(hf_model.state_dict(), strict=True)``
works both ways.  Every difference from upstream is for relevance
propagation and is marked ``# LRP:``:

- the residual connections are explicit :class:`~modules.layers.Clone` and
  :class:`~modules.layers.Add` modules (BERT is post-norm: ``LayerNorm(x + f(x))``);
- the two attention products are :class:`~modules.layers.MatMul` modules and
  the attention probabilities are recorded in the active explanation state;
- the [CLS] pooling is a :class:`~modules.layers.TokenSelect`.

Relevance rules are those of ../shared/METHODS.md section 1; this file only
routes relevance through the graph.  Plain inference (outside
:func:`~modules.layers.explanation_state`) uses PyTorch's fused attention and
records nothing.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modules import layers as L

__all__ = [
    "BertEmbeddings",
    "BertSelfAttention",
    "BertSelfOutput",
    "BertAttention",
    "BertIntermediate",
    "BertOutput",
    "BertLayer",
    "BertEncoder",
    "BertPooler",
    "BertModel",
    "extended_attention_mask",
    "check_config",
]


def check_config(config: BertConfig) -> None:
    """Refuse configurations this copy does not implement (with the reason)."""
    problems = []
    if getattr(config, "model_type", "bert") != "bert":
        problems.append(f"model_type={config.model_type!r} (only 'bert')")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        problems.append("decoder / cross-attention")
    pet = getattr(config, "position_embedding_type", "absolute")
    if pet not in (None, "absolute"):
        problems.append(f"position_embedding_type={pet!r} (only 'absolute')")
    if config.hidden_size % config.num_attention_heads:
        problems.append(f"hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")
    if problems:
        raise ValueError("unsupported BERT configuration: " + ", ".join(problems))


def extended_attention_mask(attention_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """(B, N) mask of 1 (token) / 0 (padding) -> additive (B, 1, 1, N) bias:
    0 for tokens, the dtype's most negative value for padding (as Hugging
    Face does), so padded keys get attention probability exactly 0."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, N), got shape {tuple(attention_mask.shape)}")
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def _activation(name) -> nn.Module:
    # LRP: exact GELU from the layer library; any activation passes relevance
    # unchanged (METHODS.md section 1), so other names keep Hugging Face's.
    if name == "gelu":
        return L.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return L.GELU(approximate="tanh")
    return ACT2FN[name] if isinstance(name, str) else name


class BertEmbeddings(nn.Module):
    """Word + token type + position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = L.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = L.Dropout(config.hidden_dropout_prob)
        # non-persistent, as in transformers 5 (absent from the state dict)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(self.position_ids.size(), dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids: Optional[Tensor] = None, token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        B, N = inputs_embeds.shape[:2]
        if N > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {N} tokens is longer than the model's maximum "
                             f"{self.position_embeddings.num_embeddings}; truncate it")
        if position_ids is None:
            position_ids = self.position_ids[:, :N]
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :N].expand(B, N)
        x = inputs_embeds + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention; ``relprop`` stores the attention relevance."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size ** -0.5
        self.query = L.Linear(config.hidden_size, self.all_head_size)
        self.key = L.Linear(config.hidden_size, self.all_head_size)
        self.value = L.Linear(config.hidden_size, self.all_head_size)
        self.dropout = L.Dropout(config.attention_probs_dropout_prob)
        # LRP: the hidden state feeds q, k and v; the products are modules.
        self.clone = L.Clone()
        self.matmul_qk = L.MatMul(transpose_v=True)
        self.matmul_av = L.MatMul()
        self.softmax = L.Softmax(dim=-1)

    def _split_heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        B, _, N, _ = x.shape
        return x.transpose(1, 2).reshape(B, N, self.all_head_size)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """``attention_mask``: the additive (B, 1, 1, N) bias of :func:`extended_attention_mask`."""
        hq, hk, hv = self.clone(hidden_states, 3)
        q = self._split_heads(self.query(hq))
        k = self._split_heads(self.key(hk))
        v = self._split_heads(self.value(hv))
        state = L.current_state()
        if state is None:
            # Plain inference: fused attention, nothing recorded.
            p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=p, scale=self.scaling)
        else:
            # LRP: explicit attention so its probabilities can be recorded.
            scores = self.matmul_qk(q, k) * self.scaling
            if attention_mask is not None:
                scores = scores + attention_mask  # LRP: the mask gets no relevance
            attn = self.dropout(self.softmax(scores))
            state.attentions.append(attn)
            state.attention_modules.append(self)
            out = self.matmul_av(attn, v)
        return self._merge_heads(out)

    def relprop(self, R: Tensor, need_input: bool = True) -> Optional[Tensor]:
        """Relevance (B, N, D) of the context -> relevance of the hidden state.

        The ``A V`` product splits R into R_A and R_V, each halved; R_A is
        stored as this layer's attention relevance.  R_A passes dropout,
        softmax, the mask (to the scores only) and the scale unchanged; the
        ``Q K^T`` product splits it into R_Q and R_K, each halved
        (METHODS.md section 1).  With ``need_input=False`` the pass stops once
        the attention relevance is stored and returns None.
        """
        state = L._require_state()
        r_attn, r_v = self.matmul_av.relprop(self._split_heads(R))
        r_attn, r_v = r_attn / 2, r_v / 2
        state.attention_relevance[self] = r_attn
        if not need_input:
            return None
        r_q, r_k = self.matmul_qk.relprop(r_attn)
        r_q = self.query.relprop(self._merge_heads(r_q / 2))
        r_k = self.key.relprop(self._merge_heads(r_k / 2))
        r_v = self.value.relprop(self._merge_heads(r_v))
        return self.clone.relprop((r_q, r_k, r_v))


class _DenseAddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: BERT's post-norm residual."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = L.Linear(in_features, config.hidden_size)
        self.LayerNorm = L.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = L.Dropout(config.hidden_dropout_prob)
        self.add = L.Add()  # LRP: the residual sum as a module

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        return self.LayerNorm(self.add(self.dropout(self.dense(hidden_states)), input_tensor))

    def relprop(self, R: Tensor) -> Tuple[Tensor, Tensor]:
        """-> (relevance of ``hidden_states``, relevance of ``input_tensor``);
        LayerNorm and dropout pass relevance unchanged."""
        r_dense, r_res = self.add.relprop(R)
        return self.dense.relprop(r_dense), r_res


class BertSelfOutput(_DenseAddNorm):
    def __init__(self, config: BertConfig):
        super().__init__(config.hidden_size, config)


class BertOutput(_DenseAddNorm):
    def __init__(self, config: BertConfig):
        super().__init__(config.intermediate_size, config)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)
        self.clone = L.Clone()  # LRP: the hidden state feeds attention and residual

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        h_attn, h_res = self.clone(hidden_states, 2)
        return self.output(self.self(h_attn, attention_mask), h_res)

    def relprop(self, R: Tensor, need_input: bool = True) -> Optional[Tensor]:
        r_ctx, r_res = self.output.relprop(R)
        r_attn = self.self.relprop(r_ctx, need_input=need_input)
        if not need_input:
            return None
        return self.clone.relprop((r_attn, r_res))


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = L.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = _activation(config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))

    def relprop(self, R: Tensor) -> Tensor:
        return self.dense.relprop(R)  # the activation passes relevance unchanged


class BertLayer(nn.Module):
    """One encoder block: attention (+ residual, LayerNorm), feed-forward (+ residual, LayerNorm)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.clone = L.Clone()  # LRP: the attention output feeds the MLP and the residual

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        a_mlp, a_res = self.clone(self.attention(hidden_states, attention_mask), 2)
        return self.output(self.intermediate(a_mlp), a_res)

    def relprop(self, R: Tensor, need_input: bool = True) -> Optional[Tensor]:
        r_mlp, r_res = self.output.relprop(R)
        R = self.clone.relprop((self.intermediate.relprop(r_mlp), r_res))
        return self.attention.relprop(R, need_input=need_input)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states

    def relprop(self, R: Tensor, stop_layer: Optional[int] = None) -> Optional[Tensor]:
        """Relevance of the last layer's output -> of the first layer's input.

        Every layer's attention relevance lands in the explanation state.
        With ``stop_layer=s`` the pass ends once layer s's attention relevance
        is known and returns None.
        """
        lowest = 0 if stop_layer is None else stop_layer
        for i in range(len(self.layer) - 1, lowest - 1, -1):
            R = self.layer[i].relprop(R, need_input=(i > lowest or stop_layer is None))
        return None if stop_layer is not None else R


class BertPooler(nn.Module):
    """tanh(dense(hidden state of [CLS]))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = L.Linear(config.hidden_size, config.hidden_size)
        self.activation = L.Tanh()
        self.pool = L.TokenSelect(0)  # LRP: [CLS] selection as a module

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.activation(self.dense(self.pool(hidden_states)))

    def relprop(self, R: Tensor) -> Tensor:
        """(B, D) pooled relevance -> (B, N, D); tanh passes it unchanged."""
        return self.pool.relprop(self.dense.relprop(R))


class BertModel(nn.Module):
    """Hugging Face ``BertModel`` (encoder) with the same parameter names."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        check_config(config)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None) -> BaseModelOutputWithPooling:
        """``last_hidden_state`` (B, N, D) and ``pooler_output`` (B, D).

        ``attention_mask`` (B, N) is 1 for tokens and 0 for padding;
        ``token_type_ids`` default to zeros.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        x = self.encoder(x, extended_attention_mask(attention_mask, x.dtype))
        pooled = self.pooler(x) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def relprop(self, R: Tensor, stop_layer: Optional[int] = None) -> Optional[Tensor]:
        """Relevance of the pooled output (B, D) -> relevance of the encoder
        input (the embeddings' output), (B, N, D); None with ``stop_layer``."""
        if self.pooler is None:
            raise RuntimeError("relprop starts at the pooler; this model has none")
        return self.encoder.relprop(self.pooler.relprop(R), stop_layer=stop_layer)
