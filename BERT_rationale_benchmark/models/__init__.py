"""Models of the rationale benchmark."""
