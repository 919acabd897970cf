"""State of one sampling run: evaluation counter, caches, snapshot / restore, per-call accounting.

Integration-neutral run-level logic (tier-1 tested): the ComfyUI nodes create a :class:`RunState`
in their OUTER_SAMPLE wrapper when a sampling run starts, keep it in that run's own copy of
``transformer_options`` (the patched MODEL never holds run state) and drop it when the run ends;
any other driver does the same around its sampling loop. The accounting reads what the runtime
reports it ran (``FastAttnRuntime.last_outcome``) and counts it with the one FLOP model
(``fastattn.flops.call_flops``).

Caches live in one :class:`Lane` per device: core's MultiGPU CFG split runs cond and uncond chunks
in threads on different devices that share one ``model_options`` (so one RunState); each device
gets its own caches, so cached tensors never cross devices and two threads never share a cache.
Every lane remembers the last evaluation each cache key was computed at: when a call arrives after
a gap (an outer override such as core's BlockSparseAttention, or EasyCache, handled that layer at
an earlier step), the key's caches are dropped so the runtime recomputes instead of reusing an
output or residual that is older than the plan assumes.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Callable, Hashable, Optional

import torch

from .flops import call_flops
from .runtime import CallOutcome, CfgRows, FastAttnRuntime
from .state import FastAttnState


class RunEvents:
    """Counts of run events (gap refreshes, ASC calls that ran apart, devices seen). The ComfyUI
    nodes pass their stacking log, which has the same two methods and also reports them."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.devices: list = []

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def add_device(self, key) -> None:
        with self._lock:
            if key not in self.devices:
                self.devices.append(key)


@dataclasses.dataclass
class CallRecord:
    """One compressible attention call (for the report)."""

    evaluation: int
    layer: str
    method: str               # the method that ran ("head-wise" when heads ran different ones)
    seconds: float
    dense_flops: float        # FLOPs of full attention on every row of this call
    kept_flops: float         # FLOPs actually spent (window fraction, ASC rows, residual refresh)
    head_methods: dict = dataclasses.field(default_factory=dict)   # {method: heads}, head-wise calls


class RunStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.calls: list[CallRecord] = []

    def add(self, record: CallRecord) -> None:
        with self._lock:
            self.calls.append(record)

    def truncate(self, n: int) -> None:
        with self._lock:
            del self.calls[n:]


class Lane:
    """The caches of one device: a FastAttnState, the runtime over it, and, per cache key, the
    evaluation whose call last reached us (for the gap rule)."""

    def __init__(self, key, make_runtime):
        self.key = key
        self.cache = FastAttnState()
        self.runtime: FastAttnRuntime = make_runtime(self.cache)
        self.last_seen: dict[Hashable, int] = {}
        self.device = None        # device of the tensors cached here (set by the first call)


class RunState:
    """Everything one sampling run of a patched model needs; discarded when the run ends."""

    def __init__(self, *, method_for: Callable[[int, str], str], window_for: Callable,
                 needs_residual: Optional[Callable[[int, str], bool]], measure_time: bool,
                 stacking=None, planner=None):
        self.evaluation = -1                  # denoiser evaluation index (PREDICT_NOISE count)
        self.evaluation_sigmas: list[float] = []
        self.method_for = method_for
        self._needs_residual = needs_residual
        self._window_for = window_for
        self._lanes_lock = threading.Lock()
        self._lanes: dict = {}
        self.stats = RunStats()
        self.stacking = stacking if stacking is not None else RunEvents()
        self.planner = planner                # V2 calibration (HeadwiseCalibration) or None
        self.measure_time = measure_time
        self.token_grid: Optional[tuple[int, ...]] = None
        self.skipped_calls = 0
        # Measured seconds of the full-attention backend per layer (full and residual-refresh
        # steps, calibration trials included): the baseline of the report's time comparison.
        self.full_times: dict[str, list[float]] = {}
        self._times_lock = threading.Lock()
        default = self.lane(None)
        self.cache, self.runtime = default.cache, default.runtime     # the single-device lane

    def _make_runtime(self, cache: FastAttnState) -> FastAttnRuntime:
        return FastAttnRuntime(
            methods_for=self.method_for,
            window=self._window_for,
            needs_residual=self._runtime_needs_residual,
            state=cache,
            on_missing_cache="full",
            share_cfg_across_calls=True,
            planner=self.planner,
        )

    def lane(self, key) -> Lane:
        """The lane of device ``key`` (None: the ordinary single-device run), created on first use."""
        with self._lanes_lock:
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = Lane(key, self._make_runtime)
                if key is not None:
                    self.stacking.add_device(key)
            return lane

    def lanes(self) -> list[Lane]:
        with self._lanes_lock:
            return list(self._lanes.values())

    def _runtime_needs_residual(self, step: int, layer) -> bool:
        if self._needs_residual is None:
            return True
        return self._needs_residual(step, layer)

    def begin_evaluation(self, sigma: Optional[float]) -> int:
        self.evaluation += 1
        self.evaluation_sigmas.append(float(sigma) if sigma is not None else math.nan)
        return self.evaluation

    def snapshot(self):
        """References to every cached tensor (the runtime replaces tensors, never edits them)."""
        lanes = {lane.key: (lane.cache.snapshot(), dict(lane.last_seen)) for lane in self.lanes()}
        return lanes, len(self.stats.calls)

    def restore(self, snap) -> None:
        lanes, n_calls = snap
        for lane in self.lanes():
            caches, last_seen = lanes.get(lane.key, (({}, {}), {}))
            lane.cache.restore(caches)
            lane.last_seen.clear()
            lane.last_seen.update(last_seen)
        self.stats.truncate(n_calls)

    def free(self) -> None:
        for lane in self.lanes():
            lane.cache.reset()
            lane.last_seen.clear()

    def _lane_for_call(self, device_key, tensor) -> Lane:
        lane = self.lane(device_key)
        if lane.device is None:
            lane.device = tensor.device
        elif lane.device != tensor.device:
            # Same lane key, other device (should not happen): never hand a tensor of one device
            # to a call on another; start this lane's caches afresh.
            lane.cache.reset()
            lane.last_seen.clear()
            lane.device = tensor.device
        return lane

    def _check_continuity(self, lane: Lane, layer, chunks, batch: int, step: int) -> None:
        """Gap rule: drop the caches of this call's key when its previous call was not at the
        previous evaluation (an earlier step of this layer was handled elsewhere)."""
        labels = CfgRows.from_cond_or_uncond(chunks, batch).labels if chunks else None
        key = (layer, labels)
        last = lane.last_seen.get(key)
        lane.last_seen[key] = step
        if last is None or last >= step - 1:
            return
        cache = lane.cache.get(key)
        if cache is not None and (cache.cached_output is not None or cache.cached_residual is not None):
            cache.clear()
            self.stacking.add("stale_refreshes")

    # ------------------------------------------------------------------------------------
    def attend(self, *, layer: str, q, k, v, heads: int, layout: str, cond_or_uncond,
               full_attention, prefix_tokens: int, suffix_tokens: int, token_grid, device_key=None):
        """Run one compressible attention call through the DiTFastAttn runtime.

        The runtime keys its caches by (layer, cond/uncond rows), so cond and uncond calls that
        ComfyUI splits keep separate AST outputs and residuals, and an uncond-only call of an
        ASC step reuses the cond-only call's output of the same evaluation, on the same device
        (``device_key``: the MultiGPU thread's device, None for an ordinary run).
        """
        step = self.evaluation
        batch = q.shape[0]
        chunks = [int(c) for c in cond_or_uncond] if cond_or_uncond else None
        lane = self._lane_for_call(device_key, q)
        self._check_continuity(lane, layer, chunks, batch, step)
        start = time.perf_counter() if self.measure_time else 0.0
        if self.measure_time:
            full_attention = self._timed(full_attention, layer, batch)
        out = lane.runtime(q, k, v, layer=layer, step=step, heads=heads, layout=layout,
                           cfg_rows=chunks, full_attention=full_attention,
                           token_grid=token_grid, prefix_tokens=prefix_tokens,
                           suffix_tokens=suffix_tokens)
        outcome = lane.runtime.last_outcome
        if outcome.cfg_share_missed:
            self.stacking.add("asc_apart_calls")   # an ASC step with no cond output here to share
        if self.measure_time:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            seconds = time.perf_counter() - start
        else:
            seconds = 0.0
        self.stats.add(self._record(outcome, seconds))
        return out

    def _timed(self, full_attention, layer, call_rows):
        with self._times_lock:
            times = self.full_times.setdefault(layer, [])

        def timed_full_attention(q, k, v):
            begin = time.perf_counter()
            out = full_attention(q, k, v)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            rows = q.shape[0]
            # full-attention times are scaled to the whole call batch (ASC computes fewer rows)
            seconds = (time.perf_counter() - begin) * (call_rows / max(rows, 1))
            with self._times_lock:
                times.append(seconds)
            return out

        return timed_full_attention

    @staticmethod
    def _record(outcome: CallOutcome, seconds: float) -> CallRecord:
        dense, kept = call_flops(outcome)
        if outcome.uniform:
            return CallRecord(outcome.step, outcome.layer, outcome.parts[0].method.official, seconds, dense, kept)
        heads: dict = {}
        for part in outcome.parts:
            heads[part.method.official] = heads.get(part.method.official, 0) + part.heads
        return CallRecord(outcome.step, outcome.layer, "head-wise", seconds, dense, kept, heads)
