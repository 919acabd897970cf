"""File helpers shared by the VAE and DiT checkpoint code: header-only safetensors reading, a size
guard for torch zip archives, atomic safetensors writes and short key listings for error messages."""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch

from .validation import CheckpointError

# torch.save writes its zip archives uncompressed (ZIP_STORED), so the declared sizes of the members
# add up to the file size. A compressed member means a re-packed file whose tensors may expand far
# beyond the file (a zip bomb: 1 MB of deflated zeros is 1 GiB of tensor); only a small slack for the
# pickle and the archive records is allowed before anything is extracted.
ARCHIVE_SLACK_BYTES = 1 << 20

Shapes = dict  # key -> tuple of ints


def read_safetensors_header(path: Union[str, os.PathLike]) -> tuple[Shapes, dict]:
    """(key -> shape, metadata) of a .safetensors file, from its header only (no tensor is read).
    Raises the library's errors for unreadable files; callers turn them into their CheckpointError."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return shapes, metadata


def read_safetensors_tensors(path: Union[str, os.PathLike]) -> dict:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def check_torch_archive(path: Union[str, os.PathLike]) -> None:
    """Refuse a torch zip archive whose members would expand beyond the file itself, before
    ``torch.load`` extracts anything. Legacy (non-zip) pickles hold their data raw and pass."""
    path = Path(path)
    size = path.stat().st_size
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path.name} is truncated or corrupt and cannot be read ({exc}); download it "
                              f"again") from None
    declared = sum(member.file_size for member in members)
    compressed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if declared > size + ARCHIVE_SLACK_BYTES or compressed:
        raise CheckpointError(
            f"refused to load {path.name}: it is a compressed archive whose members would expand from {size:,} "
            f"to {declared:,} bytes (torch.save never compresses, so this file was re-packed, possibly as a "
            f"zip bomb). Use the original checkpoint, or convert it on a trusted machine to .safetensors")


def same_file(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """True when both paths name one existing file (any spelling, symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def abbreviate(items: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are (keeps errors readable)."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def atomic_write_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                             out_path: Union[str, os.PathLike], overwrite: bool = False,
                             create_folder: bool = False) -> Path:
    """Write a .safetensors file via a temporary file in the same folder and an atomic rename, so a
    failed or interrupted write never leaves a half-written file under the target name."""
    from safetensors.torch import save_file

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} already exists; pass --force (overwrite=True) to replace it")
    if create_folder:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    elif not out_path.parent.is_dir():
        raise FileNotFoundError(f"output folder {out_path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_name, metadata=dict(metadata))
        os.replace(tmp_name, out_path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return out_path
