"""Reducio-DiT checkpoints: safetensors + config metadata, strict loading, clear errors (spec §6)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reducio.dit import CheckpointError, ReducioDiT, get_config, load_checkpoint, read_checkpoint, save_checkpoint


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    model = ReducioDiT(get_config("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_round_trip_keeps_weights_config_and_outputs(tiny, tmp_path):
    path = tmp_path / "dit.safetensors"
    save_checkpoint(tiny, path)
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "reducio-dit" and meta["format_version"] == "1"
    assert json.loads(meta["config"])["depth"] == 4
    loaded = load_checkpoint(path)
    assert loaded.config == tiny.config
    for key, value in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 16, 4, 8, 8)
    args = (x, torch.tensor([5.0]), torch.randn(1, 8, 32), None, torch.randn(1, 4, 32), torch.randn(1, 4, 32, 32))
    with torch.no_grad():
        assert torch.allclose(loaded(*args), tiny.eval()(*args), rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["dit.safetensors"]  # no temporary file left


def test_half_precision_storage_and_cast(tiny, tmp_path):
    path = tmp_path / "dit_bf16.safetensors"
    save_checkpoint(tiny, path, dtype=torch.bfloat16)
    assert load_checkpoint(path).x_embedder.proj.weight.dtype == torch.bfloat16
    assert load_checkpoint(path, dtype=torch.float32).x_embedder.proj.weight.dtype == torch.float32


def test_convert_dit_restores_in_bf16_and_refuses_to_overwrite(tiny, tmp_path, capsys):
    from reducio.convert import main

    source, target = tmp_path / "ema.safetensors", tmp_path / "dit_bf16.safetensors"
    save_checkpoint(tiny, source)
    assert main(["dit", str(source), str(target), "--dtype", "bf16"]) == 0
    converted = load_checkpoint(target)
    assert converted.config == tiny.config
    for key, value in tiny.state_dict().items():
        assert converted.state_dict()[key].dtype == torch.bfloat16
        assert torch.equal(converted.state_dict()[key], value.to(torch.bfloat16)), key
    assert target.stat().st_size < 0.55 * source.stat().st_size
    assert main(["dit", str(source), str(target), "--dtype", "bf16"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["dit", str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors"), "--dtype", "bf16"]) == 2


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.9.extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path),
              metadata={"format": "reducio-dit", "format_version": "1", "config": tiny.config.to_json()})
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): blocks.1.mlp.fc2.bias.*1 unexpected key\(s\): "
                                              r"blocks.9.extra.weight"):
        load_checkpoint(path)


def test_config_that_does_not_match_the_weights(tiny, tmp_path):
    path = tmp_path / "mismatch.safetensors"
    wrong = get_config("tiny", hidden_size=128)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path),
              metadata={"format": "reducio-dit", "format_version": "1", "config": wrong.to_json()})
    with pytest.raises(CheckpointError, match="82 tensor\\(s\\) do not match the config.*blocks.0.attn.proj.weight: file \\[64, 64\\] "
                                              "vs config \\[128, 128\\]"):
        read_checkpoint(path)
    # an explicit config overrides the metadata
    assert read_checkpoint(path, config=tiny.config)[1] == tiny.config


def test_no_config_in_metadata(tiny, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="no Reducio-DiT config in its safetensors metadata"):
        load_checkpoint(path)
    assert load_checkpoint(path, config=tiny.config).config == tiny.config


def test_pixart_checkpoint_points_to_the_converter(tmp_path):
    pixart = {"x_embedder.proj.weight": torch.zeros(64, 4, 2, 2), "pos_embed": torch.zeros(1, 16, 64),
              "blocks.0.attn.qkv.weight": torch.zeros(192, 64)}
    path = tmp_path / "PixArt-XL-2-512x512.safetensors"
    save_file(pixart, str(path))
    with pytest.raises(CheckpointError, match="PixArt-alpha checkpoint.*python -m reducio.convert pixart"):
        load_checkpoint(path)
    diffusers = {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(4, 4)}
    save_file(diffusers, str(path))
    with pytest.raises(CheckpointError, match="diffusers PixArt transformer.*reducio.convert pixart"):
        load_checkpoint(path)


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "PixArt-XL-2-1024-MS.pth"
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(2)}}, str(path))
    with pytest.raises(CheckpointError, match="pickled PyTorch file.*safetensors only.*reducio.convert pixart"):
        load_checkpoint(path)


def test_reducio_vae_file_names_the_vae_loader(tmp_path):
    path = tmp_path / "reducio-ft4.safetensors"
    save_file({"encoder_3d.conv_in.weight": torch.zeros(2), "decoder.conv_in.weight": torch.zeros(2)}, str(path),
              metadata={"format": "reducio-vae"})
    with pytest.raises(CheckpointError, match="Reducio VAE.*ReducioVAELoader"):
        load_checkpoint(path)


def test_not_a_safetensors_file_and_missing_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_failed_save_leaves_existing_file_untouched(tiny, tmp_path):
    path = tmp_path / "dit.safetensors"
    save_checkpoint(tiny, path)
    before = path.read_bytes()
    bad = dict(tiny.state_dict())
    del bad["final_layer.linear.bias"]
    with pytest.raises(CheckpointError):
        save_checkpoint(bad, path, config=tiny.config)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["dit.safetensors"]
