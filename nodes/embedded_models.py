"""The embedded tiny models in ComfyUI: nothing to install by hand.

The trained tiny Reducio VAE and Reducio-DiT ship in the pack's ``models/reducio`` folder, which the
Reducio loaders list next to ``models/reducio`` (``_folders.PACK_FOLDERS``). The condition encoders
the tiny DiT was trained with (a T5-base text model for ``CLIPLoader``, a TAESD-format image VAE for
``VAELoader``) are generated once, deterministically, into ``models/generated/`` inside the pack
(about 230 MB, a few seconds) the first time ComfyUI starts with the pack, checked against the
hashes recorded at training (``reducio.embedded``), and listed in ComfyUI's ``text_encoders`` and
``vae`` folders. ``REDUCIO_NO_EMBEDDED=1`` skips the generation. The sample inputs of the embedded
models' example workflows (``workflows/inputs/``) are copied into ComfyUI's input folder, so the
examples' LoadVideo / LoadImage find them; a user's file of the same name is never replaced.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..reducio import embedded

log = logging.getLogger(__name__)
GENERATED_DIR = embedded.MODELS_DIR / "generated"
NODES: list = []


def copy_samples(input_dir: str | Path) -> list[Path]:
    """Copy the shipped sample inputs into ``input_dir`` where no file of that name exists."""
    copied = []
    for name in (embedded.SAMPLE_CLIP, embedded.SAMPLE_CONTENT):
        source, target = embedded.SAMPLES_DIR / name, Path(input_dir) / name
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(target)
    return copied


def register() -> None:
    import folder_paths

    if os.environ.get("REDUCIO_NO_EMBEDDED") == "1":
        return
    try:
        copy_samples(folder_paths.get_input_directory())
    except OSError:   # a read-only input folder: the examples then ask for the file, nothing else breaks
        log.exception("reducio-fastattn: could not copy the example inputs into ComfyUI's input folder")
    if not (embedded.REDUCIO_MODELS_DIR / embedded.DIT_FILE).exists():
        return   # no embedded DiT in this checkout: its encoders are not needed
    try:
        missing = [s for s in embedded.STANDINS if not (GENERATED_DIR / s.comfy_folder / s.file_name).exists()]
        if missing:
            log.info("reducio-fastattn: generating the embedded tiny DiT's condition encoders (%s) in %s, once",
                     ", ".join(s.file_name for s in missing), GENERATED_DIR)
        for standin in embedded.STANDINS:
            embedded.write_standin(standin, GENERATED_DIR, check=True)
            folder_paths.add_model_folder_path(standin.comfy_folder, str(GENERATED_DIR / standin.comfy_folder))
    except Exception:   # never stop ComfyUI from starting; the workflows will say the file is missing
        log.exception("reducio-fastattn: could not provide the embedded models' condition encoders")
