"""Tier 2: ReducioImageToVideo with real ComfyUI CLIP-vision and VAE classes (tiny random weights)."""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def clip_vision(comfy, tmp_path_factory):
    """A real comfy.clip_vision.ClipVisionModel built from a tiny ViT config (224 px, patch 14: 256 tokens)."""
    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
              "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 4,
              "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 16,
              "torch_dtype": "float32"}
    path = tmp_path_factory.mktemp("clipvision") / "tiny_vit.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.model.named_parameters():   # comfy ops leave weights uninitialised
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:   # visible, non-trivial LayerNorm affine, so applying it (or not) shows
                p.copy_(1 + 0.5 * noise if name.endswith("weight") else 0.5 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def image_vae(channels=4):
    import comfy.sd
    import comfy.taesd.taesd

    shapes = {k: v.shape for k, v in comfy.taesd.taesd.TAESD(latent_channels=channels).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    sd["vae_scale"], sd["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)
    return comfy.sd.VAE(sd=sd)


def text_cond(seed):
    return [[torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(seed)), {}]]


def run(comfy, clip_vision, vae, **overrides):
    args = dict(positive=text_cond(0), negative=text_cond(1), clip_vision=clip_vision, vae=vae,
                content_image=torch.rand(1, 80, 96, 3), width=64, height=96, batch_size=2, latent_frames=4,
                uncond="null text", latent_downscale=32)
    args.update(overrides)
    return comfy.execute("ReducioImageToVideo", **args)


def test_conditions_latent_and_content_image(comfy, clip_vision):
    import torch.nn.functional as F

    vae = image_vae()
    positive, negative, latent, content = run(comfy, clip_vision, vae)
    assert latent["samples"].shape == (2, 16, 4, 3, 2) and latent["samples"].abs().max() == 0
    assert content.shape == (1, 96, 64, 3)
    pos, neg = positive[0][1], negative[0][1]
    assert pos["reducio_content_latent"].shape == (1, 4, 12, 8)
    assert torch.equal(pos["reducio_content_latent"], neg["reducio_content_latent"])
    assert torch.equal(pos["reducio_drop"], torch.zeros(1, 3))
    assert torch.equal(neg["reducio_drop"], torch.tensor([[1.0, 0.0, 0.0]]))
    # CLIP tokens: the model's own final LayerNorm applied to the patch tokens, CLS dropped, no crop
    tokens = pos["reducio_clip_tokens"]
    assert tokens.shape == (1, 256, 32)
    hidden = clip_vision.encode_image(content, crop=False)["last_hidden_state"]
    norm = clip_vision.model.vision_model.post_layernorm
    expected = F.layer_norm(hidden.float(), (32,), norm.weight.float(), norm.bias.float(), norm.eps)[:, 1:]
    assert torch.allclose(tokens, expected, atol=1e-5)
    assert not torch.allclose(tokens, hidden[:, 1:].float(), atol=1e-3)
    # the content latent is the raw VAE latent of the resized content image
    assert torch.allclose(pos["reducio_content_latent"], vae.encode(content), atol=1e-5)


@pytest.mark.parametrize("mode,flags", [("null all", [1.0, 1.0, 1.0]), ("negative prompt", [0.0, 0.0, 0.0])])
def test_uncond_modes(comfy, clip_vision, mode, flags):
    _, negative, _, _ = run(comfy, clip_vision, image_vae(), uncond=mode)
    assert torch.equal(negative[0][1]["reducio_drop"], torch.tensor([flags]))


def test_bad_inputs_are_explained(comfy, clip_vision):
    with pytest.raises(ValueError, match="multiples of 32"):
        run(comfy, clip_vision, image_vae(), width=80)
    with pytest.raises(ValueError, match="SD image VAE"):
        run(comfy, clip_vision, image_vae(channels=16))
    with pytest.raises(ValueError, match="content_image must be an IMAGE"):
        run(comfy, clip_vision, image_vae(), content_image=torch.rand(80, 96, 3))


@pytest.mark.parametrize("image, words", [
    (torch.full((1, 80, 96, 3), float("nan")), ["content_image", "NaN"]),
    (torch.rand(1, 80, 96, 3).index_put_((torch.tensor([0]), torch.tensor([3]), torch.tensor([4])),
                                         torch.tensor([float("inf")])), ["content_image", "NaN or infinite"]),
    (torch.rand(1, 80, 96, 3) * 255, ["content_image", "0..1", "divide by 255"]),
    (torch.rand(1, 80, 96, 3) * 2 - 1, ["content_image", "0..1", "(x + 1) / 2"]),
])
def test_content_image_values_are_checked(comfy, clip_vision, image, words):
    """NaN or 0..255 pixels used to pass through to the CLIP and VAE encoders unnoticed."""
    with pytest.raises(ValueError) as info:
        run(comfy, clip_vision, image_vae(), content_image=image)
    message = str(info.value)
    assert message.startswith("ReducioImageToVideo:")
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_content_image_overshoot_is_clamped_and_alpha_dropped(comfy, clip_vision):
    # Resampling overshoot of a few 1e-4 is clamped (as the VAE nodes do); RGBA keeps its RGB.
    image = torch.rand(1, 80, 96, 4)
    image[0, 0, 0, 0] = 1.0005
    _, _, _, content = run(comfy, clip_vision, image_vae(), content_image=image)
    assert content.max() <= 1.0 and content.shape == (1, 96, 64, 3)
