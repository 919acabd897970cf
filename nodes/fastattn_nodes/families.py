"""Per-architecture knowledge: which native DiTs DiTFastAttn can patch, and how.

Everything the patcher needs to know about a model family lives here, as data:

* how to recognise it (the class name of ``model.diffusion_model``; no imports of model code, so a
  ComfyUI that renames or drops a class simply makes the family unknown, never an import error);
* its transformer blocks (attribute name, ``patches_replace["dit"]`` kind) -> our layer names;
* which attention call inside a block is the block's self-attention (the one we compress; Wan's
  and LTXV's cross-attention come after it and are left alone);
* the token layout at the attention call: patch size (-> token grid) and where text tokens sit in a
  joint sequence (kept global by the window); for image-only families, where tokens beyond the
  grid (Wan's reference latent, S2V reference / motion frames, ``time_dim_concat`` frames) sit:
  they are kept global like text tokens.

Detection is by class name first, then by the class names of the model's base classes (a Wan
subclass core adds later is treated as Wan); a class that a ComfyUI version lacks is simply never
seen. Unknown architectures get ``None`` from :func:`detect_family`; the caller logs and does nothing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

TEXT_NONE = "none"        # self-attention over image tokens only (Wan, LTXV, PixArt)
TEXT_PREFIX = "prefix"    # joint attention, text before image (Flux, SD3)
TEXT_SUFFIX = "suffix"    # joint attention, image before text (HunyuanVideo)


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """One list of transformer blocks of a model."""

    attribute: str          # attribute of diffusion_model holding the nn.ModuleList
    replace_kind: str       # key kind in patches_replace["dit"][(kind, i)]
    layer_prefix: str       # our layer names: f"{layer_prefix}.{i}"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    class_names: tuple[str, ...]
    block_groups: tuple[BlockGroup, ...]
    text_position: str
    # Index of the self-attention call inside one block (0 = the first attention call).
    self_attention_call: int = 0
    # "replace": tag layers through patches_replace["dit"]; "count": the model has neither
    # patches_replace nor block_index, so layers come from counting attention calls per model
    # call (``calls_per_block`` calls per block, in order); "object_patch": the model never passes
    # transformer_options to attention, so each block's self-attention forward is replaced by a
    # ModelPatcher object patch that does (PixArt); "unsupported": logged no-op.
    tagging: str = "replace"
    calls_per_block: int = 1
    unsupported_reason: str = ""
    # Joint families whose text length is the conditioning length (Flux: Kontext reference
    # tokens may follow the image); otherwise the text length is "whatever is not image".
    text_len_from_context: bool = False
    # Patch size per latent axis (spatial, or temporal+spatial), read from the model.
    patch_size: Callable[[object], Sequence[int]] = lambda dm: (1, 1)
    # Image-only families: (diffusion_model, model-call kwargs, token grid) -> number of tokens
    # beyond the grid placed *before* the image tokens; the rest of the extra tokens follow them.
    # None: a sequence longer than the grid is not this family's layout (left alone).
    extra_prefix: Optional[Callable[[object, dict, Sequence[int]], int]] = None
    # Structural check of a detected model: None, or why it cannot be patched.
    structure_problem: Optional[Callable[[object], Optional[str]]] = None

    def layer_names(self, diffusion_model) -> list[str]:
        names = []
        for group in self.block_groups:
            blocks = getattr(diffusion_model, group.attribute, None)
            for i in range(len(blocks) if blocks is not None else 0):
                names.append(f"{group.layer_prefix}.{i}")
        return names

    def token_grid(self, diffusion_model, latent_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid of one sample from the latent ``[B, C, (T,) H, W]`` (ComfyUI pads to the patch)."""
        spatial = tuple(latent_shape[2:])
        patch = tuple(int(p) for p in self.patch_size(diffusion_model))
        if len(patch) < len(spatial):          # 2-D patch on a 3-D latent is not a thing we know
            patch = (1,) * (len(spatial) - len(patch)) + patch
        patch = patch[-len(spatial):]
        return tuple(math.ceil(s / p) for s, p in zip(spatial, patch))

    def text_split(self, seq_len: int, image_tokens: int, context_len: Optional[int],
                   extra_prefix: Optional[int] = None) -> Optional[tuple[int, int]]:
        """(prefix_tokens, suffix_tokens) kept global around the image segment, or None if the
        sequence does not look like this family's layout (then the call is left alone).

        ``extra_prefix``: for image-only families, the tokens beyond the grid that come first
        (from :attr:`extra_prefix` at this model call); None when the family has no such rule."""
        extra = seq_len - image_tokens
        if extra < 0:
            return None
        if self.text_position == TEXT_NONE:
            if extra == 0:
                return 0, 0
            if extra_prefix is None or extra_prefix > extra:
                return None
            return extra_prefix, extra - extra_prefix
        if self.text_position == TEXT_PREFIX:
            if self.text_len_from_context and context_len is not None and context_len <= extra:
                return context_len, extra - context_len     # text, image, then reference tokens
            return extra, 0
        return 0, extra


def _int_tuple(value) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)


def _wan_extra_prefix(dm, kwargs, grid) -> int:
    """Wan: the reference latent of ``ref_conv`` models (Wan Fun) is prepended to the image tokens;
    everything else beyond the grid (S2V reference and motion frames, ``time_dim_concat`` frames)
    is appended."""
    reference = kwargs.get("reference_latent")
    if getattr(dm, "ref_conv", None) is None or reference is None or not hasattr(reference, "shape"):
        return 0
    patch = _int_tuple(dm.patch_size)
    return (int(reference.shape[-2]) // patch[-2]) * (int(reference.shape[-1]) // patch[-1])


def _blocks_with(attribute: str, child: str):
    def problem(dm) -> Optional[str]:
        blocks = getattr(dm, attribute, None)
        if not blocks:
            return f"no '{attribute}' block list"
        if not all(hasattr(block, child) for block in blocks):
            return f"blocks in '{attribute}' have no '{child}' self-attention"
        return None

    return problem


def _sd3_patch(dm):
    return _int_tuple(getattr(getattr(dm, "x_embedder", None), "patch_size", 2))


FAMILIES: tuple[Family, ...] = (
    Family(
        name="wan",
        class_names=("WanModel", "VaceWanModel", "CameraWanModel", "WanModel_S2V", "AnimateWanModel",
                     "HumoWanModel",
                     # current core (absent from 0.3.64 / 0.8.0): same block list and block replace
                     "WanAnimate2Model", "SCAILWanModel", "SCAIL2WanModel", "CausalWanModel",
                     "WanDancerModel"),
        block_groups=(BlockGroup("blocks", "double_block", "block"),),
        text_position=TEXT_NONE,
        patch_size=lambda dm: _int_tuple(dm.patch_size),
        extra_prefix=_wan_extra_prefix,
        structure_problem=_blocks_with("blocks", "self_attn"),
    ),
    Family(
        name="flux",
        class_names=("Flux", "Chroma", "ChromaRadiance"),
        block_groups=(BlockGroup("double_blocks", "double_block", "double"),
                      BlockGroup("single_blocks", "single_block", "single")),
        text_position=TEXT_PREFIX,
        text_len_from_context=True,
        patch_size=lambda dm: _int_tuple(dm.patch_size),
    ),
    Family(
        name="hunyuan_video",
        class_names=("HunyuanVideo",),
        block_groups=(BlockGroup("double_blocks", "double_block", "double"),
                      BlockGroup("single_blocks", "single_block", "single")),
        text_position=TEXT_SUFFIX,
        patch_size=lambda dm: _int_tuple(dm.patch_size),
    ),
    Family(
        name="sd3",
        class_names=("OpenAISignatureMMDITWrapper", "MMDiT"),
        block_groups=(BlockGroup("joint_blocks", "double_block", "block"),),
        text_position=TEXT_PREFIX,
        patch_size=_sd3_patch,
    ),
    Family(
        name="ltxv",
        # LTXVImageModel: current core's LTX 2.3 image path (absent from 0.3.64 / 0.8.0), admitted
        # when its blocks have the LTXV layout (attn1 = self-attention first in each block).
        class_names=("LTXVModel", "LTXVImageModel"),
        block_groups=(BlockGroup("transformer_blocks", "double_block", "block"),),
        text_position=TEXT_NONE,
        patch_size=lambda dm: (1, 1, 1),
        structure_problem=_blocks_with("transformer_blocks", "attn1"),
    ),
    Family(
        # The pack's own Reducio-DiT: honours patches_replace and calls self-attention first in
        # each block (it also sets block_index / attn_kind, which the override double-checks).
        name="reducio_dit",
        class_names=("ComfyReducioDiT",),
        block_groups=(BlockGroup("blocks", "double_block", "block"),),
        text_position=TEXT_NONE,
        patch_size=lambda dm: tuple(int(p) for p in dm.config.patch_size),
    ),
    Family(
        # Cosmos-Predict2 (text-to-image and video): each block makes exactly two attention
        # calls, self then cross, and publishes no layer index (spec 15.6: "count calls").
        name="cosmos_predict2",
        class_names=("MiniTrainDIT",),
        block_groups=(BlockGroup("blocks", "", "block"),),
        text_position=TEXT_NONE,
        tagging="count",
        calls_per_block=2,
        patch_size=lambda dm: (int(dm.patch_temporal), int(dm.patch_spatial), int(dm.patch_spatial)),
    ),
    Family(
        # Native PixArt calls optimized_attention without transformer_options and drops them in
        # its forward, so the override never reaches it (spec 15.1/15.2). The way in is one
        # object patch per block on ``blocks.{i}.attn.forward`` (see pixart_patch.py) that hands
        # the self-attention call the model call's transformer_options; cross-attention is untouched.
        name="pixart",
        class_names=("PixArtMS", "PixArt"),
        block_groups=(BlockGroup("blocks", "", "block"),),
        text_position=TEXT_NONE,
        tagging="object_patch",
        patch_size=lambda dm: _int_tuple(dm.patch_size),
    ),
)

def _family_of_class_name(class_name: str) -> Optional[Family]:
    for family in FAMILIES:
        if class_name in family.class_names:
            return family
    return None


def detect_family_of(diffusion_model) -> tuple[Optional[Family], Optional[str]]:
    """(family, matched class name): by the model's class name, else by the nearest base class
    in the table (``matched`` then differs from the model's own class name)."""
    for cls in type(diffusion_model).__mro__:
        family = _family_of_class_name(cls.__name__)
        if family is not None:
            return family, cls.__name__
    return None, None


def detect_family(model_patcher) -> Optional[Family]:
    """The family of a ModelPatcher's diffusion model, or None when we do not know it."""
    diffusion_model = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        return None
    return detect_family_of(diffusion_model)[0]


def family_by_name(name: str) -> Optional[Family]:
    for family in FAMILIES:
        if family.name == name:
            return family
    return None
