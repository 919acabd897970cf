"""DiTFastAttn for ComfyUI's native PixArt (Alpha/Sigma) through per-block object patches.

Native PixArt drops ``transformer_options`` in its forward and its self-attention
(``AttentionKVCompress.forward``) calls ``optimized_attention`` without them, so the attention
override never sees PixArt (spec 15.1/15.2). The only per-model way in is
``ModelPatcher.add_object_patch("diffusion_model.blocks.{i}.attn.forward", fn)``: ComfyUI sets the
attribute when the model is loaded and restores the original when it is unloaded, so the shared
model object is never changed for other clones.

Each replacement forward computes q, k, v with the module's own ``qkv`` layer exactly as the
original does, then calls the same ``optimized_attention`` with the transformer_options of the
model call in progress (tagged with the layer name ``block.{i}``). ComfyUI's ``wrap_attn`` then
routes the call through the installed override, i.e. the very same DiTFastAttn routing every other
family uses; finally the module's own ``proj`` runs. Only the standard configuration is patched
(``sr_ratio == 1``, no qk-norm); anything else is left alone and logged.

The options of the model call in progress come from the APPLY_MODEL wrapper through a
:class:`ModelCallContext` kept on the PatchSpec (a shared holder, never a module global).
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

log = logging.getLogger("reducio_fastattn.ditfastattn")

PATCH_MARK = "ditfastattn_pixart_forward"   # attribute set on our forward closures


class ModelCallContext:
    """The transformer_options of the model call running on this thread (set by APPLY_MODEL)."""

    def __init__(self):
        self._local = threading.local()

    def current(self) -> Optional[dict]:
        return getattr(self._local, "options", None)

    def enter(self, options: Optional[dict]):
        previous = self.current()
        self._local.options = options
        return previous

    def leave(self, previous) -> None:
        self._local.options = previous

    def __deepcopy__(self, memo):      # lives in model_options via the PatchSpec: shared, not copied
        return self

    def __copy__(self):
        return self


def object_patch_key(index: int) -> str:
    return f"diffusion_model.blocks.{index}.attn.forward"


def unsupported_reason(attn) -> Optional[str]:
    """Why this block's self-attention cannot be patched, or None for the standard layout."""
    import torch.nn as nn

    if type(attn).__name__ != "AttentionKVCompress":
        return f"self-attention is {type(attn).__name__}, not AttentionKVCompress"
    if getattr(attn, "sr_ratio", None) != 1:
        return f"KV compression (sr_ratio={getattr(attn, 'sr_ratio', None)})"
    if not isinstance(getattr(attn, "q_norm", None), nn.Identity) or \
            not isinstance(getattr(attn, "k_norm", None), nn.Identity):
        return "qk-norm"
    for name in ("qkv", "proj", "num_heads"):
        if not hasattr(attn, name):
            return f"no '{name}' attribute"
    return None


def _make_forward(attn, layer: str, context: ModelCallContext, layer_key: str, call_key: str):
    """Replacement for ``attn.forward`` (same signature as AttentionKVCompress.forward in
    ComfyUI 0.3.6x and 0.8)."""
    original = type(attn).forward

    def forward(x, mask=None, HW=None, block_id=None):
        options = context.current()
        if mask is not None or options is None or x.ndim != 3:
            # Not a call we route (the original raises on masks; no model call context means we
            # were called outside sampling): the module's own forward, unchanged.
            return original(attn, x, mask=mask, HW=HW, block_id=block_id)
        # The blocks module's optimized_attention, looked up per call like the original does.
        from comfy.ldm.pixart import blocks as pixart_blocks

        B, N, C = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(B, N, 3, C)
        q, k, v = qkv.unbind(2)
        q, k, v = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in (q, k, v))
        saved = options.get(layer_key), options.get(call_key)
        options[layer_key], options[call_key] = layer, 0
        try:
            out = pixart_blocks.optimized_attention(q, k, v, heads, mask=None, skip_reshape=True,
                                                    transformer_options=options)
        finally:
            options[layer_key], options[call_key] = saved
        out = out.view(B, N, C)
        out = attn.proj(out)
        proj_drop = getattr(attn, "proj_drop", None)     # not in 0.3.64/0.8; honour it if added
        return proj_drop(out) if proj_drop is not None else out

    setattr(forward, PATCH_MARK, layer)
    return forward


def install(clone, diffusion_model, layer_prefix: str, context: ModelCallContext,
            layer_key: str, call_key: str) -> list[str]:
    """Add one object patch per standard block to ``clone``; return the patched layer names."""
    patched, skipped = [], []
    for i, block in enumerate(getattr(diffusion_model, "blocks", None) or []):
        attn = getattr(block, "attn", None)
        key = object_patch_key(i)
        reason = "no attn module" if attn is None else unsupported_reason(attn)
        existing = clone.object_patches.get(key)
        if reason is None and existing is not None and not hasattr(existing, PATCH_MARK):
            reason = "another object patch already replaces this forward"
        if reason is not None:
            skipped.append(f"block {i}: {reason}")
            continue
        layer = f"{layer_prefix}.{i}"
        clone.add_object_patch(key, _make_forward(attn, layer, context, layer_key, call_key))
        patched.append(layer)
    if skipped:
        log.warning("DiTFastAttn: PixArt blocks left at full attention (not the standard layout): %s",
                    "; ".join(skipped))
    return patched


def remove(clone) -> None:
    """Drop our object patches from ``clone`` (its own copy of the dict; others' stay)."""
    for key, value in list(clone.object_patches.items()):
        if hasattr(value, PATCH_MARK):
            del clone.object_patches[key]
