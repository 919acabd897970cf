"""Finding and importing a real ComfyUI for the test tiers 2 and 3.

Tests never mock ComfyUI: tier 2 imports the real modules in-process, tier 3 starts the real server.
The ComfyUI under test comes from ``COMFYUI_PATH`` (the test runner sets it once per installed
version) or comfy-cli's default workspace ``~/comfy/ComfyUI``.
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER_NAME = "reducio-fastattn"   # folder name the pack is loaded under in tests


@dataclass(frozen=True)
class ComfyInstall:
    root: Path
    version: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", self.version)[:3])


def read_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text()
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return match.group(1) if match else "unknown"


def locate_comfyui() -> ComfyInstall | None:
    """The ComfyUI this test process should use, or None when there is none."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]).expanduser())
    else:
        candidates.append(Path.home() / "comfy" / "ComfyUI")
    for root in candidates:
        if (root / "main.py").is_file() and (root / "comfyui_version.py").is_file():
            return ComfyInstall(root.resolve(), read_version(root))
    return None


def missing_comfyui_message() -> str:
    where = os.environ.get("COMFYUI_PATH") or str(Path.home() / "comfy" / "ComfyUI")
    return (
        "\n" + "!" * 78 + "\n"
        f"!!! NO ComfyUI FOUND at {where}: ComfyUI test tiers (2: in-process, 3: server) DID NOT RUN.\n"
        "!!! Install it with scripts/setup_comfyui.sh, or point COMFYUI_PATH at a ComfyUI checkout\n"
        "!!! and run the tests with that ComfyUI's Python (scripts/test.sh does both).\n"
        + "!" * 78
    )


def prepare_pack_link(base_dir: Path) -> Path:
    """A custom_nodes folder holding only a link to this checkout, under a fixed folder name.

    ComfyUI loads the pack from its own checkout this way, without copying it into
    ComfyUI/custom_nodes, and the folder name (which ComfyUI shows, e.g. for templates) is stable.
    """
    custom_nodes = base_dir / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_FOLDER_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


class InProcessComfy:
    """A real ComfyUI imported into this process, with the pack loaded by ComfyUI's own loader."""

    def __init__(self, install: ComfyInstall, work_dir: Path):
        self.install = install
        self.work_dir = work_dir
        root = str(install.root)
        if root not in sys.path:
            sys.path.insert(0, root)
        # comfy.* parses no command line when imported outside main.py; force the CPU before
        # anything imports comfy.model_management.
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import folder_paths
        import nodes

        self.nodes = nodes
        self.folder_paths = folder_paths
        self.models_dir = work_dir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        output_dir = work_dir / "output"
        input_dir = work_dir / "input"
        output_dir.mkdir(exist_ok=True)
        input_dir.mkdir(exist_ok=True)
        folder_paths.set_output_directory(str(output_dir))
        folder_paths.set_input_directory(str(input_dir))
        self.output_dir, self.input_dir = output_dir, input_dir
        self._core_extras_loaded = False
        link = prepare_pack_link(work_dir)
        before = set(nodes.NODE_CLASS_MAPPINGS)
        ok = asyncio.run(nodes.load_custom_node(str(link)))
        if not ok:
            raise RuntimeError("ComfyUI failed to load the pack (see the log above)")
        self.pack_node_ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        self.pack_module = sys.modules[str(link).replace(".", "_x_")]

    def models_folder(self, name: str) -> Path:
        """A temporary folder registered under ComfyUI's model folder ``name``; write test models there."""
        path = self.models_dir / name
        path.mkdir(parents=True, exist_ok=True)
        self.folder_paths.add_model_folder_path(name, str(path))
        return path

    def load_core_extras(self) -> None:
        """Load ComfyUI's own extra nodes (comfy_extras: CreateVideo, EasyCache, SaveLatent, ...)."""
        if not self._core_extras_loaded:
            asyncio.run(self.nodes.init_builtin_extra_nodes())
            self._core_extras_loaded = True

    def node(self, node_id: str):
        if node_id not in self.nodes.NODE_CLASS_MAPPINGS and not self._core_extras_loaded:
            self.load_core_extras()
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]

    def execute(self, node_id: str, **inputs):
        """Run a node the way the executor does for V3 and V1 nodes; returns the output tuple."""
        cls = self.node(node_id)
        if hasattr(cls, "execute") and hasattr(cls, "define_schema"):
            result = cls.execute(**inputs)
            if asyncio.iscoroutine(result):
                result = asyncio.run(result)
            return tuple(result.result) if hasattr(result, "result") else tuple(result)
        instance = cls()
        result = getattr(instance, cls.FUNCTION)(**inputs)
        if isinstance(result, dict):
            return tuple(result["result"])
        return tuple(result)
