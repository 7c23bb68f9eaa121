"""Is the map faithful to the model?  Perturbation and sanity tests for any map (issue 24).

Every function takes maps as :func:`modules.explain.explain` returns them (or
any other maps of the same shape) and the model they explain, so every
registry method on every supported model is held to the same tests:

:func:`road`
    ROAD (Rong et al., ICML 2022): remove the most (``"morf"``) or least
    (``"lerf"``) relevant fraction of the pixels, fill them by noisy linear
    imputation (the authors' neighbour weights: 1/6 for the four direct
    neighbours, 1/12 for the diagonal ones; one sparse solve per image and
    fraction, on the CPU in float64), and read the softmax probability of the
    explained class.  ``removal_count(f, n) = floor(f * n + 0.5)`` pixels go.
:func:`flip_curves` / :func:`flipping`
    Flipping curves on the logit (the AttnLRP paper's protocol; Quantus's
    *pixel flipping* / *region perturbation*): image patches (or pixels) or
    text tokens are replaced, in relevance order, by a baseline; the
    explained logit and probability are read after every step.  Baselines:
    images ``"zero"`` (0 in the model's normalised input space: the
    normalisation mean colour), ``"mean"`` (the unperturbed image's mean per
    channel) or ``"blur"`` (a Gaussian blur of the unperturbed image, sigma =
    half a patch side); text: the ids of a token (the scripts use the
    tokenizer's ``[MASK]``; ``[UNK]`` works the same way).  A zero
    *embedding* is not offered (it needs ``inputs_embeds``, which not every
    adapter forwards).  Areas under the curves are trapezoids over the
    flipped share 0..1; ``faithfulness = AUC(LeRF) - AUC(MoRF)`` (higher is
    better).
:func:`cascading_randomization`
    Adebayo et al. (NeurIPS 2018), cascading: on a copy of the model,
    randomise the head, then each block from the last to the first, then the
    embeddings (:func:`randomization_stages`), re-explain the same classes
    after every stage and report the Spearman rank correlation and the SSIM
    between each map and the original one.
:func:`sparseness`, :func:`entropy`
    Complexity: the Gini index of ``|map|`` and the Shannon entropy (nats) of
    ``|map| / sum |map|``.

Ties: every ranking is :func:`modules.ranking.ranking_order` with the
project's rule (``tie_break="random"`` by default: a seeded permutation of
the positions decides among equal values; ``"raster"``: the lower position
first; ``"topk"`` defines no nested order and is refused).  A constant map
therefore removes the same positions first under MoRF and LeRF.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.methods import Index, resolve_index
from modules.ranking import DEFAULT_TIE_BREAK, DEFAULT_TIE_SEED, check_tie_break, ranking_order

__all__ = [
    "ROAD_FRACTIONS", "NEIGHBOUR_WEIGHTS", "IMAGE_BASELINES", "removal_count", "model_logits", "linear_impute",
    "road", "FlipCurves", "flip_curves", "flipping", "auc", "randomization_stages", "randomize_stage",
    "cascading_randomization", "spearman", "ssim", "sparseness", "entropy",
]

ROAD_FRACTIONS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: ((row offset, column offset), weight): the ROAD authors' imputation weights.
NEIGHBOUR_WEIGHTS: Tuple[Tuple[Tuple[int, int], float], ...] = (
    ((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
    ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))

IMAGE_BASELINES: Tuple[str, ...] = ("zero", "mean", "blur")
ORDERS: Tuple[str, ...] = ("morf", "lerf")


# --------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------
def _check_order(order: str) -> bool:
    """True for MoRF (most relevant first), False for LeRF."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    return order == "morf"


def _check_ranking_rule(tie_break: str) -> None:
    check_tie_break(tie_break)
    if tie_break == "topk":
        raise ValueError("tie_break='topk' gives a set per k, not one removal order; use 'random' or 'raster'")


def removal_count(fraction: float, n: int) -> int:
    """How many of ``n`` items a fraction removes: ``floor(fraction * n + 0.5)``."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction {fraction} outside 0..1")
    return int(math.floor(float(fraction) * n + 0.5))


def model_logits(model: nn.Module, inputs: Any) -> Tensor:
    """The model's logits (B, classes) for a tensor or a dict of inputs (Hugging Face)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise ValueError(f"the model must return (B, classes) logits, not {type(out).__name__}")
    return out


def _batched_logits(model: nn.Module, inputs: Union[Tensor, Dict[str, Tensor]], batch_size: Optional[int]) -> Tensor:
    n = next(iter(inputs.values())).shape[0] if isinstance(inputs, Mapping) else inputs.shape[0]
    step = n if not batch_size else int(batch_size)
    outs = []
    with torch.no_grad():
        for lo in range(0, n, step):
            part = ({k: v[lo:lo + step] for k, v in inputs.items()} if isinstance(inputs, Mapping)
                    else inputs[lo:lo + step])
            outs.append(model_logits(model, part).detach())
    return torch.cat(outs)


def _explained(model: nn.Module, inputs: Any, index: Index) -> Tuple[Tensor, Tensor]:
    """(clean logits, explained class per sample)."""
    with torch.no_grad():
        logits = model_logits(model, inputs).detach()
    return logits, resolve_index(index, logits).to(logits.device)


def auc(curve: Tensor, fractions: Optional[Tensor] = None) -> Tensor:
    """Trapezoid area under (B, S) curves over ``fractions`` (S,) (default: 0..1 evenly)."""
    curve = torch.as_tensor(curve)
    if fractions is None:
        fractions = torch.linspace(0, 1, curve.shape[-1], dtype=torch.float64)
    return torch.trapezoid(curve.to(torch.float64), torch.as_tensor(fractions, dtype=torch.float64), dim=-1)


# --------------------------------------------------------------------------
# ROAD
# --------------------------------------------------------------------------
def linear_impute(image: Tensor, removed: Tensor) -> np.ndarray:
    """ROAD's linear imputation (no noise): (C, H, W) image, (H, W) bool mask
    of removed pixels -> (C, H, W) float64 array in which every removed pixel
    is the weighted mean of its in-bounds neighbours (known or imputed):
    ``sum_j w_j (x_j - x_i) = 0`` for every removed ``i``, solved exactly."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    img = image.detach().cpu().to(torch.float64).numpy()
    C, H, W = img.shape
    mask = removed.detach().cpu().numpy().astype(bool).reshape(-1)
    flat = img.reshape(C, -1).copy()
    unknown = np.flatnonzero(mask)
    m = unknown.size
    if m == 0:
        return flat.reshape(C, H, W)
    if m == mask.size:
        raise ValueError("linear imputation needs at least one kept pixel")
    vid = np.full(mask.size, -1, dtype=np.int64)
    vid[unknown] = np.arange(m)
    rows, cols = unknown // W, unknown % W
    b = np.zeros((m, C))
    diag = np.zeros(m)
    ai, aj, av = [], [], []
    for (dr, dc), w in NEIGHBOUR_WEIGHTS:
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        eq = np.flatnonzero(inside)
        nb = r[inside] * W + c[inside]
        diag[eq] += w
        known = ~mask[nb]
        b[eq[known]] -= w * flat[:, nb[known]].T
        ai.append(eq[~known])
        aj.append(vid[nb[~known]])
        av.append(np.full(int((~known).sum()), w))
    ai.append(np.arange(m))
    aj.append(np.arange(m))
    av.append(-diag)
    A = coo_matrix((np.concatenate(av), (np.concatenate(ai), np.concatenate(aj))), shape=(m, m)).tocsc()
    x = np.asarray(spsolve(A, b)).reshape(m, C)
    flat[:, unknown] = x.T
    return flat.reshape(C, H, W)


def road(model: nn.Module, images: Tensor, maps: Tensor, index: Index = None,
         fractions: Sequence[float] = ROAD_FRACTIONS, order: str = "morf", noise: float = 0.01,
         generator: Optional[torch.Generator] = None, tie_break: str = DEFAULT_TIE_BREAK,
         seed: int = DEFAULT_TIE_SEED, batch_size: Optional[int] = None) -> Tensor:
    """ROAD: softmax probability of the explained class after removing a
    fraction of the pixels, (B, len(fractions)).

    ``images`` (B, C, H, W) as the model takes them; ``maps`` (B, H, W) at
    image size (upsample patch maps with :func:`modules.explain.upsample`).
    ``order="morf"`` removes the ``removal_count(f, H*W)`` most relevant
    pixels, ``"lerf"`` the least relevant; ties follow ``tie_break``/``seed``
    (:mod:`modules.ranking`).  Removed pixels are linearly imputed
    (:func:`linear_impute`) plus ``noise * N(0, 1)`` drawn from ``generator``
    (torch's global one when None) in the order image, fraction, channel,
    pixel (so a batch and its images one by one with the same generator
    draw the same noise).  ``index``: None (each image's predicted class), an
    int or one class per image.  The model runs on batches of
    ``batch_size`` perturbed images (default: B).

    pytorch-grad-cam's ROAD removes instead every pixel at or above
    ``np.percentile(map, 100 (1 - f))``: ``N - ceil((N - 1)(1 - f))``
    pixels when the values are distinct (the same count as here for
    N = 100, one more or fewer at some fractions of other sizes), and every
    pixel tied at the threshold.  Noise: the same N(0, 1) draw per removed
    pixel and channel; with ``noise=0`` both give the same probabilities.

    Cost: one sparse LU per image and fraction (``f * H * W`` unknowns,
    SuperLU, float64) on the CPU: measured 0.07 s for 96 x 96 and 0.6 s for
    224 x 224 at f = 0.9 on the project's shared 2-core CPU (under load).
    """
    morf = _check_order(order)
    _check_ranking_rule(tie_break)
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), not {tuple(images.shape)}")
    B, C, H, W = images.shape
    if tuple(maps.shape) != (B, H, W):
        raise ValueError(f"maps must be (B, H, W) = {(B, H, W)} at image size, not {tuple(maps.shape)}")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be finite and non-negative, not {noise}")
    _, target = _explained(model, images, index)
    scores = maps.detach().reshape(B, -1).cpu().to(torch.float64)
    order_idx = ranking_order(scores, descending=morf, tie_break=tie_break, seed=seed)
    counts = [removal_count(f, H * W) for f in fractions]
    perturbed = []
    for i in range(B):
        for k in counts:
            removed = torch.zeros(H * W, dtype=torch.bool)
            removed[order_idx[i, :k]] = True
            filled = torch.from_numpy(linear_impute(images[i], removed.reshape(H, W))).reshape(C, -1)
            if noise > 0 and k > 0:
                cols = torch.nonzero(removed).reshape(-1)  # ascending flat positions
                draw = torch.randn((C, k), generator=generator, dtype=images.dtype if images.is_floating_point()
                                   else torch.float32)
                filled[:, cols] += noise * draw.to(torch.float64)
            perturbed.append(filled.reshape(C, H, W).to(images.dtype))
    batch = torch.stack(perturbed).to(images.device)
    logits = _batched_logits(model, batch, batch_size)
    probs = torch.softmax(logits, dim=-1)
    rows = target.repeat_interleave(len(counts)).to(probs.device)
    return probs.gather(1, rows[:, None]).reshape(B, len(counts))


# --------------------------------------------------------------------------
# Flipping curves
# --------------------------------------------------------------------------
class FlipCurves(NamedTuple):
    """Curves of one flipping run.

    ``fractions`` (S,): share of the units flipped at each point (0 first, 1
    last); ``counts`` (B, S): units flipped per sample; ``logit`` and
    ``prob`` (B, S): the explained class's logit and softmax probability;
    ``target`` (B,): the explained class."""

    fractions: Tensor
    counts: Tensor
    logit: Tensor
    prob: Tensor
    target: Tensor


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype).to(x.device)
    C = x.shape[1]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    y = x
    if pad < radius:  # tiny images: pad by replication instead of reflection
        y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    else:
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _image_baseline(x: Tensor, baseline: Union[str, float, Tensor], patch: Tuple[int, int]) -> Tensor:
    if isinstance(baseline, Tensor):
        return baseline.to(x).expand_as(x)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "blur":
        return _gaussian_blur(x, max(1.0, max(patch) / 2))
    raise ValueError(f"image baseline must be one of {IMAGE_BASELINES}, a number or a tensor, not {baseline!r}")


def _image_units(x: Tensor, maps: Tensor, patch_size: Optional[int]) -> Tuple[Tensor, Tuple[int, int]]:
    """Relevance per flip unit (B, gh*gw) and the unit's size in pixels."""
    B, C, H, W = x.shape
    if maps.dim() != 3 or maps.shape[0] != B:
        raise ValueError(f"image maps must be (B, h, w), not {tuple(maps.shape)}")
    h, w = maps.shape[1:]
    if (h, w) == (H, W) and patch_size:
        p = int(patch_size)
        if H % p or W % p:
            raise ValueError(f"patch_size {p} does not divide the {H}x{W} image")
        units = maps.reshape(B, H // p, p, W // p, p).sum(dim=(2, 4))
        return units.reshape(B, -1), (p, p)
    if H % h or W % w:
        raise ValueError(f"a {h}x{w} map does not tile a {H}x{W} image")
    return maps.reshape(B, -1), (H // h, W // w)


def flip_curves(model: nn.Module, inputs: Union[Tensor, Dict[str, Tensor]], maps: Tensor, index: Index = None,
                order: str = "morf", baseline: Union[str, float, int, Tensor] = "zero", steps: Optional[int] = None,
                patch_size: Optional[int] = None, valid: Optional[Tensor] = None,
                tie_break: str = DEFAULT_TIE_BREAK, seed: int = DEFAULT_TIE_SEED,
                batch_size: Optional[int] = None) -> FlipCurves:
    """Flip units in relevance order and read the explained logit after each step.

    Images: ``inputs`` (B, C, H, W); ``maps`` (B, gh, gw) patch maps (a unit
    is one patch of H/gh x W/gw pixels), or (B, H, W) pixel maps (a unit is
    one pixel, or with ``patch_size`` one patch whose relevance is the sum
    of its pixels'); ``baseline`` ``"zero"``, ``"mean"``, ``"blur"``, a number
    or a (C, H, W) / (B, C, H, W) tensor.
    Text: ``inputs`` a dict with ``input_ids`` (and ``attention_mask``, ...);
    ``maps`` (B, N) per token; ``baseline`` the token id that replaces a
    flipped token (``tokenizer.mask_token_id`` for ``[MASK]``); ``valid``
    (B, N) bool says which tokens may be flipped (default: attended tokens
    except the first and the last, i.e. ``[CLS]`` and ``[SEP]``).

    ``steps``: S + 1 points at ``k_b = floor(s / S * U_b + 0.5)`` units for
    s = 0..S (``U_b`` flippable units of sample b); default S = max U_b (one
    unit per step).  Ties among equal relevance follow ``tie_break``/``seed``.
    """
    morf = _check_order(order)
    _check_ranking_rule(tie_break)
    text = isinstance(inputs, Mapping)
    logits0, target = _explained(model, inputs, index)
    if text:
        ids = inputs["input_ids"]
        B, N = ids.shape
        if tuple(maps.shape) != (B, N):
            raise ValueError(f"text maps must be (B, N) = {(B, N)}, not {tuple(maps.shape)}")
        if isinstance(baseline, bool) or not isinstance(baseline, int):
            raise ValueError(f"a text baseline is a token id (e.g. tokenizer.mask_token_id), not {baseline!r}")
        if valid is None:
            att = inputs.get("attention_mask", torch.ones_like(ids)).bool()
            valid = att.clone()
            valid[:, 0] = False
            last = att.long().cumsum(1).argmax(1)
            valid[torch.arange(B), last] = False
        scores = maps.detach().to(torch.float64).cpu()
        units = N
    else:
        x = inputs
        B = x.shape[0]
        scores, patch = _image_units(x, maps.detach(), patch_size)
        scores = scores.to(torch.float64).cpu()
        units = scores.shape[1]
        if valid is None:
            valid = torch.ones(B, units, dtype=torch.bool)
        base = _image_baseline(x, baseline, patch)
        gh, gw = x.shape[2] // patch[0], x.shape[3] // patch[1]
    valid = valid.to(torch.bool).cpu()
    if tuple(valid.shape) != (B, units):
        raise ValueError(f"valid must be (B, {units}), not {tuple(valid.shape)}")
    fill = torch.tensor(-math.inf if morf else math.inf, dtype=torch.float64)
    ranked = ranking_order(torch.where(valid, scores, fill), descending=morf, tie_break=tie_break, seed=seed)
    n_valid = valid.sum(1)
    S = int(steps) if steps else int(n_valid.max())
    if S <= 0:
        raise ValueError("nothing to flip: steps and the flippable units must be positive")
    s = torch.arange(S + 1, dtype=torch.float64)
    counts = torch.floor(s[None, :] / S * n_valid[:, None].to(torch.float64) + 0.5).long()  # (B, S+1)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(units).expand(B, units).contiguous())
    flipped = rank[:, None, :] < counts[:, :, None]  # (B, S+1, U)
    if text:
        fill_id = torch.full_like(ids, int(baseline))
        batch = {k: (v[:, None].expand(B, S + 1, *v.shape[1:]).reshape(B * (S + 1), *v.shape[1:])
                     if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B else v)
                 for k, v in inputs.items()}
        m = flipped.reshape(B * (S + 1), N).to(ids.device)
        batch["input_ids"] = torch.where(m, fill_id[:, None].expand(B, S + 1, N).reshape(-1, N), batch["input_ids"])
        logits = _batched_logits(model, batch, batch_size)
    else:
        m = flipped.reshape(B, S + 1, gh, gw).to(x.device)
        m = m.repeat_interleave(patch[0], dim=2).repeat_interleave(patch[1], dim=3)[:, :, None]  # (B,S+1,1,H,W)
        batch = torch.where(m, base[:, None], x[:, None]).reshape(B * (S + 1), *x.shape[1:])
        logits = _batched_logits(model, batch, batch_size)
    logits = logits.reshape(B, S + 1, -1)
    rows = target.to(logits.device)[:, None, None].expand(B, S + 1, 1)
    logit = logits.gather(2, rows)[..., 0]
    prob = torch.softmax(logits, dim=-1).gather(2, rows)[..., 0]
    return FlipCurves(s / S, counts, logit.cpu(), prob.cpu(), target.cpu())


def flipping(model: nn.Module, inputs: Union[Tensor, Dict[str, Tensor]], maps: Tensor, index: Index = None,
             **kwargs: Any) -> Dict[str, Any]:
    """MoRF and LeRF :func:`flip_curves` with their areas and the faithfulness
    scores: ``{"morf": FlipCurves, "lerf": FlipCurves, "auc": {order: {"logit":
    (B,), "prob": (B,)}}, "faithfulness": {"logit": (B,), "prob": (B,)}}``
    with ``faithfulness = AUC(LeRF) - AUC(MoRF)`` (float64)."""
    out: Dict[str, Any] = {"auc": {}}
    for order in ORDERS:
        c = flip_curves(model, inputs, maps, index, order=order, **kwargs)
        out[order] = c
        out["auc"][order] = {"logit": auc(c.logit, c.fractions), "prob": auc(c.prob, c.fractions)}
    out["faithfulness"] = {q: out["auc"]["lerf"][q] - out["auc"]["morf"][q] for q in ("logit", "prob")}
    return out


# --------------------------------------------------------------------------
# Model-parameter randomisation
# --------------------------------------------------------------------------
def _block_container(model: nn.Module) -> Optional[Tuple[str, List[str]]]:
    """The longest ModuleList/Sequential of same-class children (the blocks)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 0:
            kinds = {type(c) for c in mod}
            if len(kinds) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, [f"{name}.{k}" if name else k for k, _ in mod.named_children()])
    return best


def randomization_stages(model: nn.Module) -> List[Tuple[str, List[str]]]:
    """The cascade, top down: ``[(stage name, parameter names), ...]``.

    The blocks are the longest ``ModuleList``/``Sequential`` of modules of
    one class (ViT ``blocks``, BERT ``encoder.layer``); parameters registered
    after them form the first stage (``"head"``: final norm, pooler,
    classifier), then each block from the last to the first, then the
    parameters registered before them (``"embeddings"``).  A model without
    such a container gets one stage per parameterised module, last first.
    """
    params = [n for n, _ in model.named_parameters()]
    found = _block_container(model)
    if found is None or len(found[1]) < 2:
        owners: List[str] = []
        for n in params:
            owner = n.rsplit(".", 1)[0] if "." in n else ""
            if owner not in owners:
                owners.append(owner)
        return [(o or "(root)", [n for n in params if (n.rsplit(".", 1)[0] if "." in n else "") == o])
                for o in reversed(owners)]
    cname, blocks = found
    prefix = f"{cname}." if cname else ""
    in_blocks = [n for n in params if n.startswith(prefix)]
    first = params.index(in_blocks[0]) if in_blocks else len(params)
    last = params.index(in_blocks[-1]) if in_blocks else -1
    before = [n for i, n in enumerate(params) if i < first and not n.startswith(prefix)]
    after = [n for i, n in enumerate(params) if i > last and not n.startswith(prefix)]
    stages: List[Tuple[str, List[str]]] = []
    if after:
        stages.append(("head", after))
    for b in reversed(blocks):
        names = [n for n in in_blocks if n.startswith(b + ".")]
        if names:
            stages.append((b, names))
    if before:
        stages.append(("embeddings", before))
    return stages


def randomize_stage(model: nn.Module, names: Sequence[str], seed: int) -> None:
    """Re-draw the parameters ``names`` of ``model`` in place, seeded.

    Every module whose own parameters all lie in ``names`` and that has
    ``reset_parameters`` is reset (PyTorch's default initialisation, in
    ``named_modules`` order, last first, as Quantus's MPRT walks them) under
    ``torch.manual_seed(seed)``; parameters no such module owns (class token,
    position embeddings) are drawn from N(0, 0.02^2) after them.  Torch's
    global random state is restored afterwards."""
    wanted = set(names)
    covered = set()
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices}) if devices else []):
        torch.manual_seed(int(seed))
        with torch.no_grad():
            for mname, mod in reversed(list(model.named_modules())):
                own = [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)]
                if own and all(n in wanted for n in own) and hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
                    covered.update(own)
            for n, p in model.named_parameters():
                if n in wanted and n not in covered:
                    p.normal_(0.0, 0.02)


def spearman(a: Tensor, b: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Spearman rank correlation per sample of (B, ...) maps, float64 (B,):
    the Pearson correlation of the average ranks (ties share their mean
    rank, as ``scipy.stats.spearmanr``); NaN where a map is constant.
    ``mask`` (same shape, bool): correlate only those entries (text: the
    tokens, not the padding)."""
    from scipy.stats import rankdata

    x = np.asarray(torch.as_tensor(a).detach().cpu().to(torch.float64).reshape(len(a), -1))
    y = np.asarray(torch.as_tensor(b).detach().cpu().to(torch.float64).reshape(len(b), -1))
    if mask is not None:
        keep = np.asarray(torch.as_tensor(mask).detach().cpu().reshape(len(a), -1)).astype(bool)
        return torch.cat([spearman(torch.from_numpy(x[i][keep[i]][None]), torch.from_numpy(y[i][keep[i]][None]))
                          for i in range(len(x))])
    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    return torch.from_numpy(r)


def ssim(a: Tensor, b: Tensor, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean structural similarity per sample of (B, h, w) maps, float64 (B,).

    ``skimage.metrics.structural_similarity`` restated (uniform
    ``win_size`` window, sample covariances, borders of (win_size-1)/2
    cropped), with the data range of each pair (max - min over both maps),
    as Quantus's ``ssim`` calls it.  Needs h, w >= win_size."""
    from scipy.ndimage import uniform_filter

    x = np.asarray(torch.as_tensor(a).detach().cpu().to(torch.float64))
    y = np.asarray(torch.as_tensor(b).detach().cpu().to(torch.float64))
    if x.ndim != 3 or x.shape != y.shape or min(x.shape[1:]) < win_size:
        raise ValueError(f"ssim needs two (B, h, w) maps with h, w >= {win_size}, not {x.shape}, {y.shape}")
    out = np.empty(len(x))
    pad = (win_size - 1) // 2
    cov_norm = win_size ** 2 / (win_size ** 2 - 1)
    for i, (p, q) in enumerate(zip(x, y)):
        R = float(max(p.max(), q.max()) - min(p.min(), q.min()))
        ux, uy = uniform_filter(p, win_size), uniform_filter(q, win_size)
        uxx, uyy, uxy = uniform_filter(p * p, win_size), uniform_filter(q * q, win_size), uniform_filter(p * q, win_size)
        vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
        c1, c2 = (k1 * R) ** 2, (k2 * R) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
        out[i] = s[pad:s.shape[0] - pad, pad:s.shape[1] - pad].mean()
    return torch.from_numpy(out)


def cascading_randomization(model: nn.Module, inputs: Any, explain_fn: Callable[[nn.Module, Any, Tensor], Tensor],
                            index: Index = None, stages: Optional[Sequence[Tuple[str, Sequence[str]]]] = None,
                            seed: int = 0, stage_seeds: Optional[Sequence[int]] = None,
                            absolute: bool = False, mask: Optional[Tensor] = None) -> Dict[str, Any]:
    """Cascading model-parameter randomisation (Adebayo et al. 2018).

    ``explain_fn(model, inputs, target)`` returns (B, ...) maps for the
    classes ``target`` (B,).  The classes are fixed from ``model`` (``index``,
    default the predicted ones) and explained again after each stage of
    ``stages`` (default :func:`randomization_stages`), randomised in turn and
    kept (cascading) on a deep copy: ``model`` is left unchanged.  Stage j is
    drawn with ``stage_seeds[j]`` (default ``seed + j``).  Returns
    ``{"stages": names, "spearman": (S, B), "ssim": (S, B) or None (maps not
    2-D or smaller than 7 x 7, or ``mask`` given), "original": maps}``
    comparing each stage's maps with the original ones (of ``|map|`` when
    ``absolute``; Spearman over the ``mask`` entries only when given)."""
    _, target = _explained(model, inputs, index)
    stages = list(stages) if stages is not None else randomization_stages(model)
    seeds = list(stage_seeds) if stage_seeds is not None else [int(seed) + j for j in range(len(stages))]
    if len(seeds) != len(stages):
        raise ValueError(f"stage_seeds holds {len(seeds)} seeds for {len(stages)} stages")

    def prep(m: Tensor) -> Tensor:
        m = m.detach().cpu().to(torch.float64)
        return m.abs() if absolute else m

    original = prep(explain_fn(model, inputs, target))
    two_d = original.dim() == 3 and min(original.shape[1:]) >= 7 and mask is None
    work = copy.deepcopy(model)
    rho, sim = [], []
    for (name, names), s in zip(stages, seeds):
        randomize_stage(work, names, s)
        maps = prep(explain_fn(work, inputs, target))
        rho.append(spearman(original, maps, mask))
        if two_d:
            sim.append(ssim(original, maps))
    return {"stages": [n for n, _ in stages], "spearman": torch.stack(rho) if rho else torch.empty(0),
            "ssim": torch.stack(sim) if two_d and sim else None, "original": original, "target": target.cpu()}


# --------------------------------------------------------------------------
# Complexity
# --------------------------------------------------------------------------
def sparseness(maps: Tensor) -> Tensor:
    """Gini index of ``|map|`` per sample (Chalasani et al. 2020), float64
    (B,): ``sum_i (2i - n - 1) a_(i) / (n sum_i a_i)`` over the ascending
    values ``a_(1..n)``; 0 for a map of equal values (and for an all-zero
    map), towards 1 when one value holds all the mass.  (Quantus adds 1e-7
    to every value first; not here.)"""
    a = torch.as_tensor(maps).detach().cpu().to(torch.float64).reshape(len(maps), -1).abs()
    a = torch.sort(a, dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=torch.float64)
    total = a.sum(1)
    g = ((2 * i - n - 1) * a).sum(1) / (n * total)
    return torch.where(total > 0, g, torch.zeros_like(g))


def entropy(maps: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``p = |map| / sum |map|`` per sample, float64
    (B,), with 0 log 0 = 0; NaN for an all-zero map.  log(n) for a map of
    equal values, 0 when one value holds all the mass."""
    a = torch.as_tensor(maps).detach().cpu().to(torch.float64).reshape(len(maps), -1).abs()
    total = a.sum(1, keepdim=True)
    p = a / total
    h = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(1)
    return torch.where(total[:, 0] > 0, h, torch.full_like(h, math.nan))
