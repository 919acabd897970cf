"""Tier 3: the shipped Reducio-DiT workflows (API format) run through a real headless ComfyUI server.

Model files are stand-ins in the real formats, written under the workflow's own file names (see
reducio_dit_standins.py for what each one is); the graphs are the shipped ones with only the video
size / Reducio VAE cell size adapted to the tiny golden Reducio VAE.
"""
from pathlib import Path

import pytest
from testkit.server import PromptFailed
from testkit.workflows import API_DIR, load

from testkit import reducio_dit_standins as standins  # noqa: E402

I2V = API_DIR / "reducio_dit_image_to_video.json"
T2V = API_DIR / "reducio_dit_text_to_video.json"


@pytest.fixture(scope="module")
def models(comfy, comfy_server, golden_dir, comfy_install):
    # `comfy` imports ComfyUI in this process: the stand-ins are built from ComfyUI's own classes
    standins.write_all(comfy_server.models_dir, comfy_server.input_dir, golden_dir, comfy_install.root)
    return comfy_server


def _video_frames(path: Path):
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames


def _check_video(server, entry, prefix):
    videos = [p for p in server.output_files(entry) if p.suffix == ".mp4" and p.name.startswith(prefix.split("/")[-1])]
    assert len(videos) == 1, server.output_files(entry)
    frames = _video_frames(videos[0])
    assert len(frames) == 16                     # one Reducio clip: 16 frames at 16 fps
    assert frames[0].shape[:2] == (64, 64)
    assert any(f.std() > 0 for f in frames)      # a real decode, not a blank video
    return frames


def test_image_to_video_workflow_runs(models):
    prompt = standins.adapt_prompt_to_standins(load(I2V))
    entry = models.run_prompt(prompt, timeout=900)
    _check_video(models, entry, "reducio/i2v")


def test_text_to_video_workflow_runs(models):
    prompt = standins.adapt_prompt_to_standins(load(T2V), steps=4)
    entry = models.run_prompt(prompt, timeout=900)
    _check_video(models, entry, "reducio/t2v")
    pngs = [p for p in models.output_files(entry) if p.suffix == ".png"]
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0   # the stage-1 content image


def test_video_size_not_multiple_of_32_fails_with_a_clear_message(models):
    prompt = standins.adapt_prompt_to_standins(load(I2V), steps=1)
    for node in prompt.values():
        if node["class_type"] == "ReducioImageToVideo":
            node["inputs"].update(width=72, height=64)
    with pytest.raises(PromptFailed, match="multiples of 32"):
        models.run_prompt(prompt, timeout=300)


def test_pixart_checkpoint_in_the_dit_loader_names_the_converter(models):
    import torch
    from safetensors.torch import save_file

    save_file({"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2), "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
               "pos_embed": torch.zeros(1, 4, 8)}, str(models.models_dir / "reducio" / "PixArt-XL-2-512x512.safetensors"))
    prompt = standins.adapt_prompt_to_standins(load(I2V), steps=1)
    for node in prompt.values():
        if node["class_type"] == "ReducioDiTLoader":
            node["inputs"]["dit_name"] = "PixArt-XL-2-512x512.safetensors"
    with pytest.raises(PromptFailed, match="reducio.convert pixart"):
        models.run_prompt(prompt, timeout=300)
