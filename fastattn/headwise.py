"""DiTFastAttnV2 head-wise planning: per-head influence, the budgeted choice, the calibrator.

V2 (spec ditfastattn.md section 5) decides per attention layer, per step and per head
between full attention, arrow attention with a window factor k (text tokens global, image
tokens banded, ``image_tokens // (2k)`` per side) and caching the head's previous output.

* **Influence** of a candidate on a head: the relative squared error of the layer's attention
  output (before the output projection) against full attention at the same step,
  ``mean_{b,l,d}(Y_m - Y)^2 / mean_{b,l,d}(Y - mean_{b,l,d} Y)^2`` (`relative_squared_error`).
  Caching is measured against the layer's output of the previous step.
* **Filter**: only pairs with influence below ``head_coefficient * alpha / H`` may be chosen
  (official c = 1.5; 1.0 in the Wan / CogVideoX processors).
* **Budget** (`solve_budget`): maximise the summed latency gain, at most one candidate per head,
  summed influence <= alpha: a 0/1 integer programme solved with SciPy's ``milp`` (HiGHS).
* **Progressive**: the chosen entry runs at once, so later layers and steps are calibrated on
  the compressed trajectory (and a later cached head copies the value this step produced).

`HeadwiseCalibration` makes the decision inside the attention call, from the layer's own q, k,
v: it is a planner for :class:`fastattn.runtime.FastAttnRuntime` (``planner=``), so it runs
wherever the runtime runs (diffusers processors, ComfyUI's attention override, Reducio-DiT) with
exactly one model forward per step.

Official conventions kept here so that outside checks can compare with the official
``solve_ip``: influence as ``{(head, candidate): rse}`` (or ``[head, candidate, rse]`` rows),
latency gains as ``{candidate: gain}``, the result as ``[(head, code)]`` in the order of the
influence entries, with code ``"0"`` = cache and ``"<k>"`` = arrow factor k.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .kernels import headwise_window_attention, reference_attention
from .methods import ARROW_PREFIX, FULL, OUTPUT_SHARE, arrow_factor, arrow_method
from .windows import CallInfo, Window1D

#: The official SD3 candidate set (highest compression first); FLUX's equivalent arrow
#: candidates are named ``without_residual_window_attn_<k>`` there.
OFFICIAL_CANDIDATES: Tuple[str, ...] = ("output_share", "arrow_attn_8", "arrow_attn_16", "arrow_attn_32")
#: Official head constraint coefficient c (SD3 / FLUX processors).
OFFICIAL_HEAD_COEFFICIENT = 1.5
CACHE_CODE = "0"
METRIC = "v2_relative_squared_error"

Influence = Union[Mapping[Tuple[int, str], float], Iterable[Sequence[Any]]]
Solution = List[Tuple[int, str]]


# ----------------------------------------------------------------------------- vocabulary


def candidate_code(candidate: str) -> str:
    """The official plan code of a candidate name: ``output_share`` -> "0", ``arrow_attn_<k>``
    -> "<k>" (also the ASC / reorder codes ``cfg_share`` -> "-1", ``*cfg*_<k>`` -> "-<k>",
    ``reorder*_<k>`` -> "re<k>", which this package parses but does not run)."""
    if not isinstance(candidate, str) or not candidate:
        raise ValueError(f"a V2 candidate is a non-empty string, got {candidate!r}")
    if candidate == "output_share":
        return CACHE_CODE
    if candidate == "cfg_share":
        return "-1"
    tail = candidate.split("_")[-1]
    if not tail.isdigit():
        raise ValueError(f"unknown V2 candidate {candidate!r}: expected output_share or a window "
                         f"candidate ending in its factor, e.g. {ARROW_PREFIX}8")
    if "cfg" in candidate:
        return "-" + tail
    if "reorder" in candidate:
        return "re" + tail
    return tail


def candidate_method(candidate: str):
    """The runtime method of a V2 candidate this package runs (caching or arrow attention)."""
    if candidate == "output_share":
        return OUTPUT_SHARE
    factor = arrow_factor(candidate)
    if factor is None:
        raise ValueError(f"V2 candidate {candidate!r} is not supported; supported: output_share and "
                         f"{ARROW_PREFIX}<k> (CFG-sharing and reorder candidates are not implemented)")
    return arrow_method(factor)


def arrow_window(image_tokens: int, factor: int) -> int:
    """Per-side image window of arrow factor k: ``image_tokens // (2k)`` (official)."""
    return int(image_tokens) // (2 * int(factor))


def arrow_gain(factor: int, image_tokens: int, text_tokens: int) -> float:
    """Official "estimate" latency gain of arrow factor k: the share of the [text; image]
    score matrix that the band leaves out, ``(N - N/(2k))^2 / (N + N_txt)^2``.

    Evaluated as one minus the computed share, ``1 - ((N + N_txt)^2 - (N - N/(2k))^2) /
    (N + N_txt)^2``: the same number, and this order of operations gives the official floats
    bit for bit (the golden gains), so ties in the budget ILP break the same way."""
    n = float(image_tokens)
    total = (n + text_tokens) ** 2
    skipped = (n - n / (2 * factor)) ** 2
    return 1.0 - (total - skipped) / total


def latency_gains(candidates: Sequence[str], image_tokens: int, text_tokens: int) -> Dict[str, float]:
    """The official "estimate" gains: caching 1, arrow factor k `arrow_gain`."""
    gains = {}
    for candidate in candidates:
        method = candidate_method(candidate)
        gains[candidate] = 1.0 if method.output_share else arrow_gain(method.arrow, image_tokens, text_tokens)
    return gains


# ----------------------------------------------------------------------------- influence


def relative_squared_error(candidate: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Per-head relative squared error on [B, H, L, D] outputs (float64 result, shape [H]).

    ``mean_{b,l,d}(candidate - full)^2 / mean_{b,l,d}(full - mean_{b,l,d} full)^2``: the error
    of a head relative to the spread of its full-attention output (official formula)."""
    if candidate.shape != full.shape or full.dim() != 4:
        raise ValueError(f"expected two [B, H, L, D] outputs of one shape, got {tuple(candidate.shape)} "
                         f"and {tuple(full.shape)}")
    full32, cand32 = full.float(), candidate.float()
    error = ((cand32 - full32) ** 2).mean(dim=(0, 2, 3))
    spread = ((full32 - full32.mean(dim=(0, 2, 3), keepdim=True)) ** 2).mean(dim=(0, 2, 3))
    return (error / spread).double()


# ----------------------------------------------------------------------------- the budget


def _influence_rows(influence: Influence) -> List[Tuple[int, str, float]]:
    if isinstance(influence, Mapping):
        rows = []
        for key, value in influence.items():
            if isinstance(key, str) and "|" in key:  # the golden files' "head|candidate" keys
                head_text, candidate = key.split("|", 1)
                key = (int(head_text), candidate)
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"influence keys are (head, candidate) pairs, got {key!r}")
            rows.append((key[0], key[1], value))
    else:
        rows = []
        for row in influence:
            if len(row) != 3:
                raise ValueError(f"influence rows are [head, candidate, rse], got {row!r}")
            rows.append(tuple(row))
    out = []
    for head, candidate, value in rows:
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or head < 0:
            raise ValueError(f"influence head {head!r} must be an integer >= 0")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"influence of ({head}, {candidate!r}) must be a finite number >= 0, got {value}")
        out.append((int(head), str(candidate), value))
    return out


def solve_budget(influence: Influence, alpha: float, latency_gain: Mapping[str, float]) -> Solution:
    """The budgeted head-wise choice (V2's ILP), solved exactly with SciPy ``milp`` (HiGHS).

    maximise   sum gain(m) x[h, m]
    subject to sum_m x[h, m] <= 1 for every head,  sum RSE(h, m) x[h, m] <= alpha,  x binary.

    influence:    ``{(head, candidate): rse}``, ``{"head|candidate": rse}`` or rows
                  ``[head, candidate, rse]`` (already filtered, as the official ``solve_ip``
                  takes them).
    latency_gain: ``{candidate: gain}``.
    Returns ``[(head, code)]`` for the chosen pairs, in the order of the influence entries
    (official), code "0" = cache, "<k>" = arrow factor k; heads not listed stay full. Entries
    with the same (head, code) are one variable (the later value counts, as in the official
    model). ``alpha <= 0`` or no influence: nothing is chosen. The returned choice is checked
    to respect the budget in exact float arithmetic (HiGHS' tolerance would allow ~1e-9 over).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    rows = _influence_rows(influence)
    if alpha <= 0 or not rows:
        return []
    variables: Dict[Tuple[int, str], int] = {}
    rse: List[float] = []
    gain: List[float] = []
    for head, candidate, value in rows:
        if candidate not in latency_gain:
            raise ValueError(f"latency_gain has no entry for candidate {candidate!r}; "
                             f"known: {sorted(latency_gain)}")
        key = (head, candidate_code(candidate))
        g = float(latency_gain[candidate])
        if not math.isfinite(g):
            raise ValueError(f"latency gain of {candidate!r} must be finite, got {g}")
        if key in variables:
            rse[variables[key]], gain[variables[key]] = value, g
        else:
            variables[key] = len(rse)
            rse.append(value)
            gain.append(g)
    keys = list(variables)
    n = len(keys)
    heads = sorted({head for head, _ in keys})
    one_per_head = np.zeros((len(heads), n))
    for j, (head, _) in enumerate(keys):
        one_per_head[heads.index(head), j] = 1.0
    rse_arr, gain_arr = np.asarray(rse), np.asarray(gain)
    budget = alpha
    for _ in range(8):
        result = milp(
            c=-gain_arr,
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            constraints=[LinearConstraint(one_per_head, -np.inf, 1.0),
                         LinearConstraint(rse_arr[None, :], -np.inf, budget)],
            options={"mip_rel_gap": 0.0, "presolve": True},
        )
        if result.x is None:
            raise RuntimeError(f"the V2 budget ILP failed: {result.message}")
        chosen = [j for j in range(n) if result.x[j] > 0.5]
        spent = math.fsum(rse[j] for j in chosen)
        if spent <= alpha:
            return [keys[j] for j in chosen]
        budget -= (spent - alpha) + 1e-12 * max(1.0, alpha)  # tolerance overshoot: tighten, re-solve
    raise RuntimeError("the V2 budget ILP kept exceeding the budget by the solver tolerance")


def solution_objective(solution: Solution, latency_gain: Mapping[str, float]) -> float:
    """Summed gain of a solution (the ILP objective)."""
    gain_of_code = {candidate_code(c): float(g) for c, g in latency_gain.items()}
    return math.fsum(gain_of_code[code] for _, code in solution)


def window_table(solution: Solution, num_heads: int, image_tokens: int) -> List[Tuple[int, int]]:
    """The official per-head (left, right) table of a solution: (-1, -1) = full, (0, 0) =
    cached, (w, w) = arrow with w = image_tokens // (2k)."""
    table = [(-1, -1)] * num_heads
    for head, code in solution:
        if code == CACHE_CODE:
            table[head] = (0, 0)
        else:
            w = arrow_window(image_tokens, int(code))
            table[head] = (w, w)
    return table


def cached_heads(solution: Solution) -> List[int]:
    """Heads the solution caches, in solution order (the official ``output_share_dict`` entry)."""
    return [head for head, code in solution if code == CACHE_CODE]


def solution_methods(solution: Solution, num_heads: int) -> Tuple[str, ...]:
    """The head-wise plan entry (one method string per head) of a solution."""
    methods = [FULL.official] * num_heads
    for head, code in solution:
        if not 0 <= head < num_heads:
            raise ValueError(f"solution names head {head}, the layer has {num_heads}")
        methods[head] = OUTPUT_SHARE.official if code == CACHE_CODE else f"{ARROW_PREFIX}{int(code)}"
    return tuple(methods)


# ----------------------------------------------------------------------------- calibrator


@dataclass
class StepDecision:
    """What the calibration decided for one (step, layer) and why."""

    step: int
    layer: Hashable
    solution: Solution
    methods: Tuple[str, ...]
    filtered_influence: Dict[Tuple[int, str], float]
    window_table: List[Tuple[int, int]]
    cached_heads: List[int]
    objective: float


@dataclass
class CallShape:
    """Token layout of the calibrated calls (recorded into the plan)."""

    num_heads: int
    head_dim: int
    image_tokens: int
    prefix_tokens: int
    suffix_tokens: int
    token_grid: Optional[Tuple[int, ...]] = None


class HeadwiseCalibration:
    """V2 calibration as a planner of :class:`FastAttnRuntime` (pass it as ``planner=``).

    For every attention call at step t >= 1 of a (step, layer) not decided yet, it computes
    full attention and every candidate on the call's own q/k/v, the per-head influence, the
    filter and the budgeted choice, and records the head-wise entry that the runtime then runs.
    Step 0 is all full. One model forward per step; the extra work is one full attention plus
    one arrow attention per arrow candidate per layer (no extra forwards, unlike V1's
    1 + 4L per step).

    layers: the layer keys in plan order (block index or name, as the runtime is called with).
    alpha:  the error budget per (layer, step) (official δ; SD3 0.05-0.3, FLUX 0.1-1.0).
    latency_gain: ``{candidate: gain}``, or None for the official "estimate" gains computed
        from the call's image and text token counts.
    When cond and uncond arrive in separate calls of one step, the first call decides.
    """

    def __init__(self, layers: Sequence[Hashable], num_steps: int, alpha: float,
                 candidates: Sequence[str] = OFFICIAL_CANDIDATES, *,
                 head_coefficient: float = OFFICIAL_HEAD_COEFFICIENT,
                 latency_gain: Optional[Mapping[str, float]] = None,
                 kernel_backend: str = "auto"):
        layers = list(layers)
        if not layers or num_steps < 1:
            raise ValueError("V2 calibration needs at least one layer and one step")
        if len(set(layers)) != len(layers):
            raise ValueError("layer keys must be distinct")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha (the error budget) must be a number >= 0, got {alpha!r}")
        if not candidates:
            raise ValueError("V2 calibration needs at least one candidate")
        self.candidates = tuple(candidates)
        self.methods_of = {c: candidate_method(c) for c in self.candidates}  # validates names
        if head_coefficient <= 0:
            raise ValueError(f"head_coefficient must be > 0, got {head_coefficient}")
        if latency_gain is not None:
            missing = [c for c in self.candidates if c not in latency_gain]
            if missing:
                raise ValueError(f"latency_gain lacks candidates {missing}")
        self.layers = layers
        self.layer_index = {layer: i for i, layer in enumerate(layers)}
        self.num_steps = int(num_steps)
        self.alpha = float(alpha)
        self.head_coefficient = float(head_coefficient)
        self.latency_gain = dict(latency_gain) if latency_gain is not None else None
        self.kernel_backend = kernel_backend
        self.decisions: Dict[Tuple[int, Hashable], StepDecision] = {}
        self.entries: Dict[Tuple[int, Hashable], Tuple[str, ...]] = {}
        self.shape: Optional[CallShape] = None
        self.gains_used: Optional[Dict[str, float]] = None
        self.seconds = 0.0       # wall time inside plan_call (candidate attention, RSE, ILP)
        self.ilp_seconds = 0.0   # of which solving the budget ILPs
        self.attention_calls = 0

    # ---- runtime interface ---------------------------------------------------------------
    def methods_for(self, step: int, layer: Hashable):
        """The plan entry the runtime runs (decided by `plan_call` before it is asked)."""
        entry = self.entries.get((step, layer))
        if entry is None:
            if step == 0 and self.shape is not None:
                return (FULL.official,) * self.shape.num_heads
            raise KeyError(f"V2 calibration has no decision for step {step}, layer {layer!r}")
        return entry

    def plan_call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: CallInfo,
                  previous_output: Optional[torch.Tensor]) -> None:
        """Decide (step, layer) from this call's q, k, v ([B, H, L, D]) if not decided yet.

        previous_output: the layer's output of its last computed step ([B, H, L, D]) or None."""
        step, layer = info.step, info.layer
        if layer not in self.layer_index:
            raise KeyError(f"layer {layer!r} is not one of the {len(self.layers)} calibrated layers")
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside the calibrated {self.num_steps} steps")
        if (step, layer) in self.entries:
            return
        started = time.perf_counter()
        self.attention_calls += 1
        batch, heads, seq_len, head_dim = q.shape
        self._record_shape(heads, head_dim, info)
        if step == 0:
            self.entries[(step, layer)] = (FULL.official,) * heads
            self.seconds += time.perf_counter() - started
            return
        image = info.image_tokens
        text = info.prefix_tokens + info.suffix_tokens
        gains = self.latency_gain or latency_gains(self.candidates, image, text)
        if self.gains_used is None:
            self.gains_used = dict(gains)
        full = reference_attention(q, k, v)
        limit = self.head_coefficient * self.alpha / heads
        filtered: Dict[Tuple[int, str], float] = {}
        for candidate in self.candidates:
            method = self.methods_of[candidate]
            if method.output_share:
                if previous_output is None or tuple(previous_output.shape) != tuple(full.shape):
                    continue  # nothing cached for this layer yet: caching is not a candidate
                output = previous_output
            else:
                window = Window1D(arrow_window(image, method.arrow), arrow_window(image, method.arrow),
                                  prefix_tokens=info.prefix_tokens, suffix_tokens=info.suffix_tokens)
                output = headwise_window_attention(q, k, v, [window] * heads, self.kernel_backend)
            errors = relative_squared_error(output, full).tolist()
            for head, value in enumerate(errors):
                if value < limit:  # strict, as in the official filter
                    filtered[(head, candidate)] = value
        ilp_started = time.perf_counter()
        solution = solve_budget(filtered, self.alpha, gains) if filtered else []
        self.ilp_seconds += time.perf_counter() - ilp_started
        methods = solution_methods(solution, heads)
        self.entries[(step, layer)] = methods
        self.decisions[(step, layer)] = StepDecision(
            step, layer, solution, methods, filtered, window_table(solution, heads, image),
            cached_heads(solution), solution_objective(solution, gains))
        self.seconds += time.perf_counter() - started

    def _record_shape(self, heads: int, head_dim: int, info: CallInfo) -> None:
        shape = CallShape(heads, head_dim, info.image_tokens, info.prefix_tokens, info.suffix_tokens,
                          tuple(info.token_grid) if info.token_grid else None)
        if self.shape is None:
            self.shape = shape
        elif (shape.num_heads, shape.head_dim, shape.image_tokens, shape.prefix_tokens,
              shape.suffix_tokens) != (self.shape.num_heads, self.shape.head_dim, self.shape.image_tokens,
                                       self.shape.prefix_tokens, self.shape.suffix_tokens):
            raise ValueError(f"V2 calibration needs every calibrated call to share one token and head "
                             f"layout; got {shape} after {self.shape}")

    # ---- results -------------------------------------------------------------------------
    def searched_steps(self) -> List[int]:
        return sorted({step for step, _ in self.entries})

    def to_plan(self, metadata: Optional[Mapping] = None, *, num_steps: Optional[int] = None, **fields):
        """The finished head-wise plan (format "ditfastattn-plan", granularity "head").

        The metadata records the head layout (heads, head dim, text tokens) and the per-side
        window every arrow candidate ran with, so that a run with another window or head
        layout is refused by ``Plan.check``."""
        from .plan import Plan, PlanMetadata

        steps = self.num_steps if num_steps is None else int(num_steps)
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"num_steps must be in [1, {self.num_steps}], got {num_steps}")
        missing = [(t, layer) for t in range(steps) for layer in self.layers if (t, layer) not in self.entries]
        if missing:
            raise RuntimeError(f"V2 calibration saw no call for {len(missing)} (step, layer) pairs, first "
                               f"{missing[0]}: the sampling run ended early or a layer was not reached")
        shape = self.shape
        methods = [[list(self.entries[(t, layer)]) for layer in self.layers] for t in range(steps)]
        meta = dict(metadata.to_dict() if isinstance(metadata, PlanMetadata) else metadata or {})
        meta.update(fields)
        meta.setdefault("num_heads", shape.num_heads)
        meta.setdefault("head_dim", shape.head_dim)
        meta.setdefault("text_tokens", [shape.prefix_tokens, shape.suffix_tokens])
        if shape.token_grid:
            meta.setdefault("token_grid", list(shape.token_grid))
        meta.setdefault("arrow_windows", {
            c: [arrow_window(shape.image_tokens, m.arrow)] * 2
            for c, m in self.methods_of.items() if m.arrow})
        meta.setdefault("threshold", self.alpha)
        meta.setdefault("candidates", [c for c in self.candidates])
        meta.setdefault("metric", METRIC)
        if meta.get("layer_names") is None and all(isinstance(x, str) for x in self.layers):
            meta["layer_names"] = list(self.layers)
        extra = dict(meta.get("extra") or {})
        extra.setdefault("v2_head_coefficient", self.head_coefficient)
        extra.setdefault("v2_image_tokens", shape.image_tokens)
        # Scalars only (plan `extra` holds small JSON facts); the estimate gains follow from the
        # recorded token counts, custom gains are the caller's to keep.
        extra.setdefault("v2_latency_gain", "estimate" if self.latency_gain is None else "custom")
        meta["extra"] = extra
        return Plan(methods, meta, granularity="head")

    # ---- running it ------------------------------------------------------------------------
    def make_runtime(self, **runtime_kwargs):
        """A :class:`FastAttnRuntime` that calibrates while it runs: install it wherever a
        runtime goes (diffusers processors, ComfyUI's attention override, a model's attention
        function) and run one sampling run. Every call's output keeps the layer's output for
        the next step's caching candidate; no residuals (V2 has none)."""
        from .runtime import FastAttnRuntime

        runtime_kwargs.setdefault("kernel_backend", self.kernel_backend)
        runtime_kwargs.setdefault("on_missing_cache", "full")
        return FastAttnRuntime(self.methods_for, None, needs_residual=lambda step, layer: False,
                               cache_output=None, planner=self, **runtime_kwargs)


def calibrate_headwise(sample: Callable[[Any], Any], layers: Sequence[Hashable], num_steps: int,
                       alpha: float, candidates: Sequence[str] = OFFICIAL_CANDIDATES,
                       **options) -> HeadwiseCalibration:
    """Model-agnostic V2 calibration: ``sample(runtime)`` must run ONE sampling run of
    ``num_steps`` denoiser evaluations with every compressible attention call of the model
    going through ``runtime`` (a :class:`FastAttnRuntime`, called with ``layer=`` one of
    `layers` and ``step=`` the evaluation index). Returns the filled calibration; its
    ``to_plan()`` is the plan. `options` go to :class:`HeadwiseCalibration`."""
    calibration = HeadwiseCalibration(layers, num_steps, alpha, candidates, **options)
    runtime = calibration.make_runtime()
    try:
        sample(runtime)
    finally:
        runtime.reset()
    return calibration


def runtime_for_plan(plan, layers: Optional[Sequence[Hashable]] = None, **runtime_kwargs):
    """An inference :class:`FastAttnRuntime` for a head-wise (V2) plan.

    layers: the layer keys the model calls the runtime with, in plan order (default: the
    plan's ``layer_names`` if it has them, else 0..L-1). A layer's output is kept only when
    its next step caches a head (the official runtime keeps just those heads)."""
    from .runtime import FastAttnRuntime, output_cache_lookahead_from_table

    if plan.granularity != "head":
        raise ValueError("runtime_for_plan runs head-wise (V2) plans; V1 plans go through the integrations")
    if layers is None:
        layers = plan.metadata.layer_names or list(range(plan.num_layers))
    layers = list(layers)
    if len(layers) != plan.num_layers:
        raise ValueError(f"{len(layers)} layer keys for a plan of {plan.num_layers} layers")
    index = {layer: i for i, layer in enumerate(layers)}
    table = [plan.layer_methods(i) for i in range(plan.num_layers)]
    keep = output_cache_lookahead_from_table(table)

    def methods_for(step: int, layer: Hashable):
        if layer not in index:
            raise KeyError(f"layer {layer!r} is not in the plan (layers {layers[:4]}...)")
        if not 0 <= step < plan.num_steps:
            raise KeyError(f"the plan has {plan.num_steps} steps; no entry for step {step}")
        return plan.methods[step][index[layer]]

    runtime_kwargs.setdefault("on_missing_cache", "full")
    return FastAttnRuntime(methods_for, None, needs_residual=lambda step, layer: False,
                           cache_output=lambda step, layer: keep(step, index[layer]), **runtime_kwargs)
