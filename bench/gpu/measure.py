"""Measuring tools of the GPU bench: timing, peak memory, poisoned memory, numerics, budgets, results.

Method (from the device notes): time device work with CUDA events after a warm-up and report the
median of several runs; compare every fast path with a float64 reference by
``||out - ref|| / ||ref||``, where a NaN or an unwritten element never passes; fill freed device
memory with NaN bytes before a checked run, so that an output element the kernel never wrote shows
up as NaN instead of as a plausible leftover value.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

MIB = 2 ** 20


# ----------------------------------------------------------------------------- time budgets


class BudgetSpent(RuntimeError):
    """A section ran out of its time budget; the cases after it are recorded as skipped."""


class Budget:
    """A deadline on the wall clock: the section's own budget, capped by the whole run's."""

    def __init__(self, seconds: float, cap: Optional["Budget"] = None):
        self.start = time.monotonic()
        self.deadline = self.start + seconds
        if cap is not None:
            self.deadline = min(self.deadline, cap.deadline)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def require(self, seconds: float, what: str) -> None:
        """Refuse to start `what` (an estimated `seconds` long) when less time than that is left."""
        left = self.left()
        if left < seconds:
            raise BudgetSpent(f"{what}: skipped, {max(left, 0.0):.0f} s of the time budget left and it needs "
                              f"about {seconds:.0f} s")


# ----------------------------------------------------------------------------- device helpers


def synchronize(device: torch.device) -> None:
    """Wait for the device; on CUDA this also raises any error of an earlier asynchronous launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def poison_free_memory(device: torch.device, nbytes: int) -> int:
    """Fill `nbytes` of the CUDA caching allocator's free memory with 0xFF bytes and free it again.

    The next allocations are carved out of that block, so an output element a kernel never writes
    reads as 0xFF..FF, which is NaN in float64/32/16 and bfloat16 alike. Returns the bytes poisoned
    (0 on CPU, where freed memory cannot be poisoned this way: glibc returns large blocks to the
    system and the next mapping is zero-filled)."""
    if device.type != "cuda" or nbytes <= 0:
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = int(min(nbytes, free * 0.8))
    block = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=device)
    del block  # stays in the caching allocator, poisoned, for the next allocations
    torch.cuda.synchronize(device)
    return nbytes


class PeakMemory:
    """Peak device memory of a region, above what was allocated when it started (CUDA only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.peak = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)

    def record(self) -> dict:
        if self.peak is None:
            return {"peak_mib": None, "note": "peak memory is measured on CUDA only"}
        return {"peak_mib": self.peak / MIB, "peak_above_start_mib": (self.peak - self.base) / MIB,
                "allocated_at_start_mib": self.base / MIB}


# ----------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[int], object], device: torch.device, *, warmup: int, repeats: int) -> dict:
    """Median time of `fn(i)` (i = run index, for rotating input sets) after `warmup` untimed runs.

    CUDA: one pair of events around each run, all read after one final synchronisation. CPU:
    perf_counter around each run. The first warm-up run's wall time is kept as `first_call_s`
    (it holds compilation and autotuning)."""
    start = time.perf_counter()
    for i in range(max(warmup, 1)):
        fn(i)
        if i == 0:
            synchronize(device)
            first_call = time.perf_counter() - start
    synchronize(device)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            fn(i)
            end.record()
        torch.cuda.synchronize(device)
        samples = [begin.elapsed_time(end) for begin, end in events]
    else:
        for i in range(repeats):
            begin = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - begin) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "samples_ms": samples, "warmup": max(warmup, 1), "repeats": repeats,
            "first_call_s": first_call, "clock": "cuda events" if device.type == "cuda" else "perf_counter"}


# ----------------------------------------------------------------------------- numerics


def relative_error(out: torch.Tensor, ref: torch.Tensor, *, tolerance: float, reference: str,
                   poisoned_bytes: int = 0) -> dict:
    """||out - ref|| / ||ref|| in float64 on the CPU, with a NaN/Inf count; `ok` needs both right."""
    if tuple(out.shape) != tuple(ref.shape):
        return {"ok": False, "problem": f"shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}",
                "reference": reference}
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    nonfinite = int((~torch.isfinite(out64)).sum())
    ref_norm = float(ref64.norm())
    if nonfinite:
        rel, max_abs = math.inf, math.inf
    else:
        diff = out64 - ref64
        rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
        max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    result = {"rel_error": rel, "max_abs_error": max_abs, "nonfinite": nonfinite, "tolerance": tolerance,
              "ok": nonfinite == 0 and rel <= tolerance and ref_norm > 0, "reference": reference,
              "ref_norm": ref_norm, "elements": out64.numel(),
              "poisoned_bytes": poisoned_bytes}
    if nonfinite:
        result["problem"] = (f"{nonfinite} non-finite output elements (NaN/Inf: overflow, or elements never "
                             f"written{' -- freed memory was poisoned with NaN' if poisoned_bytes else ''})")
    elif ref_norm == 0:
        result["problem"] = "the reference is all zeros: the check would prove nothing"
    elif rel > tolerance:
        result["problem"] = f"relative error {rel:.3g} above the tolerance {tolerance:g}"
    return result


# ----------------------------------------------------------------------------- results


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


class Results:
    """The one JSON document of a run, rewritten atomically after every case, so that a run killed
    at its time limit still leaves everything measured so far."""

    def __init__(self, paths: Iterable[Path], header: dict):
        self.paths = [Path(p) for p in paths]
        self.data = dict(header)
        self.data.setdefault("sections", {})
        self.data.setdefault("numerics", [])

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {"status": "running", "cases": []})

    def add_numerics(self, section: str, check: str, result: dict) -> dict:
        entry = {"section": section, "check": check, **result}
        self.data["numerics"].append(entry)
        return entry

    def write(self) -> None:
        text = json.dumps(_jsonable(self.data), indent=1) + "\n"
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
                handle.write(text)
            os.replace(handle.name, path)


def error_record(error: BaseException) -> dict:
    """What a failed case or section keeps of its exception (type, message, last frames)."""
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    return {"error": f"{type(error).__name__}: {error}", "traceback": "".join(frames[-6:])[-4000:]}
