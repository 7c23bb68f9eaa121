"""Fine-tuning and explanation pipeline (../shared/METHODS.md section 6)."""
