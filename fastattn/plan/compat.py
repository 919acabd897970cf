"""Does this plan fit this run, and which plan step does each evaluation use: the ONE place.

Both integrations call these: the diffusers integration (``fastattn.integrations.diffusers``)
and the ComfyUI nodes (``nodes/fastattn_nodes/patcher.py``).

* :func:`check_plan` compares a plan's metadata with a :class:`RunSignature` (model, layers,
  heads, head layout, windows, resolution, CFG, steps) and refuses a mismatch with a message that
  says what differs and how to fix it; with ``allow_remap`` it returns a plan whose steps were
  remapped by noise level instead.
* :func:`check_sampling_run` does the same for a sampler that counts its own denoiser
  evaluations (ComfyUI): it compares the sampler and the full sigma schedule recorded in the
  plan (``metadata.extra.schedule``) and returns a :class:`StepMap` that maps every evaluation of
  the run to a plan step as the run goes.
* :func:`plan_window` reads the window a plan was calibrated with (one copy: ``metadata.window``
  in tokens, ``extra.window_shape`` / ``extra.window_fraction`` as the rule that produced it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Iterable, Optional, Sequence

from ..methods import FULL as FULL_METHOD, arrow_sort_key, arrow_window, parse_method
from .format import Plan, PlanMetadata, PlanMismatchError

logger = logging.getLogger("fastattn.plan")

FULL = FULL_METHOD.official


@dataclasses.dataclass(frozen=True)
class RunSignature:
    """What a plan is about to be used with. ``None`` fields are not checked."""

    num_layers: int | None = None
    num_heads: int | None = None
    architecture: str | None = None
    weights_fingerprint: str | None = None
    token_grid: tuple[int, ...] | None = None
    num_steps: int | None = None
    sampler: str | None = None
    sigmas: tuple[float, ...] | None = None
    cfg_scale: float | None = None
    # Window and head layout of the run (checked when both sides know them): the per-side
    # window (left, right) in tokens the run's window methods use, the head dimension, and
    # the global text tokens (prefix, suffix) of joint attention. A V2 plan's arrow windows
    # are also checked against the image tokens of ``token_grid`` (window = image // (2k)).
    window: tuple[int, int] | None = None
    head_dim: int | None = None
    text_tokens: tuple[int, int] | None = None


# Mismatches that `ignore=` may waive (at the user's explicit request; the plan is then used
# as it is). Layer/head counts can never be waived: the plan would not fit the model.
IGNORABLE = ("architecture", "weights_fingerprint", "token_grid", "cfg_scale")


def _sigmas_close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6)
                                    for x, y in zip(a, b))


def _remap_indices(plan_meta: PlanMetadata, run: RunSignature) -> tuple[list[int], str]:
    src_steps = plan_meta.num_steps
    dst_steps = run.num_steps
    if plan_meta.sigmas and run.sigmas and len(run.sigmas) == dst_steps:
        # Nearest noise level on a log scale: sigma spans orders of magnitude and the plan's
        # decisions track the noise level, not the step index.
        def log_sigma(s: float) -> float:
            return math.log(max(s, 1e-8))
        src = [log_sigma(s) for s in plan_meta.sigmas]
        mapping = [min(range(src_steps), key=lambda i: (abs(src[i] - log_sigma(s)), i))
                   for s in run.sigmas]
        return mapping, "nearest noise level (log sigma)"
    if dst_steps == 1:
        return [0], "position on the step grid"
    # floor(x + 0.5), not round(): Python rounds halves to even, which would be lopsided.
    mapping = [math.floor(j * (src_steps - 1) / (dst_steps - 1) + 0.5) for j in range(dst_steps)]
    return mapping, "relative position on the step grid (no sigmas known)"


def check_plan(self: Plan, run: RunSignature, *, allow_remap: bool = False,
               ignore: Iterable[str] = ()) -> Plan:
    """Return the plan to use for ``run`` or raise ``PlanMismatchError``.

    ``allow_remap`` maps the plan's steps onto a different step count / sampler / schedule
    by noise level (the returned plan carries a note saying so). ``ignore`` waives the
    listed checks (``IGNORABLE``), also recorded as a note.
    """
    ignore = set(ignore)
    bad = ignore - set(IGNORABLE)
    if bad:
        raise ValueError(f"cannot ignore {sorted(bad)}; ignorable checks: {IGNORABLE}")
    meta = self.metadata
    hard: list[str] = []
    soft: list[tuple[str, str]] = []  # (check name, description)
    step_diffs: list[str] = []
    if run.num_layers is not None and run.num_layers != meta.num_layers:
        hard.append(f"layers: plan has {meta.num_layers}, model has {run.num_layers}")
    if (run.num_heads is not None and meta.num_heads is not None
            and run.num_heads != meta.num_heads):
        hard.append(f"attention heads: plan has {meta.num_heads}, model has {run.num_heads}")
    hard.extend(_layout_mismatches(self, run))
    if meta.architecture and run.architecture and meta.architecture != run.architecture:
        soft.append(("architecture", f"architecture: plan {meta.architecture!r}, "
                                     f"model {run.architecture!r}"))
    if (meta.weights_fingerprint and run.weights_fingerprint
            and meta.weights_fingerprint != run.weights_fingerprint):
        soft.append(("weights_fingerprint",
                     f"weights: plan calibrated on {meta.weights_fingerprint[:16]}..., "
                     f"model is {run.weights_fingerprint[:16]}... (different checkpoint, "
                     f"LoRA or fine-tune)"))
    if meta.token_grid and run.token_grid and tuple(meta.token_grid) != tuple(run.token_grid):
        soft.append(("token_grid", f"token grid (resolution): plan {list(meta.token_grid)}, "
                                   f"run {list(run.token_grid)} (the window is in tokens)"))
    if (meta.cfg_scale is not None and run.cfg_scale is not None
            and not math.isclose(meta.cfg_scale, run.cfg_scale, rel_tol=1e-6)):
        soft.append(("cfg_scale", f"CFG scale: plan {meta.cfg_scale}, run {run.cfg_scale}"))
    if run.num_steps is not None and run.num_steps != meta.num_steps:
        step_diffs.append(f"steps: plan has {meta.num_steps} evaluations, run has "
                          f"{run.num_steps}")
    elif meta.sigmas and run.sigmas and not _sigmas_close(meta.sigmas, run.sigmas):
        step_diffs.append("sigma schedule: the run's noise levels differ from the plan's")
    if (not step_diffs and meta.sampler and run.sampler and meta.sampler != run.sampler
            and not (meta.sigmas and run.sigmas)):
        step_diffs.append(f"sampler: plan {meta.sampler!r}, run {run.sampler!r}")

    unwaived = [d for name, d in soft if name not in ignore]
    fixes = []
    if hard:
        fixes.append("calibrate a plan for this model and window (layer/head counts, head layout "
                     "and windows cannot be adapted)")
    if unwaived:
        fixes.append("recalibrate for this model and run, or, knowing the plan may hurt "
                     "quality, waive the check with ignore=[" +
                     ", ".join(repr(n) for n, _ in soft if n not in ignore) + "]")
    if step_diffs and not allow_remap:
        fixes.append("recalibrate with this step count / sampler, or pass allow_remap=True "
                     "to map plan steps onto this schedule by noise level")
    if hard or unwaived or (step_diffs and not allow_remap):
        raise PlanMismatchError(hard + unwaived + ([] if allow_remap else step_diffs), fixes)

    notes = [f"ignored mismatch: {d}" for name, d in soft if name in ignore]
    plan = self
    if step_diffs:
        plan, note = _remapped(self, run)
        notes.append(note)
    if not notes:
        return self
    for note in notes:
        logger.warning("DiTFastAttn plan: %s", note)
    return plan.with_metadata(notes=plan.metadata.notes + tuple(notes))

def _layout_mismatches(self: Plan, run: RunSignature) -> list[str]:
    """Window and head-layout differences (never waivable: the plan's choices were measured
    with exactly these windows and heads)."""
    meta = self.metadata
    out = []
    if (run.head_dim is not None and meta.head_dim is not None
            and int(run.head_dim) != meta.head_dim):
        out.append(f"head dim: plan has {meta.head_dim}, model has {run.head_dim}")
    if (run.text_tokens is not None and meta.text_tokens is not None
            and tuple(run.text_tokens) != tuple(meta.text_tokens)):
        out.append(f"text tokens (prefix, suffix): plan {list(meta.text_tokens)}, run "
                   f"{list(run.text_tokens)}")
    if run.window is not None and meta.window is not None and tuple(run.window) != tuple(meta.window):
        out.append(f"window: plan calibrated with {list(meta.window)} tokens per side, run uses "
                   f"{list(run.window)}")
    arrows = _arrow_methods_used(self.methods)
    if arrows and meta.arrow_windows is None:
        out.append("window: this V2 plan does not record the windows its arrow methods ran with "
                   "(metadata.arrow_windows)")
    elif arrows and run.token_grid:
        image = math.prod(run.token_grid)
        for name in sorted(arrows, key=_arrow_sort_key):
            recorded = meta.arrow_windows.get(name)
            w = arrow_window(image, parse_method(name).arrow)
            if recorded is None:
                out.append(f"window: metadata.arrow_windows has no entry for {name}")
            elif tuple(recorded) != (w, w):
                out.append(f"window: {name} ran with {list(recorded)} tokens per side, this run's "
                           f"{image} image tokens give [{w}, {w}]")
    return out

def _remapped(self: Plan, run: RunSignature) -> tuple[Plan, str]:
    target_steps = run.num_steps if run.num_steps is not None else self.num_steps
    run = dataclasses.replace(run, num_steps=target_steps)
    mapping, how = _remap_indices(self.metadata, run)
    methods = [list(self.methods[i]) for i in mapping]
    # The first evaluation must compute attention everywhere (no cache exists yet); later
    # WA-RS steps then always find the residual of a full step.
    full_row = ([FULL] * self.num_layers if self.granularity == "layer" else
                [tuple([FULL] * len(self.methods[0][0]))] * self.num_layers)
    forced = methods[0] != full_row
    methods[0] = full_row
    meta = dataclasses.replace(
        self.metadata, num_steps=target_steps,
        sigmas=tuple(run.sigmas) if run.sigmas else None,
        sampler=run.sampler or self.metadata.sampler)
    note = (f"remapped {self.num_steps} planned steps onto {target_steps} by {how}; "
            f"step map {mapping if len(mapping) <= 64 else str(mapping[:64]) + '...'}"
            + ("; step 0 forced to full attention" if forced else ""))
    return Plan(methods, meta, granularity=self.granularity), note




def _arrow_methods_used(methods: Sequence[Sequence]) -> set:
    used = set()
    for step in methods:
        for cell in step:
            for method in (cell if isinstance(cell, tuple) else (cell,)):
                if parse_method(method).arrow:
                    used.add(method)
    return used


def _arrow_sort_key(method: str) -> tuple:
    return arrow_sort_key(method)


# --------------------------------------------------------------------------------------------
# Sampler-driven runs (ComfyUI): evaluation -> plan step as the run goes
# --------------------------------------------------------------------------------------------

class StepMap:
    """Maps denoiser evaluations to plan steps: identity when the run matches the plan; when
    remapping was allowed, the nearest noise level (log sigma) if the plan records its sigmas, else
    the same relative position on the evaluation grid if the run's evaluation count is known
    before it starts. Evaluation 0 always maps to step 0."""

    def __init__(self, plan: Plan, remap: bool, run_evaluations: Optional[int] = None):
        self.plan = plan
        self.remap = remap
        self.run_evaluations = run_evaluations
        sigmas = plan.metadata.sigmas
        self._log_sigmas = [math.log(max(s, 1e-8)) for s in sigmas] if (remap and sigmas) else None

    def step(self, evaluation: int, sigma: float) -> int:
        if not self.remap:
            if evaluation >= self.plan.num_steps:
                raise PlanMismatchError(
                    [f"this run makes more denoiser evaluations than the plan has steps "
                     f"({self.plan.num_steps})"],
                    ["calibrate with the same sampler, scheduler and steps, or enable "
                     "'allow_remap' on DiTFastAttnApply"])
            return evaluation
        if evaluation == 0:
            return 0
        if self._log_sigmas is None or not math.isfinite(sigma):
            runs, plans = self.run_evaluations, self.plan.num_steps
            if runs is not None and runs > 1 and evaluation < runs:
                # floor(x + 0.5): Python's round() sends halves to even, which would be lopsided
                return math.floor(evaluation * (plans - 1) / (runs - 1) + 0.5)
            return min(evaluation, plans - 1)
        target = math.log(max(sigma, 1e-8))
        return min(range(1, self.plan.num_steps), key=lambda i: (abs(self._log_sigmas[i] - target), i)) \
            if self.plan.num_steps > 1 else 0


def check_sampling_run(plan: Plan, signature: RunSignature, *, sampler: Optional[str],
                       schedule: Sequence[float], run_evaluations: Optional[int],
                       allow_remap: bool = False, ignore: Iterable[str] = ()) -> StepMap:
    """Raise PlanMismatchError (clear message) or return the StepMap for a sampler-driven run.

    signature: model / resolution / CFG facts (checked by :func:`check_plan`, steps excluded:
    the sampler's evaluation count is compared here). schedule: the run's sigmas (steps + 1).
    run_evaluations: denoiser evaluations the sampler will make, if known in advance.
    """
    check_plan(plan, dataclasses.replace(signature, num_steps=None, sigmas=None, sampler=None),
               ignore=ignore)
    meta = plan.metadata
    recorded = (meta.extra or {}).get("schedule")
    run_schedule = [float(s) for s in schedule]
    differences = []
    if meta.sampler and sampler and meta.sampler != sampler:
        differences.append(f"sampler: plan calibrated with {meta.sampler!r}, this run uses {sampler!r}")
    if recorded is not None:
        if len(recorded) != len(run_schedule):
            differences.append(f"steps: plan calibrated for {len(recorded) - 1} sampling steps, "
                               f"this run has {len(run_schedule) - 1}")
        elif any(not math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(recorded, run_schedule)):
            differences.append("sigma schedule: this run's noise levels differ from the plan's "
                               "(scheduler, denoise or model sampling shift changed)")
    elif run_evaluations is not None and run_evaluations != meta.num_steps:
        # No recorded schedule (official import, diffusers calibration, hand-written plan): the
        # plan's step count is all there is to compare, and without this check a longer plan
        # would silently run its first rows only.
        differences.append(f"steps: the plan has {meta.num_steps} denoiser evaluations, this run makes "
                           f"{run_evaluations} ({len(run_schedule) - 1} steps of {sampler})")
    if differences and not allow_remap:
        raise PlanMismatchError(differences, [
            "calibrate a plan with the same sampler, scheduler, steps and denoise, or",
            "enable 'allow_remap' on DiTFastAttnApply to map plan steps by noise level"])
    if differences:
        logger.warning("DiTFastAttn: remapping plan steps by noise level (%s)", "; ".join(differences))
    return StepMap(plan, remap=bool(differences), run_evaluations=run_evaluations)


def window_tokens(fraction: float, image_tokens: int) -> int:
    """Per-side window in tokens of a window given as a fraction of the image tokens (the value
    ``metadata.window`` records, and what the ComfyUI run is compared with)."""
    return int(round(float(fraction) * int(image_tokens)))


def plan_window(plan: Plan) -> tuple[Optional[str], Optional[float], Optional[tuple[int, int]]]:
    """(window shape, window fraction, per-side window in tokens) the plan was calibrated with
    (None where the plan does not say). The tokens are the one copy the checks compare; shape and
    fraction are the rule that produced them (the ComfyUI grid window needs the rule)."""
    extra = plan.metadata.extra or {}
    fraction = extra.get("window_fraction")
    return (extra.get("window_shape"), float(fraction) if fraction is not None else None,
            plan.metadata.window)
