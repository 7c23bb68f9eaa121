"""The one-engine refactor did not move the maps of the model copies.

``tests/data/engine_reference.safetensors`` holds the maps the ViT, DeiT and
BERT copies gave for every method before the refactor (written by
``tests/data/make_engine_reference.py`` on commit e5ebc9e), with the weights
and inputs.  Today's maps must be identical where the arithmetic is
unchanged and within 1e-6 after per-sample min-max where only the order of
float operations moved.
"""
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig

from baselines.ViT import ViT_LRP as V
from baselines.ViT.ViT_explanation_generator import explain as explain_vit
from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
from BERT_explainability.modules.BERT.ExplanationGenerator import explain as explain_bert
from modules.aggregation import minmax_normalize
from modules.explain import explain
from modules.methods import METHOD_NAMES


HERE = os.path.dirname(os.path.abspath(__file__))
REF = load_file(os.path.join(HERE, "data", "engine_reference.safetensors"))
# methods the reference was saved for (methods added later have no saved map)
SAVED = [m for m in METHOD_NAMES if f"vit.map.{m}.s0" in REF]
VIT_KW = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0,
              qkv_bias=True)
BERT_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
               max_position_embeddings=24, num_labels=3, attn_implementation="eager")


def _weights(tag):
    prefix = f"{tag}.weights."
    return {k[len(prefix):]: v for k, v in REF.items() if k.startswith(prefix)}


def _same(got, want):
    """Identical, or within 1e-6 after per-sample min-max (only the order of float operations moved)."""
    assert got.shape == want.shape
    if torch.equal(got, want):
        return
    torch.testing.assert_close(minmax_normalize(got.flatten(1)), minmax_normalize(want.flatten(1)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tag,distilled", [("vit", False), ("deit", True)])
@pytest.mark.parametrize("method", SAVED)
def test_vit_copy_maps_unchanged(tag, distilled, method):
    model = V.VisionTransformer(distilled=distilled, **VIT_KW)
    model.load_state_dict(_weights(tag), strict=True)
    model.eval()
    images = REF[f"{tag}.inputs"]
    for start in (0, 1):
        _same(explain_vit(model, images, method, start_layer=start), REF[f"{tag}.map.{method}.s{start}"])
        _same(explain(model, images, method, start_layer=start), REF[f"{tag}.map.{method}.s{start}"])
    _same(explain_vit(model, images, method, index=[1, 4, 7]), REF[f"{tag}.map.{method}.idx"])


@pytest.mark.parametrize("method", SAVED)
def test_bert_copy_maps_unchanged(method):
    model = BertForSequenceClassification(BertConfig(**BERT_KW))
    model.load_state_dict(_weights("bert"), strict=True)
    model.eval()
    ids, mask = REF["bert.input_ids"], REF["bert.attention_mask"]
    _same(explain_bert(model, ids, mask, method=method), REF[f"bert.map.{method}.default"])
    _same(explain(model, {"input_ids": ids, "attention_mask": mask}, method), REF[f"bert.map.{method}.default"])
    _same(explain_bert(model, ids, mask, method=method, start_layer=1), REF[f"bert.map.{method}.s1"])
    _same(explain_bert(model, ids, mask, method=method, index=[0, 2, 1]), REF[f"bert.map.{method}.idx"])
