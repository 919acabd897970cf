"""reducio.embedded: the stand-in condition encoders are generated deterministically, match the hashes
recorded when the embedded models were trained, and are written atomically."""
import pytest
import torch
from safetensors.torch import load_file

from reducio import embedded


def test_image_vae_standin_is_deterministic_and_matches_its_hash(tmp_path):
    tensors = embedded.standin_tensors(embedded.IMAGE_VAE)
    assert embedded.content_hash(tensors) == embedded.IMAGE_VAE.sha256
    assert embedded.content_hash(embedded.standin_tensors(embedded.IMAGE_VAE)) == embedded.IMAGE_VAE.sha256
    assert float(tensors["vae_scale"]) == 1.0 and float(tensors["vae_shift"]) == 0.0
    path = embedded.write_standin(embedded.IMAGE_VAE, tmp_path)
    assert path == tmp_path / "vae" / embedded.IMAGE_VAE.file_name
    assert embedded.content_hash(load_file(str(path))) == embedded.IMAGE_VAE.sha256
    assert list(tmp_path.joinpath("vae").iterdir()) == [path]   # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert embedded.write_standin(embedded.IMAGE_VAE, tmp_path) == path and path.stat().st_mtime_ns == mtime


def test_text_encoder_standin_matches_its_hash():
    tensors = embedded.standin_tensors(embedded.TEXT_ENCODER)
    assert tensors["shared.weight"].shape == (32128, 768) and tensors["shared.weight"].dtype == torch.float16
    assert torch.equal(tensors["encoder.final_layer_norm.weight"], torch.ones(768, dtype=torch.float16))
    assert embedded.content_hash(tensors) == embedded.TEXT_ENCODER.sha256


def test_a_changed_file_is_replaced_and_a_changed_generator_refused(tmp_path, monkeypatch):
    path = embedded.write_standin(embedded.IMAGE_VAE, tmp_path)
    from safetensors.torch import save_file
    tampered = load_file(str(path))
    tampered["vae_scale"] = torch.tensor(2.0)
    save_file(tampered, str(path))
    embedded.write_standin(embedded.IMAGE_VAE, tmp_path)             # rewritten with the right content
    assert embedded.content_hash(load_file(str(path))) == embedded.IMAGE_VAE.sha256
    other = embedded.Standin(**{**embedded.IMAGE_VAE.__dict__, "seed": 99})
    path.unlink()
    with pytest.raises(embedded.StandinMismatch, match="differs from the one the embedded models were trained"):
        embedded.write_standin(other, tmp_path)
    assert not path.exists()


def test_the_embedded_dit_config_fits_the_embedded_encoders_and_vae_format():
    from reducio.dit import ReducioDiTConfig

    cfg = ReducioDiTConfig.from_json((embedded.MODELS_DIR / "reducio_tiny_dit_config.json").read_text())
    assert cfg.clip_condition == "null"                 # reduced conditioning: no CLIP image encoder
    assert cfg.caption_channels == 768                  # the T5-base stand-in's width
    assert (cfg.in_channels, cfg.latent_frames, cfg.vae_spatial_factor) == (16, 4, 32)  # official latent format


def test_the_shipped_sample_inputs_are_what_write_samples_renders(tmp_path):
    """workflows/inputs/ is made by ``embedded.write_samples``: a held-out pan with a sprite (H.264) and
    a content image of another photograph (PNG, exact)."""
    import numpy as np
    from PIL import Image

    from reducio.data import SyntheticClips, read_video, to_uint8_frames

    pytest.importorskip("av")
    pytest.importorskip("skimage")
    data = SyntheticClips(split="heldout", size=64, count=1000, seed=embedded.SAMPLE_SEED)
    clip, content = embedded.sample_indices()
    assert data.spec(clip).camera == "pan" and len(data.spec(clip).sprites) == 1
    assert data.spec(content).photo != data.spec(clip).photo
    rendered = to_uint8_frames(data[clip]["video"]).astype(np.float64)
    shipped, _ = read_video(embedded.SAMPLES_DIR / embedded.SAMPLE_CLIP)
    assert shipped.shape == rendered.shape == (16, 64, 64, 3)
    # H.264 is lossy and its bytes depend on the encoder build: the shipped clip measures 33.8 dB
    # against the lossless rendering
    psnr = 10 * np.log10(255.0 ** 2 / ((shipped - rendered) ** 2).mean())
    assert psnr > 30.0, psnr
    shipped_image = np.asarray(Image.open(embedded.SAMPLES_DIR / embedded.SAMPLE_CONTENT))
    assert np.array_equal(shipped_image, to_uint8_frames(data[content]["video"])[7])
    made = embedded.write_samples(tmp_path)
    assert np.array_equal(np.asarray(Image.open(made["content"])), shipped_image)
    assert read_video(made["clip"])[0].shape == shipped.shape
    assert embedded.sample_caption("up").startswith("the camera pans up over the ")
