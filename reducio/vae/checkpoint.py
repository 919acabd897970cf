"""Safe checkpoint reading, configuration detection, strict key checks and safetensors export.

Pickled checkpoints (.ckpt/.pt/.pth) are read with ``torch.load(weights_only=True)``: only tensors
and plain containers are rebuilt, so a file that tries to run code is rejected, never executed.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..files import abbreviate, atomic_write_safetensors  # noqa: F401  (re-exported)
from .blocks import sinusoid_table
from .config import official_config

PathLike = Union[str, os.PathLike]
CONFIG_METADATA_KEY = "reducio_config"
VARIANT_METADATA_KEY = "reducio_variant"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
MAX_LISTED_KEYS = 8


class CheckpointError(ValueError):
    """A file that cannot be used as Reducio VAE weights (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------- reading
def _read_pickle(path: Path) -> object:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path.name} is not a PyTorch checkpoint (neither a torch zip archive nor a "
                              f"pickle); expected the official .ckpt or a .safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path.name}: it contains objects other than tensors and plain containers "
            f"(possibly code that would run on load), which the safe loader does not execute. If the file "
            f"is trusted, convert it on a trusted machine to .safetensors. Details: {exc}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path.name} is truncated or corrupt and cannot be read ({exc}); "
                              f"download it again") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        return tensors, metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is not a readable .safetensors file (truncated or corrupt?): "
                              f"{exc}") from None


def _unwrap(obj: object, name: str) -> dict:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{name} does not hold a state dict (found {type(obj).__name__}); expected a "
                              f"mapping of parameter names to tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{name} holds no tensors; it is not a model checkpoint")
    return tensors


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Strip a DataParallel ``module.`` prefix and drop training-only ``loss.*`` tensors."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith("loss.")}


def read_state_dict(path: PathLike) -> tuple[dict, dict]:
    """(cleaned state dict, safetensors metadata or {}) of a .ckpt/.pt/.pth/.bin/.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes); the download or copy did not finish")
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = _unwrap(_read_pickle(path), path.name), {}
    else:
        raise CheckpointError(f"unsupported file type {path.suffix!r} for {path.name}; use .ckpt, .pt, .pth "
                              f"or .safetensors")
    return clean_state_dict(tensors), metadata


# ---------------------------------------------------------------------------------------- detection
def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short guess of what kind of model a state dict belongs to (for error messages)."""
    keys = list(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("encoder_3d.") and has("decoder.") and has("encoder_2d."):
        return "a Reducio VAE with a different configuration or an incomplete file"
    if has("model.diffusion_model."):
        return "a diffusion-model checkpoint (Stable Diffusion / ComfyUI UNet or DiT), not a VAE"
    if has("first_stage_model."):
        return "a full latent-diffusion checkpoint (its VAE is a 2-D image VAE)"
    if has("x_embedder.") or has("blocks.0.attn") or has("transformer_blocks."):
        return "a diffusion transformer (DiT/PixArt-style), not a VAE"
    if has("encoder.down.") and has("decoder.up."):
        conv = state_dict.get("encoder.conv_in.weight")
        if conv is not None and conv.ndim == 5:
            return "a 3-D video VAE of another family (no content encoder/fusion decoder)"
        return "a 2-D image VAE (AutoencoderKL-style), not the Reducio video VAE"
    if has("encoder.") and has("decoder."):
        return "an autoencoder of another family"
    sample = ", ".join(keys[:3])
    return f"an unknown model ({len(keys)} tensors, e.g. {sample})"


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'ft4' or 'ft2' from the weights: the middle fusion's pos_embed frames (4 vs 8) and the kernel
    depth of ``encoder_3d.down.3.downsample`` (3 vs 1). Raises CheckpointError otherwise."""
    pos = state_dict.get("decoder.mid.fuse.0.pos_embed")
    down = state_dict.get("encoder_3d.down.3.downsample.conv.weight")
    if pos is None or down is None or pos.ndim != 4 or down.ndim != 5:
        description = describe_state_dict(state_dict)
        hint = (f"; for a custom Reducio configuration pass config=... or store the constructor kwargs as "
                f"JSON in the safetensors metadata key {CONFIG_METADATA_KEY!r}" if "Reducio" in description else "")
        raise CheckpointError(f"cannot detect the Reducio VAE configuration: this looks like {description}{hint}")
    by_pos = {4: "ft4", 8: "ft2"}.get(pos.shape[1])
    by_kernel = {3: "ft4", 1: "ft2"}.get(down.shape[2])
    if by_pos is None or by_kernel is None or by_pos != by_kernel or pos.shape[-1] != 512:
        raise CheckpointError(
            f"the weights do not match an official Reducio VAE (decoder.mid.fuse.0.pos_embed {tuple(pos.shape)}, "
            f"encoder_3d.down.3.downsample kernel depth {down.shape[2]}); a custom configuration must be stored "
            f"in the safetensors metadata key {CONFIG_METADATA_KEY!r}")
    return by_pos


def config_from_metadata(metadata: Mapping[str, str]) -> Optional[dict]:
    text = metadata.get(CONFIG_METADATA_KEY)
    if not text:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the {CONFIG_METADATA_KEY!r} metadata is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not {"ddconfig", "ddconfig_2d", "embed_dim"} <= set(config):
        raise CheckpointError(f"the {CONFIG_METADATA_KEY!r} metadata must hold the constructor kwargs "
                              f"(ddconfig, ddconfig_2d, embed_dim)")
    return config


def resolve_config(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   config: Optional[dict] = None) -> dict:
    """The model config: ``config`` if given, else the file's metadata, else detected from the
    weights (official ft4/ft2 models only)."""
    if config is not None:
        return normalize_config(config)
    config = config_from_metadata(metadata)
    return config if config is not None else official_config(detect_variant(state_dict))


def normalize_config(config: Mapping) -> dict:
    """Accept constructor kwargs, or a dict holding them under ``constructor_kwargs`` (golden format)."""
    if "constructor_kwargs" in config:
        config = config["constructor_kwargs"]
    if not {"ddconfig", "ddconfig_2d", "embed_dim"} <= set(config):
        raise CheckpointError("a Reducio VAE config needs 'ddconfig', 'ddconfig_2d' and 'embed_dim'")
    return dict(config)


def check_keys(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    """Strict key and shape check; the error lists missing, unexpected and mis-shaped tensors."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{name} does not match the Reducio VAE; it looks like {describe_state_dict(state_dict)}."]
    if missing:
        parts.append(f"Missing {len(missing)} tensors: {abbreviate(missing, MAX_LISTED_KEYS)}.")
    if unexpected:
        parts.append(f"Unexpected {len(unexpected)} tensors: {abbreviate(unexpected, MAX_LISTED_KEYS)}.")
    if wrong:
        parts.append(f"Wrong shapes for {len(wrong)} tensors: {abbreviate(wrong, MAX_LISTED_KEYS)}.")
    raise CheckpointError(" ".join(parts))


def _fresh_tables(config: dict) -> dict:
    from .model import ReducioVAE

    with torch.device("meta"):
        skeleton = ReducioVAE(**config)
    tables = {}
    for key, value in skeleton.state_dict().items():
        if key.endswith("pos_embed"):
            frames = skeleton.get_submodule(key.rsplit(".", 1)[0]).frames
            tables[key] = sinusoid_table(frames, value.shape[-1])[None, :, None, :]
    return tables


def verify_pos_embed(config: dict, state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    for key, table in _fresh_tables(config).items():
        if key in state_dict:
            loaded = state_dict[key].float()
            tol = 1e-5 if state_dict[key].dtype == torch.float32 else 1e-2
            if not torch.allclose(loaded, table, atol=tol, rtol=0):
                warnings.warn(f"{name}: {key} differs from the standard sinusoid table; the file may be "
                              f"modified", stacklevel=3)


# ---------------------------------------------------------------------------------------- loading
def load_model(cls, path: PathLike, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32, config: Optional[dict] = None):
    """Build ``cls`` (ReducioVAE) from a checkpoint: safe read, config, strict check, assign weights."""
    path = Path(path)
    state_dict, metadata = read_state_dict(path)
    config = resolve_config(state_dict, metadata, config)
    with torch.device("meta"):
        model = cls(**config)
    check_keys(model.state_dict(), state_dict, path.name)
    verify_pos_embed(config, state_dict, path.name)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------- writing


def convert_to_safetensors(in_path: PathLike, out_path: PathLike, overwrite: bool = False,
                           dtype: Optional[torch.dtype] = None, config: Optional[dict] = None) -> dict:
    """Convert an official checkpoint to .safetensors with the config in its metadata.

    Validates the file completely (safe read, config, strict keys and shapes) before writing.
    Returns the metadata written.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise FileExistsError("the output path is the input file; choose another output name")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; pass --force to replace it")
    state_dict, metadata = read_state_dict(in_path)
    config = resolve_config(state_dict, metadata, config)
    from .model import ReducioVAE

    with torch.device("meta"):
        skeleton = ReducioVAE(**config)
    check_keys(skeleton.state_dict(), state_dict, in_path.name)
    verify_pos_embed(config, state_dict, in_path.name)
    order = list(skeleton.state_dict())
    tensors = {k: (state_dict[k].to(dtype) if dtype is not None else state_dict[k]) for k in order}
    meta = {CONFIG_METADATA_KEY: json.dumps(config, sort_keys=True), VARIANT_METADATA_KEY: skeleton.variant,
            "format": "pt", "source_file": in_path.name}
    atomic_write_safetensors(tensors, meta, out_path, overwrite=overwrite)
    return meta
