"""The fusion decoder: 3-D conv decoder that injects content features by cross-attention."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (FULL, SPATIAL, TEMPORAL, AddFusion, FloatGroupNorm, FusionBlock, LatentFlow, ResnetBlock,
                     SelfAttention, Upsample, WarpFusion, linear_flow, resize_flow, warp_frames)
from .config import fusion_parts, level_fuse_types
from .encoder import _as_window


def decoder_upsample_kind(level: int, n_levels: int, f_s: int, f_t: int) -> Optional[str]:
    """Kind of the upsample at the end of decoder level ``level`` (upsample-first layout).

    The f_t levels closest to the latent double T; the rest are spatial only.
    """
    if level == 0 or level < n_levels - max(f_s, f_t):
        return None
    if f_t < f_s and level < n_levels - f_t:
        return SPATIAL
    if f_s < f_t and level < n_levels - f_s:
        return TEMPORAL
    return FULL


def decoder_level_frames(level: int, n_levels: int, temp_res: int, f_t: int) -> int:
    """Number of frames the features have at decoder level ``level`` (before its upsample)."""
    if level < n_levels - f_t:
        return temp_res
    if level == n_levels - 1:
        return temp_res // 2 ** f_t
    return temp_res // 2 ** (f_t - n_levels + 1 + level)


class FusionDecoder(nn.Module):
    """Official ``FusionDecoder`` (fuse_type 'attn', upsample_first, interpolate up-sampling).

    ``up`` is indexed by resolution level (0 = output resolution) and run from the deepest level.
    Each level: ``block_1`` ResNet blocks -> optional fusion with content feature ``ch_fuse[level]``
    -> ``block_2`` ResNet blocks -> optional ``upsample``. The fusion is chosen per level by
    ``fuse_type`` (a string or one entry per level), as in the official code: 'attn' (cross-attention,
    ``fuse.0``; every official model), 'add' (``AddFusion``, ``fuse.0``) or 'add+attn' (both, in
    that order); or ours: 'warp' (``WarpFusion``) and 'attn+warp' (cross-attention, then warp).
    ``content_position='sincos2d'`` (ours, not in any official model) adds a fixed 2-D position code
    to the queries and content tokens of every fusion block; it has no weights. ``objects`` (ours) gives
    every warp level a second, object-moved content picture (``WarpFusion``, motion.py); ``linear_motion``
    (ours, ``ddconfig.motion_interpolation`` 'linear', motion.py) spreads the flows read from the latent
    linearly over the frames (and the camera's over the pixels) before the first warp level.
    A middle fusion block (content feature [-1]) exists when the content encoder is shallower than
    the video encoder (f_s != f_s_2d) or ``fuse_mid_type == 'attn'``.

    ``composite`` (ours, ``ddconfig.composite_output``): the output is a per-pixel mix, weighted by a
    softmax the decoder predicts (``mix``, from its last features and each picture's mean distance to the
    generated output: the sharp picture that agrees with the blurred estimate), of what ``conv_out``
    generates and the content frame itself moved by the finest warp level's flow and, with ``objects``,
    moved by the motion the latent holds
    (the camera's plus the cell's object flow, without the warp levels' own refinements: trained, those
    move the sprites too, and added to the object flow they moved them twice -- measured, that picture
    was further off on the sprites than the camera's). The content frame is then the last entry of the
    content-feature list (``ReducioVAE.encode_2d``).
    Why: the pixels then keep the content frame's sharpness where the motion is right. Measured on the
    session-11 model (64 held-out clips at 64 px), every reconstruction went through ``conv_out`` and
    blurred the sprites' edges and shifted their colours -- even in the content frame itself, whose
    motion is zero -- and exact object shifts instead of the measured ones did not help it (26.68 dB
    against 26.84): the rendering, not the motion, was what limited it. The mix starts at the generated
    output (``MIX_INIT``), so a model trained without it begins unchanged.
    """

    # logit of the generated output against 0 for the pictures: 96.5 % generated at first (98 % without
    # object pictures)
    MIX_INIT = 4.0

    def __init__(self, *, ch: int, ch_mult: Sequence[int], ch_fuse: Sequence[int], num_res_blocks: int,
                 z_channels: int, temp_res: int, ch_2d: int, ch_mult_2d: Sequence[int],
                 f_t: int = 0, f_s: Optional[int] = None, f_s_2d: Optional[int] = None,
                 ch_in: Optional[int] = None, out_ch: int = 3, fuse_mid: bool = False,
                 fuse_mid_type: Optional[str] = None, window_size=(256, 256), content_position: str = "none",
                 fuse_type="attn", objects: bool = False, linear_motion: bool = False, composite: bool = False):
        super().__init__()
        self.n_levels = len(ch_mult)
        if len(ch_fuse) != self.n_levels:
            raise ValueError(f"ch_fuse needs one entry per level ({self.n_levels}), got {list(ch_fuse)}")
        self.ch_fuse = list(ch_fuse)
        fuse_types = level_fuse_types(fuse_type, self.n_levels)
        f_s = self.n_levels - 1 if f_s is None else f_s
        f_s_2d = len(ch_mult_2d) - 1 if f_s_2d is None else f_s_2d
        ch_in = ch if ch_in is None else ch_in
        window = _as_window(window_size)
        plane = content_position == "sincos2d"
        self.f_s, self.f_t, self.temp_res = f_s, f_t, temp_res
        self.linear_motion = linear_motion

        block_in_m = ch * ch_mult[-1]
        block_in = ch_in * ch_mult[-1]
        latent_frames = temp_res // 2 ** f_t
        self.conv_in = nn.Conv3d(z_channels, block_in_m, 3, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in_m, block_in, 3)
        self.mid.fuse = nn.ModuleList()
        if fuse_mid and (f_s != f_s_2d or fuse_mid_type == "attn"):
            self.mid.fuse.append(FusionBlock(block_in, ch_2d * ch_mult_2d[-1], latent_frames,
                                             window=window, plane_position=plane))
        elif fuse_mid and fuse_mid_type is not None:
            raise NotImplementedError(f"fuse_mid_type {fuse_mid_type!r} is not used by any official "
                                      f"Reducio model and is not implemented")
        self.mid.attn_1 = SelfAttention(block_in, 3, heads=8, window=window)
        self.mid.block_2 = ResnetBlock(block_in, block_in, 3)

        levels = [None] * self.n_levels
        for level in reversed(range(self.n_levels)):
            stage = nn.Module()
            block_out = ch_in * ch_mult[level]
            stage.block_1 = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block_1.append(ResnetBlock(block_in, block_out, 3))
                block_in = block_out
            stage.fuse = nn.ModuleList()
            if self.ch_fuse[level] >= 0:
                frames = decoder_level_frames(level, self.n_levels, temp_res, f_t)
                context_dim = ch_2d * ch_mult_2d[self.ch_fuse[level]]
                for part in fusion_parts(fuse_types[level]):
                    if part == "add":
                        stage.fuse.append(AddFusion(block_in, context_dim, frames))
                    elif part == "warp":
                        stage.fuse.append(WarpFusion(block_in, context_dim, frames, objects=objects))
                    else:
                        stage.fuse.append(FusionBlock(block_in, context_dim, frames, window=window,
                                                      plane_position=plane))
            stage.block_2 = nn.ModuleList(ResnetBlock(block_in, block_in, 3) for _ in range(num_res_blocks))
            kind = decoder_upsample_kind(level, self.n_levels, f_s, f_t)
            if kind is not None:
                stage.upsample = Upsample(block_in, kind)
            levels[level] = stage
        self.up = nn.ModuleList(levels)

        if any("warp" in fusion_parts(kind) for kind, index in zip(fuse_types, self.ch_fuse) if index >= 0):
            # the coarsest motion straight from the latent, refined by every warp level (WarpFusion)
            self.latent_flow = LatentFlow()
        self.norm_out = FloatGroupNorm(block_in)
        self.conv_out = nn.Conv3d(block_in, out_ch, 3, padding=1)
        self.composite = composite
        if composite:
            pictures = 2 if objects else 1
            # logits (pictures..., generated) from the features and each picture's distance to conv_out's output
            self.mix = nn.Conv3d(block_in + pictures, pictures + 1, 3, padding=1)
            nn.init.zeros_(self.mix.weight)
            with torch.no_grad():
                self.mix.bias.zero_()
                self.mix.bias[-1] = self.MIX_INIT

    def warp_level_scales(self) -> list[int]:
        """Each warp level's resolution in multiples of the latent's (features before its upsample): the
        spatial upsamples of the levels nearer the latent, which run first."""
        scales = []
        for level in range(self.n_levels):
            if any(isinstance(block, WarpFusion) for block in self.up[level].fuse):
                ups = sum(decoder_upsample_kind(k, self.n_levels, self.f_s, self.f_t) in (SPATIAL, FULL)
                          for k in range(level + 1, self.n_levels))
                scales.append(2 ** ups)
        return scales

    def used_content_levels(self) -> list[int]:
        """Indices into the content-feature list that this decoder reads (-1 = the last entry)."""
        used = [i for i in self.ch_fuse if i >= 0]
        if len(self.mid.fuse):
            used.append(self.mid_content)
        if self.composite:
            used.append(-1)
        return used

    @property
    def mid_content(self) -> int:
        """Index of the content encoder's mid feature in the content-feature list (the content frame itself
        follows it in a composite decoder)."""
        return -2 if self.composite else -1

    def forward(self, z: torch.Tensor, content: Sequence[torch.Tensor],
                flow: torch.Tensor | None = None, object_flow: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, z_channels, T', h, w] (after post_quant_conv), content = content-feature list; ``flow``
        [B, 2, T', h, w] in latent pixels: the coarsest flow when the caller reads it elsewhere (a
        measured-motion latent, see motion.py), else it is read off ``z`` (``LatentFlow``);
        ``object_flow`` likewise, one value per object cell (the latent's cells, or with
        '...+fine-objects' a finer grid: motion.read_object_flow) in pixels of that grid, for a decoder
        built with ``objects`` (every warp level and the composite output)."""
        h = self.mid.block_1(self.conv_in(z))
        for block in self.mid.fuse:
            h = block(h, content[self.mid_content])
        h = self.mid.block_2(self.mid.attn_1(h))
        # the motion so far: from the latent, then refined by each warp level in turn (coarse to fine)
        if flow is None and hasattr(self, "latent_flow"):
            flow = self.latent_flow(z)
        if self.linear_motion:
            # every frame's own motion, and the camera's at every output pixel, before the warp levels
            # resample them (the object flow stays one value per object cell)
            height, width = z.shape[3] * 2 ** self.f_s, z.shape[4] * 2 ** self.f_s
            if flow is not None:
                flow = linear_flow(flow.float(), (self.temp_res, height, width))
            if object_flow is not None:
                object_flow = linear_flow(object_flow.float(), (self.temp_res, *object_flow.shape[3:]), space=False)
        read = flow           # the motion as the latent holds it, before the warp levels refine it
        for level in reversed(range(self.n_levels)):
            stage = self.up[level]
            for block in stage.block_1:
                h = block(h)
            for block in stage.fuse:
                if isinstance(block, WarpFusion):
                    h, flow = block(h, content[self.ch_fuse[level]], flow, object_flow)
                else:
                    h = block(h, content[self.ch_fuse[level]])
            for block in stage.block_2:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        h = F.silu(self.norm_out(h))
        video = self.conv_out(h)
        if not self.composite:
            return video
        return self._composite(video, h, content[-1], flow, read, object_flow)

    def _composite(self, video: torch.Tensor, h: torch.Tensor, image: torch.Tensor, flow: torch.Tensor,
                   read: torch.Tensor, object_flow: Optional[torch.Tensor]) -> torch.Tensor:
        """``video`` mixed with the content frame ``image`` [B, 3, H, W] moved by ``flow`` (the finest warp
        level's) and by ``read`` (the camera's flow read from the latent) + ``object_flow`` (see the class
        docstring)."""
        size = video.shape[2:]
        pictures = [warp_frames(image.float(), resize_flow(flow.float(), size))]
        if object_flow is not None:
            moved = resize_flow(read.float(), size) + resize_flow(object_flow.float(), size, mode="nearest")
            pictures.append(warp_frames(image.float(), moved))
        distances = [(picture - video.float()).abs().mean(1, keepdim=True) for picture in pictures]
        weights = self.mix(torch.cat([h, *distances], 1).to(h.dtype)).float().softmax(1)
        out = weights[:, -1:] * video.float()
        for index, picture in enumerate(pictures):
            out = out + weights[:, index:index + 1] * picture
        return out.to(video.dtype)
