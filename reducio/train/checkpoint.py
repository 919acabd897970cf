"""Training checkpoints: one folder per step, written atomically, safetensors + JSON only (no pickle).

Layout of a run folder::

    RUN/config.json                     the run's settings (what a resume is checked against)
    RUN/metrics.jsonl                   one JSON object per logged step
    RUN/samples/step_00000100.mp4       previews
    RUN/checkpoints/step_00000100/      model.safetensors (an inference checkpoint the loaders read),
                                        ema.safetensors, optimizer*.safetensors, ..., state.json
    RUN/checkpoints/latest              name of the newest complete checkpoint folder

A checkpoint folder is first written as ``.step_N.tmp-PID`` and renamed when every file is complete;
``latest`` is replaced atomically afterwards. A failed write (full disk, Ctrl-C during the write)
removes the temporary folder and leaves the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ..files import atomic_write_safetensors
from .errors import CheckpointWriteError, TrainingError

STATE_FILE = "state.json"
LATEST_FILE = "latest"
FORMAT = "reducio-train-checkpoint"
FORMAT_VERSION = 1
# bound what a state.json may claim before it is parsed
MAX_STATE_BYTES = 64 << 20


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ optimizer state <-> tensors
def flatten_optimizer_state(state: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict (``torch.distributed.checkpoint.state_dict`` format) ->
    (tensors ``state/<param>/<field>``, JSON-able param groups and non-tensor state)."""
    tensors, scalars = {}, {}
    for name, fields in state["state"].items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{name}/{field}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{field}"] = value
    groups = []
    for group in state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], extra: Mapping) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        _, name, field = key.split("/", 2)
        state.setdefault(name, {})[field] = value
    for key, value in extra.get("scalars", {}).items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = value
    groups = []
    for group in extra["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------ the store
class CheckpointStore:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.keep = max(1, int(keep))

    def latest(self) -> Path | None:
        pointer = self.folder / LATEST_FILE
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text(encoding="utf-8").strip()
        return path if (path / STATE_FILE).is_file() else None

    def save(self, step: int, files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
             state: dict) -> Path:
        """Write ``files`` (name -> (tensors, metadata)) and ``state`` as checkpoint ``step``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}"
        final = self.folder / name
        previous = self.latest()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.folder))
        try:
            for file_name, (tensors, metadata) in files.items():
                atomic_write_safetensors(tensors, metadata, tmp / f"{file_name}.safetensors", overwrite=True)
            state = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **state}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
            _fsync_dir(tmp)
            if final.exists():          # re-saving a step (e.g. after a resume): swap the folders
                old = self.folder / f".{name}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            atomic_write_text(self.folder / LATEST_FILE, name)
            _fsync_dir(self.folder)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
                raise CheckpointWriteError(
                    f"writing checkpoint {name} to {self.folder} failed ({exc.strerror or exc}); {kept}. Free disk "
                    f"space (or move the run with --out) and continue with --resume") from exc
            raise
        self._prune(keep_also=final)
        return final

    def _prune(self, keep_also: Path) -> None:
        done = sorted(p for p in self.folder.glob("step_*") if p.is_dir())
        for path in done[:-self.keep]:
            if path != keep_also:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def read_state(path: Path) -> dict:
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise TrainingError(f"{path} is not a training checkpoint (no {STATE_FILE}); pass a checkpoint folder "
                                f"or the run folder")
        if state_path.stat().st_size > MAX_STATE_BYTES:
            raise TrainingError(f"{state_path} is larger than {MAX_STATE_BYTES} bytes; it is not a checkpoint state")
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
            raise TrainingError(f"{state_path} is not a {FORMAT} v{FORMAT_VERSION} file")
        return state

    @staticmethod
    def read_tensors(path: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from safetensors import SafetensorError, safe_open

        file = path / f"{name}.safetensors"
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise TrainingError(f"checkpoint file {file} cannot be read ({exc}); resume from an earlier checkpoint "
                                f"folder with --resume PATH") from None
