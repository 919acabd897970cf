"""DiTFastAttn V1 calibration: the greedy per-step, per-layer plan search (spec section 2).

The search is model-agnostic. It only needs a way to evaluate the transformer at the current
denoising step with a given per-layer method assignment, without touching the compression
caches. Two ways to drive it:

* **Hook-driven** (diffusers pre-hook, ComfyUI model wrapper): the sampler owns the loop. At each
  transformer call, call ``GreedyCalibration.search_step(step, evaluate)``; it returns the
  chosen methods, which the caller then runs for real (updating the caches) to produce the
  output that drives the sampler.
* **Loop-driven**: implement ``CalibrationTarget`` (``run_step(step, methods, commit=...)``) and
  call ``calibrate_target(target, threshold)``.

Algorithm (the official code's, which the golden data reproduces; spec 2.2-2.4):

* step 0 is always full attention (no cache exists yet);
* at step t >= 1, the reference output O is the whole transformer's output at this step with
  every layer on full attention (inputs and caches come from the already compressed
  trajectory);
* layers are visited in order i = 0..L-1; for each, the candidates are tried in order
  (default AST, WA-RS+ASC, WA-RS, ASC: highest compression first) with the layers before i on
  their chosen method and the layers after on full attention; the first candidate whose loss is
  strictly below ``(i + 1) / L * threshold`` is kept, else full attention;
* during calibration every full-attention step stores a WA-RS residual; trials never write a
  cache.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from .plan import (AST, ASC, FULL, PLAN_METHODS, WARS, WARS_ASC, Plan, PlanMetadata)

# Highest compression first, as the official code orders them (spec 2.3).
OFFICIAL_CANDIDATES: tuple[str, ...] = (AST, WARS_ASC, WARS, ASC)
OFFICIAL_METRIC = "official_rel_l1"

Output = Any  # a tensor, a sequence of tensors, or an object with a ``.sample`` tensor
Evaluate = Callable[[Sequence[str]], Output]
LossFn = Callable[[Output, Output], float]


def _output_tensors(output: Output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):  # diffusers Transformer2DModelOutput
        return [sample]
    if isinstance(output, (list, tuple)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    raise TypeError(f"cannot compare a transformer output of type {type(output).__name__}; "
                    f"expected a tensor, a tuple of tensors or an object with .sample")


def official_loss(reference: Output, candidate: Output) -> float:
    """The official default metric: mean of clip(|(O - O') / (max(O, O') + 1e-6)|, 0, 10).

    ``max`` is the elementwise *signed* maximum, as in the official code (the paper writes
    max(|O|, |O'|)); where it is near zero or negative the ratio is large and clipped to 10.
    Covers the whole output (every CFG row, learned-sigma channels included); tuple outputs
    are averaged. Computed in float32 so fp16/bf16 models do not overflow the ratio.
    """
    refs, cands = _output_tensors(reference), _output_tensors(candidate)
    if len(refs) != len(cands) or not refs:
        raise ValueError(f"outputs differ in structure: {len(refs)} vs {len(cands)} tensors")
    losses = []
    for a, b in zip(refs, cands):
        if a.shape != b.shape:
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        a32, b32 = a.detach().float(), b.detach().float()
        ratio = (a32 - b32) / (torch.maximum(a32, b32) + 1e-6)
        losses.append(ratio.abs().clamp(0, 10).mean())
    return float(sum(losses) / len(losses))


def layer_thresholds(num_layers: int, threshold: float) -> list[float]:
    """Per-layer thresholds ``(i + 1) / L * delta`` (linear in the 0-based layer index).

    Evaluated in exactly this order of operations so the float values equal the official ones.
    """
    return [(i + 1) / num_layers * threshold for i in range(num_layers)]


@dataclasses.dataclass(frozen=True)
class Trial:
    step: int
    layer: int
    method: str
    loss: float
    threshold: float
    accepted: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ProgressFn = Callable[[int, int, "Trial | None"], None]


class GreedyCalibration:
    """Accumulates the greedy search over the steps of one sampling run.

    ``methods[step][layer]`` starts all full. ``search_step`` fills one step. Everything is
    explicit state of this object; nothing is global.
    """

    def __init__(self, num_layers: int, num_steps: int, threshold: float,
                 candidates: Sequence[str] = OFFICIAL_CANDIDATES, loss: LossFn = official_loss,
                 progress: ProgressFn | None = None):
        if num_layers < 1 or num_steps < 1:
            raise ValueError("calibration needs at least one layer and one step")
        if not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        unknown = [c for c in candidates if c not in PLAN_METHODS or c == FULL]
        if unknown:
            raise ValueError(f"unknown or non-compressing candidate methods {unknown}; choose "
                             f"from {[m for m in PLAN_METHODS if m != FULL]}")
        self.num_layers = num_layers
        self.num_steps = num_steps
        self.threshold = float(threshold)
        self.candidates = tuple(candidates)
        self.loss = loss
        self.progress = progress
        self.thresholds = layer_thresholds(num_layers, self.threshold)
        self.methods: list[list[str]] = [[FULL] * num_layers for _ in range(num_steps)]
        self.trials: list[Trial] = []
        self.searched_steps: list[int] = []
        self.forward_count = 0
        self.seconds = 0.0

    def search_step(self, step: int, evaluate: Evaluate) -> list[str]:
        """Choose the methods of ``step`` and return them.

        ``evaluate(methods)`` must run the transformer at this step with ``methods[i]`` for
        layer i and return its output **without changing any cache** (no residual or output
        writes, step counters restored). The caller runs the chosen methods for real afterwards.
        """
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside the calibrated {self.num_steps} steps")
        if step in self.searched_steps:
            raise RuntimeError(f"step {step} was already calibrated in this run; the sampler "
                               f"evaluated the model more often than the plan has steps")
        self.searched_steps.append(step)
        if step == 0:  # step 0 is always full: there is no cache to share yet
            return list(self.methods[0])
        started = time.perf_counter()
        reference = evaluate([FULL] * self.num_layers)
        self.forward_count += 1
        current = [FULL] * self.num_layers
        for layer in range(self.num_layers):
            limit = self.thresholds[layer]
            chosen = FULL
            for method in self.candidates:
                current[layer] = method
                loss = self.loss(reference, evaluate(current))
                self.forward_count += 1
                accepted = loss < limit  # strict, as in the official code
                trial = Trial(step, layer, method, loss, limit, accepted)
                self.trials.append(trial)
                if self.progress is not None:
                    self.progress(step, layer, trial)
                if accepted:
                    chosen = method
                    break
            current[layer] = chosen
        self.methods[step] = list(current)
        self.seconds += time.perf_counter() - started
        return list(current)

    @property
    def complete(self) -> bool:
        return len(self.searched_steps) == self.num_steps

    def decisions(self) -> list[dict[str, Any]]:
        return [{"block": layer, "step": step, "selected": self.methods[step][layer]}
                for step in range(1, self.num_steps) for layer in range(self.num_layers)]

    def to_plan(self, metadata: PlanMetadata | dict | None = None, *,
                num_steps: int | None = None, **fields) -> Plan:
        """The finished plan. ``fields`` are extra metadata (architecture, sigmas, ...).

        ``num_steps`` keeps only the first steps, for callers that allocated more evaluations
        than the sampler turned out to use; those steps must all have been searched.
        """
        steps = self.num_steps if num_steps is None else num_steps
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"num_steps must be in [1, {self.num_steps}], got {num_steps}")
        if sorted(self.searched_steps)[:steps] != list(range(steps)):
            raise RuntimeError(f"calibration saw {len(self.searched_steps)} of {steps} "
                               f"steps; the sampling run ended early or used fewer steps")
        meta = dict(metadata.to_dict() if isinstance(metadata, PlanMetadata) else metadata or {})
        meta.update(fields)
        meta.setdefault("threshold", self.threshold)
        meta.setdefault("candidates", list(self.candidates))
        meta.setdefault("metric", OFFICIAL_METRIC if self.loss is official_loss else
                        getattr(self.loss, "__name__", "custom"))
        return Plan(self.methods[:steps], meta)


@runtime_checkable
class CalibrationTarget(Protocol):
    """A transformer that can be run step by step (loop-driven calibration).

    ``run_step(step, methods, commit=False)``: evaluate the model at ``step`` with
    ``methods[i]`` for layer i, from the current state, and return the output, leaving every
    cache and the sampler state unchanged (snapshot/restore if needed).
    ``run_step(step, methods, commit=True)``: run it for real: store the caches (a WA-RS
    residual at every full-attention layer, the output for AST) and advance the sampler to
    the next step. Called exactly once per step, in order, after the trials of that step.
    """

    num_layers: int
    num_steps: int

    def run_step(self, step: int, methods: Sequence[str], *, commit: bool) -> Output: ...


class SteppedRuntimeTarget:
    """A ready :class:`CalibrationTarget` for a model whose attention calls all go through one
    :class:`~fastattn.runtime.FastAttnRuntime` and whose sampler runs step by step.

    ``model_output(step, runtime)``: the model's output at ``step`` from the sampler's current
    state, every compressible attention call through ``runtime`` (layer keys 0..L-1).
    ``advance(step, output)``: commit that step (move the sampler on). Trials restore every cache.
    ``runtime_kwargs`` go to the runtime (e.g. ``kernel_backend``)."""

    def __init__(self, num_layers: int, num_steps: int, model_output: Callable[[int, Any], Output],
                 advance: Callable[[int, Output], None], window: Any, **runtime_kwargs):
        from .runtime import FastAttnRuntime

        if runtime_kwargs.get("planner") is not None:
            raise ValueError("SteppedRuntimeTarget drives V1's search; a planner (V2 calibration) would keep "
                             "what trials did to it. Calibrate V2 with fastattn.headwise.calibrate_headwise")
        self.num_layers, self.num_steps = int(num_layers), int(num_steps)
        self._model_output, self._advance = model_output, advance
        self._methods: list[str] = [FULL] * self.num_layers
        self.runtime = FastAttnRuntime(lambda step, layer: self._methods[layer], window, **runtime_kwargs)

    def run_step(self, step: int, methods: Sequence[str], *, commit: bool) -> Output:
        self._methods = list(methods)
        if commit:
            output = self._model_output(step, self.runtime)
            self._advance(step, output)
            return output
        snapshot = self.runtime.state.snapshot()
        try:
            return self._model_output(step, self.runtime)
        finally:    # a trial leaves every cache as it was, also when it raises
            self.runtime.state.restore(snapshot)


def calibrate_target(target: CalibrationTarget, threshold: float,
                     candidates: Sequence[str] = OFFICIAL_CANDIDATES, loss: LossFn = official_loss,
                     progress: ProgressFn | None = None) -> GreedyCalibration:
    """Run the whole greedy search over ``target`` and return the filled calibration."""
    search = GreedyCalibration(target.num_layers, target.num_steps, threshold, candidates,
                               loss, progress)
    for step in range(target.num_steps):
        chosen = search.search_step(
            step, lambda methods, _step=step: target.run_step(_step, list(methods), commit=False))
        target.run_step(step, chosen, commit=True)
    return search
