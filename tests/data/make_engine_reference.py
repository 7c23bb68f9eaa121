"""Write engine_reference.safetensors: maps of the ViT and BERT copies for
every method, computed in float64 by the code before the one-engine refactor,
with the weights and inputs that produced them.

The maps must come from the code of commit 6ec0abc (the commit that first
wrote this file; its code is that of e5ebc9e, the last commit before the
refactor), not from today's code, or the test proves nothing:

    git worktree add /tmp/refcommit 6ec0abc
    python tests/data/make_engine_reference.py --code /tmp/refcommit
    git worktree remove /tmp/refcommit

Weights and inputs are drawn in float32 exactly as in the first version of
this file (so they are the same numbers) and stored in float32; the models
and inputs are then cast to float64 and the maps computed and stored in
float64.  In float64 every map is exact to ~1e-12, so the test can ask
today's code for agreement to 1e-9 on any CPU; the first version stored
float32 maps, which differ between CPUs by ~1e-5 after min-max (issue 20).

tests/test_engine_reference.py reloads the weights and inputs and checks that
today's code gives the same maps.  Re-run this script only on purpose (a
change that is meant to move the maps), and say so in the commit.
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "engine_reference.safetensors")
VIT_KW = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0,
              qkv_bias=True)
BERT_KW = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
               max_position_embeddings=24, num_labels=3, attn_implementation="eager")


def big_weights(model, seed):
    import torch
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", required=True,
                    help="checkout whose code computes the maps (a worktree of the pre-refactor commit 6ec0abc)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    code = os.path.abspath(args.code)
    sys.path.insert(0, code)

    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig

    from baselines.ViT import ViT_LRP as V
    from baselines.ViT.ViT_explanation_generator import explain as explain_vit
    from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
    from BERT_explainability.modules.BERT.ExplanationGenerator import explain as explain_bert
    from modules.methods import METHOD_NAMES
    for mod in (V, BertForSequenceClassification, explain_bert, explain_vit):
        path = sys.modules[mod.__module__].__file__ if not isinstance(mod, type(sys)) else mod.__file__
        assert os.path.abspath(path).startswith(code + os.sep), f"{path} is not from {code}"

    torch.manual_seed(0)
    out = {}
    for tag, distilled in (("vit", False), ("deit", True)):
        model = big_weights(V.VisionTransformer(distilled=distilled, **VIT_KW), 1)
        images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        out.update({f"{tag}.weights.{k}": v.contiguous() for k, v in model.state_dict().items()})
        out[f"{tag}.inputs"] = images
        model, images = model.double(), images.double()
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
    bert = bert.double()
    for method in METHOD_NAMES:
        out[f"bert.map.{method}.default"] = explain_bert(bert, ids, mask, method=method).contiguous()
        out[f"bert.map.{method}.s1"] = explain_bert(bert, ids, mask, method=method, start_layer=1).contiguous()
        out[f"bert.map.{method}.idx"] = explain_bert(bert, ids, mask, method=method, index=[0, 2, 1]).contiguous()
    assert all(v.dtype == torch.float64 for k, v in out.items() if ".map." in k)
    commit = subprocess.run(["git", "-C", code, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    save_file(out, args.out, metadata={"code_commit": commit, "maps_dtype": "float64"})
    print(f"wrote {args.out}: {len(out)} tensors, maps from the code of {commit}")


if __name__ == "__main__":
    main()
