"""Turn an API-format prompt into the UI-format workflow the ComfyUI frontend saves.

Used to produce (and, in tier 3, to check) the UI twins of the DiTFastAttn example workflows from
their API files and the running server's /object_info, so both formats always describe the same
graph with widget values in the positions the frontend expects.
"""
from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Layout estimates in LiteGraph pixels, measured in the real frontend (1.27 and 1.35) by the browser
# tier: a title bar above the node, one 20 px row per socket, about 25 px per widget value.
TITLE_BAR_PX, SOCKET_ROW_PX, WIDGET_ROW_PX, NODE_GAP_PX = 30, 20, 25, 40
# The frontend widens a node to fit its title (about 8 px per character at the default font, plus the
# collapse dot and padding); columns are spaced by their widest node so long titles never overlap.
NODE_WIDTH_PX, TITLE_CHAR_PX, TITLE_PADDING_PX, COLUMN_GAP_PX = 340, 8, 50, 60


def _estimated_width(title: str) -> int:
    return max(NODE_WIDTH_PX, TITLE_CHAR_PX * len(title) + TITLE_PADDING_PX)


def _estimated_body_height(node: dict) -> int:
    socket_rows = max(len(node["inputs"]), len(node["outputs"]))   # widgets are not in node["inputs"]
    return SOCKET_ROW_PX * socket_rows + WIDGET_ROW_PX * len(node["widgets_values"]) + 20


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        names = order.get(section) or list(specs)
        out += [(name, specs[name]) for name in names if name in specs]
    return out


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    ids = {node_id: i + 1 for i, node_id in enumerate(sorted(prompt, key=int))}
    links, nodes = [], []
    outputs_links: dict[tuple[int, int], list[int]] = {}
    for node_id in sorted(prompt, key=int):
        node = prompt[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in _ordered_inputs(info):
            value = node["inputs"].get(name)
            if _is_widget(spec):
                if isinstance(value, list):
                    raise ValueError(f"node {node_id}: widget {name} driven by a link is not supported")
                widgets.append(value)
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if spec[0] == "INT" and (name in ("seed", "noise_seed") or opts.get("control_after_generate")):
                    widgets.append("fixed")     # reproducible examples: never randomise the seed
                continue
            link_id = None
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = ids[value[0]], int(value[1])
                src_type = object_info[prompt[value[0]]["class_type"]]["output"][slot]
                links.append([link_id, src, slot, ids[node_id], len(inputs), src_type])
                outputs_links.setdefault((src, slot), []).append(link_id)
            inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": link_id})
        nodes.append({"id": ids[node_id], "type": node["class_type"], "inputs": inputs, "widgets_values": widgets,
                      "_info": info, "_title": node.get("_meta", {}).get("title")})
    x, column_width = 60, 0
    for order, node in enumerate(nodes):
        info = node.pop("_info")
        title = node.pop("_title")
        node["outputs"] = [{"name": name, "type": kind, "links": outputs_links.get((node["id"], slot), []),
                            "slot_index": slot}
                           for slot, (name, kind) in enumerate(zip(info.get("output_name", info["output"]), info["output"]))]
        if order % 4 == 0:          # a new column of four nodes, right of the widest node of the last one
            x, y = x + column_width + (COLUMN_GAP_PX if order else 0), 60
            column_width = 0
        height = _estimated_body_height(node)
        column_width = max(column_width, _estimated_width(title or info.get("display_name") or node["type"]))
        node.update({"pos": [x, y], "size": [NODE_WIDTH_PX, height], "flags": {}, "order": order,
                     "mode": 0, "properties": {"Node name for S&R": node["type"]}})
        # The frontend draws a title bar above `pos` and may grow a node to fit its widgets: leave room.
        y += height + TITLE_BAR_PX + NODE_GAP_PX
        if title:
            node["title"] = title
    ordered = [{k: n[k] for k in ("id", "type", "title", "pos", "size", "flags", "order", "mode", "inputs",
                                  "outputs", "properties", "widgets_values") if k in n} for n in nodes]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": ordered, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}
