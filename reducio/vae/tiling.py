"""Spatial tiling of encode/decode for frames larger than the training size (spec section 7).

Reproduces the official scheme exactly: overlapping windows started every ``tile`` pixels
(``tile_latent`` latent positions), linear blend ramps that start at weight 0 for the current
tile, blending in row-major order where the tile above / to the left is used *after* its own
blending, crop to the stride after blending. Content features are blended but not cropped.
Decoding blends one row at a time instead of decoding every tile first; the result is identical
(a tile's blend only reads already-final neighbours) and only two rows of tiles stay in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .hooks import StepHooks


@dataclass(frozen=True)
class TileLayout:
    """Tile geometry. ``tile`` = stride in pixels (official ``tile_sample_min_size``)."""

    tile: int = 256
    overlap: float = 0.25
    spatial_factor: int = 32  # 2 ** f_s

    def __post_init__(self):
        if self.tile <= 0 or self.tile % self.spatial_factor:
            raise ValueError(f"tile size {self.tile} must be a positive multiple of {self.spatial_factor} "
                             f"(the spatial down-sampling factor)")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap {self.overlap} must be in [0, 1)")
        if self.pixel_window % self.spatial_factor:
            good = 4 * self.spatial_factor
            raise ValueError(
                f"tile size {self.tile} with overlap {self.overlap} gives a {self.pixel_window}-px window, "
                f"not a multiple of {self.spatial_factor}, so pixel and latent tiles would not line up; "
                f"use a tile size that is a multiple of {good} with overlap 0.25")

    @property
    def pixel_window(self) -> int:
        return int(self.tile * (1 + self.overlap))

    @property
    def latent_tile(self) -> int:
        return int(self.tile / self.spatial_factor)

    @property
    def latent_window(self) -> int:
        return int(self.latent_tile * (1 + self.overlap))

    @property
    def latent_blend(self) -> int:
        return int(self.latent_tile * self.overlap)

    @property
    def pixel_blend(self) -> int:
        return int(self.tile * self.overlap)

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of tiles for a pixel frame of height x width."""
        return len(range(0, height, self.tile)), len(range(0, width, self.tile))

    def needs_tiling(self, height: int, width: int) -> bool:
        """True when a frame does not fit in one window (H or W larger than the window)."""
        return height > self.pixel_window or width > self.pixel_window


def _blend_(previous: torch.Tensor, current: torch.Tensor, extent: int, axis: int) -> None:
    """In place: current[:extent] = previous[-extent:] * (1 - y/extent) + current[:extent] * y/extent."""
    extent = min(previous.shape[axis], current.shape[axis], extent)
    if extent <= 0:
        return
    ramp = torch.tensor([y / extent for y in range(extent)], dtype=current.dtype, device=current.device)
    shape = [1] * current.ndim
    shape[axis] = extent
    ramp = ramp.view(shape)
    head = current.narrow(axis, 0, extent)
    tail = previous.narrow(axis, previous.shape[axis] - extent, extent)
    head.copy_(tail * (1 - ramp) + head * ramp)


def _feature_extent(neighbour: torch.Tensor, axis: int, overlap: float) -> int:
    """Per-level blend width of content features, from the neighbour tile's size (official rule)."""
    return int(neighbour.shape[axis] / (1 + overlap) * overlap)


def _blend_features_(previous: Sequence, current: Sequence, overlap: float, axis: int) -> None:
    for prev, cur in zip(previous, current):
        if prev is None or cur is None:
            continue
        _blend_(prev, cur, _feature_extent(prev, axis, overlap), axis)


ContentGrid = list  # list of rows, each a list of per-tile content-feature lists


def tiled_content_features(encode_fn: Callable[[torch.Tensor], list], image: torch.Tensor,
                           layout: TileLayout, keep_levels: Optional[Sequence[int]] = None) -> ContentGrid:
    """Content features of overlapping image tiles, blended in place, not cropped.

    ``keep_levels``: feature indices to keep (others are replaced by None to save memory);
    None keeps all.
    """
    height, width = image.shape[-2:]
    window = layout.pixel_window
    rows: ContentGrid = []
    for top in range(0, height, layout.tile):
        row = []
        for left in range(0, width, layout.tile):
            feats = encode_fn(image[:, :, top : top + window, left : left + window])
            if keep_levels is not None:
                n = len(feats)
                keep = {k % n for k in keep_levels}
                feats = [f if i in keep else None for i, f in enumerate(feats)]
            row.append(feats)
        rows.append(row)
    for r, row in enumerate(rows):
        for c, feats in enumerate(row):
            if r > 0:
                _blend_features_(rows[r - 1][c], feats, layout.overlap, axis=2)
            if c > 0:
                _blend_features_(row[c - 1], feats, layout.overlap, axis=3)
    return rows


def _stitch_rows(tile_fn: Callable[[int, int], torch.Tensor], n_rows: int, n_cols: int,
                 blend: int, keep: int, hooks: Optional[StepHooks]) -> torch.Tensor:
    """Compute tiles row by row, blend them with the row above and the tile to the left, crop to
    ``keep`` positions and concatenate. Tensors are [B, C, T, H, W]."""
    previous_row: list[torch.Tensor] = []
    stitched_rows = []
    for r in range(n_rows):
        row: list[torch.Tensor] = []
        for c in range(n_cols):
            if hooks is not None:
                hooks.check()
            tile = tile_fn(r, c)
            if r > 0:
                _blend_(previous_row[c], tile, blend, axis=3)
            if c > 0:
                _blend_(row[c - 1], tile, blend, axis=4)
            row.append(tile)
            if hooks is not None:
                hooks.advance()
        stitched_rows.append(torch.cat([t[:, :, :, :keep, :keep] for t in row], dim=4))
        previous_row = row
    return torch.cat(stitched_rows, dim=3)


def tiled_moments(encode_fn: Callable[[torch.Tensor], torch.Tensor], video: torch.Tensor,
                  layout: TileLayout, hooks: Optional[StepHooks] = None) -> torch.Tensor:
    """Posterior moments of a large video from overlapping pixel tiles (all frames per tile)."""
    height, width = video.shape[-2:]
    n_rows, n_cols = layout.grid_shape(height, width)
    window = layout.pixel_window

    def tile_fn(r: int, c: int) -> torch.Tensor:
        top, left = r * layout.tile, c * layout.tile
        return encode_fn(video[:, :, :, top : top + window, left : left + window])

    return _stitch_rows(tile_fn, n_rows, n_cols, layout.latent_blend, layout.latent_tile, hooks)


def tiled_decode(decode_fn: Callable[[torch.Tensor, list], torch.Tensor], latent: torch.Tensor,
                 content_grid: ContentGrid, layout: TileLayout,
                 hooks: Optional[StepHooks] = None) -> torch.Tensor:
    """Decode overlapping latent tiles, each with the content features of the matching pixel tile."""
    height, width = latent.shape[-2:]
    step, window = layout.latent_tile, layout.latent_window
    n_rows, n_cols = len(range(0, height, step)), len(range(0, width, step))
    if n_rows != len(content_grid) or any(n_cols != len(row) for row in content_grid):
        raise ValueError(
            f"content tile grid {len(content_grid)}x{len(content_grid[0]) if content_grid else 0} does not "
            f"match the latent tile grid {n_rows}x{n_cols}: the content image must be "
            f"{layout.spatial_factor}x the latent size and tiled with the same tile size")

    def tile_fn(r: int, c: int) -> torch.Tensor:
        top, left = r * step, c * step
        return decode_fn(latent[:, :, :, top : top + window, left : left + window], content_grid[r][c])

    return _stitch_rows(tile_fn, n_rows, n_cols, layout.pixel_blend, layout.tile, hooks)
