"""V3 nodes of the Reducio VAE: loader, encode (frames -> motion latent) and decode."""
from __future__ import annotations

import logging

import torch

from .._compat import io, ui
from .._folders import REDUCIO_FOLDER, register_model_folder
from ._handle import TILING_AUTO, TILING_MODES, ReducioVAEHandle
from ._layout import (FRAME_HANDLING, FRAMES_ERROR, ReducioInputError, check_image, check_latent, clip_ranges,
                      content_for_latent, content_frames_of, validate_image, video_to_frames)

CATEGORY = "Reducio/VAE"
log = logging.getLogger(__name__)

# The socket type. Its value is a ReducioVAEHandle (not a comfy.sd.VAE: decoding needs the
# content frame, which the stock VAE/VAEDecode interface cannot carry).
ReducioVAE = io.Custom("REDUCIO_VAE")

DTYPE_AUTO = "auto"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODE_MEAN, MODE_SAMPLE = "mean", "sample"

TILING_TOOLTIP = ("Spatial tiling (official Reducio scheme: overlapping tiles blended together). 'auto' tiles "
                  "frames larger than the model's tile window (320 px for the official models), 'on' always "
                  "tiles, 'off' never does. Tiling saves memory on large frames; without it an out-of-memory "
                  "error still falls back to tiles automatically.")


def checkpoint_names() -> list[str]:
    # Idempotent; makes the list work even if register() has not run (e.g. a direct schema call).
    register_model_folder(REDUCIO_FOLDER)
    import folder_paths

    return folder_paths.get_filename_list(REDUCIO_FOLDER)


def _progress_bar(total_hint: int = 1):
    """A progress(done, total) callback feeding ComfyUI's progress bar of the running node."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total_hint)
    return lambda done, total: bar.update_absolute(done, total)


def _input_error(node: str, error: ReducioInputError) -> ValueError:
    return ValueError(f"{node}: {error}")


def _check_choices(**named: tuple) -> bool | str:
    """validate_inputs helper: each keyword is (value, allowed options). Checked here rather than by
    ComfyUI because not every supported version validates V3 combo values at /prompt (0.3.64 does not),
    so a bad value in an API prompt is still refused with HTTP 400. ``None`` = linked, checked later."""
    for name, (value, options) in named.items():
        if value is not None and value not in options:
            return f"{name}: {value!r} is not one of {list(options)}"
    return True


def _check_handle(node: str, vae) -> None:
    if not isinstance(vae, ReducioVAEHandle):
        raise ValueError(f"{node}: 'vae' must come from Load Reducio VAE (a REDUCIO_VAE), got {type(vae).__name__}.")


def tiling_policy_text(model) -> str:
    """How the model's own ``use_tiling`` reads, for the loader's output (the nodes' tiling input
    still chooses tiles by the memory estimate; the policy applies to direct package calls)."""
    policy = model.use_tiling
    if policy == "auto":
        return "use_tiling 'auto' (tile only when the memory estimate does not fit)"
    return f"use_tiling {policy} (as the config says)"


def load_reducio_vae(path: str, name: str, dtype: torch.dtype) -> torch.nn.Module:
    """Load a checkpoint with the reducio package; any failure becomes one clear error and nothing
    is kept (the module only exists once every weight has loaded strictly). The config comes from
    the package's one rule (reducio.vae.checkpoint.choose_config): the file's own metadata, else a
    sidecar ``<name>.json`` (a conflicting sidecar is refused), else detected from the weights."""
    from ...reducio.vae.checkpoint import load_model
    from ...reducio import ReducioVAE as ReducioVAEModel

    try:
        return load_model(ReducioVAEModel, path, device="cpu", dtype=dtype)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name and the fix
        raise ValueError(
            f"ReducioVAELoader: cannot load {name!r} as a Reducio VAE: {type(error).__name__}: {error}. Expected "
            "the official microsoft/Reducio-VAE checkpoint (reducio-ft4-fs32-attn23.ckpt or -ft2-) or a "
            ".safetensors conversion of it (a Reducio-DiT checkpoint goes into the Reducio-DiT loader).") from error


class ReducioVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReducioVAELoader",
            display_name="Load Reducio VAE",
            category=CATEGORY,
            description=("Loads a Reducio video VAE (image-conditioned, 16-frame clips, latent 16 x T/4 x H/32 x "
                         "W/32 for 'ft4'). Checkpoints go in models/reducio (or a 'reducio' entry in "
                         "extra_model_paths.yaml); official .ckpt files load safely, .safetensors is preferred."),
            inputs=[
                io.Combo.Input("checkpoint", options=checkpoint_names(),
                               tooltip="Reducio VAE checkpoint from the models/reducio folder (.safetensors, .ckpt "
                                       "or .pt; the architecture, ft4 or ft2, is detected from the weights)."),
                io.Combo.Input("dtype", options=[DTYPE_AUTO, *DTYPES], default=DTYPE_AUTO,
                               tooltip="Weight and compute precision. 'auto' picks bf16 where the device supports "
                                       "it and fp32 otherwise (normalisation layers always compute in fp32)."),
            ],
            outputs=[ReducioVAE.Output(display_name="reducio_vae",
                                       tooltip="The loaded Reducio VAE, for Reducio VAE Encode / Decode.")],
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str | None = None, dtype: str | None = None) -> bool | str:
        if checkpoint is not None and checkpoint not in checkpoint_names():
            return (f"checkpoint: {checkpoint!r} is not in the 'reducio' model folder(s); put the file in "
                    "models/reducio (or a folder named by a 'reducio' entry of extra_model_paths.yaml)")
        return _check_choices(dtype=(dtype, [DTYPE_AUTO, *DTYPES]))

    @classmethod
    def execute(cls, checkpoint: str, dtype: str = DTYPE_AUTO) -> io.NodeOutput:
        import comfy.model_management as mm
        import folder_paths

        register_model_folder(REDUCIO_FOLDER)
        path = folder_paths.get_full_path(REDUCIO_FOLDER, checkpoint)
        if path is None:
            raise FileNotFoundError(
                f"ReducioVAELoader: checkpoint {checkpoint!r} not found in the 'reducio' model folder(s) "
                f"{folder_paths.get_folder_paths(REDUCIO_FOLDER)}. Put the file there (or point a 'reducio' entry "
                "of extra_model_paths.yaml at its folder) and refresh the node list.")
        if dtype == DTYPE_AUTO:
            compute_dtype = mm.vae_dtype(mm.vae_device(), allowed_dtypes=[torch.bfloat16, torch.float32])
        elif dtype in DTYPES:
            compute_dtype = DTYPES[dtype]
        else:
            raise ValueError(f"ReducioVAELoader: dtype must be one of {[DTYPE_AUTO, *DTYPES]}, got {dtype!r}.")
        if compute_dtype != torch.float32 and mm.vae_device().type == "cpu":
            log.warning("ReducioVAELoader: %s on the CPU is very slow (PyTorch has no fast half-precision 3-D "
                        "convolutions there; about 40x slower than fp32 in our measurement). Use fp32 or auto.",
                        dtype)
        model = load_reducio_vae(path, checkpoint, compute_dtype)
        summary = (f"{checkpoint}: Reducio VAE {model.variant}, config from {model.config_source}; "
                   f"{tiling_policy_text(model)}")
        log.info("ReducioVAELoader: %s", summary)
        return io.NodeOutput(ReducioVAEHandle(model, compute_dtype, checkpoint), ui=ui.PreviewText(summary))


class ReducioVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReducioVAEEncode",
            display_name="Reducio VAE Encode",
            category=CATEGORY,
            description=("Encodes video frames into a Reducio motion latent. The frames are cut into consecutive "
                         "16-frame clips (Reducio is trained on 16 frames at 16 fps); each clip's middle frame "
                         "(index 7) is its content frame, which decoding needs again."),
            inputs=[
                ReducioVAE.Input("vae", tooltip="The Reducio VAE from Load Reducio VAE."),
                io.Image.Input("frames", tooltip="Video frames as an IMAGE batch (e.g. Get Video Components' images). "
                                                 "The count must be a multiple of 16 (see frame_handling); sizes "
                                                 "that are not multiples of 32 are padded and cropped back."),
                io.Combo.Input("mode", options=[MODE_MEAN, MODE_SAMPLE], default=MODE_MEAN,
                               tooltip="'mean': the posterior mean (deterministic, best reconstruction). 'sample': "
                                       "draw from the posterior with the seed below, as the official latent cache "
                                       "for Reducio-DiT training does."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the posterior sample; used only when mode is 'sample'."),
                io.Combo.Input("tiling", options=list(TILING_MODES), default=TILING_AUTO, tooltip=TILING_TOOLTIP),
                io.Combo.Input("frame_handling", options=list(FRAME_HANDLING), default=FRAMES_ERROR,
                               tooltip="What to do when the frame count is not a multiple of 16: 'error' stops with "
                                       "an explanation, 'pad_repeat_last' repeats the last frame up to the next "
                                       "multiple (the decoded video then has those extra frames), 'trim' drops "
                                       "the frames after the last full clip."),
            ],
            outputs=[
                io.Latent.Output(display_name="motion_latent",
                                 tooltip="Reducio motion latent [1, C, clips x T', H/32, W/32] (clips concatenated "
                                         "along time). Survives Save Latent / Load Latent."),
                io.Image.Output(display_name="content_frames",
                                tooltip="One content frame per 16-frame clip (frame 7 of each clip), at the input "
                                        "size. Reducio VAE Decode needs them to reconstruct the video."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode: str | None = None, tiling: str | None = None,
                        frame_handling: str | None = None) -> bool | str:
        return _check_choices(mode=(mode, [MODE_MEAN, MODE_SAMPLE]), tiling=(tiling, TILING_MODES),
                              frame_handling=(frame_handling, FRAME_HANDLING))

    @classmethod
    def execute(cls, vae: ReducioVAEHandle, frames: torch.Tensor, mode: str = MODE_MEAN, seed: int = 0,
                tiling: str = TILING_AUTO, frame_handling: str = FRAMES_ERROR) -> io.NodeOutput:
        if mode not in (MODE_MEAN, MODE_SAMPLE):
            raise ValueError(f"ReducioVAEEncode: mode must be '{MODE_MEAN}' or '{MODE_SAMPLE}', got {mode!r}.")
        _check_handle("ReducioVAEEncode", vae)
        try:
            # No copy of the whole video is made: clips are converted and padded one at a time.
            frames = validate_image(frames, "frames")
            spans = clip_ranges(frames.shape[0], frame_handling, vae.geometry.clip_frames)
        except ReducioInputError as error:
            raise _input_error("ReducioVAEEncode", error) from error
        try:
            latent = vae.encode(frames, spans, sample=(mode == MODE_SAMPLE), seed=seed, tiling=tiling,
                                progress=_progress_bar())
        except MemoryError as error:
            raise MemoryError(f"ReducioVAEEncode: {error}") from error
        return io.NodeOutput({"samples": latent}, content_frames_of(frames, spans, vae.geometry))


class ReducioVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ReducioVAEDecode",
            display_name="Reducio VAE Decode",
            category=CATEGORY,
            description=("Decodes a Reducio motion latent back to video frames, using the content frame of each "
                         "16-frame clip. Output frames have the content frame's size."),
            inputs=[
                ReducioVAE.Input("vae", tooltip="The Reducio VAE from Load Reducio VAE (the one that made the "
                                                "latent)."),
                io.Latent.Input("motion_latent", tooltip="Reducio motion latent from Reducio VAE Encode, Load Latent "
                                                         "or a Reducio-DiT sampler: [B, C, clips x T', h, w]."),
                io.Image.Input("content", tooltip="Content frame(s): one per 16-frame clip in the latent (Reducio VAE "
                                                  "Encode's content_frames), or one frame for all clips. Its size "
                                                  "sets the output size and must match the latent (up to 32 px)."),
                io.Combo.Input("tiling", options=list(TILING_MODES), default=TILING_AUTO, tooltip=TILING_TOOLTIP),
            ],
            outputs=[io.Image.Output(display_name="frames",
                                     tooltip="Decoded frames [clips x 16, H, W, 3], ready for Create Video / "
                                             "Save Video or any IMAGE node.")],
        )

    @classmethod
    def validate_inputs(cls, tiling: str | None = None) -> bool | str:
        return _check_choices(tiling=(tiling, TILING_MODES))

    @classmethod
    def execute(cls, vae: ReducioVAEHandle, motion_latent: dict, content: torch.Tensor,
                tiling: str = TILING_AUTO) -> io.NodeOutput:
        if not isinstance(motion_latent, dict) or "samples" not in motion_latent:
            raise ValueError("ReducioVAEDecode: motion_latent must be a LATENT (a dict with 'samples').")
        _check_handle("ReducioVAEDecode", vae)
        try:
            samples = check_latent(motion_latent["samples"], vae.geometry)
            content = check_image(content, "content")
            content = content_for_latent(content, samples.shape, vae.geometry)
        except ReducioInputError as error:
            raise _input_error("ReducioVAEDecode", error) from error
        video = vae.decode(samples, content, tiling=tiling, progress=_progress_bar())
        return io.NodeOutput(video_to_frames(video))


NODES = [ReducioVAELoader, ReducioVAEEncode, ReducioVAEDecode]
