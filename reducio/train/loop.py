"""What the VAE and DiT trainers share: data order, keyed randomness, the step loop with
checkpoints, resume checks, Ctrl-C, NaN guard, progress bar, metrics and previews.

Determinism: the data order and every random draw of the objective are functions of
(seed, global sample number), never of a process's RNG stream. A step therefore computes the same
thing on 1 rank with batch 2b as on 2 ranks with batch b, and a resumed run continues exactly
where the stopped one was (the checkpoint records the step; RNG states are stored as well).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

import torch
from torch.utils.data import DataLoader

from .checkpoint import CheckpointStore, atomic_write_text
from .distributed import Distributed
from .errors import CheckpointWriteError, ConfigMismatchError, NonFiniteLossError, TrainingError, TrainingStopped

PURPOSES = {"order": 1, "latent_noise": 2, "timestep": 3, "diffusion_noise": 4, "cfg_drop": 5, "sample": 6, "init": 7}


def keyed_generator(seed: int, purpose: str, number: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, purpose, number)."""
    state = np.random.SeedSequence([int(seed), PURPOSES[purpose], int(number)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def keyed_randn(seed: int, purpose: str, numbers, shape) -> torch.Tensor:
    """One ``randn(shape)`` per sample number, stacked: ``[len(numbers), *shape]``."""
    return torch.stack([torch.randn(shape, generator=keyed_generator(seed, purpose, n)) for n in numbers])


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """'auto' means bf16 autocast on CUDA and fp32 elsewhere (CPUs with AMX-BF16 run bf16 much faster
    but it is asked for explicitly: not every CPU has it)."""
    if precision in (None, "auto"):
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device):
    """The autocast context of a resolved precision (a no-op context for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class GlobalOrder:
    """Epoch-wise seeded permutation of the dataset; step s uses global samples s*B ... s*B+B-1."""

    def __init__(self, length: int, global_batch: int, world: int, seed: int):
        if global_batch % world:
            raise TrainingError(f"--batch-size {global_batch} (the global batch) must be divisible by the number of "
                                f"processes ({world}); use a multiple of {world}")
        self.length, self.global_batch, self.world, self.seed = length, global_batch, world, seed
        self.per_rank = global_batch // world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.length, generator=keyed_generator(self.seed, "order", epoch))}
        return self._perms[epoch]

    def sample_numbers(self, step: int, rank: int) -> list[int]:
        first = step * self.global_batch + rank * self.per_rank
        return list(range(first, first + self.per_rank))

    def keys(self, step: int, rank: int) -> list[tuple[int, int]]:
        out = []
        for number in self.sample_numbers(step, rank):
            epoch, position = divmod(number, self.length)
            out.append((int(self._perm(epoch)[position]), epoch))
        return out


class StepBatches:
    """A DataLoader batch sampler: the keys of this rank for steps start..stop-1."""

    def __init__(self, order: GlobalOrder, start: int, stop: int, rank: int):
        self.order, self.start, self.stop, self.rank = order, start, stop, rank

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.order.keys(step, self.rank)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "skipped":
            out[key] = sum(values)
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class Progress:
    """One status line on stderr: step, loss, clips/s, ETA (redrawn on a terminal, printed every
    ``every`` steps otherwise)."""

    def __init__(self, name: str, total: int, start: int, clips_per_step: int, every: int, enabled: bool):
        self.name, self.total, self.start, self.clips_per_step = name, total, start, clips_per_step
        self.every, self.enabled = max(1, every), enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.window: list[tuple[int, float]] = [(start, self.t0)]

    def throughput(self, step: int) -> float:
        now = time.perf_counter()
        self.window.append((step, now))
        self.window = self.window[-20:]
        (s0, t0), (s1, t1) = self.window[0], self.window[-1]
        return (s1 - s0) * self.clips_per_step / max(t1 - t0, 1e-9)

    def update(self, step: int, metrics: dict, clips_per_s: float) -> None:
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        remaining = (self.total - step) * self.clips_per_step / max(clips_per_s, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime(min(remaining, 359999)))
        shown = " ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:4])
        line = f"[{self.name}] step {step}/{self.total} {shown} | {clips_per_s:.2f} clips/s | ETA {eta}"
        sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if self.tty and step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class StopSignal:
    """Ctrl-C (SIGINT) / SIGTERM ask the loop to save and stop after the current step; a second
    Ctrl-C aborts at once (the last complete checkpoint stays as it was)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nstop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)\n")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Trainer:
    """Subclasses set ``name`` and ``IDENTITY`` (settings a resume must keep) and implement the hooks."""

    name = "train"
    IDENTITY: tuple[str, ...] = ()
    # identity settings added after runs were made, with the value those runs had: a checkpoint that does
    # not record one resumes as if it recorded this
    IDENTITY_DEFAULTS: dict = {}
    EXPORT: tuple[str, ...] = ("model",)

    def __init__(self, settings: dict, dataset, dist: Distributed):
        self.settings = dict(settings)
        self.dataset = dataset
        self.dist = dist
        self.out = Path(settings["out"])
        self.store = CheckpointStore(self.out, keep=settings.get("keep", 2))
        self.seed = int(settings.get("seed", 0))
        self.device = dist.device
        self.step = 0
        self.last_metrics: dict = {}

    # ---------------------------------------------------------------- hooks
    def identity(self) -> dict:
        """Settings and model config a resumed run must match."""
        return {k: self.settings.get(k) for k in self.IDENTITY}

    def train_step(self, batch: dict, numbers: list[int], step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def checkpoint_files(self) -> dict:
        raise NotImplementedError

    def load_checkpoint(self, path: Path, state: dict) -> None:
        raise NotImplementedError

    def write_sample(self, step: int) -> None:
        pass

    # ---------------------------------------------------------------- helpers for subclasses
    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """All ranks agree; raise before any optimizer step when the loss is NaN or infinite."""
        value = float(self.dist.all_reduce_mean(loss.detach().float().reshape(1)).item())
        if not math.isfinite(value):
            latest = self.store.latest()
            where = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"the {self.name} loss is {value} at step {step + 1}; training stopped without saving this state "
                f"({where}). Lower --lr, set --grad-clip, or check the data for broken clips, then continue with "
                f"--resume")

    # ---------------------------------------------------------------- the loop
    def _resume_path(self) -> Path | None:
        resume = self.settings.get("resume")
        latest = self.store.latest()
        if not resume:
            if latest is not None:
                raise TrainingError(f"{self.out} already holds a run (checkpoint {latest.name}); pass --resume to "
                                    f"continue it, or choose a new --out folder")
            return None
        path = latest if resume in (True, "latest") else Path(resume)
        if path is None:
            raise TrainingError(f"--resume: {self.out} holds no checkpoint yet; start without --resume")
        if (path / "checkpoints").is_dir():
            path = CheckpointStore(path).latest() or path
        return path

    def _check_identity(self, state: dict, path: Path) -> None:
        saved, current = {**self.IDENTITY_DEFAULTS, **state.get("identity", {})}, self.identity()
        diffs = [f"{k}: checkpoint {json.dumps(saved.get(k))} vs now {json.dumps(current.get(k))}"
                 for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if diffs:
            raise ConfigMismatchError(
                f"the settings do not match the checkpoint {path} being resumed: {'; '.join(diffs)}. Resume with the "
                f"original settings (see {self.out / 'config.json'}), or start a new run with another --out")

    def _truncate_metrics(self, step: int) -> None:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def save(self, step: int) -> Path | None:
        files = self.checkpoint_files()          # collective: every rank takes part
        path, error = None, None
        if self.dist.is_main:
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["torch_cuda"] = torch.cuda.get_rng_state()
            files["rng"] = (rng, {})
            state = {"identity": self.identity(), "world_size": self.dist.world, "command": self.name,
                     "data_position": {"step": step, "samples_seen": step * self.settings["batch_size"],
                                       "global_batch": self.settings["batch_size"]},
                     "metrics": self.last_metrics}
            try:
                path = self.store.save(step, files, state)
            except CheckpointWriteError as exc:
                error = exc
        # every rank learns the outcome, so none of them carries on alone after a failed write
        message = self.dist.broadcast_object(None if error is None else str(error))
        if message is not None:
            if error is not None:
                raise error
            raise CheckpointWriteError(message)
        return path

    def export(self, folder: Path) -> None:
        """Copy the inference files of the newest checkpoint to ``folder`` (model.safetensors, ...)."""
        latest = self.store.latest()
        if latest is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.EXPORT:
            source = latest / f"{name}.safetensors"
            if source.is_file():
                tmp = folder / f".{name}.safetensors.tmp"
                shutil.copyfile(source, tmp)
                os.replace(tmp, folder / f"{name}.safetensors")

    def run(self) -> dict:
        settings, dist = self.settings, self.dist
        max_steps = int(settings["steps"])
        resume_from = self._resume_path()
        if resume_from is not None:
            state = CheckpointStore.read_state(resume_from)
            if state.get("command") != self.name:
                raise TrainingError(f"{resume_from} is a {state.get('command')!r} checkpoint; resume it with "
                                    f"`python -m reducio.train {state.get('command')}`")
            self._check_identity(state, resume_from)
            self.load_checkpoint(resume_from, state)
            rng, _ = CheckpointStore.read_tensors(resume_from, "rng")
            torch.set_rng_state(rng["torch_cpu"])
            self.step = int(state["step"])
            if dist.is_main:
                self._truncate_metrics(self.step)
                print(f"[{self.name}] resumed from {resume_from} at step {self.step}", file=sys.stderr)
        elif dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(
                {"command": self.name, "settings": {k: v for k, v in settings.items() if k != "resume"},
                 "identity": self.identity()}, indent=1, sort_keys=True, default=str))
        dist.barrier()

        order = GlobalOrder(len(self.dataset), int(settings["batch_size"]), dist.world, self.seed)
        loader = DataLoader(self.dataset, batch_sampler=StepBatches(order, self.step, max_steps, dist.rank),
                            collate_fn=collate, num_workers=int(settings.get("num_workers", 0)))
        progress = Progress(self.name, max_steps, self.step, int(settings["batch_size"]),
                            int(settings.get("log_every", 10)), dist.is_main and not settings.get("quiet"))
        metrics_path = self.out / "metrics.jsonl"
        ckpt_every, sample_every = int(settings.get("ckpt_every", 0)), int(settings.get("sample_every", 0))
        log_every = max(1, int(settings.get("log_every", 10)))
        skipped = 0
        with StopSignal() as stop:
            iterator = iter(loader)
            while self.step < max_steps:
                batch = next(iterator)
                step = self.step
                local = self.train_step(batch, order.sample_numbers(step, dist.rank), step)
                names = list(local)
                values = torch.stack([local[k].detach().float().reshape(()).cpu() for k in names])
                flags = torch.tensor([float(stop.requested), float(batch.get("skipped", 0))])
                reduced = dist.all_reduce_mean(torch.cat([values, flags]).to(self.device)).cpu()
                self.step = step + 1
                metrics = {k: float(v) for k, v in zip(names, reduced[: len(names)])}
                skipped += int(round(float(reduced[-1]) * dist.world))
                clips_per_s = progress.throughput(self.step)
                self.last_metrics = metrics
                if dist.is_main and (self.step % log_every == 0 or self.step == max_steps):
                    record = {"step": self.step, **metrics, "clips_per_s": round(clips_per_s, 4),
                              "skipped_files": skipped, "time": round(time.time(), 3)}
                    with open(metrics_path, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                progress.update(self.step, metrics, clips_per_s)
                stopping = float(reduced[len(names)]) > 0
                if stopping or (ckpt_every and self.step % ckpt_every == 0) or self.step == max_steps:
                    path = self.save(self.step)
                    if stopping:
                        raise TrainingStopped(f"stopped at step {self.step}; checkpoint saved to {path or self.out}. "
                                              f"Continue with the same command plus --resume")
                if sample_every and self.step % sample_every == 0:
                    self.write_sample(self.step)
        if dist.is_main:
            self.export(self.out / "final")
        dist.barrier()
        return {"step": self.step, "metrics": self.last_metrics, "skipped_files": skipped}
