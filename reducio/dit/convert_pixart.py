"""Build a Reducio-DiT checkpoint from a PixArt-alpha XL/2 checkpoint (spec reducio_dit.md §7).

    python -m reducio.convert pixart IN OUT.safetensors [--force] [--dtype fp32|bf16|fp16] [--seed N]
                                     [--patch-size 1,1,1] [--in-channels 16] [--latent-frames 4]

IN: an original PixArt-alpha checkpoint (``PixArt-XL-2-512x512.pth``, ``PixArt-XL-2-1024-MS.pth``: read
with ``torch.load(weights_only=True)``, never an unrestricted unpickle), the same keys in safetensors, or a
diffusers PixArt transformer (``transformer_blocks.{i}.attn1.to_q`` ... in safetensors).

The backbone (blocks, timestep MLP, t_block, caption MLP and null caption, final scale_shift_table) is
copied unchanged; the input/output layers and the new image-condition modules are initialised as §7.3
says. PixArt's ``final_layer.linear`` has the same shape as ours at patch (1,1,1) but a different
meaning, so it is never copied.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

import torch

from ..files import check_torch_archive, same_file
from ..validation import CheckpointError
from .checkpoint import FORMAT_NAME, save_checkpoint
from .config import ReducioDiTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Source weights deliberately not used (§7.2): incompatible input / output layers, fixed positions,
# PixArt-MS micro-conditioning.
IGNORED_PREFIXES = ("x_embedder.", "final_layer.linear.", "pos_embed", "csize_embedder.", "ar_embedder.",
                    "pos_embed.proj.", "proj_out.", "adaln_single.emb.resolution_embedder.",
                    "adaln_single.emb.aspect_ratio_embedder.")
BLOCK_PARTS = ("scale_shift_table", "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
               "cross_attn.proj", "mlp.fc1", "mlp.fc2")


class ConversionError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ reading
def read_source(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a PixArt checkpoint; pickles only through ``torch.load(weights_only=True)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"input not found: {path}")
    if path.endswith((".safetensors", ".sft")):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OS errors: one clear message
            raise ConversionError(f"{path} is not a readable .safetensors file ({exc})") from None
    try:
        check_torch_archive(path)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise ConversionError(f"{path} could not be read safely (torch.load with weights_only=True refused it: "
                              f"{exc}). Only plain tensor checkpoints are accepted; never unpickle untrusted files "
                              "with weights_only=False.") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    keys = set(sd)
    if "clip_embedder.null_embedding" in keys:
        raise ConversionError("this is already a Reducio-DiT checkpoint; load it directly")
    if any(k.startswith(("encoder_3d.", "encoder_2d.")) for k in keys):
        raise ConversionError("this is a Reducio VAE checkpoint, not PixArt-alpha; use `python -m reducio.convert vae`")
    if "blocks.0.attn.qkv.weight" in keys and "t_block.1.weight" in keys:
        return "original"
    if "transformer_blocks.0.attn1.to_q.weight" in keys and "adaln_single.linear.weight" in keys:
        return "diffusers"
    raise ConversionError("not a PixArt-alpha checkpoint: expected PixArt keys (blocks.{i}.attn.qkv, t_block.1) or "
                          "diffusers PixArt keys (transformer_blocks.{i}.attn1.to_q, adaln_single.linear)")


def diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename / concatenate diffusers PixArt keys into the original layout (§7.1)."""
    out = {}
    depth = _count_blocks(sd, "transformer_blocks.")
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[dst + "scale_shift_table"] = sd[src + "scale_shift_table"]
        for suffix in ("weight", "bias"):
            out[f"{dst}attn.qkv.{suffix}"] = torch.cat([sd[f"{src}attn1.to_{x}.{suffix}"] for x in "qkv"])
            out[f"{dst}attn.proj.{suffix}"] = sd[f"{src}attn1.to_out.0.{suffix}"]
            out[f"{dst}cross_attn.q_linear.{suffix}"] = sd[f"{src}attn2.to_q.{suffix}"]
            out[f"{dst}cross_attn.kv_linear.{suffix}"] = torch.cat([sd[f"{src}attn2.to_{x}.{suffix}"] for x in "kv"])
            out[f"{dst}cross_attn.proj.{suffix}"] = sd[f"{src}attn2.to_out.0.{suffix}"]
            out[f"{dst}mlp.fc1.{suffix}"] = sd[f"{src}ff.net.0.proj.{suffix}"]
            out[f"{dst}mlp.fc2.{suffix}"] = sd[f"{src}ff.net.2.{suffix}"]
    renames = {"adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
               "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
               "adaln_single.linear.": "t_block.1.",
               "caption_projection.linear_1.": "y_embedder.y_proj.fc1.",
               "caption_projection.linear_2.": "y_embedder.y_proj.fc2."}
    for src, dst in renames.items():
        for suffix in ("weight", "bias"):
            out[dst + suffix] = sd[src + suffix]
    if "caption_projection.y_embedding" in sd:
        out["y_embedder.y_embedding"] = sd["caption_projection.y_embedding"]
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    return out


def _count_blocks(sd, prefix: str) -> int:
    heads = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
    if not all(head.isdigit() for head in heads):
        raise ConversionError(f"keys under {prefix!r} must be numbered blocks, found {sorted(heads)[:4]}")
    indices = {int(head) for head in heads}
    if indices != set(range(len(indices))):
        raise ConversionError(f"block indices under {prefix!r} are not contiguous: {sorted(indices)[:8]}...")
    return len(indices)


# ------------------------------------------------------------------------------------------ converting
def config_for_source(sd: Mapping[str, torch.Tensor], **overrides) -> ReducioDiTConfig:
    """The XL config with the backbone sizes read from the source (depth, width, caption width/length)."""
    hidden = sd["t_block.1.weight"].shape[1]
    fields = dict(depth=_count_blocks(sd, "blocks."), hidden_size=hidden, num_heads=max(1, hidden // 72),
                  mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                  caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1])
    if "y_embedder.y_embedding" in sd:
        fields["text_tokens"] = sd["y_embedder.y_embedding"].shape[0]
    fields.update(overrides)
    return ReducioDiTConfig(**fields)


def convert_state_dict(source: Mapping[str, torch.Tensor], seed: int = 0, **config_overrides):
    """Returns (Reducio-DiT state dict, config, report dict)."""
    from .model import ReducioDiT

    layout = detect_layout(source)
    try:
        sd = diffusers_to_original(source) if layout == "diffusers" else dict(source)
        config = config_for_source(sd, **config_overrides)
    except KeyError as exc:
        raise ConversionError(f"the PixArt checkpoint ({layout} layout) lacks {exc.args[0]}; it is incomplete or "
                              "not a PixArt-alpha XL/2 checkpoint") from None
    except (IndexError, ZeroDivisionError):
        raise ConversionError(f"the PixArt checkpoint ({layout} layout) has tensors of the wrong rank or size zero "
                              "(t_block.1.weight, blocks.0.mlp.fc1.weight, y_embedder.y_proj.fc1.weight must be "
                              "non-empty matrices)") from None
    generator = torch.Generator().manual_seed(seed)
    model = ReducioDiT(config, device="meta")
    model = model.to_empty(device="cpu")
    model.initialize_weights(generator)   # §7.3 for the new modules (and a defined value everywhere)
    target = model.state_dict()

    mapped = [f"blocks.{i}.{part}.{suffix}" for i in range(config.depth) for part in BLOCK_PARTS
              for suffix in (("weight", "bias") if part != "scale_shift_table" else ("",))]
    mapped = [k.rstrip(".") for k in mapped]
    mapped += [f"{m}.{s}" for m in ("t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1",
                                    "y_embedder.y_proj.fc2") for s in ("weight", "bias")]
    mapped += ["final_layer.scale_shift_table"]
    if "y_embedder.y_embedding" in sd:
        mapped.append("y_embedder.y_embedding")
    out = {k: v.detach().clone() for k, v in target.items()}
    for key in mapped:
        if key not in sd:
            raise ConversionError(f"the PixArt checkpoint lacks {key}")
        if tuple(sd[key].shape) != tuple(out[key].shape):
            raise ConversionError(f"{key}: PixArt shape {list(sd[key].shape)} does not fit Reducio-DiT {list(out[key].shape)}")
        out[key] = sd[key].detach().to(torch.float32).clone()
    used = set(mapped)
    ignored = sorted(k for k in source if k not in used) if layout == "original" else []
    report = {"layout": layout, "mapped": len(mapped), "new": len(out) - len(mapped), "ignored": ignored,
              "unknown_source_keys": [k for k in ignored if not k.startswith(IGNORED_PREFIXES)]}
    return out, config, report


def convert_file(in_path, out_path, *, overwrite: bool = False, dtype: torch.dtype | None = None, seed: int = 0,
                 **config_overrides) -> dict:
    out_path = os.fspath(out_path)
    if not out_path.endswith(".safetensors"):
        raise ConversionError("the output file name must end in .safetensors")
    if os.path.exists(out_path) and same_file(in_path, out_path):
        raise FileExistsError(f"the output {out_path} is the input file; choose another output name (--force never "
                              "replaces the source)")
    if os.path.exists(out_path) and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass --force to replace it")
    state_dict, config, report = convert_state_dict(read_source(in_path), seed=seed, **config_overrides)
    save_checkpoint(state_dict, out_path, config=config, dtype=dtype,
                    extra_metadata={"converted_from": os.path.basename(os.fspath(in_path)),
                                    "conversion": "pixart-alpha -> reducio-dit (spec §7)"})
    return {**report, "format": FORMAT_NAME, "parameters": sum(t.numel() for t in state_dict.values())}


def _parse_patch(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("patch size is three comma-separated ints, e.g. 1,1,1")
    return tuple(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reducio.convert pixart",
                                     description="PixArt-alpha XL/2 checkpoint -> Reducio-DiT initialisation")
    parser.add_argument("input", help="PixArt-alpha .pth / .safetensors (original or diffusers layout)")
    parser.add_argument("output", help="output .safetensors")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="storage precision (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the newly initialised weights")
    parser.add_argument("--patch-size", type=_parse_patch, default=(1, 1, 1), help="motion-latent patch (pt,ph,pw)")
    parser.add_argument("--in-channels", type=int, default=16, help="Reducio VAE latent channels")
    parser.add_argument("--latent-frames", type=int, default=4, help="T': 4 for the ft4 VAE, 8 for ft2")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        report = convert_file(args.input, args.output, overwrite=args.force,
                              dtype=DTYPES[args.dtype] if args.dtype else None, seed=args.seed,
                              patch_size=args.patch_size, in_channels=args.in_channels,
                              latent_frames=args.latent_frames)
    except (ConversionError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {report['mapped']} tensors copied from PixArt ({report['layout']} layout), "
          f"{report['new']} initialised new, {report['parameters']:,} parameters")
    if report["unknown_source_keys"]:
        print(f"note: {len(report['unknown_source_keys'])} unrecognised source keys were ignored: "
              f"{report['unknown_source_keys'][:5]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
