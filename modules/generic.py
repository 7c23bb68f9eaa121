"""Generic attention explainability for unmodified timm and Hugging Face models.

The method is ``generic_attribution`` of ../shared/METHODS.md section 2
(Chefer et al., ICCV 2021): with ``A_l`` the attention probabilities of block
l (B, H, N, N) and ``grad_l = d score / d A_l`` (per-sample one-hot seed),

    Abar_l = mean over heads of max(grad_l * A_l, 0)
    R = I;  for l >= start_layer:  R = R + Abar_l @ R

and the result is one row of R.  It is computed where every method is, by
the engine (:mod:`modules.explain`, the registry entry in
:mod:`modules.methods`, the pieces in :mod:`modules.aggregation`); this
module keeps the entry points of before the engine as thin wrappers and
the model loaders of the command-line tools.

:func:`explain_any` is the entry point; :func:`load_generic_model` builds or
loads a model for the command-line tools.  Supported models:

* timm ``VisionTransformer`` / DeiT (``VisionTransformerDistilled``) with
  class-token pooling: image tensor in, (B, gh, gw) out;
* Hugging Face ``ViTForImageClassification``, ``DeiTForImageClassification``,
  ``DeiTForImageClassificationWithTeacher``: image tensor or image-processor
  dict in, (B, gh, gw) out (patch columns start at 1 for ViT, 2 for DeiT);
* Hugging Face ``BertForSequenceClassification``,
  ``RobertaForSequenceClassification``,
  ``DistilBertForSequenceClassification``: tokenizer dict in, (B, N) out;
* Hugging Face ``CLIPModel``: processor dict (``pixel_values``,
  ``input_ids``, ``attention_mask``) in, :class:`CLIPRelevance` (image
  (B, gh, gw), text (B, N)) out.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from modules.adapters import InputsError, UnsupportedModelError, adapter_for
from modules.adapters.hf_models import IMAGE_CLASSES, IMAGE_TEXT_CLASSES, TEXT_CLASSES, clip_pooled_index
from modules.adapters.swin import HF_SWIN_CLASSES
from modules.explain import StreamMaps, explain, explain_trace

IMAGE_CLASSES_ = tuple(IMAGE_CLASSES) + tuple(HF_SWIN_CLASSES)
TEXT_CLASSES_ = tuple(TEXT_CLASSES)
_HF_KINDS: Dict[str, str] = {**{c: "hf-image" for c in IMAGE_CLASSES_}, **{c: "hf-text" for c in TEXT_CLASSES},
                             **{c: "clip" for c in IMAGE_TEXT_CLASSES}}

__all__ = [
    "explain_any",
    "generic_explanation",
    "GenericExplanation",
    "CLIPRelevance",
    "model_kind",
    "clip_pooled_index",
    "SUPPORTED_HF_CLASSES",
    "load_generic_model",
    "LoadedModel",
    "GenericModelError",
    "UNMODIFIED_MODEL_HELP",
    "names_unmodified_model",
    "model_logits",
    "require_methods",
    "UnmodifiedImageClassifier",
    "load_unmodified_image_classifier",
]

Index = Union[None, int, Sequence[int], Tensor]
Inputs = Union[Tensor, Mapping]


# --------------------------------------------------------------------------
# The entry points of before the one engine (thin wrappers of modules.explain)
# --------------------------------------------------------------------------
SUPPORTED_HF_CLASSES: Tuple[str, ...] = IMAGE_CLASSES_ + TEXT_CLASSES_ + IMAGE_TEXT_CLASSES
"""Hugging Face classes the engine explains unmodified (subclasses included)."""

CLIPRelevance = StreamMaps
"""Relevance of an image-text pair: ``image`` (B, gh, gw), ``text`` (B, N)."""


@dataclass
class GenericExplanation:
    """Everything one :func:`generic_explanation` call computed.

    Attributes
    ----------
    relevance:
        Raw relevance: (B, gh, gw) patches for images, (B, N) tokens for
        text; for CLIP the image's patch map.
    score:
        (B,) the explained value exactly as the model returned it: the chosen
        logit, or CLIP's ``logits_per_image`` entry of the pair.
    target:
        (B,) the explained class; for CLIP the index of the text paired with
        each image (into the texts that were passed in).
    kind:
        ``"image"``, ``"text"`` or ``"image-text"``.
    text_relevance:
        CLIP only: (B, N) relevance of the paired text's tokens.
    text_row:
        CLIP only: (B,) the pooled (EOS) token whose row of R is the text map.
    """

    relevance: Tensor
    score: Tensor
    target: Tensor
    kind: str
    text_relevance: Optional[Tensor] = None
    text_row: Optional[Tensor] = None


def model_kind(model: nn.Module) -> str:
    """``"timm-image"``, ``"hf-image"``, ``"hf-text"`` or ``"clip"`` (any
    image-text model); an unsupported model raises
    :class:`~modules.attention_capture.UnsupportedModelError`."""
    from modules.adapters.hf_models import HFImageClassifierAdapter, HFImageTextAdapter, HFTextClassifierAdapter

    try:
        adapter = adapter_for(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(str(exc)) from None
    if adapter.copy:
        raise UnsupportedModelError(f"{type(model).__name__} is a model copy: use modules.explain.explain")
    kinds = {HFImageClassifierAdapter: "hf-image", HFTextClassifierAdapter: "hf-text", HFImageTextAdapter: "clip"}
    return kinds.get(type(adapter), "timm-image")


def generic_explanation(model: nn.Module, inputs: Inputs, index: Index = None,
                        start_layer: int = 0) -> GenericExplanation:
    """Run :func:`explain_any` and return everything it computed (maps, the
    explained score and target); see :class:`GenericExplanation`."""
    kind = model_kind(model)
    try:
        exp = explain_trace(model, inputs, "generic_attribution", index=index, start_layer=start_layer)
    except InputsError as exc:
        raise ValueError(str(exc)) from None
    if isinstance(exp.maps, StreamMaps):
        text_row = exp.trace.streams["text"].readout.weights.argmax(dim=1)
        return GenericExplanation(exp.maps.image, exp.score, exp.target, "image-text", exp.maps.text, text_row)
    return GenericExplanation(exp.maps, exp.score, exp.target, "text" if kind == "hf-text" else "image")


def explain_any(model: nn.Module, inputs: Inputs, index: Index = None,
                start_layer: int = 0) -> Union[Tensor, StreamMaps]:
    """Generic attention relevance (METHODS.md section 2, ``generic_attribution``)
    of an unmodified timm or Hugging Face model: a thin wrapper of
    :func:`modules.explain.explain` kept for existing code.

    Returns raw relevance: (B, gh, gw) for images, (B, N) for text; for CLIP
    ``CLIPRelevance(image=(B, gh, gw), text=(B, N))``, the text map being the
    row of the pooled EOS token (tokens after it get 0).
    """
    model_kind(model)
    try:
        return explain(model, inputs, "generic_attribution", index=index, start_layer=start_layer)
    except InputsError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------
# Loading a model for the command-line tools
# --------------------------------------------------------------------------
class GenericModelError(ValueError):
    """A model name/directory/weights file that cannot be loaded (one-line message)."""


@dataclass
class LoadedModel:
    """A model ready for :func:`explain_any`, with what a CLI needs to feed it.

    Attributes
    ----------
    model:
        The model, in eval mode.
    source:
        ``"timm"`` or ``"huggingface"``.
    architecture:
        timm model name or Hugging Face class name.
    modality:
        ``"image"``, ``"text"`` or ``"image-text"`` (CLIP).
    description:
        One line saying what was built/loaded and from where.
    mean, std, input_size, interpolation, crop_pct:
        Image preprocessing (None for text models): normalise with mean/std
        after resizing to ``input_size`` (C, H, W) (timm: resize to
        H / crop_pct, then centre crop).
    processor:
        The Hugging Face processor, image processor or tokenizer found in the
        directory, else None.
    labels:
        Class index -> name, where the model knows them.
    """

    model: nn.Module
    source: str
    architecture: str
    modality: str
    description: str
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    input_size: Optional[Tuple[int, int, int]] = None
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    processor: Any = None
    labels: Optional[Dict[int, str]] = None


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def load_generic_model(name_or_dir: str, weights: Optional[str] = None) -> LoadedModel:
    """Build a timm model by name, or load a local Hugging Face directory.

    Parameters
    ----------
    name_or_dir:
        A local directory (a Hugging Face ``save_pretrained`` directory, loaded
        with ``local_files_only=True``; or a timm ``push_to_hub``-style
        directory with ``config.json`` naming an ``architecture``), else a timm
        model name, built with ``pretrained=False``.  Nothing is downloaded.
    weights:
        Optional ``.safetensors`` file or ``.pth``/``.pt``/``.bin`` checkpoint
        (read with ``torch.load(weights_only=True)``) loaded strictly on top;
        for a timm name the number of classes follows the checkpoint's head.

    Returns
    -------
    LoadedModel
        Its ``description`` says which of these happened; a timm model without
        weights keeps its random initialisation and says so.

    Raises
    ------
    GenericModelError
        Unknown name, missing directory/file, unreadable or mismatching
        weights, or a model :func:`explain_any` does not support.
    """
    if weights is not None and not os.path.isfile(weights):
        raise GenericModelError(f"weights file not found: {weights}")
    if os.path.isdir(name_or_dir):
        cfg_path = os.path.join(name_or_dir, "config.json")
        cfg = _read_json(cfg_path)
        if "architecture" in cfg and "model_type" not in cfg:
            loaded = _load_timm_dir(name_or_dir, cfg, weights)
        else:
            loaded = _load_hf_dir(name_or_dir, weights)
    else:
        if os.sep in name_or_dir or name_or_dir.startswith("."):
            raise GenericModelError(f"{name_or_dir!r} is no local directory (and nothing is downloaded: save a "
                                    "Hugging Face model with save_pretrained, or give a timm model name)")
        loaded = _load_timm_name(name_or_dir, weights)
    try:
        model_kind(loaded.model)
    except UnsupportedModelError as exc:
        raise GenericModelError(str(exc)) from None
    return loaded


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise GenericModelError(f"{os.path.dirname(path)} holds no config.json: "
                                "not a Hugging Face or timm model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise GenericModelError(f"{path}: unreadable ({exc})") from None


def _load_weights(model: nn.Module, path: str) -> None:
    from modules.checkpoints import CheckpointError, load_checkpoint

    try:
        load_checkpoint(model, path, strict=True)
    except CheckpointError as exc:
        raise GenericModelError(str(exc)) from None


def _timm_create(name: str, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise GenericModelError(f"{name!r} is neither a local directory nor a timm model name{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # timm raises assorted errors for bad arguments
        raise GenericModelError(f"cannot build timm model {name!r}: {exc}") from None


def _timm_loaded(model: nn.Module, name: str, description: str, pretrained_cfg: Optional[dict] = None) -> LoadedModel:
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=pretrained_cfg, model=model) if pretrained_cfg else \
        resolve_data_config(model=model)
    return LoadedModel(model.eval(), "timm", name, "image", description, mean=tuple(data["mean"]),
                       std=tuple(data["std"]), input_size=tuple(data["input_size"]),
                       interpolation=data.get("interpolation", "bilinear"), crop_pct=float(data.get("crop_pct", 1.0)))


def _load_timm_name(name: str, weights: Optional[str]) -> LoadedModel:
    kwargs = {}
    if weights is not None:
        from modules.checkpoints import CheckpointError, read_state_dict

        try:
            state = read_state_dict(weights)
        except CheckpointError as exc:
            raise GenericModelError(str(exc)) from None
        if isinstance(state.get("head.weight"), Tensor):
            kwargs["num_classes"] = state["head.weight"].shape[0]
    model = _timm_create(name, **kwargs)
    if weights is None:
        description = (f"timm model {name} built with pretrained=False and NO weights (random initialisation; "
                       "give a weights file for meaningful explanations)")
    else:
        _load_weights(model, weights)
        description = f"timm model {name} built with pretrained=False, weights loaded from {weights}"
    return _timm_loaded(model, name, description)


def _load_timm_dir(path: str, cfg: dict, weights: Optional[str]) -> LoadedModel:
    name = cfg["architecture"]
    kwargs = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    model = _timm_create(name, **kwargs)
    if weights is None:
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, candidate)):
                weights = os.path.join(path, candidate)
                break
        else:
            raise GenericModelError(f"{path}: timm directory without model.safetensors or pytorch_model.bin")
    _load_weights(model, weights)
    return _timm_loaded(model, name, f"timm model {name} (pretrained=False) from local directory {path}, "
                        f"weights {weights}", cfg.get("pretrained_cfg"))


def _load_hf_dir(path: str, weights: Optional[str]) -> LoadedModel:
    import transformers

    from modules.checkpoints import CheckpointError, hf_model_config, load_pretrained

    try:  # the folder checked, then its config read before any weights
        config = hf_model_config(path, flag="")
    except CheckpointError as exc:
        raise GenericModelError(str(exc)) from None
    arch = next((a for a in (getattr(config, "architectures", None) or []) if a in _HF_KINDS), None)
    if arch is None and getattr(config, "model_type", None) == "siglip":
        arch = "SiglipModel"
    if arch is None and getattr(config, "model_type", None) == "clip":
        arch = "CLIPModel"
    if arch is None:
        held = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise GenericModelError(f"{path} holds {held}; supported: {', '.join(SUPPORTED_HF_CLASSES)}")
    try:  # the one loader: safe file kinds, one-line errors, finite weights
        model = load_pretrained(getattr(transformers, arch), path, flag="")
    except CheckpointError as exc:
        raise GenericModelError(str(exc)) from None
    description = f"Hugging Face {arch} from local directory {path}"
    if weights is not None:
        _load_weights(model, weights)
        description += f", weights replaced from {weights}"
    kind = _HF_KINDS[arch]
    modality = {"hf-image": "image", "hf-text": "text", "clip": "image-text"}[kind]
    loader = {"hf-image": transformers.AutoImageProcessor, "hf-text": transformers.AutoTokenizer,
              "clip": transformers.AutoProcessor}[kind]
    # transformers 5 builds an empty tokenizer from a directory without
    # tokenizer files, so only load what the directory actually holds
    needed = {"hf-image": _IMAGE_PROCESSOR_FILES, "hf-text": _TOKENIZER_FILES,
              "clip": _IMAGE_PROCESSOR_FILES}[kind]
    processor = None
    if any(os.path.isfile(os.path.join(path, f)) for f in needed) and \
            (kind != "clip" or any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)):
        try:
            processor = loader.from_pretrained(path, local_files_only=True)
        except Exception:  # unreadable processor files: the CLI falls back to the numbers below
            processor = None
    if processor is None:
        description += " (no usable processor/tokenizer files found there)"
    labels = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()} if kind != "clip" else None
    loaded = LoadedModel(model.eval(), "huggingface", arch, modality, description, processor=processor, labels=labels)
    if modality != "text":
        image_proc = getattr(processor, "image_processor", processor)
        if image_proc is None and os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            try:  # a CLIP directory with image settings but no tokenizer
                image_proc = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
            except Exception:
                image_proc = None
        _hf_image_preprocessing(loaded, config, image_proc)
    return loaded


def _hf_image_preprocessing(loaded: LoadedModel, config: Any, image_proc: Any) -> None:
    """mean/std/input size from the image processor, else from the config
    with the library's defaults (ViT: 0.5, DeiT: ImageNet, CLIP: OpenAI)."""
    vision = getattr(config, "vision_config", None) or config
    defaults = {"ViT": ((0.5,) * 3, (0.5,) * 3),
                "DeiT": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                "CLIP": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
    family = next((k for k in ("DeiT", "CLIP", "ViT") if loaded.architecture.startswith(k)), "ViT")
    mean, std = defaults[family]
    size = getattr(vision, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = "bicubic" if family != "ViT" else "bilinear"
    if image_proc is not None and getattr(image_proc, "image_mean", None) is not None:
        mean, std = tuple(image_proc.image_mean), tuple(image_proc.image_std)
        crop = getattr(image_proc, "crop_size", None) if getattr(image_proc, "do_center_crop", False) else None
        box = crop or getattr(image_proc, "size", None) or {}
        box = dict(box) if not isinstance(box, dict) else box
        if box.get("height") and box.get("width"):
            height, width = box["height"], box["width"]
        elif box.get("shortest_edge"):
            height = width = box["shortest_edge"]
        resample = getattr(image_proc, "resample", None)
        interpolation = _PIL_RESAMPLE.get(int(resample), interpolation) if resample is not None else interpolation
    loaded.mean, loaded.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    loaded.input_size = (getattr(vision, "num_channels", 3), int(height), int(width))
    loaded.interpolation = interpolation


# --------------------------------------------------------------------------
# Unmodified image classifiers for the benchmark scripts
# --------------------------------------------------------------------------
UNMODIFIED_PREFIXES: Tuple[str, ...] = ("timm:",)
"""``--model timm:<name>`` forces timm's own model of a name our copies share
(e.g. ``timm:vit_base_patch16_224``: timm's VisionTransformer, explained
through the LRP scope, instead of the copy)."""

UNMODIFIED_MODEL_HELP = (
    "or an unmodified model, explained as its library built it with every method it supports "
    "(modules.explain.supported_methods): a timm model name (built with pretrained=False, weights from --weights; "
    "timm:<name> for a name a copy also has) or a local Hugging Face image-classifier directory (save_pretrained; "
    "--weights optional, replaces its weights); nothing is downloaded. An unmodified model is fed with its own "
    "normalisation (mean/std) and input size from its config (timm's data config, the directory's image "
    "processor)")


def names_unmodified_model(model: Optional[str], weights: Optional[str], copies: Sequence[str]) -> bool:
    """Whether the flags ``--model model --weights weights`` name an unmodified
    model rather than one of the LRP ``copies`` (factory names).

    Unmodified: ``model`` is ``timm:<name>`` or an existing directory; or
    ``weights`` is a Hugging Face directory (its config.json has a
    ``model_type``); or ``model`` is not a copy name while ``weights`` is not
    a model directory of a copy (which would define the model itself).
    """
    if model is not None and (model.startswith(UNMODIFIED_PREFIXES) or os.path.isdir(model)):
        return True
    if weights is not None and os.path.isdir(weights):
        try:
            with open(os.path.join(weights, "config.json")) as f:
                if "model_type" in json.load(f):
                    return True
        except (OSError, ValueError, TypeError):
            pass
        return False  # a copy's model directory: it defines the model
    return model is not None and model not in copies


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """The logits of ``model(x)``: the tensor itself (copies, timm) or the
    ``logits`` field of a Hugging Face output."""
    out = model(x)
    return getattr(out, "logits", out)


def require_methods(model: nn.Module, methods: Sequence[str], flag: str = "--method") -> None:
    """One-line :class:`modules.cli.CLIError` unless ``model`` supports every
    method of ``methods`` (canonical names)."""
    from modules.cli import CLIError
    from modules.explain import supported_methods

    supported = supported_methods(model)
    missing = [m for m in methods if m not in supported]
    if missing:
        raise CLIError(f"{type(model).__name__} does not support {flag} {', '.join(missing)}; "
                       f"it supports: {', '.join(supported)}")


@dataclass
class UnmodifiedImageClassifier:
    """An unmodified timm / Hugging Face image classifier and what the
    benchmark scripts record and feed.

    Attributes
    ----------
    model:
        The model as its library built it (eval mode): pass it to
        :func:`modules.explain.explain`; :meth:`logits` runs it.
    name:
        Identity of the architecture: ``timm:<name>`` or ``huggingface:<Class>``.
    source:
        What ``--model`` named (a timm name, or the directory's absolute path):
        enough, with ``weights``, to load it again.
    weights:
        Absolute path of the weights file given, else None (a directory's own).
    weights_sha256:
        SHA-256 of the files the model was built from: the weights file; for a
        directory its config.json, preprocessor_config.json and weight files
        (plus the weights file given).
    input_size, mean, std:
        (H, W) and the normalisation from the model's own config.
    num_classes, class_names:
        Outputs of the head and their names where the model knows them.
    description:
        One line: what was built and from where.
    """

    model: nn.Module
    name: str
    source: str
    weights: Optional[str]
    weights_sha256: str
    input_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_classes: int
    class_names: Optional[List[str]]
    description: str

    def logits(self, x: Tensor) -> Tensor:
        """(B, classes) logits of normalised images."""
        return model_logits(self.model, x)

    def methods(self) -> Tuple[str, ...]:
        """The canonical names of the methods the model supports."""
        from modules.explain import supported_methods

        return supported_methods(self.model)

    def depth(self) -> int:
        """Attention layers of the shortest stream (the start-layer bound)."""
        return min(adapter_for(self.model).depths().values())

    def map_shape(self, method: str, start_layer: Optional[int] = None) -> Tuple[int, ...]:
        """The shape of one map of ``method``, (h, w), found by explaining one
        blank image on the model's device: patch grids, Swin's finest grid,
        pixel maps for the methods that reach the input."""
        p = next(self.model.parameters())
        blank = torch.zeros(1, 3, *self.input_size, dtype=p.dtype, device=p.device)
        maps = explain(self.model, blank, method, index=0, start_layer=start_layer)
        return tuple(int(v) for v in maps.shape[1:])


def _directory_sha256(path: str, weights: Optional[str]) -> str:
    from modules.checkpoints import file_sha256

    names = sorted(n for n in os.listdir(path)
                   if n in ("config.json", "preprocessor_config.json")
                   or n.endswith((".safetensors", ".bin", ".pth", ".pt", ".index.json")))
    return file_sha256(*[os.path.join(path, n) for n in names], *([weights] if weights else []))


def load_unmodified_image_classifier(model: str, weights: Optional[str] = None,
                                     require_weights: bool = True) -> UnmodifiedImageClassifier:
    """Build a timm model by name (``timm:`` prefix allowed) or load a local
    Hugging Face / timm directory with :func:`load_generic_model` (the one
    loader, shared with ``visualize.py``), for a benchmark script.

    ``weights`` a directory stands for ``model`` (as the scripts' "ignored for
    a model folder" rule has it).  A timm name without ``weights`` is refused when ``require_weights`` (a
    random model's maps mean nothing), as is a model that is not an image
    classifier.  Raises :class:`modules.cli.CLIError` (one line).
    """
    from modules.checkpoints import file_sha256
    from modules.cli import CLIError

    if weights is not None and os.path.isdir(weights):  # a model directory defines the model itself
        model, weights = weights, None
    name = model[len("timm:"):] if model.startswith("timm:") else model
    if os.path.isdir(name):
        name = os.path.abspath(name)
    elif require_weights and weights is None:
        raise CLIError(f"--model {model}: a timm model needs --weights (a local .safetensors/.pth checkpoint; "
                       "nothing is downloaded)")
    try:
        loaded = load_generic_model(name, weights)
    except GenericModelError as exc:
        raise CLIError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if loaded.modality != "image":
        raise CLIError(f"--model {model}: a {loaded.modality} model ({loaded.architecture}); this script "
                       "explains image classifiers")
    weights = os.path.abspath(weights) if weights is not None else None
    if os.path.isdir(name):
        sha = _directory_sha256(name, weights)
    else:
        sha = file_sha256(weights) if weights is not None else "random-init"
    net = loaded.model
    num_classes = getattr(net, "num_classes", None)
    if not isinstance(num_classes, int):
        num_classes = int(getattr(getattr(net, "config", None), "num_labels", 0))
    labels = loaded.labels
    names = [labels.get(i, f"class {i}") for i in range(num_classes)] if labels else None
    prefix = "timm" if loaded.source == "timm" else "huggingface"
    return UnmodifiedImageClassifier(
        model=net, name=f"{prefix}:{loaded.architecture}", source=name, weights=weights, weights_sha256=sha,
        input_size=(int(loaded.input_size[1]), int(loaded.input_size[2])),
        mean=tuple(float(v) for v in loaded.mean), std=tuple(float(v) for v in loaded.std),
        num_classes=num_classes, class_names=names, description=loaded.description)
