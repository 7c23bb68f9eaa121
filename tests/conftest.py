"""Fixtures and tiny-model builders shared by the test files.

Float policy (issue 20).  A test that checks that code did not change, or
that two paths agree (a copy against the unmodified model, a batch against
its samples one by one, the engine against a re-derivation), runs in float64
(``.double()`` models and inputs, or the ``float64`` fixture), where both
sides are exact to ~1e-12 and a tolerance such as 1e-9 means something on
any CPU.  Float32 comparisons stay only where float32 is the point (parity
of float32 models, float32 storage), each with a tolerance above the
float32-vs-float64 gap measured on that case, stated beside it.  ``make
test-portable`` runs the suite under other float paths (one thread, other
CPU kernels, MKL's reproducible mode).

Fixtures
  seed        autouse: every test starts from torch / numpy / random seeded
              with 0 (returns 0); a test that wants another stream calls
              ``torch.manual_seed`` itself or uses a local ``Generator``.
  float64     torch's default dtype is float64 for the test (restored after):
              models built and tensors drawn inside it are float64.
  one_thread  torch on one CPU thread for a module (``pytestmark =
              pytest.mark.usefixtures("one_thread")``): tiny models run faster,
              and much faster on a loaded machine.
  tiny_vit, tiny_bert, bert_batch
              the builders below, as fixtures, for tests that prefer them.
  float64_softmax
              autouse: ``F.softmax(x, dtype=torch.float32)`` on a float64 ``x``
              stays float64.  Hugging Face's eager attention (ViT, CLIP, Swin,
              Llama, Qwen2, ModernBERT, ...) asks for a float32 softmax
              whatever the model's dtype, so a float64 model's probabilities
              carried float32 rounding: batch and singles differed by up to
              3.5e-4 (ModernBERT partial LRP) and rows fully masked with
              float64's minimum went NaN.  With the softmax in float64 the same
              comparisons agree to 1e-14 (measured on every text family, every
              LRP method).  Float32 inputs are untouched.

Builders (import them: ``from tests.conftest import tiny_vit``)
  tiny_vit(...)    the ViT/DeiT LRP copy, 32x32 images, 8-pixel patches,
                   weights N(0, 0.3) so attention is far from uniform.
  tiny_bert(...)   the BERT LRP copy, vocabulary 64, 32 wide, 4 heads,
                   weights N(0, 0.3), biases N(0, 0.1).
  bert_batch(...)  right-padded random ids ([CLS]=2 first, [SEP]=3 last).
"""
import random

import numpy as np
import pytest
import torch


# --------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------
def tiny_vit(distilled=False, img_size=32, patch_size=8, depth=3, seed=0, bias=True, bias_std=None, dtype=None, **kw):
    """The ViT/DeiT copy with weights N(0, 0.3), far larger than the 0.02 init
    (attention far from uniform); biases as initialised, N(0, ``bias_std``) if
    given, zero with ``bias=False`` (no qkv bias then); ``dtype`` casts the model."""
    from baselines.ViT import ViT_LRP as V

    torch.manual_seed(seed)
    args = dict(img_size=img_size, patch_size=patch_size, num_classes=10, embed_dim=48, depth=depth, num_heads=3,
                mlp_ratio=2.0, qkv_bias=bias, distilled=distilled)
    args.update(kw)
    model = V.VisionTransformer(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif not bias and name.endswith("bias"):
                p.zero_()
            elif bias_std is not None and name.endswith("bias"):
                p.normal_(0, bias_std)
    model.eval()
    return model.to(dtype) if dtype is not None else model


def tiny_bert_config(layers=3, labels=3, **kw):
    from transformers import BertConfig

    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=40,
               max_position_embeddings=24, num_labels=labels, attn_implementation="eager")
    cfg.update(kw)
    return BertConfig(**cfg)


def tiny_bert(seed=0, bias=True, dtype=None, **kw):
    """The BERT copy with weights N(0, 0.3) and biases N(0, 0.1) (zero with
    ``bias=False``), so attention is far from uniform and relevance far from
    zero; ``kw`` goes to ``tiny_bert_config``; ``dtype`` casts the model."""
    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1) if bias else p.zero_()
    model.eval()
    return model.to(dtype) if dtype is not None else model


def bert_batch(lengths=(12, 7, 3), n=None, vocab=64, seed=1):
    """Random ids ([CLS]=2 first, [SEP]=3 last) right-padded with 0, and the mask."""
    g = torch.Generator().manual_seed(seed)
    n = n or max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, length in enumerate(lengths):
        ids[b, :length] = torch.randint(5, vocab, (length,), generator=g)
        ids[b, 0], ids[b, length - 1] = 2, 3
        mask[b, :length] = 1
    return ids, mask


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    return 0


@pytest.fixture(autouse=True)
def float64_softmax(monkeypatch):
    """A float64 softmax stays float64 when float32 is asked for (see the module docstring)."""
    real = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):  # noqa: A002  F.softmax's own signature
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = None
        return real(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    # functional.softmax hands itself, looked up in its module, to torch-function modes
    # (the LRP scope): the wrapper replaces it there, under the same name
    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)
    return softmax


@pytest.fixture
def float64():
    """torch's default dtype float64 for this test (restored after); yields the dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch.float64
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for the module (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(name="tiny_vit")
def _tiny_vit_fixture():
    return tiny_vit


@pytest.fixture(name="tiny_bert")
def _tiny_bert_fixture():
    return tiny_bert


@pytest.fixture(name="bert_batch")
def _bert_batch_fixture():
    return bert_batch
