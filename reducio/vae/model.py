"""ReducioVAE: the image-conditioned video VAE (inference modules only)."""
from __future__ import annotations

import functools
import os
from typing import Optional, Union

import torch
from torch import nn

from ..validation import ConfigError
from . import clips as clip_utils
from .blocks import NORM_GROUPS, FloatGroupNorm
from .config import validate_config
from .decoder import FusionDecoder
from .encoder import Encoder
from .hooks import InterruptFn, ProgressFn, StepHooks
from .motion import (embed_motion, has_object_channels, measure_motion, object_split, read_motion_flow,
                     read_object_flow)
from .posterior import DiagonalGaussian, normalize_latent
from .tiling import ContentGrid, TileLayout, tiled_content_features, tiled_decode, tiled_moments

ContentFeatures = Union[list, ContentGrid]


class ReducioVAE(nn.Module):
    """Reducio video VAE: ``encoder_3d`` (motion latent), ``encoder_2d`` (content frame features),
    ``decoder`` (fusion decoder), ``quant_conv``, ``post_quant_conv``.

    Construct with the official constructor kwargs (``ddconfig``, ``ddconfig_2d``, ``embed_dim``,
    tiling settings; training-only kwargs such as ``lossconfig`` are accepted and ignored), or load
    weights with :meth:`from_pretrained`.

    High-level API: :meth:`encode` (video -> normalised latent) and :meth:`decode`
    (latent + content frame -> video). Lower-level entry points mirror the official ones:
    :meth:`encode_2d`, :meth:`encode_3d`, :meth:`decode_features`, :meth:`forward`.
    """

    def __init__(self, ddconfig: dict, ddconfig_2d: dict, embed_dim: int, *, use_tiling: bool = False,
                 tile_sample_min_size: int = 256, tile_overlap_factor: float = 0.2, enable_2d: bool = True,
                 mode: str = "full", ckpt_path: Optional[str] = None, **training_kwargs):
        super().__init__()
        validate_config(dict(ddconfig=ddconfig, ddconfig_2d=ddconfig_2d, embed_dim=embed_dim, use_tiling=use_tiling,
                             tile_sample_min_size=tile_sample_min_size, tile_overlap_factor=tile_overlap_factor,
                             enable_2d=enable_2d, mode=mode, ckpt_path=ckpt_path, **training_kwargs))

        self.config = {"ddconfig": dict(ddconfig), "ddconfig_2d": dict(ddconfig_2d), "embed_dim": embed_dim,
                       "use_tiling": use_tiling, "tile_sample_min_size": tile_sample_min_size,
                       "tile_overlap_factor": tile_overlap_factor}
        n_levels = len(ddconfig["ch_mult"])
        self.f_s = ddconfig.get("f_s", n_levels - 1)
        self.f_t = ddconfig.get("f_t", 0)
        self.clip_frames = ddconfig["temp_res"]
        self.embed_dim = embed_dim
        self.use_tiling = use_tiling
        self.tile_sample_min_size = tile_sample_min_size
        self.tile_overlap_factor = tile_overlap_factor
        self.tanh_out = bool(ddconfig.get("tanh_out", False))
        # 'learned' (official) or one of ours (motion.py, config.LATENT_MOTION_KINDS)
        self.latent_motion = ddconfig.get("latent_motion", "learned")
        self.measured_motion = self.latent_motion != "learned"
        # 'held' or 'linear' (ours: how the decoder spreads the measured motion over frames and pixels, motion.py)
        self.motion_interpolation = ddconfig.get("motion_interpolation", "held")
        window = ddconfig.get("window_size", (256, 256))
        z_channels = ddconfig["z_channels"]

        self.encoder_3d = Encoder(
            ch=ddconfig["ch"], ch_mult=ddconfig["ch_mult"], num_res_blocks=ddconfig["num_res_blocks"],
            in_channels=ddconfig.get("in_channels", 3), z_channels=z_channels, dims=3, f_t=self.f_t,
            f_s=ddconfig.get("f_s"), out_z=True, window_size=window)
        self.encoder_2d = Encoder(
            ch=ddconfig_2d["ch"], ch_mult=ddconfig_2d["ch_mult"], num_res_blocks=ddconfig_2d["num_res_blocks"],
            in_channels=ddconfig_2d.get("in_channels", 3), dims=2, f_s=ddconfig_2d.get("f_s"), out_z=False,
            window_size=ddconfig_2d.get("window_size", (256, 256)))
        # Official quirk: the decoder reads ddconfig_2d['f_s'] only when a key named 'fs' exists.
        f_s_2d = ddconfig_2d.get("f_s") if "fs" in ddconfig_2d else None
        self.decoder = FusionDecoder(
            ch=ddconfig["ch"], ch_in=ddconfig.get("ch_in"), ch_mult=ddconfig["ch_mult"],
            ch_fuse=ddconfig["ch_fuse"], num_res_blocks=ddconfig["num_res_blocks"], z_channels=z_channels,
            temp_res=self.clip_frames, ch_2d=ddconfig_2d["ch"], ch_mult_2d=ddconfig_2d["ch_mult"],
            f_t=self.f_t, f_s=ddconfig.get("f_s"), f_s_2d=f_s_2d, out_ch=ddconfig.get("out_ch", 3),
            fuse_mid=ddconfig.get("fuse_mid", False), fuse_mid_type=ddconfig.get("fuse_mid_type"),
            window_size=window, content_position=ddconfig.get("content_position", "none"),
            fuse_type=ddconfig.get("fuse_type", "attn"), objects=has_object_channels(self.latent_motion),
            linear_motion=self.motion_interpolation == "linear",
            composite=bool(ddconfig.get("composite_output", False)))
        groups = ddconfig.get("norm_groups", NORM_GROUPS)
        if groups != NORM_GROUPS:
            # ours, not in any official model: with 32 groups on 32-channel features every group is one
            # channel, i.e. an instance norm that removes each channel's mean over the clip -- the clip's
            # colours -- at every block (a tiny model trained that way decodes grey). Same weights.
            for module in (self.encoder_3d, self.encoder_2d, self.decoder):
                for norm in module.modules():
                    if isinstance(norm, FloatGroupNorm):
                        norm.num_groups = groups
        split, coarsest_warp = object_split(self.latent_motion), min(self.decoder.warp_level_scales(), default=1)
        if split > 1 and coarsest_warp < split:
            # a warp level coarser than the object grid would take one object cell's flow per pixel
            # (resize_flow 'nearest'), not the motion of the others it covers
            raise ConfigError(f"config field ddconfig.latent_motion = {self.latent_motion!r} holds the object motion "
                              f"on a grid {split} times finer than the latent, but a decoder level with 'warp' "
                              f"fusion runs at {coarsest_warp}x the latent's resolution; "
                              f"fix: use 'warp' only at levels with at least {split}x (ddconfig.fuse_type) or "
                              f"latent_motion 'measured-similarity+objects'")
        self.quant_conv = nn.Conv3d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv3d(embed_dim, z_channels, 1)

    # ------------------------------------------------------------------ properties
    @property
    def spatial_factor(self) -> int:
        """Pixels per latent position along H and W (32 for the official models)."""
        return 2 ** self.f_s

    @property
    def latent_frames(self) -> int:
        """Latent frames per 16-frame clip (4 for ft4, 8 for ft2)."""
        return self.clip_frames // 2 ** self.f_t

    @property
    def content_index(self) -> int:
        """Index of the content frame inside a clip: (T - 1) // 2 = 7."""
        return (self.clip_frames - 1) // 2

    @property
    def variant(self) -> str:
        """'ft4' / 'ft2' for the official temporal factors, else 'f_t=<n>'."""
        return {2: "ft4", 1: "ft2"}.get(self.f_t, f"f_t={self.f_t}")

    def _param(self) -> torch.Tensor:
        return self.quant_conv.weight

    def tile_layout(self, tile_size: Optional[int] = None, overlap: Optional[float] = None) -> TileLayout:
        """Tile geometry; defaults to the model's ``tile_sample_min_size`` / ``tile_overlap_factor``."""
        return TileLayout(tile=tile_size or self.tile_sample_min_size,
                          overlap=self.tile_overlap_factor if overlap is None else overlap,
                          spatial_factor=self.spatial_factor)

    # ------------------------------------------------------------------ official entry points
    def encode_2d(self, content: torch.Tensor, use_tiling: bool = False, tile_size: Optional[int] = None,
                  decoder_levels_only: bool = False) -> ContentFeatures:
        """Content features of the content frame [B, 3, H, W].

        Untiled: a list (one entry per content-encoder level, taken before its downsample, plus the
        mid feature as the last entry, and for a composite decoder (``ddconfig.composite_output``) the
        content frame itself after it). Tiled: a [row][col] grid of such lists, blended, uncropped.
        ``decoder_levels_only`` replaces entries the decoder never reads by None (saves memory).
        """
        if content.ndim != 4:
            raise ValueError(f"encode_2d expects [B, 3, H, W], got shape {tuple(content.shape)}")
        keep = self.decoder.used_content_levels() if decoder_levels_only else None
        if use_tiling:
            return tiled_content_features(self._content_features, content, self.tile_layout(tile_size), keep)
        feats = self._content_features(content)
        if keep is not None:
            kept = {k % len(feats) for k in keep}
            feats = [f if i in kept else None for i, f in enumerate(feats)]
        return feats

    def _content_features(self, content: torch.Tensor) -> list:
        feats = self.encoder_2d.content_features(content)
        # a copy in float32: tiled content features are blended in place, and the caller's tensor is not ours
        return feats + [content.float().clone()] if self.decoder.composite else feats

    def moments(self, video: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder_3d(video)): [B, 2*embed_dim, T', h, w] (untiled)."""
        return self.quant_conv(self.encoder_3d(video))

    def encode_3d(self, video: torch.Tensor, use_tiling: bool = False, tile_size: Optional[int] = None,
                  hooks: Optional[StepHooks] = None) -> DiagonalGaussian:
        """Posterior over the motion latent of one clip [B, 3, T, H, W] (T = 16)."""
        if use_tiling:
            moments = tiled_moments(self.moments, video, self.tile_layout(tile_size), hooks)
        else:
            if hooks is not None:
                hooks.check()
            moments = self.moments(video)
            if hooks is not None:
                hooks.advance()
        return DiagonalGaussian(moments)

    def latent_of(self, z: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """The normalised latent (float32) the decoder reads, from a posterior draw (or mean) ``z`` of the
        clip ``video``; with measured motion its leading channels are set from the clip first (motion.py)."""
        if self.measured_motion:
            z = embed_motion(z, measure_motion(video, self.content_index, tuple(z.shape[2:]), self.latent_motion))
        return normalize_latent(z)

    def _decode_tile(self, latent: torch.Tensor, content_features: list,
                     frame_size: Optional[tuple] = None) -> torch.Tensor:
        # measured motion: the coarsest flow comes from the latent as given (before post_quant_conv);
        # ``frame_size`` is the whole latent's (h, w) when this is one tile of it
        flow = read_motion_flow(latent, frame_size) if self.measured_motion else None
        objects = (read_object_flow(latent, frame_size, object_split(self.latent_motion))
                   if has_object_channels(self.latent_motion) else None)
        video = self.decoder(self.post_quant_conv(latent), content_features, flow, objects)
        return torch.tanh(video) if self.tanh_out else video

    def decode_features(self, latent: torch.Tensor, content_features: ContentFeatures,
                        use_tiling: bool = False, tile_size: Optional[int] = None,
                        hooks: Optional[StepHooks] = None) -> torch.Tensor:
        """Official ``decode``: normalised latent of one clip + content features -> video.

        ``content_features`` is the output of :meth:`encode_2d` with the same ``use_tiling``.
        """
        if use_tiling:
            decode_tile = functools.partial(self._decode_tile, frame_size=tuple(latent.shape[-2:]))
            return tiled_decode(decode_tile, latent, content_features, self.tile_layout(tile_size), hooks)
        if hooks is not None:
            hooks.check()
        video = self._decode_tile(latent, content_features)
        if hooks is not None:
            hooks.advance()
        return video

    def forward(self, video: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Official training-style forward on one clip: content = frame 7, sampled latent.

        Tiles when ``use_tiling`` and the height exceeds the tile window (official rule).
        Returns (reconstruction, posterior, normalised latent).
        """
        if self.use_tiling == "auto":
            use_tiling = self._plan_tiling("decode", None, video.shape[2], *video.shape[-2:], video.shape[0], None)[0]
        else:
            use_tiling = self.use_tiling and video.shape[3] > self.tile_layout().pixel_window
        feats = self.encode_2d(video[:, :, self.content_index], use_tiling)
        posterior = self.encode_3d(video, use_tiling)
        latent = self.latent_of(posterior.sample(generator), video).to(video.dtype)
        return self.decode_features(latent, feats, use_tiling), posterior, latent

    # ------------------------------------------------------------------ high-level API
    def _plan_tiling(self, op: str, tiling: Optional[bool], frames: int, height: int, width: int, batch: int,
                     tile_size: Optional[int]) -> tuple[bool, Optional[int]]:
        from . import memory

        param = self._param()
        return memory.plan_tiling(self, op, frames, height, width, batch, param.dtype, tiling, tile_size,
                                  budget_bytes=memory.available_memory(param.device))

    def content_frames(self, video: torch.Tensor) -> torch.Tensor:
        """Content frame of every 16-frame clip of ``video``: [B, 3, n_clips, H, W]."""
        clip_utils.validate_video(video)
        return clip_utils.content_frames(video, self.clip_frames)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, sample: bool = False, generator: Optional[torch.Generator] = None,
               tiling: Optional[bool] = None, tile_size: Optional[int] = None,
               progress: Optional[ProgressFn] = None, interrupt: Optional[InterruptFn] = None) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised latent [B, embed_dim, n_clips*T', h, w] (float32).

        * T = 16 gives one clip. Longer videos are cut into 16-frame clips (the last one completed
          by repeating its final frame) whose latents are concatenated on the time axis.
        * H, W not multiples of 32 are replicate-padded; h = ceil(H/32), w = ceil(W/32).
        * ``sample=False`` uses the posterior mean (deterministic); ``sample=True`` draws
          mean + std * eps like the official pipeline, eps from ``generator`` (a CPU generator) or
          the global CPU generator, one draw per clip in clip order.
        * ``tiling``: None = the model's ``use_tiling`` policy (False: never, as the official code; True:
          when H or W exceeds the tile window, 320 px for the official models; "auto", the policy of a
          config detected from the weights: only when the memory estimate does not fit the device);
          True/False force it. ``tile_size`` overrides the tile stride in pixels (a multiple of 128).
        * ``progress(done, total)`` is called after every tile/clip, ``interrupt()`` before each;
          see :class:`reducio.vae.hooks.StepHooks`.
        """
        clip_utils.validate_video(video)
        param = self._param()
        padded = clip_utils.pad_to_multiple(video, self.spatial_factor)
        height, width = padded.shape[-2:]
        use_tiling, tile_size = self._plan_tiling("encode", tiling, video.shape[2], height, width, video.shape[0],
                                                  tile_size)
        clips = clip_utils.split_clips(padded, self.clip_frames)
        tiles = self._tiles_per_clip(height, width, use_tiling, tile_size)
        hooks = StepHooks(total=len(clips) * tiles, progress=progress, interrupt=interrupt)
        latents = []
        for clip in clips:
            clip = clip.to(device=param.device, dtype=param.dtype)
            posterior = self.encode_3d(clip, use_tiling, tile_size, hooks)
            z = posterior.sample(generator) if sample else posterior.mode()
            latents.append(self.latent_of(z, clip))
        return torch.cat(latents, dim=2)

    def _tiles_per_clip(self, height: int, width: int, use_tiling: bool, tile_size: Optional[int]) -> int:
        if not use_tiling:
            return 1
        rows, cols = self.tile_layout(tile_size).grid_shape(height, width)
        return rows * cols

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, content: torch.Tensor, tiling: Optional[bool] = None,
               tile_size: Optional[int] = None, num_frames: Optional[int] = None,
               progress: Optional[ProgressFn] = None, interrupt: Optional[InterruptFn] = None) -> torch.Tensor:
        """Normalised latent + content frame(s) -> video [B, 3, T, H, W] in ~[-1, 1] (float32, unclamped).

        * ``content``: [B, 3, H, W] for a one-clip latent, or [B, 3, n_clips, H, W] (one content
          frame per clip, see :meth:`content_frames`). Its size sets the output size: H must satisfy
          ceil(H / 32) == h (frames that were padded at encode time are cropped back).
        * ``num_frames`` crops the output to the original frame count of a video whose last clip
          was partial.
        * ``tiling``/``tile_size``/``progress``/``interrupt`` as in :meth:`encode`.
        """
        latent, content = self._check_decode_inputs(latent, content)
        param = self._param()
        n_clips = latent.shape[2] // self.latent_frames
        if num_frames is not None and not 0 < num_frames <= n_clips * self.clip_frames:
            raise ValueError(f"num_frames={num_frames} must be in 1..{n_clips * self.clip_frames} for a latent "
                             f"of {n_clips} clip(s)")
        height, width = content.shape[-2:]
        padded_h, padded_w = latent.shape[-2] * self.spatial_factor, latent.shape[-1] * self.spatial_factor
        use_tiling, tile_size = self._plan_tiling("decode", tiling, n_clips * self.clip_frames, padded_h, padded_w,
                                                  latent.shape[0], tile_size)
        tiles = self._tiles_per_clip(padded_h, padded_w, use_tiling, tile_size)
        hooks = StepHooks(total=n_clips * tiles, progress=progress, interrupt=interrupt)
        videos = []
        for index in range(n_clips):
            z = latent[:, :, index * self.latent_frames : (index + 1) * self.latent_frames]
            z = z.to(device=param.device, dtype=param.dtype)
            image = clip_utils.pad_to_multiple(content[:, :, index], self.spatial_factor)
            image = image.to(device=param.device, dtype=param.dtype)
            feats = self.encode_2d(image, use_tiling, tile_size, decoder_levels_only=True)
            video = self.decode_features(z, feats, use_tiling, tile_size, hooks)
            videos.append(video[..., :height, :width].float())
        video = torch.cat(videos, dim=2)
        return video if num_frames is None else video[:, :, :num_frames]

    def _check_decode_inputs(self, latent: torch.Tensor, content: torch.Tensor):
        if not isinstance(latent, torch.Tensor) or latent.ndim != 5:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"latent must be [B, {self.embed_dim}, T', h, w], got {shape}")
        if latent.shape[1] != self.embed_dim:
            raise ValueError(f"latent has {latent.shape[1]} channels but this model uses {self.embed_dim}; "
                             f"was it made by a different VAE?")
        if latent.shape[2] % self.latent_frames:
            raise ValueError(
                f"latent has {latent.shape[2]} frames; this {self.variant} model needs a multiple of "
                f"{self.latent_frames} ({self.latent_frames} per 16-frame clip). An ft2 latent has 8 "
                f"frames per clip, an ft4 latent 4: load the matching VAE")
        n_clips = latent.shape[2] // self.latent_frames
        clip_utils.validate_image(content)
        if content.ndim == 4:
            if n_clips != 1:
                raise ValueError(f"the latent holds {n_clips} clips; pass one content frame per clip as "
                                 f"[B, 3, {n_clips}, H, W] (see ReducioVAE.content_frames)")
            content = content[:, :, None]
        if content.shape[2] != n_clips:
            raise ValueError(f"content has {content.shape[2]} frames but the latent holds {n_clips} clips")
        if content.shape[0] != latent.shape[0]:
            raise ValueError(f"batch mismatch: latent batch {latent.shape[0]}, content batch {content.shape[0]}")
        height, width = content.shape[-2:]
        sf = self.spatial_factor
        lat_h, lat_w = latent.shape[-2:]
        if -(-height // sf) != lat_h or -(-width // sf) != lat_w:
            raise ValueError(
                f"content image is {height}x{width} px but the latent is {lat_h}x{lat_w}, which decodes to "
                f"{lat_h * sf}x{lat_w * sf} px: resize the content frame to {lat_h * sf}x{lat_w * sf} (or the "
                f"original video size it was encoded from)")
        return latent, content

    # ------------------------------------------------------------------ loading / memory
    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                        dtype: torch.dtype = torch.float32, config: Optional[dict] = None) -> "ReducioVAE":
        """Load official or converted weights (.ckpt / .pt / .safetensors) safely and strictly.

        The configuration comes from the safetensors metadata when present, otherwise it is detected
        from the weights (ft4 vs ft2); ``config`` (constructor kwargs) overrides both, for custom
        models. Pickled files are read with ``weights_only=True``; ``loss.*`` tensors are dropped.
        Raises :class:`reducio.vae.checkpoint.CheckpointError` for unusable files.
        """
        from .checkpoint import load_model

        return load_model(cls, path, device=device, dtype=dtype, config=config)

    def estimate_memory(self, op: str, frames: int = 16, height: int = 256, width: int = 256, batch: int = 1,
                        dtype: Optional[torch.dtype] = None, tiling: Optional[bool] = None,
                        tile_size: Optional[int] = None) -> int:
        """Bytes needed to ``encode``/``decode`` at this shape (weights included); see reducio.vae.memory."""
        from .memory import estimate_memory

        return estimate_memory(self.config, op, frames=frames, height=height, width=width, batch=batch,
                               dtype=dtype or self._param().dtype, tiling=tiling, tile_size=tile_size)
