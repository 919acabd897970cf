"""fastattn: DiTFastAttn attention compression in pure PyTorch (no ComfyUI, no Reducio import)."""

from .methods import METHOD_STRINGS, Method, parse_method, parse_methods, residual_needed
from .plan import Plan
from .runtime import CfgRows, FastAttnRuntime, MissingCacheError, compute_attention_core
from .state import FastAttnState, LayerCache
from .windows import CallInfo, GridWindow, Window1D, grid_window_fraction, window_1d_fraction
