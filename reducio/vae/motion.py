"""Measured motion channels (ours, not in any official model): ``ddconfig["latent_motion"] = "measured"``.

The latent's first two channels hold the clip's global motion, measured by phase correlation of each
frame against the content frame, instead of whatever the encoder learns to put there; the decoder
reads its coarsest flow (``LatentFlow``) from those channels before ``post_quant_conv``, and its warp
levels refine it. The other channels stay learned (sprites, zoom, roll, detail).

Why: trained on reconstruction, the tiny model never learned to put motion into its latent -- six runs
of 150-1000 steps, with a learned or fixed read-out, with a motion hint of weight 0.05 or 1.0, ended
with flows under 0.25 pixel, unrelated to the clip, and every reconstruction still (docs/
embedded_models.md). The decoder uses a flow when it gets one (a fitted global flow took a held-out
pan's L1 error from 0.132 to 0.048), so giving the latent the measurement breaks the standstill, and
the DiT still has to learn to generate these channels from the caption.

Units: one unit is 1/16 of the frame's width (dx) or height (dy), so the same number means the same
motion at every resolution; motions beyond ``MAX_UNITS`` (15 % of the frame) are clipped.

Normalisation: every latent the decoder sees is layer-normalised over (C, T, h, w), by the encoder and
again by the DiT pipeline after sampling. :func:`embed_motion` therefore rescales the learned channels
so that the whole latent already has zero mean and unit variance with the motion channels as
measured; the normalisation then leaves them (almost) unchanged.

Object motion (``latent_motion: "measured+objects"``, ours): channels 2-3 hold, per latent cell and
latent frame, the shift of *what moves against the camera* there (a sprite, a person), measured by
:func:`object_shifts`; zero where everything in the cell moves with the camera. Why: with the camera
alone in the latent the decoder leaves every sprite where the content frame has it; measured on 32
held-out clips at 64 px, the content frame moved by the exact camera motion reaches 21.6 dB, with the
sprites pasted at their true places 24.6 dB, and with the hole a sprite leaves filled from its
surroundings 35.4 dB (``bench/eval_reducio_vae.py``'s ceilings): most of the error left is the sprites.
A sprite is smaller than a latent cell (32 px), so the cell's own dominant motion is the camera's; the
object shift is a second motion per cell, and the decoder learns which pixels follow it.

Interpolation (``ddconfig.motion_interpolation``, ours): a latent frame covers four frames and a latent
cell 32 x 32 pixels, and the channels hold each one's mean motion. 'held' (the default, and every model
before session 11) holds a latent frame's motion over its frames; 'linear' makes the decoder
interpolate the flows linearly between the latent frames' centres, extrapolated beyond the first and
last (``blocks.linear_flow``), which gives a steady motion back exactly in every frame -- and the
camera's between the cells' centres, out to the frame's edges. The latent is the same either way.
Measured on 64 held-out clips at 64 px, the position the decoder reads for a sprite (camera plus object
flow in its cell, every frame against the truth; 1020 checks) is off by a median 0.70 pixel 'linear',
1.48 'held' (more than 2 pixels: 23 % against 35 %), for a sprite of radius 5-8 pixels. (A steady
velocity fitted per cell instead of the means did worse: median 1.19, 37 % beyond 2 pixels.)

Camera per cell (``latent_motion: "measured-similarity+objects"``, ours): channels 0-1 hold the camera's
motion per latent cell instead of one value for the frame, so a zoom or a roll -- a shift that grows
with the distance from the centre -- is in the latent too. The camera is a similarity transform (pan,
zoom, roll) fitted robustly to the shifts of tiles, 16 pixels at 64 px (:func:`camera_similarity`),
evaluated at each cell's centre; with 'linear' interpolation the decoder gets the transform's field back exactly.
Measured on the first 96 held-out clips at 64 px against the exact motion (cell x latent-frame checks):
clips with sprites 4.5 % more than a pixel off (one shift per frame: 38 %; each cell's own shift: 23 %).
The content frame moved by the measured camera, on the sprite-free zoom clips: 27.9 dB with one shift
per frame, 35.8 dB with the similarity fit and 'linear' interpolation (exact motion: 36.2); rolls 38.7
and 47.7 dB (48.6).

Fine objects (``latent_motion: "measured-similarity+fine-objects"``, ours): channels 2-9 hold the object
motion on a grid twice as fine as the latent's each way (16-pixel cells at 64 px; a latent cell's four
quarters in row-major order, each (dx, dy) in the units above), one steady velocity per quarter over the
whole clip (:func:`steady_object_velocities`), stored as every latent frame's mean shift; the decoder reads
it as one object flow on that grid (:func:`read_object_flow`), with the same layers as one shift per
latent cell. Why: one shift per 32-pixel cell cannot hold two sprites that share the cell; with it, clips
with two sprites were at 24.9 dB against 30.4 with one and held 56 % of the error (32 held-out clips at
64 px). Measured on those clips, the content frame moved by the better of the camera and the object
motion, one / two sprites: one per-frame shift per 32-pixel cell (the mean of the frames' shifts) 32.6 /
27.8 dB, one steady velocity per 32-pixel cell 33.2 / 27.8, per 16-pixel cell 33.3 / 29.9. (Per-frame
shifts per 16-pixel cell did worse -- on the sprite pixels of 64 held-out clips 0.12 / 0.14 against
0.037 / 0.105 --: a sprite crosses such a cell within a latent frame and the mean mixes its shift with
zeros. Two steady motions per 32-pixel cell reach 34.3 / 31.3 as the better of three pictures, but a
decoder cannot tell which sprite follows which, and trained it did not: docs/embedded_models.md, session
13.) The learned channels
left, 10-15, carried almost nothing in the tiny model: with channels 4-15 of its latents set to zero it
decoded at 28.90 dB against 28.91. The motion channels' share of the latent's variance: a steady motion
reaches its largest unit only in the farthest latent frame (each channel's mean square at most 0.94),
so a steady camera and every quarter's object at their largest hold (2 * 2.76 + 8 * 0.94) / 16 = 0.82
of it; on 300 training clips at most 20 % (median 5 %). A camera at its clamp in every latent frame
with every quarter at its largest would hold 1.19, and the latent's normalisation would then shrink
all the motion the decoder reads by up to 8 %.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..metrics import phase_shifts
from .blocks import linear_flow, warp_frames

MOTION_CHANNELS = 2
UNITS_PER_FRAME = 16     # one unit = 1/16 of the frame side
MAX_UNITS = 2.4          # 15 % of the frame
# object motion (channels 2-3): one unit = 1/8 of the frame side, at most 17.5 % of the frame, so that
# all four motion channels at their largest still hold less than the latent's unit variance at 16
# channels: (2 * 2.4^2 + 2 * 1.4^2) / 16 = 0.97
OBJECT_CHANNELS = 2
OBJECT_UNITS_PER_FRAME = 8
MAX_OBJECT_UNITS = 1.4
# object_shifts works at this many pixels per latent cell (16: 2-pixel steps at 64 px, 32 px per cell)
OBJECT_CELL_PIXELS = 16
# a pixel has changed when its mean |colour difference| ([-1, 1] values) from the camera-moved content
# frame exceeds this (bilinear resampling and sensor noise stay below it)
OBJECT_CHANGE = 0.1
# a cell's object shift is kept only when it leaves at most this share of the cell's change unexplained,
# and only in cells whose change (the sum of the excess over OBJECT_CHANGE, in working pixels of a
# 16 x 16 cell) reaches OBJECT_MIN_CHANGE. Measured on 120 training clips (pans and still views): the
# resampling of textured photographs under a pan makes cells of at most 0.62 pass the share test
# without any object; a sprite's cells are at 9 (median), 3.4 (quartile)
OBJECT_ACCEPT = 0.6
OBJECT_MIN_CHANGE = 1.0
# measured-similarity+fine-objects (steady_object_velocities): working pixels per object cell, at most
# one per frame pixel (16 at 64 px, where an object cell is 16 pixels: 1-pixel steps), up to this many a
# side, and the velocity grid's step as a fraction of the frame per frame (0.1 pixel per frame at 64 px).
# Measured with two slots per 32-pixel cell on the sprite pixels of 64 held-out clips at 64 px (object
# picture's mean squared error, one / two sprites): 16 working pixels per cell 0.022 / 0.044, 32: 0.014 /
# 0.034; a step of 1/1280 no better than 1/640
STEADY_CELL_PIXELS = 32
STEADY_MAX_WORK = 128
STEADY_VELOCITY_STEP = 1 / 640
# a cell holds a steady object when its change summed over the clip reaches this much per frame (in
# OBJECT_MIN_CHANGE's units). Measured on the same clips (sprite pixels, 1 / 2 sprites): 1.0 0.017 /
# 0.036, 0.5 0.015 / 0.036, 0.27 0.014 / 0.035; on 200 training clips the sprite-free ones got an
# object motion in 13 of 160 cells at each of the three
STEADY_MIN_CHANGE = 0.5
# measured-similarity+fine-objects (measure_fine_objects): object cells per latent cell each way (the
# module docstring has the measurements)
FINE_OBJECT_SPLIT = 2
# measured-similarity+objects: the camera's similarity transform is fitted to the shifts of tiles at
# least this large, reweighted this many times with this residual scale in pixels (measured on the
# first 96 held-out clips at 64 px, 1536 cell x latent-frame checks against the exact motion: with
# sprites 4.5 % of the cells more than a pixel off and 0.3 % beyond 3; 32-pixel tiles 21 % and 9 %)
CAMERA_TILE_PIXELS = 16
CAMERA_FIT_ROUNDS = 6
CAMERA_FIT_SCALE = 1.0
# a tile whose content varies less than this share of the median tile's counts that much less
CAMERA_FLAT_FRACTION = 0.25
# zoom_roll_direction: a third of the slowest zoom (0.6 % per frame) and roll (0.4 degree per frame) of
# the synthetic clips (reducio.data.synthetic.ZOOM_RATE, ROLL_RATE)
ZOOM_SEEN = 0.002
ROLL_SEEN = 0.0025


def frame_shifts(video: torch.Tensor, content_index: int) -> torch.Tensor:
    """Per frame, the global shift that moves that frame onto the content frame: ``[B, 2, T]`` (dx, dy) in
    pixels -- a backward-warp flow: frame t at (x, y) is near the content frame at (x + dx, y + dy).
    Zero for the content frame itself."""
    batch, _, frames, height, width = video.shape
    moving = video.transpose(1, 2).reshape(batch * frames, -1, height, width)
    content = video[:, :, content_index][:, None].expand(-1, frames, -1, -1, -1).reshape(batch * frames, -1,
                                                                                         height, width)
    shifts = phase_shifts(moving, content).reshape(batch, frames, 2).flip(-1).transpose(1, 2)   # (dx, dy)
    shifts[:, :, content_index] = 0.0
    return shifts


def camera_similarity(video: torch.Tensor, content_index: int, tile: int | None = None) -> torch.Tensor:
    """Per frame, the camera's motion as a similarity transform fitted to the shifts of square tiles against
    the content frame: ``[B, T, 4]`` = (tx, ty, zoom, roll), the backward flow at (x, y) pixels from the
    frame's centre being (tx + zoom * x - roll * y, ty + zoom * y + roll * x). Zero for the content frame.

    Tiles are a quarter of the frame's short side, at least ``CAMERA_TILE_PIXELS`` (``tile`` overrides):
    a tile's shift (:func:`frame_shifts` of the tile) wraps at half its size, so the reach is 12.5 % of
    the short side at every size (the 16-pixel tiles the tiny model was trained with at 64 px would lose
    every shift above 8 pixels at 256 px). (Correlating against the content frame moved by the global
    shift first was tried: with sprites it put 18 % of cells more than a pixel off, against 5 %.) The
    fit is least squares, each tile weighted by its texture (its content's standard deviation against
    ``CAMERA_FLAT_FRACTION`` of the median tile's, at most 1: a flat tile reports a confident but
    meaningless zero) and reweighted ``CAMERA_FIT_ROUNDS`` times by 1 / (1 + (residual / scale)^2),
    scale ``CAMERA_FIT_SCALE`` pixels per 16 pixels of tile, so the tiles a sprite moves count little."""
    batch, channels, frames, height, width = video.shape
    tile = tile or max(CAMERA_TILE_PIXELS, min(height, width) // 4)
    rows, cols = max(1, height // tile), max(1, width // tile)
    tile_h, tile_w = min(tile, height), min(tile, width)
    cut = video[..., :rows * tile_h, :cols * tile_w].reshape(batch, channels, frames, rows, tile_h, cols, tile_w)
    tiles = cut.permute(0, 3, 5, 1, 2, 4, 6).reshape(batch * rows * cols, channels, frames, tile_h, tile_w)
    shifts = frame_shifts(tiles, content_index).reshape(batch, rows * cols, 2, frames).permute(0, 3, 2, 1)
    shifts = shifts.reshape(batch, frames, 2 * rows * cols)                 # [B, T, (dx of every tile, dy ...)]
    texture = tiles[:, :, content_index].float().flatten(1).std(1).reshape(batch, rows * cols)
    flat = CAMERA_FLAT_FRACTION * texture.median(1, keepdim=True).values
    texture = (texture / flat.clamp_min(1e-6)).clamp(max=1).repeat(1, 2)                         # [B, 2N]
    ys, xs = torch.meshgrid((torch.arange(rows, dtype=torch.float32) + 0.5) * tile_h - height / 2,
                            (torch.arange(cols, dtype=torch.float32) + 0.5) * tile_w - width / 2, indexing="ij")
    design = similarity_design(xs.to(video.device), ys.to(video.device))                         # [2N, 4]
    weights = texture[:, None].expand(-1, frames, -1)
    ridge = 1e-6 * torch.eye(4, device=video.device)
    scale = CAMERA_FIT_SCALE * tile / CAMERA_TILE_PIXELS
    for _ in range(CAMERA_FIT_ROUNDS):
        weighted = design * weights[..., None]                                                    # [B, T, 2N, 4]
        params = torch.linalg.solve(weighted.transpose(-1, -2) @ design + ridge,
                                    (weighted.transpose(-1, -2) @ shifts[..., None]))[..., 0]    # [B, T, 4]
        residual = (shifts - params @ design.T).reshape(batch, frames, 2, -1).norm(dim=2)
        weights = (1 / (1 + (residual / scale) ** 2)).repeat(1, 1, 2) * texture[:, None]
    params[:, content_index] = 0.0
    return params


def camera_rates(video: torch.Tensor, content_index: int) -> torch.Tensor:
    """The steady camera motion that best explains :func:`camera_similarity`: ``[B, 4]`` per frame (pan dx,
    pan dy in pixels, zoom, roll in radians), each a least-squares slope through zero at the content
    frame. A zoom in (the content grows) has zoom < 0: frame t samples the content frame nearer its
    centre; a clockwise roll has roll < 0 (a backward flow turning anticlockwise, y pointing down)."""
    params = camera_similarity(video, content_index)                                   # [B, T, 4]
    offsets = torch.arange(params.shape[1], dtype=params.dtype, device=params.device) - content_index
    return (params * offsets[None, :, None]).sum(1) / offsets.pow(2).sum()


def zoom_roll_direction(video: torch.Tensor, content_index: int = 7) -> str:
    """What the camera of one clip ``[3, T, H, W]`` does besides panning, in the synthetic captions' words:
    'in' / 'out' (zoom), 'clockwise' / 'counterclockwise' (roll) or 'still', from :func:`camera_rates`.
    A rate counts from a third of the slowest the synthetic clips use (``ZOOM_SEEN``, ``ROLL_SEEN``); when
    both do, the larger against its threshold wins."""
    _, _, zoom, roll = camera_rates(video[None].float(), content_index)[0].tolist()
    zoom_seen, roll_seen = abs(zoom) / ZOOM_SEEN, abs(roll) / ROLL_SEEN
    if max(zoom_seen, roll_seen) < 1:
        return "still"
    if zoom_seen >= roll_seen:
        return "in" if zoom < 0 else "out"
    return "clockwise" if roll < 0 else "counterclockwise"


def camera_cells(video: torch.Tensor, content_index: int, cells: tuple[int, int],
                 params: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`camera_similarity` at each latent cell's centre (its mean over the cell: the field is linear):
    ``[B, 2, T, h, w]`` (dx, dy) in pixels, the camera channels of ``measured-similarity+objects``.
    ``params``: :func:`camera_similarity` when the caller has it already."""
    height, width = video.shape[3:]
    rows, cols = cells
    if params is None:
        params = camera_similarity(video, content_index)
    params = params[..., None, None]                                                   # [B, T, 4, 1, 1]
    ys = ((torch.arange(rows, dtype=torch.float32, device=video.device) + 0.5) * height / rows - height / 2)
    xs = ((torch.arange(cols, dtype=torch.float32, device=video.device) + 0.5) * width / cols - width / 2)
    return similarity_flow(params.unbind(2), xs.reshape(1, cols), ys.reshape(rows, 1))


def similarity_flow(params, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The similarity transform (tx, ty, zoom, roll) -- ``params``, four tensors or numbers -- as a flow at
    the points (``xs``, ``ys``), pixels from the frame's centre: (dx, dy) stacked on dim 1,
    dx = tx + zoom * x - roll * y, dy = ty + zoom * y + roll * x (:func:`camera_similarity`)."""
    tx, ty, zoom, roll = params
    return torch.stack([tx + zoom * xs - roll * ys, ty + zoom * ys + roll * xs], 1)


def similarity_design(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """:func:`similarity_flow` at the points ``xs``, ``ys`` (any shape, read row-major) as a linear map of (tx, ty, zoom, roll):
    ``[2N, 4]``, the N dx rows first, then the N dy rows -- each column the flow of one unit parameter."""
    units = torch.eye(4, dtype=torch.float32, device=xs.device)[:, :, None]          # [4 params, 4, 1]
    return torch.stack([similarity_flow(unit, xs[None].float(), ys[None].float()).flatten() for unit in units], 1)


def measure_latent_motion(video: torch.Tensor, content_index: int, latent_frames: int,
                          camera: torch.Tensor | None = None) -> torch.Tensor:
    """The motion channels' values for one clip ``[B, 3, T, H, W]``: ``[B, 2, latent_frames]`` in units, the
    mean of :func:`frame_shifts` over the frames each latent frame covers (``camera``: those shifts when
    the caller has them already; per cell, ``[B, 2, T, h, w]`` from :func:`camera_cells`, gives
    ``[B, 2, latent_frames, h, w]``)."""
    batch, _, frames, height, width = video.shape
    shifts = (frame_shifts(video, content_index) if camera is None else camera).float()
    grouped = shifts.reshape(batch, 2, latent_frames, frames // latent_frames, *shifts.shape[3:]).mean(3)
    size = torch.tensor([width, height], dtype=grouped.dtype, device=grouped.device)
    size = size.reshape(1, 2, *[1] * (grouped.ndim - 2))
    return (grouped * UNITS_PER_FRAME / size).clamp(-MAX_UNITS, MAX_UNITS)


def _camera_prediction(video: torch.Tensor, camera: torch.Tensor, content_index: int, cells: tuple[int, int],
                       work: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The object searches' common start, at ``work`` (h, w) pixels: the clip ``[B, T, 3, h, w]``, the
    content frame moved by ``camera`` (as in :func:`object_shifts`) and each pixel's change ``[B, T, h, w]``
    -- its mean |difference| from that prediction beyond ``OBJECT_CHANGE``, zero where the camera brings in
    what the content frame never showed."""
    batch, _, frames, height, width = video.shape
    rows, cols = cells
    work_h, work_w = work
    clip = video.float().transpose(1, 2).reshape(batch * frames, -1, height, width)
    if (work_h, work_w) != (height, width):
        clip = F.interpolate(clip, size=(work_h, work_w), mode="area")
    clip = clip.reshape(batch, frames, -1, work_h, work_w)
    scale = torch.tensor([work_w / width, work_h / height], device=video.device).reshape(1, 2, 1, 1, 1)
    if camera.ndim == 5:      # pixels -> latent pixels, which linear_flow scales to the working pixels
        to_cells = torch.tensor([cols / width, rows / height], device=video.device).reshape(1, 2, 1, 1, 1)
        flow = linear_flow(camera.float() * to_cells, (frames, work_h, work_w))
    else:
        flow = (camera.float()[:, :, :, None, None] * scale).expand(-1, -1, -1, work_h, work_w)
    predicted = warp_frames(clip[:, content_index], flow).transpose(1, 2)              # [B, T, 3, h, w]
    weight = ((clip - predicted).abs().mean(2) - OBJECT_CHANGE).clamp_min(0)            # [B, T, h, w]
    # what the camera brings in at the frame's edges was never in the content frame: not an object
    xs = torch.arange(work_w, device=video.device).reshape(1, 1, 1, work_w) + 0.5 + flow[:, 0]
    ys = torch.arange(work_h, device=video.device).reshape(1, 1, work_h, 1) + 0.5 + flow[:, 1]
    weight = weight * ((xs >= 0) & (xs <= work_w) & (ys >= 0) & (ys <= work_h))
    return clip, predicted, weight


def _padded_prediction(predicted: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The camera's prediction ``[B, T, 3, h, w]`` padded (edge values repeated) by the object searches'
    reach, ``MAX_OBJECT_UNITS`` in working pixels: (``[B * T, 3, h + 2 * reach_y, w + 2 * reach_x]``,
    reach_y, reach_x)."""
    work_h, work_w = predicted.shape[-2:]
    reach_y = int(MAX_OBJECT_UNITS / OBJECT_UNITS_PER_FRAME * work_h)
    reach_x = int(MAX_OBJECT_UNITS / OBJECT_UNITS_PER_FRAME * work_w)
    padded = F.pad(predicted.reshape(-1, *predicted.shape[2:]), (reach_x, reach_x, reach_y, reach_y), mode="replicate")
    return padded, reach_y, reach_x


def object_shifts(video: torch.Tensor, camera: torch.Tensor, content_index: int,
                  cells: tuple[int, int]) -> torch.Tensor:
    """Per frame and latent cell, the shift of what moves against the camera: ``[B, 2, T, h, w]`` (dx, dy)
    as fractions of the frame's width / height, a backward flow on top of the camera's: frame t at (x, y)
    in that cell is near the content frame at (x, y) + camera + shift. Zero where nothing does.

    ``camera`` [B, 2, T] is :func:`frame_shifts` (pixels), or per cell [B, 2, T, h, w] :func:`camera_cells`
    (spread linearly between the cells' centres, as the decoder does). Method: at ``OBJECT_CELL_PIXELS`` per cell,
    the content frame moved by the camera predicts each frame; the pixels it gets wrong by more than
    ``OBJECT_CHANGE`` are the changed ones (an object where it is now, and the hole where it was), except
    where the camera brings in what the content frame never showed. Every
    integer shift up to ``MAX_OBJECT_UNITS`` is tried on top of the camera's, and per cell the one that
    best explains the changed pixels (their change-weighted |difference|) wins if it leaves at most
    ``OBJECT_ACCEPT`` of the cell's change unexplained and the cell changed enough to hold an object
    (``OBJECT_MIN_CHANGE``). Wrong guesses cost little: the decoder learns
    which pixels follow the shift (the object's colours), and a shift that explains nothing is refused.
    """
    batch, _, frames, height, width = video.shape
    rows, cols = cells
    work_h, work_w = min(height, rows * OBJECT_CELL_PIXELS), min(width, cols * OBJECT_CELL_PIXELS)
    clip, predicted, weight = _camera_prediction(video, camera, content_index, cells, (work_h, work_w))

    def cell_cost(candidate: torch.Tensor) -> torch.Tensor:
        error = (clip - candidate).abs().mean(2) * weight
        return F.adaptive_avg_pool2d(error.reshape(batch * frames, 1, work_h, work_w), (rows, cols))

    unexplained = cell_cost(predicted)
    change = F.adaptive_avg_pool2d(weight.reshape(batch * frames, 1, work_h, work_w), (rows, cols))
    change = change * (work_h / rows) * (work_w / cols)                                 # sum per cell
    best, best_shift = unexplained.clone(), torch.zeros(batch * frames, 2, rows, cols, device=video.device)
    padded, reach_y, reach_x = _padded_prediction(predicted)
    padded = padded.reshape(batch, frames, -1, work_h + 2 * reach_y, work_w + 2 * reach_x)
    for dy in range(-reach_y, reach_y + 1):
        for dx in range(-reach_x, reach_x + 1):
            if dx == 0 and dy == 0:
                continue
            # predicted at (x + dx, y + dy): the content frame at (x, y) + camera + (dx, dy)
            cost = cell_cost(padded[..., reach_y + dy:reach_y + dy + work_h, reach_x + dx:reach_x + dx + work_w])
            better = cost < best
            best = torch.where(better, cost, best)
            shift = torch.tensor([dx / work_w, dy / work_h], device=video.device).reshape(1, 2, 1, 1)
            best_shift = torch.where(better, shift, best_shift)
    kept = (best <= OBJECT_ACCEPT * unexplained) & (change >= OBJECT_MIN_CHANGE * work_h * work_w
                                                       / (rows * cols * OBJECT_CELL_PIXELS ** 2))
    shifts = torch.where(kept, best_shift, torch.zeros_like(best_shift))
    shifts = shifts.reshape(batch, frames, 2, rows, cols).transpose(1, 2).clone()
    shifts[:, :, content_index] = 0.0
    return shifts


def measure_object_motion(video: torch.Tensor, content_index: int, latent_frames: int, cells: tuple[int, int],
                          camera: torch.Tensor | None = None) -> torch.Tensor:
    """The object channels' values ``[B, 2, latent_frames, h, w]`` in units (1/8 of the frame): the mean
    of :func:`object_shifts` over the frames each latent frame covers. ``camera``: :func:`frame_shifts`
    when the caller has it already."""
    batch, _, frames = video.shape[:3]
    if camera is None:
        camera = frame_shifts(video, content_index)
    shifts = object_shifts(video, camera, content_index, cells)
    grouped = shifts.reshape(batch, 2, latent_frames, frames // latent_frames, *cells).mean(3)
    return (grouped * OBJECT_UNITS_PER_FRAME).clamp(-MAX_OBJECT_UNITS, MAX_OBJECT_UNITS)


def steady_object_velocities(video: torch.Tensor, camera: torch.Tensor, content_index: int,
                              cells: tuple[int, int], latent_frames: int | None = None) -> torch.Tensor:
    """Per object cell, the steady motion of what moves against the camera during the clip: ``[B, 2, h, w]``
    velocities (dx, dy per frame) as fractions of the frame's width / height, a backward flow on top of
    ``camera`` (:func:`camera_cells` on the same ``cells``, pixels): frame t at (x, y) in that cell is near
    the content frame at (x, y) + camera + velocity * (t - content_index). Zero where none is found.

    Method: the per-frame search of :func:`object_shifts` (every integer shift, at
    ``STEADY_CELL_PIXELS`` per cell, at most ``STEADY_MAX_WORK`` pixels a side) gives each frame's cost
    of each shift per cell; a velocity's cost is the sum over the frames of the cost of its shift in that
    frame (rounded to the working pixels), searched on a grid of ``STEADY_VELOCITY_STEP``. The best
    velocity is kept under :func:`object_shifts`' share test (``OBJECT_ACCEPT``) with the change summed
    over the clip, where the cell changed by at least ``STEADY_MIN_CHANGE`` per frame on average (in
    ``OBJECT_MIN_CHANGE``'s units). The grid reaches ``MAX_OBJECT_UNITS`` in the latent frame farthest
    from the content frame (``latent_frames``: T / 4 unless given). The shifts are tried one after the
    other over the changed pixels alone, so the live memory stays near the clip's size; the time grows
    with the changed pixels times the shifts (about 0.1 s per 64-px clip on one core of this workplace's
    CPU; a 128-px clip of pure noise, where every pixel changes, about a minute).
    Why steady: one search over the whole clip sums the evidence of every frame -- a cell a sprite
    crosses in a few frames still gets its motion, where the mean of per-frame shifts mixes it with zeros
    -- and the decoder, reading it linearly, gets the motion back exactly in every frame.
    """
    batch, _, frames, height, width = video.shape
    rows, cols = cells
    # at most STEADY_CELL_PIXELS per cell, STEADY_MAX_WORK a side, and never more than the frame has
    cell_h = max(1, min(STEADY_CELL_PIXELS, STEADY_MAX_WORK // rows, height // rows))
    cell_w = max(1, min(STEADY_CELL_PIXELS, STEADY_MAX_WORK // cols, width // cols))
    work_h, work_w = rows * cell_h, cols * cell_w
    clip, predicted, weight = _camera_prediction(video, camera, content_index, cells, (work_h, work_w))
    padded, reach_y, reach_x = _padded_prediction(predicted)                             # [B * T, 3, h', w']
    span_x = 2 * reach_x + 1
    offsets = torch.arange(frames, device=video.device, dtype=torch.float32) - content_index
    # the velocity grid reaches MAX_OBJECT_UNITS in the latent frame farthest from the content frame
    latent_frames = latent_frames or max(1, frames // 4)
    farthest = float(offsets.reshape(latent_frames, -1).mean(1).abs().max())
    if farthest == 0:                      # one latent frame centred on the content frame: nothing to find
        return torch.zeros(batch, 2, rows, cols, device=video.device)
    reach_v = round(MAX_OBJECT_UNITS / OBJECT_UNITS_PER_FRAME / farthest / STEADY_VELOCITY_STEP)
    steps = torch.arange(-reach_v, reach_v + 1, device=video.device, dtype=torch.float32) * STEADY_VELOCITY_STEP
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), -1).reshape(-1, 2)          # [V, 2]
    shift_x = (grid[:, :1] * offsets * work_w).round().clamp(-reach_x, reach_x).long()          # [V, T]
    shift_y = (grid[:, 1:] * offsets * work_h).round().clamp(-reach_y, reach_y).long()
    shift_index = (shift_y + reach_y) * span_x + shift_x + reach_x                             # [V, T]
    frame_index = torch.arange(frames, device=video.device)[None].expand_as(shift_index)
    shifts = [(dx, dy) for dy in range(-reach_y, reach_y + 1) for dx in range(-reach_x, reach_x + 1)]

    # only the changed pixels cost anything: the search runs over them alone (a few per cent of the clip)
    image, ys, xs = weight.reshape(batch * frames, work_h, work_w).nonzero(as_tuple=True)
    cell = image * rows * cols + (ys // cell_h) * cols + xs // cell_w                      # [K] per (clip, frame, cell)
    target = clip.reshape(batch * frames, -1, work_h, work_w)[image, :, ys, xs]           # [K, 3]
    pixel_weight = weight.reshape(batch * frames, work_h, work_w)[image, ys, xs]         # [K]

    def weighted_error(dx: int, dy: int) -> torch.Tensor:
        """Each changed pixel's change-weighted |difference| from the prediction moved by (dx, dy): [K]."""
        return (target - padded[image, :, ys + reach_y + dy, xs + reach_x + dx]).abs().mean(1) * pixel_weight

    def per_cell(values: torch.Tensor) -> torch.Tensor:      # [K] -> summed per (clip, frame, cell)
        out = torch.zeros(batch * frames * rows * cols, device=video.device)
        return out.index_add_(0, cell, values).reshape(batch, frames, rows, cols)

    costs = torch.stack([per_cell(weighted_error(dx, dy)) for dx, dy in shifts], 2)       # [B, T, S, h, w]
    best, best_index = costs[:, frame_index, shift_index].sum(2).min(1)                   # [B, h, w]
    unexplained = per_cell(weighted_error(0, 0)).sum(1)
    change = per_cell(pixel_weight).sum(1)
    kept = (best <= OBJECT_ACCEPT * unexplained) & (
        change >= STEADY_MIN_CHANGE * (frames - 1) * cell_h * cell_w / OBJECT_CELL_PIXELS ** 2)
    return torch.where(kept[:, None], grid[best_index].permute(0, 3, 1, 2), 0.0)


def measure_fine_objects(video: torch.Tensor, content_index: int, latent_frames: int, cells: tuple[int, int],
                         params: torch.Tensor) -> torch.Tensor:
    """The object channels of ``measured-similarity+fine-objects``: ``[B, 2 * FINE_OBJECT_SPLIT ** 2,
    latent_frames, h, w]`` in units (1/8 of the frame): one steady object motion
    (:func:`steady_object_velocities`) per cell of a grid ``FINE_OBJECT_SPLIT`` times finer than the
    latent's each way, as each latent frame's mean shift; a latent cell's quarters in row-major order,
    each as (dx, dy). ``params``: :func:`camera_similarity` of the clip."""
    split = FINE_OBJECT_SPLIT
    fine = (cells[0] * split, cells[1] * split)
    camera = camera_cells(video, content_index, fine, params).float()
    velocities = steady_object_velocities(video, camera, content_index, fine, latent_frames)   # [B, 2, H', W']
    batch, frames = video.shape[0], video.shape[2]
    offsets = torch.arange(frames, device=video.device, dtype=torch.float32) - content_index
    mean_offsets = offsets.reshape(latent_frames, frames // latent_frames).mean(1)
    shifts = velocities[:, :, None] * mean_offsets.reshape(1, 1, -1, 1, 1)                # [B, 2, T', H', W']
    units = (shifts * OBJECT_UNITS_PER_FRAME).clamp(-MAX_OBJECT_UNITS, MAX_OBJECT_UNITS)
    units = units.reshape(batch, 2, latent_frames, cells[0], split, cells[1], split)
    return units.permute(0, 4, 6, 1, 2, 3, 5).reshape(batch, 2 * split * split, latent_frames, *cells)


def measure_motion(video: torch.Tensor, content_index: int, latent_shape: tuple[int, int, int],
                   kind: str) -> torch.Tensor:
    """All measured channels of ``ddconfig.latent_motion`` = ``kind`` for one clip: ``[B, M, T', h, w]``."""
    latent_frames, rows, cols = latent_shape
    if kind == "measured-similarity+fine-objects":
        params = camera_similarity(video, content_index)
        camera = camera_cells(video, content_index, (rows, cols), params).float()
        return torch.cat([measure_latent_motion(video, content_index, latent_frames, camera),
                          measure_fine_objects(video, content_index, latent_frames, (rows, cols), params)], 1)
    if kind == "measured-similarity+objects":
        camera = camera_cells(video, content_index, (rows, cols)).float()
        channels = [measure_latent_motion(video, content_index, latent_frames, camera)]
    else:
        camera = frame_shifts(video, content_index).float()
        units = measure_latent_motion(video, content_index, latent_frames, camera)
        channels = [units[:, :, :, None, None].expand(-1, -1, -1, rows, cols)]
    if has_object_channels(kind):
        channels.append(measure_object_motion(video, content_index, latent_frames, (rows, cols), camera))
    return torch.cat(channels, 1)


def has_object_channels(kind: str) -> bool:
    """Whether ``ddconfig.latent_motion`` = ``kind`` holds object motion from channel 2 on (two channels per
    object cell: :func:`object_split`)."""
    return kind.endswith(("+objects", "+fine-objects"))


def object_split(kind: str) -> int:
    """How many object cells a latent cell holds each way for ``ddconfig.latent_motion`` = ``kind``:
    ``FINE_OBJECT_SPLIT`` for '...+fine-objects', else 1."""
    return FINE_OBJECT_SPLIT if kind.endswith("+fine-objects") else 1


def embed_motion(z: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """``z`` [B, C, T', h, w] with its leading channels set to ``motion`` -- [B, M, T', h, w], or [B, 2, T']
    spread over h, w -- and the other channels standardised and scaled so the whole latent has zero
    mean and unit variance (see the module docstring); float32."""
    z = z.float()
    batch, channels = z.shape[:2]
    if motion.ndim == 3:
        motion = motion[:, :, :, None, None]
    moving = motion.float().expand(-1, -1, -1, *z.shape[3:])
    rest = z[:, moving.shape[1]:]
    flat = rest.reshape(batch, -1)
    total, learned = z[0].numel(), flat.shape[1]
    standard = (flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True).clamp_min(1e-8)
    motion_sum = moving.reshape(batch, -1).sum(1, keepdim=True)
    motion_square = moving.reshape(batch, -1).pow(2).sum(1, keepdim=True)
    shift = -motion_sum / learned
    # MAX_UNITS and MAX_OBJECT_UNITS keep the motion's share of the variance below 1 (C >= 16, config.py;
    # for fine objects with a steady camera: the module docstring)
    scale = ((total - motion_square) / learned - shift ** 2).clamp_min(1e-3).sqrt()
    rest = (standard * scale + shift).reshape(rest.shape)
    return torch.cat([moving, rest], 1)


def read_motion_flow(z: torch.Tensor, frame_size: tuple[int, int] | None = None) -> torch.Tensor:
    """The coarsest flow ``[B, 2, T', h, w]`` in latent pixels from a measured-motion latent (the inverse of
    the units above: dx units * w / 16, dy units * h / 16). ``frame_size`` (h, w) is the whole latent's
    size when ``z`` is one tile of it."""
    height, width = frame_size or z.shape[3:]
    size = torch.tensor([width, height], dtype=torch.float32, device=z.device).reshape(1, 2, 1, 1, 1)
    return z[:, :MOTION_CHANNELS].float() * size / UNITS_PER_FRAME


def read_object_flow(z: torch.Tensor, frame_size: tuple[int, int] | None = None, split: int = 1) -> torch.Tensor:
    """The object flow ``[B, 2, T', h * split, w * split]`` from channels 2 on of a latent with object channels
    (units of 1/8 of the frame; ``frame_size`` as in :func:`read_motion_flow`): one (dx, dy) per object cell
    in pixels of the object cells' grid -- the latent's, or with ``split`` (:func:`object_split`) one
    ``split`` times finer each way, read from :func:`measure_fine_objects`' channel order."""
    height, width = frame_size or z.shape[3:]
    size = torch.tensor([width * split, height * split], dtype=torch.float32, device=z.device).reshape(1, 2, 1, 1, 1)
    objects = z[:, MOTION_CHANNELS:MOTION_CHANNELS + OBJECT_CHANNELS * split * split].float()
    if split > 1:
        batch, _, frames, rows, cols = objects.shape
        objects = objects.reshape(batch, split, split, 2, frames, rows, cols)
        objects = objects.permute(0, 3, 4, 5, 1, 6, 2).reshape(batch, 2, frames, rows * split, cols * split)
    return objects * size / OBJECT_UNITS_PER_FRAME
