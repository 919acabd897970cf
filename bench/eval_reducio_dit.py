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
  its content frame);
* **zoom and roll captions** (``--zoom-roll-images``): "the camera zooms in / out on the <photo> photo",
  "the camera rolls clockwise / counterclockwise over the <photo> photo"; the zoom or roll read off the
  decoded clip (:func:`reducio.vae.motion.zoom_roll_direction`: a similarity transform fitted to tile
  shifts) must be the caption's. Chance is 1 in 4 (a still or panning result counts as wrong). Only a
  VAE whose latent holds zooms and rolls (``latent_motion`` 'measured-similarity+objects') can pass;
* **sprite captions** (``--sprite-images``): for held-out content images that show one sprite, the
  caption "a still view of the <photo> photo; a <colour> <shape> moves <direction>" for each of the
  four directions; the sprite's colour, tracked through the decoded clip
  (:func:`reducio.metrics.sprite_direction`), must move that way. Chance is 1 in 4 again. The
  held-out sprite colours (cyan, orange) are words no training caption contains.

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
from reducio.data.synthetic import COLOURS, PHOTOS
from reducio.dit import ReducioDiT
from reducio.dit.checkpoint import load_checkpoint
from reducio.metrics import pan_direction, psnr, sprite_direction
from reducio.pipeline import Conditions, generate_video
from reducio.train.encoders import make_encoders
from reducio.vae import ReducioVAE
from reducio.vae.motion import zoom_roll_direction

BENCH = Path(__file__).resolve().parent
DIRECTIONS = ("left", "right", "up", "down")
CONTENT_INDEX = 7


def conditions(encoders, caption: str, image: torch.Tensor) -> Conditions:
    text, mask = encoders.encode_text([caption])
    return Conditions(text=text.float(), text_mask=mask.float(), clip=encoders.encode_clip(image).float(),
                      content_latent=encoders.encode_content(image).float())


def evaluate_captions(model: ReducioDiT, vae: ReducioVAE, encoders, cases: list, seed: int, steps: int | None,
                      read) -> tuple[dict, dict]:
    """Generate one clip per case (image index, image, expected reading, caption) and read its motion with
    ``read(video [3, T, H, W], case)``: ({"hits", "total", "found" {reading: n}, "by_expected" {expected:
    {reading: n}}, "drift" [frame-7 PSNR]}, {(image index, expected): video})."""
    tally = {"hits": 0, "total": len(cases), "found": {}, "by_expected": {}, "drift": []}
    videos = {}
    for index, image, expected, caption in cases:
        video, _ = generate_video(model, vae, conditions(encoders, caption, image), image, seed=seed + index,
                                  steps=steps)
        video = video.clamp(-1, 1)
        seen = read(video[0], index)
        tally["found"][seen] = tally["found"].get(seen, 0) + 1
        counts = tally["by_expected"].setdefault(expected, {})
        counts[seen] = counts.get(seen, 0) + 1
        tally["hits"] += seen == expected
        tally["drift"].append(float(psnr(video[:, :, CONTENT_INDEX:CONTENT_INDEX + 1], image[:, :, None])))
        videos[(index, expected)] = video
    return tally, videos


def evaluate(model: ReducioDiT, vae: ReducioVAE, encoders, images: list[tuple[str, torch.Tensor]], seed: int,
             steps: int | None) -> tuple[dict, dict]:
    """(summary, {(image index, direction): video}) of one model on every image x pan caption."""
    cases = [(i, image, direction, f"the camera pans {direction} over the {PHOTOS[photo]} photo")
             for i, (photo, image) in enumerate(images) for direction in DIRECTIONS]
    tally, videos = evaluate_captions(model, vae, encoders, cases, seed, steps, lambda video, _: pan_direction(video))
    drift = tally["drift"]
    return {"direction_accuracy": round(tally["hits"] / tally["total"], 3), "samples": tally["total"],
            "directions_seen": {d: tally["found"].get(d, 0) for d in DIRECTIONS + ("still",)},
            "frame7_psnr_mean": round(sum(drift) / len(drift), 2), "frame7_psnr_min": round(min(drift), 2)}, videos


ZOOM_ROLL_CAPTIONS = {"in": "the camera zooms in on the {} photo", "out": "the camera zooms out on the {} photo",
                      "clockwise": "the camera rolls clockwise over the {} photo",
                      "counterclockwise": "the camera rolls counterclockwise over the {} photo"}


def evaluate_zoom_roll(model: ReducioDiT, vae: ReducioVAE, encoders, images: list[tuple[str, torch.Tensor]], seed: int,
                       steps: int | None) -> tuple[dict, dict]:
    """(summary, {(image index, direction): video}) of zoom and roll captions, one per image x direction."""
    cases = [(i, image, direction, caption.format(PHOTOS[photo]))
             for i, (photo, image) in enumerate(images) for direction, caption in ZOOM_ROLL_CAPTIONS.items()]
    tally, videos = evaluate_captions(model, vae, encoders, cases, seed, steps,
                                      lambda video, _: zoom_roll_direction(video, CONTENT_INDEX))
    return {"zoom_roll_accuracy": round(tally["hits"] / max(1, tally["total"]), 3), "zoom_roll_samples": tally["total"],
            "zoom_roll_seen": tally["found"],
            "zoom_roll_by_caption": {d: tally["by_expected"].get(d, {}) for d in ZOOM_ROLL_CAPTIONS}}, videos


def sprite_images(size: int, count: int, seed: int) -> list[tuple[str, torch.Tensor, object]]:
    """(photo, content image [1, 3, H, W], its one sprite) of the first ``count`` held-out clips whose
    content frame shows exactly one sprite."""
    data = SyntheticClips(split="heldout", size=size, count=max(1, 40 * count), seed=seed + 1)
    found = []
    for i in range(len(data)):
        spec = data.spec(i)
        if len(spec.sprites) == 1 and len(found) < count:
            found.append((spec.photo, data[i]["video"][None, :, CONTENT_INDEX], spec.sprites[0]))
    return found


def evaluate_sprites(model: ReducioDiT, vae: ReducioVAE, encoders, images: list, seed: int,
                     steps: int | None) -> tuple[dict, dict]:
    """(summary, {(image index, direction): video}) of sprite captions, one per image x direction."""
    cases = [(i, image, direction, f"a still view of the {PHOTOS[photo]} photo; a {sprite.colour} {sprite.shape} "
                                   f"moves {direction}")
             for i, (photo, image, sprite) in enumerate(images) for direction in DIRECTIONS]
    tally, videos = evaluate_captions(model, vae, encoders, cases, seed, steps,
                                      lambda video, i: sprite_direction(video, COLOURS[images[i][2].colour]))
    return {"sprite_accuracy": round(tally["hits"] / max(1, tally["total"]), 3), "sprite_samples": tally["total"],
            "sprite_directions_seen": tally["found"]}, videos


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", required=True, type=Path)
    parser.add_argument("--vae", required=True, type=Path)
    parser.add_argument("--encoders", default="builtin", help="the --encoders the DiT's features were made with")
    parser.add_argument("--images", type=int, default=8, help="held-out content images (x 4 directions)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--sprite-images", type=int, default=4,
                        help="held-out content images with one sprite (x 4 sprite captions); 0 skips them")
    parser.add_argument("--zoom-roll-images", type=int, default=4,
                        help="held-out content images (x 2 zoom and 2 roll captions); 0 skips them")
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
    zoom_roll_videos = {}
    if args.zoom_roll_images > 0:
        zoom_roll, zoom_roll_videos = evaluate_zoom_roll(model, vae, encoders, images[:args.zoom_roll_images],
                                                         args.seed, args.steps)
        trained.update(zoom_roll)
        baseline.update(evaluate_zoom_roll(untrained, vae, encoders, images[:args.zoom_roll_images], args.seed,
                                           args.steps)[0])
    with_sprite = sprite_images(args.size, args.sprite_images, args.seed) if args.sprite_images > 0 else []
    if with_sprite:
        sprites, sprite_videos = evaluate_sprites(model, vae, encoders, with_sprite, args.seed, args.steps)
        trained.update(sprites)
        baseline.update(evaluate_sprites(untrained, vae, encoders, with_sprite, args.seed, args.steps)[0])
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
    if zoom_roll_videos:
        lines += ["", f"Zoom and roll captions: the first {args.zoom_roll_images} of those images x 4 captions "
                  "(\"the camera zooms in / out on the <photo> photo\", \"the camera rolls clockwise / counterclockwise "
                  "over the <photo> photo\"), the zoom or roll read off the clip (`reducio.vae.motion.zoom_roll_direction`)."
                  " Chance is 25 %.", "",
                  "| model | zoom / roll accuracy | read, per caption |", "| --- | --- | --- |"]
        for name, r in (("trained", trained), ("untrained (same architecture)", baseline)):
            seen = "; ".join(f"{caption}: " + ", ".join(f"{k} {v}" for k, v in sorted(read.items()))
                             for caption, read in r["zoom_roll_by_caption"].items())
            lines.append(f"| {name} | {r['zoom_roll_accuracy']:.0%} | {seen} |")
        save_contact_sheet(args.out.parent / (args.out.name + "_zoom_roll.png"),
                           [("content image", images[0][1][:, :, None].expand(-1, -1, 16, -1, -1))]
                           + [(f"{'zooms' if d in ('in', 'out') else 'rolls'} {d}", zoom_roll_videos[(0, d)])
                              for d in ZOOM_ROLL_CAPTIONS],
                           caption=f"held-out image 0 ({PHOTOS[images[0][0]]}), one zoom / roll caption per row | "
                                   f"accuracy {trained['zoom_roll_accuracy']:.0%} (untrained "
                                   f"{baseline['zoom_roll_accuracy']:.0%})")
        lines += ["", f"Contact sheet of zoom and roll captions: [{args.out.name}_zoom_roll.png]"
                  f"({args.out.name}_zoom_roll.png)."]
    if with_sprite:
        lines += ["", f"Sprite captions: {len(with_sprite)} held-out images with one sprite x 4 captions "
                  "(\"a still view of the <photo> photo; a <colour> <shape> moves <direction>\"), the sprite's colour "
                  "tracked through the clip. Chance is 25 %.", "",
                  "| model | sprite accuracy | sprite directions read |", "| --- | --- | --- |"]
        for name, r in (("trained", trained), ("untrained (same architecture)", baseline)):
            seen = ", ".join(f"{k} {v}" for k, v in sorted(r["sprite_directions_seen"].items()))
            lines.append(f"| {name} | {r['sprite_accuracy']:.0%} | {seen} |")
        photo, image, sprite = with_sprite[0]
        save_contact_sheet(args.out.parent / (args.out.name + "_sprites.png"),
                           [("content image", image[:, :, None].expand(-1, -1, 16, -1, -1))]
                           + [(f"moves {d}", sprite_videos[(0, d)]) for d in DIRECTIONS],
                           caption=f"held-out image with a {sprite.colour} {sprite.shape}, one sprite caption per "
                                   f"row | sprite accuracy {trained['sprite_accuracy']:.0%} (untrained "
                                   f"{baseline['sprite_accuracy']:.0%})")
        lines += ["", f"Contact sheet of sprite captions: [{args.out.name}_sprites.png]({args.out.name}_sprites.png)."]
    write_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
