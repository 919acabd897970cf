"""``python -m reducio.train dit``: train or fine-tune Reducio-DiT on precomputed features.

Objective: PixArt / IDDPM (eps MSE + the variational term for the learned sigma), the spec's condition
dropout (§5.4: all 0.05, else text 0.1 / CLIP 0.05 / content 0.05), AdamW (PixArt: lr 1e-4, weight
decay 0.03, eps 1e-10) with linear warm-up to a constant rate, grad clipping (1.0), EMA (0.9999),
optional gradient checkpointing per block, bf16 autocast on CUDA.

Scale-out: under torchrun every block and the root are sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``); checkpoints hold full (unsharded) tensors, so a run can
resume on any number of processes with the same global batch.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.utils.checkpoint import checkpoint

from ..dit import ReducioDiT, ReducioDiTConfig, get_config
from ..dit.checkpoint import FORMAT_NAME, FORMAT_VERSION, CheckpointError, check_state_dict, read_checkpoint
from .checkpoint import CheckpointStore, flatten_optimizer_state, unflatten_optimizer_state
from .diffusion import GaussianDiffusion
from .errors import TrainingError
from .loop import Trainer, autocast_for, keyed_generator, keyed_randn, resolve_precision

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_LOAD = StateDictOptions(full_state_dict=True)


def enable_gradient_checkpointing(model: ReducioDiT) -> None:
    """Recompute each block in the backward pass (non-reentrant checkpoint around ``run_block``)."""
    original = model.run_block

    def run_block(index, x, t0, context, attend, options):
        return checkpoint(original, index, x, t0, context, attend, options, use_reentrant=False)

    model.run_block = run_block


def resolve_dit_config(settings: dict) -> tuple[ReducioDiTConfig, dict | None]:
    """(config, initial state dict or None) from --init / --init-pixart / --model-config / --model."""
    if settings.get("init"):
        try:
            state, config = read_checkpoint(settings["init"])
        except CheckpointError as exc:
            raise TrainingError(f"--init {settings['init']}: {exc}") from None
        return config, state
    overrides = {}
    if settings.get("model_config"):
        overrides = json.loads(Path(settings["model_config"]).read_text())
    if settings.get("init_pixart"):
        from ..dit.convert_pixart import ConversionError, convert_state_dict, read_source

        try:
            fields = {k: v for k, v in overrides.items() if k not in ("depth", "hidden_size", "num_heads", "mlp_ratio")}
            state, config, _ = convert_state_dict(read_source(settings["init_pixart"]), seed=settings.get("seed", 0),
                                                  **fields)
        except ConversionError as exc:
            raise TrainingError(f"--init-pixart {settings['init_pixart']}: {exc}") from None
        return config, state
    if overrides:
        return ReducioDiTConfig.from_dict(overrides), None
    try:
        return get_config(settings.get("model") or "tiny"), None
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def check_features(config: ReducioDiTConfig, manifest: dict, folder) -> None:
    """The features must be what this DiT consumes; the error names the mismatch and the fix."""
    enc, latent = manifest["encoders"], manifest["latent_shape"]
    problems = []
    if latent[0] != config.in_channels or latent[1] != config.latent_frames:
        problems.append(f"latents are {latent[0]} channels x {latent[1]} frames, the DiT takes "
                        f"{config.in_channels} x {config.latent_frames}")
    for name in ("caption_channels", "text_tokens", "clip_channels", "clip_tokens", "content_channels"):
        if name in enc and enc[name] != getattr(config, name):
            problems.append(f"{name} {enc[name]} in the features vs {getattr(config, name)} in the DiT config")
    if problems:
        raise TrainingError(f"the features in {folder} do not fit this DiT config: {'; '.join(problems)}. Re-encode "
                            f"with --dit-model/--dit-config matching the DiT, or pick the DiT config the features were "
                            f"made for")


class DiTTrainer(Trainer):
    name = "dit"
    IDENTITY = ("model_config", "features_id", "seed", "batch_size", "lr", "weight_decay", "warmup_steps",
                "ema_decay", "grad_clip", "precision", "high_noise_weight")
    IDENTITY_DEFAULTS = {"high_noise_weight": 1.0}
    EXPORT = ("model", "ema")

    def __init__(self, settings: dict, dataset, dist):
        config, init_state = resolve_dit_config(settings)
        check_features(config, dataset.manifest, dataset.folder)
        try:
            diffusion = GaussianDiffusion(config.num_train_timesteps, config.beta_start, config.beta_end,
                                          float(settings.get("high_noise_weight") or 1.0))
        except ValueError as exc:
            raise TrainingError(f"--high-noise-weight: {exc}") from None
        m = dataset.manifest
        settings = {**settings, "model_config": config.to_dict(),
                    "features_id": {"count": m["count"], "vae_sha256": m["vae"]["sha256"], "encoders": m["encoders"],
                                    "latent_shape": m["latent_shape"]}}
        super().__init__(settings, dataset, dist)
        s = self.settings
        self.config, self.diffusion = config, diffusion
        model = ReducioDiT(config)
        if init_state is None:
            model.initialize_weights(keyed_generator(self.seed, "init", 2))
        else:
            model.load_state_dict({k: v.float() for k, v in init_state.items()}, strict=True)
        model = model.to(self.device).train()
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if s.get("gradient_checkpointing"):
            enable_gradient_checkpointing(model)
        if dist.active:
            from torch.distributed.fsdp import fully_shard

            for module in (model, ema):
                for block in module.blocks:
                    fully_shard(block)
                fully_shard(module)
        self.model, self.ema = model, ema
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"], eps=1e-10)
        self.precision = resolve_precision(s.get("precision"), self.device)
        self._vae = None

    def _autocast(self):
        return autocast_for(self.precision, self.device)

    def train_step(self, batch, numbers, step):
        s, device = self.settings, self.device
        x0 = batch["z"].to(device).float()
        t = torch.cat([torch.randint(0, self.diffusion.num_timesteps, (1,), generator=keyed_generator(self.seed, "timestep", n))
                       for n in numbers]).to(device)
        noise = keyed_randn(self.seed, "diffusion_noise", numbers, x0.shape[1:]).to(device)
        flags = [self.model.sample_drop_flags(1, keyed_generator(self.seed, "cfg_drop", n)) for n in numbers]
        drop = {k: torch.cat([f[k] for f in flags]).to(device) for k in ("text", "clip", "content")}
        x_t = self.diffusion.q_sample(x0, t, noise)
        with self._autocast():
            out = self.model(x_t, t.float(), batch["text"].to(device), batch["text_mask"].to(device),
                             batch["clip"].to(device), batch["content_latent"].to(device), drop_text=drop["text"],
                             drop_clip=drop["clip"], drop_content=drop["content"])
        terms = self.diffusion.training_losses(out.float(), x0, x_t, t, noise)
        loss = terms["loss"].mean()
        self.check_finite(loss, step)
        lr = s["lr"] * min(1.0, (step + 1) / max(1, s["warmup_steps"]))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s["grad_clip"] or float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        with torch.no_grad():
            decay = s["ema_decay"]
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        return {"loss": loss, "mse": terms["mse"].mean(), "vb": terms["vb"].mean(), "grad_norm": grad_norm,
                "lr": torch.tensor(lr)}

    # ---------------------------------------------------------------- checkpoints
    def _model_file(self, module) -> tuple[dict, dict]:
        tensors = get_model_state_dict(module, options=FULL)
        if self.dist.is_main:
            check_state_dict(tensors, self.config, source="training state")
        meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": self.config.to_json(),
                "trained_with": "reducio.train dit"}
        return {k: v.detach().cpu() for k, v in tensors.items()}, meta

    def checkpoint_files(self) -> dict:
        model, ema = self._model_file(self.model), self._model_file(self.ema)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=FULL)   # collective
        if not self.dist.is_main:        # full state dicts are gathered on rank 0 only
            return {}
        tensors, extra = flatten_optimizer_state(optimizer)
        return {"model": model, "ema": ema, "optimizer": (tensors, {"param_groups": json.dumps(extra)})}

    def load_checkpoint(self, path: Path, state: dict) -> None:
        model, _ = CheckpointStore.read_tensors(path, "model")
        ema, _ = CheckpointStore.read_tensors(path, "ema")
        set_model_state_dict(self.model, model, options=FULL_LOAD)
        set_model_state_dict(self.ema, ema, options=FULL_LOAD)
        tensors, meta = CheckpointStore.read_tensors(path, "optimizer")
        set_optimizer_state_dict(self.model, self.optimizer,
                                 unflatten_optimizer_state(tensors, json.loads(meta["param_groups"])), options=FULL_LOAD)

    # ---------------------------------------------------------------- previews
    def write_sample(self, step: int) -> None:
        ema_state = get_model_state_dict(self.ema, options=FULL)      # collective under FSDP
        if not self.dist.is_main:
            return
        if not self.settings.get("vae"):
            if step == self.settings.get("sample_every"):
                print("[dit] no --vae given: preview videos are skipped", file=sys.stderr)
            return
        from ..data import to_uint8_frames, write_video
        from ..pipeline import Conditions, generate_video
        from ..vae import ReducioVAE

        if self._vae is None:
            self._vae = ReducioVAE.from_pretrained(self.settings["vae"], device=self.device).eval()
        model = ReducioDiT(self.config, device="meta")
        model.load_state_dict({k: v.float() for k, v in ema_state.items()}, strict=True, assign=True)
        model = model.to(self.device).eval()
        tensors, captions = self.dataset.previews()
        rows = []
        for i in range(min(int(self.settings.get("sample_clips", 2)), len(captions))):
            cond = Conditions(text=tensors["text"][i:i + 1], text_mask=tensors["text_mask"][i:i + 1],
                              clip=tensors["clip"][i:i + 1], content_latent=tensors["content_latent"][i:i + 1])
            image = tensors["content_pixels"][i:i + 1].float() / 127.5 - 1
            video, _ = generate_video(model, self._vae, cond, image.to(self.device), seed=i,
                                      steps=int(self.settings.get("sample_steps", 20)))
            still = image[:, :, None].expand(-1, -1, video.shape[2], -1, -1)
            rows.append(torch.cat([still.cpu(), video.float().clamp(-1, 1).cpu()], dim=-1)[0])   # content | generated
        path = write_video(self.out / "samples" / f"step_{step:08d}.mp4", to_uint8_frames(torch.cat(rows, dim=-2)), fps=16)
        with open(self.out / "samples" / "samples.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "file": path.name, "captions": captions[: len(rows)]}) + "\n")
