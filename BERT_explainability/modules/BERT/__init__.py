"""BERT built from the shared LRP layers, and its explanations."""
