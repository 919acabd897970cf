"""What a patched sampling run did: methods used, attention FLOPs kept, measured attention time.

Built at the end of every patched run (OUTER_SAMPLE wrapper), logged as one line, and kept in the
patch's report sink for :class:`DiTFastAttnReport`. Timing (only with ``measure_time``, off by
default; the report then says it was not measured): every compressible attention call is
timed (with a CUDA synchronise when on GPU); the "full attention" estimate of a compressed call
is the mean time of this layer's full-attention backend calls (from the full / residual-refresh
steps of the same run). On CPU the absolute times mean little; the ratio is what to read.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from typing import Optional

import torch

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
    time_measured: bool = True        # False: measure_time was off, the seconds above are zero

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
                + (f"; attention time {self.attention_seconds * 1000:.1f} ms" if self.time_measured
                   else "; attention time not measured (measure_time is off on DiTFastAttnApply)")
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
        notes.append("no compressible attention call was seen (unsupported layout, another attention "
                     "override in front of DiTFastAttn, or the model was not sampled through this patch)")
    if run.skipped_calls:
        notes.append(f"{run.skipped_calls} calls left uncompressed after an error")
    stacking = getattr(run, "stacking", None)
    if stacking is not None:
        notes += stacking.notes()
    return RunReport(
        family=spec.family.name, sampler=sampler_name, evaluations=run.evaluation + 1,
        layers=len(spec.layer_names), method_counts=dict(counts),
        flops_kept=(kept / dense) if dense else 1.0, attention_seconds=attention_seconds,
        full_estimate_seconds=estimate, compressible_calls=len(calls), notes=notes,
        time_measured=bool(spec.measure_time))


def method_map_image(plan) -> torch.Tensor:
    """The plan's method map figure (rows = layers, columns = evaluations, with axes and a legend) as
    an IMAGE ``[1, H, W, 3]``."""
    from ...fastattn.report import method_map_figure

    return torch.from_numpy(method_map_figure(plan)).unsqueeze(0).clamp(0, 1)


def plan_summary(plan) -> str:
    from ...fastattn.report import legend_text, summarize

    return summarize(plan).text + "\n" + legend_text(plan)
