"""File helpers shared by the VAE and DiT checkpoint code: atomic safetensors writes and short key
listings for error messages."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch


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
