"""Install DiTFastAttn on a ModelPatcher clone through ComfyUI's documented patch points only.

* ``transformer_options["optimized_attention_override"]``: a closure that chains the override that
  was installed before (e.g. a SageAttention patch) and routes each block's self-attention
  through the DiTFastAttn runtime;
* keyed wrappers: ``OUTER_SAMPLE`` (a fresh :class:`RunState` per sampling run, checked against the
  plan, freed in ``finally``), ``PREDICT_NOISE`` (denoiser evaluation counter = plan step),
  ``APPLY_MODEL`` (latent shape -> token grid, conditioning length);
* ``patches_replace["dit"]`` entries that tag the layer index (chaining an existing entry);
* for native PixArt only (its attention never receives transformer_options): one
  ``add_object_patch`` per block on ``blocks.{i}.attn.forward`` (see pixart_patch.py);

Stacking with other attention patches (stacking.py): at every model call the APPLY_MODEL wrapper
looks at the override the call is about to use and counts which patched layers' self-attention
reached ours; an override that replaced ours, or one in front of ours that handles calls itself,
is logged once and reported; caches of a layer whose earlier step bypassed us are recomputed
(fastattn/run.py's gap rule); MultiGPU CFG split threads get a run-state lane per device.

Nothing is stored on the model or in module globals. Objects placed in ``model_options`` are
closures or return themselves from ``__deepcopy__`` (``ModelPatcher.clone`` deep-copies
``model_options``; a copied state holder would silently fork).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Optional

import torch

from ...fastattn.methods import residual_needed, residual_needed_headwise
from ...fastattn.run import RunState
from ...fastattn.plan import FULL, WINDOW_SHAPES, Plan, PlanMismatchError, RunSignature, StepMap, check_sampling_run
from ...fastattn.windows import window_rule
from . import pixart_patch
from .layer_access import (BLOCK_REPLACE, COUNT_KEY, OBJECT_PATCH, PREFERRED_KEY, RECORD_KEY, _seq_len)
from .families import Family, detect_family_of
from .sampling import expected_evaluations
from .stacking import OVERRIDE_MARK, ModelCallRecord, StackingLog

log = logging.getLogger("reducio_fastattn.ditfastattn")

WRAPPER_KEY = "ditfastattn"
SPEC_KEY = "ditfastattn_spec"        # the PatchSpec of the patch installed on this model
RUN_KEY = "ditfastattn_run"          # the RunState of the sampling run in progress
GEOMETRY_KEY = "ditfastattn_geometry"  # (token grid, conditioning length) of this model call
OVERRIDE_KEY = "optimized_attention_override"
DEVICE_KEY = "multigpu_thread_device"  # set by core's MultiGPU CFG split on each thread's options


class Shared:
    """Base for objects kept in model_options that must be shared, not copied, by clone()."""

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


class ReportSink(Shared):
    """Where finished runs leave their report; read by the report node and by tests."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reports: list = []

    def add(self, report) -> None:
        with self._lock:
            self.reports.append(report)
            del self.reports[:-16]

    @property
    def last(self):
        with self._lock:
            return self.reports[-1] if self.reports else None


@dataclasses.dataclass(frozen=True)
class WindowConfig:
    shape: str = "1d"            # "1d": the paper's band over the flattened tokens; "grid": a box
    fraction: float = 0.125      # per side, as a fraction of the image tokens (paper: 1/8)

    def __post_init__(self):
        # Checked here so no caller (node, plan, script) gets a silent 1-D window for a typo.
        if self.shape not in WINDOW_SHAPES:
            raise ValueError(f"window_shape {self.shape!r} is not one of {list(WINDOW_SHAPES)}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"window_fraction {self.fraction!r} must be a number in (0, 1] (paper: 0.125)")

    def factory(self):
        return window_rule(self.shape, self.fraction)


class PatchSpec(Shared):
    """Immutable description of one installed patch (plan, family, chained override)."""

    def __init__(self, *, family: Family, layer_names: list[str], plan: Optional[Plan],
                 window: WindowConfig, previous_override, allow_remap: bool, ignore: tuple,
                 measure_time: bool, calibration=None, signature: Optional[RunSignature] = None):
        self.family = family
        self.layer_names = list(layer_names)
        self.layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self.plan = plan
        self.window = window
        self.previous_override = previous_override
        self.allow_remap = allow_remap
        self.ignore = tuple(ignore)
        self.measure_time = measure_time
        self.calibration = calibration        # a calibration session (calibrate node) or None
        self.signature = signature
        self.sink = ReportSink()
        self.override = None                  # our override closure (set by apply_patch)
        # transformer_options of the model call in progress, for object-patched forwards (PixArt)
        self.model_call = pixart_patch.ModelCallContext()
        self._residual_table = self._layer_uses_residual = None
        if plan is not None:
            self._residual_table = [_layer_residual_needed(plan, i) for i in range(plan.num_layers)]
            self._layer_uses_residual = [any(needed) for needed in self._residual_table]


def _layer_residual_needed(plan: Plan, layer: int) -> list[bool]:
    """Per step: must a full step of this layer cache the WA-RS residual (any head, head-wise)."""
    column = plan.layer_methods(layer)
    if plan.granularity == "layer":
        return residual_needed(column)
    return residual_needed_headwise(column)


# ----------------------------------------------------------------------------------------------
# The plan against this run (the rule and the step map: fastattn.plan.compat)
# ----------------------------------------------------------------------------------------------

def _sampler_name(sampler) -> Optional[str]:
    function = getattr(sampler, "sampler_function", None)
    name = getattr(function, "__name__", None)
    if name is None:
        return type(sampler).__name__
    return name[len("sample_"):] if name.startswith("sample_") else name


def _check_run_against_plan(spec: PatchSpec, sampler, sigmas, cfg, latent_shape, diffusion_model):
    """Raise PlanMismatchError (clear message) or return the StepMap for this run."""
    plan = spec.plan
    grid = spec.family.token_grid(diffusion_model, latent_shape)
    signature = dataclasses.replace(
        spec.signature or RunSignature(),
        token_grid=grid,
        cfg_scale=float(cfg) if cfg is not None else None,
    )
    schedule = [float(s) for s in sigmas.flatten().tolist()]
    sampler_name = _sampler_name(sampler)
    return check_sampling_run(plan, signature, sampler=sampler_name, schedule=schedule,
                              run_evaluations=expected_evaluations(sampler_name, schedule),
                              allow_remap=spec.allow_remap, ignore=spec.ignore)


# ----------------------------------------------------------------------------------------------
# The attention override
# ----------------------------------------------------------------------------------------------

def _make_override(spec_holder: list):
    """The override closure. ``spec_holder[0]`` is the PatchSpec (a list so the closure can be
    created before the spec exists; never reassigned after install)."""
    warned = set()

    def ditfastattn_attention_override(func, *args, **kwargs):
        spec: PatchSpec = spec_holder[0]
        previous = spec.previous_override

        def passthrough():
            if previous is not None:
                return previous(func, *args, **kwargs)
            return func(*args, **kwargs)

        options = kwargs.get("transformer_options") or {}
        run: Optional[RunState] = options.get(RUN_KEY)
        if run is None or options.get(SPEC_KEY) is not spec:
            return passthrough()
        site = _classify_call(spec, options, args, kwargs)
        if site is None:
            return passthrough()
        layer, layout, heads, prefix, suffix, grid = site
        q, k, v = args[0], args[1], args[2]
        if layout == "blc":
            # SD3/MMDiT hands v over as [B, L, heads, dim]; ComfyUI's backends flatten it anyway.
            q, k, v = (t.reshape(t.shape[0], t.shape[1], -1) if t.ndim == 4 else t for t in (q, k, v))
        skip_output_reshape = kwargs.get("skip_output_reshape", False)
        # scale= and enable_gqa= shape the computation itself: the compressed path honours them
        # (q pre-scaled, k/v heads expanded) and the backend then runs plain attention on the
        # prepared tensors, so every method of the plan sees the same attention.
        dropped = ("skip_output_reshape", "scale", "enable_gqa")
        base_kwargs = {key: value for key, value in kwargs.items() if key not in dropped}
        rest = args[3:]              # heads (when positional), mask, ...
        preferred = options.get(PREFERRED_KEY)

        def full_attention(qq, kk, vv):
            # Output in the input layout. What would have run without us does the work: the
            # chained override if any (an override takes precedence over a module's preferred
            # attention in core's wrap_attn, which hides preferred_attention from overrides),
            # else the module's preferred attention (ComfyAttention.function) if set, else func.
            call_kwargs = dict(base_kwargs, skip_output_reshape=(layout == "bhld"))
            if previous is not None:
                return previous(func, qq, kk, vv, *rest, **call_kwargs)
            backend = getattr(preferred, "function", None) or func
            return backend(qq, kk, vv, *rest, **call_kwargs)

        try:
            q, k, v = _prepare_qkv(q, k, v, heads, layout, kwargs, run)
            out = run.attend(layer=layer, q=q, k=k, v=v, heads=heads, layout=layout,
                             cond_or_uncond=options.get("cond_or_uncond"),
                             full_attention=full_attention, prefix_tokens=prefix,
                             suffix_tokens=suffix, token_grid=grid,
                             device_key=options.get(DEVICE_KEY))
        except PlanMismatchError:
            raise
        except Exception as exc:   # never take a user's run down because of an unexpected layout
            run.skipped_calls += 1
            if (layer, type(exc)) not in warned:
                warned.add((layer, type(exc)))
                log.warning("DiTFastAttn: layer %s left uncompressed after an error: %s", layer, exc)
            return passthrough()
        if layout == "bhld" and not skip_output_reshape:
            b, h, length, d = out.shape
            out = out.transpose(1, 2).reshape(b, length, h * d)
        return out

    setattr(ditfastattn_attention_override, OVERRIDE_MARK, True)
    return ditfastattn_attention_override


def _prepare_qkv(q, k, v, heads, layout, kwargs, run):
    """Apply ``scale=`` to q and expand GQA k/v heads (core's repeat_kv_for_gqa: repeat_interleave
    on the head axis), so that the runtime's kernels and the backend compute the same attention."""
    head_axis = 1 if layout == "bhld" else None
    if kwargs.get("enable_gqa", False):
        if layout == "bhld":
            q_heads, kv_heads = q.shape[1], k.shape[1]
        else:
            head_dim = q.shape[-1] // heads
            q_heads, kv_heads = heads, k.shape[-1] // head_dim
        if kv_heads != q_heads:
            if kv_heads <= 0 or q_heads % kv_heads:
                raise ValueError(f"GQA: {q_heads} query heads are not a multiple of {kv_heads} key/value heads")
            repeat = q_heads // kv_heads
            if head_axis is not None:
                k, v = (t.repeat_interleave(repeat, dim=head_axis) for t in (k, v))
            else:
                b, length = k.shape[0], k.shape[1]
                k, v = (t.reshape(b, length, kv_heads, -1).repeat_interleave(repeat, dim=2)
                        .reshape(b, length, -1) for t in (k, v))
            run.stacking.add("gqa_calls")
    scale = kwargs.get("scale")
    if scale is not None:
        head_dim = q.shape[-1] if layout == "bhld" else q.shape[-1] // heads
        q = q * (float(scale) * math.sqrt(head_dim))     # the kernels' own 1/sqrt(d) then gives scale
    return q, k, v


def _classify_call(spec: PatchSpec, options, args, kwargs):
    """Return (layer, layout, heads, prefix, suffix, grid) for a compressible self-attention
    call, or None to leave the call alone."""
    family = spec.family
    record: Optional[ModelCallRecord] = options.get(RECORD_KEY)
    layer = family.access.layer_of_call(family, options, args, kwargs)
    if layer is None or layer not in spec.layer_index:
        return None
    if len(args) < 3:
        return None
    if record is not None and _seq_len(args[0], kwargs) == _seq_len(args[1], kwargs):
        record.reached.add(layer)        # this layer's self-attention arrived (stacking checks)
    q, k = args[0], args[1]
    heads = args[3] if len(args) > 3 else kwargs.get("heads")
    if heads is None or kwargs.get("mask") is not None or (len(args) > 4 and args[4] is not None):
        return None
    skip_reshape = kwargs.get("skip_reshape", False)
    if not skip_reshape and kwargs.get("skip_output_reshape", False):
        return None
    layout = "bhld" if skip_reshape else "blc"
    seq_axis = 2 if skip_reshape else 1
    if q.shape[seq_axis] != k.shape[seq_axis] or q.shape[0] != k.shape[0]:
        return None                      # cross-attention (or an exotic call): untouched
    if options.get("attn_kind", "self") != "self":
        return None                      # models that label their calls (Reducio-DiT)
    geometry = options.get(GEOMETRY_KEY)
    grid, context_len, extra_prefix = geometry if geometry is not None else (None, None, None)
    seq_len = q.shape[seq_axis]
    if grid is None:
        prefix, suffix = 0, 0
    else:
        split = family.text_split(seq_len, math.prod(grid), context_len, extra_prefix)
        if split is None:
            run = options.get(RUN_KEY)
            if run is not None:
                run.stacking.warn_once(("layout", seq_len), "DiTFastAttn: %s self-attention with %d tokens "
                                       "does not match the token grid %s: left uncompressed",
                                       family.name, seq_len, tuple(grid))
            return None
        prefix, suffix = split
    return layer, layout, int(heads), prefix, suffix, grid


# ----------------------------------------------------------------------------------------------
# Wrappers and layer tags
# ----------------------------------------------------------------------------------------------

def _make_outer_sample_wrapper(spec: PatchSpec):
    def ditfastattn_outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        options = guider.model_options.setdefault("transformer_options", {})
        if options.get(SPEC_KEY) is not spec:
            return executor(*args, **kwargs)         # a later DiTFastAttn patch replaced ours
        noise, sampler, sigmas = args[0], args[2], args[3]
        diffusion_model = guider.model_patcher.model.diffusion_model
        cfg = getattr(guider, "cfg", None)
        if spec.calibration is not None:
            session = spec.calibration
            session.begin_run(sampler=_sampler_name(sampler), sigmas=sigmas, cfg=cfg,
                              latent_shape=tuple(noise.shape), diffusion_model=diffusion_model)
            method_for, needs_residual, planner = session.method_for, session.needs_residual, session.planner
        else:
            step_map = _check_run_against_plan(spec, sampler, sigmas, cfg, tuple(noise.shape),
                                               diffusion_model)
            method_for, needs_residual = _plan_lookup(spec, step_map)
            planner = None
        run = RunState(method_for=method_for, window_for=spec.window.factory(),
                       needs_residual=needs_residual, measure_time=spec.measure_time,
                       stacking=StackingLog(), planner=planner)
        run.token_grid = spec.family.token_grid(diffusion_model, noise.shape)
        # Run start: is our override still the one in the slot? (Another one may also be put
        # in front later, e.g. at ON_PREPARE_STATE; the APPLY_MODEL wrapper checks every call.)
        run.stacking.note_override(options.get(OVERRIDE_KEY), spec.override)
        options[RUN_KEY] = run
        if spec.calibration is not None:
            spec.calibration.attach(run)
        try:
            result = executor(*args, **kwargs)
            from .report import build_run_report   # local import: report pulls in plotting code
            run.stacking.finish(spec.family.name)
            report = build_run_report(spec, run, sampler_name=_sampler_name(sampler))
            if spec.calibration is None and not step_map.remap and run.evaluation + 1 < spec.plan.num_steps:
                # Samplers whose evaluation count is only known afterwards (adaptive, custom).
                note = (f"this run made {run.evaluation + 1} denoiser evaluations but the plan has "
                        f"{spec.plan.num_steps}: only its first rows were used; calibrate for this sampler "
                        "and step count")
                report.notes.append(note)
                log.warning("DiTFastAttn: %s", note)
            spec.sink.add(report)
            log.info("%s", report.summary_line())
            return result
        finally:
            run.free()
            options.pop(RUN_KEY, None)
            if spec.calibration is not None:
                spec.calibration.detach()

    return ditfastattn_outer_sample


def _plan_lookup(spec: PatchSpec, step_map: StepMap):
    plan = spec.plan
    index = spec.layer_index
    evaluation_steps: dict[int, int] = {}
    current = {"evaluation": -1, "sigma": math.nan}

    def plan_step(evaluation: int) -> int:
        if evaluation not in evaluation_steps:
            evaluation_steps[evaluation] = step_map.step(evaluation, current["sigma"])
        return evaluation_steps[evaluation]

    def method_for(evaluation: int, layer: str):
        """A method string, or one per head for a head-wise (V2) plan."""
        i = index.get(layer)
        if i is None or evaluation < 0:
            return FULL
        return plan.methods[plan_step(evaluation)][i]

    def needs_residual(evaluation: int, layer: str) -> bool:
        i = index.get(layer)
        if i is None:
            return False
        if step_map.remap:
            # the remapped step sequence is only known as the run goes: refresh wherever the
            # layer uses WA-RS at all (never for layers without it, e.g. official V2 plans)
            return spec._layer_uses_residual[i]
        return spec._residual_table[i][plan_step(evaluation)]

    method_for.set_sigma = lambda sigma: current.__setitem__("sigma", sigma)
    return method_for, needs_residual


def _make_predict_noise_wrapper(spec: PatchSpec):
    def ditfastattn_predict_noise(executor, *args, **kwargs):
        model_options = args[2] if len(args) > 2 else kwargs.get("model_options", {})
        options = model_options.get("transformer_options", {})
        run: Optional[RunState] = options.get(RUN_KEY)
        if run is None or options.get(SPEC_KEY) is not spec:
            return executor(*args, **kwargs)
        timestep = args[1]
        sigma = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        set_sigma = getattr(run.method_for, "set_sigma", None)
        if set_sigma is not None:
            set_sigma(sigma)
        evaluation = run.begin_evaluation(sigma)
        if spec.calibration is not None:
            result = spec.calibration.evaluate(executor, args, kwargs, run)
        else:
            result = executor(*args, **kwargs)
        if evaluation == 0:
            _check_first_evaluation(spec, run)
        return result

    return ditfastattn_predict_noise


def _check_first_evaluation(spec: PatchSpec, run: RunState) -> None:
    """After evaluation 0: say so when not one self-attention call of a patched layer reached us."""
    stacking = run.stacking
    if stacking.first_evaluation_checked:
        return
    stacking.first_evaluation_checked = True
    if stacking.reached_calls == 0 and stacking.bypassed_calls > 0:
        outer = ", ".join(sorted(stacking.outer_overrides)) or "another attention override"
        stacking.warn_once("no_calls", "DiTFastAttn (%s): no attention call reached DiTFastAttn in the first "
                           "evaluation (%d self-attention calls went elsewhere: %s); this run is not "
                           "compressed", spec.family.name, stacking.bypassed_calls, outer)


def _make_apply_model_wrapper(spec: PatchSpec):
    def ditfastattn_apply_model(executor, *args, **kwargs):
        x = args[0]
        context = args[3] if len(args) > 3 else kwargs.get("c_crossattn")
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        run = options.get(RUN_KEY) if isinstance(options, dict) else None
        record = None
        if run is not None and options.get(SPEC_KEY) is spec:
            diffusion_model = executor.class_obj.diffusion_model
            grid = spec.family.token_grid(diffusion_model, x.shape)
            context_len = context.shape[1] if torch.is_tensor(context) and context.ndim == 3 else None
            extra_prefix = None
            if spec.family.extra_prefix is not None:
                extra_prefix = spec.family.extra_prefix(diffusion_model, kwargs, grid)
            options[GEOMETRY_KEY] = (grid, context_len, extra_prefix)
            options[COUNT_KEY] = 0
            record = options[RECORD_KEY] = ModelCallRecord()
            # the override this call's attention will go to (another one may sit in front)
            run.stacking.note_override(options.get(OVERRIDE_KEY), spec.override)
        try:
            with spec.family.access.model_call(spec, options):
                return executor(*args, **kwargs)
        finally:
            if record is not None:
                if options.get(RECORD_KEY) is record:
                    del options[RECORD_KEY]
                run.stacking.model_call_done(record, spec.layer_names)

    return ditfastattn_apply_model


# ----------------------------------------------------------------------------------------------
# Install / remove
# ----------------------------------------------------------------------------------------------

def installed_spec(model_patcher) -> Optional[PatchSpec]:
    return model_patcher.model_options.get("transformer_options", {}).get(SPEC_KEY)


def apply_patch(model_patcher, *, plan: Optional[Plan], window: WindowConfig = WindowConfig(),
                allow_remap: bool = False, ignore=(), measure_time: bool = False,
                calibration=None, signature: Optional[RunSignature] = None):
    """Return a clone of ``model_patcher`` with DiTFastAttn installed (the input is untouched).

    Applying on an already patched model replaces the earlier patch (idempotent), keeping the
    override that was installed before it. Unknown architectures: logged, plain clone returned.
    """
    import comfy.patcher_extension as pe

    diffusion_model = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    family, matched = detect_family_of(diffusion_model) if diffusion_model is not None else (None, None)
    clone = model_patcher.clone()
    name = type(diffusion_model).__name__
    problem = family.structure_problem(diffusion_model) if family is not None and family.structure_problem else None
    if family is None or problem:
        reason = f" ({problem})" if problem else ""
        log.warning("DiTFastAttn: architecture %s is not supported%s; the model is returned unchanged",
                    name, reason)
        return clone, None
    if matched != name:
        log.info("DiTFastAttn: %s is not in the family table; patched as %s (its base class %s)",
                 name, family.name, matched)
    layer_names = family.layer_names(diffusion_model)
    if plan is not None and plan.num_layers != len(layer_names):
        raise PlanMismatchError(
            [f"layers: plan has {plan.num_layers}, this {family.name} model has {len(layer_names)}"],
            ["calibrate a plan for this model with DiTFastAttnCalibrate"])

    options = clone.model_options.setdefault("transformer_options", {})
    old = options.get(SPEC_KEY)
    previous_override = old.previous_override if old is not None else options.get(OVERRIDE_KEY)
    _remove_from(clone, old)

    spec = PatchSpec(family=family, layer_names=layer_names, plan=plan, window=window,
                     previous_override=previous_override, allow_remap=allow_remap, ignore=ignore,
                     measure_time=measure_time, calibration=calibration, signature=signature)
    holder = [spec]
    options[OVERRIDE_KEY] = spec.override = _make_override(holder)
    options[SPEC_KEY] = spec

    clone.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _make_outer_sample_wrapper(spec))
    clone.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, _make_predict_noise_wrapper(spec))
    clone.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _make_apply_model_wrapper(spec))

    family.access.install(clone, diffusion_model, family, spec)
    return clone, spec


def _remove_from(clone, spec: Optional[PatchSpec]) -> None:
    """Undo an earlier DiTFastAttn patch on ``clone`` (its own copy of the options)."""
    import comfy.patcher_extension as pe

    options = clone.model_options.setdefault("transformer_options", {})
    for wrapper_type in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.PREDICT_NOISE, pe.WrappersMP.APPLY_MODEL):
        clone.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    OBJECT_PATCH.remove(clone)
    if spec is None:
        return
    if spec.previous_override is not None:
        options[OVERRIDE_KEY] = spec.previous_override
    else:
        options.pop(OVERRIDE_KEY, None)
    options.pop(SPEC_KEY, None)
    BLOCK_REPLACE.remove(clone)


def remove_patch(model_patcher):
    """A clone of ``model_patcher`` without DiTFastAttn (what bypassing the node gives)."""
    clone = model_patcher.clone()
    _remove_from(clone, installed_spec(clone))
    return clone
