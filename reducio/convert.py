"""Command-line converters.

    python -m reducio.convert vae IN.ckpt OUT.safetensors [--force] [--dtype fp32|fp16|bf16]
    python -m reducio.convert dit IN.safetensors OUT.safetensors --dtype bf16 [--force]
    python -m reducio.convert pixart ...   (handled by reducio.dit.convert_pixart)

``vae`` reads an official Reducio-VAE checkpoint safely (``torch.load(weights_only=True)``; training
``loss.*`` tensors dropped), checks it strictly against the detected ft4/ft2 model and writes a
.safetensors file with the model configuration in its metadata, through a temporary file and an
atomic rename. ``dit`` re-stores a Reducio-DiT checkpoint (e.g. a training run's ``ema.safetensors``)
in another precision, checked strictly, config kept (how the embedded tiny DiT is stored in bf16). An
existing output is only replaced with ``--force``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _run_vae(args: argparse.Namespace) -> int:
    import torch

    from .validation import parse_json_object
    from .vae.checkpoint import CheckpointError, convert_to_safetensors

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        config = parse_json_object(Path(args.config).read_text(), f"the config file {args.config}") if args.config else None
        meta = convert_to_safetensors(args.input, args.output, overwrite=args.force, dtype=dtype, config=config)
    except (CheckpointError, FileExistsError, FileNotFoundError, UnicodeDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} (Reducio VAE {meta['reducio_variant']}, config in metadata)")
    return 0


def _run_dit(args: argparse.Namespace) -> int:
    import torch

    from .dit.checkpoint import load_checkpoint, save_checkpoint
    from .validation import CheckpointError, ConfigError

    if Path(args.output).exists() and not args.force:
        print(f"error: {args.output} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        model = load_checkpoint(args.input, dtype=torch.float32)
    except (CheckpointError, ConfigError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_checkpoint(model, args.output, dtype=getattr(torch, DTYPES[args.dtype]))
    print(f"wrote {args.output} (Reducio-DiT, {args.dtype}, config in metadata)")
    return 0


def _run_pixart(rest: Sequence[str]) -> int:
    try:
        from .dit.convert_pixart import main as pixart_main
    except ImportError as exc:
        print(f"error: the PixArt converter is not available in this installation (reducio.dit.convert_pixart "
              f"could not be imported: {exc})", file=sys.stderr)
        return 2
    result = pixart_main(list(rest))
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reducio.convert", description="Reducio checkpoint converters")
    commands = parser.add_subparsers(dest="command", required=True)
    vae = commands.add_parser("vae", help="official Reducio-VAE .ckpt/.pt -> .safetensors with config metadata")
    vae.add_argument("input", help="official checkpoint (.ckpt, .pt, .pth) or a .safetensors file")
    vae.add_argument("output", help="output .safetensors path")
    vae.add_argument("--force", action="store_true", help="replace an existing output file")
    vae.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="store the weights in this precision (default: as in the input, fp32 for official files)")
    vae.add_argument("--config", default=None,
                     help="JSON file with the constructor kwargs, for non-official models (default: detect ft4/ft2)")
    dit = commands.add_parser("dit", help="a Reducio-DiT checkpoint stored in another precision")
    dit.add_argument("input", help="Reducio-DiT .safetensors (config in its metadata)")
    dit.add_argument("output", help="output .safetensors path")
    dit.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    dit.add_argument("--force", action="store_true", help="replace an existing output file")
    commands.add_parser("pixart", help="PixArt weights for Reducio-DiT (arguments passed through)",
                        add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "pixart":
        return _run_pixart(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "vae":
        if not str(args.output).endswith(".safetensors"):
            print("error: the output file name must end in .safetensors", file=sys.stderr)
            return 2
        return _run_vae(args)
    if args.command == "dit":
        return _run_dit(args)
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":
    sys.exit(main())
