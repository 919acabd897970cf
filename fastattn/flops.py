"""Attention cost accounting for DiTFastAttn plans (corrected; spec section 3).

Counts are multiply-accumulates (MACs; FLOPs = 2 x MACs) of the compressed **self-attention**
layers only. Two figures, always reported side by side and never mixed:

* **core**: the two attention matmuls, Q K^T and P V: ``2 * rows * pairs * d`` MACs per call,
  where ``pairs`` is the number of (query, key) pairs computed (``N^2`` for full attention, the
  exact count inside the window for window attention) and ``d = heads * head_dim``;
* **module**: core plus the Q, K, V and output projections, ``4 * rows * N * d^2`` MACs
  (biases, softmax and the residual add are ignored).

Per method, at one step of one layer (``rows`` = batch rows of the call, the whole CFG batch):

| method | core | projections |
| --- | --- | --- |
| full attention | N^2 pairs | 4 N d^2 |
| full attention that stores the WA-RS residual | N^2 + window pairs | 4 N d^2 |
| WA-RS (with or without residual) | window pairs | 4 N d^2 |
| ... + ASC | half the rows | half the rows |
| AST | 0 | 0 |

Whether a full step stores a residual follows the plan as inference runs it: iff a WA-RS step
(with residual) of the same layer comes before the next full step (the official
``need_compute_residual``). During calibration every full step stores one; that cost is not
part of a plan's inference cost.

What the official ``utils.calculate_flops`` gets wrong (reproduced only by
``official_counter_macs`` for comparison with published numbers): it computes the window share
as ``(window_size[1] - window_size[0]) / N``, which is 0 for the current ``[w, w]`` convention,
so WA-RS counts as free and residual computation costs nothing; and it sums every module whose
name contains "attn", cross-attention included.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from .methods import FULL, MethodLike, parse_method, residual_needed, residual_needed_headwise
from .plan import Plan

WindowLike = Any  # (left, right) per-side token counts, or an object with kept_pairs(seq_len)


def window_pairs(seq_len: int, window: WindowLike) -> int:
    """Exact number of (query, key) pairs a 1-D window keeps over ``seq_len`` tokens.

    ``window`` is ``(left, right)`` (query i sees keys i-left..i+right, clipped to the
    sequence; values >= seq_len mean unbounded) or any window object with ``kept_pairs``.
    """
    if hasattr(window, "kept_pairs"):
        return int(window.kept_pairs(seq_len))
    left, right = (int(v) for v in window)
    if left < 0 or right < 0:
        raise ValueError(f"window sides must be >= 0 tokens, got {(left, right)}; a negative "
                         f"side means 'unbounded' to flash-attn (the pre-2024-09 [-w, w] bug)")
    n = seq_len
    left, right = min(left, n - 1), min(right, n - 1)
    # sum_i (min(i + r, n - 1) - max(i - l, 0) + 1) = n (l + r + 1) - l (l + 1) / 2 - r (r + 1) / 2
    return n * (left + right + 1) - left * (left + 1) // 2 - right * (right + 1) // 2


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Shape of one compressed self-attention call.

    ``rows``: batch rows per call (with CFG: both halves, e.g. 2 x images). ``cfg``: whether the
    call holds a cond and an uncond half (ASC only saves work then).
    """

    tokens: int
    heads: int
    head_dim: int
    rows: int = 2
    cfg: bool = True
    window: WindowLike = None

    @classmethod
    def from_plan(cls, plan: Plan, rows: int | None = None) -> "AttentionShape":
        """The shape recorded in a plan's metadata (token grid, heads, head dim, window, CFG)."""
        meta = plan.metadata
        missing = [name for name in ("token_grid", "num_heads", "head_dim", "window")
                   if getattr(meta, name) is None]
        if missing:
            raise ValueError(f"the plan's metadata lacks {missing}; build AttentionShape "
                             f"by hand for costs")
        cfg = meta.cfg_scale is None or meta.cfg_scale > 1
        if rows is None:
            rows = (meta.calibration_inputs or 1) * (2 if cfg else 1)
        return cls(tokens=meta.num_tokens, heads=meta.num_heads, head_dim=meta.head_dim,
                   rows=rows, cfg=cfg, window=tuple(meta.window))

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def window_pairs(self) -> int:
        if self.window is None:
            raise ValueError("AttentionShape.window is needed to count window attention")
        return window_pairs(self.tokens, self.window)

    def window_fraction(self) -> float:
        return self.window_pairs() / (self.tokens * self.tokens)


def residual_steps(layer_methods: Sequence[str]) -> list[bool]:
    """Which full steps store a residual at inference: a WA-RS step follows before the next
    full step (the official ``need_compute_residual``). The runtime's own rule is reused so
    the accounting counts exactly the window passes that inference runs."""
    return residual_needed(layer_methods)


@dataclasses.dataclass(frozen=True)
class CallCost:
    core: float
    projections: float

    @property
    def module(self) -> float:
        return self.core + self.projections


def method_cost(method: MethodLike, shape: AttentionShape, stores_residual: bool = False) -> CallCost:
    """MACs of one call of one layer running ``method`` (a V1 method)."""
    m = parse_method(method)
    if m.arrow:
        raise ValueError(f"{m} is a V2 head method; count head-wise plans with headwise_plan_cost")
    if m.output_share:
        return CallCost(0.0, 0.0)
    rows = shape.rows / 2 if (m.cfg_share and shape.cfg) else shape.rows
    d = shape.hidden
    full_pairs = shape.tokens * shape.tokens
    if m.is_full:
        pairs = full_pairs + (shape.window_pairs() if stores_residual else 0)
    else:
        pairs = shape.window_pairs()
    return CallCost(core=2.0 * rows * pairs * d, projections=4.0 * rows * shape.tokens * d * d)


@dataclasses.dataclass(frozen=True)
class PlanCost:
    """Cost of a plan against the same run with full attention everywhere (MACs)."""

    core: float
    core_full: float
    module: float
    module_full: float
    per_step_layer_core: tuple[tuple[float, ...], ...]

    @property
    def core_fraction(self) -> float:
        """Fraction of the attention-core work (Q K^T, P V) that remains."""
        return self.core / self.core_full

    @property
    def module_fraction(self) -> float:
        """Fraction of the attention-module work (core + Q/K/V/O projections) that remains."""
        return self.module / self.module_full


def plan_cost(plan: Plan, shape: AttentionShape) -> PlanCost:
    """Corrected inference cost of a layer-wise plan (every layer has ``shape``)."""
    if plan.granularity != "layer":
        raise ValueError("plan_cost counts layer-wise (V1) plans")
    stores = [residual_steps(plan.layer_methods(i)) for i in range(plan.num_layers)]
    full = method_cost(FULL, shape)
    grid = []
    core = module = 0.0
    for t, row in enumerate(plan.methods):
        costs = [method_cost(m, shape, stores[i][t]) for i, m in enumerate(row)]
        grid.append(tuple(c.core for c in costs))
        core += sum(c.core for c in costs)
        module += sum(c.module for c in costs)
    calls = plan.num_steps * plan.num_layers
    return PlanCost(core=core, core_full=full.core * calls, module=module,
                    module_full=full.module * calls, per_step_layer_core=tuple(grid))


def official_counter_macs(plan: Plan, shape: AttentionShape, window_size: Sequence[int]
                          ) -> float:
    """What the official ``utils.count_flops_attn`` reports for the self-attention layers.

    Reproduces its formula ``2 b N^2 d * ws / N`` with ``ws = window_size[1] - window_size[0]``
    (0 for the current ``[w, w]`` convention) to compare with published numbers. Do not use it
    for anything else: see the module docstring.
    """
    ws = window_size[1] - window_size[0]
    n, d = shape.tokens, shape.hidden
    base = 2.0 * shape.rows * n * n * d
    total = 0.0
    for i in range(plan.num_layers):
        methods = plan.layer_methods(i)
        stores = residual_steps(methods)
        for t, m in enumerate(map(parse_method, methods)):
            half = 0.5 if m.cfg_share else 1.0
            if m.output_share:
                continue
            if m.is_full:
                total += base * (1 + ws / n if stores[t] else 1) * half
            else:
                total += base * ws / n * half
    return total


def amdahl_speedup_bound(attention_share: float, attention_fraction: float) -> float:
    """End-to-end speed-up bound when only the attention part shrinks.

    ``attention_share``: measured share of the uncompressed run's time spent in the compressed
    attention layers (0..1). ``attention_fraction``: remaining fraction of that work (e.g.
    ``PlanCost.module_fraction``). Assumes time proportional to work inside attention (an upper
    bound: window kernels and cache copies are less efficient than dense attention).
    """
    if not 0 <= attention_share <= 1:
        raise ValueError(f"attention_share must be in [0, 1], got {attention_share}")
    if not 0 <= attention_fraction <= 1 + 1e-9:
        raise ValueError(f"attention_fraction must be in [0, 1], got {attention_fraction}")
    remaining = (1 - attention_share) + attention_share * attention_fraction
    return math.inf if remaining == 0 else 1 / remaining


def headwise_plan_cost(plan: Plan, rows: int = 1) -> PlanCost:
    """Corrected inference cost of a head-wise V2 plan.

    Per head and call: full ``L^2`` (query, key) pairs over the whole [text; image] sequence,
    arrow the exact pairs of its band plus every text row and column, cached 0; the extended
    per-head V1 methods as in the table above: WA-RS the pairs of the plan's residual band
    (``metadata.window``), ASC half the rows, and a full head of a call that refreshes
    residuals (some head of the layer uses WA-RS before its next full step) its band once more.
    Projections (``4 L d^2``) are counted at every call: the other heads still need q, k, v
    and the output projection (the official runtime runs them too). Uses the plan's token grid
    (image tokens), text tokens, head count / dim, recorded arrow windows and residual band.
    """
    meta = plan.metadata
    cells = _headwise_cells(plan)  # validates the metadata first
    prefix, suffix = meta.text_tokens
    seq = meta.num_tokens + prefix + suffix
    head_dim, d = meta.head_dim, meta.num_heads * meta.head_dim
    projections = 4.0 * rows * seq * d * d
    grid, core = [], 0.0
    for t, step in enumerate(plan.methods):
        costs = tuple(2.0 * rows * head_dim * sum(cells(t, layer).values()) for layer in range(len(step)))
        grid.append(costs)
        core += sum(costs)
    calls = plan.num_steps * plan.num_layers
    core_full = 2.0 * rows * seq * seq * d * calls
    return PlanCost(core=core, core_full=core_full, module=core + projections * calls,
                    module_full=core_full + projections * calls, per_step_layer_core=tuple(grid))


def _headwise_cells(plan: Plan):
    """cells(step, layer) -> {method: (query, key) pairs its heads compute, rows weighted} of a
    head-wise plan (see `headwise_plan_cost`)."""
    from .windows import Window1D

    meta = plan.metadata
    if plan.granularity != "head":
        raise ValueError("headwise_plan_cost counts head-wise (V2) plans; use plan_cost for V1")
    missing = [n for n in ("token_grid", "num_heads", "head_dim", "text_tokens") if getattr(meta, n) is None]
    if missing:
        raise ValueError(f"the plan's metadata lacks {missing}; head-wise costs need them")
    prefix, suffix = meta.text_tokens
    seq = meta.num_tokens + prefix + suffix
    windows = dict(meta.arrow_windows or {})
    band = _residual_band_pairs(plan, seq)
    refresh = [residual_needed_headwise([step[layer] for step in plan.methods]) for layer in range(plan.num_layers)]

    def pairs(method: str, refreshes: bool) -> float:
        m = parse_method(method)
        if m.output_share:
            return 0.0
        share = 0.5 if m.cfg_share else 1.0
        if m.arrow:
            if method not in windows:
                raise ValueError(f"head-wise cost: arrow method {method!r} has no recorded window")
            left, right = windows[method]
            return float(Window1D(left, right, prefix_tokens=prefix, suffix_tokens=suffix).kept_pairs(seq))
        if (m.window or (m.is_full and refreshes)) and band is None:
            raise ValueError(f"head-wise cost: {method!r} needs the residual band (metadata.window)")
        if m.window:
            return share * band
        return share * (seq * seq + (band if refreshes else 0))

    def cells(step: int, layer: int) -> dict:
        out: dict = {}
        for method in plan.methods[step][layer]:
            out[method] = out.get(method, 0.0) + pairs(method, refresh[layer][step])
        return out

    for t in range(plan.num_steps):      # every method must be countable before any figure is made
        for layer in range(plan.num_layers):
            cells(t, layer)
    return cells


def _residual_band_pairs(plan: Plan, seq: int):
    """(query, key) pairs of the band a head-wise plan's WA-RS heads use, None if it records
    none: the window rule the run used (``extra.window_shape`` / ``window_fraction``, e.g. a
    ComfyUI grid box), else the recorded 1-D ``window`` with global text tokens."""
    from .plan import plan_window
    from .windows import CallInfo, Window1D, window_rule

    meta = plan.metadata
    prefix, suffix = meta.text_tokens
    shape, fraction, sides = plan_window(plan)
    if shape is not None and fraction is not None:
        info = CallInfo(None, 0, seq, tuple(meta.token_grid) if meta.token_grid else None, prefix, suffix)
        return window_rule(shape, fraction)(info).kept_pairs(seq)
    if sides is None:
        return None
    return Window1D(sides[0], sides[1], prefix_tokens=prefix, suffix_tokens=suffix).kept_pairs(seq)


def headwise_method_core(plan: Plan, rows: int = 1) -> tuple[dict[str, float], float]:
    """({method: attention-core MACs its heads keep}, core MACs of full attention) of a V2 plan."""
    cells = _headwise_cells(plan)
    meta = plan.metadata
    prefix, suffix = meta.text_tokens
    seq = meta.num_tokens + prefix + suffix
    per_method: dict[str, float] = {}
    for t in range(plan.num_steps):
        for layer in range(plan.num_layers):
            for method, pairs in cells(t, layer).items():
                per_method[method] = per_method.get(method, 0.0) + 2.0 * rows * meta.head_dim * pairs
    core_full = 2.0 * rows * seq * seq * meta.num_heads * meta.head_dim * plan.num_steps * plan.num_layers
    return per_method, core_full


def call_flops(outcome) -> tuple[float, float]:
    """(dense, kept) attention-core FLOPs of one call the runtime ran (a ``CallOutcome``).

    dense: full attention on every row and head of the call. kept: what ran, per group of
    heads: 0 for a reused output, the window's exact pairs for window methods, full pairs plus
    the window pass for a full step that refreshed the WA-RS residual; ASC counts its computed
    rows only. FLOPs = 2 x the MACs of the module docstring (Q K^T and P V)."""
    seq, head_dim = outcome.seq_len, outcome.head_dim
    full_pairs = seq * seq
    dense = 4.0 * outcome.batch * outcome.heads * full_pairs * head_dim
    kept = 0.0
    for part in outcome.parts:
        if part.rows == 0 or part.method.output_share:
            continue
        if part.method.window:
            pairs = part.window.kept_pairs(seq)
        else:
            pairs = full_pairs + (part.window.kept_pairs(seq) if part.refreshed and part.window is not None else 0)
        kept += 4.0 * part.rows * part.heads * pairs * head_dim
    return dense, kept
