"""What a patched sampling run did: methods used, attention FLOPs kept, measured attention time.

Built at the end of every patched run (OUTER_SAMPLE wrapper), logged as one line, and kept in the
patch's report sink for :class:`DiTFastAttnReport`. Timing: every compressible attention call is
timed (with a CUDA synchronise when on GPU); the "full attention" estimate of a compressed call
is the mean time of this layer's full-attention backend calls (from the full / residual-refresh
steps of the same run). On CPU the absolute times mean little; the ratio is what to read.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections import Counter, defaultdict
from typing import Optional

import torch

METHOD_COLOURS = {
    "full_attn": (0.85, 0.85, 0.85),
    "output_share": (0.20, 0.45, 0.85),
    "residual_window_attn": (0.30, 0.70, 0.35),
    "full_attn+cfg_attn_share": (0.95, 0.70, 0.20),
    "residual_window_attn+cfg_attn_share": (0.60, 0.35, 0.75),
    "residual_window_attn+without_residual": (0.85, 0.30, 0.30),
}
SHORT_NAMES = {
    "full_attn": "full",
    "output_share": "AST",
    "residual_window_attn": "WA-RS",
    "full_attn+cfg_attn_share": "ASC",
    "residual_window_attn+cfg_attn_share": "WA-RS+ASC",
    "residual_window_attn+without_residual": "WA",
}


@dataclasses.dataclass
class RunReport:
    family: str
    sampler: Optional[str]
    evaluations: int
    layers: int
    method_counts: dict
    flops_kept: float                 # kept / dense attention FLOPs over the run
    attention_seconds: float          # measured time of all compressible attention calls
    full_estimate_seconds: Optional[float]   # the same calls at full-attention speed (estimate)
    compressible_calls: int
    notes: list

    @property
    def flops_bound_speedup(self) -> Optional[float]:
        return (1.0 / self.flops_kept) if self.flops_kept > 0 else None

    @property
    def measured_speedup(self) -> Optional[float]:
        if not self.full_estimate_seconds or self.attention_seconds <= 0:
            return None
        return self.full_estimate_seconds / self.attention_seconds

    def summary_line(self) -> str:
        methods = ", ".join(f"{SHORT_NAMES.get(m, m)} {n}" for m, n in sorted(self.method_counts.items()))
        bound = self.flops_bound_speedup
        measured = self.measured_speedup
        return (f"DiTFastAttn ({self.family}, {self.sampler}): {self.evaluations} evaluations x "
                f"{self.layers} layers; attention FLOPs kept {100 * self.flops_kept:.1f}%"
                + (f" (bound {bound:.2f}x)" if bound else "")
                + f"; attention time {self.attention_seconds * 1000:.1f} ms"
                + (f" vs ~{self.full_estimate_seconds * 1000:.1f} ms full ({measured:.2f}x)" if measured else "")
                + f"; calls: {methods}")

    def to_text(self) -> str:
        lines = [self.summary_line()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["flops_bound_speedup"] = self.flops_bound_speedup
        data["measured_speedup"] = self.measured_speedup
        return data


def build_run_report(spec, run, sampler_name: Optional[str]) -> RunReport:
    calls = run.stats.calls
    counts = Counter(c.method for c in calls)
    dense = sum(c.dense_flops for c in calls)
    kept = sum(c.kept_flops for c in calls)
    attention_seconds = sum(c.seconds for c in calls)
    full_times = getattr(run, "full_times", {})
    estimate = None
    notes = []
    if calls and spec.measure_time:
        per_layer = {layer: statistics.fmean(times) for layer, times in full_times.items() if times}
        if per_layer:
            total = 0.0
            for c in calls:
                full = per_layer.get(c.layer)
                total += full if full is not None else c.seconds
            estimate = total
    if not calls:
        notes.append("no compressible attention call was seen (unsupported layout, or the model "
                     "was not sampled through this patch)")
    if run.skipped_calls:
        notes.append(f"{run.skipped_calls} calls left uncompressed after an error")
    return RunReport(
        family=spec.family.name, sampler=sampler_name, evaluations=run.evaluation + 1,
        layers=len(spec.layer_names), method_counts=dict(counts),
        flops_kept=(kept / dense) if dense else 1.0, attention_seconds=attention_seconds,
        full_estimate_seconds=estimate, compressible_calls=len(calls), notes=notes)


def method_map_image(methods, layer_names=None, cell: int = 12) -> torch.Tensor:
    """IMAGE ``[1, H, W, 3]``: one row per layer, one column per step, coloured by method, with
    a legend strip at the bottom (one swatch per method, in METHOD_COLOURS order)."""
    steps = len(methods)
    layers = len(methods[0]) if steps else 0
    height = max(1, layers) * cell
    legend_h = cell * 2
    width = max(steps * cell, len(METHOD_COLOURS) * cell * 2)
    image = torch.ones(height + legend_h, width, 3)
    for t, row in enumerate(methods):
        for i, method in enumerate(row):
            colour = METHOD_COLOURS.get(method if isinstance(method, str) else "full_attn", (0, 0, 0))
            image[i * cell:(i + 1) * cell - 1, t * cell:(t + 1) * cell - 1] = torch.tensor(colour)
    for j, colour in enumerate(METHOD_COLOURS.values()):
        x0 = j * cell * 2
        image[height + cell // 2:height + cell // 2 + cell, x0:x0 + cell] = torch.tensor(colour)
    return image.unsqueeze(0)


def plan_summary(plan) -> str:
    counts = plan.method_counts()
    total = sum(counts.values()) or 1
    meta = plan.metadata
    parts = [f"{SHORT_NAMES.get(m, m)} {100 * n / total:.0f}%" for m, n in counts.items()]
    per_layer = defaultdict(list)
    return (f"DiTFastAttn plan: {meta.architecture or '?'} model, {plan.num_steps} evaluations x "
            f"{plan.num_layers} layers, sampler {meta.sampler or '?'}, cfg {meta.cfg_scale}, "
            f"threshold {meta.threshold}; methods: " + ", ".join(parts))
