"""The CLIP and translation stand-ins (issue 13's multi-modal notebook): their data,
the vision warm start, the training CLIs end to end, and the shipped models
re-measured against what their config.json records."""
import json
import os

import numpy as np
import pytest
import torch

from baselines.CLIP import train_scenes_clip as tsc
from baselines.generation import train_scenes_translation as tst

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")


# --------------------------------------------------------------------------
# Translation data
# --------------------------------------------------------------------------
def test_translation_reorders_and_agrees_by_hand():
    en, fr = tst.translate([("large", "blue", "star"), ("small", "white", "disk"), ("small", "purple", "cross")])
    assert en == "a large blue star, a small white disk and a small purple cross."
    assert fr == "une grande étoile bleue, un petit disque blanc et une petite croix violette."
    assert tst.translate([("large", "red", "ring")]) == ("a large red ring.", "un grand anneau rouge.")


def test_translation_pairs_are_deterministic_and_splits_differ():
    a = tst.sample_pairs(50, 0, "train")
    assert a == tst.sample_pairs(50, 0, "train")
    assert a != tst.sample_pairs(50, 0, "val") and a != tst.sample_pairs(50, 1, "train")
    assert {s.count(" a ") + 1 for s, _ in a} <= {1, 2, 3, 4}


def test_translation_tokenizer_keeps_accents_and_every_word():
    tok = tst.build_tokenizer()
    _, fr = tst.translate([("large", "white", "star"), ("small", "green", "square")])
    ids = tok(fr)["input_ids"]
    assert tok.unk_token_id not in ids and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == fr.replace(",", " ,").replace(".", " .").split()
    assert "token_type_ids" not in tok("a")


# --------------------------------------------------------------------------
# CLIP stand-in pieces
# --------------------------------------------------------------------------
def test_vision_warm_start_equals_the_vit_copy():
    """With CLIP's pre-LayerNorm taken out, the copied vision tower computes the
    ViT copy's final normalised class token exactly."""
    from baselines.ViT.ViT_LRP import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, num_classes=8, embed_dim=32, depth=2, num_heads=4,
                            mlp_ratio=2.0, qkv_bias=True).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clip = tsc.make_model(40, image_size=32, patch=8, width=32, vision_layers=2).eval()
    tsc.vision_from_vit_copy(clip, vit)
    clip.vision_model.pre_layrnorm = torch.nn.Identity()
    x = torch.randn(3, 3, 32, 32)
    seen = {}
    vit.norm.register_forward_hook(lambda m, a, out: seen.__setitem__("norm", out))
    vit, clip, x = vit.double(), clip.double(), x.double()  # the same weights, compared in float64
    vit(x)
    got = clip.vision_model(pixel_values=x).pooler_output
    # float64: measured 1.2e-9 apart (values ~1; float32 differed by ~1e-6 and was checked at 1e-5)
    torch.testing.assert_close(got, seen["norm"][:, 0], atol=1e-8, rtol=1e-8)


def test_clip_tokenizer_and_pooling_read_the_end_token():
    tok = tsc.build_tokenizer()
    enc = tok(["a small red disk.", "a large blue star, a small white ring and a large green cross."],
              padding=True, return_tensors="pt")
    assert (enc["input_ids"] != tok.unk_token_id).all()
    model = tsc.make_model(len(tok.get_vocab())).eval()
    assert model.config.text_config.eos_token_id == tok.sep_token_id != 2  # the first [SEP], not an argmax
    out = model.text_model(**enc)
    ends = enc["attention_mask"].sum(1) - 1
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), ends])


def test_retrieval_accuracy_by_hand():
    class Fixed(torch.nn.Module):
        """Image i and caption i share a direction, except image 2, which looks like caption 0."""

        def get_image_features(self, pixel_values):
            return torch.eye(3)[[0, 1, 0]][: pixel_values.shape[0]]

        def get_text_features(self, input_ids, attention_mask):
            return torch.eye(3)[: input_ids.shape[0]]

    pool = {"images": np.zeros((3, 8, 8, 3), np.uint8), "captions": ["a red disk.", "a blue star.", "a red ring."]}
    acc = tsc.retrieval_accuracy(Fixed(), tsc.build_tokenizer(), pool, torch.device("cpu"))
    assert acc["image_to_caption_top1"] == pytest.approx(2 / 3)
    # caption 0 -> image 0 (first of the tie with image 2), caption 1 -> image 1, caption 2 -> image 0: wrong
    assert acc["caption_to_image_top1"] == pytest.approx(2 / 3)
    pool["captions"][2] = "a red disk."  # a caption shared by pictures 0 and 2 counts for both
    acc = tsc.retrieval_accuracy(Fixed(), tsc.build_tokenizer(), pool, torch.device("cpu"))
    assert acc["image_to_caption_top1"] == pytest.approx(1.0) and acc["chance"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------
# The training CLIs, end to end on a few examples
# --------------------------------------------------------------------------
def test_translation_training_cli_writes_a_loadable_model(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = tmp_path / "bart"
    assert tst.main(["--out-dir", str(out), "--train-pairs", "32", "--val-pairs", "4", "--steps", "2",
                     "--batch-size", "8", "--d-model", "16"]) == 0
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.standin["steps"] == 2 and 0.0 <= model.config.standin["val_exact_match"] <= 1.0
    assert tok.convert_tokens_to_ids("étoile") != tok.unk_token_id
    gen = model.generate(**tok(["a red disk."], return_tensors="pt"), max_new_tokens=3)
    assert gen[0, 0] == model.generation_config.decoder_start_token_id == tok.cls_token_id


def test_clip_training_cli_writes_a_loadable_model(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    out = tmp_path / "clip"
    argv = ["--out-dir", str(out), "--train-scenes", "8", "--val-scenes", "4", "--steps", "2", "--batch-size", "4",
            "--init-vision", os.path.join(SAMPLES, "synthetic_scenes_vit")]
    assert tsc.main(argv) == 0
    model = CLIPModel.from_pretrained(out)
    record = model.config.standin
    assert record["steps"] == 2 and record["init_vision_sha256"] and record["val_retrieval"]["chance"] == 0.25
    tok, proc = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    from data.scenes import generate_scene

    picture = generate_scene(0, 0, "val").image
    from PIL import Image

    # float32 pixels are the point; the two float32 paths differ by <= 5.9e-8 (20 scenes measured, values < 1)
    torch.testing.assert_close(proc(images=Image.fromarray(picture), return_tensors="pt")["pixel_values"],
                               tsc.to_pixels(picture[None]), atol=1e-6, rtol=0)
    assert tsc.main(["--out-dir", str(tmp_path / "c2"), "--init-vision", str(tmp_path)]) == 2  # not a model dir


# --------------------------------------------------------------------------
# The shipped stand-ins
# --------------------------------------------------------------------------
def test_shipped_translation_standin_keeps_its_recorded_exact_match():
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    d = os.path.join(SAMPLES, "synthetic_translation_bart")
    model = AutoModelForSeq2SeqLM.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    record = model.config.standin
    pairs = tst.sample_pairs(record["val_pairs"], record["data_seed"], "val")[:100]
    acc = tst.exact_match(model, tok, pairs, torch.device("cpu"))
    assert abs(acc - record["val_exact_match"]) < 0.12


def test_shipped_clip_standin_keeps_its_recorded_retrieval():
    from transformers import AutoTokenizer, CLIPModel

    d = os.path.join(SAMPLES, "synthetic_scenes_clip")
    model = CLIPModel.from_pretrained(d).eval()
    record = model.config.standin
    pool = tsc.scene_captions_pool(record["val_scenes"], record["data_seed"], "val")
    acc = tsc.retrieval_accuracy(model, AutoTokenizer.from_pretrained(d), pool, torch.device("cpu"))
    for key in ("image_to_caption_top1", "caption_to_image_top1"):
        assert abs(acc[key] - record["val_retrieval"][key]) < 0.02  # the same scenes: equal up to float noise
    assert json.loads(open(os.path.join(d, "preprocessor_config.json")).read())["image_mean"] == [0.5, 0.5, 0.5]
