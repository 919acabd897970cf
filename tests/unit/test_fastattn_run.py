"""Run-level logic (fastattn.run): evaluation counter, snapshot / restore, per-call accounting
from what the runtime reports it ran, per-device lanes and the recompute-after-gap rule."""

import math

import torch

from fastattn.flops import call_flops
from fastattn.methods import FULL, OUTPUT_SHARE, WINDOW_RESIDUAL, FULL_CFG_SHARE, arrow_method
from fastattn.run import RunEvents, RunState
from fastattn.windows import window_1d_fraction

B, H, L, D = 2, 2, 16, 4


def _qkv(seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, L, H * D, generator=g) for _ in range(3)]


def _run(table, needs_residual=None, events=None):
    """A RunState over `table[step][layer]` (method strings or per-head tuples)."""
    return RunState(method_for=lambda step, layer: table[step][layer], window_for=window_1d_fraction(0.125),
                    needs_residual=needs_residual, measure_time=False, stacking=events)


def _attend(run, layer=0, seed=0, chunks=(0, 1), device_key=None, batch=B):
    q, k, v = _qkv(seed, batch)
    return run.attend(layer=layer, q=q, k=k, v=v, heads=H, layout="blc", cond_or_uncond=list(chunks),
                      full_attention=None, prefix_tokens=0, suffix_tokens=0, token_grid=None,
                      device_key=device_key)


def test_accounting_reads_what_ran_and_matches_the_flop_model():
    run = _run([[FULL.official], [OUTPUT_SHARE.official], [WINDOW_RESIDUAL.official]],
               needs_residual=lambda step, layer: step == 0)
    for step in range(3):
        run.begin_evaluation(1.0 - step / 3)
        _attend(run, seed=step)
    full, ast, wars = run.stats.calls
    dense = 4.0 * B * H * L * L * D
    assert [c.method for c in run.stats.calls] == [FULL.official, OUTPUT_SHARE.official, WINDOW_RESIDUAL.official]
    assert all(math.isclose(c.dense_flops, dense) for c in run.stats.calls)
    assert ast.kept_flops == 0.0
    # the full step refreshed the residual (a WA-RS step follows): full + one window pass
    assert full.kept_flops > dense and math.isclose(full.kept_flops - dense, wars.kept_flops)
    assert 0 < wars.kept_flops < dense


def test_missing_cache_is_counted_as_the_full_attention_that_ran():
    run = _run([[OUTPUT_SHARE.official]])        # AST at the first evaluation: no cache yet
    run.begin_evaluation(1.0)
    _attend(run)
    outcome = run.lane(None).runtime.last_outcome
    assert run.stats.calls[0].method == FULL.official and outcome.parts[0].method == FULL
    assert call_flops(outcome) == (run.stats.calls[0].dense_flops, run.stats.calls[0].kept_flops)


def test_cfg_share_counts_the_computed_rows():
    run = _run([[FULL_CFG_SHARE.official]], needs_residual=lambda s, l: False)
    run.begin_evaluation(1.0)
    _attend(run)
    call = run.stats.calls[0]
    assert math.isclose(call.kept_flops, call.dense_flops / 2)


def test_uncond_call_apart_is_reused_or_reported():
    events = RunEvents()
    run = _run([[FULL_CFG_SHARE.official]], needs_residual=lambda s, l: False, events=events)
    run.begin_evaluation(1.0)
    _attend(run, chunks=(1,), batch=1)              # uncond first: nothing to share yet
    assert events.counts.get("asc_apart_calls") == 1
    _attend(run, chunks=(0,), batch=1)
    _attend(run, chunks=(1,), batch=1, seed=5)      # now reuses the cond output of this step
    assert run.stats.calls[-1].kept_flops == 0.0
    assert events.counts["asc_apart_calls"] == 1


def test_headwise_calls_record_heads_per_method():
    arrow = arrow_method(2).official
    run = _run([[(FULL.official, FULL.official)], [(OUTPUT_SHARE.official, arrow)]])
    for step in range(2):
        run.begin_evaluation(1.0)
        _attend(run, seed=step)
    call = run.stats.calls[1]
    assert call.method == "head-wise" and call.head_methods == {OUTPUT_SHARE.official: 1, arrow: 1}
    assert 0 < call.kept_flops < call.dense_flops / 2   # one cached head, one banded head


def test_snapshot_restore_returns_caches_and_records():
    run = _run([[FULL.official], [OUTPUT_SHARE.official], [OUTPUT_SHARE.official]])
    run.begin_evaluation(1.0)
    first = _attend(run)
    snap = run.snapshot()
    run.begin_evaluation(0.5)
    run.lane(None).cache.layer((0, (0, 1))).cached_output = None   # a trial drops the cache
    _attend(run, seed=3)
    run.restore(snap)
    assert len(run.stats.calls) == 1
    run.evaluation = 0
    run.begin_evaluation(0.5)
    assert torch.equal(_attend(run, seed=9), first)                   # AST reuses the restored output


def test_gap_rule_recomputes_and_devices_get_their_own_lane():
    events = RunEvents()
    run = _run([[FULL.official], [OUTPUT_SHARE.official], [OUTPUT_SHARE.official]], events=events)
    run.begin_evaluation(1.0)
    _attend(run)
    run.begin_evaluation(0.7)                # evaluation 1 of layer 0 handled elsewhere (a gap)
    run.begin_evaluation(0.4)
    _attend(run, seed=2)
    assert events.counts.get("stale_refreshes") == 1
    assert run.stats.calls[-1].method == FULL.official   # recomputed, not an old output reused
    _attend(run, seed=4, device_key="cuda:1")
    assert "cuda:1" in events.devices and len(run.lanes()) == 2
