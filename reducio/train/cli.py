"""Command line of ``python -m reducio.train``; every default is the official / PixArt value."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ..data import DatasetError, open_dataset
from .errors import TrainingError, TrainingStopped


def _common(p: argparse.ArgumentParser, batch: int, lr: float) -> None:
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, samples, final/)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue the run in --out (or from the checkpoint folder given)")
    p.add_argument("--steps", type=int, required=True, help="train until this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=batch, help="GLOBAL batch (split over processes)")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=0, help="write a preview video every N steps (0: never)")
    p.add_argument("--sample-clips", type=int, default=2)
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--quiet", action="store_true")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' / 'synthetic:heldout' (scikit-image photos) or a folder of videos")
    p.add_argument("--size", default="64", help="clip size in pixels: 64 or HxW")
    p.add_argument("--clips", type=int, default=10000, help="number of synthetic clips")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate clips are sampled at (video folders)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reducio.train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    vae = sub.add_parser("vae", help="train / fine-tune a Reducio VAE (official objective)")
    _data(vae)
    _common(vae, batch=4, lr=2e-5)
    vae.add_argument("--model", default=None, help="preset: tiny (default), tiny-objects, tiny-cells, tiny-composite, tiny-fine, test, ft4, ft2")
    vae.add_argument("--model-config", default=None, help="JSON file with ReducioVAE constructor kwargs")
    vae.add_argument("--init", default=None, help="start from these VAE weights (official .ckpt or .safetensors)")
    vae.add_argument("--init-matching", action="store_true",
                     help="with --init: build --model / --model-config and take only the tensors that match by "
                          "name and shape (the rest start fresh)")
    vae.add_argument("--freeze-latent", action="store_true",
                     help="keep the video encoder (encoder_3d, quant_conv) as it starts: with the same latent_motion "
                          "the latents stay the same, so a DiT trained on them stays valid; the content encoder "
                          "and decoder train")
    vae.add_argument("--kl-weight", type=float, default=1e-6)
    vae.add_argument("--disc-start", type=int, default=10001)
    vae.add_argument("--disc-weight", type=float, default=0.05)
    vae.add_argument("--disc-lr-scale", type=float, default=0.1)
    vae.add_argument("--disc-ndf", type=int, default=64)
    vae.add_argument("--disc-norm", choices=("batch", "group"), default="batch")
    vae.add_argument("--perceptual-weights", default=None, help="LPIPS safetensors (see `lpips`); off without it")
    vae.add_argument("--perceptual-weight", type=float, default=0.1)
    vae.add_argument("--penalty-weight", type=float, default=1.0)
    vae.add_argument("--lr-decay-steps", type=int, default=1_000_000)
    vae.add_argument("--posterior", choices=("sample", "mean"), default="sample",
                     help="what the decoder sees in training: a posterior sample (official) or its mean (ours; "
                          "the tiny preset, whose posterior collapsed when sampled)")
    vae.add_argument("--motion-hint-weight", type=float, default=0.0,
                     help="ours, off by default: pull a warp decoder's latent flow towards each clip's global "
                          "motion (phase correlation); the tiny preset was trained with 0.02")

    enc = sub.add_parser("encode", help="precompute DiT training features into safetensors shards")
    _data(enc)
    enc.add_argument("--vae", required=True, help="Reducio VAE weights (.safetensors / .ckpt)")
    enc.add_argument("--out", required=True, help="feature folder")
    enc.add_argument("--dit-model", default="tiny", help="DiT preset whose condition sizes the encoders produce")
    enc.add_argument("--dit-config", default=None, help="JSON DiT config (overrides --dit-model)")
    enc.add_argument("--encoders", default="builtin", help="'builtin' or 'package.module:factory'")
    enc.add_argument("--latent", choices=("sample", "mean"), default="sample")
    enc.add_argument("--shard-size", type=int, default=256)
    enc.add_argument("--batch-size", type=int, default=8)
    enc.add_argument("--seed", type=int, default=0)
    enc.add_argument("--previews", type=int, default=4, help="clips kept in pixels for DiT previews")
    enc.add_argument("--device", default="auto")
    enc.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is several times faster on CPUs with "
                          "AMX-BF16)")
    enc.add_argument("--force", action="store_true", help="replace an existing feature folder")
    enc.add_argument("--conditions-from", default=None,
                     help="a feature folder of the same data and encoders: take its text, CLIP and content "
                          "features and encode only the motion latents (a new VAE without re-running T5)")
    enc.add_argument("--quiet", action="store_true")

    dit = sub.add_parser("dit", help="train / fine-tune a Reducio-DiT on precomputed features")
    dit.add_argument("--features", required=True, help="folder written by `encode`")
    _common(dit, batch=8, lr=1e-4)
    dit.add_argument("--model", default="tiny", help="preset: tiny, small, XL")
    dit.add_argument("--model-config", default=None, help="JSON ReducioDiTConfig (overrides --model)")
    dit.add_argument("--init", default=None, help="start from a Reducio-DiT checkpoint (e.g. a converted PixArt)")
    dit.add_argument("--init-pixart", default=None, help="start from a PixArt-alpha checkpoint, converted in memory")
    dit.add_argument("--weight-decay", type=float, default=0.03)
    dit.add_argument("--warmup-steps", type=int, default=500)
    dit.add_argument("--ema-decay", type=float, default=0.9999)
    dit.add_argument("--high-noise-weight", type=float, default=1.0,
                     help="ours, 1 (PixArt's plain eps MSE) by default: weight the eps MSE of each step by "
                          "clamp(sigma_t^2, 1, this), so errors about the clean latent at high noise, where only "
                          "the caption can tell, count (the embedded tiny DiT: 100)")
    dit.add_argument("--gradient-checkpointing", action="store_true")
    dit.add_argument("--vae", default=None, help="VAE weights for decoding preview samples")
    dit.add_argument("--sample-steps", type=int, default=20)
    dit.set_defaults(grad_clip=1.0)

    lp = sub.add_parser("lpips", help="build the LPIPS weight file for --perceptual-weights")
    lp.add_argument("--vgg", required=True, help="torchvision vgg16 weights (vgg16-397923af.pth)")
    lp.add_argument("--lin", required=True, help="LPIPS linear layers (vgg.pth of the lpips / taming package)")
    lp.add_argument("--out", required=True)
    return parser


def settings_from_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "command"}


def run_command(args: argparse.Namespace) -> dict:
    from . import distributed

    settings = settings_from_args(args)
    if args.command == "lpips":
        from .perceptual import convert_lpips

        convert_lpips(args.vgg, args.lin, args.out)
        return {"out": args.out}
    dist = distributed.setup(settings.get("device", "auto"))
    try:
        if args.command == "vae":
            from .vae_trainer import VAETrainer

            dataset = open_dataset(args.data, size=args.size, seed=args.seed, count=args.clips, fps=args.fps)
            return VAETrainer(settings, dataset, dist).run()
        if args.command == "encode":
            from .features import encode_features

            return encode_features(settings, dist)
        if args.command == "dit":
            from .dit_trainer import DiTTrainer
            from .features import FeatureShards

            return DiTTrainer(settings, FeatureShards(args.features), dist).run()
    finally:
        distributed.teardown(dist)
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_command(args)
    except TrainingStopped as exc:
        print(f"reducio.train {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except (TrainingError, DatasetError) as exc:
        print(f"reducio.train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False):
        print(json.dumps(result, default=str))
    return 0
