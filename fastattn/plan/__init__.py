"""DiTFastAttn compression plans: a versioned JSON format with the metadata that makes reuse safe.

* :mod:`.format`: the plan object, its JSON / official-list forms and their validation;
* :mod:`.schema`: the published JSON Schema, generated from the limits ``format`` enforces;
* :mod:`.compat`: does a plan fit a run, and step remapping (the one place both integrations use);
* :mod:`.fingerprint`: the weights fingerprint a plan records.

``from fastattn.plan import Plan, RunSignature, ...`` keeps working.
"""

from .compat import IGNORABLE, RunSignature, StepMap, check_plan, check_sampling_run, plan_window, window_tokens
from .fingerprint import weights_fingerprint
from .format import (
    AST, ASC, FORMAT_NAME, FORMAT_VERSION, FULL, GRANULARITIES, MAX_ENTRIES, MAX_EXTRA_KEYS, MAX_FILE_BYTES,
    MAX_HEADS, MAX_LAYERS, MAX_NESTING, MAX_NOTES, MAX_STEPS, MAX_STRING, PACKAGE_VERSION, PLAN_METHODS,
    WA_NO_RESIDUAL, WARS, WARS_ASC, WINDOW_SHAPES, Plan, PlanError, PlanFormatError, PlanMetadata,
    PlanMismatchError, is_full_method, needs_cached_output, needs_residual, parse_json_text,
)

__all__ = [
    "AST", "ASC", "FORMAT_NAME", "FORMAT_VERSION", "FULL", "GRANULARITIES", "IGNORABLE", "MAX_ENTRIES",
    "MAX_EXTRA_KEYS", "MAX_FILE_BYTES", "MAX_HEADS", "MAX_LAYERS", "MAX_NESTING", "MAX_NOTES", "MAX_STEPS",
    "MAX_STRING", "PACKAGE_VERSION", "PLAN_METHODS", "WA_NO_RESIDUAL", "WARS", "WARS_ASC", "WINDOW_SHAPES",
    "Plan", "PlanError", "PlanFormatError", "PlanMetadata", "PlanMismatchError", "RunSignature", "StepMap",
    "check_plan", "check_sampling_run", "is_full_method", "needs_cached_output", "needs_residual",
    "parse_json_text", "plan_window", "window_tokens", "weights_fingerprint",
]
