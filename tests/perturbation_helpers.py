"""Shared helpers of the perturbation tests: a tiny image tree and a tiny ViT
saved as a model directory (config.json + model.safetensors)."""
import os

import numpy as np
import torch
from PIL import Image

from baselines.ViT.ViT_LRP import VisionTransformer, save_model_dir


def make_tree(root, classes=3, per_class=5, size=40, seed=0):
    """ImageFolder tree root/c<k>/<i>.png of random RGB images."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, f"c{c}", f"{i}.png"))
    return str(root)


def make_model_dir(path, num_classes=3, depth=2, seed=0):
    """A tiny random ViT (32x32 input, 8x8 patches) with weights large enough
    that predictions and maps differ between images."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=num_classes, embed_dim=16, depth=depth,
                              num_heads=2, mlp_ratio=2.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.default_cfg = {"architecture": "tiny_vit", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    save_model_dir(model, str(path))
    return str(path)
