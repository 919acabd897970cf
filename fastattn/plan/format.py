"""DiTFastAttn compression plans: a versioned JSON format with the metadata that makes reuse safe.

A plan says, for every denoiser evaluation ("step") and every compressed attention layer (and
optionally every head), which method runs. Methods use the official DiTFastAttn V1 code strings
(``full_attn``, ``output_share``, ``residual_window_attn``, ...; see ``PLAN_METHODS``) so that
plans stay readable and import/export the official list format without a translation table.

Plans are tied to the model (architecture, layer/head counts, weights), the token grid (the
window is counted in tokens), the sampler's step grid and the CFG scale; ``Plan.check`` (the rule
itself is in ``fastattn.plan.compat``) refuses a run that does not fit.

File I/O is plain JSON only (``Plan.load`` never unpickles). The official implementation saves
plans with ``torch.save`` under a ``.json`` name; ``Plan.load_official_file`` reads those with
``torch.load(weights_only=True)``, which cannot execute code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .. import methods as _m
from ..methods import ARROW_PREFIX, arrow_sort_key, is_method_string, parse_method

logger = logging.getLogger(__name__)

FORMAT_NAME = "ditfastattn-plan"
FORMAT_VERSION = 1

# The official V1 method strings as a plan file holds them, named once in fastattn.methods (the
# one vocabulary); V2's ``arrow_attn_<k>`` is also a valid plan method (the per-side window it
# ran with is recorded in ``metadata.arrow_windows``).
FULL = _m.FULL.official
AST = _m.OUTPUT_SHARE.official
WARS = _m.WINDOW_RESIDUAL.official
ASC = _m.FULL_CFG_SHARE.official
WARS_ASC = _m.WINDOW_RESIDUAL_CFG_SHARE.official
WA_NO_RESIDUAL = _m.WINDOW_NO_RESIDUAL.official
PLAN_METHODS: tuple[str, ...] = _m.METHOD_STRINGS

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
MAX_TOKENS = 1 << 24           # token counts and windows (a 16M-token sequence is far beyond any DiT)
MAX_HEAD_DIM = 1 << 16
MAX_GRID_AXES = 4              # (frames,) rows, columns
MAX_CANDIDATES = 16
MAX_ARROW_METHODS = 64
MAX_CALIBRATION_INPUTS = 1 << 20
MAX_EXTRA_DEPTH = 4

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
    return parse_method(method).is_full


def needs_residual(method: str) -> bool:
    """WA-RS with residual reads the residual cached at the last full step."""
    m = parse_method(method)
    return m.window and m.residual


def needs_cached_output(method: str) -> bool:
    return parse_method(method).output_share


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


def _token_pair(value: Any, where: str, expected: str) -> tuple[int, int]:
    """Two token counts, each 0..MAX_TOKENS (windows' left / right, text prefix / suffix)."""
    pair = _list(value, where, 2)
    if len(pair) != 2:
        raise _fail(where, expected)
    return _int(pair[0], f"{where}[0]", 0, MAX_TOKENS), _int(pair[1], f"{where}[1]", 0, MAX_TOKENS)


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
    if value.strip() != value or not is_method_string(value):
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise _fail(where, f"unknown method {shown!r}; known methods: {', '.join(PLAN_METHODS)}, "
                           f"and V2 {ARROW_PREFIX}<k> (window factor k)")
    return value


def _json_scalar_tree(value: Any, where: str, depth: int = 0) -> Any:
    """Accept JSON scalars and small lists/dicts of them (for ``extra``)."""
    if depth > MAX_EXTRA_DEPTH:
        raise _fail(where, f"nested too deeply (at most {MAX_EXTRA_DEPTH} levels in 'extra')")
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
        token_grid = tuple(_int(v, f"metadata.token_grid[{i}]", 1, MAX_TOKENS) for i, v in
                           enumerate(_list(token_grid, "metadata.token_grid", MAX_GRID_AXES)))
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
        window = _token_pair(window, "metadata.window", "expected [left, right]")
    candidates = m.get("candidates")
    if candidates is not None:
        candidates = tuple(_method(v, f"metadata.candidates[{i}]") for i, v in
                           enumerate(_list(candidates, "metadata.candidates", MAX_CANDIDATES)))
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
        text_tokens = _token_pair(text_tokens, "metadata.text_tokens", "expected [prefix, suffix] text token counts")
    arrow_windows = m.get("arrow_windows")
    if arrow_windows is not None:
        if not isinstance(arrow_windows, Mapping):
            raise _fail("metadata.arrow_windows", "expected an object {arrow method: [left, right]}")
        if len(arrow_windows) > MAX_ARROW_METHODS:
            raise _fail("metadata.arrow_windows", f"more than {MAX_ARROW_METHODS} arrow methods")
        parsed_windows = {}
        for name, sides in arrow_windows.items():
            where = f"metadata.arrow_windows.{name}"
            if not (isinstance(name, str) and is_method_string(name) and parse_method(name).arrow):
                raise _fail(where, f"keys are V2 arrow methods ({ARROW_PREFIX}<k>)")
            _method(name, where)
            parsed_windows[name] = _token_pair(sides, where, "expected [left, right]")
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
        head_dim=_optional(m.get("head_dim"), _int, "metadata.head_dim", 1, MAX_HEAD_DIM),
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
                                     "metadata.calibration_inputs", 0, MAX_CALIBRATION_INPUTS),
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
        return {m: counter[m] for m in sorted(counter, key=arrow_sort_key)}

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

    # ---- compatibility (the rule lives in fastattn.plan.compat) -------------------------
    def check(self, run, *, allow_remap: bool = False, ignore: Iterable[str] = ()) -> "Plan":
        """Return the plan to use for ``run`` or raise ``PlanMismatchError`` (see
        :func:`fastattn.plan.compat.check_plan`)."""
        from .compat import check_plan

        return check_plan(self, run, allow_remap=allow_remap, ignore=ignore)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

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
