"""ERASER Movie Reviews rationale benchmark for BERT explanations (../shared/METHODS.md section 6).

- :mod:`BERT_rationale_benchmark.utils`: readers for the ERASER format.
- :mod:`BERT_rationale_benchmark.metrics`: token-level precision / recall / F1 of top-k rationales.
- :mod:`BERT_rationale_benchmark.models.pipeline.bert_pipeline`: fine-tuning and explanation runs.
- :mod:`BERT_rationale_benchmark.synthetic_reviews`: an offline ERASER-format stand-in data set.
"""
