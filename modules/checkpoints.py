"""Reading checkpoints safely, and saying exactly what did not fit.

Nothing here unpickles arbitrary objects: ``.safetensors`` files, or
``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.bin``.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["CheckpointError", "read_state_dict", "mismatch_report", "file_sha256", "weights_sha256"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str) -> Dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` read
    with ``torch.load(weights_only=True)``; unwraps ``{"model": ...}`` and
    ``{"state_dict": ...}`` (DeiT releases, training scripts)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({_first_line(exc)})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return obj


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _first(keys: Sequence[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def mismatch_report(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """'' when ``state`` fits a model whose state dict is ``own``; otherwise
    one line naming the missing and unexpected keys and the shape mismatches."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys ({_first(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys ({_first(unexpected)})")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:5]))
    return "; ".join(parts)


def file_sha256(*paths: str) -> str:
    """SHA-256 (hex) of the concatenated bytes of ``paths``."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_sha256(weights: str) -> str:
    """Identity of a checkpoint file, or of a model directory (its
    ``config.json`` and ``model.safetensors`` together)."""
    if os.path.isdir(weights):
        paths = [os.path.join(weights, "config.json"), os.path.join(weights, "model.safetensors")]
        missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f"model directory {weights} lacks {', '.join(missing)}")
        return file_sha256(*paths)
    if not os.path.isfile(weights):
        raise CheckpointError(f"weights not found: {weights}")
    return file_sha256(weights)
