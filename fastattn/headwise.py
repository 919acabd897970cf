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

Beyond the official SD3 default set, the head-wise choice can also use V1's methods per head
(`EXTENDED_CANDIDATES`): ``cfg_share`` (the official optional ASC candidate: the head computes
the conditional rows only and copies them to the unconditional ones, gain 0.5),
``residual_window_attn`` (WA-RS per head: a band plus the residual full - band cached at that
head's last full step -- the official code's residual ablation, which its paper reports as the
best quality at equal sparsity) and ``residual_window_attn+cfg_attn_share``. Residual heads use
one band per plan (``residual_window``: an arrow factor, official ablation 8, or a window
factory such as a ComfyUI run's window settings); full heads refresh their residual whenever a
later step of that head uses it.

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

from .kernels import headwise_window_attention, reference_attention, window_attention
from .methods import (ARROW_PREFIX, FULL, FULL_CFG_SHARE, OUTPUT_SHARE, WINDOW_RESIDUAL, WINDOW_RESIDUAL_CFG_SHARE,
                      Method, arrow_factor, arrow_method, arrow_window, parse_method, residual_needed_headwise)
from .windows import CallInfo, Window1D, window_rule

#: The official SD3 candidate set (highest compression first); FLUX's equivalent arrow
#: candidates are named ``without_residual_window_attn_<k>`` there.
OFFICIAL_CANDIDATES: Tuple[str, ...] = ("output_share", "arrow_attn_8", "arrow_attn_16", "arrow_attn_32")
#: Head-wise V1 methods the choice may also use (name -> method). ``cfg_share`` is the official
#: optional candidate (code "-1"); the residual ones follow the official residual ablation and
#: are named, and coded in solutions, by their V1 method strings.
EXTENDED_CANDIDATES: Dict[str, Method] = {
    "cfg_share": FULL_CFG_SHARE,
    WINDOW_RESIDUAL.official: WINDOW_RESIDUAL,
    WINDOW_RESIDUAL_CFG_SHARE.official: WINDOW_RESIDUAL_CFG_SHARE,
}
#: The official set plus WA-RS per head: the best set measured (bench/fastattn_quality.md, "V2+").
#: The ASC candidates are left out: their influence (the head's own error) ignores that CFG
#: amplifies an uncond error by (scale - 1) in the guided prediction, and with them the same
#: budgets gave clearly worse images.
RESIDUAL_CANDIDATES: Tuple[str, ...] = OFFICIAL_CANDIDATES + (WINDOW_RESIDUAL.official,)
#: The official set plus every extended candidate.
ALL_CANDIDATES: Tuple[str, ...] = OFFICIAL_CANDIDATES + tuple(EXTENDED_CANDIDATES)
#: Official window factor of the residual ablation (its residual is full - arrow_attn_8).
OFFICIAL_RESIDUAL_FACTOR = 8
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
    if candidate in EXTENDED_CANDIDATES:
        return candidate
    tail = candidate.split("_")[-1]
    if not tail.isdigit():
        raise ValueError(f"unknown V2 candidate {candidate!r}: expected output_share or a window "
                         f"candidate ending in its factor, e.g. {ARROW_PREFIX}8")
    if "cfg" in candidate:
        return "-" + tail
    if "reorder" in candidate:
        return "re" + tail
    return tail


def candidate_method(candidate: str) -> Method:
    """The runtime method of a V2 candidate this package runs (caching, arrow attention or one
    of `EXTENDED_CANDIDATES`)."""
    if candidate == "output_share":
        return OUTPUT_SHARE
    if candidate in EXTENDED_CANDIDATES:
        return EXTENDED_CANDIDATES[candidate]
    factor = arrow_factor(candidate)
    if factor is None:
        raise ValueError(f"V2 candidate {candidate!r} is not supported; supported: output_share, "
                         f"{ARROW_PREFIX}<k>, " + ", ".join(EXTENDED_CANDIDATES)
                         + " (ASC + arrow and reorder candidates are not implemented)")
    return arrow_method(factor)


def code_method(code: str) -> str:
    """The plan method string of a solution code ("0" cache, "<k>" arrow, "-1" ASC, or an
    extended candidate's own name)."""
    if code == CACHE_CODE:
        return OUTPUT_SHARE.official
    if code == "-1":
        return FULL_CFG_SHARE.official
    if code in EXTENDED_CANDIDATES:
        return EXTENDED_CANDIDATES[code].official
    if code.isdigit() and int(code) > 0:
        return f"{ARROW_PREFIX}{int(code)}"
    raise ValueError(f"solution code {code!r} is not one this package runs")


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


def latency_gains(candidates: Sequence[str], image_tokens: int, text_tokens: int,
                  residual_gain: Optional[float] = None) -> Dict[str, float]:
    """The official "estimate" gains: caching 1, ASC 0.5, arrow factor k `arrow_gain`; a
    residual band gains `residual_gain` (default: the arrow band of factor 8, the official
    ablation's estimate), with ASC the official "1 - computed share / 2"."""
    if residual_gain is None:
        residual_gain = arrow_gain(OFFICIAL_RESIDUAL_FACTOR, image_tokens, text_tokens)
    gains = {}
    for candidate in candidates:
        method = candidate_method(candidate)
        if method.output_share:
            gains[candidate] = 1.0
        elif method.arrow:
            gains[candidate] = arrow_gain(method.arrow, image_tokens, text_tokens)
        else:
            computed = 1.0 - (residual_gain if method.window else 0.0)
            gains[candidate] = 1.0 - (computed / 2 if method.cfg_share else computed)
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


def window_table(solution: Solution, num_heads: int, image_tokens: int,
                 residual_sides: Optional[Tuple[int, int]] = None) -> List[Tuple[int, int]]:
    """The official per-head (left, right) table of a solution: (-1, -1) = full (ASC heads
    too: they attend fully), (0, 0) = cached, (w, w) = arrow with w = image_tokens // (2k)
    (residual heads: `residual_sides`, default the arrow band of factor 8)."""
    table = [(-1, -1)] * num_heads
    for head, code in solution:
        if code == CACHE_CODE:
            table[head] = (0, 0)
        elif code.isdigit():
            w = arrow_window(image_tokens, int(code))
            table[head] = (w, w)
        elif parse_method(code_method(code)).window:
            if residual_sides is None:
                w = arrow_window(image_tokens, OFFICIAL_RESIDUAL_FACTOR)
                residual_sides = (w, w)
            table[head] = tuple(residual_sides)
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
        methods[head] = code_method(code)
    return tuple(methods)


def arrow_band(factor: int) -> Callable[[CallInfo], Window1D]:
    """Window factory of the arrow band of `factor`: image_tokens // (2k) per side, text tokens
    global (arrow heads, and residual heads given an arrow factor)."""
    def window_for(info: CallInfo) -> Window1D:
        w = arrow_window(info.image_tokens, factor)
        return Window1D(w, w, prefix_tokens=info.prefix_tokens, suffix_tokens=info.suffix_tokens)
    return window_for


def _sides(window) -> Optional[Tuple[int, int]]:
    """(left, right) of a 1-D window, None for other window shapes."""
    return (window.left, window.right) if isinstance(window, Window1D) else None


class _CandidateOutputs:
    """Candidate outputs of one call for the influence, each computed the way the runtime
    computes that method (bands shared between candidates of one factor)."""

    def __init__(self, q, k, v, info: CallInfo, full: torch.Tensor, backend: str):
        self.q, self.k, self.v, self.info, self.full, self.backend = q, k, v, info, full, backend
        self._bands: Dict[int, torch.Tensor] = {}

    def band(self, window) -> torch.Tensor:
        """Every head attending within `window` (an arrow factor, or a window spec)."""
        if window not in self._bands:
            if isinstance(window, int):   # an arrow factor: the head-wise arrow kernel, as the runtime runs it
                band = arrow_band(window)(self.info)
                output = headwise_window_attention(self.q, self.k, self.v, [band] * self.q.shape[1], self.backend)
            else:
                output = window_attention(self.q, self.k, self.v, window, self.backend)
            self._bands[window] = output
        return self._bands[window]

    def extended(self, method: Method, window, residual: Optional[torch.Tensor], cfg_rows,
                 official_asc_residual: bool) -> Optional[torch.Tensor]:
        """ASC / WA-RS / WA-RS + ASC on every head; None when the call cannot run it."""
        if method.cfg_share and (cfg_rows is None or not cfg_rows.has_both):
            return None
        output = self.full
        if method.residual:
            if residual is None:
                return None
            output = self.band(window)
            if method.cfg_share:
                kept = len(cfg_rows.cond_rows)
                rows = (torch.arange(kept) if official_asc_residual
                        else torch.tensor(cfg_rows.cond_rows)).to(residual.device)
                if residual.shape[0] < kept or residual.shape[1:] != output.shape[1:]:
                    return None
                cond = torch.tensor(cfg_rows.cond_rows, device=output.device)
                shared = output.index_select(0, cond) + residual.index_select(0, rows).to(output.dtype)
                return shared.index_select(0, torch.tensor(cfg_rows.expansion(), device=output.device))
            if residual.shape != output.shape:
                return None
            return output + residual.to(output.dtype)
        cond = torch.tensor(cfg_rows.cond_rows, device=output.device)
        return output.index_select(0, cond).index_select(0, torch.tensor(cfg_rows.expansion(), device=output.device))


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
    flops_kept: instead of an error budget, a budget on the attention work: every (layer,
        step) keeps at most this fraction (or `flops_kept(call_info)`) of its full-attention
        (query, key) pairs (full heads counted with their residual refresh when residual
        candidates are in play), at the
        smallest error budget alpha that achieves it (found by bisection over alpha, the same
        filter and ILP at each trial). `alpha` is then only the starting bracket. When even the
        most compressing feasible choice keeps more, that choice is used.
    residual_window: the band residual candidates (`EXTENDED_CANDIDATES`) use: an arrow factor
        (official ablation 8: image_tokens // 16 per side, text global) or a window factory
        (CallInfo) -> window spec; while they are candidates every full head caches its
        residual against that band.
    When cond and uncond arrive in separate calls of one step, the first call decides; ASC
    candidates need cond and uncond rows in the call and are skipped otherwise.
    """

    def __init__(self, layers: Sequence[Hashable], num_steps: int, alpha: float,
                 candidates: Sequence[str] = OFFICIAL_CANDIDATES, *,
                 head_coefficient: float = OFFICIAL_HEAD_COEFFICIENT,
                 latency_gain: Optional[Mapping[str, float]] = None,
                 kernel_backend: str = "auto", flops_kept: Optional[float] = None,
                 residual_window: Union[int, Callable[[CallInfo], Any]] = OFFICIAL_RESIDUAL_FACTOR):
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
        if callable(residual_window):
            self.residual_factor, self.residual_window_for = None, residual_window
        elif isinstance(residual_window, bool) or not isinstance(residual_window, int) or residual_window < 1:
            raise ValueError(f"residual_window must be an arrow factor (an integer >= 1) or a window factory, "
                             f"got {residual_window!r}")
        else:
            self.residual_factor, self.residual_window_for = residual_window, arrow_band(residual_window)
        self.uses_residual = any(m.residual for m in self.methods_of.values())
        # The runtime's ASC residual rows (official: the first b rows); make_runtime passes it on.
        self.official_asc_residual = True
        if head_coefficient <= 0:
            raise ValueError(f"head_coefficient must be > 0, got {head_coefficient}")
        if latency_gain is not None:
            missing = [c for c in self.candidates if c not in latency_gain]
            if missing:
                raise ValueError(f"latency_gain lacks candidates {missing}")
        if flops_kept is not None and not callable(flops_kept) and not (
                isinstance(flops_kept, (int, float)) and 0 <= flops_kept <= 1):
            raise ValueError(f"flops_kept must be a fraction in [0, 1] (or a function of the call), got {flops_kept!r}")
        self.flops_kept = flops_kept if flops_kept is None or callable(flops_kept) else float(flops_kept)
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
                  previous_output: Optional[torch.Tensor], *, residual: Optional[torch.Tensor] = None,
                  cfg_rows=None) -> None:
        """Decide (step, layer) from this call's q, k, v ([B, H, L, D]) if not decided yet.

        previous_output: the layer's output of its last computed step ([B, H, L, D]) or None.
        residual: the layer's cached residual ([B, H, L, D], NaN for heads without one) or None.
        cfg_rows: the call's `CfgRows` (None: no CFG information)."""
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
        band = self.residual_window_for(info) if self.uses_residual else None
        if self.latency_gain is not None:
            gains = self.latency_gain
        elif self.residual_factor is not None or band is None:
            gains = latency_gains(self.candidates, image, text,
                                  arrow_gain(self.residual_factor or OFFICIAL_RESIDUAL_FACTOR, image, text))
        else:
            gains = latency_gains(self.candidates, image, text, 1.0 - band.kept_pairs(info.seq_len) / info.seq_len ** 2)
        if self.gains_used is None:
            self.gains_used = dict(gains)
        full = reference_attention(q, k, v)
        errors: Dict[Tuple[int, str], float] = {}
        outputs = _CandidateOutputs(q, k, v, info, full, self.kernel_backend)
        for candidate in self.candidates:
            method = self.methods_of[candidate]
            if method.output_share:
                if previous_output is None or tuple(previous_output.shape) != tuple(full.shape):
                    continue  # nothing cached for this layer yet: caching is not a candidate
                output = previous_output
            elif method.arrow:
                output = outputs.band(method.arrow)
            else:
                output = outputs.extended(method, band, residual, cfg_rows, self.official_asc_residual)
                if output is None:
                    continue  # no CFG pair in this call, or no residual cached yet
            for head, value in enumerate(relative_squared_error(output, full).tolist()):
                if math.isfinite(value):   # heads without a residual are NaN
                    errors[(head, candidate)] = value
        ilp_started = time.perf_counter()
        if self.flops_kept is None:
            filtered, solution = self._solve(errors, heads, gains, self.alpha)
        else:
            filtered, solution = self._solve_for_flops(errors, heads, gains, info)
        self.ilp_seconds += time.perf_counter() - ilp_started
        methods = solution_methods(solution, heads)
        self.entries[(step, layer)] = methods
        self.decisions[(step, layer)] = StepDecision(
            step, layer, solution, methods, filtered,
            window_table(solution, heads, image, _sides(band) if band is not None else None),
            cached_heads(solution), solution_objective(solution, gains))
        self.seconds += time.perf_counter() - started

    def _solve(self, errors, heads: int, gains, alpha: float):
        """The official filter (per-head error strictly below c * alpha / H) and the budget ILP."""
        limit = self.head_coefficient * alpha / heads
        filtered = {key: value for key, value in errors.items() if value < limit}
        return filtered, (solve_budget(filtered, alpha, gains) if filtered else [])

    def _solve_for_flops(self, errors, heads: int, gains, info: CallInfo):
        """The smallest error budget whose choice keeps at most `flops_kept` of the pairs.

        With residual candidates a full head is counted with its residual refresh (full + band,
        what calibration runs; inference refreshes only where a later WA-RS head reads it), so
        the plan's cost never exceeds the target by a refresh it did not foresee."""
        seq = info.seq_len
        target = self.flops_target(info)
        full = seq * seq + (self.residual_window_for(info).kept_pairs(seq) if self.uses_residual else 0)
        pairs = {}
        for candidate in self.candidates:
            method = self.methods_of[candidate]
            code = candidate_code(candidate)        # the solution names heads' choices by code
            if method.output_share:
                pairs[code] = 0
                continue
            if method.window:
                window = arrow_band(method.arrow)(info) if method.arrow else self.residual_window_for(info)
                pairs[code] = window.kept_pairs(seq)
            else:
                pairs[code] = full
            if method.cfg_share:
                pairs[code] /= 2   # half the rows

        def kept(solution) -> float:
            chosen = {head: candidate for head, candidate in solution}
            return sum(pairs[chosen[h]] if h in chosen else full for h in range(heads)) / (heads * seq * seq)

        if not errors:
            return {}, []
        worst = max(errors.values())
        per_head_worst = [max((v for (h, _), v in errors.items() if h == head), default=0.0) for head in range(heads)]
        # at `high` every candidate passes the filter and the ILP budget binds nothing
        high = max(heads * worst / self.head_coefficient, sum(per_head_worst)) * 1.01 + 1e-12
        best = self._solve(errors, heads, gains, high)
        if kept(best[1]) > target:
            return best
        low = 0.0
        for _ in range(30):
            middle = 0.5 * (low + high)
            try:
                trial = self._solve(errors, heads, gains, middle)
            except RuntimeError:
                # budgets at the solver's tolerance (errors ~1e-9) cannot be solved exactly; a
                # budget that small meets no target a looser one misses
                low = middle
                continue
            if kept(trial[1]) <= target:
                high, best = middle, trial
            else:
                low = middle
        return best

    def flops_target(self, info: CallInfo) -> float:
        """The share of its full-attention pairs this call may keep (`flops_kept`, or its value
        for this call when it is a function of the CallInfo)."""
        target = self.flops_kept(info) if callable(self.flops_kept) else self.flops_kept
        if not 0 <= target <= 1:
            raise ValueError(f"flops_kept gave {target!r} for {info}; expected a fraction in [0, 1]")
        return float(target)

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
        if any(parse_method(m).residual for step in methods for cell in step for m in cell) and "window" not in meta:
            band = self.residual_window_for(CallInfo(None, 0, shape.image_tokens + shape.prefix_tokens
                                                     + shape.suffix_tokens, shape.token_grid, shape.prefix_tokens,
                                                     shape.suffix_tokens))
            sides = _sides(band)
            if sides is None:
                raise ValueError("the residual band is not a 1-D window: pass window=[left, right] (and the "
                                 "rule that made it in extra) to to_plan")
            meta["window"] = list(sides)   # the band of residual heads (text tokens global)
        meta.setdefault("threshold", self.alpha if self.flops_kept is None else None)
        meta.setdefault("candidates", [self.methods_of[c].official for c in self.candidates])  # plan vocabulary
        meta.setdefault("metric", METRIC)
        if meta.get("layer_names") is None and all(isinstance(x, str) for x in self.layers):
            meta["layer_names"] = list(self.layers)
        extra = dict(meta.get("extra") or {})
        extra.setdefault("v2_head_coefficient", self.head_coefficient)
        extra.setdefault("v2_budget", "error" if self.flops_kept is None else "flops_kept")
        if self.flops_kept is not None and not callable(self.flops_kept):
            extra.setdefault("v2_flops_kept", self.flops_kept)
        extra.setdefault("v2_image_tokens", shape.image_tokens)
        if self.uses_residual and self.residual_factor is not None:
            extra.setdefault("v2_residual_factor", self.residual_factor)
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
        the next step's caching candidate; with residual candidates every full head also
        caches its residual (official V2 has none)."""
        from .runtime import FastAttnRuntime

        runtime_kwargs.setdefault("kernel_backend", self.kernel_backend)
        runtime_kwargs.setdefault("on_missing_cache", "full")
        self.official_asc_residual = runtime_kwargs.setdefault("official_asc_residual", True)
        if self.uses_residual:
            window, needs_residual = self.residual_window_for, None   # None: at every full step
        else:
            window, needs_residual = None, (lambda step, layer: False)
        return FastAttnRuntime(self.methods_for, window, needs_residual=needs_residual,
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
    refresh = [residual_needed_headwise(steps) for steps in table]
    window = None
    if any(any(refresh_layer) for refresh_layer in refresh):
        from .plan import plan_window

        shape, fraction, sides = plan_window(plan)
        if shape is not None and fraction is not None:
            window = window_rule(shape, fraction)     # the rule the plan's run used (ComfyUI)
        elif sides is not None:
            prefix, suffix = plan.metadata.text_tokens or (0, 0)
            window = Window1D(sides[0], sides[1], prefix_tokens=prefix, suffix_tokens=suffix)
        else:
            raise ValueError("the plan has residual heads but no metadata.window (their band); "
                             "re-calibrate it or add the window it was calibrated with")

    def methods_for(step: int, layer: Hashable):
        if layer not in index:
            raise KeyError(f"layer {layer!r} is not in the plan (layers {layers[:4]}...)")
        if not 0 <= step < plan.num_steps:
            raise KeyError(f"the plan has {plan.num_steps} steps; no entry for step {step}")
        return plan.methods[step][index[layer]]

    runtime_kwargs.setdefault("on_missing_cache", "full")
    return FastAttnRuntime(methods_for, window, needs_residual=lambda step, layer: refresh[index[layer]][step],
                           cache_output=lambda step, layer: keep(step, index[layer]), **runtime_kwargs)
