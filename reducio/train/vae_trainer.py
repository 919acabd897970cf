"""``python -m reducio.train vae``: train or fine-tune a Reducio VAE with the official objective.

Scale-out: under torchrun the VAE and the discriminator are wrapped in DistributedDataParallel
(gloo on CPU, NCCL on GPU); the adaptive GAN weight averages its two gradients over processes, so a
step on N processes x batch b equals one on 1 process x batch N*b (with the "group" discriminator
norm; the official BatchNorm keeps per-process statistics, as in the official DDP training).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from ..data import CONTENT_INDEX, SyntheticClips, to_uint8_frames
from ..data.transforms import parse_size
from ..vae import ReducioVAE, official_config
from ..vae.blocks import resize_flow
from ..vae.checkpoint import CONFIG_METADATA_KEY, VARIANT_METADATA_KEY, CheckpointError
from .checkpoint import CheckpointStore, flatten_optimizer_state, unflatten_optimizer_state
from .errors import TrainingError
from .loop import Trainer, autocast_for, keyed_generator, keyed_randn, resolve_precision
from .perceptual import load_lpips
from .vae_objective import (DiscriminatorPair, PatchDiscriminator3D, VAELossConfig, adaptive_gan_weight,
                            generator_loss, hinge_d_loss, motion_hint_loss, motion_hint_targets)


def _preset(ch, ch_mult, ch_fuse, ch_2d, ch_mult_2d, z, blocks=1, content_position=None, fuse_type="attn",
            norm_groups=None, latent_motion=None, motion_interpolation=None, composite_output=None) -> dict:
    extra = {} if content_position is None else {"content_position": content_position}
    if norm_groups is not None:
        extra["norm_groups"] = norm_groups
    if latent_motion is not None:
        extra["latent_motion"] = latent_motion
    if motion_interpolation is not None:
        extra["motion_interpolation"] = motion_interpolation
    if composite_output is not None:
        extra["composite_output"] = composite_output
    return {"ddconfig": {"ch": ch, "ch_in": ch, "f_t": 2, "out_ch": 3, "z_channels": z, "temp_res": 16,
                         "ch_mult": ch_mult, "ch_fuse": ch_fuse, "fuse_type": fuse_type, "num_res_blocks": blocks,
                         "fuse_mid": True, "window_size": 128, **extra},
            "ddconfig_2d": {"ch": ch_2d, "ch_mult": ch_mult_2d, "num_res_blocks": blocks, "out_z": False},
            "embed_dim": z, "use_tiling": False, "tile_overlap_factor": 0.25, "tile_sample_min_size": 256}


# "tiny": the official latent format (16 channels, T/4, H/32, W/32) at small widths. At 64 px the
# latent is only 2x2, too coarse for the official attention-only fusion to find where the content
# belongs (trained that way it stayed a grey blur at the content-repeated baseline, see
# docs/embedded_models.md). So the content frame also enters at full and half resolution through
# the official code's 'add' fusion (ch_fuse[0] = 0, ch_fuse[1] = 1), and the attention fusion blocks
# get a fixed 2-D position code (content_position 'sincos2d', ours, no weights). Its GroupNorms use
# 8 groups (norm_groups, ours): the official 32 groups on 32 channels would be one channel per group,
# an instance norm that removes the clip's colours at every block (4-8 channels per group here, as
# in the official model's 128-512 channels). Its decoder moves the content frame by a flow (warp
# fusion, ours) whose coarsest part is the clip's measured global motion, held in latent channels 0-1
# (latent_motion 'measured', ours, reducio/vae/motion.py): trained on reconstruction alone the latent
# never learned to carry motion.
# "tiny-objects": "tiny" with the motion of what moves against the camera measured too, per latent cell
# (latent_motion 'measured+objects', ours, motion.py): with the camera alone the sprites stay where the
# content frame has them.
# "tiny-cells": "tiny-objects" with the camera's motion measured per latent cell (latent_motion
# 'measured-similarity+objects': zooms and rolls are in the latent) and spread linearly over the frames and
# pixels by the decoder (motion_interpolation 'linear': held at each latent frame's mean, a sprite was
# off by up to 1.5 frames' motion, and the decoder blurred it). motion.py has the measurements.
# "tiny-composite": "tiny-cells" whose output mixes in the content frame moved by the decoder's flows
# (ddconfig.composite_output, FusionDecoder): its sprites and edges blurred through conv_out even where
# the motion was exact. Fine-tuned with --freeze-latent, its latents are tiny-cells' own.
# "tiny-fine": "tiny-composite" with one steady object motion per quarter of a latent cell (16 px at
# 64 px) in channels 2-9 (latent_motion 'measured-similarity+fine-objects', motion.py): two sprites in one
# 32-pixel cell mostly get a cell each. Its decoder is tiny-composite's, tensor for tensor.
# "test": 3 levels (H/4) and 8 channels, for unit tests only.
TINY_FUSE_TYPES = ["warp", "warp", "attn+warp", "attn+warp", "attn", "attn"]
VAE_PRESETS = {
    "tiny": lambda: _preset(32, [1, 1, 2, 2, 2, 2], [0, 1, 2, 3, -1, -1], 32, [1, 1, 2, 2], 16,
                            content_position="sincos2d", fuse_type=list(TINY_FUSE_TYPES), norm_groups=8,
                            latent_motion="measured"),
    "tiny-objects": lambda: _preset(32, [1, 1, 2, 2, 2, 2], [0, 1, 2, 3, -1, -1], 32, [1, 1, 2, 2], 16,
                                    content_position="sincos2d", fuse_type=list(TINY_FUSE_TYPES), norm_groups=8,
                                    latent_motion="measured+objects"),
    "tiny-cells": lambda: _preset(32, [1, 1, 2, 2, 2, 2], [0, 1, 2, 3, -1, -1], 32, [1, 1, 2, 2], 16,
                                  content_position="sincos2d", fuse_type=list(TINY_FUSE_TYPES), norm_groups=8,
                                  latent_motion="measured-similarity+objects", motion_interpolation="linear"),
    "tiny-composite": lambda: _preset(32, [1, 1, 2, 2, 2, 2], [0, 1, 2, 3, -1, -1], 32, [1, 1, 2, 2], 16,
                                      content_position="sincos2d", fuse_type=list(TINY_FUSE_TYPES), norm_groups=8,
                                      latent_motion="measured-similarity+objects", motion_interpolation="linear",
                                      composite_output=True),
    "tiny-fine": lambda: _preset(32, [1, 1, 2, 2, 2, 2], [0, 1, 2, 3, -1, -1], 32, [1, 1, 2, 2], 16,
                                 content_position="sincos2d", fuse_type=list(TINY_FUSE_TYPES), norm_groups=8,
                                 latent_motion="measured-similarity+fine-objects", motion_interpolation="linear",
                                 composite_output=True),
    "test": lambda: _preset(32, [1, 1, 1], [-1, 1, -1], 32, [1, 1], 8),
    "ft4": lambda: official_config("ft4"),
    "ft2": lambda: official_config("ft2"),
}


def resolve_vae_config(model: str | None, model_config: str | None, init: str | None,
                       init_matching: bool = False) -> tuple[dict, dict | None]:
    """(constructor kwargs, initial state dict or None) from --model / --model-config / --init.

    ``init_matching``: the architecture comes from --model / --model-config and only the tensors of
    ``init`` whose names and shapes match are taken (the rest start fresh) -- for a run that changes
    the architecture of an earlier one. At least half of the new model's tensors must match.
    """
    state = None
    if init and init_matching:
        # the tensors only: the file's own architecture need not be buildable any more (e.g. a
        # layer was added since it was written); safetensors holds no code to run
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(init))
        except (OSError, SafetensorError) as exc:
            raise TrainingError(f"--init {init}: not a readable safetensors file ({exc})") from None
    elif init:
        try:
            loaded = ReducioVAE.from_pretrained(init)
        except CheckpointError as exc:
            raise TrainingError(f"--init {init}: {exc}") from None
        config, state = loaded.config, loaded.state_dict()
    if init:
        if init_matching:
            config = resolve_vae_config(model, model_config, None)[0]
            with torch.device("meta"):
                shapes = {k: v.shape for k, v in ReducioVAE(**config).state_dict().items()}
            taken = {k: v for k, v in state.items() if k in shapes and shapes[k] == v.shape}
            if len(taken) * 2 < len(shapes):
                raise TrainingError(f"--init {init} --init-matching: only {len(taken)} of the model's {len(shapes)} "
                                    f"tensors match by name and shape; this is not the same family of model")
            print(f"--init-matching: {len(taken)} tensors taken from {init}, {len(shapes) - len(taken)} start fresh",
                  file=sys.stderr)
            return config, taken
        if model or model_config:
            wanted = resolve_vae_config(model, model_config, None)[0]
            if json.dumps(wanted, sort_keys=True) != json.dumps(config, sort_keys=True):
                raise TrainingError(f"--init {init} holds a different VAE configuration than --model/--model-config; "
                                    f"drop --model to fine-tune the checkpoint as it is")
        return config, state
    if model_config:
        config = json.loads(Path(model_config).read_text())
        return config.get("constructor_kwargs", config), None
    name = model or "tiny"
    if name not in VAE_PRESETS:
        raise TrainingError(f"unknown VAE model {name!r}; choose one of {sorted(VAE_PRESETS)} or pass --model-config")
    return VAE_PRESETS[name](), None


class VAEForTraining(nn.Module):
    """video + posterior noise -> (reconstruction, posterior mean, log-variance); content = frame 7.

    ``sample`` (the official objective): the decoder sees a posterior sample. False (``--posterior
    mean``, ours): it sees the posterior mean; the KL term still regularises the mean.
    """

    def __init__(self, vae: ReducioVAE, sample: bool = True):
        super().__init__()
        self.vae, self.sample = vae, sample

    def forward(self, video: torch.Tensor, noise: torch.Tensor, motion_hint: bool = False):
        """(reconstruction, mean, log-variance, global motion): the last is the decoder's latent flow
        averaged over space, per frame, in output pixels ``[B, 2, T]`` when ``motion_hint``, else None."""
        feats = self.vae.encode_2d(video[:, :, CONTENT_INDEX])
        posterior = self.vae.encode_3d(video)
        latent = posterior.mean + posterior.std * noise.to(posterior.mean.dtype) if self.sample else posterior.mean
        latent = self.vae.latent_of(latent, video)
        recon = self.vae.decode_features(latent.to(video.dtype), feats)
        motion = None
        if motion_hint:
            flow = self.vae.decoder.latent_flow(self.vae.post_quant_conv(latent.to(video.dtype)))
            motion = resize_flow(flow, video.shape[2:]).mean((-2, -1))
        return recon, posterior.mean, posterior.logvar, motion


def lr_factor_g(step: int, decay_steps: int, final: float) -> float:
    """Official LambdaLinearScheduler: 1.0 -> ``final`` linearly over ``decay_steps``."""
    return final + (1.0 - final) * max(0.0, decay_steps - step) / decay_steps


def lr_factor_d(step: int, start: int, ramp: int, factor: float) -> float:
    """Official WarmupLR: ``factor`` until ``start``, then linear to 1 over ``ramp`` steps."""
    if step < start:
        return factor
    return min(1.0, factor + (1.0 - factor) * (step - start) / max(1, ramp))


class VAETrainer(Trainer):
    name = "vae"
    IDENTITY = ("model_config", "data", "size", "clips", "fps", "seed", "batch_size", "lr", "disc_lr_scale",
                "freeze_latent", "kl_weight", "disc_start", "disc_weight", "disc_ndf", "disc_norm", "perceptual",
                "perceptual_weight", "penalty_weight", "grad_clip", "lr_decay_steps", "precision", "motion_hint_weight",
                "posterior")
    IDENTITY_DEFAULTS = {"freeze_latent": False}
    EXPORT = ("model",)

    def __init__(self, settings: dict, dataset, dist):
        config, init_state = resolve_vae_config(settings.get("model"), settings.get("model_config"), settings.get("init"),
                                                settings.get("init_matching", False))
        settings = {**settings, "model_config": config,
                    "perceptual": Path(settings["perceptual_weights"]).name if settings.get("perceptual_weights") else None}
        super().__init__(settings, dataset, dist)
        s = self.settings
        self.loss_cfg = VAELossConfig(kl_weight=s["kl_weight"], disc_start=s["disc_start"], disc_weight=s["disc_weight"],
                                      perceptual_weight=s["perceptual_weight"], penalty_weight=s["penalty_weight"],
                                      motion_hint_weight=s.get("motion_hint_weight") or 0.0)
        torch.manual_seed(self.seed)
        self.vae = ReducioVAE(**config).to(self.device)
        if self.loss_cfg.motion_hint_weight > 0 and not hasattr(self.vae.decoder, "latent_flow"):
            raise TrainingError("--motion-hint-weight needs a decoder with warp fusion levels (ddconfig.fuse_type "
                                "'warp' or 'attn+warp', as in --model tiny); set it to 0 for this model")
        if self.loss_cfg.motion_hint_weight > 0 and self.vae.measured_motion:
            raise TrainingError("--motion-hint-weight trains a learned latent motion, but this model measures it "
                                "(ddconfig.latent_motion = 'measured'); set it to 0")
        if init_state is not None:
            self.vae.load_state_dict(init_state, strict=not self.settings.get("init_matching", False))
        self.vae.train()
        if s.get("freeze_latent"):
            # the latent is encoder_3d -> quant_conv (and the measurement): fixed, it stays bit-identical
            for module in (self.vae.encoder_3d, self.vae.quant_conv):
                module.requires_grad_(False)
        size = parse_size(s["size"])
        sf, frames = self.vae.spatial_factor, self.vae.latent_frames
        if size[0] % sf or size[1] % sf:
            raise TrainingError(f"clip size {size[0]}x{size[1]} is not a multiple of the VAE's spatial factor {sf}; "
                                f"use --size {max(sf, size[0] // sf * sf)}")
        self.latent_shape = (self.vae.embed_dim, frames, size[0] // sf, size[1] // sf)
        if s["disc_start"] < s["steps"]:
            try:    # shapes only (meta device): fail now, not at step disc_start
                with torch.device("meta"):
                    PatchDiscriminator3D(s["disc_ndf"], s["disc_norm"])(torch.empty(1, 3, 16, *size))
            except RuntimeError:
                raise TrainingError(f"the 3-D patch discriminator needs clips of at least 32x32 px, got "
                                    f"{size[0]}x{size[1]}; use a larger --size or a --disc-start beyond --steps") from None
        self.discriminator = PatchDiscriminator3D(s["disc_ndf"], s["disc_norm"]).to(self.device)
        self.discriminator.initialize(keyed_generator(self.seed, "init", 1))
        self.perceptual = load_lpips(s["perceptual_weights"]).to(self.device) if s.get("perceptual_weights") else None
        if self.perceptual is None and dist.is_main and not s.get("quiet"):
            print("[vae] perceptual (LPIPS) term off: no --perceptual-weights given (see docs/training.md)",
                  file=sys.stderr)
        self.g_model = VAEForTraining(self.vae, sample=s.get("posterior", "sample") == "sample")
        self.d_model = DiscriminatorPair(self.discriminator)
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [dist.device.index] if dist.device.type == "cuda" else None
            # find_unused_parameters: the content encoder's mid.block_2 / norm_out are computed by the
            # official model but their result is discarded, so they never get gradients
            self.g_model = DDP(self.g_model, device_ids=ids, find_unused_parameters=True)
            self.d_model = DDP(self.d_model, device_ids=ids)
        betas = (0.5, 0.9)
        # what the generator optimizer steps and clips (all of the VAE but a frozen latent encoder)
        self.trainable = [p for p in self.vae.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(self.trainable, lr=s["lr"], betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=s["lr"] * s["disc_lr_scale"], betas=betas)
        self.precision = resolve_precision(s.get("precision"), self.device)

    def identity(self) -> dict:
        return {k: self.settings.get(k, self.IDENTITY_DEFAULTS.get(k)) for k in self.IDENTITY}

    def _autocast(self):
        return autocast_for(self.precision, self.device)

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce_mean(tensor) if self.dist.active else tensor

    def train_step(self, batch, numbers, step):
        s, cfg = self.settings, self.loss_cfg
        video = batch["video"].to(self.device)
        noise = keyed_randn(self.seed, "latent_noise", numbers, self.latent_shape).to(self.device)
        for group in self.opt_g.param_groups:
            group["lr"] = s["lr"] * lr_factor_g(step, s["lr_decay_steps"], 0.01)
        for group in self.opt_d.param_groups:
            group["lr"] = s["lr"] * s["disc_lr_scale"] * lr_factor_d(step, 5000, 1000, 0.1)
        disc_on = step >= cfg.disc_start
        hint = cfg.motion_hint_weight > 0
        with self._autocast():
            recon, mean, logvar, motion = self.g_model(video, noise, hint)
        recon = recon.float()
        nll, kl, penalty, p_mean = generator_loss(video, recon, mean.float(), logvar.float(), cfg, self.perceptual)
        total = nll + cfg.kl_weight * kl + cfg.penalty_weight * penalty
        metrics = {"loss": total, "nll": nll, "kl": kl, "penalty": penalty}
        if hint:
            metrics["motion_hint"] = motion_hint_loss(motion, motion_hint_targets(video, CONTENT_INDEX))
            total = total + cfg.motion_hint_weight * metrics["motion_hint"]
            metrics["loss"] = total
        if self.perceptual is not None:
            metrics["perceptual"] = p_mean
        if disc_on:
            with self._autocast():
                g_loss = -self.discriminator(recon).float().mean()
            if cfg.adaptive_gan:
                last = self.vae.decoder.conv_out.weight
                weight = adaptive_gan_weight(nll, g_loss, last, self._reduce) * cfg.disc_weight
            else:
                weight = torch.tensor(cfg.disc_weight, device=self.device)
            total = total + weight * cfg.disc_factor * g_loss
            metrics.update(loss=total, g_loss=g_loss, d_weight=weight)
        self.check_finite(total, step)
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        if s.get("grad_clip"):
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, s["grad_clip"])
        self.opt_g.step()
        if disc_on:
            self.opt_d.zero_grad(set_to_none=True)      # drop what the generator loss put there
            with self._autocast():
                real, fake = self.d_model(video, recon.detach())
            d_loss = cfg.disc_factor * hinge_d_loss(real.float(), fake.float())
            self.check_finite(d_loss, step)
            d_loss.backward()
            self.opt_d.step()
            metrics["d_loss"] = d_loss
        return metrics

    # ---------------------------------------------------------------- checkpoints
    def _optimizer_files(self):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        out = {}
        for name, model, opt in (("optimizer_g", self.vae, self.opt_g), ("optimizer_d", self.discriminator, self.opt_d)):
            state = get_optimizer_state_dict(model, opt, options=options)
            if not self.dist.is_main:
                continue
            tensors, extra = flatten_optimizer_state(state)
            out[name] = (tensors, {"param_groups": json.dumps(extra)})
        return out

    def checkpoint_files(self) -> dict:
        files = self._optimizer_files()
        if not self.dist.is_main:
            return {}
        meta = {CONFIG_METADATA_KEY: json.dumps(self.vae.config, sort_keys=True),
                VARIANT_METADATA_KEY: self.vae.variant, "format": "pt", "trained_with": "reducio.train vae"}
        files["model"] = ({k: v.detach().cpu() for k, v in self.vae.state_dict().items()}, meta)
        files["discriminator"] = ({k: v.detach().cpu() for k, v in self.discriminator.state_dict().items()},
                                  {"disc_ndf": str(self.settings["disc_ndf"]), "disc_norm": self.settings["disc_norm"]})
        return files

    def load_checkpoint(self, path: Path, state: dict) -> None:
        model, _ = CheckpointStore.read_tensors(path, "model")
        disc, _ = CheckpointStore.read_tensors(path, "discriminator")
        self.vae.load_state_dict(model, strict=True)
        self.discriminator.load_state_dict(disc, strict=True)
        # strict=False: a parameter that never gets a gradient has no Adam state to save (the content
        # encoder's last mid block and norm_out, whose output no decoder reads -- as in the official
        # model); it must start without one again, as in a run that was never stopped. The model
        # itself was loaded strictly above, so a file of another architecture is still refused.
        options = StateDictOptions(full_state_dict=True, strict=False)
        for name, module, opt in (("optimizer_g", self.vae, self.opt_g), ("optimizer_d", self.discriminator, self.opt_d)):
            tensors, meta = CheckpointStore.read_tensors(path, name)
            extra = json.loads(meta["param_groups"])
            set_optimizer_state_dict(module, opt, unflatten_optimizer_state(tensors, extra), options=options)

    # ---------------------------------------------------------------- previews
    def preview_clips(self) -> torch.Tensor:
        count = int(self.settings.get("sample_clips", 2))
        data = self.settings["data"]
        if data.startswith("synthetic"):
            source = SyntheticClips("heldout", self.settings["size"], count=count, seed=self.seed)
        else:
            source = self.dataset
        return torch.stack([source[i]["video"] for i in range(min(count, len(source)))])

    def write_sample(self, step: int) -> None:
        if not self.dist.is_main:
            return
        from ..data import write_video

        video = self.preview_clips().to(self.device)
        was_training = self.vae.training
        self.vae.eval()
        with torch.no_grad():
            feats = self.vae.encode_2d(video[:, :, CONTENT_INDEX])
            latent = self.vae.latent_of(self.vae.encode_3d(video).mode(), video)
            recon = self.vae.decode_features(latent, feats).float().clamp(-1, 1)
        self.vae.train(was_training)
        mse = ((recon - video) / 2).pow(2).mean().item()
        psnr = -10 * math.log10(max(mse, 1e-10))
        rows = [torch.cat([v, r], dim=-1) for v, r in zip(video.cpu(), recon.cpu())]      # input | reconstruction
        frames = to_uint8_frames(torch.cat(rows, dim=-2))
        path = write_video(self.out / "samples" / f"step_{step:08d}.mp4", frames, fps=16)
        with open(self.out / "samples" / "samples.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "file": path.name, "psnr_db": round(psnr, 3)}) + "\n")
