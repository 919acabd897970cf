"""Model folders the pack registers with ComfyUI's ``folder_paths``.

``extra_model_paths.yaml`` is read before custom nodes load and may already have added one of these
names (pointing at the user's own directory); we then append our default folder instead of
replacing theirs, and widen the extension set to what we accept.
"""
from __future__ import annotations

import os

from ..reducio.embedded import REDUCIO_MODELS_DIR

REDUCIO_FOLDER = "reducio"                 # Reducio VAE and Reducio-DiT checkpoints
PLANS_FOLDER = "ditfastattn_plans"         # DiTFastAttn plans (JSON)
PLAN_EXTENSIONS = {".json"}
# Folders inside the pack that ComfyUI should list too: the embedded tiny trained models.
PACK_FOLDERS = {REDUCIO_FOLDER: [str(REDUCIO_MODELS_DIR)]}


def register_model_folder(name: str, extensions: set[str] | None = None,
                          extra_dirs: list[str] | None = None) -> None:
    """Register ``models/<name>`` (idempotent); keep folders that extra_model_paths.yaml added, and add
    the pack's own folders for ``name`` (``PACK_FOLDERS``) and ``extra_dirs`` after them."""
    import folder_paths

    if extensions is None:
        extensions = set(folder_paths.supported_pt_extensions)
    default_dir = os.path.join(folder_paths.models_dir, name)
    entry = folder_paths.folder_names_and_paths.get(name)
    if entry is None:
        entry = folder_paths.folder_names_and_paths[name] = ([default_dir], set(extensions))
        existing_extensions = None
    else:
        paths, existing_extensions = entry
        if default_dir not in paths:
            paths.append(default_dir)
    paths = entry[0]
    for folder in [*PACK_FOLDERS.get(name, []), *(extra_dirs or [])]:
        if folder not in paths:
            paths.append(folder)
    # add_model_folder_path creates names with an empty extension set, which matches every file;
    # keep that, otherwise widen the set.
    if existing_extensions:
        existing_extensions.update(extensions)
