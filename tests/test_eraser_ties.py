"""ERASER top-k words with an explicit tie rule (issue 16): each rule picks what it documents."""
import torch

from BERT_rationale_benchmark.models.pipeline.bert_pipeline import top_k_words
from modules.ranking import tie_permutation


def test_each_rule_orders_tied_words_as_documented():
    scores = [0.5, 0.0, None, 0.0, 0.9, 0.0]  # words 1, 3, 5 tied at 0; word 2 has no wordpiece
    assert top_k_words(scores, 2, "raster") == [4, 0]
    assert top_k_words(scores, 3, "raster") == [4, 0, 1]  # the earlier tied word first
    assert top_k_words(scores, 10, "raster") == [4, 0, 1, 3, 5]  # never the unscored word
    # random: among the tied words (scored positions 1, 2, 4 of the 5 scored words) the seeded permutation decides
    perm = tie_permutation(5, 7).tolist()
    tied = sorted([1, 2, 4], key=perm.index)
    scored = [0, 1, 3, 4, 5]
    assert top_k_words(scores, 3, "random", 7) == [4, 0, scored[tied[0]]]
    assert top_k_words(scores, 3, "random", 7) == top_k_words(scores, 3, "random", 7)
    values = torch.tensor([[0.5, 0.0, 0.0, 0.9, 0.0]], dtype=torch.float64)
    assert top_k_words(scores, 3, "topk") == [scored[i] for i in torch.topk(values, 3).indices[0].tolist()]


def test_without_ties_every_rule_agrees():
    scores = [0.3, 0.1, 0.7, None, 0.2]
    assert top_k_words(scores, 3, "raster") == top_k_words(scores, 3, "random") == top_k_words(scores, 3, "topk") \
        == [2, 0, 4]
