"""Print the supported-models table (the README's copy is generated from it)."""
from modules.adapters import supported_models_markdown

print(supported_models_markdown(), end="")
