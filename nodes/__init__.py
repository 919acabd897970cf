"""ComfyUI nodes of the pack: the only package here that imports ComfyUI.

Each feature lives in its own module exposing ``NODES`` (a list of ``io.ComfyNode`` classes) and,
optionally, ``register()`` for one-time set-up such as model folders. This module gathers them
into the V3 extension that ComfyUI discovers through ``comfy_entrypoint``.
"""
from __future__ import annotations

import importlib
import logging

from ._compat import ComfyExtension, io

log = logging.getLogger(__name__)

# Feature modules, in the order their nodes are listed. A module that fails to import is logged
# and skipped, so one broken feature never hides the others.
FEATURE_MODULES = (
    "reducio_vae",
    "reducio_dit",
    "fastattn_nodes",
    "embedded_models",
)


def _load_feature_modules():
    modules = []
    for name in FEATURE_MODULES:
        try:
            modules.append(importlib.import_module(f".{name}", __name__))
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # feature not present in this build
            log.exception("reducio-fastattn: failed to import nodes.%s", name)
        except Exception:
            log.exception("reducio-fastattn: failed to import nodes.%s", name)
    return modules


class ReducioFastAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        node_classes: list[type[io.ComfyNode]] = []
        for module in _load_feature_modules():
            register = getattr(module, "register", None)
            if register is not None:
                register()
            node_classes.extend(getattr(module, "NODES", ()))
        return node_classes


async def comfy_entrypoint() -> ReducioFastAttnExtension:
    return ReducioFastAttnExtension()
