"""Window specifications: which (query, key) pairs window attention computes.

Two shapes of window, both for self-attention (queries and keys are the same tokens):

* `Window1D`: the official DiTFastAttn window, a band over the flattened token order
  with flash-attn's `window_size=(left, right)` semantics (including its -1 / negative
  conventions, so that the golden `window_kernel` data is reproduced exactly).
* `GridWindow`: a box over a 2-D (H, W) or 3-D (T, H, W) token grid in raster order,
  for models where a 1-D band would cut across image rows or video frames.

Both can carry text tokens of joint attention before (`prefix_tokens`, Flux/SD3) or
after (`suffix_tokens`, HunyuanVideo) the image tokens. Text tokens stay global
(DiTFastAttnV2's "arrow" pattern): a text query sees every key and every query sees
every text key; the window applies to image-image pairs only, indexed inside the image
segment.

Every spec answers three questions: the boolean mask (or some of its rows, so that
long sequences never materialise an L x L mask), the exact number of kept pairs
(FLOPs accounting), and which key ranges a block of queries can touch (used by the
chunked kernel to skip masked work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Tuple, runtime_checkable

import torch

KeyRanges = List[Tuple[int, int]]


@runtime_checkable
class WindowSpec(Protocol):
    """What the kernels and the runtime need from a window (Window1D and GridWindow)."""

    prefix_tokens: int
    suffix_tokens: int

    def image_range(self, seq_len: int) -> Tuple[int, int]: ...

    def mask(self, seq_len: int, device=None) -> torch.Tensor: ...

    def row_mask(self, query_index: torch.Tensor, seq_len: int, key_index: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def kept_pairs(self, seq_len: int) -> int: ...

    def kept_fraction(self, seq_len: int) -> float: ...

    def is_full(self, seq_len: int) -> bool: ...

    def key_ranges(self, query_start: int, query_end: int, seq_len: int) -> KeyRanges: ...


def _check_text_tokens(prefix_tokens: int, suffix_tokens: int) -> None:
    if prefix_tokens < 0 or suffix_tokens < 0:
        raise ValueError(
            f"prefix_tokens and suffix_tokens count text tokens and must be >= 0, "
            f"got {prefix_tokens} and {suffix_tokens}"
        )


def _band_count(n: int, left: int, right: int) -> int:
    """sum over i in [0, n) of |{j in [0, n): i - left <= j <= i + right}| (left/right >= 0)."""
    if n <= 0:
        return 0
    index = torch.arange(n, dtype=torch.int64)
    low = torch.clamp(index - left, min=0)
    high = torch.clamp(index + right, max=n - 1)
    return int((high - low + 1).clamp(min=0).sum())


class _WindowBase:
    """Shared logic: text segments, full masks, fractions."""

    prefix_tokens: int
    suffix_tokens: int

    def image_tokens(self, seq_len: int) -> int:
        count = seq_len - self.prefix_tokens - self.suffix_tokens
        if count < 0:
            raise ValueError(
                f"sequence of {seq_len} tokens is shorter than its {self.prefix_tokens} prefix + "
                f"{self.suffix_tokens} suffix text tokens"
            )
        return count

    def image_range(self, seq_len: int) -> Tuple[int, int]:
        self.image_tokens(seq_len)
        return self.prefix_tokens, seq_len - self.suffix_tokens

    def mask(self, seq_len: int, device=None) -> torch.Tensor:
        """Boolean [L, L] mask, True where the pair (query, key) is computed."""
        return self.row_mask(torch.arange(seq_len, device=device), seq_len)

    def kept_fraction(self, seq_len: int) -> float:
        """Fraction of the L x L (query, key) pairs that the window computes."""
        if seq_len == 0:
            return 1.0
        return self.kept_pairs(seq_len) / float(seq_len * seq_len)

    def is_full(self, seq_len: int) -> bool:
        return self.kept_pairs(seq_len) == seq_len * seq_len

    def _text_kept_pairs(self, seq_len: int) -> int:
        """Pairs that involve a text token (text rows plus text columns of image rows)."""
        text = self.prefix_tokens + self.suffix_tokens
        image = self.image_tokens(seq_len)
        return text * seq_len + image * text

    def _apply_text(self, image_mask: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, seq_len: int) -> torch.Tensor:
        if not (self.prefix_tokens or self.suffix_tokens):
            return image_mask
        start, end = self.image_range(seq_len)
        query_text = (query_index < start) | (query_index >= end)
        key_text = (key_index < start) | (key_index >= end)
        return image_mask | query_text[:, None] | key_text[None, :]

    def _with_text_ranges(self, image_ranges: KeyRanges, query_start: int, query_end: int, seq_len: int) -> KeyRanges:
        """Add the global text key ranges; a block containing text queries needs every key."""
        start, end = self.image_range(seq_len)
        if query_start < start or query_end > end:
            return [(0, seq_len)]
        ranges = []
        if start > 0:
            ranges.append((0, start))
        ranges.extend(image_ranges)
        if end < seq_len:
            ranges.append((end, seq_len))
        return _merge_ranges(ranges)


def _merge_ranges(ranges: KeyRanges) -> KeyRanges:
    merged: KeyRanges = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class Window1D(_WindowBase):
    """flash-attn style sliding window over the flattened (image) token order.

    Key j is visible to query i iff i - left <= j <= i + right after flash-attn's
    normalisation for a sequence of N image tokens: left >= N or right >= N mean
    unbounded on that side; a negative left with a non-negative right means an
    unbounded left side (how flash-attn reads the official scripts' old [-w, w]);
    a non-negative left with a negative right means an unbounded right side;
    (-1, -1) (both negative) is full attention.
    """

    left: int
    right: int
    prefix_tokens: int = 0
    suffix_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.left, int) or not isinstance(self.right, int):
            raise TypeError(f"window sizes must be integers, got left={self.left!r}, right={self.right!r}")
        _check_text_tokens(self.prefix_tokens, self.suffix_tokens)

    def resolved(self, image_tokens: int) -> Tuple[int, int]:
        """Per-side reach in tokens after flash-attn normalisation (each in [0, N])."""
        n = image_tokens
        left = -1 if self.left >= n else self.left
        right = -1 if self.right >= n else self.right
        if left < 0 and right < 0:
            return n, n
        if left < 0:
            return n, right
        if right < 0:
            return left, n
        return left, right

    def row_mask(self, query_index: torch.Tensor, seq_len: int, key_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows `query_index` of the mask, restricted to columns `key_index` (default: all keys)."""
        left, right = self.resolved(self.image_tokens(seq_len))
        if key_index is None:
            key_index = torch.arange(seq_len, device=query_index.device)
        # Query and key share the prefix offset, so differences of raw indices are image offsets.
        offset = key_index[None, :] - query_index[:, None]
        band = (offset >= -left) & (offset <= right)
        return self._apply_text(band, query_index, key_index, seq_len)

    def kept_pairs(self, seq_len: int) -> int:
        n = self.image_tokens(seq_len)
        left, right = self.resolved(n)
        return _band_count(n, left, right) + self._text_kept_pairs(seq_len)

    def key_ranges(self, query_start: int, query_end: int, seq_len: int) -> KeyRanges:
        start, end = self.image_range(seq_len)
        left, right = self.resolved(end - start)
        band = [(max(start, query_start - left), min(end, query_end - 1 + right + 1))]
        return self._with_text_ranges(band, query_start, query_end, seq_len)


@dataclass(frozen=True)
class GridWindow(_WindowBase):
    """Box window over image tokens laid out in raster order on a 2-D or 3-D grid.

    grid:   (H, W) or (T, H, W); the image segment must hold exactly prod(grid) tokens.
    radius: reach per axis, same length as grid; query (t, h, w) sees key (t', h', w')
            iff |t - t'| <= rt and |h - h'| <= rh and |w - w'| <= rw. A negative radius
            means unbounded on that axis.
    """

    grid: Tuple[int, ...]
    radius: Tuple[int, ...]
    prefix_tokens: int = 0
    suffix_tokens: int = 0

    def __post_init__(self) -> None:
        grid = tuple(int(n) for n in self.grid)
        radius = tuple(int(r) for r in self.radius)
        if len(grid) not in (2, 3):
            raise ValueError(f"grid must be (H, W) or (T, H, W), got {self.grid!r}")
        if len(radius) != len(grid):
            raise ValueError(f"radius {self.radius!r} needs one entry per grid axis {self.grid!r}")
        if any(n <= 0 for n in grid):
            raise ValueError(f"grid sizes must be positive, got {self.grid!r}")
        _check_text_tokens(self.prefix_tokens, self.suffix_tokens)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "radius", radius)

    @property
    def grid3(self) -> Tuple[int, int, int]:
        return self.grid if len(self.grid) == 3 else (1,) + self.grid

    @property
    def radius3(self) -> Tuple[int, int, int]:
        radius = self.radius if len(self.radius) == 3 else (0,) + self.radius
        return tuple(r if 0 <= r < n else n for r, n in zip(radius, self.grid3))

    def _check_length(self, seq_len: int) -> None:
        n = self.image_tokens(seq_len)
        if n != math.prod(self.grid):
            raise ValueError(
                f"GridWindow over grid {self.grid} needs {math.prod(self.grid)} image tokens, but the "
                f"sequence has {n} (= {seq_len} - {self.prefix_tokens} prefix - {self.suffix_tokens} "
                f"suffix text tokens); pass the token grid of this model call"
            )

    def _coords(self, image_index: torch.Tensor):
        _, h, w = self.grid3
        return image_index // (h * w), (image_index // w) % h, image_index % w

    def row_mask(self, query_index: torch.Tensor, seq_len: int, key_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows `query_index` of the mask, restricted to columns `key_index` (default: all keys)."""
        self._check_length(seq_len)
        start, end = self.image_range(seq_len)
        if key_index is None:
            key_index = torch.arange(seq_len, device=query_index.device)
        qc = self._coords((query_index - start).clamp(0, end - start - 1))
        kc = self._coords((key_index - start).clamp(0, end - start - 1))
        keep = torch.ones(len(query_index), len(key_index), dtype=torch.bool, device=query_index.device)
        for q_axis, k_axis, reach in zip(qc, kc, self.radius3):
            keep &= (q_axis[:, None] - k_axis[None, :]).abs() <= reach
        return self._apply_text(keep, query_index, key_index, seq_len)

    def kept_pairs(self, seq_len: int) -> int:
        self._check_length(seq_len)
        image_pairs = 1
        for n, reach in zip(self.grid3, self.radius3):
            image_pairs *= _band_count(n, reach, reach)
        return image_pairs + self._text_kept_pairs(seq_len)

    def key_ranges(self, query_start: int, query_end: int, seq_len: int) -> KeyRanges:
        self._check_length(seq_len)
        start, end = self.image_range(seq_len)
        if query_start < start or query_end > end:
            return [(0, seq_len)]
        t_size, h_size, w_size = self.grid3
        rt, rh, _ = self.radius3
        first, last = query_start - start, query_end - 1 - start
        t0, t1 = first // (h_size * w_size), last // (h_size * w_size)
        if t0 == t1:
            h0, h1 = (first // w_size) % h_size, (last // w_size) % h_size
        else:  # block spans frames: it holds every row of some frame
            h0, h1 = 0, h_size - 1
        h_low, h_high = max(0, h0 - rh), min(h_size - 1, h1 + rh)
        ranges = []
        for t in range(max(0, t0 - rt), min(t_size - 1, t1 + rt) + 1):
            base = start + t * h_size * w_size
            ranges.append((base + h_low * w_size, base + (h_high + 1) * w_size))
        return self._with_text_ranges(_merge_ranges(ranges), query_start, query_end, seq_len)


    def tile_shape(self, min_queries: int = 64) -> Tuple[int, int, int]:
        """Query tile (t, h, w) for the chunked kernel: about half the reach on each axis
        (a tile then touches ~1.25**d times the keys a single query needs), widened
        along w until it holds at least `min_queries` queries."""
        sizes = [min(n, max(1, r // 2)) for n, r in zip(self.grid3, self.radius3)]
        t_size, h_size, w_size = sizes
        if t_size * h_size * w_size < min_queries:
            w_size = min(self.grid3[2], -(-min_queries // (t_size * h_size)))
        return t_size, h_size, w_size

    def blocks(self, seq_len: int, min_queries: int = 64):
        """Yield (query_index, key_index) LongTensors covering every image query once:
        rectangular query tiles and the box of keys their rows can see (plus text keys)."""
        self._check_length(seq_len)
        start, end = self.image_range(seq_len)
        t_all, h_all, w_all = self.grid3
        text_keys = torch.cat([torch.arange(0, start), torch.arange(end, seq_len)])
        tile = self.tile_shape(min_queries)

        def axis_ranges(first, size, reach, length):
            query = torch.arange(first, min(first + size, length))
            key = torch.arange(max(0, first - reach), min(length, first + size + reach))
            return query, key

        def flat(t, h, w):
            return start + (t[:, None, None] * h_all * w_all + h[None, :, None] * w_all + w[None, None, :]).reshape(-1)

        for t0 in range(0, t_all, tile[0]):
            qt, kt = axis_ranges(t0, tile[0], self.radius3[0], t_all)
            for h0 in range(0, h_all, tile[1]):
                qh, kh = axis_ranges(h0, tile[1], self.radius3[1], h_all)
                for w0 in range(0, w_all, tile[2]):
                    qw, kw = axis_ranges(w0, tile[2], self.radius3[2], w_all)
                    keys = flat(kt, kh, kw)
                    if len(text_keys):
                        keys = torch.cat([text_keys, keys]).sort().values
                    yield flat(qt, qh, qw), keys


@dataclass(frozen=True)
class CallInfo:
    """What a window factory may look at when choosing the window of one attention call."""

    layer: object
    step: int
    seq_len: int
    token_grid: Optional[Tuple[int, ...]] = None
    prefix_tokens: int = 0
    suffix_tokens: int = 0

    @property
    def image_tokens(self) -> int:
        return self.seq_len - self.prefix_tokens - self.suffix_tokens


def window_1d_fraction(fraction: float = 1.0 / 8.0) -> Callable[[CallInfo], Window1D]:
    """Window factory: w = round(fraction * image tokens) per side (the paper's N/8), text global."""
    if fraction < 0.0:
        raise ValueError(f"window fraction must be >= 0, got {fraction}")

    def window_for(info: CallInfo) -> Window1D:
        w = int(round(fraction * info.image_tokens))
        return Window1D(w, w, prefix_tokens=info.prefix_tokens, suffix_tokens=info.suffix_tokens)

    return window_for


def grid_window_fraction(kept_fraction: float = 0.25) -> Callable[[CallInfo], _WindowBase]:
    """Window factory for grid models: a box covering about `kept_fraction` of the image
    tokens (the same share as the official 1-D N/8-per-side window when 0.25): on a
    d-axis grid each axis of length n gets radius round(kept_fraction**(1/d) * n / 2).
    Falls back to the 1-D window of the same share when the call carries no token grid."""
    if not (0.0 < kept_fraction <= 1.0):
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}")
    fallback = window_1d_fraction(kept_fraction / 2.0)

    def window_for(info: CallInfo):
        if not info.token_grid:
            return fallback(info)
        grid = tuple(int(n) for n in info.token_grid)
        share = kept_fraction ** (1.0 / len(grid))
        radius = tuple(int(round(share * n / 2.0)) for n in grid)
        return GridWindow(grid, radius, info.prefix_tokens, info.suffix_tokens)

    return window_for


def window_rule(shape: str, fraction: float) -> Callable[[CallInfo], _WindowBase]:
    """The window factory a plan's ``extra.window_shape`` / ``window_fraction`` name: "1d" the
    paper's band of `fraction` of the image tokens per side, "grid" a box covering about
    2 x `fraction` of them (the same share of the sequence)."""
    if shape == "grid":
        return grid_window_fraction(min(1.0, 2.0 * fraction))
    if shape != "1d":
        raise ValueError(f"window shape {shape!r} is not one of '1d', 'grid'")
    return window_1d_fraction(fraction)
