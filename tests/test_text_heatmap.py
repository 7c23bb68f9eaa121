"""Word-level scores and the HTML / LaTeX text heatmaps."""
import re
from html.parser import HTMLParser

import pytest
import torch
import transformers

from BERT_explainability.text_heatmap import (encoding_words, latex_document, render_html, render_latex,
                                              score_to_rgb, word_scores)


def test_word_scores_max_over_pieces_special_tokens_skipped():
    # [CLS] un ##believ ##able film [SEP] [PAD]
    scores = torch.tensor([9.0, 0.1, -0.5, 0.7, -2.0, 8.0, 0.0])
    word_ids = [None, 0, 0, 0, 1, None, None]
    assert word_scores(scores, word_ids) == pytest.approx([0.7, -2.0])
    # a word whose pieces are all negative keeps the largest (least negative) one
    assert word_scores([0.0, -3.0, -1.0, 0.0], [None, 0, 0, None]) == [-1.0]
    with pytest.raises(ValueError, match="word ids"):
        word_scores(torch.zeros(3), [None, 0])


def test_word_scores_with_a_fast_tokenizer():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##believ", "##able",
                                         "film", ",", "great"])}
    tok = transformers.BertTokenizer(vocab=vocab)
    text = "Unbelievable film, great"
    enc = tok(text)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "un", "##believ", "##able", "film", ",",
                                                           "great", "[SEP]"]
    scores = torch.tensor([5.0, 0.2, 0.9, 0.1, 0.4, -0.3, 0.8, 5.0])
    assert encoding_words(text, enc) == ["Unbelievable", "film", ",", "great"]
    assert word_scores(scores, enc.word_ids(0)) == pytest.approx([0.9, 0.4, -0.3, 0.8])


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.words, self.styles, self._in = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "word":
            self._in = True
            self.styles.append(attrs["style"])
            self.words.append("")

    def handle_endtag(self, tag):
        if tag == "span":
            self._in = False

    def handle_data(self, data):
        if self._in:
            self.words[-1] += data


def test_html_words_in_order_one_colour_each_sign_and_legend():
    words = ["a", "<b>", "film", "&", "plot"]
    scores = [1.0, -0.5, 0.0, 0.25, -1.0]
    page = render_html(words, scores, title="class 1")
    parser = _Spans()
    parser.feed(page)
    assert parser.words == words  # escaped in the page, read back verbatim, in order
    colours = [tuple(int(c) for c in re.search(r"rgb\((\d+), (\d+), (\d+)\)", s).groups()) for s in parser.styles]
    assert colours == [(255, 0, 0), (128, 128, 255), (255, 255, 255), (255, 191, 191), (0, 0, 255)]
    assert 'class="legend"' in page and "negative" in page and "positive" in page
    assert "<h2>class 1</h2>" in page
    with pytest.raises(ValueError, match="2 words but 1 scores"):
        render_html(["a", "b"], [1.0])


def test_colour_scale_is_symmetric_and_safe():
    assert score_to_rgb(0.5, 1.0) == (255, 128, 128)
    assert score_to_rgb(-0.5, 1.0) == (128, 128, 255)
    assert score_to_rgb(3.0, 1.0) == (255, 0, 0)  # saturates
    assert score_to_rgb(1.0, 0.0) == (255, 255, 255)  # all-zero text
    assert score_to_rgb(float("nan"), 1.0) == (255, 255, 255)


def test_latex_one_colorbox_per_word_escaped():
    words = ["100%", "a_b", "film"]
    body = render_latex(words, torch.tensor([2.0, -1.0, 0.0]))
    boxes = re.findall(r"\\colorbox\[RGB\]\{(\d+),(\d+),(\d+)\}\{\\strut ([^}]*)\}", body)
    assert [b[3] for b in boxes] == [r"100\%", r"a\_b", "film"]
    assert [tuple(map(int, b[:3])) for b in boxes] == [(255, 0, 0), (128, 128, 255), (255, 255, 255)]
    doc = latex_document(body, title="x_y")
    assert doc.startswith("\\documentclass") and "\\usepackage{xcolor}" in doc and r"x\_y" in doc
