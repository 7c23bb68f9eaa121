"""Model code of :mod:`BERT_explainability` (the LRP rules live in the top-level :mod:`modules.layers`)."""
