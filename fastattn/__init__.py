"""fastattn: DiTFastAttn attention compression in pure PyTorch (no ComfyUI, no Reducio import)."""
from .plan import Plan  # noqa: E402,F401  (added by fa-calib)
