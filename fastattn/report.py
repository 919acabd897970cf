"""Human-facing summaries of a plan: method map image, legend, cost figures and a text summary.

The method map is a float32 RGB array ``[H, W, 3]`` in 0..1 (numpy), laid out like the paper's
compression-plan figures: one column per step (left = first step), one row per layer (top =
layer 0), one colour per method, thin dark grid lines between cells. Head-wise plans get one
thin row per head inside each layer row. :func:`method_map_figure` puts that map in a figure a
person can read on its own: title, labelled axes with tick numbers, and a legend with each
method's share of the cells and of the attention work kept. ComfyUI nodes turn either into an
IMAGE with ``torch.from_numpy(image)[None]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .flops import AttentionShape, PlanCost, amdahl_speedup_bound, headwise_method_core, plan_cost
from .methods import METHOD_STRINGS, method_style
from .plan import Plan

# Colour (RGB 0..1) and label of every V1 method, from the one vocabulary (fastattn.methods);
# arrow methods get theirs from `method_style` too.
METHOD_STYLE: dict[str, tuple[tuple[float, float, float], str]] = {
    m: (method_style(m).colour, method_style(m).label) for m in METHOD_STRINGS}
GRID_COLOUR = (0.08, 0.08, 0.08)
MAX_IMAGE_SIDE = 4096


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def legend(methods: list[str] | None = None) -> list[dict[str, str]]:
    """Colour legend ``[{"method", "label", "colour"}]`` for the given (default: all) methods."""
    methods = methods if methods is not None else list(METHOD_STRINGS)
    return [{"method": m, "label": method_style(m).label, "colour": _hex(method_style(m).colour)}
            for m in methods]


def legend_text(plan: Plan | None = None) -> str:
    used = list(plan.method_counts()) if plan is not None else None
    return "\n".join(f"{e['colour']}  {e['label']} ({e['method']})" for e in legend(used))


def method_map(plan: Plan, cell: int = 12, grid: int = 1) -> np.ndarray:
    """Render the plan as an RGB float image ``[layers*cell, steps*cell, 3]`` (rows = layers)."""
    if cell < 1 or grid < 0 or grid >= cell:
        raise ValueError("cell must be >= 1 and 0 <= grid < cell")
    steps, layers = plan.num_steps, plan.num_layers
    # keep huge plans renderable: shrink cells rather than allocate gigabytes
    cell = max(1, min(cell, MAX_IMAGE_SIDE // max(steps, layers)))
    grid = grid if cell > 2 else 0
    heads = plan.metadata.num_heads if plan.granularity == "head" else None
    colours = {m: method_style(m).colour for m in plan.method_counts()}
    image = np.empty((layers * cell, steps * cell, 3), dtype=np.float32)
    image[:] = GRID_COLOUR
    for t in range(steps):
        for i in range(layers):
            y0, x0 = i * cell, t * cell
            x1 = x0 + cell - grid
            if heads is None:
                image[y0:y0 + cell - grid, x0:x1] = colours[plan.methods[t][i]]
                continue
            inner = cell - grid
            for h, method in enumerate(plan.methods[t][i]):
                ya = y0 + (h * inner) // heads
                yb = y0 + ((h + 1) * inner) // heads
                image[ya:max(yb, ya + 1), x0:x1] = colours[method]
    return image


@dataclasses.dataclass(frozen=True)
class PlanReport:
    counts: dict[str, int]
    cost: PlanCost | None
    window_fraction: float | None
    attention_share: float | None
    speedup_bound_core: float | None
    speedup_bound_module: float | None
    text: str


def _recorded_shape(plan: Plan) -> AttentionShape | None:
    """The attention shape the plan's metadata records, when complete (layer-wise plans)."""
    if plan.granularity != "layer":
        return None
    try:
        return AttentionShape.from_plan(plan)
    except ValueError:
        return None


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def summarize(plan: Plan, shape: AttentionShape | None = None,
              attention_share: float | None = None) -> PlanReport:
    """Counts, corrected cost figures and (with a measured attention share) a speed bound.

    Without ``shape``, the shape recorded in the plan's metadata is used when complete
    (token grid, heads, head dim, window); otherwise the cost lines are left out.
    """
    shape = shape if shape is not None else _recorded_shape(plan)
    counts = plan.method_counts()
    total = sum(counts.values())
    meta = plan.metadata
    lines = [f"DiTFastAttn plan: {plan.num_steps} steps x {plan.num_layers} layers"
             + (f" x {meta.num_heads} heads" if plan.granularity == "head" else "")
             + (f" ({meta.architecture})" if meta.architecture else "")]
    settings = []
    if meta.threshold is not None:
        settings.append(f"threshold {meta.threshold:g}")
    if meta.window is not None:
        settings.append(f"window {meta.window[0]}/{meta.window[1]} tokens per side")
    if meta.token_grid:
        settings.append("token grid " + "x".join(map(str, meta.token_grid)))
    if meta.sampler:
        settings.append(f"sampler {meta.sampler}")
    if meta.cfg_scale is not None:
        settings.append(f"CFG {meta.cfg_scale:g}")
    if settings:
        lines.append("calibrated with " + ", ".join(settings))
    lines.append("methods: " + ", ".join(f"{method_style(m).label.split(' (')[0]} {n} "
                                         f"({_percent(n / total)})" for m, n in counts.items()))
    cost = window_fraction = bound_core = bound_module = None
    if shape is not None and plan.granularity == "layer":
        cost = plan_cost(plan, shape)
        window_fraction = shape.window_fraction() if shape.window is not None else None
        per_method = method_flops_share(plan, shape)
        lines.append("attention FLOPs kept per method (share of full attention): "
                     + ", ".join(f"{method_style(m).label.split(' (')[0]} {_percent(v)}"
                                 for m, v in per_method.items()))
        lines.append(f"attention work kept: core (QK^T, PV) {_percent(cost.core_fraction)}, "
                     f"module incl. Q/K/V/O projections {_percent(cost.module_fraction)}"
                     + (f"; window covers {_percent(window_fraction)} of the score matrix"
                        if window_fraction is not None else ""))
        if attention_share is not None:
            bound_core = amdahl_speedup_bound(attention_share, cost.core_fraction)
            bound_module = amdahl_speedup_bound(attention_share, cost.module_fraction)
            lines.append(f"with self-attention at {_percent(attention_share)} of the run time, "
                         f"end-to-end speed-up at most {bound_module:.2f}x (Amdahl, module "
                         f"work; real kernels reach less)")
    if plan.granularity == "head":
        per_method = headwise_flops_share(plan)
        if per_method is not None:
            lines.append("attention FLOPs kept per method (share of full attention): "
                         + ", ".join(f"{method_style(m).label.split(' (')[0]} {_percent(v)}"
                                     for m, v in per_method.items())
                         + f"; total {_percent(sum(per_method.values()))}")
    for note in meta.notes:
        lines.append(f"note: {note}")
    return PlanReport(counts=counts, cost=cost, window_fraction=window_fraction,
                      attention_share=attention_share, speedup_bound_core=bound_core,
                      speedup_bound_module=bound_module, text="\n".join(lines))


# ---- the figure -----------------------------------------------------------------------------------
FIGURE_BACKGROUND = (1.0, 1.0, 1.0)
FIGURE_TEXT = (0.1, 0.1, 0.1)
MIN_FIGURE_CELL = 14      # px: cells below this are hard to see; the figure grows instead
MAX_FIGURE_CELL = 28


def _font(size: int):
    from PIL import ImageFont

    try:   # Pillow >= 10.1 ships a scalable default font
        return ImageFont.load_default(size=size)
    except TypeError:   # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _tick_every(count: int, cell: int, label_px: int) -> int:
    """Label every n-th row/column so the numbers never overlap."""
    for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        if n * cell >= label_px:
            return n
    return max(1, count // 10)


def method_flops_share(plan: Plan, shape: AttentionShape) -> dict[str, float]:
    """Attention-core work each method keeps, as a fraction of the same run at full attention
    (layer-wise plans; the values add up to ``plan_cost(plan, shape).core_fraction``)."""
    cost = plan_cost(plan, shape)
    kept: dict[str, float] = {m: 0.0 for m in plan.method_counts()}
    for t, row in enumerate(plan.methods):
        for i, method in enumerate(row):
            kept[method] += cost.per_step_layer_core[t][i]
    return {m: v / cost.core_full for m, v in kept.items()}


def headwise_flops_share(plan: Plan) -> dict[str, float] | None:
    """Per method, the attention-core work its heads keep as a share of full attention
    (head-wise V2 plans whose metadata records the head layout; None otherwise)."""
    try:
        core, core_full = headwise_method_core(plan)
    except ValueError:
        return None
    return {m: v / core_full for m, v in core.items()}


def method_map_figure(plan: Plan, shape: AttentionShape | None = None, title: str | None = None,
                      cell: int | None = None) -> np.ndarray:
    """The method map with a title, axes (step across, layer down; heads inside each layer row for
    head-wise plans), tick numbers and a legend (method, share of cells and, when the attention
    shape is known, of the full-attention core work kept). RGB float ``[H, W, 3]`` in 0..1.

    Needs Pillow for the lettering (it comes with ComfyUI).
    """
    from PIL import Image, ImageDraw

    steps, layers = plan.num_steps, plan.num_layers
    heads = plan.metadata.num_heads if plan.granularity == "head" else None
    if cell is None:
        per_layer = MIN_FIGURE_CELL if heads is None else max(MIN_FIGURE_CELL, 5 * heads + 2)
        cell = max(per_layer, min(MAX_FIGURE_CELL, 900 // max(steps, 1)))
    cell = max(2, min(cell, MAX_IMAGE_SIDE // max(steps, layers)))
    cells = method_map(plan, cell=cell, grid=1 if cell > 4 else 0)
    font, small = _font(15), _font(12)
    shape = shape if shape is not None else _recorded_shape(plan)
    counts = plan.method_counts()
    total = sum(counts.values())
    flops = method_flops_share(plan, shape) if shape is not None and plan.granularity == "layer" else None
    if heads:
        flops = headwise_flops_share(plan)
    rows = []
    for method, n in counts.items():
        label = f"{method_style(method).label}: {_percent(n / total)} of " + ("heads" if heads else "cells")
        if flops is not None:
            label += f", keeps {_percent(flops[method])} of full attention FLOPs"
        rows.append((method_style(method).colour, label))
    if flops is not None:
        rows.append((None, f"total attention FLOPs kept: {_percent(sum(flops.values()))}"))

    margin_left, margin_top, pad = 74, 68, 14
    map_h, map_w = cells.shape[:2]
    legend_h = 22 * len(rows) + pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(measure.textlength(label, font=small) for _, label in rows) + pad + 22 + pad
    width = int(max(margin_left + map_w + pad, 400, text_w))
    height = margin_top + map_h + 34 + legend_h
    canvas = Image.new("RGB", (width, height), tuple(round(255 * c) for c in FIGURE_BACKGROUND))
    canvas.paste(Image.fromarray((cells * 255).round().astype(np.uint8)), (margin_left, margin_top))
    draw = ImageDraw.Draw(canvas)
    ink = tuple(round(255 * c) for c in FIGURE_TEXT)
    meta = plan.metadata
    heading = title or ("DiTFastAttn plan" + (f" - {meta.architecture}" if meta.architecture else "")
                        + (" (head-wise)" if heads else ""))
    draw.text((pad, 8), heading, fill=ink, font=font)
    draw.text((margin_left, margin_top - 38), "denoising step (first step left)", fill=ink, font=small)
    every = _tick_every(steps, cell, 26)
    for t in range(0, steps, every):
        draw.text((margin_left + t * cell + 1, margin_top - 18), str(t), fill=ink, font=small)
    draw.text((4, margin_top - 18), "layer", fill=ink, font=small)
    every = _tick_every(layers, cell, 16)
    for i in range(0, layers, every):
        draw.text((margin_left - 34, margin_top + i * cell + max(0, cell // 2 - 7)), str(i), fill=ink, font=small)
    if heads:
        draw.text((4, margin_top + map_h + 6), f"each layer row: heads 0..{heads - 1}, top to bottom",
                  fill=ink, font=small)
    y = margin_top + map_h + 30
    for colour, label in rows:
        if colour is not None:
            swatch = tuple(round(255 * c) for c in colour)
            draw.rectangle((pad, y + 2, pad + 14, y + 16), fill=swatch, outline=ink)
        draw.text((pad + 22, y + 1), label, fill=ink, font=small)
        y += 22
    return np.asarray(canvas, dtype=np.float32) / 255.0
