"""Explicit cache state of DiTFastAttn: never stored on the model, never global.

One `FastAttnState` lives for one sampling run (one pipeline call): the caller creates
it (or resets it) at the start and drops / resets it at the end. It maps a layer key
(any hashable: a block index, a module name, a (layer, call) tuple) to a `LayerCache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, Iterator, Optional, Tuple

import torch


def _nbytes(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


@dataclass(eq=False)
class LayerCache:
    """Caches of one attention layer.

    cached_output:   what an AST (`output_share`) step returns: the output of the last
                     computed step of this layer, for the whole batch of the call.
    cached_residual: full - window attention output of the last full step that computed
                     one, before the output projection, layout [B, H, L, D].
    """

    cached_output: Optional[torch.Tensor] = None
    cached_residual: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self.cached_output = None
        self.cached_residual = None

    def memory_bytes(self) -> int:
        return _nbytes(self.cached_output) + _nbytes(self.cached_residual)

    def residual_as(self, layout: str) -> Optional[torch.Tensor]:
        """The cached residual in `layout` ("bhld", "blhd" = the official (B, N, H, D), "blc")."""
        if self.cached_residual is None:
            return None
        from .kernels import from_bhld

        return from_bhld(self.cached_residual, layout)


# (layer key -> (cached output, cached residual), CFG-share stash), from FastAttnState.snapshot()
StateSnapshot = Tuple[Dict[Hashable, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]], Dict]


class FastAttnState:
    """Per-run container of layer caches.

    `cfg_share_stash` holds, per layer key, the conditional output computed at one step
    by a call that held only conditional rows, so that a later call of the same step
    holding only unconditional rows can reuse it (ComfyUI splits cond and uncond into
    separate calls when they do not fit in one batch).

    Deep copies return the same object: ComfyUI deep-copies model options when a model
    is cloned, and a silent copy of the caches would fork the state of one run.
    """

    def __init__(self) -> None:
        self._layers: Dict[Hashable, LayerCache] = {}
        self.cfg_share_stash: Dict[Hashable, Tuple[int, torch.Tensor]] = {}

    def layer(self, key: Hashable) -> LayerCache:
        """The cache of layer `key`, created empty on first use."""
        cache = self._layers.get(key)
        if cache is None:
            cache = self._layers[key] = LayerCache()
        return cache

    def get(self, key: Hashable) -> Optional[LayerCache]:
        return self._layers.get(key)

    def keys(self) -> Iterator[Hashable]:
        return iter(self._layers.keys())

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._layers

    def reset(self) -> None:
        """Drop every cache (start and end of a run, or when batch/resolution change)."""
        self._layers.clear()
        self.cfg_share_stash.clear()

    def snapshot(self) -> "StateSnapshot":
        """References to every cached tensor and the CFG-share stash. The runtime replaces cached
        tensors and never edits them in place, so references are a snapshot without copies."""
        layers = {key: (cache.cached_output, cache.cached_residual) for key, cache in self._layers.items()}
        return layers, dict(self.cfg_share_stash)

    def restore(self, snapshot: "StateSnapshot") -> None:
        """Back to `snapshot`: caches created since are emptied, the others get their tensors back."""
        layers, stash = snapshot
        for key, cache in self._layers.items():
            cache.cached_output, cache.cached_residual = layers.get(key, (None, None))
        self.cfg_share_stash.clear()
        self.cfg_share_stash.update(stash)

    def memory_bytes(self) -> int:
        """Bytes held by all cached tensors (outputs, residuals, CFG-share stash)."""
        total = sum(cache.memory_bytes() for cache in self._layers.values())
        return total + sum(_nbytes(tensor) for _, tensor in self.cfg_share_stash.values())

    def __deepcopy__(self, memo) -> "FastAttnState":
        return self

    def __repr__(self) -> str:
        return f"FastAttnState(layers={len(self._layers)}, memory_bytes={self.memory_bytes()})"
