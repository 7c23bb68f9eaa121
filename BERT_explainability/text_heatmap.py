"""Word-level scores from wordpiece relevance, and text heatmaps (HTML, LaTeX).

The functions live in :mod:`modules.text_heatmap` (where the engine's
picture helpers can import them); this module keeps the published path.
"""
from modules.text_heatmap import encoding_words, latex_document, render_html, render_latex, score_to_rgb, word_scores

__all__ = ["word_scores", "encoding_words", "score_to_rgb", "render_html", "render_latex", "latex_document"]
