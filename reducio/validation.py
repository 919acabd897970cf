"""Error types and field checks shared by the VAE and DiT configuration / checkpoint code.

A model configuration can come from a file (safetensors metadata, a sidecar JSON) that nobody
vetted, so every field is checked for its type and a sane bound *before* anything is built from it:
a few bytes of JSON must never decide how many modules are constructed or how much memory is
allocated. Every problem is one ``ConfigError`` naming the field and what to do.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping


class CheckpointError(ValueError):
    """A file that cannot be used as Reducio weights (the message says why and what to do)."""


class ConfigError(CheckpointError):
    """A model configuration that is malformed, out of bounds or does not describe the file's
    tensors. The message names the field (``ddconfig.num_res_blocks``, ``depth``, ...) and the fix."""


def parse_json_object(text: Any, what: str) -> dict:
    """``text`` (JSON) as a dict; any malformed input (bad JSON, nesting deep enough to overflow the
    parser, a non-object) is a ConfigError."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise ConfigError(f"{what} must be a JSON string, got {type(text).__name__}")
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a model configuration") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object of config fields, got {type(data).__name__}")
    return data


def _fail(field: str, value: Any, expected: str, fix: str = "") -> ConfigError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ConfigError(f"config field {field} = {shown} is invalid: expected {expected}"
                       + (f"; {fix}" if fix else ""))


def check_int(field: str, value: Any, low: int, high: int, fix: str = "") -> int:
    """An int (not a bool, not a float or string) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(field, value, f"an integer in {low}..{high}", fix)
    if not low <= value <= high:
        raise _fail(field, value, f"an integer in {low}..{high}", fix)
    return value


def check_number(field: str, value: Any, low: float, high: float, fix: str = "", *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite int or float in the range (bounds open or closed as asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(field, value, f"a finite number in {low}..{high}", fix)
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise _fail(field, value, f"a number in {span}", fix)
    return float(value)


def check_bool(field: str, value: Any, fix: str = "") -> bool:
    if not isinstance(value, bool):
        raise _fail(field, value, "true or false", fix)
    return value


def check_choice(field: str, value: Any, choices: Iterable, fix: str = "") -> Any:
    choices = list(choices)
    if isinstance(value, (dict, list)) or value not in choices:
        raise _fail(field, value, f"one of {choices}", fix)
    return value


def check_int_list(field: str, value: Any, low: int, high: int, min_len: int, max_len: int,
                   fix: str = "") -> list:
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
        raise _fail(field, value, f"a list of {min_len}..{max_len} integers", fix)
    return [check_int(f"{field}[{i}]", v, low, high, fix) for i, v in enumerate(value)]


def check_mapping(field: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise _fail(field, value, "an object (a JSON dict)")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise _fail(field, bad[0], "string keys only")
    return value


def check_known_fields(field: str, value: Mapping, known: Iterable[str], fix: str = "") -> None:
    unknown = sorted(set(value) - set(known))
    if unknown:
        where = f"{field} has" if field else "the config has"
        raise ConfigError(f"{where} unknown fields {unknown}" + (f"; {fix}" if fix else "")
                          + f" (known: {sorted(known)})")
