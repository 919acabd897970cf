"""Tier 2: DiTFastAttn on a tiny randomly initialised native LTXV model (``LTXVModel``).

Same contract as the other families in test_fastattn_families.py: an all-full plan is bit-identical
to the unpatched model; a compressing plan (AST + WA-RS) reaches every block's self-attention exactly
once per model call (the cross-attention that follows it is left alone) and changes the result while
staying finite.
"""

import pytest
import torch

from testkit import fastattn_tiny as tiny  # noqa: E402
from testkit.fastattn_tiny import mixed_plan, spy_calls  # noqa: E402

pytestmark = pytest.mark.comfyui

FRAMES, SIZE = 2, 4


def test_ltxv(fa, monkeypatch):
    model = tiny.tiny_ltxv(seed=0)
    family = fa.families.detect_family(model)
    assert family.name == "ltxv"
    # same text length for both: masks of equal shape let ComfyUI batch cond and uncond into one call
    pos, neg = tiny.ltxv_conditioning(seed=1), tiny.ltxv_conditioning(seed=2)
    latent = {"samples": torch.zeros(1, 128, FRAMES, SIZE, SIZE)}
    ref = fa.sample(model, pos, neg, latent)
    assert torch.isfinite(ref).all()
    assert torch.equal(fa.sample(fa.apply(model, fa.full_plan(model, 4)), pos, neg, latent), ref)

    seen = spy_calls(fa, monkeypatch)
    out = fa.sample(fa.apply(model, mixed_plan(fa, model)), pos, neg, latent)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    layers = family.layer_names(model.model.diffusion_model)
    assert layers == ["block.0", "block.1"]
    # each block's self-attention once per model call (cond and uncond batched: one call per
    # evaluation), never the cross-attention; patch size 1 -> token grid = latent grid
    assert sorted(s[0] for s in seen) == sorted(layers * 4)
    assert {s[1:] for s in seen} == {(0, 0, (FRAMES, SIZE, SIZE))}
