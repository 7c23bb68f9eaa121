"""Pictures of relevance maps: heatmap overlays and side-by-side grids (PNG).

The functions live in :mod:`modules.visualization` (where the engine's
picture helpers can import them); this module keeps the published path.
"""
from modules.visualization import draw_outline, overlay, save_grid, save_png, to_display_image

__all__ = ["to_display_image", "overlay", "save_png", "save_grid", "draw_outline"]
