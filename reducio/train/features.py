"""``python -m reducio.train encode``: precompute what DiT training consumes, so it never runs an encoder.

Folder layout::

    FEATURES/manifest.json            written last: counts, shapes, the encoders, the VAE (sha256), the data
    FEATURES/shard_00000.safetensors  z [n, C, T', h, w] (layer-normed motion latent, sampled as the official
                                      cache does, or the mean), content_latent [n, 4, H/8, W/8] (raw),
                                      text [n, L, C_t], text_mask [n, L], clip [n, N_c, C_c], index [n];
                                      metadata "captions" (JSON list)
    FEATURES/previews.safetensors     the first clips' content frames (uint8 pixels) and conditions, for
                                      preview samples during DiT training

Shards are written atomically; a folder without manifest.json is incomplete and ``dit`` refuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data import CONTENT_INDEX, open_dataset
from ..dit import ReducioDiTConfig, get_config
from ..files import atomic_write_safetensors
from ..vae import ReducioVAE
from ..vae.checkpoint import CheckpointError
from .checkpoint import atomic_write_text
from .encoders import make_encoders
from .errors import TrainingError
from .loop import autocast_for, keyed_randn, resolve_precision

FORMAT = "reducio-dit-features"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20
TENSOR_KEYS = ("z", "content_latent", "text", "text_mask", "clip")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dit_config_from(settings: dict) -> ReducioDiTConfig:
    if settings.get("dit_config"):
        return ReducioDiTConfig.from_json(Path(settings["dit_config"]).read_text())
    return get_config(settings.get("dit_model") or "tiny")


def encode_features(settings: dict, dist) -> dict:
    out = Path(settings["out"])
    if (out / "manifest.json").exists() and not settings.get("force"):
        raise TrainingError(f"{out} already holds features (manifest.json); pass --force to replace them or choose "
                            f"another --out")
    dit_cfg = dit_config_from(settings)
    try:
        vae = ReducioVAE.from_pretrained(settings["vae"], device=dist.device).eval()
    except CheckpointError as exc:
        raise TrainingError(f"--vae {settings['vae']}: {exc}") from None
    if vae.embed_dim != dit_cfg.in_channels or vae.latent_frames != dit_cfg.latent_frames \
            or vae.spatial_factor != dit_cfg.vae_spatial_factor:
        raise TrainingError(
            f"the VAE makes latents of {vae.embed_dim} channels x {vae.latent_frames} frames at 1/{vae.spatial_factor} "
            f"size but the DiT config expects {dit_cfg.in_channels} x {dit_cfg.latent_frames} at "
            f"1/{dit_cfg.vae_spatial_factor}; pass a --dit-config with in_channels, latent_frames and "
            f"vae_spatial_factor set to the VAE's")
    precision = resolve_precision(settings.get("precision"), dist.device)
    dataset = open_dataset(settings["data"], size=settings["size"], seed=settings["seed"], count=settings["clips"],
                           fps=settings["fps"], random_crop=False)
    if settings.get("conditions_from"):
        conditions = ReusedConditions(settings["conditions_from"], dataset, out, dit_cfg)
    else:
        conditions = EncodedConditions(make_encoders(settings.get("encoders", "builtin"), dit_cfg))
    count, shard_size, batch = len(dataset), int(settings["shard_size"]), int(settings["batch_size"])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        os.unlink(out / "manifest.json")        # --force: the folder is incomplete until the new manifest lands
    shards = [(k, start, min(start + shard_size, count)) for k, start in enumerate(range(0, count, shard_size))]
    written = []
    for k, start, stop in shards:
        if k % dist.world != dist.rank:
            continue
        rows: dict[str, list[torch.Tensor]] = {key: [] for key in TENSOR_KEYS}
        captions, pixels = [], []
        for first in range(start, stop, batch):
            items = [dataset[i] for i in range(first, min(first + batch, stop))]
            video = torch.stack([item["video"] for item in items]).to(dist.device)
            content = video[:, :, CONTENT_INDEX]
            with torch.no_grad(), autocast_for(precision, dist.device):
                posterior = vae.encode_3d(video)
                if settings.get("latent", "sample") == "sample":
                    noise = keyed_randn(settings["seed"], "latent_noise", [item["index"] for item in items],
                                        posterior.mean.shape[1:]).to(dist.device)
                    z = posterior.mean + posterior.std * noise
                else:
                    z = posterior.mode()
                rows["z"].append(vae.latent_of(z.float(), video).cpu())
                for key, value in conditions.rows(items, content).items():
                    rows[key].append(value)
            captions += [item["caption"] for item in items]
            pixels.append(((content.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        tensors = {key: torch.cat(value) for key, value in rows.items()}
        tensors["index"] = torch.arange(start, stop, dtype=torch.int64)
        name = f"shard_{k:05d}.safetensors"
        atomic_write_safetensors(tensors, {"captions": json.dumps(captions)}, out / name, overwrite=True)
        if k == 0:
            keep = min(int(settings.get("previews", 4)), stop - start)
            preview = {key: tensors[key][:keep] for key in TENSOR_KEYS}
            preview["content_pixels"] = torch.cat(pixels)[:keep]
            atomic_write_safetensors(preview, {"captions": json.dumps(captions[:keep])}, out / "previews.safetensors",
                                     overwrite=True)
        written.append(name)
        if dist.is_main and not settings.get("quiet"):
            print(f"[encode] {name}: clips {start}..{stop - 1}", file=sys.stderr)
    dist.barrier()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "count": count,
        "shards": [{"file": f"shard_{k:05d}.safetensors", "start": start, "count": stop - start} for k, start, stop in shards],
        "latent_shape": [vae.embed_dim, vae.latent_frames, *(s // vae.spatial_factor for s in dataset.size)],
        "content_latent_shape": [4, *(s // 8 for s in dataset.size)],
        "size": list(dataset.size), "latent": settings.get("latent", "sample"), "precision": precision,
        "encoders": conditions.describe(), "data": dataset.describe(),
        "conditions_from": str(settings["conditions_from"]) if settings.get("conditions_from") else None,
        "vae": {"file": Path(settings["vae"]).name, "sha256": file_sha256(settings["vae"]), "config": vae.config,
                "variant": vae.variant},
    }
    if dist.is_main:
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    return {"out": str(out), "count": count, "shards": len(shards)}


CONDITION_KEYS = ("text", "text_mask", "clip", "content_latent")


class EncodedConditions:
    """The conditions of a batch of clips computed by condition encoders (``--encoders``)."""

    def __init__(self, encoders):
        self.encoders = encoders

    def describe(self) -> dict:
        return self.encoders.describe()

    def rows(self, items: list[dict], content: torch.Tensor) -> dict[str, torch.Tensor]:
        text, mask = self.encoders.encode_text([item["caption"] for item in items])
        return {"text": text.float().cpu(), "text_mask": mask.float().cpu(),
                "clip": self.encoders.encode_clip(content).float().cpu(),
                "content_latent": self.encoders.encode_content(content).float().cpu()}


class ReusedConditions:
    """The conditions of an earlier ``encode`` folder (``--conditions-from``), row by row: the text, CLIP
    and content features depend on the data and the condition encoders only, not on the Reducio VAE,
    so a new VAE needs only its motion latents encoded. Refused unless the folder was made from the same
    clips (data description, clip count at least ours, same size)."""

    def __init__(self, folder, dataset, out: Path, dit_cfg: ReducioDiTConfig):
        folder = Path(folder)
        if folder.resolve() == out.resolve():
            raise TrainingError(f"--conditions-from {folder} is the --out folder; write the new features elsewhere")
        self.source = FeatureShards(folder)
        theirs, ours = dict(self.source.manifest["data"]), dict(dataset.describe())
        their_count, our_count = theirs.pop("count", None), ours.pop("count", None)
        if theirs != ours or their_count is None or our_count is None or their_count < our_count:
            raise TrainingError(
                f"--conditions-from {folder}: its features were made from other clips ({self.source.manifest['data']}) "
                f"than these ({dataset.describe()}); use the same --data, --size, --seed and at most its "
                f"{their_count} --clips, or encode the conditions again without --conditions-from")
        shapes = self.source[0]
        if shapes["text"].shape != (dit_cfg.text_tokens, dit_cfg.caption_channels):
            raise TrainingError(f"--conditions-from {folder}: its text features are {list(shapes['text'].shape)}, "
                                f"the DiT config expects [{dit_cfg.text_tokens}, {dit_cfg.caption_channels}]")

    def describe(self) -> dict:
        return self.source.manifest["encoders"]

    def rows(self, items: list[dict], content: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored conditions of these clips (by their dataset index; `content` is not needed)."""
        stored = [self.source[item["index"]] for item in items]
        return {key: torch.stack([row[key] for row in stored]).float() for key in CONDITION_KEYS}


class FeatureShards(Dataset):
    """Random access to the rows of an ``encode`` folder (memory-mapped safetensors reads)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            hint = (" (it holds shards but no manifest: the encode run did not finish; run it again with --force)"
                    if any(self.folder.glob("shard_*.safetensors")) else "")
            raise TrainingError(f"{self.folder} is not a feature folder: no manifest.json{hint}. Make one with "
                                f"`python -m reducio.train encode --vae VAE --out {self.folder}`")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise TrainingError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; not a feature manifest")
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        if self.manifest.get("format") != FORMAT or self.manifest.get("format_version") != FORMAT_VERSION:
            raise TrainingError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest")
        if self.manifest["count"] < 1:
            raise TrainingError(f"{self.folder} holds no clips; encode a non-empty dataset")
        self.shards = self.manifest["shards"]
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
        return self._handles[file]

    def __getitem__(self, key) -> dict:
        index = int(key if isinstance(key, int) else key[0])
        for shard in self.shards:
            if shard["start"] <= index < shard["start"] + shard["count"]:
                row = index - shard["start"]
                handle = self._handle(shard["file"])
                item = {name: handle.get_slice(name)[row:row + 1][0] for name in TENSOR_KEYS}
                item["index"] = index
                return item
        raise IndexError(f"feature row {index} out of range 0..{len(self) - 1}")

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def previews(self) -> tuple[dict, list[str]]:
        from safetensors import safe_open

        with safe_open(str(self.folder / "previews.safetensors"), framework="pt", device="cpu") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            captions = json.loads((handle.metadata() or {}).get("captions", "[]"))
        return tensors, captions
