"""Write engine_reference.safetensors: maps of the ViT and BERT copies for
every method, computed by the code before the one-engine refactor (commit
e5ebc9e), with the weights and inputs that produced them.

    python tests/data/make_engine_reference.py

tests/test_engine_reference.py reloads the weights and inputs and checks that
today's code gives the same maps.  Re-run this script only on purpose (a
change that is meant to move the maps), and say so in the commit.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from baselines.ViT import ViT_LRP as V  # noqa: E402
from baselines.ViT.ViT_explanation_generator import explain as explain_vit  # noqa: E402
from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification  # noqa: E402
from BERT_explainability.modules.BERT.ExplanationGenerator import explain as explain_bert  # noqa: E402
from modules.methods import METHOD_NAMES  # noqa: E402
from transformers import BertConfig  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_reference.safetensors")
VIT_KW = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0,
              qkv_bias=True)
BERT_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
               max_position_embeddings=24, num_labels=3, attn_implementation="eager")


def big_weights(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def main():
    torch.manual_seed(0)
    out = {}
    for tag, distilled in (("vit", False), ("deit", True)):
        model = big_weights(V.VisionTransformer(distilled=distilled, **VIT_KW), 1)
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        out.update({f"{tag}.weights.{k}": v.contiguous() for k, v in model.state_dict().items()})
        out[f"{tag}.inputs"] = images
        for method in METHOD_NAMES:
            for start in (0, 1):
                out[f"{tag}.map.{method}.s{start}"] = explain_vit(model, images, method, start_layer=start).contiguous()
            out[f"{tag}.map.{method}.idx"] = explain_vit(model, images, method, index=[1, 4, 7]).contiguous()
    bert = big_weights(BertForSequenceClassification(BertConfig(**BERT_KW)), 3)
    g = torch.Generator().manual_seed(4)
    lengths = (12, 7, 3)
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, 64, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = 2, 3
        mask[b, :n] = 1
    out.update({f"bert.weights.{k}": v.contiguous() for k, v in bert.state_dict().items()})
    out["bert.input_ids"], out["bert.attention_mask"] = ids, mask
    for method in METHOD_NAMES:
        out[f"bert.map.{method}.default"] = explain_bert(bert, ids, mask, method=method).contiguous()
        out[f"bert.map.{method}.s1"] = explain_bert(bert, ids, mask, method=method, start_layer=1).contiguous()
        out[f"bert.map.{method}.idx"] = explain_bert(bert, ids, mask, method=method, index=[0, 2, 1]).contiguous()
    save_file(out, OUT)
    print(f"wrote {OUT}: {len(out)} tensors")


if __name__ == "__main__":
    main()
