"""DiTFastAttn for diffusers pipelines: calibrate a plan, apply it, restore the model exactly.

```python
from fastattn import Plan
from fastattn.integrations.diffusers import calibrate, apply_plan

plan = calibrate(pipe, threshold=0.05, window=(8, 8), num_inference_steps=10, **pipe_call_kwargs)
plan.save("dit.plan.json")
with apply_plan(pipe.transformer, plan):
    images = pipe(**pipe_call_kwargs, num_inference_steps=10).images
```

Supported: transformers whose ``transformer_blocks[i].attn1`` is a diffusers self-attention
``Attention`` module — ``DiTTransformer2DModel`` (``DiTPipeline``, CFG batch [cond, uncond]) and
``PixArtTransformer2DModel`` (``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``, CFG batch
[uncond, cond]). Only ``attn1`` is compressed, like the official code.

How it hooks in: the ``attn1`` processors are swapped for ``FastAttnProcessor`` (fa-core) and a
forward pre-hook / hook pair on the transformer tracks the denoiser evaluation index. A new
sampling run is recognised when the previous run used up all planned evaluations or when the
timestep goes up again; caches are dropped at the start and at the end of every run. On exit
(or on any error) the original processors are put back and the hooks removed: the model is left
exactly as it was (same processor objects, same parameters, no attribute added).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from ..calibration import (OFFICIAL_CANDIDATES, GreedyCalibration, LossFn, ProgressFn,
                           official_loss)
from ..methods import parse_method
from ..plan import FULL, Plan, PlanMismatchError, RunSignature, weights_fingerprint
from ..windows import Window1D
from .diffusers_processor import FastAttnProcessor

logger = logging.getLogger(__name__)

# CFG batch order of each supported pipeline: True = [cond, uncond].
PIPELINE_COND_FIRST = {"DiTPipeline": True, "PixArtAlphaPipeline": False,
                       "PixArtSigmaPipeline": False}
TRANSFORMER_COND_FIRST = {"DiTTransformer2DModel": True, "PixArtTransformer2DModel": False}


class UnsupportedModelError(TypeError):
    """The transformer does not have the structure DiTFastAttn V1 compresses."""


# --------------------------------------------------------------------------------------------
# Model facts
# --------------------------------------------------------------------------------------------

def compressed_attention_layers(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every self-attention ``attn1``, in block order."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None and isinstance(getattr(transformer, "transformer", None), torch.nn.Module):
        raise UnsupportedModelError(f"got a {type(transformer).__name__}; pass its "
                                    f"transformer (pipe.transformer), not the pipeline")
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"{type(transformer).__name__} has no `transformer_blocks`; DiTFastAttn's diffusers "
            f"integration supports DiT- and PixArt-style transformers (DiTTransformer2DModel, "
            f"PixArtTransformer2DModel)")
    layers = []
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn1", None)
        if attn is None or not hasattr(attn, "set_processor"):
            raise UnsupportedModelError(f"transformer_blocks[{index}] has no diffusers `attn1`")
        if getattr(attn, "is_cross_attention", False):
            raise UnsupportedModelError(f"transformer_blocks[{index}].attn1 is cross-attention; "
                                        f"V1 compresses self-attention only")
        layers.append((f"transformer_blocks.{index}.attn1", attn))
    return layers


def model_signature(transformer: torch.nn.Module) -> dict[str, Any]:
    """Architecture facts stored in (and checked against) plan metadata."""
    layers = compressed_attention_layers(transformer)
    attn = layers[0][1]
    return {
        "architecture": type(transformer).__name__,
        "num_layers": len(layers),
        "num_heads": int(attn.heads),
        "head_dim": int(attn.inner_dim // attn.heads),
        "layer_names": [name for name, _ in layers],
        "weights_fingerprint": weights_fingerprint(transformer.state_dict().items()),
    }


def _default_cond_first(transformer: torch.nn.Module, pipe: Any = None) -> bool:
    if pipe is not None and type(pipe).__name__ in PIPELINE_COND_FIRST:
        return PIPELINE_COND_FIRST[type(pipe).__name__]
    name = type(transformer).__name__
    if name in TRANSFORMER_COND_FIRST:
        return TRANSFORMER_COND_FIRST[name]
    raise UnsupportedModelError(
        f"unknown CFG batch order for {name}; pass cond_first=True ([cond, uncond] batches, "
        f"like DiTPipeline) or cond_first=False ([uncond, cond], like PixArt)")


def _timestep_value(args: tuple, kwargs: dict) -> float | None:
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    return float(timestep)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError("the transformer was called without a hidden_states tensor")
    return hidden


def _token_grid(transformer: torch.nn.Module, hidden: torch.Tensor) -> tuple[int, ...]:
    patch = int(getattr(transformer.config, "patch_size", 1) or 1)
    if hidden.ndim == 4:
        return (hidden.shape[-2] // patch, hidden.shape[-1] // patch)
    return (hidden.shape[1],)


def sigma_of_timestep(scheduler: Any, timestep: float) -> float | None:
    """Noise level sigma = sqrt((1 - a) / a) of a DDPM-style timestep (linear interpolation of
    ``alphas_cumprod``); for flow-matching schedulers ``t / num_train_timesteps``."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor) and alphas.numel():
        t = min(max(float(timestep), 0.0), alphas.numel() - 1)
        low = int(math.floor(t))
        high = min(low + 1, alphas.numel() - 1)
        a = float(alphas[low]) + (float(alphas[high]) - float(alphas[low])) * (t - low)
        return math.sqrt(max(1 - a, 0.0) / max(a, 1e-12))
    train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    return float(timestep) / float(train) if train else None


def scheduler_schedule(scheduler: Any, num_inference_steps: int) -> tuple[list[float], list[float | None]]:
    """Timesteps the transformer will see (one per evaluation) and their sigmas, computed on a
    copy of the scheduler (the pipeline's own scheduler is not touched)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_inference_steps)
    timesteps = [float(t) for t in probe.timesteps]
    return timesteps, [sigma_of_timestep(probe, t) for t in timesteps]


def _scheduler_config(scheduler: Any) -> dict[str, Any]:
    config = getattr(scheduler, "config", {}) or {}
    out = {}
    for key, value in dict(config).items():
        if key.startswith("_"):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
    return out


def _call_default(pipe: Any, name: str) -> Any:
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None else parameter.default


# --------------------------------------------------------------------------------------------
# Processor installation with exact restore
# --------------------------------------------------------------------------------------------

class _InstalledProcessors:
    """Swaps attn1 processors and hooks; ``restore()`` undoes everything."""

    def __init__(self, transformer: torch.nn.Module, processors: Sequence[FastAttnProcessor],
                 pre_hook: Callable, post_hook: Callable):
        self.transformer = transformer
        self.layers = compressed_attention_layers(transformer)
        if len(processors) != len(self.layers):
            raise ValueError(f"{len(processors)} processors for {len(self.layers)} layers")
        self.originals = [attn.processor for _, attn in self.layers]
        self.processors = list(processors)
        self.handles = []
        try:
            for (_, attn), processor in zip(self.layers, self.processors):
                attn.set_processor(processor)
            self.handles.append(transformer.register_forward_pre_hook(pre_hook, with_kwargs=True))
            self.handles.append(transformer.register_forward_hook(post_hook, with_kwargs=True))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for (_, attn), original in zip(self.layers, self.originals):
            attn.set_processor(original)
        for processor in self.processors:
            processor.reset()


def _window_for(window: Any, tokens: int) -> Window1D:
    if window is None:
        per_side = max(tokens // 8, 0)  # the paper's "1/8 of the tokens" per side
        return Window1D(per_side, per_side)
    if isinstance(window, Window1D):
        return window
    left, right = window
    return Window1D(int(left), int(right))


# --------------------------------------------------------------------------------------------
# Applying a plan
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AppliedPlan:
    """Handle yielded by ``apply_plan``: the plan in use and the evaluation counter."""

    plan: Plan
    step: int = 0
    runs: int = 0
    last_timestep: float | None = None
    window: Window1D | None = None
    token_grid: tuple[int, ...] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    _installed: Any = None

    def reset(self) -> None:
        """Forget the current run (e.g. after an interrupted pipeline call)."""
        self.step = 0
        self.last_timestep = None
        for processor in self._installed.processors:
            processor.reset()


@contextlib.contextmanager
def apply_plan(transformer: torch.nn.Module, plan: Plan, *, window: Any = None,
               cond_first: bool | None = None, scheduler: Any = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               allow_remap: bool = False, ignore: Sequence[str] = (),
               official_asc_residual: bool = True, kernel_backend: str = "auto"
               ) -> Iterator[AppliedPlan]:
    """Run ``transformer`` with ``plan`` inside the ``with`` block; restore it exactly on exit.

    The plan is checked against the model (architecture, layers, heads, weights) and, when
    ``scheduler`` + ``num_inference_steps`` / ``guidance_scale`` are given, against the run
    (step count, noise levels, CFG scale); the token grid is checked at the first call. A
    mismatch raises ``PlanMismatchError``; ``allow_remap`` maps steps by noise level instead,
    ``ignore`` waives listed checks. ``window`` defaults to the plan's, else N/8 per side.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"apply_plan needs a fastattn Plan, got {type(plan).__name__}; use "
                        f"Plan.load(path) / Plan.from_official(list) first")
    if plan.granularity != "layer":
        raise ValueError("the diffusers integration runs layer-wise (V1) plans only")
    facts = model_signature(transformer)
    timesteps = sigmas = None
    if scheduler is not None and num_inference_steps is not None:
        timesteps, sigmas = scheduler_schedule(scheduler, num_inference_steps)
    run = RunSignature(
        num_layers=facts["num_layers"], num_heads=facts["num_heads"],
        architecture=facts["architecture"], weights_fingerprint=facts["weights_fingerprint"],
        num_steps=len(timesteps) if timesteps is not None else None,
        sampler=type(scheduler).__name__ if scheduler is not None else None,
        sigmas=tuple(sigmas) if sigmas and all(s is not None for s in sigmas) else None,
        cfg_scale=guidance_scale)
    plan = plan.check(run, allow_remap=allow_remap, ignore=ignore)
    if cond_first is None:
        cond_first = (plan.metadata.cond_first if plan.metadata.cond_first is not None
                      else _default_cond_first(transformer))
    if guidance_scale is not None and guidance_scale <= 1 and any(
            parse_method(m).cfg_share for m in plan.method_counts()):
        raise PlanMismatchError(
            [f"the plan shares attention across CFG halves (ASC), but guidance_scale="
             f"{guidance_scale} runs without a CFG batch"],
            ["calibrate without CFG (guidance_scale <= 1 drops ASC candidates), or use CFG"])
    fixed_window = window if window is not None else plan.metadata.window
    processors = [FastAttnProcessor(plan.layer_methods(i), window_size=(0, 0),
                                    cond_first=cond_first,
                                    official_asc_residual=official_asc_residual,
                                    kernel_backend=kernel_backend)
                  for i in range(plan.num_layers)]
    handle = AppliedPlan(plan=plan, notes=list(plan.metadata.notes))
    ignored = set(ignore)

    def pre_hook(module, args, kwargs):
        timestep = _timestep_value(args, kwargs)
        if handle.step >= plan.num_steps:
            # A timestep that does not go up means the same run went on. Not for one-step
            # plans: every run of those starts (and ends) at the same timestep.
            if (plan.num_steps > 1 and handle.last_timestep is not None and timestep is not None
                    and timestep <= handle.last_timestep):
                raise PlanMismatchError(
                    [f"the sampler evaluated the transformer more than the plan's "
                     f"{plan.num_steps} times in one run"],
                    [f"run with the plan's step count ({plan.num_steps} evaluations), pass "
                     f"scheduler=/num_inference_steps= with allow_remap=True, or recalibrate"])
            handle.step = 0
        if handle.step == 0 or (handle.last_timestep is not None and timestep is not None
                                and timestep > handle.last_timestep):
            # a new sampling run: fresh caches, window sized for this run's tokens
            handle.step = 0
            handle.runs += 1
            for processor in processors:
                processor.reset()
            grid = _token_grid(module, _hidden_states(args, kwargs))
            expected = plan.metadata.token_grid
            if expected and tuple(expected) != grid and "token_grid" not in ignored:
                raise PlanMismatchError(
                    [f"token grid (resolution): plan {list(expected)}, run {list(grid)} "
                     f"(the window is counted in tokens)"],
                    ["recalibrate at this resolution, or pass ignore=['token_grid'] to use "
                     "the plan anyway"])
            handle.token_grid = grid
            handle.window = _window_for(fixed_window, math.prod(grid))
            for processor in processors:
                processor.window = handle.window
        for processor in processors:
            processor.stepi = handle.step
        handle.last_timestep = timestep

    def post_hook(module, args, kwargs, output):
        handle.step += 1
        if handle.step == plan.num_steps:  # end of the run: free the caches now
            for processor in processors:
                processor.cache.clear()

    installed = _InstalledProcessors(transformer, processors, pre_hook, post_hook)
    handle._installed = installed
    try:
        yield handle
    finally:
        installed.restore()


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CalibrationResult:
    plan: Plan
    search: GreedyCalibration
    seconds: float
    model_outputs: list[torch.Tensor] | None = None

    @property
    def trials(self):
        return self.search.trials


def calibrate(pipe: Any, threshold: float = 0.05, window: Any = None,
              num_inference_steps: int | None = None, **pipe_call_kwargs) -> Plan:
    """Calibrate a plan with one pipeline run (spec section 2). See ``calibrate_detailed``."""
    return calibrate_detailed(pipe, threshold, window, num_inference_steps,
                              **pipe_call_kwargs).plan


def calibrate_detailed(pipe: Any, threshold: float = 0.05, window: Any = None,
                       num_inference_steps: int | None = None, *,
                       candidates: Sequence[str] = OFFICIAL_CANDIDATES,
                       loss: LossFn = official_loss, cond_first: bool | None = None,
                       seed: int = 3, progress: ProgressFn | None = None,
                       keep_model_outputs: bool = False, official_asc_residual: bool = True,
                       kernel_backend: str = "auto", **pipe_call_kwargs) -> CalibrationResult:
    """Run ``pipe`` once with the calibration inputs and search the plan greedily.

    ``pipe_call_kwargs`` are the pipeline's own arguments (``class_labels`` for DiT, ``prompt``
    or ``prompt_embeds`` for PixArt, ``guidance_scale``, ``generator``...). Without a
    ``generator`` a fresh ``torch.Generator().manual_seed(seed)`` is used (the official seed is
    3). ``window`` is per side in tokens (default N/8). With ``guidance_scale <= 1`` the ASC
    candidates are dropped (there is no CFG batch to share). The pipeline's output is discarded;
    the transformer is restored exactly afterwards, also on error.
    """
    transformer = pipe.transformer
    facts = model_signature(transformer)
    layers = facts["num_layers"]
    if num_inference_steps is None:
        num_inference_steps = _call_default(pipe, "num_inference_steps")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got "
                         f"{num_inference_steps!r}")
    guidance = pipe_call_kwargs.get("guidance_scale", _call_default(pipe, "guidance_scale"))
    if cond_first is None:
        cond_first = _default_cond_first(transformer, pipe)
    candidates = tuple(candidates)
    dropped = []
    if guidance is not None and guidance <= 1:
        dropped = [c for c in candidates if parse_method(c).cfg_share]
        candidates = tuple(c for c in candidates if c not in dropped)
    timesteps, sigmas = scheduler_schedule(pipe.scheduler, num_inference_steps)
    num_evals = len(timesteps)
    search = GreedyCalibration(layers, num_evals, threshold, candidates, loss, progress)
    processors = [FastAttnProcessor([FULL] * num_evals, window_size=(0, 0), cond_first=cond_first,
                                    need_compute_residual=[True] * num_evals,
                                    official_asc_residual=official_asc_residual,
                                    kernel_backend=kernel_backend)
                  for _ in range(layers)]
    state: dict[str, Any] = {"step": 0, "grid": None, "window": None, "rows": None,
                             "seen_timesteps": []}
    outputs: list[torch.Tensor] = []

    def set_step(step: int, methods: Sequence[str], trial: bool) -> None:
        for processor, method in zip(processors, methods):
            processor.steps_method[step] = parse_method(method)
            processor.need_compute_residual[step] = not trial
            processor.need_cache_output = not trial
            processor.stepi = step

    def pre_hook(module, args, kwargs):
        step = state["step"]
        if step >= num_evals:
            raise RuntimeError(f"the pipeline evaluated the transformer more than the "
                               f"{num_evals} times its scheduler announced; calibration of "
                               f"multi-evaluation samplers needs the evaluation count up front")
        if step == 0:
            hidden = _hidden_states(args, kwargs)
            state["grid"] = _token_grid(module, hidden)
            state["window"] = _window_for(window, math.prod(state["grid"]))
            state["rows"] = int(hidden.shape[0])
            for processor in processors:
                processor.window = state["window"]
        state["seen_timesteps"].append(_timestep_value(args, kwargs))

        def evaluate(methods: Sequence[str]):
            set_step(step, methods, trial=True)
            return module.forward(*args, **kwargs)  # bypasses the hooks: a trial, not a step

        chosen = search.search_step(step, evaluate)
        set_step(step, chosen, trial=False)

    def post_hook(module, args, kwargs, output):
        if keep_model_outputs:
            tensor = output.sample if hasattr(output, "sample") else output[0]
            outputs.append(tensor.detach().clone())
        state["step"] += 1

    call_kwargs = dict(pipe_call_kwargs)
    if "generator" not in call_kwargs:
        call_kwargs["generator"] = torch.Generator().manual_seed(seed)
    if "output_type" not in call_kwargs and _call_default(pipe, "output_type") is not None:
        call_kwargs["output_type"] = "latent"  # the images are discarded: skip decoding where possible
    started = time.perf_counter()
    installed = _InstalledProcessors(transformer, processors, pre_hook, post_hook)
    try:
        with torch.no_grad():
            pipe(num_inference_steps=num_inference_steps, **call_kwargs)
    finally:
        installed.restore()
    seconds = time.perf_counter() - started
    if state["step"] != num_evals:
        raise RuntimeError(f"calibration saw {state['step']} transformer evaluations, expected "
                           f"{num_evals}; the plan would not match this pipeline's runs")

    cfg_batch = guidance is not None and guidance > 1
    notes = []
    if dropped:
        notes.append(f"guidance_scale {guidance} <= 1: no CFG batch, candidates {dropped} "
                     f"were not tried")
    metadata = dict(
        facts,
        token_grid=list(state["grid"]),
        sampler=type(pipe.scheduler).__name__,
        sigmas=list(sigmas) if all(s is not None for s in sigmas) else None,
        cfg_scale=float(guidance) if guidance is not None else None,
        cond_first=bool(cond_first),
        # flash-attn's negative conventions ((-1, -1) = full, (-w, w) = unbounded left) are
        # stored as the per-side reach they resolve to: plan metadata holds token counts >= 0,
        # and a reach >= N reads back as unbounded, so the reloaded window keeps the same pairs.
        window=list(state["window"].resolved(math.prod(state["grid"]))),
        calibration_inputs=state["rows"] // 2 if cfg_batch else state["rows"],
        notes=notes,
        extra={
            "pipeline": type(pipe).__name__,
            "num_inference_steps": num_inference_steps,
            "timesteps": [t for t in state["seen_timesteps"] if t is not None],
            "scheduler_config": _scheduler_config(pipe.scheduler),
            "official_asc_residual": official_asc_residual,
            "calibration_forwards": search.forward_count + num_evals,
            "calibration_seconds": round(seconds, 3),
        })
    plan = search.to_plan(metadata)
    return CalibrationResult(plan=plan, search=search, seconds=seconds,
                             model_outputs=outputs if keep_model_outputs else None)


# --------------------------------------------------------------------------------------------
# Measuring the attention share (for the Amdahl bound in fastattn.report)
# --------------------------------------------------------------------------------------------

class _TimedProcessor:
    def __init__(self, inner: Any, totals: list):
        self.inner = inner
        self.totals = totals

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if hidden_states.is_cuda:
            torch.cuda.synchronize(hidden_states.device)
        started = time.perf_counter()
        out = self.inner(attn, hidden_states, *args, **kwargs)
        if hidden_states.is_cuda:
            torch.cuda.synchronize(hidden_states.device)
        self.totals[0] += time.perf_counter() - started
        return out


def measure_attention_share(pipe: Any, **pipe_call_kwargs) -> float:
    """Share of one uncompressed pipeline call's wall time spent in the attn1 processors
    (Q/K/V/O projections included). Restores the processors afterwards."""
    layers = compressed_attention_layers(pipe.transformer)
    totals = [0.0]
    originals = [attn.processor for _, attn in layers]
    try:
        for (_, attn), original in zip(layers, originals):
            attn.set_processor(_TimedProcessor(original, totals))
        started = time.perf_counter()
        with torch.no_grad():
            pipe(**pipe_call_kwargs)
        elapsed = time.perf_counter() - started
    finally:
        for (_, attn), original in zip(layers, originals):
            attn.set_processor(original)
    return totals[0] / elapsed if elapsed > 0 else 0.0
