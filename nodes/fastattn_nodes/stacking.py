"""What DiTFastAttn can see of other attention patches stacked on the same model, and what it logs.

ComfyUI has one attention-override slot (``transformer_options["optimized_attention_override"]``).
Other patches share it, and current core has two that change what reaches us:

* ``ModelAttentionBackend`` / ``ModelPatcher.set_model_optimized_attention(fn)`` writes a closure
  that ignores the ``func`` it is handed and never calls the override that was there before: applied
  after DiTFastAttn it *replaces* us, no attention call reaches our override any more;
* ``BlockSparseAttention`` re-installs its override on top of whatever is in the slot at every
  ``ON_PREPARE_STATE`` and chains the previous one: calls it handles sparsely never reach us, the
  others do.

Nothing here can see inside another pack's closure reliably, so the facts come from two places:
the override that a model call is about to use (the APPLY_MODEL wrapper sees it in the call's
``transformer_options``) and, per model call, which of our layers' self-attention reached our
override (:class:`ModelCallRecord`). :class:`StackingLog` collects them for the run report, warns
once per run in the log and is safe to use from the threads of core's MultiGPU CFG split.
Nothing here imports ComfyUI.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

log = logging.getLogger("reducio_fastattn.ditfastattn")

OVERRIDE_MARK = "ditfastattn_override"   # attribute set on our override closure


def is_ours(fn) -> bool:
    return bool(getattr(fn, OVERRIDE_MARK, False))


def chains_to(fn, target, depth: int = 6) -> bool:
    """Whether ``target`` is reachable from ``fn`` through closure cells / partials (how every
    override we know keeps the previous one). Heuristic: False only means "not found"."""
    seen = set()
    stack = [(fn, 0)]
    while stack:
        obj, level = stack.pop()
        if obj is target:
            return True
        if id(obj) in seen or level >= depth or obj is None:
            continue
        seen.add(id(obj))
        cells = getattr(obj, "__closure__", None) or ()
        for cell in cells:
            try:
                value = cell.cell_contents
            except ValueError:          # an empty cell
                continue
            if callable(value) or isinstance(value, (list, tuple)):
                stack.append((value, level + 1))
        if isinstance(obj, (list, tuple)):
            stack.extend((item, level + 1) for item in obj if callable(item))
        for attribute in ("func", "__wrapped__"):          # functools.partial / wraps
            inner = getattr(obj, attribute, None)
            if inner is not None and callable(inner):
                stack.append((inner, level + 1))
    return False


def describe_override(fn) -> str:
    """A readable name for another attention override, with the core node it most likely is."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    name = f"{module}.{qualname}"
    if "set_model_optimized_attention" in qualname:
        return f"{name} (core 'Model Attention Backend' / set_model_optimized_attention)"
    if module.endswith("nodes_sparse_attention"):
        return f"{name} (core 'Model Sparse Attention' / BlockSparseAttention)"
    return name


class ModelCallRecord:
    """Per model call (one APPLY_MODEL): which layers ran a block and which of them had their
    self-attention reach our override. Lives in that call's transformer_options only."""

    __slots__ = ("executed", "reached", "desynced")

    def __init__(self):
        self.executed: set = set()
        self.reached: set = set()
        self.desynced = False      # call counting lost track (an outer override took some calls)

    def __deepcopy__(self, memo):   # per-call options may be copied by other patches: stay shared
        return self

    def __copy__(self):
        return self


class StackingLog:
    """Thread-safe counters and notes about other patches for one sampling run."""

    def __init__(self):
        self._lock = threading.Lock()
        self.outer_overrides: dict[str, str] = {}   # description -> "chains" | "replaces"
        self.bypassed_calls = 0        # self-attention calls of our layers that never reached us
        self.reached_calls = 0         # ... and those that did
        self.stale_refreshes = 0       # caches dropped because an earlier step bypassed us
        self.asc_apart_calls = 0       # ASC planned, but cond and uncond ran apart (no sharing)
        self.gqa_calls = 0             # GQA calls (k/v heads expanded for the compressed path)
        self.devices: set = set()      # run-state lanes (MultiGPU CFG split: one per device)
        self.first_evaluation_checked = False
        self._warned: set = set()

    def warn_once(self, key, message: str, *args) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message, *args)

    def note_override(self, fn, ours) -> Optional[str]:
        """Record the override a model call (or the run) is about to use; None when it is ours."""
        if fn is None or is_ours(fn):
            return None
        description = describe_override(fn)
        relation = "chains" if chains_to(fn, ours) else "replaces"
        with self._lock:
            known = description in self.outer_overrides
            self.outer_overrides[description] = relation
        if not known:
            if relation == "replaces":
                self.warn_once(("replaced", description),
                               "DiTFastAttn: the attention override %s was installed after DiTFastAttn and "
                               "does not chain it: no attention call reaches DiTFastAttn, the run is not "
                               "compressed. Apply that node before DiTFastAttnApply (DiTFastAttn then uses "
                               "it for full attention).", description)
            else:
                log.info("DiTFastAttn: the attention override %s runs in front of DiTFastAttn; calls it "
                         "handles itself never reach DiTFastAttn", description)
        return relation

    def finish(self, family: str) -> None:
        """End of the run: one warning when calls went elsewhere (the report has the details)."""
        if self.bypassed_calls and self.reached_calls:
            outer = ", ".join(sorted(self.outer_overrides)) or "another attention override"
            self.warn_once("bypassed", "DiTFastAttn (%s): %d of %d self-attention calls were handled by %s and "
                           "never reached DiTFastAttn; %d later calls recomputed instead of reusing a cache",
                           family, self.bypassed_calls, self.bypassed_calls + self.reached_calls, outer,
                           self.stale_refreshes)

    def model_call_done(self, record: ModelCallRecord, layer_names) -> None:
        executed = record.executed if record.executed else set(layer_names)
        bypassed = len(executed - record.reached)
        with self._lock:
            self.bypassed_calls += bypassed
            self.reached_calls += len(record.reached & executed)

    def add(self, counter: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + n)

    def add_device(self, key) -> None:
        with self._lock:
            self.devices.add(key)

    def notes(self) -> list[str]:
        notes = []
        for description, relation in sorted(self.outer_overrides.items()):
            if relation == "replaces":
                notes.append(f"attention override {description} replaced DiTFastAttn's (it does not chain "
                             f"it): apply it before DiTFastAttnApply")
            else:
                notes.append(f"attention override {description} runs in front of DiTFastAttn")
        if self.bypassed_calls:
            total = self.bypassed_calls + self.reached_calls
            notes.append(f"{self.bypassed_calls} of {total} self-attention calls of patched layers never "
                         f"reached DiTFastAttn (handled by another attention override)")
        if self.stale_refreshes:
            notes.append(f"{self.stale_refreshes} calls ran full attention instead of reusing a cache, "
                         f"because an earlier step of that layer did not reach DiTFastAttn")
        if self.asc_apart_calls:
            notes.append(f"ASC (CFG sharing) inactive for {self.asc_apart_calls} calls: cond and uncond "
                         f"ran apart (e.g. core MultiGPU CFG split on different devices)")
        if len(self.devices) > 1:
            notes.append(f"run state kept per device: {len(self.devices)} devices")
        if self.gqa_calls:
            notes.append(f"{self.gqa_calls} GQA calls: key/value heads expanded for the compressed path")
        return notes

