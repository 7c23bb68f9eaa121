"""DETR: explanations of detections and masks from them (ICCV 2021, METHODS_ICCV.md sections 4 and 7)."""
