"""How the patch finds out which layer an attention call belongs to: one small strategy per way in.

* :class:`BlockReplace` (most families): a ``patches_replace["dit"]`` entry per block tags the
  running layer in ``transformer_options`` (chaining an existing entry) and publishes the block's
  self-attention ComfyAttention for the full-attention path;
* :class:`CallCounting` (Cosmos-Predict2: neither patches_replace nor a block index): layers come
  from counting the attention calls of one model call, ``calls_per_block`` per block, in order;
* :class:`ObjectPatch` (native PixArt: its attention never receives transformer_options): one
  ``add_object_patch`` per block on ``blocks.{i}.attn.forward`` (pixart_patch.py) that hands the
  call the options of the model call in progress.

Each strategy installs its hooks, names the layer of a call (or None: leave the call alone), and
wraps a model call when it needs to. The rest of the patch (override, wrappers) is shared.
"""
from __future__ import annotations

import contextlib
from typing import Optional

from . import pixart_patch

LAYER_KEY = "ditfastattn_layer"      # layer name of the block being executed
CALL_KEY = "ditfastattn_call"        # attention calls so far inside that block
COUNT_KEY = "ditfastattn_calls"      # attention calls so far in this model call (CallCounting)
RECORD_KEY = "ditfastattn_model_call"  # ModelCallRecord of this model call (stacking checks)
PREFERRED_KEY = "ditfastattn_preferred"  # the running block's self-attention ComfyAttention, if any
TAG_NAME = "ditfastattn_tag_layer"   # __name__ of our block replace entries (found again on removal)


def _seq_len(t, kwargs) -> int:
    return t.shape[2] if kwargs.get("skip_reshape", False) else t.shape[1]


class LayerAccess:
    """Base: no install step, layer from the block tag, model calls unwrapped."""

    name = "base"

    def install(self, clone, diffusion_model, family, spec) -> None:
        pass

    def remove(self, clone) -> None:
        pass

    def model_call(self, spec, options):
        return contextlib.nullcontext()

    def layer_of_call(self, family, options, args, kwargs) -> Optional[str]:
        """The layer of a self-attention call from the block tag, or None (not one we handle)."""
        layer = options.get(LAYER_KEY)
        if layer is None:
            return None                  # e.g. HunyuanVideo's text refiner before the blocks
        call_index = options.get(CALL_KEY, 0)
        options[CALL_KEY] = call_index + 1
        if call_index != family.self_attention_call:
            return None
        return layer


class BlockReplace(LayerAccess):
    name = "replace"

    def install(self, clone, diffusion_model, family, spec) -> None:
        options = clone.model_options.setdefault("transformer_options", {})
        dit = options.setdefault("patches_replace", {}).setdefault("dit", {})
        for group in family.block_groups:
            blocks = getattr(diffusion_model, group.attribute, None) or []
            for i in range(len(blocks)):
                key = (group.replace_kind, i)
                dit[key] = make_layer_tag(f"{group.layer_prefix}.{i}", dit.get(key),
                                          preferred_attention(blocks[i]))

    def remove(self, clone) -> None:
        options = clone.model_options.get("transformer_options", {})
        dit = options.get("patches_replace", {}).get("dit", {})
        for key, patch in list(dit.items()):
            if getattr(patch, "__name__", "") == TAG_NAME:
                chained = getattr(patch, "ditfastattn_chained", None)
                if chained is None:
                    del dit[key]
                else:
                    dit[key] = chained


class CallCounting(LayerAccess):
    name = "count"

    def __init__(self, calls_per_block: int):
        self.calls_per_block = int(calls_per_block)

    def layer_of_call(self, family, options, args, kwargs) -> Optional[str]:
        # Every attention call of the model call counts, also the ones we leave alone.
        record = options.get(RECORD_KEY)
        n = options.get(COUNT_KEY)
        if n is None or (record is not None and record.desynced):
            return None
        options[COUNT_KEY] = n + 1
        if n % self.calls_per_block != family.self_attention_call:
            return None
        if len(args) >= 2 and _seq_len(args[0], kwargs) != _seq_len(args[1], kwargs):
            # a cross-attention call where the self-attention belongs: an outer override took
            # calls of this model call, so the count no longer says which block is running
            if record is not None:
                record.desynced = True
            return None
        return f"{family.block_groups[0].layer_prefix}.{n // self.calls_per_block}"


class ObjectPatch(LayerAccess):
    name = "object_patch"

    def install(self, clone, diffusion_model, family, spec) -> None:
        pixart_patch.install(clone, diffusion_model, family.block_groups[0].layer_prefix,
                             spec.model_call, LAYER_KEY, CALL_KEY)

    def remove(self, clone) -> None:
        pixart_patch.remove(clone)

    @contextlib.contextmanager
    def model_call(self, spec, options):
        previous = spec.model_call.enter(options if isinstance(options, dict) else None)
        try:
            yield
        finally:
            spec.model_call.leave(previous)


BLOCK_REPLACE = BlockReplace()
OBJECT_PATCH = ObjectPatch()
ALL_ACCESS = (BlockReplace, CallCounting, ObjectPatch)


def make_layer_tag(layer: str, chained, preferred=None):
    """Block replace entry: tags the running layer, records that its block ran (stacking checks)
    and publishes the block's self-attention ComfyAttention (``preferred``) for the full path."""
    def ditfastattn_tag_layer(args, extra):
        options = args.get("transformer_options")
        if options is None:
            return chained(args, extra) if chained is not None else extra["original_block"](args)
        previous = options.get(LAYER_KEY), options.get(CALL_KEY), options.get(PREFERRED_KEY)
        options[LAYER_KEY], options[CALL_KEY], options[PREFERRED_KEY] = layer, 0, preferred
        record = options.get(RECORD_KEY)
        if record is not None:
            record.executed.add(layer)
        try:
            if chained is not None:
                return chained(args, extra)
            return extra["original_block"](args)
        finally:
            options[LAYER_KEY], options[CALL_KEY], options[PREFERRED_KEY] = previous

    ditfastattn_tag_layer.ditfastattn_chained = chained
    return ditfastattn_tag_layer


def preferred_attention(block):
    """The ComfyAttention of a block's self-attention (current core: ``comfy_attention`` on the
    attention module, whose ``function`` a checkpoint may set, e.g. comfy-kitchen int8). Core's
    wrap_attn pops ``preferred_attention`` before it calls an override, so the full-attention path
    finds it here instead. The self-attention module comes first in a block's modules."""
    for module in block.modules():
        preferred = getattr(module, "comfy_attention", None)
        if preferred is not None and hasattr(preferred, "function"):
            return preferred
    return None
