"""The object that travels on the REDUCIO_VAE socket: a Reducio VAE under ComfyUI's model management.

The VAE module sits in a ``comfy.model_patcher.ModelPatcher`` so ComfyUI loads it onto the VAE
device, counts its memory next to the other models and offloads it again, like the stock VAE.
Each encode/decode call:

1. asks ``load_models_gpu`` for the weights plus the activation memory that the ``reducio``
   package estimates for one clip at this size;
2. runs the ``reducio`` package (it walks the 16-frame clips and the tiles itself) with ComfyUI's
   progress bar and Cancel button wired to its ``progress`` / ``interrupt`` hooks;
3. on out-of-memory, retries with tiling on, then with smaller tiles, so a run that fits at all
   finishes; nothing is returned until a whole attempt has succeeded.
"""
from __future__ import annotations

import gc
import logging
import warnings
from typing import Callable, Optional, Sequence

import torch

from ._layout import LatentGeometry, clip_video

log = logging.getLogger(__name__)

TILING_AUTO, TILING_ON, TILING_OFF = "auto", "on", "off"
TILING_MODES = (TILING_AUTO, TILING_ON, TILING_OFF)

ProgressFn = Callable[[int, int], None]


class ReducioVAEHandle:
    """A loaded Reducio VAE: the ``reducio.ReducioVAE`` module, its ModelPatcher and its dtype."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, source: str):
        import comfy.model_management as mm
        import comfy.model_patcher

        self.model = model.eval().requires_grad_(False)
        self.dtype = dtype
        self.source = source
        self.load_device = mm.vae_device()
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.model, load_device=self.load_device, offload_device=mm.vae_offload_device())
        self.geometry = LatentGeometry(channels=model.embed_dim, frames_per_clip=model.latent_frames,
                                       spatial_factor=model.spatial_factor, clip_frames=model.clip_frames)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def __repr__(self) -> str:
        return (f"ReducioVAEHandle({self.source!r}, {self.model.variant}, dtype={self.dtype}, "
                f"latent {self.geometry.channels} channels x {self.geometry.frames_per_clip} frames per clip)")

    # -- public -------------------------------------------------------------------------------
    def encode(self, frames: torch.Tensor, spans: Sequence[tuple[int, int]], *, sample: bool, seed: int,
               tiling: str, progress: Optional[ProgressFn] = None) -> torch.Tensor:
        """IMAGE frames [N, H, W, 3] in 0..1 (validated) and the clips' frame ranges (see
        ``_layout.clip_ranges``) -> normalised motion latent [1, C, k*t, h, w] (float32).

        The clips are converted, padded and encoded one at a time, so besides the caller's frames
        only one clip's worth of video exists at any moment. The estimate for one clip is checked
        against the available memory before anything runs (on the CPU an out-of-memory error
        cannot be caught, the operating system ends the process).
        """
        height, width = frames.shape[1:3]
        clip_frames = self.geometry.clip_frames

        def run(tiled: Optional[bool], tile_size: Optional[int]) -> torch.Tensor:
            # A fresh generator per attempt: a retry after out-of-memory draws the same noise. One
            # generator for all clips draws the same noise, in clip order, as one whole-video call.
            generator = torch.Generator(device="cpu").manual_seed(seed) if sample else None
            latents = []
            for index, span in enumerate(spans):
                clip_progress = None
                if progress is not None:
                    def clip_progress(done: int, total: int, _index=index) -> None:
                        progress(_index * total + done, len(spans) * total)

                latents.append(self.model.encode(clip_video(frames, span, clip_frames), sample=sample,
                                                 generator=generator, tiling=tiled, tile_size=tile_size,
                                                 progress=clip_progress, interrupt=_comfy_interrupt))
            return torch.cat(latents, dim=2)

        return self._run("encode", clip_frames, (height, width), tiling, run, refuse_beyond_memory=True,
                         what=f"{len(spans) * clip_frames} frames of {width}x{height}")

    def decode(self, latent: torch.Tensor, content: torch.Tensor, *, tiling: str,
               progress: Optional[ProgressFn] = None) -> torch.Tensor:
        """Latent [B, C, k*t, h, w] + content [B, 3, k, H, W] in -1..1 -> video [B, 3, k*16, H, W].

        Batch items are decoded one after another (each clip of each item is one unit of work for
        the progress bar), so memory is that of one clip whatever the batch size.
        """
        batch = latent.shape[0]
        height, width = content.shape[-2:]
        frames = latent.shape[2] // self.geometry.frames_per_clip * self.geometry.clip_frames
        outputs = []
        for index in range(batch):
            item_progress = None
            if progress is not None:
                def item_progress(done: int, total: int, _index=index) -> None:
                    progress(_index * total + done, batch * total)

            def run(tiled: Optional[bool], tile_size: Optional[int], _index=index, _progress=item_progress):
                return self.model.decode(latent[_index:_index + 1], content[_index:_index + 1], tiling=tiled,
                                         tile_size=tile_size, progress=_progress, interrupt=_comfy_interrupt)

            outputs.append(self._run("decode", frames, (height, width), tiling, run))
        return torch.cat(outputs, dim=0)

    # -- internals ----------------------------------------------------------------------------
    def _estimate(self, kind: str, frames: int, pixel_hw: tuple[int, int], tiled: bool,
                  tile_size: Optional[int]) -> int:
        """Activation bytes (weights excluded) of one encode/decode call, from the reducio package."""
        from ...reducio.vae import estimate_memory

        return estimate_memory(self.model, kind, frames=frames, height=pixel_hw[0], width=pixel_hw[1], batch=1,
                               dtype=self.dtype, tiling=tiled, tile_size=tile_size, include_weights=False)

    def _load(self, activation_bytes: int) -> None:
        """Move the weights to the VAE device, freeing other models for the activations if needed.

        Always a full load: ComfyUI's partial ("lowvram") loading only streams weights of comfy.ops
        layers, and the reducio package uses plain torch layers, which would be left on the offload
        device. The VAE's weights are small next to its activations, so tiles are the lever instead.
        """
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], memory_required=activation_bytes, force_full_load=True)

    def _first_attempt(self, kind: str, frames: int, pixel_hw: tuple[int, int], tiling: str,
                       refuse_beyond_memory: bool = False, what: str = ""):
        """Load the weights and pick (tiled, tile_size): as asked, or for 'auto' what fits in memory.

        ``refuse_beyond_memory``: on the CPU, raise a clear error up front when the estimate says
        the run cannot fit (there, unlike on a GPU, running out of memory is not an exception that
        the tile fallbacks could catch: the process is killed or the machine swaps).
        """
        import comfy.model_management as mm
        from ...reducio.vae import choose_tile_size

        if tiling not in TILING_MODES:
            raise ValueError(f"tiling must be one of {TILING_MODES}, got {tiling!r}")
        factor = self.geometry.spatial_factor
        padded = tuple(-(-side // factor) * factor for side in pixel_hw)
        if tiling == TILING_AUTO:
            # The official rule first: tile when the padded frame exceeds one tile window (320 px).
            tiled = self.model.tile_layout().needs_tiling(*padded)
        else:
            tiled = tiling == TILING_ON
        refuse = refuse_beyond_memory and self.load_device.type == "cpu"
        if refuse:
            self._refuse_unless_it_fits(kind, frames, pixel_hw, tiled, None, tiling, what)
        self._load(self._estimate(kind, frames, pixel_hw, tiled, None))
        if tiling != TILING_AUTO:
            return tiled, None
        # Then memory: if the weights are loaded and the run still does not fit, use the largest
        # tiles that do (the estimate is per clip; clips run one after another).
        budget = mm.get_free_memory(self.load_device) + self.weight_bytes
        try:
            tile_size = choose_tile_size(self.model, kind, frames, pixel_hw[0], pixel_hw[1], budget,
                                         dtype=self.dtype, min_tile=4 * factor)
        except ValueError:
            if refuse:   # not even the smallest tiles fit
                self._refuse_unless_it_fits(kind, frames, pixel_hw, True, 4 * factor, tiling, what)
            return True, None   # nothing is predicted to fit; try anyway, the fallbacks follow
        if tile_size is None or (tiled and tile_size >= self.model.tile_sample_min_size):
            return tiled, None
        return True, tile_size

    def _refuse_unless_it_fits(self, kind: str, frames: int, pixel_hw: tuple[int, int], tiled: bool,
                               tile_size: Optional[int], tiling: str, what: str) -> None:
        """Raise MemoryError naming the fixes when the estimate exceeds the available memory."""
        import comfy.model_management as mm

        need = self._estimate(kind, frames, pixel_hw, tiled, tile_size)
        available = mm.get_free_memory(self.load_device)
        if need <= available:
            return
        smallest = 4 * self.geometry.spatial_factor
        tiled_need = self._estimate(kind, frames, pixel_hw, True, smallest)
        if tiling == TILING_OFF and tiled_need <= available:
            fix = (f"set tiling to 'auto' or 'on' (with {smallest}-px tiles it needs about "
                   f"{tiled_need / 2**30:.2f} GiB)")
        elif tiling == TILING_OFF:
            fix = "use smaller frames (e.g. Upscale Image By < 1) or fewer frames per node, and tiling 'auto'"
        else:
            fix = ("use smaller frames (e.g. Upscale Image By < 1), a smaller batch, or free memory; even "
                   f"{smallest}-px tiles need about {tiled_need / 2**30:.2f} GiB")
        raise MemoryError(
            f"Reducio VAE {kind} of {what or f'{frames} frames of {pixel_hw[1]}x{pixel_hw[0]}'} would need about "
            f"{need / 2**30:.2f} GiB of working memory per 16-frame clip (tiling "
            f"{'on' if tiled else 'off'}{f', {tile_size}-px tiles' if tile_size else ''}), but only "
            f"{available / 2**30:.2f} GiB are available; stopped before starting. Fix: {fix}.")

    def _fallbacks(self, tiled: bool, tile_size: Optional[int]):
        """Smaller footprints to try after out-of-memory: tiling on, then halved tiles down to the
        smallest size whose window still lines up with the latent grid (4 latent positions)."""
        if not tiled:
            yield True, None
        smallest = 4 * self.geometry.spatial_factor
        size = (tile_size or self.model.tile_sample_min_size) // 2
        while size >= smallest and size % smallest == 0:
            yield True, size
            size //= 2

    def _run(self, kind: str, frames: int, pixel_hw: tuple[int, int], tiling: str, run,
             refuse_beyond_memory: bool = False, what: str = "") -> torch.Tensor:
        import comfy.model_management as mm

        first = self._first_attempt(kind, frames, pixel_hw, tiling, refuse_beyond_memory, what)
        attempts = [first, *self._fallbacks(*first)]
        for number, (tiled, tile_size) in enumerate(attempts):
            if number > 0:
                self._load(self._estimate(kind, frames, pixel_hw, tiled, tile_size))
            try:
                with warnings.catch_warnings():
                    # The nodes already checked the 0..1 IMAGE range; the package's "no negative
                    # values, is this [0, 1] data?" hint would only be noise for bright frames.
                    warnings.filterwarnings("ignore", message=".*Reducio expects \\[-1, 1\\].*")
                    result = run(tiled, tile_size)
                return result.to(self.output_device, torch.float32)
            except mm.OOM_EXCEPTION:
                if number + 1 == len(attempts):
                    raise
            # Outside the except block, so the failed attempt's tensors can be freed (as comfy.sd.VAE).
            next_size = attempts[number + 1][1] or self.model.tile_sample_min_size
            log.warning("Reducio VAE %s ran out of memory (tiling=%s, tile size %s); retrying with tiling, tile "
                        "size %s.", kind, tiled, tile_size or self.model.tile_sample_min_size, next_size)
            gc.collect()
            mm.soft_empty_cache(True)
        raise AssertionError("unreachable: the last attempt either returns or raises")


def _comfy_interrupt() -> bool:
    """Interrupt hook for the reducio package: raises ComfyUI's own interruption exception."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
    return False
