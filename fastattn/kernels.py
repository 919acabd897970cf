"""Attention kernels: an exact reference and fast window kernels that skip masked work.

Every kernel takes q, k, v as [B, H, L, D] (PyTorch SDPA layout), uses the softmax
scale 1/sqrt(D) and returns [B, H, L, D]. `to_bhld` / `from_bhld` convert the other
layouts ComfyUI and flash-attn use.

Why several window kernels: SDPA with a band mask gives the right numbers but costs
full-attention time, so it is only the reference. The fast paths compute only what
the window keeps:

* `banded_window_attention` (pure torch, any device): queries in blocks, each block
  against the keys its rows can see (a contiguous band for a 1-D window); the work
  scales with the window's kept fraction. The fastest correct CPU path.
* `flex_window_attention`: PyTorch FlexAttention with a block mask, compiled. On CPU
  the compile costs tens of seconds per shape, so `auto` uses it only on CUDA.
* `flash_window_attention`: flash-attn 2's `window_size` (CUDA, fp16/bf16, plain 1-D
  window), the kernel the official code uses.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .windows import GridWindow, Window1D

LAYOUTS = ("blc", "bhld", "blhd")
BACKENDS = ("auto", "reference", "banded", "flex", "flash")


# ----------------------------------------------------------------------------- layouts


def to_bhld(x: torch.Tensor, layout: str, heads: Optional[int] = None) -> torch.Tensor:
    """Convert q/k/v from `layout` to [B, H, L, D] (a view where possible).

    "blc":  [B, L, H*D] (ComfyUI's default; needs `heads`)
    "bhld": [B, H, L, D] (ComfyUI skip_reshape=True, SDPA)
    "blhd": [B, L, H, D] (flash-attn, the official processor)
    """
    if x.dim() != (3 if layout == "blc" else 4):
        raise ValueError(f"layout {layout!r} expects a {3 if layout == 'blc' else 4}-D tensor, got shape {tuple(x.shape)}")
    if layout == "bhld":
        return x
    if layout == "blhd":
        return x.transpose(1, 2)
    if layout == "blc":
        if not heads:
            raise ValueError("layout 'blc' ([B, L, heads*dim]) needs the number of heads")
        batch, length, channels = x.shape
        if channels % heads:
            raise ValueError(f"{channels} channels are not divisible by heads={heads}")
        return x.reshape(batch, length, heads, channels // heads).transpose(1, 2)
    raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")


def from_bhld(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of `to_bhld`: [B, H, L, D] to `layout` (contiguous for "blc")."""
    if layout == "bhld":
        return x
    if layout == "blhd":
        return x.transpose(1, 2)
    if layout == "blc":
        batch, heads, length, dim = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * dim)
    raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")


# ----------------------------------------------------------------------------- reference


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Exact attention, softmax(q k^T / sqrt(D)) v, with an optional boolean mask (True = keep)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _check_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"expected q, k, v as [B, H, L, D] with matching batch/heads/dim, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"window attention is defined for self-attention only (query and key lengths "
            f"equal), got {q.shape[2]} queries and {k.shape[2]} keys"
        )
    return q.shape[2]


def masked_reference_window_attention(q, k, v, window) -> torch.Tensor:
    """Window attention as SDPA over the full boolean mask (exact; full-attention cost)."""
    seq_len = _check_self_attention(q, k, v)
    return reference_attention(q, k, v, window.mask(seq_len, device=q.device))


# ----------------------------------------------------------------------------- banded


def default_block_size(window, seq_len: int) -> int:
    """Query block size for the banded kernel.

    For a 1-D band of reach r per side, a block of b queries touches b + 2r keys of
    which ~2r + 1 are used per row: small blocks waste little but multiply the SDPA
    calls. A quarter of the per-side reach (clamped to 64..512) measured best on CPU at
    2k-16k tokens (see bench/fastattn_kernels_results.md). For a GridWindow (used only
    when contiguous blocks are requested instead of grid tiles): whole image rows."""
    if isinstance(window, GridWindow):
        width = window.grid3[2]
        rows = max(1, 256 // width)
        return width * rows
    if isinstance(window, Window1D):
        left, right = window.resolved(window.image_tokens(seq_len))
        return int(min(512, max(64, (left + right) // 8)))
    return 256


def banded_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, block_size: Optional[int] = None
) -> torch.Tensor:
    """Window attention computing each query block only against the keys it can see.

    Text query rows of joint attention (global in every window) run as one full
    attention call; image queries run in blocks, each against the union of its rows'
    key ranges with the exact window mask inside (`block_size` contiguous queries; for a
    GridWindow without `block_size`, rectangular tiles of the grid). Agrees with
    `masked_reference_window_attention` to float rounding."""
    seq_len = _check_self_attention(q, k, v)
    start, end = window.image_range(seq_len)
    out = torch.empty_like(q)
    if start > 0:
        out[:, :, :start] = reference_attention(q[:, :, :start], k, v)
    if end < seq_len:
        out[:, :, end:] = reference_attention(q[:, :, end:], k, v)
    device = q.device
    if isinstance(window, GridWindow) and block_size is None:
        # Rectangular query tiles also skip the columns outside the box.
        for query_index, key_index in window.blocks(seq_len):
            query_index, key_index = query_index.to(device), key_index.to(device)
            mask = window.row_mask(query_index, seq_len, key_index)
            result = reference_attention(
                q.index_select(2, query_index), k.index_select(2, key_index), v.index_select(2, key_index),
                None if bool(mask.all()) else mask,
            )
            out.index_copy_(2, query_index, result)
        return out
    block = int(block_size or default_block_size(window, seq_len))
    if block <= 0:
        raise ValueError(f"block_size must be positive, got {block}")
    # A 1-D band is translation invariant: every interior block has the same mask
    # relative to its key range, so masks are built once per relative geometry.
    relative_masks = {}
    for q_start in range(start, end, block):
        q_end = min(q_start + block, end)
        ranges = window.key_ranges(q_start, q_end, seq_len)
        if len(ranges) == 1:
            k_start, k_end = ranges[0]
            keys, values = k[:, :, k_start:k_end], v[:, :, k_start:k_end]
            geometry = (q_end - q_start, k_start - q_start, k_end - q_start)
            if isinstance(window, Window1D) and geometry in relative_masks:
                mask = relative_masks[geometry]
            else:
                key_index = torch.arange(k_start, k_end, device=device)
                mask = window.row_mask(torch.arange(q_start, q_end, device=device), seq_len, key_index)
                mask = None if bool(mask.all()) else mask
                if isinstance(window, Window1D):
                    relative_masks[geometry] = mask
        else:
            key_index = torch.cat([torch.arange(a, b, device=device) for a, b in ranges])
            keys, values = k.index_select(2, key_index), v.index_select(2, key_index)
            mask = window.row_mask(torch.arange(q_start, q_end, device=device), seq_len, key_index)
            mask = None if bool(mask.all()) else mask
        out[:, :, q_start:q_end] = reference_attention(q[:, :, q_start:q_end], keys, values, mask)
    return out


# ----------------------------------------------------------------------------- flex


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_mask_mod(window, seq_len: int):
    start, end = window.image_range(seq_len)

    def is_text(index):
        return (index < start) | (index >= end)

    if isinstance(window, Window1D):
        left, right = window.resolved(end - start)

        def image_keep(q_idx, kv_idx):
            offset = kv_idx - q_idx
            return (offset >= -left) & (offset <= right)

    elif isinstance(window, GridWindow):
        _, height, width = window.grid3
        rt, rh, rw = window.radius3

        def image_keep(q_idx, kv_idx):
            qi, ki = q_idx - start, kv_idx - start
            keep_t = (qi // (height * width) - ki // (height * width)).abs() <= rt
            keep_h = ((qi // width) % height - (ki // width) % height).abs() <= rh
            keep_w = (qi % width - ki % width).abs() <= rw
            return keep_t & keep_h & keep_w

    else:
        raise TypeError(f"flex attention has no mask rule for {type(window).__name__}")

    def mask_mod(b, h, q_idx, kv_idx):
        return image_keep(q_idx, kv_idx) | is_text(q_idx) | is_text(kv_idx)

    return mask_mod


@functools.lru_cache(maxsize=32)
def _block_mask(window, seq_len: int, device_text: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_flex_mask_mod(window, seq_len), None, None, seq_len, seq_len, device=device_text)


def flex_window_attention(q, k, v, window, compile: bool = True) -> torch.Tensor:
    """Window attention with FlexAttention and a block mask (block masks cached per shape).

    `compile=False` runs FlexAttention eagerly, which materialises the full score
    matrix: correct but slow, for tests only. If compilation fails (no C++ compiler on
    CPU, no Triton on CUDA) it warns and runs eagerly."""
    seq_len = _check_self_attention(q, k, v)
    if not flex_attention_available():
        raise RuntimeError("torch.nn.attention.flex_attention is not available in this torch build (needs torch >= 2.5)")
    block_mask = _block_mask(window, seq_len, str(q.device))
    if compile:
        try:
            return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
        except Exception as error:  # noqa: BLE001 - no compiler / Triton: stay correct, run eagerly
            warnings.warn(
                f"torch.compile of FlexAttention failed ({type(error).__name__}: {error}); running it "
                f"eagerly (correct, but computes every score). backend='banded' is faster here."
            )
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "unfused implementation" warning is the point here
        return flex_attention(q, k, v, block_mask=block_mask)


# ----------------------------------------------------------------------------- head-wise


def _headwise_flex_mask_mod(tables, prefix_tokens: int, suffix_tokens: int, seq_len: int):
    """mask_mod of a per-head 1-D window: tables = (left[H], right[H]) int tensors (full = L)."""
    left, right = tables
    start, end = prefix_tokens, seq_len - suffix_tokens

    def mask_mod(b, h, q_idx, kv_idx):
        offset = kv_idx - q_idx
        band = (offset >= -left[h]) & (offset <= right[h])
        q_text = (q_idx < start) | (q_idx >= end)
        kv_text = (kv_idx < start) | (kv_idx >= end)
        return band | q_text | kv_text

    return mask_mod


def _headwise_text_tokens(windows) -> tuple:
    texts = {(w.prefix_tokens, w.suffix_tokens) for w in windows if w is not None}
    if len(texts) > 1:
        raise ValueError(f"per-head windows of one call must agree on the text tokens, got {sorted(texts)}")
    return texts.pop() if texts else (0, 0)


_HEADWISE_MASKS: dict = {}


def _headwise_block_mask(windows: tuple, seq_len: int, device):
    """A FlexAttention block mask with one window per head (cached per geometry, 16 kept)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (windows, seq_len, str(device))
    block_mask = _HEADWISE_MASKS.get(key)
    if block_mask is None:
        prefix, suffix = _headwise_text_tokens(windows)
        image = seq_len - prefix - suffix
        sides = [window.resolved(image) if window is not None else (seq_len, seq_len) for window in windows]
        left = torch.tensor([s[0] for s in sides], dtype=torch.int64, device=device)
        right = torch.tensor([s[1] for s in sides], dtype=torch.int64, device=device)
        mask_mod = _headwise_flex_mask_mod((left, right), prefix, suffix, seq_len)
        block_mask = create_block_mask(mask_mod, None, len(windows), seq_len, seq_len, device=str(device))
        if len(_HEADWISE_MASKS) >= 16:
            _HEADWISE_MASKS.pop(next(iter(_HEADWISE_MASKS)))
        _HEADWISE_MASKS[key] = block_mask
    return block_mask


def headwise_flex_attention(q, k, v, windows, compile: bool = True) -> torch.Tensor:
    """Every head with its own 1-D (arrow) window in ONE FlexAttention call.

    The per-head block mask skips the key blocks outside each head's band, so a call that
    mixes full, wide and narrow heads costs what its kept blocks cost (DiTFastAttnV2's fused
    kernel does the same with whole tiles). Compiled on CUDA; `compile=False` runs eagerly
    (computes every score: correct, for CPU tests)."""
    seq_len = _check_self_attention(q, k, v)
    windows = tuple(windows)
    if len(windows) != q.shape[1]:
        raise ValueError(f"{len(windows)} per-head windows for {q.shape[1]} heads")
    if any(w is not None and not isinstance(w, Window1D) for w in windows):
        raise TypeError("head-wise FlexAttention takes Window1D (arrow) windows or None (full) per head")
    if not flex_attention_available():
        raise RuntimeError("torch.nn.attention.flex_attention is not available in this torch build (needs torch >= 2.5)")
    block_mask = _headwise_block_mask(windows, seq_len, q.device)
    if compile:
        try:
            return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
        except Exception as error:  # noqa: BLE001 - no compiler / Triton: stay correct, run eagerly
            warnings.warn(f"torch.compile of head-wise FlexAttention failed ({type(error).__name__}: {error}); "
                          f"running it eagerly (correct, but computes every score)")
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask)


def headwise_window_attention(q, k, v, windows, backend: str = "auto") -> torch.Tensor:
    """Attention on [B, H, L, D] where head h uses `windows[h]` (a window spec, or None = full).

    backends: "flex" (one FlexAttention call with a per-head block mask; compiled on CUDA,
    eager elsewhere), "banded" (heads of equal window grouped into one banded-kernel call
    each: the fast CPU path), "reference" (per-group SDPA over the boolean mask), "auto"
    (flex where compiled FlexAttention works, i.e. CUDA; else banded)."""
    seq_len = _check_self_attention(q, k, v)
    windows = list(windows)
    if len(windows) != q.shape[1]:
        raise ValueError(f"{len(windows)} per-head windows for {q.shape[1]} heads")
    if backend not in BACKENDS:
        raise ValueError(f"unknown window attention backend {backend!r}; use one of {BACKENDS}")
    windows = [None if (w is None or w.is_full(seq_len)) else w for w in windows]
    if all(w is None for w in windows):
        return reference_attention(q, k, v)
    plain_1d = all(w is None or isinstance(w, Window1D) for w in windows)
    if backend == "auto":
        backend = "flex" if (q.is_cuda and plain_1d and compiled_flex_works(q.device.type)) else "banded"
    if backend == "flex":
        return headwise_flex_attention(q, k, v, windows, compile=q.is_cuda)
    groups: dict = {}
    for head, window in enumerate(windows):
        groups.setdefault(window, []).append(head)
    if len(groups) == 1:
        window = windows[0]
        return window_attention(q, k, v, window, backend if backend != "flash" else "banded")
    out = torch.empty_like(q)
    for window, heads in groups.items():
        index = torch.tensor(heads, device=q.device)
        q_, k_, v_ = (t.index_select(1, index) for t in (q, k, v))
        if window is None:
            result = reference_attention(q_, k_, v_)
        else:
            result = window_attention(q_, k_, v_, window, "reference" if backend == "reference" else "banded")
        out.index_copy_(1, index, result)
    return out


# ----------------------------------------------------------------------------- flash-attn


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def flash_window_attention(q, k, v, window) -> torch.Tensor:
    """Window attention with flash-attn 2's `window_size` (CUDA, fp16/bf16, plain Window1D)."""
    seq_len = _check_self_attention(q, k, v)
    if not isinstance(window, Window1D) or window.prefix_tokens or window.suffix_tokens:
        raise ValueError("flash-attn's window_size only expresses a 1-D window without global text tokens")
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise RuntimeError("flash_attn is not installed; use backend 'banded' or 'flex'") from error
    left, right = window.resolved(seq_len)
    window_size = (-1 if left >= seq_len else left, -1 if right >= seq_len else right)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size=window_size)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- dispatch


def available_backends(device: torch.device | str = "cpu") -> list:
    device = torch.device(device)
    backends = ["reference", "banded"]
    if flex_attention_available():
        backends.append("flex")
    if device.type == "cuda" and flash_attn_available():
        backends.append("flash")
    return backends


@functools.lru_cache(maxsize=None)
def compiled_flex_works(device_type: str) -> bool:
    """Whether compiled FlexAttention runs on this device type (probed once per process
    on a tiny problem: a missing compiler or Triton makes torch.compile fail)."""
    if not flex_attention_available():
        return False
    try:
        probe = torch.zeros(1, 1, 128, 16, device=device_type)
        block_mask = _block_mask(Window1D(16, 16), 128, str(probe.device))
        _compiled_flex_attention()(probe, probe, probe, block_mask=block_mask)
    except Exception as error:  # noqa: BLE001 - any compile/runtime failure means "not usable"
        warnings.warn(f"compiled FlexAttention unavailable on {device_type} ({error!r}); using the banded kernel")
        return False
    return True


def choose_backend(q: torch.Tensor, window) -> str:
    """The fastest correct backend for this call (what backend='auto' runs)."""
    if q.is_cuda:
        plain_1d = isinstance(window, Window1D) and not (window.prefix_tokens or window.suffix_tokens)
        if plain_1d and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
            return "flash"
        if compiled_flex_works(q.device.type):
            return "flex"
    return "banded"


def window_attention(q, k, v, window, backend: str = "auto", block_size: Optional[int] = None) -> torch.Tensor:
    """Window attention on [B, H, L, D] tensors with the chosen backend."""
    seq_len = _check_self_attention(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown window attention backend {backend!r}; use one of {BACKENDS}")
    if window.is_full(seq_len):
        return reference_attention(q, k, v)
    if backend == "auto":
        backend = choose_backend(q, window)
        if backend == "flex":
            try:
                return flex_window_attention(q, k, v, window)
            except Exception:  # noqa: BLE001 - shapes flex cannot compile still get a correct result
                return banded_window_attention(q, k, v, window, block_size)
    if backend == "reference":
        return masked_reference_window_attention(q, k, v, window)
    if backend == "banded":
        return banded_window_attention(q, k, v, window, block_size)
    if backend == "flex":
        return flex_window_attention(q, k, v, window)
    return flash_window_attention(q, k, v, window)


__all__ = [
    "LAYOUTS",
    "BACKENDS",
    "to_bhld",
    "from_bhld",
    "reference_attention",
    "masked_reference_window_attention",
    "banded_window_attention",
    "flex_window_attention",
    "flash_window_attention",
    "window_attention",
    "headwise_window_attention",
    "headwise_flex_attention",
    "available_backends",
    "choose_backend",
    "default_block_size",
    "flex_attention_available",
    "flash_attn_available",
]

