"""State of one patched sampling run: step counter, caches, CFG sharing across calls, timings.

A :class:`RunState` is created by the OUTER_SAMPLE wrapper when a sampling run starts, stored in
that run's own copy of ``transformer_options`` (ComfyUI copies the model options per run, so the
patched MODEL itself never holds run state), and dropped in ``finally`` when the run ends. Nothing
here imports ComfyUI.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import torch

from ...fastattn.methods import parse_method
from ...fastattn.kernels import to_bhld
from ...fastattn.runtime import FastAttnRuntime
from ...fastattn.windows import CallInfo
from ...fastattn.state import FastAttnState

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
        self.calls: list[CallRecord] = []

    def add(self, record: CallRecord) -> None:
        self.calls.append(record)


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> float:
    """QK^T and PV multiply-adds, counted as 2 FLOPs each (softmax ignored)."""
    return 4.0 * batch * heads * q_len * k_len * head_dim


class RunState:
    """Everything one sampling run of a patched model needs; discarded when the run ends."""

    def __init__(self, *, method_for: Callable[[int, str], str], window_for: Callable,
                 needs_residual: Optional[Callable[[int, str], bool]], measure_time: bool):
        self.evaluation = -1                  # denoiser evaluation index (PREDICT_NOISE count)
        self.evaluation_sigmas: list[float] = []
        self.method_for = method_for
        self.cache = FastAttnState()
        self._needs_residual = needs_residual
        self.runtime = FastAttnRuntime(
            methods_for=self.method_for,
            window=window_for,
            needs_residual=self._runtime_needs_residual,
            state=self.cache,
            on_missing_cache="full",
            share_cfg_across_calls=True,
        )
        self.stats = RunStats()
        self.measure_time = measure_time
        self.token_grid: Optional[tuple[int, ...]] = None
        self.skipped_calls = 0
        # Measured seconds of the full-attention backend per layer (full and residual-refresh
        # steps, calibration trials included): the baseline of the report's time comparison.
        self.full_times: dict[str, list[float]] = {}

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
        caches = {key: (self.cache.layer(key).cached_output, self.cache.layer(key).cached_residual)
                  for key in list(self.cache.keys())}
        stash = dict(getattr(self.cache, "cfg_share_stash", {}))
        return caches, stash, len(self.stats.calls)

    def restore(self, snap) -> None:
        caches, stash, n_calls = snap
        for key in list(self.cache.keys()):
            layer = self.cache.layer(key)
            layer.cached_output, layer.cached_residual = caches.get(key, (None, None))
        if hasattr(self.cache, "cfg_share_stash"):
            self.cache.cfg_share_stash.clear()
            self.cache.cfg_share_stash.update(stash)
        del self.stats.calls[n_calls:]

    def free(self) -> None:
        self.cache.reset()

    # ------------------------------------------------------------------------------------
    def attend(self, *, layer: str, q, k, v, heads: int, layout: str, cond_or_uncond,
               full_attention, prefix_tokens: int, suffix_tokens: int, token_grid):
        """Run one compressible attention call through the DiTFastAttn runtime.

        The runtime keys its caches by (layer, cond/uncond rows), so cond and uncond calls that
        ComfyUI splits keep separate AST outputs and residuals, and an uncond-only call of an
        ASC step reuses the cond-only call's output of the same evaluation.
        """
        step = self.evaluation
        method = parse_method(self.method_for(step, layer))
        batch = q.shape[0]
        chunks = [int(c) for c in cond_or_uncond] if cond_or_uncond else None
        self._call_rows = batch      # full-attention times are scaled to the whole call batch
        start = time.perf_counter() if self.measure_time else 0.0
        if self.measure_time:
            full_attention = self._timed(full_attention, layer)

        computed_rows = batch
        if method.cfg_share and chunks:
            conds = sum(1 for c in chunks if c == 0)
            if conds == 0:
                stashed = self.cache.cfg_share_stash.get(layer)
                if stashed is not None and stashed[0] == step:
                    computed_rows = 0            # reused from the cond call of this evaluation
            elif conds < len(chunks):
                computed_rows = batch * conds // len(chunks)
        out = self.runtime(q, k, v, layer=layer, step=step, heads=heads, layout=layout,
                           cfg_rows=chunks, full_attention=full_attention,
                           token_grid=token_grid, prefix_tokens=prefix_tokens,
                           suffix_tokens=suffix_tokens)
        if method.cfg_share and chunks and all(c == 0 for c in chunks):
            # The runtime stashes the cond-only output for the uncond-only call of the same step,
            # except on its plain full-attention path; make sure the stash is there either way.
            stashed = self.cache.cfg_share_stash.get(layer)
            if stashed is None or stashed[0] != step:
                self.cache.cfg_share_stash[layer] = (step, to_bhld(out, layout, heads))
        if self.measure_time:
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            seconds = time.perf_counter() - start
        else:
            seconds = 0.0
        self.stats.add(self._record(step, layer, method, q, v, heads, layout, computed_rows,
                                    prefix_tokens, suffix_tokens, token_grid, seconds))
        return out

    def _timed(self, full_attention, layer):
        times = self.full_times.setdefault(layer, [])

        def timed_full_attention(q, k, v):
            begin = time.perf_counter()
            out = full_attention(q, k, v)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            rows = q.shape[0]
            times.append((time.perf_counter() - begin) * (self._call_rows / max(rows, 1)))
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

