"""The embedded default: tiny trained Reducio models shipped with the pack, and the stand-in condition
encoders they were trained with.

Trained files live in the pack's ``models/reducio`` folder (the nodes add it to ComfyUI's ``reducio``
model folder, so the loaders list them with no copying). The condition encoders the tiny DiT reads --
a T5-base text model for ``CLIPLoader`` and a TAESD-format image VAE for ``VAELoader`` -- are stand-ins
in the real formats with seeded random weights: far too large to ship (the T5-base file is 220 MB),
they are *generated* here, deterministically from ``models/standin_shapes.json`` and a seed, and
checked against the content hash recorded when the DiT was trained, so a DiT is never paired with an
encoder other than its own. (A random T5 still maps different words to different features, which is
all the tiny DiT needs to follow its captions.)

Pure PyTorch + safetensors: usable from the pack's venv, ComfyUI's, a training run or a script.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

PACK_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = PACK_ROOT / "models"
REDUCIO_MODELS_DIR = MODELS_DIR / "reducio"
SHAPES_FILE = MODELS_DIR / "standin_shapes.json"

VAE_FILE = "reducio_tiny_vae.safetensors"
DIT_FILE = "reducio_tiny_dit.safetensors"


class StandinMismatch(RuntimeError):
    """A generated stand-in encoder is not the one the embedded models were trained with."""


@dataclass(frozen=True)
class Standin:
    key: str             # entry in standin_shapes.json
    label: str
    comfy_folder: str    # ComfyUI model folder the stock loader reads
    file_name: str
    seed: int
    std: float
    dtype: torch.dtype
    sha256: str          # content hash (see content_hash) of the generated tensors


TEXT_ENCODER = Standin("t5base", "T5-base text encoder (CLIPLoader)", "text_encoders",
                       "reducio_tiny_t5base.safetensors", seed=1, std=0.05, dtype=torch.float16,
                       sha256="1b5e1bc486b62c3f8a83ef43c6ab814960a06fba3f7527cbdf1991494583f716")
IMAGE_VAE = Standin("taesd", "TAESD-format image VAE (VAELoader)", "vae",
                    "reducio_tiny_taesd.safetensors", seed=3, std=0.05, dtype=torch.float32,
                    sha256="b6d66a3e68466eec6c836465ada7d4388006f312e461956744a7e5592bfd86d0")
STANDINS = (TEXT_ENCODER, IMAGE_VAE)


def _shapes(key: str) -> dict[str, list[int]]:
    return json.loads(SHAPES_FILE.read_text())[key]


def standin_tensors(standin: Standin) -> dict[str, torch.Tensor]:
    """The stand-in's weights: norm weights 1 and biases 0 (so activations keep their scale), every
    other tensor N(0, std) drawn in sorted key order from one seeded CPU generator."""
    generator = torch.Generator().manual_seed(standin.seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in sorted(_shapes(standin.key).items()):
        if "norm" in key.lower() and key.endswith("weight"):
            out[key] = torch.ones(shape, dtype=standin.dtype)
        elif key.endswith("bias") or not shape:
            out[key] = torch.zeros(shape, dtype=standin.dtype)
        else:
            out[key] = (torch.randn(shape, generator=generator) * standin.std).to(standin.dtype)
    if standin.key == "taesd":   # ComfyUI's TAESD loader reads the latent scale and shift from the file
        out["vae_scale"] = torch.tensor(1.0)
        out["vae_shift"] = torch.tensor(0.0)
    return out


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) in sorted name order: independent of file layout."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous().reshape(-1)
        digest.update(f"{key}|{t.dtype}|{list(tensors[key].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_standin(standin: Standin, models_dir: str | Path, *, check: bool = True) -> Path:
    """Write the stand-in into ``<models_dir>/<comfy_folder>/<file_name>`` (atomically; an existing file
    with the right content is kept). Raises :class:`StandinMismatch` when the generated weights differ
    from the recorded hash (then the embedded DiT would read features it was not trained on)."""
    from safetensors.torch import load_file

    from .files import atomic_write_safetensors

    path = Path(models_dir) / standin.comfy_folder / standin.file_name
    if path.exists() and (not check or content_hash(load_file(str(path))) == standin.sha256):
        return path
    tensors = standin_tensors(standin)
    if check and standin.sha256 and content_hash(tensors) != standin.sha256:
        raise StandinMismatch(
            f"the generated {standin.label} differs from the one the embedded models were trained with "
            f"(content hash {content_hash(tensors)[:16]}..., expected {standin.sha256[:16]}...). This torch "
            f"({torch.__version__}) draws different random numbers; generate the file with the pack's "
            "setup (torch 2.13/2.14) or retrain the DiT's conditions (docs/embedded_models.md).")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors(tensors, {"format": "pt", "reducio_standin": standin.key}, path, overwrite=True)
    return path


def write_standins(models_dir: str | Path, *, check: bool = True) -> dict[str, Path]:
    return {s.key: write_standin(s, models_dir, check=check) for s in STANDINS}


# ---------------------------------------------------------------------------------------------------
# Sample inputs for the embedded models' example workflows: a held-out synthetic clip and a held-out
# content image (a photograph and sprite colours no training clip contains), chosen by a fixed rule,
# not by how well a model does on them. Shipped in workflows/inputs/ and copied into ComfyUI's input
# folder when the pack loads (never over a user's file of the same name).
# ---------------------------------------------------------------------------------------------------
SAMPLES_DIR = PACK_ROOT / "workflows" / "inputs"
SAMPLE_CLIP = "reducio_tiny_clip.mp4"
SAMPLE_CONTENT = "reducio_tiny_content.png"
SAMPLE_SIZE = 64
SAMPLE_SEED = 2026


def sample_indices() -> tuple[int, int]:
    """(clip, content image) indices in ``SyntheticClips("heldout", 64, seed=SAMPLE_SEED)``: the first
    camera pan with one sprite (the round trip must move both), and the first clip of another
    photograph (the image-to-video content)."""
    from .data import SyntheticClips

    data = SyntheticClips(split="heldout", size=SAMPLE_SIZE, count=1000, seed=SAMPLE_SEED)
    clip = next(i for i in range(len(data)) if data.spec(i).camera == "pan" and len(data.spec(i).sprites) == 1)
    photo = data.spec(clip).photo
    content = next(i for i in range(len(data)) if data.spec(i).photo != photo)
    return clip, content


def write_samples(folder: str | Path = SAMPLES_DIR) -> dict[str, Path]:
    """Render the two sample inputs (deterministic): the clip as H.264 MP4 at 16 fps, frame 7 of the
    content clip as PNG."""
    import numpy as np
    from PIL import Image

    from .data import SyntheticClips, to_uint8_frames, write_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = SyntheticClips(split="heldout", size=SAMPLE_SIZE, count=1000, seed=SAMPLE_SEED)
    clip, content = sample_indices()
    video = write_video(folder / SAMPLE_CLIP, to_uint8_frames(data[clip]["video"]), fps=16)
    frame = np.ascontiguousarray(to_uint8_frames(data[content]["video"])[7])
    image = folder / SAMPLE_CONTENT
    Image.fromarray(frame).save(image)
    return {"clip": video, "content": image}


def sample_caption(direction: str = "left") -> str:
    """The caption of the image-to-video example: a pan over the content image's photograph."""
    from .data import SyntheticClips
    from .data.synthetic import PHOTOS

    data = SyntheticClips(split="heldout", size=SAMPLE_SIZE, count=1000, seed=SAMPLE_SEED)
    return f"the camera pans {direction} over the {PHOTOS[data.spec(sample_indices()[1]).photo]} photo"
