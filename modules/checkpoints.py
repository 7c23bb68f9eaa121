"""Reading checkpoints safely, and saying exactly what did not fit.

Nothing here unpickles arbitrary objects: ``.safetensors`` files, or
``torch.load(weights_only=True)`` for ``.pth``/``.pt``/``.bin``.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["CheckpointError", "read_state_dict", "read_sharded_state_dict", "mismatch_report", "file_sha256",
           "weights_sha256", "check_state_finite", "validate_vit_config", "read_model_config", "load_state",
           "load_checkpoint", "HF_WEIGHT_FILES", "HF_INDEX_FILES", "model_dir_weights", "read_model_dir_state",
           "check_model_dir", "load_pretrained", "load_pretrained_part", "model_dir_sha256"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (scripts
    report it in one line, exit 2: :mod:`modules.cli`)."""


def read_state_dict(path: str) -> Dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` read
    with ``torch.load(weights_only=True)``, or the shards a Hugging Face
    ``*.index.json`` names (:func:`read_sharded_state_dict`); unwraps
    ``{"model": ...}`` and ``{"state_dict": ...}`` (DeiT releases, training scripts)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".index.json"):
        return read_sharded_state_dict(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    import pickle
    import warnings
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line only
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        noise = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(exc).replace("WeightsUnpickler error:", "\n").splitlines()
                 if ln.strip() and not ln.strip().startswith(noise)]
        detail = lines[0] if lines else type(exc).__name__
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True): the pickle holds more than tensors "
                              f"({detail[:160]})") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True) ({_first_line(exc)})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return obj


def read_sharded_state_dict(index_path: str) -> Dict[str, Tensor]:
    """Tensors of the shards a Hugging Face ``*.index.json`` names.

    The index must be a JSON object whose ``weight_map`` maps tensor names to
    shard files in the index's folder; every named tensor must be found in
    its shard.  Raises :class:`CheckpointError` in one line otherwise (bad
    JSON, no ``weight_map``, a shard outside the folder or missing).
    """
    import json
    folder = os.path.dirname(os.path.abspath(index_path))
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path}: cannot be read ({_first_line(exc)})") from None
    except ValueError as exc:
        raise CheckpointError(f"{index_path}: not valid JSON ({_first_line(exc)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: a shard index needs a non-empty 'weight_map' object "
                              "(tensor name -> shard file)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names (strings)")
    state: Dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.normpath(os.path.join(folder, shard))
        if os.path.dirname(path) != folder:
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file in the index's folder")
        state.update(read_state_dict(path))
    missing = sorted(k for k in weight_map if k not in state)
    if missing:
        raise CheckpointError(f"{index_path}: {len(missing)} tensors named in weight_map are in no shard "
                              f"({_first(missing)})")
    return state


def check_state_finite(state: Mapping[str, Tensor], path: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``state``
    that holds NaN or Inf (a model with such weights gives NaN maps)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{path}: tensor {key!r} holds {bad} NaN/Inf values of {value.numel()} "
                                  "(weights with NaN or Inf give meaningless maps)")


_VIT_INT_KWARGS = {"num_classes": (0, 1 << 20), "embed_dim": (1, 1 << 14), "depth": (1, 256),
                   "num_heads": (1, 1024), "in_chans": (1, 64)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    import math
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def validate_vit_config(cfg: Mapping, path: str) -> None:
    """Check a ViT model folder's ``config.json`` (as :func:`baselines.ViT.ViT_LRP.model_config`
    writes it) before any model is built: integers where integers belong,
    in range, image size a multiple of the patch size, width a multiple of
    the heads, finite positive ``mlp_ratio`` / ``eps``, three finite means
    and positive stds.  Raises :class:`CheckpointError` in one line."""
    kwargs = cfg.get("model_kwargs") if isinstance(cfg, Mapping) else None
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{path}: no 'model_kwargs' object")

    def bad(name, want):
        raise CheckpointError(f"{path}: model_kwargs.{name} must be {want}, got {kwargs.get(name)!r}")

    for name, (lo, hi) in _VIT_INT_KWARGS.items():
        if name in kwargs and not (_is_int(kwargs[name]) and lo <= kwargs[name] <= hi):
            bad(name, f"an integer in {lo}..{hi}")
    sizes = {}
    for name in ("img_size", "patch_size"):
        if name not in kwargs:
            continue
        v = kwargs[name]
        pair = [v, v] if _is_int(v) else v
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_int(x) and 1 <= x <= 8192
                                                                          for x in pair)):
            bad(name, "an integer or a pair of integers in 1..8192")
        sizes[name] = pair
    if len(sizes) == 2 and any(i % p for i, p in zip(sizes["img_size"], sizes["patch_size"])):
        bad("img_size", f"a multiple of patch_size {sizes['patch_size']}")
    if _is_int(kwargs.get("embed_dim")) and _is_int(kwargs.get("num_heads")) and \
            kwargs["embed_dim"] % kwargs["num_heads"]:
        bad("embed_dim", f"a multiple of num_heads {kwargs['num_heads']}")
    for name in ("mlp_ratio", "eps"):
        if name in kwargs and not (_is_number(kwargs[name]) and kwargs[name] > 0):
            bad(name, "a finite positive number")
    for name in ("qkv_bias", "distilled"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            bad(name, "true or false")
    for name in ("mean", "std"):
        if name in cfg:
            v = cfg[name]
            if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)
                    and (name == "mean" or all(x > 0 for x in v))):
                raise CheckpointError(f"{path}: {name} must be three finite numbers"
                                      f"{' > 0' if name == 'std' else ''}, got {v!r}")


def read_model_config(directory: str) -> dict:
    """The validated ``config.json`` of a ViT model folder (see
    :func:`validate_vit_config`); :class:`CheckpointError` when missing,
    not JSON, or wrong."""
    import json
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({_first_line(exc)})") from None
    validate_vit_config(cfg, path)
    return cfg


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
    if weights.endswith(".index.json"):  # the index and every shard it names
        return file_sha256(weights, *_shard_paths(weights))
    return file_sha256(weights)


def _shard_paths(index_path: str):
    import json
    folder = os.path.dirname(os.path.abspath(index_path))
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a shard index with a 'weight_map' ({_first_line(exc)})") from None
    paths = [os.path.normpath(os.path.join(folder, str(s))) for s in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f"{index_path}: shard not found: {missing[0]}")
    return paths


def load_state(model: "torch.nn.Module", state: Mapping[str, Tensor], path: str, strict: bool = True,
               filter_fn: Optional[Callable[[Dict[str, Tensor], "torch.nn.Module"], Dict[str, Tensor]]] = None
               ) -> "torch.nn.Module":
    """Load ``state`` (read from ``path``) into ``model``, timm-style.

    ``filter_fn(state, model)`` may rename, drop or resample entries first
    (a ViT's position embedding for another grid, say).  With ``strict`` a
    mismatch raises :class:`CheckpointError` naming every missing and
    unexpected key and shape that did not fit; otherwise the entries that
    fit are loaded and the rest ignored.
    """
    state = dict(state)
    if filter_fn is not None:
        state = filter_fn(state, model)
    check_state_finite(state, path)
    own = model.state_dict()
    problems = mismatch_report(own, state)
    if strict and problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {problems}")
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    return model


def load_checkpoint(model: "torch.nn.Module", path: str, strict: bool = True,
                    filter_fn: Optional[Callable[[Dict[str, Tensor], "torch.nn.Module"], Dict[str, Tensor]]] = None
                    ) -> "torch.nn.Module":
    """Read a checkpoint file safely (:func:`read_state_dict`) and load it
    into ``model`` (:func:`load_state`): the one loader of every script."""
    return load_state(model, read_state_dict(path), path, strict, filter_fn)


# --------------------------------------------------------------------------
# Hugging Face model folders: the one loader of every script that takes one
# --------------------------------------------------------------------------
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def model_dir_weights(directory: str) -> str:
    """The weights file of a Hugging Face folder: ``model.safetensors``,
    ``pytorch_model.bin`` or a shard index (in Hugging Face's order of
    preference); :class:`CheckpointError` when it holds none."""
    for name in HF_WEIGHT_FILES + HF_INDEX_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{directory} holds no weights ({', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})")


def read_model_dir_state(directory: str) -> Dict[str, Tensor]:
    """Tensors of a Hugging Face folder's weights (:func:`model_dir_weights`,
    read by :func:`read_state_dict`: safetensors, ``weights_only=True``,
    validated shard indices)."""
    return read_state_dict(model_dir_weights(directory))


def _check_safetensors_header(path: str) -> None:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error types (truncation, bad header)
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def check_model_dir(directory: str, flag: str = "--model-dir") -> str:
    """Check a Hugging Face folder before ``from_pretrained`` reads it: it
    exists, holds ``config.json`` and a weights file, safetensors headers
    cover their files (truncation), a shard index is a valid ``weight_map``
    of files present, and pickled ``.bin`` weights load with
    ``weights_only=True`` (a hostile pickle is refused here, never run).
    Returns the weights file; raises :class:`CheckpointError` in one line."""
    label = f"{flag} {directory}" if flag else directory
    if not os.path.exists(directory):
        raise CheckpointError(f"{label}: no such directory")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{label}: not a directory (a folder save_pretrained wrote)")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{label}: no config.json (not a Hugging Face model directory)")
    weights = model_dir_weights(directory)
    if weights.endswith(".index.json"):
        import json
        try:
            with open(weights, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{weights}: not a readable JSON shard index ({_first_line(exc)})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{weights}: a shard index needs a non-empty 'weight_map' object "
                                  "(tensor name -> shard file)")
        shards = _shard_paths(weights)
        folder = os.path.dirname(os.path.abspath(weights))
        for shard in shards:
            if os.path.dirname(shard) != folder:
                raise CheckpointError(f"{weights}: shard {shard!r} is not a file in the index's folder")
    else:
        shards = [weights]
    for shard in shards:
        if shard.endswith(".safetensors"):
            _check_safetensors_header(shard)
        else:
            read_state_dict(shard)  # torch.load(weights_only=True): refuses pickled code
    return weights


def hf_model_config(directory: str, flag: str = "--model-dir", model_types: Optional[Sequence[str]] = None,
                    what: str = ""):
    """The ``transformers`` config of a Hugging Face folder that
    :func:`check_model_dir` accepts, read before any weights; one line
    (:class:`CheckpointError`) when it cannot be read or, with
    ``model_types``, when its ``model_type`` is none of them (``what`` names
    the kind of model expected)."""
    check_model_dir(directory, flag)
    import transformers

    label = f"{flag} {directory}" if flag else directory
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises several error types for a bad config
        raise CheckpointError(f"{label}: unreadable config.json ({_first_line(exc)})") from None
    kind = getattr(config, "model_type", None)
    if model_types is not None and kind not in model_types:
        raise CheckpointError(f"{label}: a {kind!r} model, not {what or 'one of'} ({', '.join(model_types)})")
    return config


def _quiet_transformers():
    """Context manager: transformers' warnings and progress bars off (one-line errors only)."""
    import contextlib

    @contextlib.contextmanager
    def quiet():
        try:
            import transformers
            tl = transformers.utils.logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            yield
            return
        verbosity, bars = tl.get_verbosity(), tl.is_progress_bar_enabled()
        tl.set_verbosity_error()
        tl.disable_progress_bar()
        try:
            yield
        finally:
            tl.set_verbosity(verbosity)
            if bars:
                tl.enable_progress_bar()
    return quiet()


def load_pretrained(cls, directory: str, flag: str = "--model-dir", **kwargs):
    """``cls.from_pretrained(directory, local_files_only=True, **kwargs)`` of
    a local Hugging Face folder, the one way scripts load one.

    Before: :func:`check_model_dir` (missing folder or config, truncated
    safetensors, bad shard index, hostile pickle).  During: any error of
    ``from_pretrained`` (wrong architecture, shapes that do not fit) becomes
    one line.  After: every tensor of the model's state is finite
    (:func:`check_state_finite`).  Raises :class:`CheckpointError` naming the
    folder (scripts: one line, exit 2).  Returns the model.
    """
    weights = check_model_dir(directory, flag)
    name = getattr(cls, "__name__", str(cls))
    with _quiet_transformers():
        try:
            model = cls.from_pretrained(directory, local_files_only=True, **kwargs)
        except CheckpointError:
            raise
        except Exception as exc:  # transformers raises many types (OSError, ValueError, RuntimeError, ...)
            raise CheckpointError(f"{directory}: cannot load {name} ({_first_line(exc)})") from None
    check_state_finite(model.state_dict(), weights)
    return model


def load_pretrained_part(cls, directory: str, what: str = "tokenizer", **kwargs):
    """A tokenizer, processor or config of a local folder
    (``cls.from_pretrained(directory, local_files_only=True)``), any
    failure one line (:class:`CheckpointError` naming ``what``)."""
    with _quiet_transformers():
        try:
            return cls.from_pretrained(directory, local_files_only=True, **kwargs)
        except Exception as exc:  # transformers raises many types for unreadable files
            raise CheckpointError(f"{directory}: cannot load the {what} ({_first_line(exc)})") from None


def model_dir_sha256(directory: str) -> str:
    """Content identity of a Hugging Face folder: its ``config.json`` and
    weights (every shard an index names), so results computed with other
    weights under the same path are never reused."""
    weights = model_dir_weights(directory)
    parts = _shard_paths(weights) if weights.endswith(".index.json") else []
    return file_sha256(os.path.join(directory, "config.json"), weights, *parts)
