"""Tier 2: ComfyUI's own loader imports the pack and registers well-formed V3 nodes."""

NODE_PREFIXES = ("Reducio", "DiTFastAttn")


def test_pack_loads_through_comfyui_loader(comfy):
    # The pack is imported exactly as ComfyUI imports custom node folders (nodes.load_custom_node).
    assert comfy.pack_module.comfy_entrypoint is not None
    for node_id in comfy.pack_node_ids:
        assert node_id.startswith(NODE_PREFIXES), f"node id {node_id!r} lacks the pack prefix"


def test_every_input_has_a_tooltip(comfy):
    missing = []
    for node_id in comfy.pack_node_ids:
        schema = comfy.node(node_id).define_schema()
        for inp in schema.inputs:
            if not getattr(inp, "tooltip", None):
                missing.append(f"{node_id}.{inp.id}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_pack_does_not_import_comfyui_outside_nodes(repo_root):
    # reducio/ and fastattn/ are pure PyTorch; only nodes/ may import ComfyUI.
    offenders = []
    for package in ("reducio", "fastattn"):
        for path in (repo_root / package).rglob("*.py"):
            text = path.read_text()
            for banned in ("import comfy", "from comfy", "import folder_paths", "from comfy_api"):
                if banned in text:
                    offenders.append(f"{path.relative_to(repo_root)}: {banned}")
    assert not offenders, offenders
