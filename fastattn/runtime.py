"""The DiTFastAttn (V1) per-call algorithm at the attention-core level.

q, k, v in; the attention output before the output projection out. What happens at
one call is decided by the plan's method for (step, layer) (spec ditfastattn.md 1.2-1.6):

* full attention, also caching the residual R = full - window when a later WA-RS step
  of the layer needs it;
* WA-RS: window attention + the cached residual;
* AST: the layer's cached output, no attention at all;
* ASC: the method computed on the conditional rows only, copied to the unconditional rows.

Head-wise plan entries (one method per head) run every head with its own method; the
DiTFastAttnV2 entries (full / ``arrow_attn_<k>`` / ``output_share`` per head) take one fast
path: cached heads copy their slice of the layer's previous output, the others run in one
head-wise arrow kernel call (`kernels.headwise_window_attention`). A `planner` (the V2
calibration, `fastattn.headwise.HeadwiseCalibration`) may decide an entry from the call's own
q/k/v just before it runs.

`compute_attention_core` is the shared step (q/k/v already restricted to the computed
rows); `FastAttnRuntime` adds plan lookup, CFG row handling, layouts and caching for
callers that see only q/k/v (ComfyUI's attention override, Reducio-DiT); the diffusers
processor calls `compute_attention_core` directly so that it can skip projections like
the official code.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence, Tuple, Union

import torch

from .headwise import arrow_band
from .kernels import from_bhld, headwise_window_attention, reference_attention, to_bhld, window_attention
from .methods import FULL, OUTPUT_SHARE, Method, MethodLike, parse_method
from .state import FastAttnState, LayerCache
from .windows import CallInfo, Window1D

COND, UNCOND = 0, 1


class MissingCacheError(RuntimeError):
    """A step needs a cached output or residual that this run has not produced."""


@dataclass(frozen=True)
class CfgRows:
    """Which batch rows of one call are conditional (0) and unconditional (1).

    DiT orders its CFG batch cond first, PixArt uncond first, and ComfyUI lists one id
    per equal chunk in `transformer_options["cond_or_uncond"]` (0 = positive/cond,
    1 = negative/uncond).
    """

    labels: Tuple[int, ...]

    def __post_init__(self) -> None:
        labels = tuple(int(label) for label in self.labels)
        if any(label not in (COND, UNCOND) for label in labels):
            raise ValueError(f"CFG row labels must be 0 (cond) or 1 (uncond), got {self.labels!r}")
        object.__setattr__(self, "labels", labels)

    @classmethod
    def cond_first(cls, batch: int) -> "CfgRows":
        return cls.from_cond_or_uncond([COND, UNCOND], batch)

    @classmethod
    def uncond_first(cls, batch: int) -> "CfgRows":
        return cls.from_cond_or_uncond([UNCOND, COND], batch)

    @classmethod
    def from_cond_or_uncond(cls, chunks: Sequence[int], batch: int) -> "CfgRows":
        chunks = list(chunks)
        if not chunks or batch % len(chunks):
            raise ValueError(
                f"cond_or_uncond {chunks!r} must split the batch of {batch} rows into equal chunks"
            )
        size = batch // len(chunks)
        return cls(tuple(label for label in chunks for _ in range(size)))

    @property
    def batch(self) -> int:
        return len(self.labels)

    @property
    def cond_rows(self) -> Tuple[int, ...]:
        return tuple(i for i, label in enumerate(self.labels) if label == COND)

    @property
    def uncond_rows(self) -> Tuple[int, ...]:
        return tuple(i for i, label in enumerate(self.labels) if label == UNCOND)

    @property
    def has_both(self) -> bool:
        return bool(self.cond_rows) and bool(self.uncond_rows)

    def expansion(self) -> Tuple[int, ...]:
        """For every row of the batch, the row of the kept (cond) sub-batch it copies.

        Cond rows map to themselves; the j-th uncond row copies the j-th cond row
        (cyclically), which is the official `cat([y, y])` for two equal halves in
        either order."""
        cond = self.cond_rows
        position = {row: i for i, row in enumerate(cond)}
        result, uncond_seen = [], 0
        for row, label in enumerate(self.labels):
            if label == COND:
                result.append(position[row])
            else:
                result.append(uncond_seen % len(cond))
                uncond_seen += 1
        return tuple(result)


def _as_cfg_rows(value, batch: int) -> Optional[CfgRows]:
    if value is None:
        return None
    if isinstance(value, CfgRows):
        rows = value
    else:
        labels = list(value)
        rows = CfgRows(tuple(labels)) if len(labels) == batch else CfgRows.from_cond_or_uncond(labels, batch)
    if rows.batch != batch:
        raise ValueError(f"cfg_rows describes {rows.batch} rows but the call has a batch of {batch}")
    return rows


FullAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Ran:
    """What one group of heads of a call actually ran (after every fallback)."""

    method: Method       # the method as run (a missing cache turns AST / WA-RS into full)
    heads: int           # heads of the call in this group
    rows: int            # batch rows computed (0: an output was reused, nothing computed)
    window: object       # the window of window methods and residual refreshes, else None
    refreshed: bool      # full attention that also computed and cached the WA-RS residual


@dataclass(frozen=True)
class CallOutcome:
    """What the runtime did at one call: the accounting (fastattn.flops.call_flops) and the
    reports read this instead of re-deriving the runtime's branches."""

    step: int
    layer: Hashable
    batch: int
    seq_len: int
    head_dim: int
    parts: Tuple[Ran, ...]
    # an ASC step's uncond-only call found no cond output of this step to share (computed alone)
    cfg_share_missed: bool = False

    @property
    def heads(self) -> int:
        return sum(part.heads for part in self.parts)

    @property
    def uniform(self) -> bool:
        """Every head ran the same method."""
        return len({part.method for part in self.parts}) == 1


def compute_attention_core(
    method: Method,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerCache,
    window,
    *,
    needs_residual: bool,
    residual_expansion: Optional[torch.Tensor] = None,
    residual_rows: Optional[torch.Tensor] = None,
    full_attention: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One full / WA-RS / WA step on the computed rows ([b, H, L, D] in and out).

    needs_residual:     (full steps) also compute and cache R = full - window.
    residual_expansion: (full steps under ASC) row index mapping the computed rows to the
                        whole batch before caching R (the official `cat([R, R])`).
    residual_rows:      (WA-RS) rows of the cached residual added to the window output;
                        None = all rows (they must match the computed rows).
    full_attention:     backend for full attention on [b, H, L, D]; None = SDPA.
    """
    if method.output_share:
        raise ValueError("output_share (AST) computes nothing; return the cached output instead")
    if method.is_full:
        out = full_attention(q, k, v) if full_attention is not None else reference_attention(q, k, v)
        if needs_residual:
            residual = out - window_attention(q, k, v, window, backend)
            if residual_expansion is not None:
                residual = residual.index_select(0, residual_expansion)
            cache.cached_residual = residual
        return out
    windowed = window_attention(q, k, v, window, backend)
    if not method.residual:
        return windowed
    residual = cache.cached_residual
    if residual is None:
        raise MissingCacheError("WA-RS step without a cached residual: a full step must come first")
    if residual_rows is not None:
        residual = residual.index_select(0, residual_rows)
    if residual.shape != windowed.shape:
        raise MissingCacheError(
            f"cached residual {tuple(residual.shape)} does not match this call {tuple(windowed.shape)}"
        )
    return windowed + residual.to(windowed.dtype)


MethodsFor = Callable[[int, Hashable], MethodLike]
WindowFor = Union[object, Callable[[CallInfo], object]]


class FastAttnRuntime:
    """Model-agnostic DiTFastAttn runtime for callers that see q, k, v of each attention call.

    methods_for(step, layer) -> method string or Method: the plan.
    window: a window spec (e.g. Window1D(w, w)) or a factory (CallInfo) -> window spec.
    needs_residual(step, layer) -> bool: whether a full step must cache the residual
        (the official lookahead); None computes it at every full step (always correct,
        costs one extra window attention per full step).
    cache_output(step, layer) -> bool: whether to keep this step's output for a later
        AST step; None keeps it always. False leaves the existing cache untouched (the
        official `need_cache_output=False`, used by calibration trials).
    state: the caches of this run (created if omitted; `reset()` between runs).
    official_asc_residual: under ASC, add the FIRST b rows of the cached residual like
        the official code (True, golden-data compatible), or the rows of the kept half.
    on_missing_cache: "full" runs full attention (caching a residual) when a needed cache
        is missing or has another shape; "error" raises MissingCacheError.
    share_cfg_across_calls: when cond and uncond arrive in separate calls of the same
        step, reuse the cond call's output for the uncond call of an ASC step.
    kernel_backend: window kernel backend ("auto", "banded", "flex", "flash", "reference").
    planner: optional object with `plan_call(q, k, v, info, previous_output, *, residual,
        cfg_rows)` ([B, H, L, D] tensors, CallInfo, the layer's last computed output or None,
        its cached residual or None, the call's CfgRows or None), called before the plan
        entry of each call is looked up, so that it can decide that entry from the call
        itself (V2 calibration). None for plain inference.
    """

    def __init__(
        self,
        methods_for: MethodsFor,
        window: WindowFor,
        *,
        needs_residual: Optional[Callable[[int, Hashable], bool]] = None,
        cache_output: Optional[Callable[[int, Hashable], bool]] = None,
        state: Optional[FastAttnState] = None,
        official_asc_residual: bool = True,
        on_missing_cache: str = "full",
        share_cfg_across_calls: bool = True,
        kernel_backend: str = "auto",
        planner=None,
    ) -> None:
        if on_missing_cache not in ("full", "error"):
            raise ValueError(f"on_missing_cache must be 'full' or 'error', got {on_missing_cache!r}")
        self.methods_for = methods_for
        self.window = window
        self.needs_residual = needs_residual
        self.cache_output = cache_output
        self.state = state if state is not None else FastAttnState()
        self.official_asc_residual = official_asc_residual
        self.on_missing_cache = on_missing_cache
        self.share_cfg_across_calls = share_cfg_across_calls
        self.kernel_backend = kernel_backend
        self.planner = planner
        self._outcome = threading.local()   # per thread: MultiGPU CFG split calls in threads

    @property
    def last_outcome(self) -> Optional[CallOutcome]:
        """What the last call of this thread actually ran."""
        return getattr(self._outcome, "value", None)

    def _ran(self, info: CallInfo, batch: int, head_dim: int, parts) -> None:
        missed = getattr(self._outcome, "missed", False)
        self._outcome.value = CallOutcome(info.step, info.layer, batch, info.seq_len, head_dim, tuple(parts), missed)

    def __deepcopy__(self, memo) -> "FastAttnRuntime":
        # ComfyUI deep-copies model options on clone; the runtime (and its state) is shared.
        return self

    def reset(self) -> None:
        self.state.reset()

    def method_at(self, step: int, layer: Hashable):
        """The plan entry: one Method, or a tuple of Methods (one per head) for head-wise plans."""
        try:
            entry = self.methods_for(step, layer)
            if isinstance(entry, (list, tuple)):
                if not entry:
                    raise ValueError("a head-wise plan entry must list one method per head")
                return tuple(parse_method(m) for m in entry)
            return parse_method(entry)
        except (ValueError, TypeError) as error:
            raise type(error)(f"plan entry for step {step}, layer {layer!r}: {error}") from None

    def window_for(self, info: CallInfo):
        return self.window(info) if callable(self.window) else self.window

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layer: Hashable,
        step: int,
        heads: Optional[int] = None,
        layout: str = "bhld",
        cfg_rows=None,
        full_attention: Optional[FullAttention] = None,
        token_grid: Optional[Tuple[int, ...]] = None,
        prefix_tokens: int = 0,
        suffix_tokens: int = 0,
    ) -> torch.Tensor:
        """Attention output of one call, in the input `layout`.

        full_attention(q, k, v) -> out receives q/k/v in `layout` (a subset of rows under
        ASC) and returns the output in the same layout; None uses SDPA.
        cfg_rows: CfgRows, per-row labels, or a ComfyUI `cond_or_uncond` chunk list;
        None means no CFG information (ASC is then off).
        """
        qh, kh, vh = (to_bhld(t, layout, heads) for t in (q, k, v))
        batch, n_heads, seq_len, head_dim = qh.shape
        self._outcome.value = None
        self._outcome.missed = False
        rows = _as_cfg_rows(cfg_rows, batch)
        out_shape = (batch, n_heads, seq_len, vh.shape[-1])
        cache_key = (layer, rows.labels if rows is not None else None)
        cache = self.state.layer(cache_key)
        info = CallInfo(layer, step, seq_len, tuple(token_grid) if token_grid else None, prefix_tokens, suffix_tokens)
        if self.planner is not None:
            previous = cache.cached_output
            usable = previous is not None and tuple(previous.shape) == out_shape
            residual = cache.cached_residual
            self.planner.plan_call(qh, kh, vh, info, previous if usable else None,
                                   residual=residual if residual is not None and residual.shape[1:] == out_shape[1:]
                                   else None, cfg_rows=rows)
        method = self.method_at(step, layer)
        if isinstance(method, Method) and method.arrow:
            method = (method,) * n_heads  # arrow attention is head-wise by nature
        if isinstance(method, tuple):
            uniform = len(set(method)) == 1 and len(method) == n_heads
            # (full heads that must cache a residual for later WA-RS heads take the general path)
            if len(method) == n_heads and all(_is_v2_head_method(m) for m in method) and not (
                    uniform and not method[0].arrow) and not self._refreshes_residual(info):
                out = self._call_arrow_heads(method, qh, kh, vh, cache, info, out_shape)
                return self._finish(out, cache, step, layer, layout, full_attention_out=None)
            # WA-RS stays head-wise: only that path checks the per-head residual validity
            if (uniform and not (method[0].window and method[0].residual) and not method[0].arrow
                    and self._uniform_windows(info)):
                method = method[0]  # every head alike: the layer-wise path (caller's backend, exact)
            else:
                out = self._call_headwise(method, qh, kh, vh, rows, cache, info, out_shape)
                return self._finish(out, cache, step, layer, layout, full_attention_out=None)
        asc_requested = method.cfg_share

        if method.cfg_share and (rows is None or not rows.has_both):
            reused = self._reuse_split_cfg(method, rows, layer, step, out_shape)
            if reused is not None:
                self._ran(info, batch, head_dim, [Ran(method, n_heads, 0, None, False)])
                if method.is_full:
                    # One CFG call would cache cat([R_cond, R_cond]) here: the uncond rows take
                    # the cond call's residual of this step, not one left from an older full step.
                    cond_cache = self.state.get((layer, (COND,) * rows.batch))
                    cache.cached_residual = cond_cache.cached_residual if cond_cache is not None else None
                return self._finish(reused, cache, step, layer, layout, full_attention_out=None)
            self._outcome.missed = rows is not None and not rows.cond_rows
            method = method.without_cfg_share()

        if method.output_share:
            cached = cache.cached_output
            if cached is not None and tuple(cached.shape) == out_shape:
                self._ran(info, batch, head_dim, [Ran(method, n_heads, 0, None, False)])
                return from_bhld(cached, layout)
            self._missing(f"AST step {step} of layer {layer!r} has no cached output of shape {out_shape}")
            method = FULL
            force_residual = True  # later WA-RS steps of this layer would lack a residual too
        else:
            force_residual = False

        if method.window and seq_len != kh.shape[2]:
            raise ValueError(
                f"layer {layer!r}: window methods apply to self-attention only, got {seq_len} "
                f"queries and {kh.shape[2]} keys; route cross-attention around the runtime"
            )
        if method.window and method.residual and not self._residual_usable(cache, rows, method, out_shape):
            self._missing(f"WA-RS step {step} of layer {layer!r} has no matching cached residual")
            method = Method(cfg_share=method.cfg_share)
            force_residual = True

        self_attention = seq_len == kh.shape[2]
        needs_residual = method.is_full and self_attention and (
            force_residual or self.needs_residual is None or bool(self.needs_residual(step, layer))
        )
        window = self._layer_window(info) if method.window or needs_residual else None
        if window is None:
            if method.window:
                raise ValueError(f"layer {layer!r}: the window for step {step} is None but the plan uses {method}")
            needs_residual = False  # no window for this layer (e.g. a full head list): nothing to subtract

        # A cond-only call of an ASC step keeps its output for the uncond-only call of this step.
        stash_cond = asc_requested and self.share_cfg_across_calls and rows is not None and not rows.uncond_rows
        plain_full = method == FULL and not needs_residual
        computed_rows = len(rows.cond_rows) if method.cfg_share else batch
        self._ran(info, batch, head_dim, [Ran(method, n_heads, computed_rows, window, needs_residual)])
        if plain_full:
            # Keep the caller's backend output untouched: an all-full plan is exactly plain attention.
            out = full_attention(q, k, v) if full_attention is not None else from_bhld(
                reference_attention(qh, kh, vh), layout
            )
            return self._finish(
                to_bhld(out, layout, heads), cache, step, layer, layout, full_attention_out=out, stash=stash_cond
            )

        core_full = self._bhld_backend(full_attention, layout, heads)
        if method.cfg_share:
            kept = torch.tensor(rows.cond_rows, device=qh.device)
            expansion = torch.tensor(rows.expansion(), device=qh.device)
            if self.official_asc_residual:
                residual_rows = torch.arange(len(rows.cond_rows), device=qh.device)
            else:
                residual_rows = kept
            out_kept = compute_attention_core(
                method,
                qh.index_select(0, kept),
                kh.index_select(0, kept),
                vh.index_select(0, kept),
                cache,
                window,
                needs_residual=needs_residual,
                residual_expansion=expansion,
                residual_rows=residual_rows,
                full_attention=core_full,
                backend=self.kernel_backend,
            )
            out = out_kept.index_select(0, expansion)
        else:
            out = compute_attention_core(
                method, qh, kh, vh, cache, window,
                needs_residual=needs_residual, full_attention=core_full, backend=self.kernel_backend,
            )
        return self._finish(out, cache, step, layer, layout, full_attention_out=None, stash=stash_cond)

    def _refreshes_residual(self, info: CallInfo) -> bool:
        """Whether full steps of this call cache a residual (a window exists and the plan asks)."""
        return self.window is not None and (self.needs_residual is None
                                            or bool(self.needs_residual(info.step, info.layer)))

    def _uniform_windows(self, info: CallInfo) -> bool:
        window = self.window_for(info)
        return not isinstance(window, (list, tuple)) or len(set(window)) <= 1

    def _layer_window(self, info: CallInfo):
        """The one window of a layer-wise call (a per-head list with a single distinct value collapses)."""
        window = self.window_for(info)
        if isinstance(window, (list, tuple)):
            distinct = set(window)
            if len(distinct) != 1:
                raise ValueError(
                    f"layer {info.layer!r}: per-head windows need a head-wise plan entry (one method per head)"
                )
            window = distinct.pop()
        return window

    # ------------------------------------------------------------------ head-wise plans

    def _head_windows(self, info: CallInfo, n_heads: int, methods=None) -> list:
        window = self.window_for(info)
        if isinstance(window, (list, tuple)):
            if len(window) != n_heads:
                raise ValueError(f"layer {info.layer!r}: {len(window)} per-head windows for {n_heads} heads")
            windows = list(window)
        else:
            windows = [window] * n_heads
        if methods is not None:  # arrow heads carry their own window
            windows = [arrow_window_of(m, info) if m.arrow else w for m, w in zip(methods, windows)]
        return windows

    def _call_arrow_heads(self, methods: Tuple[Method, ...], qh, kh, vh, cache: LayerCache, info: CallInfo, out_shape):
        """A DiTFastAttnV2 entry: each head full, arrow (factor k) or cached.

        Cached heads copy their slice of the layer's previous output (which holds the value
        those heads had then, cached or not, so caching chains over steps as in V2); every
        computed head runs in one head-wise kernel call, heads of equal window together."""
        batch, n_heads, seq_len, _ = out_shape
        step, layer = info.step, info.layer
        if any(m.arrow for m in methods) and seq_len != kh.shape[2]:
            raise ValueError(f"layer {layer!r}: arrow attention applies to self-attention only, got "
                             f"{seq_len} queries and {kh.shape[2]} keys")
        cached = [h for h, m in enumerate(methods) if m.output_share]
        previous = cache.cached_output
        if cached and (previous is None or tuple(previous.shape) != out_shape):
            self._missing(f"cached heads {cached} at step {step} of layer {layer!r} have no previous output "
                          f"of shape {out_shape}")
            cached = []  # computed with full attention instead
        computed = [h for h in range(n_heads) if h not in set(cached)]
        windows = [arrow_window_of(methods[h], info) if methods[h].arrow else None for h in computed]
        parts = [Ran(OUTPUT_SHARE, len(cached), 0, None, False)] if cached else []
        parts += [Ran(methods[h] if methods[h].arrow else FULL, 1, batch, w, False) for h, w in zip(computed, windows)]
        self._ran(info, batch, qh.shape[-1], parts)
        if not cached:
            return headwise_window_attention(qh, kh, vh, windows, self.kernel_backend)
        out = torch.empty(out_shape, dtype=vh.dtype, device=vh.device)
        cached_index = torch.tensor(cached, device=qh.device)
        out.index_copy_(1, cached_index, previous.index_select(1, cached_index).to(out.dtype))
        if computed:
            index = torch.tensor(computed, device=qh.device)
            q_, k_, v_ = (t.index_select(1, index) for t in (qh, kh, vh))
            out.index_copy_(1, index, headwise_window_attention(q_, k_, v_, windows, self.kernel_backend))
        return out

    def _call_headwise(self, methods: Tuple[Method, ...], qh, kh, vh, rows, cache: LayerCache, info: CallInfo, out_shape):
        """Head-wise plan entry (DiTFastAttnV2 style): every head runs its own method, with
        its own window when the window factory returns one spec per head (None = full).

        Heads sharing (method, window) run together. AST heads copy their slice of the
        cached output (the previous computed value of that head, so caching chains across
        steps as in V2); residuals are kept per head. Full heads use SDPA: a caller's
        `full_attention` backend expects every head of the call."""
        batch, n_heads, seq_len, _ = out_shape
        if len(methods) != n_heads:
            raise ValueError(f"layer {info.layer!r}: head-wise plan entry has {len(methods)} methods for {n_heads} heads")
        step, layer = info.step, info.layer
        self_attention = seq_len == kh.shape[2]
        windows = self._head_windows(info, n_heads, methods) if any(m.window for m in methods) or self_attention else [None] * n_heads
        groups: dict = {}
        for head, (method, window) in enumerate(zip(methods, windows)):
            groups.setdefault((method, window if (method.window or method.is_full) else None), []).append(head)
        out = torch.empty(out_shape, dtype=vh.dtype, device=vh.device)
        parts = []
        residual_updates = []
        cached_output = cache.cached_output
        output_usable = cached_output is not None and tuple(cached_output.shape) == out_shape
        residual = cache.cached_residual
        residual_usable = residual is not None and tuple(residual.shape) == out_shape
        if residual_usable:
            # heads whose residual was never computed (NaN) cannot run WA-RS: split them off
            missing_heads = torch.isnan(residual).flatten(2).any(dim=2).any(dim=0).tolist()
            split: dict = {}
            for (method, window), heads in groups.items():
                if method.window and method.residual:
                    for head in heads:
                        split.setdefault((method, window, missing_heads[head]), []).append(head)
                else:
                    split[(method, window, False)] = heads
        else:
            split = {(method, window, residual is None): heads for (method, window), heads in groups.items()}
        for (method, window, residual_missing), heads in split.items():
            index = torch.tensor(heads, device=qh.device)
            if method.cfg_share and (rows is None or not rows.has_both):
                method = method.without_cfg_share()
            force_residual = False
            if method.output_share:
                if output_usable:
                    out[:, index] = cached_output.index_select(1, index)
                    parts.append(Ran(method, len(heads), 0, None, False))
                    continue
                self._missing(f"AST heads {heads} at step {step} of layer {layer!r} have no cached output")
                method, force_residual = FULL, True
            if method.window and not self_attention:
                raise ValueError(f"layer {layer!r}: window methods apply to self-attention only")
            if method.window and window is None:
                raise ValueError(f"layer {layer!r}: heads {heads} use a window method but have no window (None)")
            if method.window and method.residual and (residual_missing or not residual_usable):
                self._missing(f"WA-RS heads {heads} at step {step} of layer {layer!r} have no cached residual")
                method, force_residual = Method(cfg_share=method.cfg_share), True
            needs_residual = method.is_full and self_attention and window is not None and (
                force_residual or self.needs_residual is None or bool(self.needs_residual(step, layer))
            )
            parts.append(Ran(method, len(heads), len(rows.cond_rows) if method.cfg_share else batch,
                             window if (method.window or needs_residual) else None, needs_residual))
            head_cache = LayerCache(cached_residual=residual.index_select(1, index) if residual_usable else None)
            q_, k_, v_ = (t.index_select(1, index) for t in (qh, kh, vh))
            if method.cfg_share:
                kept = torch.tensor(rows.cond_rows, device=qh.device)
                expansion = torch.tensor(rows.expansion(), device=qh.device)
                residual_rows = torch.arange(len(kept), device=qh.device) if self.official_asc_residual else kept
                result = compute_attention_core(
                    method, q_.index_select(0, kept), k_.index_select(0, kept), v_.index_select(0, kept),
                    head_cache, window, needs_residual=needs_residual, residual_expansion=expansion,
                    residual_rows=residual_rows, backend=self.kernel_backend,
                ).index_select(0, expansion)
            else:
                result = compute_attention_core(
                    method, q_, k_, v_, head_cache, window, needs_residual=needs_residual, backend=self.kernel_backend
                )
            out[:, index] = result
            if needs_residual:
                residual_updates.append((index, head_cache.cached_residual))
        if residual_updates:
            # heads without a residual yet are NaN, so a later WA-RS step on them is detected as missing
            updated = residual.clone() if residual_usable else torch.full(out_shape, float("nan"), dtype=vh.dtype, device=vh.device)
            for index, head_residual in residual_updates:
                updated[:, index] = head_residual.to(updated.dtype)
            cache.cached_residual = updated
        self._ran(info, batch, qh.shape[-1], parts)
        return out

    # ------------------------------------------------------------------ helpers

    def _finish(self, out_bhld, cache: LayerCache, step, layer, layout, full_attention_out, stash=False):
        if self.cache_output is None or self.cache_output(step, layer):
            cache.cached_output = out_bhld
        if stash:
            self.state.cfg_share_stash[layer] = (step, out_bhld)
        if full_attention_out is not None:
            return full_attention_out
        return from_bhld(out_bhld, layout)

    def _missing(self, message: str) -> None:
        if self.on_missing_cache == "error":
            raise MissingCacheError(message)

    def _residual_usable(self, cache: LayerCache, rows, method: Method, out_shape) -> bool:
        residual = cache.cached_residual
        if residual is None:
            return False
        if method.cfg_share and self.official_asc_residual:
            # the official code reads the first b rows, whatever batch the residual had
            return residual.shape[0] >= len(rows.cond_rows) and tuple(residual.shape[1:]) == out_shape[1:]
        return tuple(residual.shape) == out_shape

    def _reuse_split_cfg(self, method: Method, rows, layer, step, out_shape):
        """Uncond-only call of an ASC step: reuse the cond-only call's output of this step."""
        if not self.share_cfg_across_calls or rows is None or rows.cond_rows:
            return None
        stashed = self.state.cfg_share_stash.get(layer)
        if stashed is None or stashed[0] != step or tuple(stashed[1].shape) != out_shape:
            return None
        return stashed[1]

    @staticmethod
    def _bhld_backend(full_attention: Optional[FullAttention], layout: str, heads: Optional[int]):
        if full_attention is None:
            return None

        def run(q, k, v):
            out = full_attention(from_bhld(q, layout), from_bhld(k, layout), from_bhld(v, layout))
            return to_bhld(out, layout, heads)

        return run

    # ------------------------------------------------------------------ adapters

    def as_attention_fn(self) -> Callable:
        """Adapter `attention_fn(q, k, v, heads, *, layer, options) -> out` on [B, L, heads*dim].

        options: "step" (required, denoiser evaluation index); "cfg_rows" (CfgRows or
        per-row labels) or "cond_or_uncond" (ComfyUI chunk list); optional "token_grid",
        "prefix_tokens", "suffix_tokens", "full_attention" ((q, k, v) -> out on
        [B, L, heads*dim])."""
        runtime = self

        def attention_fn(q, k, v, heads, *, layer, options):
            if "step" not in options:
                raise KeyError(
                    "DiTFastAttn attention_fn needs options['step'] (the denoiser evaluation index)"
                )
            cfg_rows = options.get("cfg_rows")
            if cfg_rows is None:
                cfg_rows = options.get("cond_or_uncond")
            return runtime(
                q, k, v,
                layer=layer,
                step=int(options["step"]),
                heads=heads,
                layout="blc",
                cfg_rows=cfg_rows,
                full_attention=options.get("full_attention"),
                token_grid=options.get("token_grid"),
                prefix_tokens=int(options.get("prefix_tokens", 0)),
                suffix_tokens=int(options.get("suffix_tokens", 0)),
            )

        return attention_fn


def _is_v2_head_method(method: Method) -> bool:
    """Per-head methods of a DiTFastAttnV2 entry: full, arrow attention, or caching."""
    return not method.cfg_share and not method.residual and (method.arrow or method.output_share or method == FULL)


def arrow_window_of(method: Method, info: CallInfo) -> Window1D:
    """The window of an arrow method at one call: image_tokens // (2k) per side, text global."""
    return arrow_band(method.arrow)(info)


def methods_from_table(table: Sequence[Sequence[MethodLike]]) -> MethodsFor:
    """methods_for(step, layer) over a per-layer list of per-step methods (the official plan
    shape `[layer][step]`); parsed once, with a clear error for steps/layers out of range."""
    parsed = [[parse_method(m) for m in steps] for steps in table]

    def methods_for(step: int, layer: Hashable) -> Method:
        if not isinstance(layer, int) or not 0 <= layer < len(parsed):
            raise KeyError(f"the plan has {len(parsed)} layers; no entry for layer {layer!r}")
        steps = parsed[layer]
        if not 0 <= step < len(steps):
            raise KeyError(f"the plan has {len(steps)} steps for layer {layer}; no entry for step {step}")
        return steps[step]

    return methods_for


def residual_lookahead_from_table(table: Sequence[Sequence[MethodLike]]) -> Callable[[int, Hashable], bool]:
    """needs_residual(step, layer) from a `[layer][step]` plan (the official lookahead)."""
    from .methods import residual_needed

    needed = [residual_needed(steps) for steps in table]
    return lambda step, layer: needed[layer][step]


def output_cache_lookahead_from_table(table: Sequence[Sequence]) -> Callable[[int, Hashable], bool]:
    """cache_output(step, layer) from a `[layer][step]` plan: keep a step's output only when
    the next step of that layer is AST (an AST step returns the output of the last computed
    step, and AST steps in a row pass it on). Saves one [B, H, L, D] tensor per layer
    whenever the plan does not use AST next. Head-wise entries count if any head is AST."""

    def is_ast(entry) -> bool:
        if isinstance(entry, (list, tuple)):
            return any(parse_method(m).output_share for m in entry)
        return parse_method(entry).output_share

    keep = [[t + 1 < len(steps) and is_ast(steps[t + 1]) for t in range(len(steps))] for steps in table]
    return lambda step, layer: keep[layer][step]
