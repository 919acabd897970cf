"""Data, diffusion, sampling and training of `bench.image_dit.ImageDiT` (the DiTFastAttn quality model).

Data: random square crops of the scikit-image photographs that reducio's synthetic clips use (bundled
with scikit-image, nothing downloaded), scaled to 64x64, mirrored at random; the class is the
photograph. Diffusion: DiT's DDPM (1,000 steps, linear betas 1e-4..0.02, epsilon MSE, 10 % class
dropout for CFG). Sampling: DDIM (eta 0) with CFG, cond and uncond in one batch (cond first).

Train (resumes from --out when a checkpoint is there; Ctrl-C saves after the current step), then export:
    python -m bench.image_dit_train --out runs/image_dit --steps 1750 --batch 16 --lr 6e-4 --save-every 250
    python -m bench.image_dit_train --out runs/image_dit --export bench/models/image_dit_64px.safetensors
The shipped weights are the EMA of that run at step 1,750 in bf16 (bench/fastattn_quality.md: data,
wall time, figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.image_dit import ImageDiT, ImageDiTConfig
from reducio.data.synthetic import PHOTOS, load_photo
from reducio.files import atomic_write_safetensors, read_safetensors_header, read_safetensors_tensors

TRAIN_STEPS = 1000
CLASS_DROPOUT = 0.1
SHIPPED = Path(__file__).resolve().parent / "models" / "image_dit_64px.safetensors"


def photo_names() -> list[str]:
    """Class index -> photograph (the order of reducio's PHOTOS)."""
    return list(PHOTOS)


class PhotoCrops:
    """Random crops (side 64 px .. 90 % of the photo's short side) of every photo, resized to `size`."""

    def __init__(self, size: int = 64):
        self.size = size
        self.photos = [load_photo(name) * 2 - 1 for name in photo_names()]

    def batch(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(len(self.photos), (count,), generator=generator)
        images = []
        for label in labels.tolist():
            photo = self.photos[label]
            _, h, w = photo.shape
            short = min(h, w)
            low, high = self.size, max(self.size + 1, int(0.9 * short))
            side = int(torch.randint(low, high, (1,), generator=generator))
            top = int(torch.randint(h - side + 1, (1,), generator=generator))
            left = int(torch.randint(w - side + 1, (1,), generator=generator))
            crop = photo[None, :, top:top + side, left:left + side]
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                                 align_corners=False)[0]
            if torch.rand((), generator=generator) < 0.5:
                crop = crop.flip(-1)
            images.append(crop)
        return torch.stack(images), labels


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, TRAIN_STEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def ddim_timesteps(steps: int) -> list[int]:
    """`steps` evenly spaced training timesteps, high to low (DDIM's "leading" spacing)."""
    stride = TRAIN_STEPS // steps
    return list(range(0, TRAIN_STEPS, stride))[:steps][::-1]


# attend_for(step, rows) -> the model's attention core at that step, or None for plain SDPA
AttendFor = Callable[[int, int], Optional[Callable]]


class DDIMSampler:
    """DDIM (eta 0) with CFG from a fixed start noise; cond and uncond in one batch, cond first.

    `model_output(step)` and `advance(step, output)` are the two halves of a step, so that a
    step-by-step calibration (DiTFastAttn V1) can try a step several times and commit it once."""

    def __init__(self, model: ImageDiT, labels: torch.Tensor, noise: torch.Tensor, steps: int = 20,
                 cfg: float = 4.0):
        self.model, self.cfg, self.noise = model, float(cfg), noise
        self.times = ddim_timesteps(steps)
        self.abar = alphas_cumprod()
        self.y = torch.cat([labels, torch.full_like(labels, model.null_class)])
        self.x = noise.clone()
        self.forwards = 0

    @property
    def steps(self) -> int:
        return len(self.times)

    @property
    def rows(self) -> int:
        return len(self.y)

    @torch.no_grad()
    def model_output(self, step: int, attend: Optional[Callable] = None) -> torch.Tensor:
        """The model's epsilon on the whole CFG batch [cond; uncond] at `step`."""
        self.forwards += 1
        t = torch.full((self.rows,), self.times[step])
        return self.model(torch.cat([self.x, self.x]), t, self.y, attend=attend)

    def advance(self, step: int, output: torch.Tensor) -> None:
        cond, uncond = output.chunk(2)
        eps = uncond + self.cfg * (cond - uncond)
        a_t = float(self.abar[self.times[step]])
        a_prev = float(self.abar[self.times[step + 1]]) if step + 1 < self.steps else 1.0
        x0 = ((self.x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        self.x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    def run(self, attend_for: Optional[AttendFor] = None) -> torch.Tensor:
        """One whole sampling run from the start noise; images in [-1, 1]."""
        self.x = self.noise.clone()
        for step in range(self.steps):
            attend = attend_for(step, self.rows) if attend_for is not None else None
            self.advance(step, self.model_output(step, attend))
        return self.x.clamp(-1, 1)


def load_model(path: Path = SHIPPED) -> ImageDiT:
    _, metadata = read_safetensors_header(path)
    model = ImageDiT(ImageDiTConfig.from_metadata(metadata))
    tensors = {k: v.float() for k, v in read_safetensors_tensors(path).items()}
    model.load_state_dict(tensors)
    return model.eval()


def _save(out: Path, model, ema, optimizer, step: int, rng: torch.Generator) -> None:
    """Write the checkpoint as a whole: a fresh folder renamed over the old one, so an interrupted
    write leaves the previous checkpoint intact."""
    meta = {**model.config.to_metadata(), "step": str(step)}
    staging, current, previous = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, module in (("model", model), ("ema", ema)):
        atomic_write_safetensors({k: v.contiguous() for k, v in module.state_dict().items()}, meta,
                                 staging / f"{name}.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": rng.get_state()}, staging / "trainer.pt")
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(current, previous)
    os.replace(staging, current)
    shutil.rmtree(previous, ignore_errors=True)


def _checkpoint_to_resume(out: Path) -> Optional[Path]:
    for folder in (out / "checkpoint", out / "checkpoint.old"):   # .old: a rename was interrupted
        if (folder / "trainer.pt").exists():
            return folder
    return None


def train(out: Path, steps: int, batch: int, lr: float, config: ImageDiTConfig, seed: int = 0,
          save_every: int = 500, ema_decay: float = 0.999) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ImageDiT(config)
    ema = ImageDiT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    start = 0
    resume = _checkpoint_to_resume(out)
    if resume is not None:
        _, metadata = read_safetensors_header(resume / "model.safetensors")
        if ImageDiTConfig.from_metadata(metadata) != config:
            raise SystemExit(f"{resume} holds a model of another configuration "
                             f"({ImageDiTConfig.from_metadata(metadata)}); resume with its settings or "
                             f"choose another --out")
        model.load_state_dict(read_safetensors_tensors(resume / "model.safetensors"))
        ema.load_state_dict(read_safetensors_tensors(resume / "ema.safetensors"))
        state = torch.load(resume / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        rng.set_state(state["rng"])
        start = int(state["step"])
        print(f"resumed at step {start}")
    else:
        ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    data = PhotoCrops(config.image_size)
    abar = alphas_cumprod().float()
    if start >= steps:
        print(f"{out} is already at step {start} (>= --steps {steps}); nothing to do")
        return
    log = (out / "metrics.jsonl").open("a")
    started, done = time.perf_counter(), start
    # Ctrl-C only sets a flag, checked between steps: the checkpoint then holds whole steps only
    # (an interrupt inside optimizer.step() or a checkpoint write would save a half-done step).
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    try:
        for step in range(start, steps):
            if stop["requested"]:
                print(f"interrupted after step {done}: saving")
                break
            images, labels = data.batch(batch, rng)
            labels = torch.where(torch.rand(batch, generator=rng) < CLASS_DROPOUT,
                                 torch.full_like(labels, model.null_class), labels)
            t = torch.randint(TRAIN_STEPS, (batch,), generator=rng)
            noise = torch.randn(images.shape, generator=rng)
            a = abar[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * images + (1 - a).sqrt() * noise
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 200)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                prediction = model(noisy, t, labels)
            loss = F.mse_loss(prediction.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                decay = min(ema_decay, (1 + step) / (10 + step))
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
            done = step + 1
            if done % 50 == 0:
                rate = (done - start) * batch / (time.perf_counter() - started)
                log.write(json.dumps({"step": done, "loss": round(loss.item(), 5),
                                      "images_per_s": round(rate, 2)}) + "\n")
                log.flush()
                print(f"step {done}/{steps} loss {loss.item():.4f} {rate:.1f} images/s", flush=True)
            if done % save_every == 0:
                _save(out, model, ema, optimizer, done, rng)
        if done % save_every != 0:
            _save(out, model, ema, optimizer, done, rng)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        log.close()


def export(checkpoint: Path, target: Path) -> None:
    """Ship a checkpoint's EMA weights in bf16 (how bench/models/image_dit_64px.safetensors was made)."""
    source = checkpoint / "ema.safetensors"
    _, metadata = read_safetensors_header(source)
    metadata = {**metadata, "weights": f"EMA (decay 0.999) of bench.image_dit_train at step {metadata['step']}, "
                                       f"stored in bf16"}
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in read_safetensors_tensors(source).items()}
    atomic_write_safetensors(tensors, metadata, target, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--depth", type=int, default=ImageDiTConfig.depth)
    parser.add_argument("--hidden", type=int, default=ImageDiTConfig.hidden)
    parser.add_argument("--heads", type=int, default=ImageDiTConfig.heads)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--export", type=Path, default=None, metavar="FILE",
                        help="instead of training: write the EMA of --out's checkpoint to FILE in bf16")
    args = parser.parse_args()
    if args.export is not None:
        export(args.out / "checkpoint", args.export)
        return
    config = ImageDiTConfig(depth=args.depth, hidden=args.hidden, heads=args.heads, num_classes=len(photo_names()))
    train(args.out, args.steps, args.batch, args.lr, config, save_every=args.save_every)


if __name__ == "__main__":
    main()
