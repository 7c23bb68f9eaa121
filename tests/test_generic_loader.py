"""load_generic_model: timm names (+ weights files), timm and Hugging Face
directories, and its one-line errors. Nothing is downloaded."""
import json
import os
import sys

import pytest
import timm
import torch
import transformers as tf
from safetensors.torch import save_file

from modules.generic import GenericModelError, explain_any, load_generic_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_generic import _randomize, _text_kwargs, _vision_kwargs, images  # noqa: E402

tf.logging.set_verbosity_error()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_timm_name_without_weights_says_so():
    loaded = load_generic_model("test_vit")
    assert loaded.source == "timm" and loaded.architecture == "test_vit" and loaded.modality == "image"
    assert "NO weights" in loaded.description and "pretrained=False" in loaded.description
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    assert loaded.input_size == (3, 160, 160) and loaded.interpolation == "bicubic"
    assert not loaded.model.training


@pytest.mark.parametrize("fmt", ["pth", "wrapped_pth", "safetensors"])
def test_timm_name_with_weights_file(tmp_path, fmt):
    src = _randomize(timm.create_model("test_vit", pretrained=False, num_classes=7))
    state = src.state_dict()
    path = str(tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({"model": state} if fmt == "wrapped_pth" else state, path)
    loaded = load_generic_model("test_vit", weights=path)
    assert loaded.model.num_classes == 7  # follows the checkpoint's head
    assert _same_weights(loaded.model, src)
    assert path in loaded.description
    x = torch.randn(2, 3, 160, 160)
    torch.testing.assert_close(explain_any(loaded.model, x), explain_any(src, x))


def test_timm_bad_names_and_files(tmp_path):
    with pytest.raises(GenericModelError, match="neither a local directory nor a timm model name.*similar"):
        load_generic_model("vit_tiny_patch16")
    with pytest.raises(GenericModelError, match="no local directory"):
        load_generic_model("google/vit-base-patch16-224")
    with pytest.raises(GenericModelError, match="weights file not found"):
        load_generic_model("test_vit", weights=str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.nothing": torch.zeros(1)}, bad)
    with pytest.raises(GenericModelError, match="missing"):
        load_generic_model("test_vit", weights=str(bad))
    with pytest.raises(GenericModelError, match="ResNet"):
        load_generic_model("test_resnet")


def test_timm_hub_style_directory(tmp_path):
    src = _randomize(timm.create_model("test_vit", pretrained=False, num_classes=4))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = {"architecture": "test_vit", "num_classes": 4,
           "pretrained_cfg": {"input_size": [3, 160, 160], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                              "crop_pct": 1.0, "interpolation": "bilinear"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_generic_model(str(tmp_path))
    assert loaded.source == "timm" and _same_weights(loaded.model, src)
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.4, 0.5, 0.6) and loaded.crop_pct == 1.0


def test_hf_image_directory_with_processor(tmp_path):
    src = _randomize(tf.ViTForImageClassification(tf.ViTConfig(num_labels=3, **_vision_kwargs())))
    src.config.id2label = {0: "cat", 1: "dog", 2: "fox"}
    src.save_pretrained(tmp_path)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3],
                         image_std=[0.3, 0.2, 0.1]).save_pretrained(tmp_path)
    loaded = load_generic_model(str(tmp_path))
    assert loaded.source == "huggingface" and loaded.architecture == "ViTForImageClassification"
    assert "local directory" in loaded.description and loaded.processor is not None
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.3, 0.2, 0.1) and loaded.input_size == (3, 32, 32)
    assert loaded.labels == {0: "cat", 1: "dog", 2: "fox"}
    assert _same_weights(loaded.model, src)
    x = images(2)
    torch.testing.assert_close(explain_any(loaded.model, x), explain_any(src, x))


def test_hf_text_and_clip_directories_without_processor(tmp_path):
    bert = _randomize(tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, **_text_kwargs())))
    bert.save_pretrained(tmp_path / "bert")
    loaded = load_generic_model(str(tmp_path / "bert"))
    assert loaded.modality == "text" and loaded.processor is None and loaded.mean is None
    assert "no usable processor/tokenizer" in loaded.description
    clip = tf.CLIPModel(tf.CLIPConfig(text_config=dict(_text_kwargs(), eos_token_id=59, bos_token_id=58),
                                      vision_config=_vision_kwargs(), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    loaded = load_generic_model(str(tmp_path / "clip"))
    assert loaded.architecture == "CLIPModel" and loaded.modality == "image-text"
    assert loaded.input_size == (3, 32, 32) and loaded.mean[0] == pytest.approx(0.48145466)


def test_hf_text_directory_with_tokenizer(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "was", "good", "bad"]
    bert = _randomize(tf.BertForSequenceClassification(tf.BertConfig(num_labels=2, **_text_kwargs())))
    bert.save_pretrained(tmp_path)
    tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path)
    loaded = load_generic_model(str(tmp_path))
    batch = loaded.processor(["the film was good", "bad"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[2, 5, 6, 7, 8, 3], [2, 9, 3, 0, 0, 0]]
    rel = explain_any(loaded.model, batch)  # a BatchEncoding goes straight in
    assert rel.shape == (2, 6) and torch.equal(rel[1, 3:], torch.zeros(3))
    torch.testing.assert_close(rel, explain_any(bert, dict(batch)))


def test_hf_unsupported_directory(tmp_path):
    tf.BertModel(tf.BertConfig(**_text_kwargs())).save_pretrained(tmp_path)
    with pytest.raises(GenericModelError, match=r"BertModel; supported: .*BertForSequenceClassification"):
        load_generic_model(str(tmp_path))
    os.remove(tmp_path / "config.json")
    with pytest.raises(GenericModelError, match="no config.json"):
        load_generic_model(str(tmp_path))
