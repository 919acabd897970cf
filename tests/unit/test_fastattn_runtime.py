"""FastAttnRuntime: golden processor scenarios at the attention-core level, and properties."""

import json

import pytest
import torch
import torch.nn.functional as F

from fastattn import CfgRows, FastAttnRuntime, FastAttnState, MissingCacheError, Window1D
from fastattn.kernels import from_bhld, masked_reference_window_attention, to_bhld
from fastattn.runtime import methods_from_table, residual_lookahead_from_table

from testkit.golden import golden_path

GOLDEN = golden_path("fastattn")
# The official processor's outputs and residuals: measured <= 2.4e-7 apart (SDPA vs the
# reference's plain-math float32 attention); the spec's independent port matched to 1.5e-7.
GOLDEN_ATOL = 1e-6


def load_scenarios():
    return json.loads(golden_path("fastattn", "manifest.json").read_text())["processor"]["scenarios"]


SCENARIOS = load_scenarios()


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    weights = load_file(str(GOLDEN / "processor_weights.safetensors"))
    inputs = load_file(str(GOLDEN / "processor_inputs.safetensors"))
    outputs = {name: load_file(str(GOLDEN / s["file"])) for name, s in SCENARIOS.items()}
    return weights, inputs, outputs


def project(weights, x, name):
    return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]


def run_core_scenario(golden, name, layout, official_asc_residual=True):
    weights, inputs, _ = golden
    scenario = SCENARIOS[name]
    methods = scenario["steps_method"]
    rows = CfgRows.cond_first(4) if scenario["cond_first"] else CfgRows.uncond_first(4)
    runtime = FastAttnRuntime(
        methods_from_table([methods]),
        Window1D(*scenario["window_size"]),
        needs_residual=residual_lookahead_from_table([methods]),
        official_asc_residual=official_asc_residual,
        on_missing_cache="error",
    )
    outputs, residuals = [], []
    for step in range(len(methods)):
        x = inputs[f"step{step}.hidden_states"]
        q, k, v = (project(weights, x, name) for name in ("to_q", "to_k", "to_v"))
        if layout != "blc":
            q, k, v = (from_bhld(to_bhld(t, "blc", 4), layout) for t in (q, k, v))
        core = runtime(q, k, v, layer=0, step=step, heads=4, layout=layout, cfg_rows=rows)
        core = from_bhld(to_bhld(core, layout, 4), "blc")
        outputs.append(project(weights, core, "to_out.0"))
        residuals.append(runtime.state.layer((0, rows.labels)).residual_as("blhd"))
    return outputs, residuals


@pytest.mark.parametrize("layout", ["blc", "bhld"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_processor_scenarios_at_core_level(golden, name, layout):
    expected = golden[2][name]
    outputs, residuals = run_core_scenario(golden, name, layout)
    for step, out in enumerate(outputs):
        torch.testing.assert_close(out, expected[f"step{step}.output"], atol=GOLDEN_ATOL, rtol=0)
        key = f"step{step}.cached_residual_after"
        if key in expected:
            torch.testing.assert_close(residuals[step], expected[key], atol=GOLDEN_ATOL, rtol=0)


def test_matching_half_residual_differs_from_official_quirk(golden):
    """Spec 1.5: using the kept half's own residual rows changes the uncond-first result by ~0.1."""
    official, _ = run_core_scenario(golden, "wars_asc_uncond_first", "blc", True)
    fixed, _ = run_core_scenario(golden, "wars_asc_uncond_first", "blc", False)
    gap = max((a - b).abs().max().item() for a, b in zip(official, fixed))
    assert 0.05 < gap < 0.2  # golden README: "differs by ~0.1" (measured 0.101)
    # cond-first: the first half IS the kept half, so both choices agree
    official, _ = run_core_scenario(golden, "wars_asc_cond_first", "blc", True)
    fixed, _ = run_core_scenario(golden, "wars_asc_cond_first", "blc", False)
    for a, b in zip(official, fixed):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- properties


def qkv(batch=4, heads=2, length=48, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=generator) for _ in range(3)]


def constant_plan(method):
    return lambda step, layer: method


def test_all_full_plan_is_bit_identical_to_plain_attention():
    seen = []

    def backend(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v) * 1.0
        seen.append(out)
        return out

    runtime = FastAttnRuntime(constant_plan("full_attn"), Window1D(4, 4), needs_residual=lambda s, l: False)
    for step in range(3):
        q, k, v = qkv(seed=step)
        out = runtime(q, k, v, layer=0, step=step, cfg_rows=CfgRows.uncond_first(4), full_attention=backend)
        assert out is seen[-1]  # the caller's backend output, untouched
        plain = runtime(q, k, v, layer=1, step=step)
        assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v))
    assert runtime.state.layer((0, (1, 1, 0, 0))).cached_residual is None


def test_full_step_with_residual_returns_backend_output_and_caches_residual():
    q, k, v = qkv()
    window = Window1D(5, 5)
    runtime = FastAttnRuntime(constant_plan("full_attn"), window)
    out = runtime(q, k, v, layer=0, step=0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    residual = runtime.state.layer((0, None)).cached_residual
    torch.testing.assert_close(residual, out - masked_reference_window_attention(q, k, v, window))


def test_wars_step_is_window_plus_cached_residual():
    window = Window1D(6, 6)
    plan = methods_from_table([["full_attn", "residual_window_attn"]])
    runtime = FastAttnRuntime(plan, window)
    q0, k0, v0 = qkv(seed=0)
    q1, k1, v1 = qkv(seed=1)
    full0 = runtime(q0, k0, v0, layer=0, step=0)
    out1 = runtime(q1, k1, v1, layer=0, step=1)
    expected = masked_reference_window_attention(q1, k1, v1, window) + (
        full0 - masked_reference_window_attention(q0, k0, v0, window)
    )
    torch.testing.assert_close(out1, expected, atol=1e-5, rtol=1e-5)


def test_ast_returns_cached_output_without_calling_backend():
    calls = []

    def backend(q, k, v):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v)

    runtime = FastAttnRuntime(methods_from_table([["full_attn", "output_share"]]), Window1D(4, 4))
    q, k, v = qkv()
    first = runtime(q, k, v, layer=0, step=0, full_attention=backend)
    again = runtime(*qkv(seed=5), layer=0, step=1, full_attention=backend)
    assert len(calls) == 1 and torch.equal(first, again)


def test_layouts_agree():
    plan = methods_from_table([["full_attn", "residual_window_attn+cfg_attn_share", "output_share", "residual_window_attn"]])
    results = {}
    for layout in ("bhld", "blc", "blhd"):
        runtime = FastAttnRuntime(plan, Window1D(5, 5))
        outs = []
        for step in range(4):
            q, k, v = (from_bhld(t, layout) for t in qkv(seed=step))
            out = runtime(q, k, v, layer=0, step=step, heads=2, layout=layout, cfg_rows=[1, 0])
            outs.append(to_bhld(out, layout, 2))
        results[layout] = outs
    for layout in ("blc", "blhd"):
        for a, b in zip(results["bhld"], results[layout]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg_rows", [None, [0], CfgRows((0, 0, 0, 0)), CfgRows((1, 1, 1, 1))])
def test_asc_without_both_halves_is_a_no_op(cfg_rows):
    q, k, v = qkv()
    shared = FastAttnRuntime(constant_plan("full_attn+cfg_attn_share"), Window1D(4, 4), share_cfg_across_calls=False)
    plain = FastAttnRuntime(constant_plan("full_attn"), Window1D(4, 4))
    assert torch.equal(shared(q, k, v, layer=0, step=0, cfg_rows=cfg_rows), plain(q, k, v, layer=0, step=0))


@pytest.mark.parametrize("chunks", [[1, 0], [0, 1]])
def test_asc_copies_cond_rows_over_uncond_rows(chunks):
    q, k, v = qkv()
    rows = CfgRows.from_cond_or_uncond(chunks, 4)
    received = []

    def backend(q_, k_, v_):
        received.append(q_.shape[0])
        return F.scaled_dot_product_attention(q_, k_, v_)

    runtime = FastAttnRuntime(constant_plan("full_attn+cfg_attn_share"), Window1D(4, 4), needs_residual=lambda s, l: False)
    out = runtime(q, k, v, layer=0, step=0, cfg_rows=chunks, full_attention=backend)
    assert received == [2]  # only the cond rows were computed
    full = F.scaled_dot_product_attention(q, k, v)
    cond, uncond = list(rows.cond_rows), list(rows.uncond_rows)
    torch.testing.assert_close(out[cond], full[cond])
    assert torch.equal(out[uncond], out[cond])


def test_cfg_rows_helpers():
    assert CfgRows.cond_first(4).labels == (0, 0, 1, 1)
    assert CfgRows.uncond_first(4).labels == (1, 1, 0, 0)
    assert CfgRows.from_cond_or_uncond([1, 0], 6).labels == (1, 1, 1, 0, 0, 0)
    assert CfgRows.uncond_first(4).expansion() == (0, 1, 0, 1)
    assert CfgRows((0, 0, 1)).expansion() == (0, 1, 0)
    with pytest.raises(ValueError, match="equal chunks"):
        CfgRows.from_cond_or_uncond([1, 0], 5)
    with pytest.raises(ValueError, match="0 \\(cond\\) or 1"):
        CfgRows((0, 2))
    runtime = FastAttnRuntime(constant_plan("full_attn"), Window1D(1, 1))
    with pytest.raises(ValueError, match="batch of 4"):
        runtime(*qkv(), layer=0, step=0, cfg_rows=CfgRows((0, 1)))


@pytest.mark.parametrize("residual_lookahead", [None, lambda step, layer: False])
def test_split_cfg_calls_share_the_cond_output(residual_lookahead):
    """ComfyUI may send cond and uncond as separate calls of the same step (with and
    without a residual to compute, i.e. through the plain full-attention path too)."""
    runtime = FastAttnRuntime(
        methods_from_table([["full_attn", "full_attn+cfg_attn_share"]]), Window1D(3, 3), needs_residual=residual_lookahead
    )
    q, k, v = qkv(batch=2)
    qu, ku, vu = qkv(batch=2, seed=9)
    runtime(q, k, v, layer=0, step=0, cfg_rows=[0])
    runtime(qu, ku, vu, layer=0, step=0, cfg_rows=[1])
    cond = runtime(q, k, v, layer=0, step=1, cfg_rows=[0])
    uncond = runtime(qu, ku, vu, layer=0, step=1, cfg_rows=[1])
    assert torch.equal(cond, uncond)
    # the stash is per step: a later step's uncond call does not pick up an old cond output
    assert runtime.state.cfg_share_stash[0][0] == 1


def test_split_cfg_asc_full_step_gives_uncond_the_cond_residual():
    """Regression: with cond and uncond in separate calls, the uncond call of a
    full_attn+cfg_attn_share step reused the cond output but kept the residual of an older
    full step, which a later WA-RS step then added. One CFG call caches cat([R, R]): the
    uncond rows get the cond residual of this step."""
    window = Window1D(3, 3)
    runtime = FastAttnRuntime(
        methods_from_table([["full_attn", "full_attn+cfg_attn_share", "residual_window_attn"]]), window,
        on_missing_cache="error",
    )
    cond = [qkv(batch=2, seed=10 + step) for step in range(3)]
    uncond = [qkv(batch=2, seed=20 + step) for step in range(3)]
    for step in range(3):
        runtime(*cond[step], layer=0, step=step, cfg_rows=[0])
        out_uncond = runtime(*uncond[step], layer=0, step=step, cfg_rows=[1])
    q, k, v = cond[1]
    cond_residual = F.scaled_dot_product_attention(q, k, v) - masked_reference_window_attention(q, k, v, window)
    expected = masked_reference_window_attention(*uncond[2], window) + cond_residual
    torch.testing.assert_close(out_uncond, expected, atol=1e-5, rtol=1e-5)


def test_reset_between_runs_and_missing_cache_policy():
    plan = methods_from_table([["output_share"], ["residual_window_attn"]])
    q, k, v = qkv()
    strict = FastAttnRuntime(plan, Window1D(3, 3), on_missing_cache="error")
    with pytest.raises(MissingCacheError, match="AST"):
        strict(q, k, v, layer=0, step=0)
    with pytest.raises(MissingCacheError, match="WA-RS"):
        strict(q, k, v, layer=1, step=0)
    lenient = FastAttnRuntime(plan, Window1D(3, 3))
    out = lenient(q, k, v, layer=0, step=0)  # falls back to full attention
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert lenient.state.layer((0, None)).cached_residual is not None  # so later WA-RS steps work
    out = lenient(q, k, v, layer=1, step=0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert lenient.state.memory_bytes() > 0
    lenient.reset()
    assert lenient.state.memory_bytes() == 0 and len(lenient.state) == 0


def test_cache_shape_change_is_treated_as_missing():
    runtime = FastAttnRuntime(methods_from_table([["full_attn", "output_share"]]), Window1D(3, 3), on_missing_cache="error")
    runtime(*qkv(batch=4), layer=0, step=0)
    with pytest.raises(MissingCacheError, match="shape"):
        runtime(*qkv(batch=4, length=40), layer=0, step=1)


def test_cross_attention_full_is_fine_window_is_rejected():
    q, _, _ = qkv()
    _, k, v = qkv(length=7)
    full = FastAttnRuntime(constant_plan("full_attn"), Window1D(2, 2))  # residual lookahead: always
    assert torch.equal(full(q, k, v, layer=0, step=0), F.scaled_dot_product_attention(q, k, v))
    window = FastAttnRuntime(constant_plan("residual_window_attn+without_residual"), Window1D(2, 2))
    with pytest.raises(ValueError, match="self-attention"):
        window(q, k, v, layer=0, step=0)


def test_joint_attention_text_tokens_stay_global():
    runtime = FastAttnRuntime(constant_plan("residual_window_attn+without_residual"), lambda info: Window1D(4, 4, prefix_tokens=info.prefix_tokens))
    q, k, v = qkv(length=60)
    out = runtime(q, k, v, layer=0, step=0, prefix_tokens=12)
    expected = masked_reference_window_attention(q, k, v, Window1D(4, 4, prefix_tokens=12))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, :12], F.scaled_dot_product_attention(q[:, :, :12], k, v), atol=1e-5, rtol=1e-5)


def test_bad_plan_entry_names_step_and_layer():
    runtime = FastAttnRuntime(constant_plan("fast_attn"), Window1D(2, 2))
    with pytest.raises(ValueError, match="step 0, layer 3"):
        runtime(*qkv(), layer=3, step=0)
    table = methods_from_table([["full_attn"]])
    with pytest.raises(KeyError, match="step 5"):
        table(5, 0)
    with pytest.raises(KeyError, match="layer 2"):
        table(0, 2)


def test_attention_fn_adapter():
    runtime = FastAttnRuntime(methods_from_table([["full_attn", "residual_window_attn+cfg_attn_share"]]), Window1D(4, 4))
    attention_fn = runtime.as_attention_fn()
    q, k, v = (from_bhld(t, "blc") for t in qkv())
    with pytest.raises(KeyError, match="step"):
        attention_fn(q, k, v, 2, layer=0, options={})
    out0 = attention_fn(q, k, v, 2, layer=0, options={"step": 0, "cond_or_uncond": [1, 0]})
    assert out0.shape == q.shape
    torch.testing.assert_close(
        out0, from_bhld(F.scaled_dot_product_attention(*(to_bhld(t, "blc", 2) for t in (q, k, v))), "blc")
    )
    out1 = attention_fn(q, k, v, 2, layer=0, options={"step": 1, "cond_or_uncond": [1, 0], "token_grid": (1, 6, 8)})
    assert torch.equal(out1[:2], out1[2:])  # ASC copied the cond half


def test_runtime_is_shared_on_deepcopy():
    import copy

    runtime = FastAttnRuntime(constant_plan("full_attn"), Window1D(2, 2), state=FastAttnState())
    assert copy.deepcopy({"r": runtime})["r"] is runtime


# ---------------------------------------------------------------------------- random plans vs spec 1.6


def naive_attention(q, k, v, mask=None):
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def spec_reference_run(methods, inputs, window, cond_first, official):
    """Spec 1.6 written out literally at the core level (float64, masked softmax)."""
    from fastattn.methods import residual_needed

    needed = residual_needed(methods)
    mask = window.mask(inputs[0][0].shape[2])
    cached_output = cached_residual = None
    outputs = []
    for step, (method, (q, k, v)) in enumerate(zip(methods, inputs)):
        if method == "output_share":
            out = cached_output
        else:
            b2 = q.shape[0]
            kept = slice(0, b2 // 2) if cond_first else slice(b2 // 2, b2)
            if "cfg_attn_share" in method:
                q, k, v = q[kept], k[kept], v[kept]
            b = q.shape[0]
            if "full_attn" in method:
                out = naive_attention(q, k, v)
                if needed[step]:
                    residual = out - naive_attention(q, k, v, mask)
                    cached_residual = torch.cat([residual, residual]) if "cfg" in method else residual
            else:
                out = naive_attention(q, k, v, mask)
                if "without_residual" not in method:
                    rows = cached_residual[:b] if official or "cfg" not in method else cached_residual[kept]
                    out = out + rows
            if "cfg_attn_share" in method:
                out = torch.cat([out, out])
            cached_output = out
        outputs.append(out)
    return outputs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("official", [True, False])
def test_random_plans_match_the_spec_algorithm(seed, official):
    from fastattn.methods import METHOD_STRINGS

    generator = torch.Generator().manual_seed(seed)
    steps = 10
    choices = list(METHOD_STRINGS)
    methods = ["full_attn"] + [choices[int(i)] for i in torch.randint(0, len(choices), (steps - 1,), generator=generator)]
    cond_first = bool(seed % 2)
    window = Window1D(int(torch.randint(0, 12, (1,), generator=generator)), int(torch.randint(0, 12, (1,), generator=generator)))
    inputs = [
        [torch.randn(4, 2, 40, 8, generator=generator, dtype=torch.float64) for _ in range(3)] for _ in range(steps)
    ]
    expected = spec_reference_run(methods, inputs, window, cond_first, official)
    runtime = FastAttnRuntime(
        methods_from_table([methods]), window,
        needs_residual=residual_lookahead_from_table([methods]),
        official_asc_residual=official, on_missing_cache="error",
    )
    rows = CfgRows.cond_first(4) if cond_first else CfgRows.uncond_first(4)
    for step, (q, k, v) in enumerate(inputs):
        out = runtime(q, k, v, layer=0, step=step, cfg_rows=rows)
        torch.testing.assert_close(out, expected[step], atol=1e-10, rtol=1e-10, msg=f"step {step}: {methods[step]}")


def test_half_precision_runtime():
    runtime = FastAttnRuntime(methods_from_table([["full_attn", "residual_window_attn"]]), Window1D(4, 4))
    q, k, v = (t.to(torch.bfloat16) for t in qkv())
    runtime(q, k, v, layer=0, step=0)
    out = runtime(q, k, v, layer=0, step=1)
    assert out.dtype == torch.bfloat16
    # WA-RS on the same inputs as the full step reproduces the full output up to rounding
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q, k, v).float(), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------- head-wise plans (V2)


def test_headwise_plan_mixes_methods_per_head():
    window = Window1D(3, 3)
    entries = [["full_attn"] * 3, ["output_share", "residual_window_attn", "residual_window_attn+without_residual"]]
    runtime = FastAttnRuntime(lambda step, layer: entries[step], window, on_missing_cache="error")
    q0, k0, v0 = qkv(batch=2, heads=3, seed=0)
    q1, k1, v1 = qkv(batch=2, heads=3, seed=1)
    out0 = runtime(q0, k0, v0, layer=0, step=0)
    torch.testing.assert_close(out0, F.scaled_dot_product_attention(q0, k0, v0))
    out1 = runtime(q1, k1, v1, layer=0, step=1)
    window1 = masked_reference_window_attention(q1, k1, v1, window)
    residual0 = out0 - masked_reference_window_attention(q0, k0, v0, window)
    assert torch.equal(out1[:, 0], out0[:, 0])  # AST head
    torch.testing.assert_close(out1[:, 1], window1[:, 1] + residual0[:, 1], atol=1e-5, rtol=1e-5)  # WA-RS head
    torch.testing.assert_close(out1[:, 2], window1[:, 2], atol=1e-5, rtol=1e-5)  # WA head
    with pytest.raises(ValueError, match="3 heads"):
        FastAttnRuntime(lambda s, l: ["full_attn"] * 2, window)(q0, k0, v0, layer=0, step=0)


def test_headwise_asc_heads_copy_cond_rows():
    runtime = FastAttnRuntime(lambda s, l: ["full_attn", "full_attn+cfg_attn_share"], Window1D(2, 2))
    q, k, v = qkv(batch=4, heads=2)
    out = runtime(q, k, v, layer=0, step=0, cfg_rows=[1, 0])
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, 0], full[:, 0])
    torch.testing.assert_close(out[2:, 1], full[2:, 1])
    assert torch.equal(out[:2, 1], out[2:, 1])


@pytest.fixture(scope="module")
def v2_golden():
    from safetensors.torch import load_file

    return (
        load_file(str(GOLDEN / "v2_sd3_layer_weights.safetensors")),
        load_file(str(GOLDEN / "v2_sd3_layer_inputs.safetensors")),
        load_file(str(GOLDEN / "v2_sd3_layer_outputs.safetensors")),
        json.loads((GOLDEN / "v2_sd3_layer_plan.json").read_text()),
    )


def test_v2_headwise_arrow_attention_and_head_caching_match_official(v2_golden):
    """DiTFastAttnV2 inference on one SD3-style joint layer (image first, 333 text tokens
    kept global), driven by the official per-head window tables: -1 = full head,
    0 = cached head (previous step's output), w = arrow window of w tokens per side."""
    weights, inputs, outputs, plan = v2_golden
    heads, text_tokens, steps = 24, 333, 5
    tables = {0: [[-1, -1]] * heads}
    tables.update({int(step): table for step, table in plan["window_table_per_step"].items()})
    for step, cached in plan["output_share_heads_per_step"].items():
        assert sorted(h for h, (left, _) in enumerate(tables[int(step)]) if left == 0) == sorted(cached)

    def methods_for(step, layer):
        return [
            "full_attn" if left < 0 else "output_share" if left == 0 else "residual_window_attn+without_residual"
            for left, _ in tables[step]
        ]

    def windows_for(info):
        return [
            Window1D(left, right, suffix_tokens=text_tokens) if left > 0 else None
            for left, right in tables[info.step]
        ]

    runtime = FastAttnRuntime(methods_for, windows_for, on_missing_cache="error")
    context = inputs["encoder_hidden_states"]
    for step in range(steps):
        x = inputs[f"step{step}.hidden_states"]
        q = torch.cat([project(weights, x, "to_q"), project(weights, context, "add_q_proj")], dim=1)
        k = torch.cat([project(weights, x, "to_k"), project(weights, context, "add_k_proj")], dim=1)
        v = torch.cat([project(weights, x, "to_v"), project(weights, context, "add_v_proj")], dim=1)
        out = runtime(q, k, v, layer=0, step=step, heads=heads, layout="blc", suffix_tokens=text_tokens)
        image_out = project(weights, out[:, : x.shape[1]], "to_out.0")
        text_out = project(weights, out[:, x.shape[1]:], "to_add_out")
        torch.testing.assert_close(image_out, outputs[f"fast.step{step}.hidden_states_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(text_out, outputs[f"fast.step{step}.encoder_hidden_states_out"], atol=1e-5, rtol=0)


def test_output_cache_lookahead_keeps_only_what_ast_needs():
    from fastattn.runtime import output_cache_lookahead_from_table

    table = [["full_attn", "output_share", "output_share", "residual_window_attn", "full_attn"]]
    keep = output_cache_lookahead_from_table(table)
    assert [keep(t, 0) for t in range(5)] == [True, True, False, False, False]
    runtime = FastAttnRuntime(methods_from_table(table), Window1D(3, 3), cache_output=keep, on_missing_cache="error")
    outs = [runtime(*qkv(seed=t), layer=0, step=t) for t in range(5)]
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    # like the official need_cache_output=False, a step that does not cache leaves the old cache alone
    assert runtime.state.layer((0, None)).cached_output is outs[0]
    headwise = output_cache_lookahead_from_table([[["full_attn", "full_attn"], ["output_share", "full_attn"]]])
    assert headwise(0, 0) and not headwise(1, 0)


def test_uniform_headwise_entry_uses_the_layer_path_and_callers_backend():
    seen = []

    def backend(q, k, v):
        seen.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v)

    runtime = FastAttnRuntime(lambda s, l: ["full_attn"] * 2, Window1D(2, 2), needs_residual=lambda s, l: False)
    q, k, v = qkv(heads=2)
    out = runtime(q, k, v, layer=0, step=0, full_attention=backend)
    assert seen and torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    mixed_windows = FastAttnRuntime(constant_plan("residual_window_attn+without_residual"), lambda info: [Window1D(1, 1), Window1D(2, 2)])
    with pytest.raises(ValueError, match="head-wise plan entry"):
        mixed_windows(q, k, v, layer=0, step=0)


def test_headwise_residual_is_tracked_per_head():
    entries = [["full_attn", "residual_window_attn+without_residual"], ["residual_window_attn", "residual_window_attn"]]
    q, k, v = qkv(heads=2)
    strict = FastAttnRuntime(lambda s, l: entries[s], Window1D(2, 2), on_missing_cache="error")
    strict(q, k, v, layer=0, step=0)
    residual = strict.state.layer((0, None)).cached_residual
    assert not torch.isnan(residual[:, 0]).any() and torch.isnan(residual[:, 1]).all()
    with pytest.raises(MissingCacheError, match=r"heads \[1\]"):
        strict(q, k, v, layer=0, step=1)
    lenient = FastAttnRuntime(lambda s, l: entries[s], Window1D(2, 2))
    lenient(q, k, v, layer=0, step=0)
    out = lenient(q, k, v, layer=0, step=1)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)  # head 0: W + (O - W); head 1: full fallback
