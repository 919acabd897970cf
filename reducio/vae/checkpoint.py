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
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch

from ..files import (abbreviate, atomic_write_safetensors, check_torch_archive, read_safetensors_header,  # noqa: F401
                     read_safetensors_tensors, same_file)
from ..validation import CheckpointError, ConfigError, parse_json_object
from .blocks import sinusoid_table
from .config import (SAME_LEVEL_FUSIONS, TILING_AUTO, fusion_parts, level_fuse_types, official_config,
                     validate_config)
from .decoder import decoder_level_frames

PathLike = Union[str, os.PathLike]
CONFIG_METADATA_KEY = "reducio_config"
VARIANT_METADATA_KEY = "reducio_variant"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
MAX_LISTED_KEYS = 8


SIDECAR_SUFFIX = ".json"


# ---------------------------------------------------------------------------------------- reading
def _read_pickle(path: Path) -> object:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path.name} is not a PyTorch checkpoint (neither a torch zip archive nor a "
                              f"pickle); expected the official .ckpt or a .safetensors file")
    check_torch_archive(path)
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


def _read_safetensors_header(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError

    try:
        return read_safetensors_header(path)
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


def clean_state_dict(state_dict: Mapping) -> dict:
    """Strip a DataParallel ``module.`` prefix and drop training-only ``loss.*`` entries (tensors or
    shapes alike)."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.startswith("loss.")}


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes); the download or copy did not finish")
    if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointError(f"unsupported file type {path.suffix!r} for {path.name}; use .ckpt, .pt, .pth "
                              f"or .safetensors")


def open_checkpoint(path: PathLike) -> tuple[dict, dict, Callable[[], dict]]:
    """(key -> shape, safetensors metadata or {}, a function reading the cleaned state dict).

    For .safetensors only the header is read here, so a config can be checked against the tensors'
    shapes before any tensor is loaded. Pickled files are read (safely, after the archive size check)
    because their shapes are only known from the unpickled tensors."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".safetensors":
        shapes, metadata = _read_safetensors_header(path)

        def read_tensors() -> dict:
            try:
                return clean_state_dict(read_safetensors_tensors(path))
            except Exception as exc:  # noqa: BLE001 - a file that changed or broke after the header read
                raise CheckpointError(f"{path.name} could not be read: {exc}") from None
        return clean_state_dict(shapes), metadata, read_tensors
    tensors = clean_state_dict(_unwrap(_read_pickle(path), path.name))
    return {k: tuple(v.shape) for k, v in tensors.items()}, {}, lambda: tensors


def read_state_dict(path: PathLike) -> tuple[dict, dict]:
    """(cleaned state dict, safetensors metadata or {}) of a .ckpt/.pt/.pth/.bin/.safetensors file."""
    _, metadata, read_tensors = open_checkpoint(path)
    return read_tensors(), metadata


def _shapes(state_dict: Mapping) -> dict:
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state_dict.items()}


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
        if conv is not None and len(_shapes({"conv": conv})["conv"]) == 5:
            return "a 3-D video VAE of another family (no content encoder/fusion decoder)"
        return "a 2-D image VAE (AutoencoderKL-style), not the Reducio video VAE"
    if has("encoder.") and has("decoder."):
        return "an autoencoder of another family"
    sample = ", ".join(keys[:3])
    return f"an unknown model ({len(keys)} tensors, e.g. {sample})"


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'ft4' or 'ft2' from the weights: the middle fusion's pos_embed frames (4 vs 8) and the kernel
    depth of ``encoder_3d.down.3.downsample`` (3 vs 1). Raises CheckpointError otherwise."""
    shapes = _shapes({k: v for k, v in state_dict.items()
                      if k in ("decoder.mid.fuse.0.pos_embed", "encoder_3d.down.3.downsample.conv.weight")})
    pos = shapes.get("decoder.mid.fuse.0.pos_embed")
    down = shapes.get("encoder_3d.down.3.downsample.conv.weight")
    if pos is None or down is None or len(pos) != 4 or len(down) != 5:
        description = describe_state_dict(state_dict)
        hint = (f"; for a custom Reducio configuration pass config=... or store the constructor kwargs as "
                f"JSON in the safetensors metadata key {CONFIG_METADATA_KEY!r}" if "Reducio" in description else "")
        raise CheckpointError(f"cannot detect the Reducio VAE configuration: this looks like {description}{hint}")
    by_pos = {4: "ft4", 8: "ft2"}.get(pos[1])
    by_kernel = {3: "ft4", 1: "ft2"}.get(down[2])
    if by_pos is None or by_kernel is None or by_pos != by_kernel or pos[-1] != 512:
        raise CheckpointError(
            f"the weights do not match an official Reducio VAE (decoder.mid.fuse.0.pos_embed {pos}, "
            f"encoder_3d.down.3.downsample kernel depth {down[2]}); a custom configuration must be stored "
            f"in the safetensors metadata key {CONFIG_METADATA_KEY!r}")
    return by_pos


def config_from_metadata(metadata: Mapping[str, str]) -> Optional[dict]:
    text = metadata.get(CONFIG_METADATA_KEY)
    if not text:
        return None
    return normalize_config(parse_json_object(text, f"the {CONFIG_METADATA_KEY!r} metadata"))


def normalize_config(config: Mapping) -> dict:
    """Accept constructor kwargs, or a dict holding them under ``constructor_kwargs`` (golden format);
    checked completely (types, bounds, supported options) by ``validate_config``."""
    if isinstance(config, Mapping) and isinstance(config.get("constructor_kwargs"), Mapping):
        config = config["constructor_kwargs"]
    return validate_config(config)


def sidecar_config_path(path: PathLike) -> Optional[Path]:
    """``<checkpoint name>.json`` beside the checkpoint, if present."""
    candidate = Path(path).with_suffix(SIDECAR_SUFFIX)
    return candidate if candidate.is_file() else None


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')} ({a!r} vs {b!r})"]


@dataclass(frozen=True)
class ConfigChoice:
    """The config a checkpoint is built with and where it came from (for logs and the loader node)."""

    config: dict
    source: str   # "argument", "metadata", "sidecar" or "detected"
    description: str


def choose_config(shapes: Mapping, metadata: Mapping[str, str], path: PathLike, config: Optional[dict] = None,
                  use_sidecar: bool = True) -> ConfigChoice:
    """Which config builds the model, by one rule:

    1. ``config`` given by the caller: used (it overrides everything; that is what passing it means);
    2. the file's own metadata (``reducio_config``, written by the converter): used. A sidecar
       ``<name>.json`` beside such a file is only accepted when it says the same; a different one is
       refused, naming both, instead of silently overriding the file (or being silently ignored);
    3. a sidecar ``<name>.json`` (for pickled .ckpt files of custom configurations, which have no
       metadata);
    4. detected from the weights (the official ft4/ft2 models).
    """
    path = Path(path)
    if config is not None:
        return ConfigChoice(normalize_config(config), "argument", "the config passed by the caller")
    own = config_from_metadata(metadata)
    sidecar = sidecar_config_path(path) if use_sidecar else None
    side = None
    if sidecar is not None:
        try:
            text = sidecar.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"the sidecar config {sidecar.name} cannot be read: {exc}") from None
        side = normalize_config(parse_json_object(text, f"the sidecar config {sidecar.name}"))
    if own is not None:
        if side is not None and side != own:
            raise ConfigError(
                f"{path.name} carries its own config in its metadata ({CONFIG_METADATA_KEY!r}) and the sidecar "
                f"{sidecar.name} beside it holds a different one (differs in: "
                f"{abbreviate(_differences(own, side), 4)}). A sidecar is only for files without a config of "
                f"their own (pickled .ckpt files): remove or rename {sidecar.name}, or re-convert the checkpoint "
                f"with `python -m reducio.convert vae IN OUT --config {sidecar.name}`")
        note = f" (the sidecar {sidecar.name} says the same)" if side is not None else ""
        return ConfigChoice(own, "metadata", f"the file's own metadata ({CONFIG_METADATA_KEY}){note}")
    if side is not None:
        return ConfigChoice(side, "sidecar", f"the sidecar {sidecar.name}")
    # The official 256-px and 1024-px configs build identical weights and differ only in use_tiling
    # (False / True), so weights alone cannot say which was meant: tiling follows the memory estimate.
    variant = detect_variant(shapes)
    detected = {**official_config(variant), "use_tiling": TILING_AUTO}
    return ConfigChoice(detected, "detected", f"detected from the weights: official {variant}, use_tiling "
                                              f"'{TILING_AUTO}' (tiles only when the memory estimate does not fit)")


def resolve_config(state_dict: Mapping, metadata: Mapping[str, str], config: Optional[dict] = None) -> dict:
    """The model config: ``config`` if given, else the file's metadata, else detected from the
    weights (official ft4/ft2 models only). No sidecar lookup (see :func:`choose_config`)."""
    if config is not None:
        return normalize_config(config)
    config = config_from_metadata(metadata)
    return config if config is not None else {**official_config(detect_variant(state_dict)), "use_tiling": TILING_AUTO}


def _indices(shapes: Mapping, prefix: str) -> set[int]:
    found = set()
    for key in shapes:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def check_config_matches_tensors(config: dict, shapes: Mapping, name: str) -> None:
    """Compare the sizes a config claims with the file's own tensor shapes (from the header) before a
    model is built from it, so a config that does not describe the file is refused with the field
    named. Only anchors that the file has are compared; the strict key check follows the build."""
    dd, dd2 = config["ddconfig"], config["ddconfig_2d"]
    fix = (f"the config does not describe {name}: correct it, or use the checkpoint it was written for")

    def refuse(field, value, found):
        raise ConfigError(f"config field {field} = {value!r} does not match the tensors of {name}: {found}; {fix}")

    def expect_count(prefix, count, field, value, what):
        found = _indices(shapes, prefix)
        if found and len(found) != count:
            refuse(field, value, f"the file's tensors have {len(found)} {what} ({prefix}*)")

    for branch, section, field in (("encoder_3d", dd, "ddconfig"), ("encoder_2d", dd2, "ddconfig_2d")):
        conv = shapes.get(f"{branch}.conv_in.weight")
        if conv and conv[0] != section["ch"]:
            refuse(f"{field}.ch", section["ch"], f"{branch}.conv_in.weight has {conv[0]} output channels")
        expect_count(f"{branch}.down.", len(section["ch_mult"]), f"{field}.ch_mult", section["ch_mult"], "levels")
        expect_count(f"{branch}.down.0.block.", section["num_res_blocks"], f"{field}.num_res_blocks",
                     section["num_res_blocks"], "ResNet blocks per level")
    quant = shapes.get("quant_conv.weight")
    if quant and quant[0] != 2 * config["embed_dim"]:
        refuse("embed_dim", config["embed_dim"], f"quant_conv.weight has {quant[0]} = 2 x {quant[0] // 2} outputs")
    if quant and len(quant) > 1 and quant[1] != 2 * dd["z_channels"]:
        refuse("ddconfig.z_channels", dd["z_channels"], f"quant_conv.weight has {quant[1]} inputs")
    n, f_t = len(dd["ch_mult"]), dd.get("f_t", 0)
    kinds = level_fuse_types(dd.get("fuse_type", "attn"), n)
    # per-frame tables: (key, frames the config implies, axis of the frame count in the tensor)
    tables = [("decoder.mid.fuse.0.pos_embed", dd["temp_res"] // 2 ** f_t, 1)]
    for level, kind in enumerate(kinds):
        frames = decoder_level_frames(level, n, dd["temp_res"], f_t)
        for index, part in enumerate(fusion_parts(kind)):
            table = "temp_embed" if part in SAME_LEVEL_FUSIONS else "pos_embed"
            tables.append((f"decoder.up.{level}.fuse.{index}.{table}", frames, 2 if table == "temp_embed" else 1))
    for key, frames, axis in tables:
        shape = shapes.get(key)
        if shape and len(shape) == (4 if axis == 1 else 5) and shape[axis] != frames:
            refuse("ddconfig.temp_res", dd["temp_res"], f"{key} has {shape[axis]} frames, the config implies {frames}")


def check_keys(expected: Mapping, state_dict: Mapping, name: str) -> None:
    """Strict key and shape check; the error lists missing, unexpected and mis-shaped tensors."""
    expected, found = _shapes(expected), _shapes(state_dict)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k]} (expected {v})" for k, v in expected.items() if k in found and found[k] != v]
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
               dtype: torch.dtype = torch.float32, config: Optional[dict] = None, use_sidecar: bool = True):
    """Build ``cls`` (ReducioVAE) from a checkpoint. Order: read the header (safetensors) or the safe
    pickle, choose and check the config (types, bounds, against the tensors' shapes), build on the
    meta device, strict key check, then read the tensors and assign them. The model records where its
    config came from in ``config_source``."""
    path = Path(path)
    shapes, metadata, read_tensors = open_checkpoint(path)
    choice = choose_config(shapes, metadata, path, config, use_sidecar)
    check_config_matches_tensors(choice.config, shapes, path.name)
    with torch.device("meta"):
        model = cls(**choice.config)
    check_keys(model.state_dict(), shapes, path.name)
    state_dict = read_tensors()
    check_keys(model.state_dict(), state_dict, path.name)  # the file may have changed since the header read
    verify_pos_embed(choice.config, state_dict, path.name)
    state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.config_source = choice.description
    return model.eval()


# ---------------------------------------------------------------------------------------- writing


def convert_to_safetensors(in_path: PathLike, out_path: PathLike, overwrite: bool = False,
                           dtype: Optional[torch.dtype] = None, config: Optional[dict] = None) -> dict:
    """Convert an official checkpoint to .safetensors with the config in its metadata.

    Validates the file completely (safe read, config, strict keys and shapes) before writing.
    Returns the metadata written.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and same_file(in_path, out_path):
        raise FileExistsError("the output path is the input file; choose another output name")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; pass --force to replace it")
    state_dict, metadata = read_state_dict(in_path)
    config = resolve_config(state_dict, metadata, config)
    check_config_matches_tensors(config, _shapes(state_dict), in_path.name)
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
