"""Vision Transformer (ViT / DeiT) built from the LRP layer library.

A copy of timm's ``VisionTransformer`` (and ``VisionTransformerDistilled``)
forward pass with the same parameter names, so
``model.load_state_dict(timm_model.state_dict())`` works strictly.  The
differences from timm, all for relevance propagation, are marked ``# LRP:``.

Explanations use :func:`baselines.ViT.ViT_explanation_generator.explain`;
this file only knows how to run forward and how to send relevance back.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules import layers as L
from modules.adapters import check_images, column_mask, feed_dict, model_device, one_hot_rows, register_adapter
from modules.adapters.native import CopyAdapter
from modules.checkpoints import CheckpointError, load_state, mismatch_report, read_model_config, read_state_dict
from modules.trace import Readout, Stream

__all__ = [
    "VisionTransformer",
    "MODEL_FACTORIES",
    "create_model",
    "from_timm",
    "load_checkpoint",
    "CheckpointError",
    "read_state_dict",
    "load_model",
    "load_model_dir",
    "save_model_dir",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_base_distilled_patch16_224",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def resample_pos_embed(pos: Tensor, old_grid: Sequence[int], new_grid: Sequence[int], num_prefix: int) -> Tensor:
    """Resample a (1, prefix + gh*gw, D) position embedding to another grid as
    timm does (bicubic, antialiased; prefix tokens kept as they are)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, grid_pos = pos[:, :num_prefix], pos[:, num_prefix:]
    grid_pos = grid_pos.float().reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos.dtype)
    return torch.cat([prefix, grid_pos], dim=1)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = L.Linear(in_features, hidden_features)
        self.act = L.GELU()
        self.drop1 = L.Dropout(drop)
        self.norm = L.Identity()  # timm: Identity unless use_norm
        self.fc2 = L.Linear(hidden_features, in_features)
        self.drop2 = L.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    def relprop(self, R: Tensor) -> Tensor:
        R = self.fc2.relprop(R)  # dropout, norm and GELU pass relevance unchanged
        return self.fc1.relprop(R)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = L.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = L.Identity()
        self.k_norm = L.Identity()
        self.attn_drop = L.Dropout(attn_drop)
        self.proj = L.Linear(dim, dim)
        self.proj_drop = L.Dropout(proj_drop)
        # LRP: the two products are modules so that relevance can pass them.
        self.matmul_qk = L.MatMul(transpose_v=True)
        self.matmul_av = L.MatMul()
        self.softmax = L.Softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        state = L.current_state()
        if state is None:
            # Plain inference: timm's fused attention, nothing recorded.
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            # LRP: explicit attention so its probabilities can be recorded.
            attn = self.softmax(self.matmul_qk(q, k) * self.scale)
            attn = self.attn_drop(attn)
            state.attentions.append(attn)
            state.attention_modules.append(self)
            out = self.matmul_av(attn, v)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))

    def relprop(self, R: Tensor, need_input: bool = True) -> Optional[Tensor]:
        """Relevance of the block input; also stores the attention relevance.

        With ``need_input=False`` the pass stops once the attention relevance
        is known (the lowest block a method needs).
        """
        state = L._require_state()
        B, N, C = R.shape
        R = self.proj.relprop(R).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        r_attn, r_v = self.matmul_av.relprop(R)
        r_attn, r_v = r_attn / 2, r_v / 2
        state.attention_relevance[self] = r_attn
        if not need_input:
            return None
        # softmax, scale and dropout pass relevance unchanged
        r_q, r_k = self.matmul_qk.relprop(r_attn)
        r_qkv = torch.stack([r_q / 2, r_k / 2, r_v])  # (3, B, H, N, hd)
        r_qkv = r_qkv.permute(1, 3, 0, 2, 4).reshape(B, N, 3 * C)
        return self.qkv.relprop(r_qkv)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = L.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = L.Identity()  # timm: LayerScale only with init_values
        self.drop_path1 = L.Identity()
        self.norm2 = L.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = L.Identity()
        self.drop_path2 = L.Identity()
        # LRP: residual connections as explicit Clone + Add.
        self.clone1, self.add1 = L.Clone(), L.Add()
        self.clone2, self.add2 = L.Clone(), L.Add()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.clone1(x, 2)
        x = self.add1(x1, self.drop_path1(self.ls1(self.attn(self.norm1(x2)))))
        x1, x2 = self.clone2(x, 2)
        return self.add2(x1, self.drop_path2(self.ls2(self.mlp(self.norm2(x2)))))

    def relprop(self, R: Tensor, need_input: bool = True) -> Optional[Tensor]:
        r1, r2 = self.add2.relprop(R)
        r2 = self.mlp.relprop(r2)
        R = self.clone2.relprop((r1, r2))
        r1, r2 = self.add1.relprop(R)
        r2 = self.attn.relprop(r2, need_input=need_input)
        if not need_input:
            return None
        return self.clone1.relprop((r1, r2))


class PatchEmbed(nn.Module):
    """Image to patch tokens; any input whose sides are multiples of the patch."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = L.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = L.Identity()

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {ph}x{pw}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    def relprop(self, R: Tensor, grid: Tuple[int, int]) -> Tensor:
        """R: (B, gh*gw, D) token relevance -> (B, C, H, W) pixel relevance."""
        B, _, D = R.shape
        R = R.transpose(1, 2).reshape(B, D, grid[0], grid[1])
        return self.proj.relprop(R)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al.) / DeiT (Touvron et al.) with timm's names.

    Parameters follow timm; ``distilled=True`` adds DeiT's distillation token
    and second head (``dist_token``, ``head_dist``), whose logits are averaged
    with the class head's as timm does in evaluation.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, distilled: bool = False, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = L.Dropout(drop_rate)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, eps)
            for _ in range(depth)
        ])
        self.norm = L.LayerNorm(embed_dim, eps=eps)
        self.head = L.Linear(embed_dim, num_classes)
        # LRP: explicit modules for the embedding sum and the token pooling.
        self.add_pos = L.Add()
        self.pool = L.TokenSelect(0)
        if distilled:
            self.head_dist = L.Linear(embed_dim, num_classes)
            self.clone_out = L.Clone()
            self.pool_dist = L.TokenSelect(1)
            self.add_heads = L.Add()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.distilled:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- forward ------------------------------------------------------------
    def grid_size(self, x: Tensor) -> Tuple[int, int]:
        ph, pw = self.patch_embed.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw

    def resized_pos_embed(self, grid: Tuple[int, int]) -> Tensor:
        """Position embedding for a (gh, gw) grid (see :func:`resample_pos_embed`)."""
        return resample_pos_embed(self.pos_embed, self.patch_embed.grid_size, grid, self.num_prefix_tokens)

    def forward_features(self, x: Tensor) -> Tensor:
        grid = self.grid_size(x)
        x = self.patch_embed(x)
        B = x.shape[0]
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.distilled:
            prefix.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        x = self.pos_drop(self.add_pos(x, self.resized_pos_embed(grid).expand(B, -1, -1)))
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor) -> Tensor:
        if not self.distilled:
            return self.head(self.pool(x))
        x1, x2 = self.clone_out(x, 2)
        # timm (eval): (head(x[:, 0]) + head_dist(x[:, 1])) / 2
        return self.add_heads(self.head(self.pool(x1)), self.head_dist(self.pool_dist(x2))) / 2

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- relevance ----------------------------------------------------------
    def relprop_head(self, R: Tensor) -> Tensor:
        """Relevance of the logits -> relevance of the last block's output tokens."""
        if not self.distilled:
            return self.pool.relprop(self.head.relprop(R))  # norm: identity
        # the final /2 scales the logits and leaves relevance unchanged
        r1, r2 = self.add_heads.relprop(R)
        r1 = self.pool.relprop(self.head.relprop(r1))
        r2 = self.pool_dist.relprop(self.head_dist.relprop(r2))
        return self.clone_out.relprop((r1, r2))

    def relprop(self, R: Tensor, stop_block: Optional[int] = None, image_size: Optional[Tuple[int, int]] = None) -> Optional[Tensor]:
        """Propagate relevance R (B, num_classes) from the logits.

        Every block's attention relevance lands in the active explanation
        state.  With ``stop_block=s`` the pass ends once block s's attention
        relevance is known and returns None; otherwise it goes on to the
        pixels and returns (B, C, H, W) (``image_size`` gives H, W).
        """
        R = self.relprop_head(R)
        depth = len(self.blocks)
        lowest = 0 if stop_block is None else stop_block
        for i in range(depth - 1, lowest - 1, -1):
            R = self.blocks[i].relprop(R, need_input=(i > lowest or stop_block is None))
        if stop_block is not None:
            return None
        # the embedding sum: the tokens keep their share, the position
        # embedding's share is dropped; then the prefix tokens are dropped
        R, _ = self.add_pos.relprop(R)
        R = R[:, self.num_prefix_tokens:]
        if image_size is None:
            raise ValueError("image_size is needed to propagate to the pixels")
        ph, pw = self.patch_embed.patch_size
        grid = (image_size[0] // ph, image_size[1] // pw)
        return self.patch_embed.relprop(R, grid)


# --------------------------------------------------------------------------
# Factories (one line of configuration each) and loading
# --------------------------------------------------------------------------
_CONFIGS: Dict[str, dict] = {
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mean=HALF, std=HALF),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mean=HALF, std=HALF),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mean=HALF, std=HALF),
    "deit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "deit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "deit_base_distilled_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, distilled=True,
                                            mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


def create_model(name: str, **kwargs) -> VisionTransformer:
    """Build a factory model by name; keyword arguments override its config.

    The model gets a ``default_cfg`` dict (input size, mean, std) as timm
    models do, which the scripts use for preprocessing.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(_CONFIGS)}")
    cfg = dict(_CONFIGS[name])
    mean, std = kwargs.pop("mean", cfg.pop("mean")), kwargs.pop("std", cfg.pop("std"))
    cfg.update(kwargs)
    model = VisionTransformer(**cfg)
    model.default_cfg = {"architecture": name, "input_size": (3, *model.patch_embed.img_size),
                         "mean": tuple(mean), "std": tuple(std)}
    return model


def vit_small_patch16_224(**kwargs) -> VisionTransformer:
    return create_model("vit_small_patch16_224", **kwargs)


def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    return create_model("vit_base_patch16_224", **kwargs)


def vit_large_patch16_224(**kwargs) -> VisionTransformer:
    return create_model("vit_large_patch16_224", **kwargs)


def deit_small_patch16_224(**kwargs) -> VisionTransformer:
    return create_model("deit_small_patch16_224", **kwargs)


def deit_base_patch16_224(**kwargs) -> VisionTransformer:
    return create_model("deit_base_patch16_224", **kwargs)


def deit_base_distilled_patch16_224(**kwargs) -> VisionTransformer:
    return create_model("deit_base_distilled_patch16_224", **kwargs)


MODEL_FACTORIES = {name: globals()[name] for name in _CONFIGS}


def from_timm(timm_model: nn.Module) -> VisionTransformer:
    """The matching LRP copy of a live timm ViT/DeiT, holding its weights.

    Only the plain pre-norm architecture is supported (class token, absolute
    position embedding, no LayerScale, registers or QK-norm); anything else
    is refused with the reason.
    """
    problems = []
    if getattr(timm_model, "global_pool", "token") != "token":
        problems.append(f"global_pool={timm_model.global_pool!r} (only 'token')")
    if getattr(timm_model, "num_reg_tokens", 0):
        problems.append("register tokens")
    if getattr(timm_model, "pos_embed", None) is None:
        problems.append("no absolute position embedding")
    if not getattr(timm_model, "has_class_token", True):
        problems.append("no class token")
    blocks = getattr(timm_model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"{type(timm_model).__name__} has no transformer blocks; not a timm ViT")
    blk = blocks[0]
    if not isinstance(getattr(blk, "ls1", nn.Identity()), nn.Identity):
        problems.append("LayerScale")
    if not isinstance(getattr(blk.attn, "q_norm", nn.Identity()), nn.Identity):
        problems.append("QK normalisation")
    if problems:
        raise ValueError(f"cannot copy {type(timm_model).__name__}: unsupported " + ", ".join(problems))
    pe = timm_model.patch_embed
    distilled = getattr(timm_model, "dist_token", None) is not None
    embed_dim = timm_model.pos_embed.shape[-1]
    model = VisionTransformer(
        img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.proj.in_channels,
        num_classes=timm_model.head.out_features if isinstance(timm_model.head, nn.Linear) else 0,
        embed_dim=embed_dim, depth=len(blocks), num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        distilled=distilled, eps=blk.norm1.eps,
    )
    model.load_state_dict(timm_model.state_dict(), strict=True)
    cfg = getattr(timm_model, "pretrained_cfg", None) or {}
    model.default_cfg = {"architecture": cfg.get("architecture", type(timm_model).__name__),
                         "input_size": (3, *model.patch_embed.img_size),
                         "mean": tuple(cfg.get("mean", IMAGENET_MEAN)), "std": tuple(cfg.get("std", IMAGENET_STD))}
    p = next(timm_model.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()  # same weights: same device and dtype


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Load a checkpoint file into ``model``; a mismatch names every key and
    shape that did not fit (position embeddings of another grid are resampled)."""
    return load_checkpoint_state(model, read_state_dict(path), path, strict)


def load_checkpoint_state(model: nn.Module, state: Dict[str, Tensor], path: str, strict: bool = True) -> nn.Module:
    """:func:`load_checkpoint` for a state dict already read from ``path``."""
    return load_state(model, state, path, strict, filter_fn=_pos_embed_filter)


def _pos_embed_filter(state: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Resample a checkpoint's position embedding to the model's grid (timm's ``checkpoint_filter_fn`` idea)."""
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape \
            and isinstance(model, VisionTransformer):
        state["pos_embed"] = _resample_checkpoint_pos_embed(state["pos_embed"], model)
    return state


def _resample_checkpoint_pos_embed(pos: Tensor, model: VisionTransformer) -> Tensor:
    n = model.num_prefix_tokens
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] <= n:  # another architecture's tensor
        return pos  # left for load_checkpoint to report as a shape mismatch
    side = math.isqrt(pos.shape[1] - n)
    if side * side != pos.shape[1] - n or pos.shape[-1] != model.embed_dim:
        return pos  # left for load_checkpoint to report as a shape mismatch
    return resample_pos_embed(pos, (side, side), model.patch_embed.grid_size, n)


# --------------------------------------------------------------------------
# Model directories (config.json + model.safetensors) and one loading entry
# --------------------------------------------------------------------------
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_KWARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
           "mlp_ratio", "qkv_bias", "distilled", "eps")


def model_config(model: VisionTransformer) -> dict:
    """Constructor arguments (and preprocessing) that rebuild ``model``."""
    blk = model.blocks[0]
    kwargs = dict(img_size=list(model.patch_embed.img_size), patch_size=list(model.patch_embed.patch_size),
                  in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
                  embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=blk.attn.num_heads,
                  mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
                  distilled=model.distilled, eps=blk.norm1.eps)
    cfg = getattr(model, "default_cfg", {}) or {}
    return {"model_kwargs": kwargs, "mean": list(cfg.get("mean", HALF)), "std": list(cfg.get("std", HALF)),
            "architecture": cfg.get("architecture", "VisionTransformer")}


def save_model_dir(model: VisionTransformer, directory: str, extra: Optional[dict] = None,
                   half: bool = False) -> str:
    """Write ``config.json`` and ``model.safetensors`` (fp16 with ``half``)."""
    import json

    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    cfg = model_config(model)
    cfg.update(extra or {})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    return directory


def load_model_dir(directory: str) -> VisionTransformer:
    """Rebuild a model written by :func:`save_model_dir` (weights cast to fp32)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = read_model_config(directory)  # validated: numbers where numbers belong, consistent sizes
    try:
        kwargs = {k: v for k, v in cfg["model_kwargs"].items() if k in _KWARGS}
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a model config ({exc})") from None
    model = VisionTransformer(**kwargs)
    state = read_state_dict(os.path.join(directory, WEIGHTS_NAME))
    own = model.state_dict()
    load_checkpoint_state(model, {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()},
                          os.path.join(directory, WEIGHTS_NAME))
    model.default_cfg = {"architecture": cfg.get("architecture", "VisionTransformer"),
                         "input_size": (kwargs.get("in_chans", 3), *model.patch_embed.img_size),
                         "mean": tuple(cfg.get("mean", HALF)), "std": tuple(cfg.get("std", HALF))}
    if isinstance(cfg.get("class_names"), list):
        model.default_cfg["class_names"] = list(cfg["class_names"])
    return model.eval()


def load_model(name: str, weights: Optional[str] = None) -> VisionTransformer:
    """The one way scripts get a model: a model directory (``weights`` holds
    config.json), or factory ``name`` plus an optional checkpoint file.
    Without weights the model is randomly initialised."""
    if weights is not None and os.path.isdir(weights):
        return load_model_dir(weights)
    state = read_state_dict(weights) if weights is not None else None  # a bad file is refused before any model is built
    model = create_model(name)
    if state is not None:
        load_checkpoint_state(model, state, weights)
    return model.eval()


# --------------------------------------------------------------------------
# How modules.explain explains this copy (every method)
# --------------------------------------------------------------------------


@register_adapter
class ViTCopyAdapter(CopyAdapter):
    """The ViT/DeiT copy: [CLS] row (DeiT-distilled: the averaged heads'
    logits, still read at [CLS] per METHODS.md section 2), patch columns
    after the 1 or 2 prefix tokens; full LRP to the pixels."""

    family = "ViT/DeiT LRP copy (baselines.ViT.ViT_LRP.VisionTransformer)"
    examples = tuple(MODEL_FACTORIES)
    stream_name = "image"
    attention_prefix = "blocks"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def depths(self) -> Dict[str, int]:
        return {"image": len(self.model.blocks)}

    def prepare(self, inputs, index):
        feed = feed_dict(inputs, "pixel_values", model_device(self.model))
        feed["grid"] = check_images(feed["pixel_values"], self.model.patch_embed.patch_size, "VisionTransformer")
        return feed

    def forward(self, feed, method):
        x = feed["pixel_values"].detach()
        if method.needs_grad or method.input_gradient:
            x.requires_grad_(True)  # a leaf: frozen models work too
        feed["_leaf"] = x
        return self.model(x)

    def gradient_relevance(self, feed, leaf, grad):
        return (leaf * grad).sum(dim=1)  # pixels x gradient, summed over colour channels

    def streams(self, feed, state):
        calls = self.calls(state)
        B, N = calls[0].probs.shape[0], calls[0].probs.shape[-1]
        device = calls[0].probs.device
        readout = Readout(one_hot_rows(B, N, 0, device, calls[0].probs.dtype), column_mask(B, N, self.model.num_prefix_tokens, device),
                          grid=feed["grid"])
        return {"image": Stream("image", list(calls), readout)}

    def run_relprop(self, seed, stop, feed):
        r = self.model.relprop(seed, stop_block=stop, image_size=tuple(feed["pixel_values"].shape[-2:]))
        return None if r is None else r.sum(dim=1)
