"""Reducio-DiT checkpoints: safetensors with the model config (JSON) in the file metadata (spec §6).

Loading is strict: every key of the model must be present with the shape the config implies, and
nothing else may be in the file. A file of another model (a PixArt-alpha checkpoint, a Reducio VAE,
a pickle) is recognised and the error names the right converter or loader.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from ..files import abbreviate, atomic_write_safetensors, read_safetensors_header, read_safetensors_tensors
from ..validation import CheckpointError, ConfigError
from .config import ReducioDiTConfig

FORMAT_NAME = "reducio-dit"
FORMAT_VERSION = "1"
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONVERT_HINT = "convert it with `python -m reducio.convert pixart IN.pth OUT.safetensors`"


# ---------------------------------------------------------------------------- identification
def identify_foreign_checkpoint(keys, metadata: Mapping[str, str] | None = None) -> str | None:
    """If the keys / metadata belong to a known *other* model, a sentence saying which and what to use."""
    metadata = metadata or {}
    keys = set(keys)
    fmt = metadata.get("format", "")
    if fmt and fmt not in (FORMAT_NAME, "pt"):
        if "vae" in fmt:
            return (f"this file is a {fmt!r} checkpoint (a Reducio VAE), not a Reducio-DiT; load it with "
                    "ReducioVAELoader / reducio.ReducioVAE instead")
    if any(k.startswith(("encoder_3d.", "encoder_2d.")) for k in keys) or (
            any(k.startswith("decoder.") for k in keys) and any(k.startswith("post_quant_conv.") for k in keys)):
        return ("this file is a Reducio VAE (keys encoder_3d.* / decoder.*), not a Reducio-DiT; load it with "
                "ReducioVAELoader / reducio.ReducioVAE instead")
    if any(k.startswith("transformer_blocks.") for k in keys) and any("attn1.to_q" in k for k in keys):
        return f"this file is a diffusers PixArt transformer, not a Reducio-DiT; {CONVERT_HINT}"
    if "blocks.0.attn.qkv.weight" in keys and "clip_embedder.null_embedding" not in keys and (
            "x_embedder.proj.weight" in keys or "pos_embed" in keys):
        return f"this file is a PixArt-alpha checkpoint, not a Reducio-DiT; {CONVERT_HINT}"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "this file is a Stable Diffusion style checkpoint, not a Reducio-DiT"
    return None


def expected_shapes(config: ReducioDiTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model built from ``config`` (built on the meta device: no memory, no init)."""
    from .model import ReducioDiT

    model = ReducioDiT(config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def block_count(keys) -> int:
    """Number of transformer blocks a file holds (distinct ``blocks.{i}.`` indices)."""
    return len({k.split(".")[1] for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()})


def check_depth_matches_file(config: ReducioDiTConfig, keys, source: str = "checkpoint") -> None:
    """The one config field that decides how many modules are built may not exceed the blocks the file
    holds, checked before the model (even on the meta device) is built; every other size is compared
    shape by shape afterwards against a model built on the meta device (no memory), and fewer blocks
    than the file holds show up there as unexpected keys."""
    blocks = block_count(keys)
    if config.depth > max(blocks, 1):
        raise ConfigError(f"{source}: config field depth = {config.depth} does not match the file, which holds "
                          f"{blocks} blocks (blocks.0..{blocks - 1}); correct the config in its metadata (or the "
                          "config you passed), or use the checkpoint it was written for")


def check_state_dict(state_dict: Mapping, config: ReducioDiTConfig,
                     metadata: Mapping[str, str] | None = None, source: str = "checkpoint",
                     dtypes: Mapping[str, torch.dtype] | None = None) -> None:
    """Raise ``CheckpointError`` listing every missing / unexpected / mis-shaped key, or a foreign format
    (``ConfigError`` when the config does not describe the tensors). ``state_dict`` maps keys to tensors,
    or to shapes with their ``dtypes`` given separately (a header-only check)."""
    foreign = identify_foreign_checkpoint(state_dict.keys(), metadata)
    if foreign:
        raise CheckpointError(f"{source}: {foreign}")
    check_depth_matches_file(config, state_dict.keys(), source)
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state_dict.items()}
    if dtypes is None:
        dtypes = {k: v.dtype for k, v in state_dict.items()}
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k}: file {list(shapes[k])} vs config {list(shape)}"
                   for k, shape in expected.items() if k in shapes and shapes[k] != shape)
    bad_dtype = sorted(f"{k}: {v}" for k, v in dtypes.items() if v not in ALLOWED_DTYPES)
    if not (missing or unexpected or wrong or bad_dtype):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensor(s) do not match the config (the config in the metadata does not "
                     f"describe these weights): {abbreviate(wrong, 6)}")
    if missing:
        parts.append(f"{len(missing)} missing key(s): {abbreviate(missing, 6)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {abbreviate(unexpected, 6)}")
    if bad_dtype:
        parts.append(f"unsupported tensor dtypes (float32, bfloat16, float16 only): {abbreviate(bad_dtype, 6)}")
    error = ConfigError if wrong else CheckpointError
    raise error(f"{source} is not a valid Reducio-DiT checkpoint for its config "
                f"(depth {config.depth}, hidden {config.hidden_size}): " + "; ".join(parts))


def config_from_metadata(metadata: Mapping[str, str] | None, source: str = "checkpoint",
                         keys=()) -> ReducioDiTConfig:
    """The config stored in a checkpoint's metadata (raise a clear error if absent or malformed)."""
    metadata = metadata or {}
    if "config" not in metadata:
        foreign = identify_foreign_checkpoint(keys, metadata)
        if foreign:
            raise CheckpointError(f"{source}: {foreign}")
        raise CheckpointError(f"{source} has no Reducio-DiT config in its safetensors metadata; pass the config "
                              "explicitly, or re-save the weights with reducio.dit.save_checkpoint")
    fmt = metadata.get("format", FORMAT_NAME)
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{source} metadata says format {fmt!r}, expected {FORMAT_NAME!r}")
    version = metadata.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source} has Reducio-DiT format version {version!r}; this code reads version "
                              f"{FORMAT_VERSION!r}")
    try:
        return ReducioDiTConfig.from_json(metadata["config"])
    except ConfigError as exc:
        raise ConfigError(f"{source}: the config in its metadata is invalid: {exc}") from None


# ---------------------------------------------------------------------------- reading
def inspect_checkpoint(path: str | os.PathLike, config: ReducioDiTConfig | None = None
                       ) -> tuple[ReducioDiTConfig, dict]:
    """Check a checkpoint from its header only (no tensor is read): the config (types, bounds, depth
    against the blocks present) and every key, shape and dtype. Returns (config, metadata)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Reducio-DiT checkpoint not found: {path}")
    if not path.endswith((".safetensors", ".sft")):
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise CheckpointError(f"{path} is a pickled PyTorch file; Reducio-DiT checkpoints are safetensors only. "
                                  f"If it is a PixArt-alpha checkpoint, {CONVERT_HINT}")
    try:
        shapes, metadata = read_safetensors_header(path)
        with safe_open(path, framework="pt", device="cpu") as handle:
            dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}). If it is a PixArt-alpha "
                              f"checkpoint, {CONVERT_HINT}") from exc
    if config is None:
        config = config_from_metadata(metadata, source=path, keys=shapes.keys())
    check_state_dict(shapes, config, metadata, source=path, dtypes={k: _DTYPE_NAMES.get(v, v) for k, v in dtypes.items()})
    return config, metadata


def read_checkpoint(path: str | os.PathLike, config: ReducioDiTConfig | None = None
                    ) -> tuple[dict[str, torch.Tensor], ReducioDiTConfig]:
    """Read and check a checkpoint; returns (state dict, config). ``config`` overrides the metadata.
    The header is checked first (:func:`inspect_checkpoint`), the tensors are read only after."""
    from safetensors import SafetensorError

    config, metadata = inspect_checkpoint(path, config)
    try:
        state_dict = read_safetensors_tensors(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} could not be read ({exc})") from exc
    check_state_dict(state_dict, config, metadata, source=os.fspath(path))
    return state_dict, config


_DTYPE_NAMES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, config: ReducioDiTConfig | None = None):
    """Build a ``ReducioDiT`` from a checkpoint, strictly. ``dtype`` casts the weights (default: as stored
    when all tensors share one dtype, else float32)."""
    from .model import ReducioDiT

    state_dict, config = read_checkpoint(path, config)
    if dtype is None:
        dtypes = {t.dtype for t in state_dict.values()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    model = ReducioDiT(config, device="meta")
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------- writing
def save_checkpoint(model_or_state_dict, path: str | os.PathLike, config: ReducioDiTConfig | None = None,
                    dtype: torch.dtype | None = None, extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write a checkpoint atomically (temporary file in the target folder, then rename)."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        state_dict = model_or_state_dict.state_dict()
        config = config or getattr(model_or_state_dict, "config", None)
    else:
        state_dict = dict(model_or_state_dict)
    if config is None:
        raise ValueError("save_checkpoint needs the model config (pass config=...)")
    if dtype is not None and dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype must be one of {ALLOWED_DTYPES}, got {dtype}")
    check_state_dict(state_dict, config, source="state dict to save")
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().to("cpu").contiguous()
               for k, v in state_dict.items()}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config.to_json()}
    metadata.update(extra_metadata or {})
    atomic_write_safetensors(tensors, metadata, path, overwrite=True, create_folder=True)


def describe(path: str | os.PathLike) -> dict:
    """Config and parameter count of a checkpoint, for logs and node tooltips."""
    state_dict, config = read_checkpoint(path)
    return {"config": json.loads(config.to_json()), "parameters": sum(t.numel() for t in state_dict.values())}
