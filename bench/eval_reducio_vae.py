"""Reducio VAE quality on held-out synthetic clips, beside two baselines on the same clips.

    .venv/bin/python -m bench.eval_reducio_vae --vae models/reducio/reducio_tiny_vae.safetensors

For each held-out clip (photographs and sprite colours no training clip contains) at the trained size
and at 2x that size: PSNR and SSIM of

* the VAE's reconstruction (posterior mean -> decode with the clip's own content frame);
* baseline (a): the content frame repeated 16 times -- what a latent that carries no motion gives;
* baseline (b): the same architecture untrained (seeded initialisation), same content frames;
* ceilings from the clip's own recipe (``SyntheticClips``), what a decoder that moves the content
  frame could reach if it knew the motion exactly: (c) the content frame moved by the camera's exact
  motion; (d) that with the sprites painted where they really are in each frame (the sprites of the
  content frame stay as ghosts); (e) that with the ghosts' holes first filled from their surroundings
  (harmonic inpainting of the content frame). The gaps between them say what is left to learn.

Writes bench/reducio_vae_quality.json and .md, and a contact sheet (input | reconstruction |
difference) of the first clips to bench/reducio_vae_quality.png. Also counts the pan clips whose
reconstruction pans the way the input does: a decoder that repeats the content frame scores zero there
however close its PSNR is to baseline (a).
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from bench.report import write_report
from reducio.contact_sheet import difference, save_contact_sheet
from reducio.data import SyntheticClips
from reducio.data.synthetic import COLOURS, composite_sprites, sprite_alpha
from reducio.metrics import pan_direction, psnr, sprite_direction, ssim
from reducio.vae import ReducioVAE
from reducio.vae.blocks import warp_frames

BENCH = Path(__file__).resolve().parent
CONTENT_INDEX = 7


def reconstruct(vae: ReducioVAE, video: torch.Tensor) -> torch.Tensor:
    latent = vae.encode(video, tiling=False)
    return vae.decode(latent, video[:, :, CONTENT_INDEX], tiling=False).clamp(-1, 1)


def fill_holes(image: torch.Tensor, hole: torch.Tensor, iterations: int = 400) -> torch.Tensor:
    """``image`` [3, H, W] with the pixels where ``hole`` [H, W] is True replaced by a harmonic fill from
    their surroundings (repeated averaging of the four neighbours, the rest held fixed)."""
    out = image.clone()
    out[:, hole] = image[:, ~hole].mean(1, keepdim=True)
    kernel = torch.tensor([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]]).reshape(1, 1, 3, 3).repeat(3, 1, 1, 1)
    for _ in range(iterations):
        average = torch.nn.functional.conv2d(torch.nn.functional.pad(out[None], (1, 1, 1, 1), mode="replicate"),
                                             kernel, groups=3)[0]
        out[:, hole] = average[:, hole]
    return out


def ceilings(data: SyntheticClips, index: int, video: torch.Tensor) -> dict:
    """(c), (d), (e) of the module docstring for one clip ``[1, 3, T, H, W]`` in [-1, 1]."""
    spec = data.spec(index)
    content = video[0, :, CONTENT_INDEX]
    flow = data.camera_flow(spec, CONTENT_INDEX)[None]

    def moved(frame: torch.Tensor) -> torch.Tensor:          # [3, H, W] -> [T, 3, H, W] in [0, 1]
        return ((warp_frames(frame[None], flow)[0] + 1) / 2).transpose(0, 1)

    def as_clip(frames: torch.Tensor) -> torch.Tensor:
        return (frames.clamp(0, 1) * 2 - 1).transpose(0, 1)[None]

    hole = torch.zeros(spec.size, dtype=torch.bool)
    for sprite in spec.sprites:      # the content frame's sprites, one pixel wider for their soft edge
        alpha = sprite_alpha(sprite, spec.size, CONTENT_INDEX + 1)[CONTENT_INDEX, 0]
        hole |= torch.nn.functional.max_pool2d(alpha[None, None], 3, 1, 1)[0, 0] > 0
    filled = fill_holes(content, hole) if hole.any() else content
    camera = moved(content)
    return {"camera_exact": as_clip(camera), "camera_and_sprites": as_clip(composite_sprites(camera, spec)),
            "holes_filled": as_clip(composite_sprites(moved(filled), spec))}


CEILINGS = ("camera_exact", "camera_and_sprites", "holes_filled")


def evaluate(vae: ReducioVAE, untrained: ReducioVAE, size: int, clips: int, seed: int, sheet: Path | None) -> dict:
    data = SyntheticClips(split="heldout", size=size, count=clips, seed=seed)
    rows = {"vae": [], "repeat_content": [], "untrained": [], **{name: [] for name in CEILINGS}}
    pans = {name: 0 for name in rows}     # pan clips whose output pans the same way as the input
    pan_clips = 0
    input_pans = 0                         # pan clips whose input itself measures as captioned (the ceiling)
    # sprites that move as captioned in the output; the camera alone moves some of them the captioned way
    sprites = {"vae": 0, "input": 0, "camera_exact": 0}
    sprite_count = 0
    spread, noise = [], []                 # posterior: how the mean varies, how large the std is
    sprites_per_clip = []
    for i in range(clips):
        video = data[i]["video"][None]
        with torch.no_grad():
            posterior = vae.encode_3d(video)
        spread.append(float(posterior.mean.std()))
        noise.append(float(posterior.std.mean()))
        outputs = {"vae": reconstruct(vae, video),
                   "repeat_content": video[:, :, CONTENT_INDEX:CONTENT_INDEX + 1].expand_as(video),
                   "untrained": reconstruct(untrained, video), **ceilings(data, i, video)}
        spec = data.spec(i)
        sprites_per_clip.append(len(spec.sprites))
        for sprite in spec.sprites:
            sprite_count += 1
            colour = COLOURS[sprite.colour]
            for name, clip in (("vae", outputs["vae"]), ("input", video), ("camera_exact", outputs["camera_exact"])):
                sprites[name] += sprite_direction(clip[0], colour) == sprite.direction
        pan_clips += spec.camera == "pan"
        input_pans += spec.camera == "pan" and pan_direction(video[0]) == spec.direction
        for name, out in outputs.items():
            rows[name].append((float(psnr(video, out)), float(ssim(video, out)), mse(video, out)))
            pans[name] += spec.camera == "pan" and pan_direction(out[0]) == spec.direction
        if sheet is not None and i == 0:
            save_contact_sheet(sheet, [("input", video), ("reconstruction", outputs["vae"]),
                                       ("|difference| x4", difference(video, outputs["vae"])),
                                       ("content repeated", outputs["repeat_content"])],
                               caption=f"held-out clip 0 at {size}px: {data[0]['caption']}  |  PSNR "
                                       f"{rows['vae'][0][0]:.1f} dB (content repeated: {rows['repeat_content'][0][0]:.1f} dB)")
    summary = {}
    for name, values in rows.items():
        p = torch.tensor([v[0] for v in values])
        s = torch.tensor([v[1] for v in values])
        summary[name] = {"psnr": pooled_psnr([v[2] for v in values]),
                         "psnr_mean": round(float(p.mean()), 2), "psnr_min": round(float(p.min()), 2),
                         "ssim_mean": round(float(s.mean()), 4),
                         "pan_followed": f"{pans[name]}/{pan_clips}"}
    # a posterior std near 1 against a mean that varies little means that a sampled latent is mostly
    # noise: the decoder learns to ignore it (posterior collapse, docs/embedded_models.md)
    summary["posterior"] = {"mean_spread": round(sum(spread) / clips, 4), "std_mean": round(sum(noise) / clips, 4)}
    summary["input_pan_measured"] = f"{input_pans}/{pan_clips}"
    summary["sprites_followed"] = {name: f"{count}/{sprite_count}" for name, count in sprites.items()}
    # pooled PSNR by the number of sprites in the clip: where the error is
    summary["psnr_by_sprites"] = {
        name: {str(n): {"clips": sprites_per_clip.count(n),
                        "psnr": pooled_psnr([v[2] for v, k in zip(rows[name], sprites_per_clip) if k == n])}
               for n in sorted(set(sprites_per_clip))}
        for name in ("vae", "repeat_content", "holes_filled")}
    return {"size": size, "clips": clips, **summary,
            "gain_over_repeat_db": round(summary["vae"]["psnr"] - summary["repeat_content"]["psnr"], 2)}


def pooled_psnr(mses: list[float]) -> float:
    """PSNR of the squared error pooled over clips (their mean MSE), rounded to 0.01 dB."""
    return round(10 * math.log10(1.0 / max(sum(mses) / len(mses), 1e-12)), 2)


def mse(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Mean squared error on [0, 1] values (what the pooled PSNR averages)."""
    return float((((reference + 1) / 2).clamp(0, 1) - ((estimate + 1) / 2).clamp(0, 1)).pow(2).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, type=Path)
    parser.add_argument("--size", type=int, default=64, help="the trained clip size")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", type=Path, default=BENCH / "reducio_vae_quality")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    vae = ReducioVAE.from_pretrained(str(args.vae)).eval()
    torch.manual_seed(0)
    untrained = ReducioVAE(**vae.config).eval()
    started = time.time()
    results = [evaluate(vae, untrained, args.size, args.clips, args.seed, args.out.with_suffix(".png")),
               evaluate(vae, untrained, 2 * args.size, max(4, args.clips // 4), args.seed, None)]
    report = {"vae": str(args.vae), "split": "heldout", "seed": args.seed, "results": results,
              "seconds": round(time.time() - started, 1), "machine": platform.processor() or platform.machine()}
    lines = ["# Reducio VAE quality on held-out synthetic clips", "",
             f"`python -m bench.eval_reducio_vae --vae {args.vae} --size {args.size} --clips {args.clips}`; "
             "PSNR on [0, 1] values from the squared error pooled over all clips (a per-clip mean would be "
             "dominated by the odd clip that does not move, where (a) is exact: 120 dB); the per-clip minimum "
             "beside it. SSIM per clip, averaged. (a) = the content frame repeated 16 times; "
             "(b) = the same architecture untrained. *Pans followed*: of the clips whose camera pans, those "
             "whose reconstruction pans the same way (phase correlation, `reducio.metrics.pan_direction`) -- "
             "whether the latent carries the motion at all; in brackets, the pans measured so on the input itself "
             "(a sprite can outweigh a slow pan, so this is the most any model can score). *Sprites followed*: "
             "of the sprites, those whose colour moves the captioned way in the output (`reducio.metrics."
             "sprite_direction`); in brackets, on the input itself, and then with the camera's exact motion alone "
             "(ceiling (c) below: a decoder that moves only the camera gets these).", "",
             "| size | clips | VAE PSNR (worst clip) | VAE SSIM | pans followed | sprites followed | (a) PSNR | (a) SSIM "
             "| (b) PSNR | gain over (a) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    posterior = results[0]["posterior"]
    lines[-2:-2] = [f"Posterior at {results[0]['size']} px: its mean varies by {posterior['mean_spread']} (std over "
                    f"the latent), its std is {posterior['std_mean']} on average.", ""]
    for r in results:
        lines.append(f"| {r['size']} px | {r['clips']} | {r['vae']['psnr']} dB ({r['vae']['psnr_min']}) | "
                     f"{r['vae']['ssim_mean']} | {r['vae']['pan_followed']} ({r['input_pan_measured']}) | "
                     f"{r['sprites_followed']['vae']} ({r['sprites_followed']['input']}; "
                     f"{r['sprites_followed']['camera_exact']}) | "
                     f"{r['repeat_content']['psnr']} dB | "
                     f"{r['repeat_content']['ssim_mean']} | {r['untrained']['psnr']} dB | "
                     f"{r['gain_over_repeat_db']} dB |")
    lines += ["", "PSNR by the number of sprites in the clip (pooled as above; clips in brackets): VAE / (a) content "
              "repeated / (e) ceiling.", "", "| size | no sprite | one sprite | two sprites |", "| --- | --- | --- | --- |"]
    for r in results:
        by = r["psnr_by_sprites"]
        cells = [f"{by['vae'][n]['psnr']} / {by['repeat_content'][n]['psnr']} / {by['holes_filled'][n]['psnr']} dB "
                 f"({by['vae'][n]['clips']})" if n in by["vae"] else "-" for n in ("0", "1", "2")]
        lines.append(f"| {r['size']} px | " + " | ".join(cells) + " |")
    lines += ["", "Ceilings on the same clips, from each clip's own recipe: what a decoder that moves the content "
              "frame reaches if it knows the motion exactly (module docstring).", "",
              "| size | (c) camera exact | (d) + sprites where they are | (e) + the ghosts' holes filled |",
              "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['size']} px | {r['camera_exact']['psnr']} dB / {r['camera_exact']['ssim_mean']} | "
                     f"{r['camera_and_sprites']['psnr']} dB / {r['camera_and_sprites']['ssim_mean']} | "
                     f"{r['holes_filled']['psnr']} dB / {r['holes_filled']['ssim_mean']} |")
    write_report(args.out, report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
