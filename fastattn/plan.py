"""DiTFastAttn compression plans: a versioned JSON format with the metadata that makes reuse safe.

A plan says, for every denoiser evaluation ("step") and every compressed attention layer (and
optionally every head), which method runs. Methods use the official DiTFastAttn V1 code strings
(``full_attn``, ``output_share``, ``residual_window_attn``, ...; see ``PLAN_METHODS``) so that
plans stay readable and import/export the official list format without a translation table.

Plans are tied to the model (architecture, layer/head counts, weights), the token grid (the
window is counted in tokens), the sampler's step grid and the CFG scale. ``Plan.check`` compares
a plan's metadata with the run it is about to be used in and refuses a mismatch with a message
that says what differs and how to fix it; on request it remaps steps by their position on the
sigma schedule instead.

File I/O is plain JSON only (``Plan.load`` never unpickles). The official implementation saves
plans with ``torch.save`` under a ``.json`` name; ``Plan.load_official_file`` reads those with
``torch.load(weights_only=True)``, which cannot execute code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .methods import ARROW_PREFIX, is_method_string

logger = logging.getLogger(__name__)

FORMAT_NAME = "ditfastattn-plan"
FORMAT_VERSION = 1

# Official V1 method strings (spec section 1). The plan format owns this list: it is what a
# plan file may contain. The runtime interprets them.
FULL = "full_attn"
AST = "output_share"
WARS = "residual_window_attn"
ASC = "full_attn+cfg_attn_share"
WARS_ASC = "residual_window_attn+cfg_attn_share"
WA_NO_RESIDUAL = "residual_window_attn+without_residual"
PLAN_METHODS: tuple[str, ...] = (FULL, AST, WARS, ASC, WARS_ASC, WA_NO_RESIDUAL)
# DiTFastAttnV2 head-wise arrow attention: ``arrow_attn_<k>`` (k = window factor) is also a
# valid plan method (see fastattn.methods); the per-side window it ran with is recorded in
# ``metadata.arrow_windows``.

# Limits against hostile or corrupted files. Real plans are tiny (50 steps x 28-60 layers).
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_STEPS = 10_000
MAX_LAYERS = 4_096
MAX_HEADS = 1_024
MAX_ENTRIES = 2_000_000
MAX_NESTING = 32
MAX_STRING = 4_096
MAX_NOTES = 256
MAX_EXTRA_KEYS = 256

GRANULARITIES = ("layer", "head")


class PlanError(ValueError):
    """Base class: a plan is malformed or unusable."""


class PlanFormatError(PlanError):
    """The plan text / object is not a valid plan (bad JSON, wrong types, unknown methods...)."""


class PlanMismatchError(PlanError):
    """The plan was calibrated for a different model or run than the one it is applied to."""

    def __init__(self, differences: Sequence[str], fixes: Sequence[str]):
        self.differences = list(differences)
        self.fixes = list(fixes)
        lines = ["DiTFastAttn plan does not match this model/run:"]
        lines += [f"  - {d}" for d in self.differences]
        lines += ["How to fix:"] + [f"  * {f}" for f in self.fixes]
        super().__init__("\n".join(lines))


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("reducio-fastattn")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        with open(pyproject, "rb") as handle:
            return str(tomllib.load(handle)["project"]["version"])
    except Exception:  # the version is informative only; never fail a plan over it
        return "unknown"


PACKAGE_VERSION = _package_version()


# --------------------------------------------------------------------------------------------
# Method semantics needed for validation (what a method reads from the per-layer caches)
# --------------------------------------------------------------------------------------------

def is_full_method(method: str) -> bool:
    """A step that computes full attention (and can refresh the WA-RS residual)."""
    return method in (FULL, ASC)


def needs_residual(method: str) -> bool:
    """WA-RS with residual reads the residual cached at the last full step."""
    return method in (WARS, WARS_ASC)


def needs_cached_output(method: str) -> bool:
    return method == AST


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PlanMetadata:
    """Facts about the model and the run a plan was calibrated on. ``None`` = unknown.

    ``sigmas`` holds the noise level of every planned evaluation (length ``num_steps``); it is
    what step remapping uses. ``window`` is the per-side window in tokens ``(left, right)``.
    ``text_tokens`` is ``(prefix, suffix)``: the global text tokens of joint attention before
    and after the image tokens (head layout of a V2 plan). ``arrow_windows`` maps every V2
    ``arrow_attn_<k>`` method to the per-side window ``[left, right]`` in tokens it ran with.
    """

    num_steps: int
    num_layers: int
    num_heads: int | None = None
    head_dim: int | None = None
    architecture: str | None = None
    layer_names: tuple[str, ...] | None = None
    weights_fingerprint: str | None = None
    token_grid: tuple[int, ...] | None = None
    sampler: str | None = None
    sigmas: tuple[float, ...] | None = None
    cfg_scale: float | None = None
    cond_first: bool | None = None
    threshold: float | None = None
    window: tuple[int, int] | None = None
    candidates: tuple[str, ...] | None = None
    metric: str | None = None
    calibration_inputs: int | None = None
    package_version: str = PACKAGE_VERSION
    notes: tuple[str, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    text_tokens: tuple[int, int] | None = None
    arrow_windows: Mapping[str, tuple[int, int]] | None = None

    @property
    def num_tokens(self) -> int | None:
        return math.prod(self.token_grid) if self.token_grid else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            out[field.name] = value
        return out


_META_FIELDS = {f.name for f in dataclasses.fields(PlanMetadata)}


# --------------------------------------------------------------------------------------------
# Validation helpers (strict: wrong types are errors, never silently converted)
# --------------------------------------------------------------------------------------------

def _fail(where: str, problem: str) -> PlanFormatError:
    return PlanFormatError(f"invalid DiTFastAttn plan: {where}: {problem}")


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise _fail(where, f"{value} is outside [{lo}, {hi}]")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise _fail(where, "must be finite")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise _fail(where, f"string longer than {MAX_STRING} characters")
    return value


def _list(value: Any, where: str, max_len: int) -> list:
    if not isinstance(value, (list, tuple)):
        raise _fail(where, f"expected a list, got {type(value).__name__}")
    if len(value) > max_len:
        raise _fail(where, f"{len(value)} entries, more than the limit {max_len}")
    return list(value)


def _optional(value: Any, convert, *args):
    return None if value is None else convert(value, *args)


def _method(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"method must be a string, got {type(value).__name__}")
    if value not in PLAN_METHODS and not (value.startswith(ARROW_PREFIX) and is_method_string(value)):
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise _fail(where, f"unknown method {shown!r}; known methods: {', '.join(PLAN_METHODS)}, "
                           f"and V2 {ARROW_PREFIX}<k> (window factor k)")
    return value


def _json_scalar_tree(value: Any, where: str, depth: int = 0) -> Any:
    """Accept JSON scalars and small lists/dicts of them (for ``extra``)."""
    if depth > 4:
        raise _fail(where, "nested too deeply (at most 4 levels in 'extra')")
    if value is None or isinstance(value, (bool, str)):
        return _str(value, where) if isinstance(value, str) else value
    if isinstance(value, (int, float)):
        return value if isinstance(value, int) else _float(value, where)
    if isinstance(value, (list, tuple)):
        return [_json_scalar_tree(v, f"{where}[{i}]", depth + 1)
                for i, v in enumerate(_list(value, where, 100_000))]
    if isinstance(value, Mapping):
        if len(value) > MAX_EXTRA_KEYS:
            raise _fail(where, f"more than {MAX_EXTRA_KEYS} keys")
        return {_str(k, f"{where} key"): _json_scalar_tree(v, f"{where}.{k}", depth + 1)
                for k, v in value.items()}
    raise _fail(where, f"unsupported value of type {type(value).__name__}")


# ``extra`` is free-form, but the ComfyUI nodes read these keys (the window of WA-RS and the
# sampling run a plan was calibrated on), so a wrong type there is refused when the plan is
# loaded, with the key named, not deep inside a sampler run.
WINDOW_SHAPES = ("1d", "grid")


def _check_known_extra(extra: Mapping[str, Any]) -> None:
    if "window_shape" in extra:
        shape = extra["window_shape"]
        if not isinstance(shape, str):
            raise _fail("metadata.extra.window_shape", f"expected a string, got {type(shape).__name__}")
        if shape not in WINDOW_SHAPES:
            raise _fail("metadata.extra.window_shape",
                        f"{shape[:40]!r} is not one of {', '.join(map(repr, WINDOW_SHAPES))}")
    if "window_fraction" in extra:
        fraction = _float(extra["window_fraction"], "metadata.extra.window_fraction")
        if not 0.0 < fraction <= 1.0:
            raise _fail("metadata.extra.window_fraction",
                        f"{fraction} is outside (0, 1] (the window reach per side as a fraction of "
                        f"the image tokens; the paper uses 0.125)")
    schedule = None
    if "schedule" in extra:
        schedule = [_float(s, f"metadata.extra.schedule[{i}]") for i, s in
                    enumerate(_list(extra["schedule"], "metadata.extra.schedule", MAX_STEPS + 1))]
        if len(schedule) < 2:
            raise _fail("metadata.extra.schedule", "the sigma schedule of a run has at least 2 "
                                                   "entries (steps + 1)")
        if any(s < 0 for s in schedule):
            raise _fail("metadata.extra.schedule", "sigmas must be >= 0")
    if "sampling_steps" in extra:
        steps = _int(extra["sampling_steps"], "metadata.extra.sampling_steps", 1, MAX_STEPS)
        if schedule is not None and len(schedule) - 1 != steps:
            raise _fail("metadata.extra.sampling_steps",
                        f"says {steps} but the schedule has {len(schedule) - 1} steps")


def _metadata_from_dict(raw: Any, num_steps: int, num_layers: int, num_heads: int | None
                        ) -> PlanMetadata:
    if not isinstance(raw, Mapping):
        raise _fail("metadata", f"expected an object, got {type(raw).__name__}")
    unknown = set(raw) - _META_FIELDS
    if unknown:
        raise _fail("metadata", f"unknown keys {sorted(map(str, unknown))[:10]} "
                                 f"(put tool-specific facts under 'extra')")
    m = dict(raw)
    steps = _int(m.get("num_steps", num_steps), "metadata.num_steps", 1, MAX_STEPS)
    layers = _int(m.get("num_layers", num_layers), "metadata.num_layers", 1, MAX_LAYERS)
    if steps != num_steps:
        raise _fail("metadata.num_steps", f"says {steps} but the plan has {num_steps} steps")
    if layers != num_layers:
        raise _fail("metadata.num_layers", f"says {layers} but the plan has {num_layers} layers")
    heads = _optional(m.get("num_heads"), _int, "metadata.num_heads", 1, MAX_HEADS)
    if num_heads is not None and heads != num_heads:
        raise _fail("metadata.num_heads", f"says {heads} but the head-wise plan has {num_heads}")

    layer_names = m.get("layer_names")
    if layer_names is not None:
        layer_names = tuple(_str(v, f"metadata.layer_names[{i}]") for i, v in
                            enumerate(_list(layer_names, "metadata.layer_names", MAX_LAYERS)))
        if len(layer_names) != num_layers:
            raise _fail("metadata.layer_names", f"{len(layer_names)} names for {num_layers} layers")
    token_grid = m.get("token_grid")
    if token_grid is not None:
        token_grid = tuple(_int(v, f"metadata.token_grid[{i}]", 1, 1 << 24) for i, v in
                           enumerate(_list(token_grid, "metadata.token_grid", 4)))
        if not token_grid:
            raise _fail("metadata.token_grid", "must not be empty")
    sigmas = m.get("sigmas")
    if sigmas is not None:
        sigmas = tuple(_float(v, f"metadata.sigmas[{i}]") for i, v in
                       enumerate(_list(sigmas, "metadata.sigmas", MAX_STEPS)))
        if len(sigmas) != num_steps:
            raise _fail("metadata.sigmas", f"{len(sigmas)} sigmas for {num_steps} steps")
        if any(s < 0 for s in sigmas):
            raise _fail("metadata.sigmas", "sigmas must be >= 0")
    window = m.get("window")
    if window is not None:
        window = _list(window, "metadata.window", 2)
        if len(window) != 2:
            raise _fail("metadata.window", "expected [left, right]")
        window = (_int(window[0], "metadata.window[0]", 0, 1 << 24),
                  _int(window[1], "metadata.window[1]", 0, 1 << 24))
    candidates = m.get("candidates")
    if candidates is not None:
        candidates = tuple(_method(v, f"metadata.candidates[{i}]") for i, v in
                           enumerate(_list(candidates, "metadata.candidates", 16)))
    cond_first = m.get("cond_first")
    if cond_first is not None and not isinstance(cond_first, bool):
        raise _fail("metadata.cond_first", "expected true/false")
    notes = tuple(_str(v, f"metadata.notes[{i}]") for i, v in
                  enumerate(_list(m.get("notes", ()), "metadata.notes", MAX_NOTES)))
    extra = _json_scalar_tree(m.get("extra", {}), "metadata.extra")
    if not isinstance(extra, dict):
        raise _fail("metadata.extra", "expected an object")
    text_tokens = m.get("text_tokens")
    if text_tokens is not None:
        text_tokens = _list(text_tokens, "metadata.text_tokens", 2)
        if len(text_tokens) != 2:
            raise _fail("metadata.text_tokens", "expected [prefix, suffix] text token counts")
        text_tokens = (_int(text_tokens[0], "metadata.text_tokens[0]", 0, 1 << 24),
                       _int(text_tokens[1], "metadata.text_tokens[1]", 0, 1 << 24))
    arrow_windows = m.get("arrow_windows")
    if arrow_windows is not None:
        if not isinstance(arrow_windows, Mapping):
            raise _fail("metadata.arrow_windows", "expected an object {arrow method: [left, right]}")
        if len(arrow_windows) > 64:
            raise _fail("metadata.arrow_windows", "more than 64 arrow methods")
        parsed_windows = {}
        for name, sides in arrow_windows.items():
            where = f"metadata.arrow_windows.{name}"
            if not (isinstance(name, str) and name.startswith(ARROW_PREFIX)):
                raise _fail(where, f"keys are V2 arrow methods ({ARROW_PREFIX}<k>)")
            _method(name, where)
            sides = _list(sides, where, 2)
            if len(sides) != 2:
                raise _fail(where, "expected [left, right]")
            parsed_windows[name] = (_int(sides[0], f"{where}[0]", 0, 1 << 24),
                                    _int(sides[1], f"{where}[1]", 0, 1 << 24))
        arrow_windows = parsed_windows
    _check_known_extra(extra)
    cfg = _optional(m.get("cfg_scale"), _float, "metadata.cfg_scale")
    thr = _optional(m.get("threshold"), _float, "metadata.threshold")
    if thr is not None and thr < 0:
        raise _fail("metadata.threshold", "must be >= 0")
    return PlanMetadata(
        num_steps=steps,
        num_layers=layers,
        num_heads=heads,
        head_dim=_optional(m.get("head_dim"), _int, "metadata.head_dim", 1, 1 << 16),
        architecture=_optional(m.get("architecture"), _str, "metadata.architecture"),
        layer_names=layer_names,
        weights_fingerprint=_optional(m.get("weights_fingerprint"), _str,
                                      "metadata.weights_fingerprint"),
        token_grid=token_grid,
        sampler=_optional(m.get("sampler"), _str, "metadata.sampler"),
        sigmas=sigmas,
        cfg_scale=cfg,
        cond_first=cond_first,
        threshold=thr,
        window=window,
        candidates=candidates,
        metric=_optional(m.get("metric"), _str, "metadata.metric"),
        calibration_inputs=_optional(m.get("calibration_inputs"), _int,
                                     "metadata.calibration_inputs", 0, 1 << 20),
        package_version=_str(m.get("package_version", PACKAGE_VERSION), "metadata.package_version"),
        notes=notes,
        extra=extra,
        text_tokens=text_tokens,
        arrow_windows=arrow_windows,
    )


def _parse_methods(raw: Any, granularity: str) -> tuple[tuple, ...]:
    steps = _list(raw, "methods", MAX_STEPS)
    if not steps:
        raise _fail("methods", "the plan has no steps")
    parsed = []
    num_layers = None
    num_heads = None
    entries = 0
    for t, row in enumerate(steps):
        row = _list(row, f"methods[{t}]", MAX_LAYERS)
        if num_layers is None:
            num_layers = len(row)
            if num_layers == 0:
                raise _fail("methods[0]", "a step must list at least one layer")
        elif len(row) != num_layers:
            raise _fail(f"methods[{t}]", f"{len(row)} layers, but step 0 has {num_layers}")
        out_row = []
        for i, cell in enumerate(row):
            where = f"methods[{t}][{i}]"
            if granularity == "layer":
                out_row.append(_method(cell, where))
                entries += 1
            else:
                heads = _list(cell, where, MAX_HEADS)
                if num_heads is None:
                    num_heads = len(heads)
                    if num_heads == 0:
                        raise _fail(where, "a head-wise entry must list at least one head")
                elif len(heads) != num_heads:
                    raise _fail(where, f"{len(heads)} heads, expected {num_heads}")
                out_row.append(tuple(_method(h, f"{where}[{j}]") for j, h in enumerate(heads)))
                entries += len(heads)
            if entries > MAX_ENTRIES:
                raise _fail("methods", f"more than {MAX_ENTRIES} entries")
        parsed.append(tuple(out_row))
    return tuple(parsed)


def _check_causal(methods: Sequence[Sequence], granularity: str) -> None:
    """Every method must find the cache it reads: AST a previous output, WA-RS a residual."""
    num_layers = len(methods[0])
    for i in range(num_layers):
        columns = ([tuple(step[i] for step in methods)] if granularity == "layer" else
                   [tuple(step[i][h] for step in methods) for h in range(len(methods[0][i]))])
        for h, column in enumerate(columns):
            has_output = has_residual = False
            for t, method in enumerate(column):
                who = f"layer {i}" + (f" head {h}" if granularity == "head" else "")
                if needs_cached_output(method) and not has_output:
                    raise _fail(f"step {t}, {who}",
                                f"{method!r} reuses the previous output, but no earlier step "
                                f"computed one (step 0 must compute attention)")
                if needs_residual(method) and not has_residual:
                    raise _fail(f"step {t}, {who}",
                                f"{method!r} needs the residual of an earlier full-attention "
                                f"step, and there is none")
                has_output = has_output or method != AST
                has_residual = has_residual or is_full_method(method)


# --------------------------------------------------------------------------------------------
# JSON text guard
# --------------------------------------------------------------------------------------------

def _nesting_depth_exceeds(text: str, limit: int) -> bool:
    """Bracket depth outside strings, so deeply nested junk is refused before json.loads."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _reject_constant(name: str):
    raise PlanFormatError(f"invalid DiTFastAttn plan: JSON constant {name} is not allowed")


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise PlanFormatError(f"invalid DiTFastAttn plan: duplicate JSON key {key!r}")
        out[key] = value
    return out


def parse_json_text(text: str | bytes) -> Any:
    """Parse untrusted JSON with size, depth, NaN and duplicate-key guards."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > MAX_FILE_BYTES:
            raise PlanFormatError(f"invalid DiTFastAttn plan: larger than {MAX_FILE_BYTES} bytes")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanFormatError(f"invalid DiTFastAttn plan: not UTF-8 text ({exc})") from None
    if not isinstance(text, str):
        raise PlanFormatError(f"invalid DiTFastAttn plan: expected JSON text, got "
                              f"{type(text).__name__}")
    if len(text) > MAX_FILE_BYTES:
        raise PlanFormatError(f"invalid DiTFastAttn plan: larger than {MAX_FILE_BYTES} bytes")
    if not text.strip():
        raise PlanFormatError("invalid DiTFastAttn plan: the text is empty")
    if _nesting_depth_exceeds(text, MAX_NESTING):
        raise PlanFormatError(f"invalid DiTFastAttn plan: JSON nested deeper than {MAX_NESTING}")
    try:
        return json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except PlanFormatError:
        raise
    except json.JSONDecodeError as exc:
        raise PlanFormatError(f"invalid DiTFastAttn plan: not valid JSON ({exc})") from None
    except ValueError:
        # Python refuses integer literals longer than sys.get_int_max_str_digits() (4300)
        # with a ValueError whose advice (raise the limit) is wrong for an untrusted file.
        raise PlanFormatError("invalid DiTFastAttn plan: a JSON number has thousands of digits; "
                              "plans hold small counts and window sizes") from None
    except RecursionError:
        raise PlanFormatError("invalid DiTFastAttn plan: JSON nested too deeply") from None


# --------------------------------------------------------------------------------------------
# Run signature and compatibility
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

class Plan:
    """An immutable compression plan: ``methods[step][layer]`` (or ``[step][layer][head]``)."""

    def __init__(self, methods: Sequence[Sequence[Any]], metadata: PlanMetadata | Mapping | None
                 = None, *, granularity: str = "layer"):
        if granularity not in GRANULARITIES:
            raise _fail("granularity", f"{granularity!r}; expected one of {GRANULARITIES}")
        parsed = _parse_methods(methods, granularity)
        num_steps, num_layers = len(parsed), len(parsed[0])
        num_heads = len(parsed[0][0]) if granularity == "head" else None
        _check_causal(parsed, granularity)
        if metadata is None:
            metadata = {"num_heads": num_heads}
        elif isinstance(metadata, PlanMetadata):
            metadata = metadata.to_dict()
        self._methods = parsed
        self._granularity = granularity
        self._metadata = _metadata_from_dict(metadata, num_steps, num_layers, num_heads)

    # ---- accessors ---------------------------------------------------------------------
    @property
    def methods(self) -> tuple[tuple, ...]:
        return self._methods

    @property
    def metadata(self) -> PlanMetadata:
        return self._metadata

    @property
    def granularity(self) -> str:
        return self._granularity

    @property
    def num_steps(self) -> int:
        return len(self._methods)

    @property
    def num_layers(self) -> int:
        return len(self._methods[0])

    def method(self, step: int, layer: int, head: int | None = None) -> str:
        cell = self._methods[step][layer]
        if self._granularity == "head":
            if head is None:
                raise ValueError("this plan is head-wise: pass head=")
            return cell[head]
        return cell

    def layer_methods(self, layer: int) -> list:
        """The per-step methods of one layer (what a V1 processor's ``steps_method`` holds)."""
        return [step[layer] for step in self._methods]

    def method_counts(self) -> dict[str, int]:
        counter: Counter = Counter()
        for step in self._methods:
            for cell in step:
                counter.update([cell] if self._granularity == "layer" else cell)
        counts = {m: counter[m] for m in PLAN_METHODS if counter[m]}
        counts.update({m: counter[m] for m in sorted(counter, key=_arrow_sort_key) if m not in counts})
        return counts

    def with_metadata(self, **changes) -> "Plan":
        meta = dataclasses.replace(self._metadata, **changes)
        return Plan(self._methods, meta, granularity=self._granularity)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Plan) and self._methods == other._methods
                and self._granularity == other._granularity
                and self._metadata.to_dict() == other._metadata.to_dict())

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.method_counts().items())
        return (f"Plan({self.num_steps} steps x {self.num_layers} layers, "
                f"{self._granularity}-wise, {counts})")

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        methods = [[list(c) if isinstance(c, tuple) else c for c in step] for step in self._methods]
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                "granularity": self._granularity, "metadata": self._metadata.to_dict(),
                "methods": methods}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if isinstance(data, list):
            raise _fail("top level", "this is a list (the official DiTFastAttn format?); "
                                     "use Plan.from_official() for it")
        if not isinstance(data, Mapping):
            raise _fail("top level", f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            if "blocks" in data:
                raise _fail("top level", "this looks like an official-format plan "
                                         "({'blocks': [...]}); use Plan.from_official()")
            raise _fail("format", f"expected {FORMAT_NAME!r}, got {data.get('format')!r}")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise _fail("version", "missing or not an integer")
        if version > FORMAT_VERSION:
            raise _fail("version", f"plan format version {version} is newer than this package "
                                   f"supports ({FORMAT_VERSION}); update the node pack")
        if version < 1:
            raise _fail("version", f"unsupported version {version}")
        unknown = set(data) - {"format", "version", "granularity", "metadata", "methods"}
        if unknown:
            raise _fail("top level", f"unknown keys {sorted(map(str, unknown))[:10]}")
        granularity = data.get("granularity", "layer")
        if granularity not in GRANULARITIES:
            raise _fail("granularity", f"{granularity!r}; expected one of {GRANULARITIES}")
        if "methods" not in data:
            raise _fail("methods", "missing")
        return cls(data["methods"], data.get("metadata", {}) if "metadata" in data else None,
                   granularity=granularity)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Plan":
        return cls.from_dict(parse_json_text(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        text = self.to_json(indent=1)
        fd, tmp = _create_temporary(path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan JSON file. Never unpickles: a torch.save file is refused with advice."""
        raw = _read_limited(path)
        if _looks_like_pickle(raw):
            raise PlanFormatError(
                f"{os.fspath(path)!r} is a pickle / torch.save file (the official DiTFastAttn "
                f"cache format), not JSON. It is not loaded by Plan.load for safety; convert it "
                f"with Plan.load_official_file(path) (uses torch.load(weights_only=True)).")
        data = parse_json_text(raw)
        if isinstance(data, list) or (isinstance(data, Mapping) and "blocks" in data
                                      and data.get("format") != FORMAT_NAME):
            return cls.from_official(data)
        return cls.from_dict(data)

    # ---- official list format ---------------------------------------------------------
    def to_official(self) -> list[dict[str, Any]]:
        """``[{"attn1": [method per step], "attn2": None, "ff": None}, ...]`` (one per block)."""
        if self._granularity != "layer":
            raise PlanError("a head-wise plan has no official V1 list form (V1 is layer-wise)")
        return [{"attn1": self.layer_methods(i), "attn2": None, "ff": None}
                for i in range(self.num_layers)]

    @classmethod
    def from_official(cls, blocks: Any, metadata: PlanMetadata | Mapping | None = None
                      ) -> "Plan":
        """Import the official list (also accepts ``{"blocks": [...]}`` as in the golden files)."""
        if isinstance(blocks, Mapping) and "blocks" in blocks:
            blocks = blocks["blocks"]
        blocks = _list(blocks, "official plan", MAX_LAYERS)
        if not blocks:
            raise _fail("official plan", "no blocks")
        per_layer = []
        for i, block in enumerate(blocks):
            if not isinstance(block, Mapping):
                raise _fail(f"official plan block {i}", "expected {'attn1': [...], ...}")
            unknown = set(block) - {"attn1", "attn2", "ff"}
            if unknown:
                raise _fail(f"official plan block {i}", f"unknown keys {sorted(map(str, unknown))}")
            for other in ("attn2", "ff"):
                if block.get(other) is not None:
                    raise _fail(f"official plan block {i}",
                                f"{other!r} is compressed; V1 only compresses attn1 "
                                f"(the official code hard-wires the others off)")
            if "attn1" not in block:
                raise _fail(f"official plan block {i}", "missing 'attn1'")
            per_layer.append(_list(block["attn1"], f"official plan block {i}.attn1", MAX_STEPS))
        num_steps = len(per_layer[0])
        for i, column in enumerate(per_layer):
            if len(column) != num_steps:
                raise _fail(f"official plan block {i}",
                            f"{len(column)} steps, block 0 has {num_steps}")
        if num_steps == 0:
            raise _fail("official plan", "no steps")
        methods = [[per_layer[i][t] for i in range(len(per_layer))] for t in range(num_steps)]
        return cls(methods, metadata)

    @classmethod
    def load_official_file(cls, path: str | os.PathLike,
                           metadata: PlanMetadata | Mapping | None = None) -> "Plan":
        """Read an official plan cache (torch.save pickle named .json, or real JSON) safely."""
        raw = _read_limited(path)
        if not _looks_like_pickle(raw):
            return cls.from_official(parse_json_text(raw), metadata)
        import io

        import torch

        try:
            data = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except Exception as exc:  # weights_only refuses anything but plain containers
            raise PlanFormatError(f"{os.fspath(path)!r}: not a plain official plan "
                                  f"(refused by the safe loader: {exc})") from None
        return cls.from_official(data, metadata)

    # ---- compatibility -------------------------------------------------------------------
    def check(self, run: RunSignature, *, allow_remap: bool = False,
              ignore: Iterable[str] = ()) -> "Plan":
        """Return the plan to use for ``run`` or raise ``PlanMismatchError``.

        ``allow_remap`` maps the plan's steps onto a different step count / sampler / schedule
        by noise level (the returned plan carries a note saying so). ``ignore`` waives the
        listed checks (``IGNORABLE``), also recorded as a note.
        """
        ignore = set(ignore)
        bad = ignore - set(IGNORABLE)
        if bad:
            raise ValueError(f"cannot ignore {sorted(bad)}; ignorable checks: {IGNORABLE}")
        meta = self._metadata
        hard: list[str] = []
        soft: list[tuple[str, str]] = []  # (check name, description)
        step_diffs: list[str] = []
        if run.num_layers is not None and run.num_layers != meta.num_layers:
            hard.append(f"layers: plan has {meta.num_layers}, model has {run.num_layers}")
        if (run.num_heads is not None and meta.num_heads is not None
                and run.num_heads != meta.num_heads):
            hard.append(f"attention heads: plan has {meta.num_heads}, model has {run.num_heads}")
        hard.extend(self._layout_mismatches(run))
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
            plan, note = self._remapped(run)
            notes.append(note)
        if not notes:
            return self
        for note in notes:
            logger.warning("DiTFastAttn plan: %s", note)
        return plan.with_metadata(notes=plan.metadata.notes + tuple(notes))

    def _layout_mismatches(self, run: RunSignature) -> list[str]:
        """Window and head-layout differences (never waivable: the plan's choices were measured
        with exactly these windows and heads)."""
        meta = self._metadata
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
        arrows = _arrow_methods_used(self._methods)
        if arrows and meta.arrow_windows is None:
            out.append("window: this V2 plan does not record the windows its arrow methods ran with "
                       "(metadata.arrow_windows)")
        elif arrows and run.token_grid:
            image = math.prod(run.token_grid)
            for name in sorted(arrows, key=_arrow_sort_key):
                recorded = meta.arrow_windows.get(name)
                w = image // (2 * int(name[len(ARROW_PREFIX):]))
                if recorded is None:
                    out.append(f"window: metadata.arrow_windows has no entry for {name}")
                elif tuple(recorded) != (w, w):
                    out.append(f"window: {name} ran with {list(recorded)} tokens per side, this run's "
                               f"{image} image tokens give [{w}, {w}]")
        return out

    def _remapped(self, run: RunSignature) -> tuple["Plan", str]:
        target_steps = run.num_steps if run.num_steps is not None else self.num_steps
        run = dataclasses.replace(run, num_steps=target_steps)
        mapping, how = _remap_indices(self._metadata, run)
        methods = [list(self._methods[i]) for i in mapping]
        # The first evaluation must compute attention everywhere (no cache exists yet); later
        # WA-RS steps then always find the residual of a full step.
        full_row = ([FULL] * self.num_layers if self._granularity == "layer" else
                    [tuple([FULL] * len(self._methods[0][0]))] * self.num_layers)
        forced = methods[0] != full_row
        methods[0] = full_row
        meta = dataclasses.replace(
            self._metadata, num_steps=target_steps,
            sigmas=tuple(run.sigmas) if run.sigmas else None,
            sampler=run.sampler or self._metadata.sampler)
        note = (f"remapped {self.num_steps} planned steps onto {target_steps} by {how}; "
                f"step map {mapping if len(mapping) <= 64 else str(mapping[:64]) + '...'}"
                + ("; step 0 forced to full attention" if forced else ""))
        return Plan(methods, meta, granularity=self._granularity), note


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _arrow_sort_key(method: str) -> tuple:
    tail = method[len(ARROW_PREFIX):]
    return (int(tail) if tail.isdigit() else 0, method)


def _arrow_methods_used(methods: Sequence[Sequence]) -> set:
    used = set()
    for step in methods:
        for cell in step:
            for method in (cell if isinstance(cell, tuple) else (cell,)):
                if method.startswith(ARROW_PREFIX):
                    used.add(method)
    return used


def _read_limited(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DiTFastAttn plan file not found: {os.fspath(path)!r}")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PlanFormatError(f"{os.fspath(path)!r} is {size} bytes; plans are small JSON files "
                              f"(limit {MAX_FILE_BYTES} bytes)")
    with open(path, "rb") as handle:
        return handle.read(MAX_FILE_BYTES + 1)


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new, exclusive temporary file beside ``path`` for an atomic write.

    ``tempfile.mkstemp`` creates its files with mode 0600 whatever the umask, and the rename
    keeps that mode, so saved plans would be private unlike every other output. Here the file
    is created with 0666 and the kernel applies the process's umask, as for any ``open()``.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {os.fspath(path)!r}")


def _looks_like_pickle(raw: bytes) -> bool:
    # torch.save writes a zip archive ("PK\x03\x04"); legacy torch.save / pickle protocol 2+
    # starts with 0x80.
    return raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80"


def weights_fingerprint(named_tensors: Iterable[tuple[str, Any]], sample_tensors: int = 4,
                        sample_elements: int = 4096, per_tensor_samples: int = 64) -> str:
    """A cheap fingerprint of a model's weights.

    Hashes every tensor's name, shape and dtype, ``per_tensor_samples`` evenly strided
    elements of every tensor, and the first ``sample_elements`` elements of a few tensors
    spread over the model. Different checkpoints, fine-tunes and merged LoRAs change it; it
    reads a few KB per tensor at most instead of the whole model.
    """
    items = sorted(named_tensors, key=lambda kv: kv[0])
    digest = hashlib.sha256()
    for name, tensor in items:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        numel = tensor.numel()
        if numel:
            stride = max(1, numel // per_tensor_samples)
            digest.update(_tensor_bytes(tensor, stride, per_tensor_samples))
    if items:
        count = min(sample_tensors, len(items))
        picks = sorted({round(k * (len(items) - 1) / max(count - 1, 1)) for k in range(count)})
        for index in picks:
            name, tensor = items[index]
            digest.update(name.encode())
            digest.update(_tensor_bytes(tensor, 1, sample_elements))
    return "sha256:" + digest.hexdigest()


def _tensor_bytes(tensor: Any, stride: int, count: int) -> bytes:
    try:
        flat = tensor.detach().reshape(-1)[::stride][:count].to("cpu").contiguous()
    except Exception:  # exotic tensor subclasses (quantized wrappers): shape/dtype only
        return b""
    try:
        return flat.view(dtype=_uint8()).numpy().tobytes()
    except (RuntimeError, TypeError):  # dtypes numpy cannot hold: hash a float32 copy
        return flat.float().numpy().tobytes()


def _uint8():
    import torch

    return torch.uint8
