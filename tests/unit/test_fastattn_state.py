"""Explicit cache state: per-layer caches, reset, memory accounting, shared on deepcopy."""

import copy

import torch

from fastattn.state import FastAttnState, LayerCache


def test_layer_cache_created_on_first_use_and_isolated():
    state = FastAttnState()
    assert len(state) == 0 and state.get(3) is None
    cache = state.layer(3)
    assert state.layer(3) is cache
    assert state.layer((3, "cross")) is not cache
    assert 3 in state and len(state) == 2
    assert set(state.keys()) == {3, (3, "cross")}


def test_memory_bytes_counts_every_cached_tensor():
    state = FastAttnState()
    state.layer(0).cached_output = torch.zeros(2, 4, 16, 8)  # 1024 float32
    state.layer(0).cached_residual = torch.zeros(2, 4, 16, 8, dtype=torch.float16)  # 1024 half
    state.layer(1).cached_output = torch.zeros(10, dtype=torch.float64)
    state.cfg_share_stash[1] = (0, torch.zeros(5))
    assert state.layer(0).memory_bytes() == 1024 * 4 + 1024 * 2
    assert state.memory_bytes() == 1024 * 4 + 1024 * 2 + 80 + 20


def test_reset_drops_everything():
    state = FastAttnState()
    state.layer(0).cached_output = torch.ones(3)
    state.cfg_share_stash[0] = (1, torch.ones(3))
    state.reset()
    assert len(state) == 0 and state.memory_bytes() == 0 and not state.cfg_share_stash
    assert state.layer(0).cached_output is None


def test_layer_cache_clear_and_residual_layouts():
    cache = LayerCache()
    assert cache.residual_as("blhd") is None
    residual = torch.randn(2, 3, 5, 4)  # [B, H, L, D]
    cache.cached_residual = residual
    assert cache.residual_as("blhd").shape == (2, 5, 3, 4)
    assert torch.equal(cache.residual_as("blhd")[1, 2, 0], residual[1, 0, 2])
    assert cache.residual_as("blc").shape == (2, 5, 12)
    cache.clear()
    assert cache.cached_residual is None and cache.memory_bytes() == 0


def test_deepcopy_shares_the_state():
    """ComfyUI deep-copies model_options on clone; the run state must not fork."""
    state = FastAttnState()
    options = {"transformer_options": {"state": state}}
    assert copy.deepcopy(options)["transformer_options"]["state"] is state


def test_snapshot_restore_takes_back_what_happened_since():
    state = FastAttnState()
    kept_output, kept_residual, stash = torch.ones(3), torch.zeros(2), (1, torch.ones(1))
    state.layer(0).cached_output = kept_output
    state.layer(0).cached_residual = kept_residual
    state.cfg_share_stash[0] = stash
    snapshot = state.snapshot()
    state.layer(0).cached_output = torch.full((3,), 7.0)   # the runtime replaces tensors
    state.layer(1).cached_output = torch.ones(4)            # a cache created after the snapshot
    state.cfg_share_stash[1] = (2, torch.ones(1))
    state.restore(snapshot)
    assert state.layer(0).cached_output is kept_output and state.layer(0).cached_residual is kept_residual
    assert state.layer(1).cached_output is None and state.layer(1).cached_residual is None
    assert state.cfg_share_stash == {0: stash}
