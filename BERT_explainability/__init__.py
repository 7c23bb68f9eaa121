"""Explanations of BERT text classifiers: the LRP model copy, every method of
../shared/METHODS.md section 3, word-level scores and text heatmaps."""
