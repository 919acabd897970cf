"""Does the Reducio-DiT follow its caption? Direction accuracy and content drift on held-out images.

    .venv/bin/python -m bench.eval_reducio_dit --dit runs/dit/final/model.safetensors \
        --vae models/reducio/reducio_tiny_vae.safetensors [--encoders builtin | package.module:factory]

For each held-out content image (frame 7 of a held-out synthetic clip: a photograph and sprite
colours no training clip contains) and each of the four pan directions, the caption "the camera pans
<direction> over the <photo> photo" is sampled with the model's own inference settings and decoded
with its VAE. Measured on the decoded clip:

* **direction**: the camera direction read off the video (phase correlation of consecutive frames,
  :func:`reducio.metrics.pan_direction`) equals the caption's; chance is 1 in 4 (a still result
  counts as wrong);
* **frame-7 drift**: PSNR of the generated frame 7 against the content image (the video must keep
  its content frame).

Both beside the same architecture untrained (seeded initialisation) on the same images, captions and
noise. Use the encoders the DiT was trained with (``--encoders``, as given to ``reducio.train
encode``). Writes bench/reducio_dit_quality.{json,md,png}.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench.report import write_report
from reducio.contact_sheet import save_contact_sheet
from reducio.data import SyntheticClips
from reducio.data.synthetic import PHOTOS
from reducio.dit import ReducioDiT
from reducio.dit.checkpoint import load_checkpoint
from reducio.metrics import pan_direction, psnr
from reducio.pipeline import Conditions, generate_video
from reducio.train.encoders import make_encoders
from reducio.vae import ReducioVAE

BENCH = Path(__file__).resolve().parent
DIRECTIONS = ("left", "right", "up", "down")
CONTENT_INDEX = 7


def conditions(encoders, caption: str, image: torch.Tensor) -> Conditions:
    text, mask = encoders.encode_text([caption])
    return Conditions(text=text.float(), text_mask=mask.float(), clip=encoders.encode_clip(image).float(),
                      content_latent=encoders.encode_content(image).float())


def evaluate(model: ReducioDiT, vae: ReducioVAE, encoders, images: list[tuple[str, torch.Tensor]], seed: int,
             steps: int | None) -> tuple[dict, dict]:
    """(summary, {(image index, direction): video}) of one model on every image x direction."""
    hits, drift, videos, found = 0, [], {}, {d: 0 for d in DIRECTIONS + ("still",)}
    for i, (photo, image) in enumerate(images):
        for direction in DIRECTIONS:
            caption = f"the camera pans {direction} over the {PHOTOS[photo]} photo"
            video, _ = generate_video(model, vae, conditions(encoders, caption, image), image, seed=seed + i,
                                      steps=steps)
            video = video.clamp(-1, 1)
            seen = pan_direction(video[0])
            found[seen] += 1
            hits += seen == direction
            drift.append(float(psnr(video[:, :, CONTENT_INDEX:CONTENT_INDEX + 1], image[:, :, None])))
            videos[(i, direction)] = video
    total = len(images) * len(DIRECTIONS)
    return {"direction_accuracy": round(hits / total, 3), "samples": total, "directions_seen": found,
            "frame7_psnr_mean": round(sum(drift) / len(drift), 2), "frame7_psnr_min": round(min(drift), 2)}, videos


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", required=True, type=Path)
    parser.add_argument("--vae", required=True, type=Path)
    parser.add_argument("--encoders", default="builtin", help="the --encoders the DiT's features were made with")
    parser.add_argument("--images", type=int, default=8, help="held-out content images (x 4 directions)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--out", type=Path, default=BENCH / "reducio_dit_quality")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_checkpoint(args.dit).float().eval()
    vae = ReducioVAE.from_pretrained(str(args.vae)).eval()
    torch.manual_seed(0)
    untrained = ReducioDiT(model.config).float().eval()
    encoders = make_encoders(args.encoders, model.config)
    data = SyntheticClips(split="heldout", size=args.size, count=args.images, seed=args.seed)
    images = [(data.spec(i).photo, data[i]["video"][None, :, CONTENT_INDEX]) for i in range(args.images)]
    started = time.time()
    trained, videos = evaluate(model, vae, encoders, images, args.seed, args.steps)
    baseline, _ = evaluate(untrained, vae, encoders, images, args.seed, args.steps)
    report = {"dit": str(args.dit), "vae": str(args.vae), "encoders": args.encoders, "images": args.images,
              "size": args.size, "seed": args.seed, "trained": trained, "untrained": baseline,
              "seconds": round(time.time() - started, 1), "machine": platform.processor() or platform.machine()}
    columns = [("content image", images[0][1][:, :, None].expand(-1, -1, 16, -1, -1))]
    columns += [(f"caption: pans {d}", videos[(0, d)]) for d in DIRECTIONS]
    save_contact_sheet(args.out.with_suffix(".png"), columns,
                       caption=f"held-out image 0 ({PHOTOS[images[0][0]]}), one caption per row | direction "
                               f"accuracy {trained['direction_accuracy']:.0%} (untrained "
                               f"{baseline['direction_accuracy']:.0%})")
    lines = ["# Reducio-DiT: does the motion follow the caption?", "",
             f"`python -m bench.eval_reducio_dit --dit {args.dit} --vae {args.vae} --encoders {args.encoders} "
             f"--images {args.images}`; {args.images} held-out images x 4 pan captions. Chance is 25 %.", "",
             "| model | direction accuracy | directions read (left/right/up/down/still) | frame-7 PSNR (min) |",
             "| --- | --- | --- | --- |"]
    for name, r in (("trained", trained), ("untrained (same architecture)", baseline)):
        seen = "/".join(str(r["directions_seen"][d]) for d in DIRECTIONS + ("still",))
        lines.append(f"| {name} | {r['direction_accuracy']:.0%} | {seen} | {r['frame7_psnr_mean']} dB "
                     f"({r['frame7_psnr_min']}) |")
    write_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
