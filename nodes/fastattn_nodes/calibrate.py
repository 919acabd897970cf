"""Calibration inside a ComfyUI sampling run (the V1 greedy search, hook-driven).

The sampler owns the loop. Our PREDICT_NOISE wrapper sees every denoiser evaluation; for each
one it hands fa-calib's :class:`GreedyCalibration` an ``evaluate(methods)`` function that re-runs
*this same evaluation* (the inner executor, i.e. CFG + model calls) with the trial methods, after
which every cache is restored from a snapshot (the runtime replaces cached tensors, it never edits
them, so a snapshot is a dict of references: no copies). Then the chosen methods run for real and
their output drives the sampler, so the calibration trajectory is the compressed one, as in the
official code.

Cost per evaluation (t >= 1): 1 reference + (trials, at most 4 per layer) + 1 real run, i.e. at
most 2 + 4L denoiser evaluations (each covering cond and uncond). Evaluation 0 is always full.

:class:`HeadwiseCalibrationSession` runs the V2 head-wise calibration (fa's
:class:`HeadwiseCalibration`) instead: no trial evaluations at all. It is the runtime's planner:
at every attention call it measures, on the call's own q/k/v, each head's error under every
candidate (caching, arrow attention k = 8/16/32) and solves the budget ILP for that layer and
step; the chosen entry then runs, so again the calibration trajectory is the compressed one.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from ...fastattn.calibration import OFFICIAL_CANDIDATES, GreedyCalibration
from ...fastattn.headwise import OFFICIAL_CANDIDATES as V2_CANDIDATES, HeadwiseCalibration, candidate_method
from ...fastattn.plan import FULL, Plan, PlanMetadata
from .patcher import Shared
from .sampling import expected_evaluations

# Evaluations per sampling step never exceed this for ComfyUI's samplers (heun: 2, dpm_2: 2,
# 3-stage samplers: 3); only the evaluations that really happen end up in the plan.
MAX_EVALUATIONS_PER_STEP = 4


class _SessionBase(Shared):
    """What every calibration session holds: the layers, the candidates, the node's callbacks and
    the run being calibrated."""

    def __init__(self, layer_names: Sequence[str], candidates: Sequence[str],
                 progress: Optional[Callable[[int, int], None]], interrupted: Optional[Callable[[], None]]):
        self.layer_names = list(layer_names)
        self.index = {name: i for i, name in enumerate(self.layer_names)}
        self.candidates = tuple(candidates)
        self.progress = progress
        self.interrupted = interrupted
        self.run = None
        self.run_info: dict = {}
        self.evaluations = 0
        self.finished_run = None


class CalibrationSession(_SessionBase):
    """One calibration run: owns the greedy search and answers the runtime's method queries."""

    version = "v1"
    needs_residual = None      # every full step caches the residual (a later trial may need it)
    planner = None

    def __init__(self, layer_names: Sequence[str], threshold: float,
                 candidates: Sequence[str] = OFFICIAL_CANDIDATES,
                 progress: Optional[Callable[[int, int], None]] = None,
                 interrupted: Optional[Callable[[], None]] = None):
        super().__init__(layer_names, candidates, progress, interrupted)
        self.threshold = float(threshold)
        self.search: Optional[GreedyCalibration] = None
        self.current: Optional[list[str]] = None
        self.current_step = -1

    # ---- called by the patcher's wrappers ---------------------------------------------
    def begin_run(self, *, sampler, sigmas, cfg, latent_shape, diffusion_model) -> None:
        if self.search is not None:
            raise RuntimeError("a DiTFastAttn calibration session runs exactly one sampling run")
        steps = max(1, int(sigmas.shape[-1]) - 1)
        self.search = GreedyCalibration(len(self.layer_names), steps * MAX_EVALUATIONS_PER_STEP,
                                        self.threshold, self.candidates)
        self.run_info = {"sampler": sampler, "schedule": [float(s) for s in sigmas.flatten().tolist()],
                         "cfg": None if cfg is None else float(cfg), "latent_shape": list(latent_shape),
                         "steps": steps}

    def attach(self, run) -> None:
        self.run = run

    def detach(self) -> None:
        self.finished_run = self.run
        self.run = None

    def method_for(self, step: int, layer: str) -> str:
        i = self.index.get(layer)
        if i is None or step < 0:
            return FULL
        if step == self.current_step and self.current is not None:
            return self.current[i]
        return self.search.methods[step][i]

    def evaluate(self, executor, args, kwargs, run):
        step = run.evaluation
        if step >= self.search.num_steps:
            raise RuntimeError(f"the sampler made more than {self.search.num_steps} denoiser "
                               f"evaluations; DiTFastAttn calibration supports at most "
                               f"{MAX_EVALUATIONS_PER_STEP} per step")
        self.current_step = step

        def trial(methods):
            if self.interrupted is not None:
                self.interrupted()
            snapshot = run.snapshot()
            self.current = list(methods)
            try:
                return executor(*args, **kwargs)
            finally:
                run.restore(snapshot)

        chosen = self.search.search_step(step, trial)
        self.current = list(chosen)
        self.evaluations = step + 1
        if self.progress is not None:
            self.progress(step + 1, self.run_info["steps"])
        return executor(*args, **kwargs)

    # ---- result ---------------------------------------------------------------------------
    def to_plan(self, **metadata) -> Plan:
        if self.search is None or self.evaluations == 0:
            raise RuntimeError("calibration did not run: the sampler made no denoiser evaluation")
        n = self.evaluations
        sigmas = tuple(self.finished_run.evaluation_sigmas[:n]) if self.finished_run else None
        if sigmas is not None and not all(math.isfinite(s) for s in sigmas):
            sigmas = None
        extra = dict(metadata.pop("extra", {}) or {})
        extra.update({"schedule": self.run_info["schedule"], "sampling_steps": self.run_info["steps"],
                      "latent_shape": self.run_info["latent_shape"],
                      "forward_count": self.search.forward_count})
        meta = PlanMetadata(
            num_steps=n, num_layers=len(self.layer_names),
            layer_names=tuple(self.layer_names), sampler=self.run_info["sampler"], sigmas=sigmas,
            cfg_scale=self.run_info["cfg"], threshold=self.threshold,
            candidates=self.candidates, metric="official_rel_l1",
            extra=extra, **metadata)
        return Plan([list(row) for row in self.search.methods[:n]], meta)

    def trials(self):
        return list(self.search.trials) if self.search is not None else []


class HeadwiseCalibrationSession(_SessionBase):
    """One V2 calibration run: the head-wise planner decides every (step, layer) at its call.

    alpha: error budget per layer and step (official delta). flops_kept: None, or the budget as
    the share of attention FLOPs the whole plan keeps; evaluation 0 is always full attention, so
    every later (step, layer) gets the per-call target that brings the whole run to it.
    """

    version = "v2"

    def __init__(self, layer_names: Sequence[str], alpha: float, flops_kept: Optional[float] = None,
                 candidates: Sequence[str] = V2_CANDIDATES,
                 progress: Optional[Callable[[int, int], None]] = None,
                 interrupted: Optional[Callable[[], None]] = None, residual_window=None):
        super().__init__(layer_names, candidates, progress, interrupted)
        self.alpha = float(alpha)
        # the band of WA-RS heads (extended candidates): the run's window factory
        self.residual_window = residual_window
        self.uses_residual = any(candidate_method(c).residual for c in candidates)
        if self.uses_residual and residual_window is None:
            raise ValueError("V2 residual candidates need the run's window (residual_window)")
        self.flops_kept = None if flops_kept is None else float(flops_kept)
        self.per_call_flops_kept: Optional[float] = None
        self.planner: Optional[HeadwiseCalibration] = None

    def needs_residual(self, step: int, layer) -> bool:
        # Official V2 has no residual; with WA-RS candidates every full head caches one.
        return self.uses_residual

    def begin_run(self, *, sampler, sigmas, cfg, latent_shape, diffusion_model) -> None:
        if self.planner is not None:
            raise RuntimeError("a DiTFastAttn calibration session runs exactly one sampling run")
        schedule = [float(s) for s in sigmas.flatten().tolist()]
        steps = max(1, len(schedule) - 1)
        per_call = None
        if self.flops_kept is not None:
            evaluations = expected_evaluations(sampler, schedule) or steps

            def per_call(info):
                # Evaluation 0 is full attention (plus the band of its residual refresh when
                # WA-RS heads are candidates): (first + (E - 1) t') / E = target.
                if self.per_call_flops_kept is None:
                    first = 1.0
                    if self.uses_residual:
                        first += self.residual_window(info).kept_pairs(info.seq_len) / info.seq_len ** 2
                    self.per_call_flops_kept = (
                        min(1.0, max(0.0, (self.flops_kept * evaluations - first) / (evaluations - 1)))
                        if evaluations > 1 else self.flops_kept)
                return self.per_call_flops_kept
        options = {"residual_window": self.residual_window} if self.uses_residual else {}
        self.planner = HeadwiseCalibration(self.layer_names, steps * MAX_EVALUATIONS_PER_STEP, self.alpha,
                                           self.candidates, flops_kept=per_call, **options)
        self.run_info = {"sampler": sampler, "schedule": schedule, "cfg": None if cfg is None else float(cfg),
                         "latent_shape": list(latent_shape), "steps": steps}

    def attach(self, run) -> None:
        self.run = run

    def detach(self) -> None:
        self.finished_run = self.run
        self.run = None

    def method_for(self, step: int, layer: str):
        if layer not in self.index or step < 0:
            return FULL
        return self.planner.methods_for(step, layer)

    def evaluate(self, executor, args, kwargs, run):
        step = run.evaluation
        if step >= self.planner.num_steps:
            raise RuntimeError(f"the sampler made more than {self.planner.num_steps} denoiser "
                               f"evaluations; DiTFastAttn calibration supports at most "
                               f"{MAX_EVALUATIONS_PER_STEP} per step")
        if self.interrupted is not None:
            self.interrupted()
        result = executor(*args, **kwargs)
        self.evaluations = step + 1
        if self.progress is not None:
            self.progress(step + 1, self.run_info["steps"])
        return result

    def to_plan(self, **metadata) -> Plan:
        if self.planner is None or self.evaluations == 0:
            raise RuntimeError("calibration did not run: the sampler made no denoiser evaluation")
        if self.planner.shape is None:
            raise RuntimeError("V2 calibration saw no compressible self-attention call (another attention "
                               "override in front of DiTFastAttn, or an unsupported layout)")
        n = self.evaluations
        sigmas = tuple(self.finished_run.evaluation_sigmas[:n]) if self.finished_run else None
        if sigmas is not None and not all(math.isfinite(s) for s in sigmas):
            sigmas = None
        extra = dict(metadata.pop("extra", {}) or {})
        extra.update({"schedule": self.run_info["schedule"], "sampling_steps": self.run_info["steps"],
                      "latent_shape": self.run_info["latent_shape"], "forward_count": 0,
                      "v2_alpha": self.alpha})
        if self.flops_kept is not None:
            extra.update({"v2_flops_kept": self.flops_kept, "v2_flops_kept_per_call": self.per_call_flops_kept})
        meta = dict(num_steps=n, num_layers=len(self.layer_names), layer_names=list(self.layer_names),
                    sampler=self.run_info["sampler"], sigmas=list(sigmas) if sigmas else None,
                    cfg_scale=self.run_info["cfg"], extra=extra, **metadata)
        return self.planner.to_plan(meta, num_steps=n)

    def summary(self) -> str:
        p = self.planner
        per_call = self.per_call_flops_kept
        budget = (f"attention FLOPs kept <= {100 * self.flops_kept:.1f}% (per layer and step "
                  + (f"{100 * per_call:.1f}%" if per_call is not None else "not reached") + ")"
                  if self.flops_kept is not None else f"error budget alpha {self.alpha:g}")
        return (f"calibration: V2 head-wise, {budget}; {p.attention_calls} attention calls measured, "
                f"{p.seconds:.2f} s in candidates and ILP ({p.ilp_seconds:.2f} s ILP), no extra model evaluations")
