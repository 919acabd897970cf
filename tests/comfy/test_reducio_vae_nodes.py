"""Tier 2: the Reducio VAE nodes in a real, in-process ComfyUI (loader, encode, decode, bad input).

The model is the tiny Reducio VAE of the golden data (official key layout, 4 M parameters; spatial
factor 8 instead of 32, 8 latent channels, 4 latent frames per 16-frame clip), written as real
checkpoint files into a temporary ``models/reducio`` folder: a .safetensors with its config in the
metadata (what the converter writes) and an official-style pickled .ckpt (``state_dict`` wrapper,
``loss.*`` keys) with a sidecar config. Results are checked against the official golden outputs.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

MODEL_NAME = "reducio-ft4-fs32-attn23.safetensors"   # the name the example workflows use
CKPT_NAME = "tiny-official-layout.ckpt"
TOL = dict(atol=1e-4, rtol=1e-4)                    # the golden data's float32 tolerance


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.torch import load_file

    base = golden_dir / "reducio"
    config = json.loads((base / "tiny_config.json").read_text())["constructor_kwargs"]
    return {"config": config, "weights": load_file(str(base / "tiny_weights.safetensors")),
            "io": load_file(str(base / "tiny_io.safetensors"))}


@pytest.fixture(scope="module")
def reducio_models(comfy, golden):
    """The temporary models/reducio folder with the tiny model in two real formats and bad files."""
    from safetensors.torch import save_file

    folder = comfy.models_folder("reducio")
    save_file(golden["weights"], str(folder / MODEL_NAME),
              metadata={"reducio_config": json.dumps(golden["config"]), "format": "pt"})
    official = {"state_dict": {**golden["weights"], "loss.logvar": torch.zeros(()),
                               "loss.discriminator.main.0.weight": torch.randn(4, 3, 3, 3, 3)}}
    torch.save(official, folder / CKPT_NAME)
    (folder / CKPT_NAME.replace(".ckpt", ".json")).write_text(json.dumps(golden["config"]))
    data = (folder / MODEL_NAME).read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "encoder.down.0.block.0.conv1.weight":
               torch.zeros(8, 8, 3, 3), "decoder.up.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3)},
              str(folder / "image-vae.safetensors"))
    return folder


@pytest.fixture(scope="module")
def vae(comfy, reducio_models):
    (handle,) = comfy.execute("ReducioVAELoader", checkpoint=MODEL_NAME, dtype="fp32")
    return handle


def image_from_video(video: torch.Tensor) -> torch.Tensor:
    """Official [1, 3, T, H, W] in -1..1 -> ComfyUI IMAGE [T, H, W, 3] in 0..1."""
    return ((video[0].permute(1, 2, 3, 0) + 1) / 2).contiguous()


def smooth_frames(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random IMAGE clip (upsampled noise), values in 0..1."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, count, max(2, height // 8), max(2, width // 8), generator=g)
    video = torch.nn.functional.interpolate(coarse, size=(count, height, width), mode="trilinear")
    return video[0].permute(1, 2, 3, 0).contiguous()


# ------------------------------------------------------------------------------------- loader
def test_loader_lists_checkpoints_and_loads_into_a_model_patcher(comfy, vae, reducio_models):
    import comfy.model_patcher as model_patcher

    schema = comfy.node("ReducioVAELoader").define_schema()
    options = {inp.id: inp for inp in schema.inputs}["checkpoint"].options
    assert MODEL_NAME in options and CKPT_NAME in options
    assert isinstance(vae.patcher, model_patcher.ModelPatcher)
    assert vae.patcher.model is vae.model
    assert (vae.geometry.channels, vae.geometry.frames_per_clip, vae.geometry.spatial_factor) == (8, 4, 8)
    assert all(p.dtype == torch.float32 for p in vae.model.parameters())


def test_loader_reads_official_ckpt_layout_safely(comfy, vae, reducio_models):
    # state_dict wrapper + loss.* training keys, read with weights_only=True; same weights as the
    # safetensors file.
    (from_ckpt,) = comfy.execute("ReducioVAELoader", checkpoint=CKPT_NAME, dtype="fp32")
    reference = vae.model.state_dict()
    loaded = from_ckpt.model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_loader_dtype_choice(comfy, reducio_models):
    (half,) = comfy.execute("ReducioVAELoader", checkpoint=MODEL_NAME, dtype="bf16")
    assert half.dtype == torch.bfloat16
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    (auto,) = comfy.execute("ReducioVAELoader", checkpoint=MODEL_NAME, dtype="auto")
    assert auto.dtype == torch.float32        # --cpu: ComfyUI's vae_dtype picks fp32


@pytest.mark.parametrize("name, expected", [
    ("truncated.safetensors", "truncated.safetensors"),
    ("image-vae.safetensors", "image VAE"),
    ("missing.safetensors", "not found"),
])
def test_loader_rejects_bad_files_with_a_clear_error(comfy, reducio_models, name, expected):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        comfy.execute("ReducioVAELoader", checkpoint=name, dtype="fp32")
    assert expected in str(info.value)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_loader_never_runs_code_from_a_pickle(comfy, reducio_models, tmp_path):
    marker = tmp_path / "code_was_executed"
    payload = _RunsCodeWhenUnpickled()
    payload.marker = str(marker)
    path = reducio_models / "malicious.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": payload}, handle, protocol=2)
    with pytest.raises(ValueError) as info:
        comfy.execute("ReducioVAELoader", checkpoint="malicious.ckpt", dtype="fp32")
    assert not marker.exists(), "the loader executed code embedded in a pickle"
    assert "malicious.ckpt" in str(info.value)


# ------------------------------------------------------------------------------------- encode / decode
def test_encode_and_decode_match_the_official_model(comfy, vae, golden):
    io_ = golden["io"]
    frames = image_from_video(io_["video"])
    latent, content = comfy.execute("ReducioVAEEncode", vae=vae, frames=frames, mode="mean", seed=0,
                                    tiling="off", frame_handling="error")
    assert latent["samples"].shape == (1, 8, 4, 8, 8)
    torch.testing.assert_close(latent["samples"], io_["latent_det"], **TOL)
    torch.testing.assert_close(content, frames[7:8])      # the official content frame: index 7
    (decoded,) = comfy.execute("ReducioVAEDecode", vae=vae, motion_latent={"samples": io_["latent_det"]},
                               content=content, tiling="off")
    assert decoded.shape == (16, 64, 64, 3)
    expected = image_from_video(io_["decode_det"].clamp(-1, 1))
    torch.testing.assert_close(decoded, expected, **TOL)


def test_auto_tiling_reproduces_the_official_tiled_encode(comfy, vae, golden):
    # 64x96 frames exceed the tiny model's 40-px tile window: 'auto' tiles like the official code.
    io_ = golden["io"]
    records = []
    import comfy.utils as comfy_utils

    previous = comfy_utils.PROGRESS_BAR_HOOK
    comfy_utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: records.append((value, total)))
    try:
        latent, content = comfy.execute("ReducioVAEEncode", vae=vae, frames=image_from_video(io_["tiled_video"]),
                                        mode="mean", seed=0, tiling="auto", frame_handling="error")
    finally:
        comfy_utils.set_progress_bar_global_hook(previous)
    torch.testing.assert_close(latent["samples"], io_["tiled_latent_det"], **TOL)
    # One progress step per tile (2 x 3 tiles), ending at the total.
    assert records and records[-1] == (6, 6)
    assert [value for value, _ in records] == sorted(value for value, _ in records)


def test_long_odd_sized_video_survives_save_and_load_latent(comfy, vae):
    frames = smooth_frames(32, 36, 44)                           # 2 clips, sides not multiples of 8
    latent, content = comfy.execute("ReducioVAEEncode", vae=vae, frames=frames, mode="mean", seed=0,
                                    tiling="off", frame_handling="error")
    # Two clips concatenated along time, padded size ceil(36/8) x ceil(44/8); a content frame per clip.
    assert latent["samples"].shape == (1, 8, 8, 5, 6)
    torch.testing.assert_close(content, frames[[7, 23]])
    first_clip, _ = comfy.execute("ReducioVAEEncode", vae=vae, frames=frames[:16], mode="mean", seed=0,
                                  tiling="off", frame_handling="error")
    torch.testing.assert_close(latent["samples"][:, :, :4], first_clip["samples"])

    # Core SaveLatent -> LoadLatent (which keeps only 'samples'): the layout lives in the shape.
    save_latent = comfy.node("SaveLatent")()
    result = save_latent.save(latent, filename_prefix="reducio_test/motion")
    saved = result["ui"]["latents"][0]
    source = comfy.output_dir / saved["subfolder"] / saved["filename"]
    shutil.copy(source, comfy.input_dir / "reducio_test_motion.latent")
    (loaded,) = comfy.execute("LoadLatent", latent="reducio_test_motion.latent")
    assert torch.equal(loaded["samples"], latent["samples"])

    (decoded,) = comfy.execute("ReducioVAEDecode", vae=vae, motion_latent=loaded, content=content, tiling="off")
    assert decoded.shape == (32, 36, 44, 3)                     # cropped back to the content size
    assert 0.0 <= decoded.min() and decoded.max() <= 1.0
    # The core video nodes accept the decoded frames.
    (video,) = comfy.execute("CreateVideo", images=decoded, fps=16.0)
    assert video.get_dimensions() == (44, 36)


def test_sampling_is_seeded_and_differs_from_the_mean(comfy, vae):
    frames = smooth_frames(16, 32, 32, seed=3)
    run = lambda mode, seed: comfy.execute("ReducioVAEEncode", vae=vae, frames=frames, mode=mode, seed=seed,
                                           tiling="off", frame_handling="error")[0]["samples"]
    first, again, other, mean = run("sample", 7), run("sample", 7), run("sample", 8), run("mean", 7)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, mean)
    # Normalised like the official latent: zero mean, unit variance per sample.
    assert abs(first.mean().item()) < 1e-4 and abs(first.std(unbiased=False).item() - 1) < 1e-3


def test_sample_mode_reproduces_the_official_seeded_sample(comfy, vae, golden):
    # The official forward after torch.manual_seed(777) draws exactly this latent (CPU generator).
    io_ = golden["io"]
    latent, _ = comfy.execute("ReducioVAEEncode", vae=vae, frames=image_from_video(io_["video"]), mode="sample",
                              seed=777, tiling="off", frame_handling="error")
    torch.testing.assert_close(latent["samples"], io_["latent_sample_seed777"], **TOL)


def test_frame_handling_pad_and_trim(comfy, vae):
    frames = smooth_frames(20, 16, 16)
    padded, content = comfy.execute("ReducioVAEEncode", vae=vae, frames=frames, mode="mean", seed=0,
                                    tiling="off", frame_handling="pad_repeat_last")
    assert padded["samples"].shape[2] == 8 and content.shape[0] == 2
    trimmed, content = comfy.execute("ReducioVAEEncode", vae=vae, frames=frames, mode="mean", seed=0,
                                     tiling="off", frame_handling="trim")
    assert trimmed["samples"].shape[2] == 4 and content.shape[0] == 1
    torch.testing.assert_close(trimmed["samples"], padded["samples"][:, :, :4])


def test_one_content_frame_is_used_for_every_clip(comfy, vae):
    latent = torch.randn(2, 8, 4, 2, 2)                         # a batch of two generated clips
    content = smooth_frames(1, 16, 16)
    (decoded,) = comfy.execute("ReducioVAEDecode", vae=vae, motion_latent={"samples": latent},
                               content=content, tiling="off")
    assert decoded.shape == (32, 16, 16, 3)
    (second,) = comfy.execute("ReducioVAEDecode", vae=vae, motion_latent={"samples": latent[1:]},
                              content=content, tiling="off")
    torch.testing.assert_close(decoded[16:], second, **TOL)


def test_out_of_memory_falls_back_to_tiles(comfy, vae, golden):
    # Fault injection at the device boundary: the untiled run raises ComfyUI's OOM exception, as a
    # too-small GPU would; the node must retry tiled and give the tiled result.
    import comfy.model_management as mm

    io_ = golden["io"]
    frames = image_from_video(io_["tiled_video"])
    real_encode = vae.model.encode
    calls = []

    def encode_that_runs_out_of_memory(video, **kwargs):
        calls.append(kwargs["tiling"])
        if not kwargs["tiling"]:
            raise mm.OOM_EXCEPTION("simulated out of memory")
        return real_encode(video, **kwargs)

    vae.model.encode = encode_that_runs_out_of_memory
    try:
        latent, _ = comfy.execute("ReducioVAEEncode", vae=vae, frames=frames, mode="mean", seed=0,
                                  tiling="off", frame_handling="error")
    finally:
        del vae.model.encode
    assert calls == [False, True]
    torch.testing.assert_close(latent["samples"], io_["tiled_latent_det"], **TOL)


def test_cancel_interrupts_the_run(comfy, vae):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            comfy.execute("ReducioVAEEncode", vae=vae, frames=smooth_frames(16, 16, 16), mode="mean", seed=0,
                          tiling="off", frame_handling="error")
    finally:
        mm.interrupt_current_processing(False)


def test_model_is_managed_by_comfyui(comfy, vae):
    import comfy.model_management as mm

    comfy.execute("ReducioVAEEncode", vae=vae, frames=smooth_frames(16, 16, 16), mode="mean", seed=0,
                  tiling="off", frame_handling="error")
    assert any(loaded.model is vae.patcher for loaded in mm.current_loaded_models)


# ------------------------------------------------------------------------------------- bad input
def _encode(comfy, vae, frames, **overrides):
    inputs = dict(vae=vae, frames=frames, mode="mean", seed=0, tiling="off", frame_handling="error")
    inputs.update(overrides)
    return comfy.execute("ReducioVAEEncode", **inputs)


def _decode(comfy, vae, samples, content, tiling="off"):
    return comfy.execute("ReducioVAEDecode", vae=vae, motion_latent={"samples": samples}, content=content,
                         tiling=tiling)


@pytest.mark.parametrize("frames, words", [
    (smooth_frames(20, 16, 16), ["20 frames", "multiple of 16", "pad_repeat_last", "trim"]),
    (smooth_frames(5, 16, 16), ["5 frames", "pad_repeat_last", "needs at least 16"]),
    (torch.rand(16, 16, 16, 4), ["3 channels", "got 4", "alpha"]),
    (torch.rand(16, 16, 16, 1), ["3 channels", "got 1"]),
    (torch.rand(16, 16, 16, 3) * 2 - 1, ["0..1", "(x + 1) / 2"]),
    (torch.rand(16, 16, 16, 3) * 255, ["0..1", "divide by 255"]),
    (torch.rand(16, 16, 3), ["16 frames"]),                      # one [H, W, C] frame: too few
])
def test_encode_rejects_bad_frames(comfy, vae, frames, words):
    with pytest.raises(ValueError) as info:
        _encode(comfy, vae, frames)
    message = str(info.value)
    assert message.startswith("ReducioVAEEncode:")
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


@pytest.mark.parametrize("samples, content, words", [
    (torch.zeros(1, 4, 8, 8), smooth_frames(1, 64, 64), ["5-D", "image latent"]),
    (torch.zeros(1, 16, 4, 2, 2), smooth_frames(1, 16, 16), ["8-channel", "16 channels"]),
    (torch.zeros(1, 8, 6, 2, 2), smooth_frames(1, 16, 16), ["4 latent frames per", "has 6"]),
    (torch.zeros(1, 8, 4, 2, 2), smooth_frames(1, 32, 16), ["content image is 16x32", "latent is 2x2"]),
    (torch.zeros(1, 8, 8, 2, 2), smooth_frames(3, 16, 16), ["2 clip(s)", "3 content frames"]),
    (torch.full((1, 8, 4, 2, 2), float("nan")), smooth_frames(1, 16, 16), ["NaN"]),
])
def test_decode_rejects_mismatched_inputs(comfy, vae, samples, content, words):
    with pytest.raises(ValueError) as info:
        _decode(comfy, vae, samples, content)
    message = str(info.value)
    assert message.startswith("ReducioVAEDecode:")
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_nodes_reject_a_stock_vae_in_the_reducio_socket(comfy):
    with pytest.raises(ValueError, match="Load Reducio VAE"):
        comfy.execute("ReducioVAEEncode", vae=object(), frames=smooth_frames(16, 16, 16), mode="mean", seed=0,
                      tiling="off", frame_handling="error")


def test_schema_tooltips_and_categories(comfy):
    for node_id in ("ReducioVAELoader", "ReducioVAEEncode", "ReducioVAEDecode"):
        schema = comfy.node(node_id).define_schema()
        assert schema.category.startswith("Reducio")
        assert all(inp.tooltip for inp in schema.inputs), node_id
        assert all(out.tooltip for out in schema.outputs), node_id


# ------------------------------------------------------------------------------------- memory
class LargeAllocations:
    """Records every tensor that an aten op creates with at least ``threshold`` bytes of new storage
    (views and in-place results share their input's storage and are not counted). Deterministic:
    it sees the operations themselves, not the allocator or the process's memory."""

    def __init__(self, threshold: int):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        record = self.sizes = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen \
                            and t.untyped_storage().nbytes() >= threshold:
                        record.append((str(func), t.untyped_storage().nbytes()))
                return out

        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.parametrize("count, height, width, handling", [
    (512, 16, 16, "error"),             # was 1 full copy (the -1..1 video)
    (512, 12, 20, "error"),             # was 2 (+ the video padded to multiples of 8)
    (500, 12, 20, "pad_repeat_last"),   # was 3 (+ the frames completed to whole clips)
])
def test_encode_never_copies_the_whole_video(comfy, vae, count, height, width, handling):
    """32 clips: one clip's tensors (the model's largest activation included) stay well below the
    whole video's size, so any allocation of 90 % of the video or more is a copy of the video."""
    frames = smooth_frames(count, height, width, seed=5)
    expected, _ = _encode(comfy, vae, frames[:16], frame_handling="error")
    with LargeAllocations(int(0.9 * frames.numel() * frames.element_size())) as big:
        latent, content = _encode(comfy, vae, frames, frame_handling=handling)
    assert big.sizes == [], f"full-video copies: {big.sizes}"
    assert latent["samples"].shape[2] == 32 * 4 and content.shape[0] == 32
    torch.testing.assert_close(latent["samples"][:, :, :4], expected["samples"])
    if handling == "pad_repeat_last":   # the short last clip: its 4 frames, then the last one repeated
        last = torch.cat([frames[496:], frames[-1:].expand(12, -1, -1, -1)])
        alone, last_content = _encode(comfy, vae, last, frame_handling="error")
        torch.testing.assert_close(latent["samples"][:, :, -4:], alone["samples"], **TOL)
        torch.testing.assert_close(content[-1:], last_content)


def _activation_estimate(comfy, vae, height, width, tiled, tile_size=None):
    """The reducio package's estimate for one 16-frame clip, as the node computes it."""
    import importlib

    reducio_vae = importlib.import_module(comfy.pack_module.__name__ + ".reducio.vae")
    return reducio_vae.estimate_memory(vae.model, "encode", frames=16, height=height, width=width,
                                        dtype=torch.float32, tiling=tiled, tile_size=tile_size,
                                        include_weights=False)


def test_encode_refuses_up_front_on_cpu_when_the_estimate_exceeds_free_memory(comfy, vae, monkeypatch):
    # Fault injection at the device boundary: ComfyUI reports less free memory than the run needs
    # (a real shortage here would invoke the operating system's OOM killer instead of an error).
    import comfy.model_management as mm

    frames = smooth_frames(32, 64, 96)
    untiled = _activation_estimate(comfy, vae, 64, 96, tiled=False)
    smallest_tiles = _activation_estimate(comfy, vae, 64, 96, tiled=True, tile_size=32)
    assert smallest_tiles < untiled
    calls = []
    real_encode = vae.model.encode

    def counting_encode(*args, **kwargs):
        calls.append(kwargs.get("tiling"))
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(vae.model, "encode", counting_encode)
    monkeypatch.setattr(mm, "get_free_memory", lambda *args, **kwargs: (untiled + smallest_tiles) // 2)
    with pytest.raises(MemoryError) as info:
        _encode(comfy, vae, frames, tiling="off")
    message = str(info.value)
    for words in ("ReducioVAEEncode:", "32 frames of 96x64", "GiB", "available", "tiling to 'auto' or 'on'"):
        assert words in message, f"{words!r} missing from: {message}"
    assert calls == [], "nothing may run before the refusal"
    # 'auto' picks tiles that fit instead of refusing ...
    latent, _ = _encode(comfy, vae, frames, tiling="auto")
    assert calls and all(calls) and latent["samples"].shape == (1, 8, 8, 8, 12)
    # ... and when not even the smallest tiles fit, it refuses too, naming smaller or fewer frames.
    calls.clear()
    monkeypatch.setattr(mm, "get_free_memory", lambda *args, **kwargs: smallest_tiles // 2)
    with pytest.raises(MemoryError, match="smaller frames") as info:
        _encode(comfy, vae, frames, tiling="auto")
    assert "32-px tiles" in str(info.value) and calls == []


# ------------------------------------------------------------------------------------- config source (issue 8)
def _loader_summary(comfy, name):
    result = comfy.node("ReducioVAELoader").execute(checkpoint=name, dtype="fp32")
    return result.result[0], result.ui.as_dict()["text"][0]


def test_loader_says_which_config_and_tiling_policy_it_used(comfy, reducio_models):
    handle, text = _loader_summary(comfy, MODEL_NAME)
    assert "config from the file's own metadata (reducio_config)" in text and "use_tiling False" in text
    handle, text = _loader_summary(comfy, CKPT_NAME)
    assert "config from the sidecar tiny-official-layout.json" in text


def test_loader_refuses_a_sidecar_that_contradicts_the_files_own_config(comfy, reducio_models, golden):
    from safetensors.torch import save_file

    name = "with-conflicting-sidecar.safetensors"
    save_file(golden["weights"], str(reducio_models / name), metadata={"reducio_config": json.dumps(golden["config"])})
    (reducio_models / name.replace(".safetensors", ".json")).write_text(
        json.dumps({**golden["config"], "use_tiling": True}))
    try:
        with pytest.raises(ValueError, match=r"carries its own config.*with-conflicting-sidecar\.json.*use_tiling"):
            comfy.execute("ReducioVAELoader", checkpoint=name, dtype="fp32")
    finally:
        (reducio_models / name).unlink()
        (reducio_models / name.replace(".safetensors", ".json")).unlink()


def test_loader_refuses_a_hostile_config_before_building(comfy, reducio_models, golden):
    from safetensors.torch import save_file

    name = "hostile-config.safetensors"
    hostile = {**golden["config"], "ddconfig": {**golden["config"]["ddconfig"], "num_res_blocks": 3000}}
    save_file(golden["weights"], str(reducio_models / name), metadata={"reducio_config": json.dumps(hostile)})
    try:
        with pytest.raises(ValueError, match=r"ddconfig\.num_res_blocks = 3000"):
            comfy.execute("ReducioVAELoader", checkpoint=name, dtype="fp32")
    finally:
        (reducio_models / name).unlink()
