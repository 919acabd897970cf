"""A diffusers (0.31) attention processor running the DiTFastAttn runtime.

Behaves like the official `FastAttnProcessor` (spec ditfastattn.md 1.1 and 1.6), so
plans made by the official tool run unchanged and the golden `processor_*` data is
reproduced:

* the step index is the processor's own call counter `stepi` (one per transformer
  forward; the CFG batch is one call), reset with `reset()` at the start and end of a
  pipeline call (fa-calib's `apply_plan` wraps the pipeline to do so);
* AST skips the Q/K/V/O projections and returns the module output cached at the last
  computed step (after `to_out`, like the official code);
* ASC keeps one half of the CFG batch before the projections (`[:B/2]` if cond_first,
  else `[B/2:]`) and duplicates the projected output;
* the residual is cached before the output projection, and under ASC the first b rows
  of the cached residual are added (`official_asc_residual=True`, the official quirk).

The per-module state (`LayerCache`) lives on the processor instance, never on the
diffusers module.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..methods import MethodLike, parse_methods, residual_needed
from ..runtime import MissingCacheError, compute_attention_core
from ..state import LayerCache
from ..windows import Window1D


class FastAttnProcessor:
    """Drop-in `attn.processor` for a diffusers self-attention `Attention` module.

    steps_method:          one method string (or Method) per transformer call of a run.
    window_size:           (left, right) per-side window in tokens (flash-attn semantics),
                           or any window spec from `fastattn.windows`.
    cond_first:            CFG batch order: True = [cond, uncond] (DiT), False = [uncond,
                           cond] (PixArt). The conditional half is computed under ASC.
    need_compute_residual: per-step flags; None derives the official lookahead.
    need_cache_output:     keep each computed output for AST steps (off during
                           calibration trials).
    official_asc_residual: see module docstring; False adds the kept half's own rows.
    """

    def __init__(
        self,
        steps_method: Sequence[MethodLike],
        window_size: Union[Tuple[int, int], object] = (8, 8),
        cond_first: bool = True,
        need_compute_residual: Optional[Sequence[bool]] = None,
        need_cache_output: bool = True,
        official_asc_residual: bool = True,
        kernel_backend: str = "auto",
    ) -> None:
        self.steps_method = parse_methods(steps_method)
        if isinstance(window_size, (tuple, list)):
            if len(window_size) != 2:
                raise ValueError(f"window_size must be (left, right), got {window_size!r}")
            self.window = Window1D(int(window_size[0]), int(window_size[1]))
        else:
            self.window = window_size
        if need_compute_residual is None:
            need_compute_residual = residual_needed(self.steps_method)
        if len(need_compute_residual) != len(self.steps_method):
            raise ValueError(
                f"need_compute_residual has {len(need_compute_residual)} entries for "
                f"{len(self.steps_method)} steps"
            )
        self.need_compute_residual = [bool(flag) for flag in need_compute_residual]
        self.cond_first = bool(cond_first)
        self.need_cache_output = need_cache_output
        self.official_asc_residual = official_asc_residual
        self.kernel_backend = kernel_backend
        self.cache = LayerCache()
        self.stepi = 0

    # ------------------------------------------------------------------ lifecycle

    def reset(self) -> None:
        """Start of / end of a pipeline call: step counter to 0, caches dropped."""
        self.stepi = 0
        self.cache.clear()

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if self.stepi >= len(self.steps_method):
            raise IndexError(
                f"DiTFastAttn processor called for step {self.stepi} but its plan has "
                f"{len(self.steps_method)} steps; the plan was made for another step count, "
                f"or reset() was not called at the start of the pipeline call"
            )
        method = self.steps_method[self.stepi]
        input_states = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape

        if method.output_share:
            if self.cache.cached_output is None:
                raise MissingCacheError(
                    f"output_share at step {self.stepi} without a cached output (step 0 must be computed)"
                )
            out = self.cache.cached_output
        else:
            out = self._compute(method, attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            if self.need_cache_output:
                self.cache.cached_output = out
        self.stepi += 1

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + input_states
        return out / attn.rescale_output_factor

    def _compute(self, method, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)

        full_batch = hidden_states.shape[0]
        if method.cfg_share:
            if full_batch % 2:
                raise ValueError(
                    f"cfg_attn_share needs a CFG batch of two equal halves, got {full_batch} rows"
                )
            half = full_batch // 2
            kept = slice(0, half) if self.cond_first else slice(half, full_batch)
            hidden_states = hidden_states[kept]
            if encoder_hidden_states is not None:
                encoder_hidden_states = encoder_hidden_states[kept]
            if attention_mask is not None:
                attention_mask = attention_mask[kept]
        batch, _, _ = hidden_states.shape
        key_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]

        if attention_mask is not None:
            if method.window:
                raise ValueError("window attention methods do not support an attention mask (self-attention of DiT/PixArt has none)")
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        # self-attention keys come from the normalised states, as in diffusers' own processors
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def full_attention(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)

        device = query.device
        expansion = torch.arange(batch, device=device).repeat(2) if method.cfg_share else None
        if method.cfg_share and not self.official_asc_residual:
            residual_rows = torch.arange(kept.start, kept.stop, device=device)
        else:
            residual_rows = torch.arange(batch, device=device)  # the official `cached_residual[:b]`
        core = compute_attention_core(
            method,
            query,
            key,
            value,
            self.cache,
            self.window,
            needs_residual=self.need_compute_residual[self.stepi],
            residual_expansion=expansion,
            residual_rows=residual_rows if method.residual else None,
            full_attention=full_attention,
            backend=self.kernel_backend,
        )
        out = core.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if method.cfg_share:
            out = torch.cat([out, out])
        return out


def fastattn_processors(module: torch.nn.Module):
    """(name, processor) for every FastAttnProcessor installed under `module`."""
    for name, child in module.named_modules():
        processor = getattr(child, "processor", None)
        if isinstance(processor, FastAttnProcessor):
            yield name, processor


def reset_fastattn_processors(module: torch.nn.Module) -> int:
    """Reset every FastAttnProcessor under `module`; returns how many were reset."""
    count = 0
    for _, processor in fastattn_processors(module):
        processor.reset()
        count += 1
    return count
