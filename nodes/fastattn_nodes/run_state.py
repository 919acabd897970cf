"""State of one patched sampling run: step counter, caches, CFG sharing across calls, timings.

A :class:`RunState` is created by the OUTER_SAMPLE wrapper when a sampling run starts, stored in
that run's own copy of ``transformer_options`` (ComfyUI copies the model options per run, so the
patched MODEL itself never holds run state), and dropped in ``finally`` when the run ends. Nothing
here imports ComfyUI.

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

from ...fastattn.methods import parse_method
from ...fastattn.kernels import to_bhld
from ...fastattn.runtime import CfgRows, FastAttnRuntime
from ...fastattn.windows import CallInfo
from ...fastattn.state import FastAttnState
from .stacking import StackingLog

FULL = "full_attn"


@dataclasses.dataclass
class CallRecord:
    """One compressible attention call (for the report)."""

    evaluation: int
    layer: str
    method: str
    seconds: float
    dense_flops: float        # FLOPs of full attention on every row of this call
    kept_flops: float         # FLOPs actually spent (window fraction, ASC rows, residual refresh)


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


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> float:
    """QK^T and PV multiply-adds, counted as 2 FLOPs each (softmax ignored)."""
    return 4.0 * batch * heads * q_len * k_len * head_dim


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
                 stacking: Optional[StackingLog] = None):
        self.evaluation = -1                  # denoiser evaluation index (PREDICT_NOISE count)
        self.evaluation_sigmas: list[float] = []
        self.method_for = method_for
        self._needs_residual = needs_residual
        self._window_for = window_for
        self._lanes_lock = threading.Lock()
        self._lanes: dict = {}
        self.stats = RunStats()
        self.stacking = stacking if stacking is not None else StackingLog()
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
        lanes = {}
        for lane in self.lanes():
            caches = {key: (lane.cache.layer(key).cached_output, lane.cache.layer(key).cached_residual)
                      for key in list(lane.cache.keys())}
            stash = dict(getattr(lane.cache, "cfg_share_stash", {}))
            lanes[lane.key] = (caches, stash, dict(lane.last_seen))
        return lanes, len(self.stats.calls)

    def restore(self, snap) -> None:
        lanes, n_calls = snap
        for lane in self.lanes():
            caches, stash, last_seen = lanes.get(lane.key, ({}, {}, {}))
            for key in list(lane.cache.keys()):
                layer = lane.cache.layer(key)
                layer.cached_output, layer.cached_residual = caches.get(key, (None, None))
            lane.cache.cfg_share_stash.clear()
            lane.cache.cfg_share_stash.update(stash)
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
        method = parse_method(self.method_for(step, layer))
        batch = q.shape[0]
        chunks = [int(c) for c in cond_or_uncond] if cond_or_uncond else None
        lane = self._lane_for_call(device_key, q)
        self._check_continuity(lane, layer, chunks, batch, step)
        start = time.perf_counter() if self.measure_time else 0.0
        if self.measure_time:
            full_attention = self._timed(full_attention, layer, batch)

        computed_rows = batch
        if method.cfg_share and chunks:
            conds = sum(1 for c in chunks if c == 0)
            if conds == 0:
                stashed = lane.cache.cfg_share_stash.get(layer)
                if stashed is not None and stashed[0] == step:
                    computed_rows = 0            # reused from the cond call of this evaluation
                else:
                    self.stacking.add("asc_apart_calls")   # no cond output here to share
            elif conds < len(chunks):
                computed_rows = batch * conds // len(chunks)
        ran = self._effective_method(lane, method, layer, chunks, batch) if computed_rows else method
        out = lane.runtime(q, k, v, layer=layer, step=step, heads=heads, layout=layout,
                           cfg_rows=chunks, full_attention=full_attention,
                           token_grid=token_grid, prefix_tokens=prefix_tokens,
                           suffix_tokens=suffix_tokens)
        if method.cfg_share and chunks and all(c == 0 for c in chunks):
            # The runtime stashes the cond-only output for the uncond-only call of the same step,
            # except on its plain full-attention path; make sure the stash is there either way.
            stashed = lane.cache.cfg_share_stash.get(layer)
            if stashed is None or stashed[0] != step:
                lane.cache.cfg_share_stash[layer] = (step, to_bhld(out, layout, heads))
        if self.measure_time:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            seconds = time.perf_counter() - start
        else:
            seconds = 0.0
        self.stats.add(self._record(step, layer, ran, q, v, heads, layout, computed_rows,
                                    prefix_tokens, suffix_tokens, token_grid, seconds))
        return out

    @staticmethod
    def _effective_method(lane: Lane, method, layer, chunks, batch):
        """The method the runtime will really run: an AST or WA-RS step without its cache (first
        step of a key, or dropped by the gap rule) falls back to full attention."""
        if not (method.output_share or (method.window and method.residual)):
            return method
        labels = CfgRows.from_cond_or_uncond(chunks, batch).labels if chunks else None
        cache = lane.cache.get((layer, labels))
        if method.output_share:
            missing = cache is None or cache.cached_output is None
        else:
            missing = cache is None or cache.cached_residual is None
        return parse_method(FULL) if missing else method

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

    def _record(self, step, layer, method, q, v, heads, layout, computed_rows, prefix, suffix,
                grid, seconds) -> CallRecord:
        batch = q.shape[0]
        if layout == "bhld":
            seq, head_dim = q.shape[2], q.shape[3]
        else:
            seq, head_dim = q.shape[1], q.shape[2] // heads
        dense = attention_flops(batch, heads, seq, seq, head_dim)
        if method.output_share or computed_rows == 0:
            kept = 0.0
        else:
            window_fraction = self.window_fraction(seq, prefix, suffix, grid)
            rows = computed_rows / batch
            if method.window:
                kept = dense * rows * window_fraction
            else:
                refresh = window_fraction if self._runtime_needs_residual(step, layer) else 0.0
                kept = dense * rows * (1.0 + refresh)
        return CallRecord(step, layer, str(method), seconds, dense, kept)

    def window_fraction(self, seq, prefix, suffix, grid) -> float:
        info = CallInfo(None, self.evaluation, seq, tuple(grid) if grid else None, prefix, suffix)
        return float(self.runtime.window_for(info).kept_fraction(seq))

