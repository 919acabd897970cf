"""DiTFastAttn method vocabulary (V1 layer-wise methods and V2 head-wise arrow attention).

The official V1 code names the per-(layer, step) decision with one of six strings and
matches them by substring. Here each string parses into a small frozen dataclass so
the runtime branches on named flags instead of substrings, and every value can be
written back as the exact official string (plans stay interchangeable with the
official tool).

DiTFastAttnV2 adds, per head, arrow attention with a window factor k: text tokens attend
and are attended globally, image tokens see a band of ``image_tokens // (2k)`` tokens per
side, no residual. Its official candidate name ``arrow_attn_<k>`` is the method string
(`Method(window=True, arrow=k)`); V2's caching and full heads are V1's ``output_share``
and ``full_attn`` applied to one head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union


@dataclass(frozen=True)
class Method:
    """One compression decision.

    window:       attention restricted to a window instead of full attention.
    residual:     add the residual (full - window) cached at the last full step (WA-RS).
    cfg_share:    compute only the conditional rows of a CFG batch and copy (ASC).
    output_share: skip everything, return the layer's cached output (AST).
    arrow:        V2 arrow attention window factor k (0 = not arrow): per-side image
                  window image_tokens // (2k), text tokens global; implies `window`.
    """

    window: bool = False
    residual: bool = False
    cfg_share: bool = False
    output_share: bool = False
    arrow: int = 0

    def __post_init__(self) -> None:
        if self.arrow:
            if (isinstance(self.arrow, bool) or not isinstance(self.arrow, int)
                    or not 0 < self.arrow <= MAX_ARROW_FACTOR):
                raise ValueError(f"arrow window factor must be an integer in [1, {MAX_ARROW_FACTOR}], "
                                 f"got {self.arrow!r}")
            if not self.window or self.residual or self.cfg_share or self.output_share:
                raise ValueError("arrow attention is a window method without residual, CFG sharing "
                                 "or output sharing: use Method(window=True, arrow=k)")
            return
        if self not in _STRING_OF:
            raise ValueError(
                f"{self!r} is not one of the DiTFastAttn methods; valid methods: "
                + ", ".join(METHOD_STRINGS)
            )

    @property
    def is_full(self) -> bool:
        """True for `full_attn` and `full_attn+cfg_attn_share` (the steps that refresh residuals)."""
        return not self.window and not self.output_share

    @property
    def official(self) -> str:
        if self.arrow:
            return f"{ARROW_PREFIX}{self.arrow}"
        return _STRING_OF[self]

    def without_cfg_share(self) -> "Method":
        """The same method computed on every row (ASC disabled)."""
        if not self.cfg_share:
            return self
        return Method(window=self.window, residual=self.residual, arrow=self.arrow)

    def __str__(self) -> str:
        return self.official


# Built with object.__new__ so the table can exist before validation uses it.
def _raw(**flags: bool) -> Method:
    method = object.__new__(Method)
    for name in ("window", "residual", "cfg_share", "output_share"):
        object.__setattr__(method, name, flags.get(name, False))
    object.__setattr__(method, "arrow", 0)
    return method


_STRING_OF = {
    _raw(): "full_attn",
    _raw(output_share=True): "output_share",
    _raw(window=True, residual=True): "residual_window_attn",
    _raw(cfg_share=True): "full_attn+cfg_attn_share",
    _raw(window=True, residual=True, cfg_share=True): "residual_window_attn+cfg_attn_share",
    _raw(window=True): "residual_window_attn+without_residual",
}
_METHOD_OF = {text: method for method, text in _STRING_OF.items()}

#: The official method strings, in the order of the spec's table.
METHOD_STRINGS: tuple = tuple(_STRING_OF.values())

FULL = _METHOD_OF["full_attn"]
OUTPUT_SHARE = _METHOD_OF["output_share"]
WINDOW_RESIDUAL = _METHOD_OF["residual_window_attn"]
FULL_CFG_SHARE = _METHOD_OF["full_attn+cfg_attn_share"]
WINDOW_RESIDUAL_CFG_SHARE = _METHOD_OF["residual_window_attn+cfg_attn_share"]
WINDOW_NO_RESIDUAL = _METHOD_OF["residual_window_attn+without_residual"]

MethodLike = Union[str, Method]

#: V2 arrow attention: the official candidate name is this prefix and the window factor k.
ARROW_PREFIX = "arrow_attn_"
#: Largest window factor accepted (a factor beyond the image token count is a 0-token band).
MAX_ARROW_FACTOR = 99_999
_ARROW_RE = re.compile(r"arrow_attn_([1-9][0-9]{0,4})")


def arrow_method(factor: int) -> Method:
    """V2 arrow attention with window factor `factor` (official candidate ``arrow_attn_<factor>``)."""
    return Method(window=True, arrow=factor)


def arrow_window(image_tokens: int, factor: int) -> int:
    """Per-side image window of arrow factor k: ``image_tokens // (2k)`` (official)."""
    return int(image_tokens) // (2 * int(factor))


def arrow_factor(text: str) -> Optional[int]:
    """The window factor k of an ``arrow_attn_<k>`` string, else None."""
    match = _ARROW_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    return int(match.group(1)) if match else None


def is_method_string(text: str) -> bool:
    """Whether `text` names a method (a V1 official string or a V2 ``arrow_attn_<k>``)."""
    if not isinstance(text, str):
        return False
    if text.strip() in _METHOD_OF:
        return True
    factor = arrow_factor(text)
    return factor is not None and factor <= MAX_ARROW_FACTOR


def parse_method(value: MethodLike) -> Method:
    """Parse an official method string (surrounding whitespace ignored) or pass a Method through."""
    if isinstance(value, Method):
        return value
    if not isinstance(value, str):
        raise TypeError(f"a DiTFastAttn method must be a string or Method, got {type(value).__name__}")
    method = _METHOD_OF.get(value.strip())
    if method is None:
        factor = arrow_factor(value)
        if factor is not None and factor <= MAX_ARROW_FACTOR:
            return arrow_method(factor)
        raise ValueError(
            f"unknown DiTFastAttn method {value!r}; valid methods: " + ", ".join(METHOD_STRINGS)
            + f", or V2 {ARROW_PREFIX}<k> (k = window factor, e.g. {ARROW_PREFIX}8)"
        )
    return method


def parse_methods(values: Iterable[MethodLike]) -> list:
    """Parse a per-step list of methods (error messages name the offending step)."""
    parsed = []
    for step, value in enumerate(values):
        try:
            parsed.append(parse_method(value))
        except (ValueError, TypeError) as error:
            raise type(error)(f"step {step}: {error}") from None
    return parsed


# ------------------------------------------------------------------------------- presentation

@dataclass(frozen=True)
class MethodStyle:
    """How a method is shown: its colour (RGB 0..1), a short name and a one-line label."""

    colour: tuple
    short: str
    label: str


# Compressing methods get saturated colours, full attention a neutral grey, so a plan's
# savings are visible at a glance. Arrow attention gets teal shades (darker = narrower band).
_STYLE_OF = {
    FULL: MethodStyle((0.55, 0.55, 0.55), "full attention", "full attention"),
    FULL_CFG_SHARE: MethodStyle((0.35, 0.60, 0.95), "ASC", "ASC (share attention across CFG)"),
    WINDOW_RESIDUAL: MethodStyle((0.98, 0.70, 0.20), "WA-RS",
                                 "WA-RS (window attention + residual sharing)"),
    WINDOW_RESIDUAL_CFG_SHARE: MethodStyle((0.90, 0.35, 0.20), "WA-RS + ASC", "WA-RS + ASC"),
    OUTPUT_SHARE: MethodStyle((0.25, 0.75, 0.40), "AST", "AST (share attention across timesteps)"),
    WINDOW_NO_RESIDUAL: MethodStyle((0.70, 0.40, 0.85), "WA", "WA (window attention, no residual)"),
}


def method_style(value: MethodLike) -> MethodStyle:
    """Colour and labels of a method (V1 or V2 arrow)."""
    method = parse_method(value)
    style = _STYLE_OF.get(method)
    if style is not None:
        return style
    # arrow factor k: band of 1/(2k) of the image tokens per side; shade by log2(k)
    shade = min(1.0, max(0.0, (method.arrow.bit_length() - 1) / 6.0))
    colour = (0.10, 0.80 - 0.45 * shade, 0.80 - 0.40 * shade)
    return MethodStyle(colour, f"arrow k={method.arrow}",
                       f"arrow attention k={method.arrow} (text global, image band 1/{2 * method.arrow} "
                       f"per side)")


def is_v1_method(value: MethodLike) -> bool:
    """One of the six layer-wise V1 methods (what the V1 greedy search and official list hold)."""
    try:
        return parse_method(value) in _STRING_OF
    except (ValueError, TypeError):
        return False


def arrow_sort_key(value: MethodLike) -> tuple:
    """Order of methods in counts and legends: the V1 table order, then arrow by factor."""
    method = parse_method(value)
    if method in _STRING_OF:
        return (0, METHOD_STRINGS.index(method.official))
    return (1, method.arrow)


def residual_needed(methods: Sequence[MethodLike]) -> list:
    """The official `need_compute_residual` list for one layer's per-step methods.

    A full step (including `full_attn+cfg_attn_share`) must compute and cache the
    residual iff some later step uses WA-RS with residual before the next full step.
    AST steps and residual-free window steps in between do not break the group.
    """
    parsed = parse_methods(methods)
    needed = [False] * len(parsed)
    last_full = None
    for step, method in enumerate(parsed):
        if method.is_full:
            last_full = step
        elif method.window and method.residual and last_full is not None:
            needed[last_full] = True
    return needed


def residual_needed_headwise(cells: Sequence[Sequence[MethodLike]]) -> list:
    """`residual_needed` for one layer of a head-wise plan (per step, one method per head):
    a step must cache residuals iff some head of the layer needs its own (the runtime then
    refreshes every full head of that call)."""
    heads = len(cells[0]) if cells else 0
    per_head = [residual_needed([cell[h] for cell in cells]) for h in range(heads)]
    return [any(column[t] for column in per_head) for t in range(len(cells))]
