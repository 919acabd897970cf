"""fastattn: DiTFastAttn attention compression in pure PyTorch (no ComfyUI, no Reducio import)."""
