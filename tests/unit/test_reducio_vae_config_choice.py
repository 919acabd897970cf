"""Which config and which tiling policy a Reducio VAE gets (issue 8: tiling item, finding 10 sidecar).

* ``tiling=None`` follows the constructor's ``use_tiling``: the official code never tiles when its
  config says False, and always uses its tiled path when True (checked against the golden outputs
  of the official code on the 64x96 ``tiled_*`` input, tiles of 32 px);
* a config detected from the weights alone is ``use_tiling="auto"``: untiled when the memory
  estimate fits the device, tiled otherwise;
* a sidecar ``<name>.json`` never silently overrides a file's own metadata config.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import reducio.vae.memory as memory
from reducio import ReducioVAE
from reducio.validation import ConfigError
from reducio.vae import normalize_latent
from reducio.vae.checkpoint import CONFIG_METADATA_KEY, choose_config, load_model

TOL = dict(atol=1e-4, rtol=1e-4)  # golden README: float32 re-implementation vs the official code


@pytest.fixture(scope="module")
def golden(golden_dir):
    return golden_dir / "reducio"


@pytest.fixture(scope="module")
def config(golden):
    return json.loads((golden / "tiny_config.json").read_text())["constructor_kwargs"]


@pytest.fixture(scope="module")
def weights(golden):
    return load_file(golden / "tiny_weights.safetensors")


@pytest.fixture(scope="module")
def io(golden):
    return load_file(golden / "tiny_io.safetensors")


def build(config, weights, **changes):
    model = ReducioVAE(**{**config, **changes}).eval()
    model.load_state_dict(weights, strict=True)
    return model


# ------------------------------------------------------------------------------ tiling=None follows use_tiling
def test_default_call_never_tiles_when_the_config_says_use_tiling_false(config, weights, io):
    assert config["use_tiling"] is False and config["tile_sample_min_size"] == 32
    model = build(config, weights)
    # 64x96 exceeds the 40-px tile window, but the official code does not tile with use_tiling False
    untiled = normalize_latent(io["untiled_posterior_mean_same_input"])
    torch.testing.assert_close(model.encode(io["tiled_video"]), untiled, **TOL)
    torch.testing.assert_close(model.decode(untiled, io["tiled_content"]),
                               model.decode(untiled, io["tiled_content"], tiling=False), atol=0, rtol=0)


def test_default_call_tiles_when_the_config_says_use_tiling_true(config, weights, io):
    model = build(config, weights, use_tiling=True)   # the golden tiled_variant settings
    torch.testing.assert_close(model.encode(io["tiled_video"]), io["tiled_latent_det"], **TOL)
    torch.testing.assert_close(model.decode(io["tiled_latent_det"], io["tiled_content"]), io["tiled_decode_det"],
                               **TOL)


def test_auto_policy_tiles_only_when_the_memory_estimate_does_not_fit(config, weights, io, monkeypatch):
    model = build(config, weights, use_tiling="auto")
    untiled = normalize_latent(io["untiled_posterior_mean_same_input"])
    torch.testing.assert_close(model.encode(io["tiled_video"]), untiled, **TOL)   # plenty of memory here
    # a device with too little memory for the untiled encode: auto tiles (the official tiled path)
    need_untiled = model.estimate_memory("encode", 16, 64, 96, tiling=False)
    monkeypatch.setattr(memory, "available_memory", lambda device: need_untiled - 1)
    torch.testing.assert_close(model.encode(io["tiled_video"]), io["tiled_latent_det"], **TOL)
    with pytest.raises(ConfigError, match="use_tiling"):
        ReducioVAE(**{**config, "use_tiling": "sometimes"})


def test_weights_only_config_is_the_auto_policy_and_says_so(golden, tmp_path):
    keys = json.loads((golden / "keys_ft4.json").read_text())["inference"]
    shapes = {key: tuple(value[0]) for key, value in keys.items()}
    choice = choose_config(shapes, {}, tmp_path / "reducio-ft4.ckpt")
    assert choice.source == "detected" and choice.config["use_tiling"] == "auto"
    assert "official ft4" in choice.description and "auto" in choice.description


# ------------------------------------------------------------------------------ sidecar vs the file's own config
def test_sidecar_is_used_only_for_files_without_a_config(tmp_path, config, weights):
    ckpt = tmp_path / "custom.ckpt"
    torch.save({"state_dict": dict(weights)}, ckpt)
    (tmp_path / "custom.json").write_text(json.dumps(config))
    model = ReducioVAE.from_pretrained(ckpt)
    assert model.config_source == "the sidecar custom.json"

    own = tmp_path / "converted.safetensors"
    save_file(weights, str(own), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    assert ReducioVAE.from_pretrained(own).config_source == "the file's own metadata (reducio_config)"
    (tmp_path / "converted.json").write_text(json.dumps(config))   # the same config: accepted, and said
    assert "says the same" in ReducioVAE.from_pretrained(own).config_source


def test_conflicting_sidecar_is_refused_naming_both(tmp_path, config, weights):
    own = tmp_path / "converted.safetensors"
    save_file(weights, str(own), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    (tmp_path / "converted.json").write_text(json.dumps({**config, "use_tiling": True}))
    with pytest.raises(ConfigError, match=r"converted\.safetensors carries its own config.*converted\.json.*"
                                          r"use_tiling \(False vs True\).*remove or rename"):
        ReducioVAE.from_pretrained(own)
    # an explicit config= still overrides both (that is what passing it means), and says so
    assert load_model(ReducioVAE, own, config=config).config_source == "the config passed by the caller"
