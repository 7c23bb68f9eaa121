"""Word-level scores from wordpiece relevance, and text heatmaps (HTML, LaTeX).

A word's score is the maximum over its wordpieces; special tokens are
skipped (../shared/METHODS.md section 6).  Heatmaps colour each word by its
score: red for positive, blue for negative, white for 0, with the intensity
scaled by the largest absolute score of the text, so 0 stays white and the
sign is never lost.  LaTeX output uses one ``\\colorbox`` per word, as the
supplementary material of Chefer et al. (CVPR 2021) shows its text examples.
"""
from __future__ import annotations

import html
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor

__all__ = ["word_scores", "encoding_words", "score_to_rgb", "render_html", "render_latex", "latex_document"]

Scores = Union[Tensor, Sequence[float]]


def _as_floats(scores: Scores) -> List[float]:
    if isinstance(scores, Tensor):
        if scores.dim() != 1:
            raise ValueError(f"scores must be 1-D (one sample), got shape {tuple(scores.shape)}")
        return [float(v) for v in scores.detach().cpu().tolist()]
    return [float(v) for v in scores]


def word_scores(scores: Scores, word_ids: Sequence[Optional[int]]) -> List[float]:
    """One score per word: the maximum over the word's wordpieces.

    Parameters
    ----------
    scores:
        1-D wordpiece scores of one sample, (N,).
    word_ids:
        The fast tokenizer's ``encoding.word_ids()`` for the same sample
        (length N; None for special and padding tokens).

    Returns
    -------
    list of float
        Scores of the words present, in word order (METHODS.md section 6).
    """
    values = _as_floats(scores)
    if len(values) != len(word_ids):
        raise ValueError(f"{len(values)} scores for {len(word_ids)} word ids")
    best: Dict[int, float] = {}
    for value, word in zip(values, word_ids):
        if word is None:
            continue
        best[word] = value if word not in best else max(best[word], value)
    return [best[w] for w in sorted(best)]


def encoding_words(text: str, encoding, batch_index: int = 0) -> List[str]:
    """The words of ``text`` as a fast tokenizer split them, in the order of
    :func:`word_scores` (words cut off by truncation are absent)."""
    word_ids = encoding.word_ids(batch_index)
    words = []
    for w in sorted({w for w in word_ids if w is not None}):
        span = encoding.word_to_chars(batch_index, w)
        words.append(text[span.start:span.end])
    return words


def score_to_rgb(score: float, scale: float) -> Tuple[int, int, int]:
    """Colour of ``score`` on a blue - white - red scale saturating at +-``scale``."""
    if not math.isfinite(score) or scale <= 0 or not math.isfinite(scale):
        return 255, 255, 255
    v = max(-1.0, min(1.0, score / scale))
    fade = int(round(255 * (1.0 - abs(v))))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def _scale(scores: Sequence[float]) -> float:
    finite = [abs(s) for s in scores if math.isfinite(s)]
    return max(finite) if finite else 0.0


def _check(words: Sequence[str], scores: Scores) -> List[float]:
    values = _as_floats(scores)
    if len(words) != len(values):
        raise ValueError(f"{len(words)} words but {len(values)} scores")
    return values


def render_html(words: Sequence[str], scores: Scores, title: Optional[str] = None) -> str:
    """A standalone HTML page: one coloured ``<span class="word">`` per word
    (red positive, blue negative, the score as a tooltip) and a legend."""
    values = _check(words, scores)
    scale = _scale(values)
    spans = []
    for word, value in zip(words, values):
        r, g, b = score_to_rgb(value, scale)
        spans.append(f'<span class="word" style="background-color: rgb({r}, {g}, {b})" '
                     f'title="{value:.4g}">{html.escape(word)}</span>')
    heading = f"<h2>{html.escape(title)}</h2>\n" if title else ""
    lo, hi = score_to_rgb(-1, 1), score_to_rgb(1, 1)
    legend = (
        '<div class="legend">'
        f'<span class="tick">{-scale:.3g} (negative)</span>'
        f'<span class="bar" style="background: linear-gradient(to right, rgb{lo}, rgb(255, 255, 255), rgb{hi})">'
        '</span>'
        f'<span class="tick">{scale:.3g} (positive)</span>'
        '</div>'
    )
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title or 'relevance')}</title>\n"
        "<style>\n"
        "body { font-family: sans-serif; max-width: 50em; margin: 2em auto; }\n"
        ".text { line-height: 2.2; }\n"
        ".word { padding: 0.15em 0.2em; border-radius: 0.2em; }\n"
        ".legend { display: flex; align-items: center; gap: 0.6em; margin: 1em 0; font-size: 0.9em; }\n"
        ".bar { display: inline-block; width: 16em; height: 1em; border: 1px solid #888; }\n"
        "</style>\n</head>\n<body>\n"
        f"{heading}{legend}\n"
        f'<p class="text">{" ".join(spans)}</p>\n'
        "</body>\n</html>\n"
    )


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def render_latex(words: Sequence[str], scores: Scores) -> str:
    """LaTeX fragment, one ``\\colorbox[RGB]{r,g,b}{\\strut word}`` per word
    (needs ``\\usepackage{xcolor}``); same colours as :func:`render_html`."""
    values = _check(words, scores)
    scale = _scale(values)
    boxes = []
    for word, value in zip(words, values):
        r, g, b = score_to_rgb(value, scale)
        boxes.append(f"\\colorbox[RGB]{{{r},{g},{b}}}{{\\strut {_latex_escape(word)}}}")
    return "% needs \\usepackage{xcolor}\n{\\setlength{\\fboxsep}{1pt}\n" + " \\allowbreak\n".join(boxes) + "}\n"


def latex_document(body: str, title: Optional[str] = None) -> str:
    """Wrap a :func:`render_latex` fragment into a compilable document."""
    heading = f"\\section*{{{_latex_escape(title)}}}\n" if title else ""
    return ("\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage{xcolor}\n"
            "\\begin{document}\n" + heading + "\\noindent\n" + body + "\\end{document}\n")
