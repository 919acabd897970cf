"""Method vocabulary: parsing, validation, round trip, residual lookahead."""

import json

import pytest

from fastattn.methods import (
    FULL,
    FULL_CFG_SHARE,
    METHOD_STRINGS,
    OUTPUT_SHARE,
    WINDOW_NO_RESIDUAL,
    WINDOW_RESIDUAL,
    WINDOW_RESIDUAL_CFG_SHARE,
    Method,
    parse_method,
    parse_methods,
    residual_needed,
)

from testkit.golden import golden_path

GOLDEN = golden_path("fastattn")
OFFICIAL = [
    "full_attn",
    "output_share",
    "residual_window_attn",
    "full_attn+cfg_attn_share",
    "residual_window_attn+cfg_attn_share",
    "residual_window_attn+without_residual",
]


def test_exactly_the_six_official_strings():
    assert sorted(METHOD_STRINGS) == sorted(OFFICIAL)


@pytest.mark.parametrize("text", OFFICIAL)
def test_round_trip(text):
    method = parse_method(text)
    assert str(method) == text
    assert method.official == text
    assert parse_method(method) is method
    assert Method(method.window, method.residual, method.cfg_share, method.output_share) == method


def test_flags():
    assert FULL == Method() and FULL.is_full
    assert OUTPUT_SHARE.output_share and not OUTPUT_SHARE.is_full
    assert WINDOW_RESIDUAL.window and WINDOW_RESIDUAL.residual and not WINDOW_RESIDUAL.cfg_share
    assert FULL_CFG_SHARE.cfg_share and FULL_CFG_SHARE.is_full
    assert WINDOW_RESIDUAL_CFG_SHARE.window and WINDOW_RESIDUAL_CFG_SHARE.residual and WINDOW_RESIDUAL_CFG_SHARE.cfg_share
    assert WINDOW_NO_RESIDUAL.window and not WINDOW_NO_RESIDUAL.residual
    assert WINDOW_RESIDUAL_CFG_SHARE.without_cfg_share() == WINDOW_RESIDUAL
    assert FULL_CFG_SHARE.without_cfg_share() == FULL
    assert FULL.without_cfg_share() is FULL


def test_whitespace_is_ignored():
    assert parse_method("  full_attn\n") == FULL


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        parse_method("window_attn")
    message = str(info.value)
    assert "window_attn" in message
    for text in OFFICIAL:
        assert text in message


def test_invalid_combination_rejected():
    with pytest.raises(ValueError, match="valid methods"):
        Method(output_share=True, cfg_share=True)
    with pytest.raises(ValueError):
        Method(residual=True)  # residual without window


def test_non_string_rejected():
    with pytest.raises(TypeError):
        parse_method(3)


def test_parse_methods_names_the_step():
    with pytest.raises(ValueError, match="step 2"):
        parse_methods(["full_attn", "output_share", "nope"])


def test_residual_lookahead_rules():
    F, WA, AST, FC, WAC, WAN = OFFICIAL[0], OFFICIAL[2], OFFICIAL[1], OFFICIAL[3], OFFICIAL[4], OFFICIAL[5]
    assert residual_needed([F, WA, WA, F, WA]) == [True, False, False, True, False]
    assert residual_needed([F, AST, WA]) == [True, False, False]  # AST does not break the group
    assert residual_needed([F, WAN, WAN]) == [False, False, False]  # no residual used
    assert residual_needed([FC, WAC]) == [True, False]  # ASC full steps count as full
    assert residual_needed([F, F, WA]) == [False, True, False]  # only the latest full step


def test_residual_lookahead_matches_official_processor():
    scenarios = json.loads((GOLDEN / "manifest.json").read_text())["processor"]["scenarios"]
    assert len(scenarios) == 10
    for name, scenario in scenarios.items():
        assert residual_needed(scenario["steps_method"]) == scenario["need_compute_residual"], name
