"""The JSON Schema of a plan file, generated from the limits the loader enforces.

``fastattn/plan/schema.json`` is this module's output (``python -m fastattn.plan.schema``
rewrites it; a tier-1 test fails when the file and :func:`build_schema` differ), so the
published schema and the validating code read one declaration: the limit constants and the
method vocabulary of :mod:`fastattn.plan.format` / :mod:`fastattn.methods`, and the metadata
field list below (checked against :class:`PlanMetadata`'s fields by the same test). The loader
enforces everything here plus the rules a schema cannot express (equal row lengths, AST / WA-RS
need an earlier computed / full step, metadata counts equal to the methods array).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..methods import ARROW_PREFIX, MAX_ARROW_FACTOR, METHOD_STRINGS
from . import format as f

SCHEMA_PATH = Path(__file__).with_name("schema.json")

_ARROW_DIGITS = len(str(MAX_ARROW_FACTOR))


def _nullable(kind: str) -> list:
    return [kind, "null"]


def _pair(description: str) -> dict:
    return {"type": _nullable("array"), "items": {"type": "integer", "minimum": 0, "maximum": f.MAX_TOKENS},
            "minItems": 2, "maxItems": 2, "description": description}


def metadata_fields() -> dict[str, Any]:
    """Schema of every metadata field, in PlanMetadata's order."""
    return {
        "num_steps": {"type": "integer", "minimum": 1, "maximum": f.MAX_STEPS,
                      "description": "number of planned denoiser evaluations"},
        "num_layers": {"type": "integer", "minimum": 1, "maximum": f.MAX_LAYERS},
        "num_heads": {"type": _nullable("integer"), "minimum": 1, "maximum": f.MAX_HEADS},
        "head_dim": {"type": _nullable("integer"), "minimum": 1, "maximum": f.MAX_HEAD_DIM},
        "architecture": {"type": _nullable("string"), "maxLength": f.MAX_STRING,
                         "description": "model class or family, e.g. DiTTransformer2DModel, Flux"},
        "layer_names": {"type": _nullable("array"), "maxItems": f.MAX_LAYERS,
                        "items": {"type": "string", "maxLength": f.MAX_STRING}},
        "weights_fingerprint": {"type": _nullable("string"), "maxLength": f.MAX_STRING,
                                "description": "sha256 over all tensor names/shapes/dtypes and the bytes "
                                               "of a few sampled tensors"},
        "token_grid": {"type": _nullable("array"), "minItems": 1, "maxItems": f.MAX_GRID_AXES,
                       "items": {"type": "integer", "minimum": 1, "maximum": f.MAX_TOKENS}},
        "sampler": {"type": _nullable("string"), "maxLength": f.MAX_STRING},
        "sigmas": {"type": _nullable("array"), "maxItems": f.MAX_STEPS, "items": {"type": "number", "minimum": 0},
                   "description": "noise level of each planned evaluation"},
        "cfg_scale": {"type": _nullable("number")},
        "cond_first": {"type": _nullable("boolean"), "description": "CFG batch order during calibration"},
        "threshold": {"type": _nullable("number"), "minimum": 0},
        "window": _pair("per-side window in tokens [left, right]"),
        "candidates": {"type": _nullable("array"), "maxItems": f.MAX_CANDIDATES,
                       "items": {"$ref": "#/$defs/any_method"}},
        "metric": {"type": _nullable("string"), "maxLength": f.MAX_STRING},
        "calibration_inputs": {"type": _nullable("integer"), "minimum": 0, "maximum": f.MAX_CALIBRATION_INPUTS},
        "package_version": {"type": "string", "maxLength": f.MAX_STRING},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": f.MAX_STRING}, "maxItems": f.MAX_NOTES},
        "extra": {"type": "object", "maxProperties": f.MAX_EXTRA_KEYS,
                  "description": f"integration-specific facts (JSON scalars and lists/objects nested at most "
                                 f"{f.MAX_EXTRA_DEPTH} levels); known keys: window_shape "
                                 f"({', '.join(f.WINDOW_SHAPES)}), window_fraction (0, 1], schedule "
                                 f"(sigmas, steps + 1), sampling_steps",
                  "properties": {
                      "window_shape": {"enum": list(f.WINDOW_SHAPES)},
                      "window_fraction": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                      "schedule": {"type": "array", "minItems": 2, "maxItems": f.MAX_STEPS + 1,
                                   "items": {"type": "number", "minimum": 0}},
                      "sampling_steps": {"type": "integer", "minimum": 1, "maximum": f.MAX_STEPS},
                  }},
        "text_tokens": _pair("global text tokens of joint attention [before, after] the image tokens"),
        "arrow_windows": {"type": _nullable("object"), "maxProperties": f.MAX_ARROW_METHODS,
                          "propertyNames": {"$ref": "#/$defs/arrow_method"},
                          "additionalProperties": {"type": "array", "minItems": 2, "maxItems": 2,
                                                   "items": {"type": "integer", "minimum": 0,
                                                             "maximum": f.MAX_TOKENS}},
                          "description": "per-side window [left, right] in tokens each V2 arrow method ran with"},
    }


def build_schema() -> dict[str, Any]:
    """The plan file's JSON Schema (draft 2020-12)."""
    head_cell = {"type": "array", "minItems": 1, "maxItems": f.MAX_HEADS, "items": {"$ref": "#/$defs/any_method"}}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/reducio-fastattn/reducio-fastattn/fastattn/plan/schema.json",
        "title": f"DiTFastAttn compression plan (version {f.FORMAT_VERSION})",
        "description": "GENERATED by `python -m fastattn.plan.schema` from fastattn/plan/format.py; do not edit. "
                       "methods[step][layer] (granularity 'layer') or methods[step][layer][head] (granularity "
                       "'head'). Steps are denoiser evaluations in sampling order. The loader also enforces the "
                       "rules a schema cannot express (equal row lengths, AST/WA-RS need an earlier computed/full "
                       f"step, metadata counts equal to the methods array, at most {f.MAX_ENTRIES} entries, "
                       f"{f.MAX_FILE_BYTES} bytes and JSON nesting {f.MAX_NESTING}).",
        "type": "object",
        "required": ["format", "version", "methods"],
        "additionalProperties": False,
        "properties": {
            "format": {"const": f.FORMAT_NAME},
            "version": {"type": "integer", "minimum": 1, "maximum": f.FORMAT_VERSION},
            "granularity": {"enum": list(f.GRANULARITIES), "default": f.GRANULARITIES[0]},
            "methods": {
                "type": "array", "minItems": 1, "maxItems": f.MAX_STEPS,
                "items": {"type": "array", "minItems": 1, "maxItems": f.MAX_LAYERS,
                          "items": {"oneOf": [{"$ref": "#/$defs/any_method"}, head_cell]}},
            },
            "metadata": {"type": "object", "additionalProperties": False, "properties": metadata_fields()},
        },
        "$defs": {
            "method": {"enum": list(METHOD_STRINGS)},
            "arrow_method": {"type": "string",
                             "pattern": f"^{ARROW_PREFIX}[1-9][0-9]{{0,{_ARROW_DIGITS - 1}}}$",
                             "description": "DiTFastAttnV2 arrow attention, window factor k (at most "
                                            f"{MAX_ARROW_FACTOR}): image_tokens // (2k) per side, text global"},
            "any_method": {"oneOf": [{"$ref": "#/$defs/method"}, {"$ref": "#/$defs/arrow_method"}]},
        },
    }


def schema_text() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"


if __name__ == "__main__":
    if "--check" in sys.argv:
        sys.exit(0 if SCHEMA_PATH.read_text() == schema_text() else 1)
    SCHEMA_PATH.write_text(schema_text())
    print(f"wrote {SCHEMA_PATH}")
