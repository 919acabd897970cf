"""Safe loading, strict checks, config detection and the converter CLI, on real files."""
import hashlib
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reducio import ReducioVAE
from reducio.convert import main as convert_main
from reducio.vae import CheckpointError, official_config
from reducio.vae.blocks import sinusoid_table

REPO = Path(__file__).resolve().parents[2]
from testkit.golden import golden_path

GOLDEN = golden_path("reducio")
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_config():
    return json.loads((GOLDEN / "tiny_config.json").read_text())["constructor_kwargs"]


@pytest.fixture(scope="module")
def tiny_weights():
    return load_file(GOLDEN / "tiny_weights.safetensors")


@pytest.fixture(scope="module")
def io():
    return load_file(GOLDEN / "tiny_io.safetensors")


def training_checkpoint(weights):
    """What a Lightning training checkpoint looks like: wrapper + loss tensors + bookkeeping."""
    state = dict(weights)
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4, 4)
    return {"epoch": 3, "global_step": 1000, "state_dict": state}


def assert_tiny_parity(model, io):
    decoded = model.decode(io["latent_det"], io["content"], tiling=False)
    torch.testing.assert_close(decoded, io["decode_det"], **TOL)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ reading
def test_training_ckpt_with_wrapper_and_loss_keys_loads_strictly(tmp_path, tiny_config, tiny_weights, io):
    path = tmp_path / "tiny.ckpt"
    torch.save(training_checkpoint(tiny_weights), path)
    model = ReducioVAE.from_pretrained(path, config=tiny_config)
    assert not any(k.startswith("loss.") for k in model.state_dict())
    assert_tiny_parity(model, io)


def test_bare_state_dict_with_module_prefix(tmp_path, tiny_config, tiny_weights, io):
    path = tmp_path / "tiny.pt"
    torch.save({f"module.{k}": v for k, v in tiny_weights.items()}, path)
    assert_tiny_parity(ReducioVAE.from_pretrained(path, config=tiny_config), io)


def test_loading_in_half_precision(tmp_path, tiny_config, tiny_weights):
    path = tmp_path / "tiny.pt"
    torch.save(dict(tiny_weights), path)
    model = ReducioVAE.from_pretrained(path, config=tiny_config, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def official_shaped_checkpoint(variant, path, wrap=True, pos_embed_offset=0.0):
    """A checkpoint with the exact official keys/shapes whose tensors are zero-stride views of one
    number, so the file stays tiny; the sinusoid tables are real."""
    with torch.device("meta"):
        skeleton = ReducioVAE(**official_config(variant))
    state = {}
    for key, value in skeleton.state_dict().items():
        if key.endswith("pos_embed"):
            frames = skeleton.get_submodule(key.rsplit(".", 1)[0]).frames
            state[key] = sinusoid_table(frames, value.shape[-1])[None, :, None, :] + pos_embed_offset
        else:
            state[key] = torch.full((1,), 0.01).expand(value.shape)
    state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state} if wrap else state, path)
    return path


@pytest.mark.parametrize("variant", ["ft4", "ft2"])
def test_official_checkpoint_config_is_detected(tmp_path, variant):
    path = official_shaped_checkpoint(variant, tmp_path / f"reducio-{variant}.ckpt")
    assert path.stat().st_size < 5_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tables match: no warning
        model = ReducioVAE.from_pretrained(path)
    assert model.variant == variant
    assert model.latent_frames == (4 if variant == "ft4" else 8)
    assert model.tile_sample_min_size == 256 and model.tile_overlap_factor == 0.25


def test_modified_sinusoid_table_warns(tmp_path):
    path = official_shaped_checkpoint("ft4", tmp_path / "odd.ckpt", wrap=False, pos_embed_offset=0.5)
    with pytest.warns(UserWarning, match="pos_embed differs"):
        ReducioVAE.from_pretrained(path)


# ------------------------------------------------------------------------------ hostile / broken files
class _CreatesFileOnLoad:
    """Unpickling this calls open(path, 'w'): code execution that a safe loader must refuse."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_payload_is_real(tmp_path):
    # Sanity check of the payload itself with an unsafe loader: it does create the file.
    marker = tmp_path / "proof.txt"
    pickle.loads(pickle.dumps(_CreatesFileOnLoad(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, tiny_weights, tiny_config, container):
    marker = tmp_path / "pwned.txt"
    payload = {"state_dict": dict(tiny_weights), "callbacks": _CreatesFileOnLoad(marker)}
    path = tmp_path / "evil.ckpt"
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load evil.ckpt"):
        ReducioVAE.from_pretrained(path, config=tiny_config)
    assert not marker.exists()


def test_truncated_ckpt(tmp_path, tiny_weights, tiny_config):
    path = tmp_path / "cut.ckpt"
    torch.save(dict(tiny_weights), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ReducioVAE.from_pretrained(path, config=tiny_config)


def test_truncated_safetensors(tmp_path, tiny_weights, tiny_config):
    path = tmp_path / "cut.safetensors"
    save_file(dict(tiny_weights), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        ReducioVAE.from_pretrained(path, config=tiny_config)


@pytest.mark.parametrize("name,content", [("notes.ckpt", b"hello, this is text\n"),
                                          ("image.safetensors", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
                                          ("empty.ckpt", b"")])
def test_non_checkpoint_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        ReducioVAE.from_pretrained(path)
    assert name in str(err.value)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        ReducioVAE.from_pretrained(tmp_path / "nope.ckpt")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="unsupported file type"):
        ReducioVAE.from_pretrained(other)


def test_checkpoint_of_another_model(tmp_path):
    image_vae = {
        "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": torch.zeros(128, 128, 3, 3),
        "decoder.up.0.block.0.conv1.weight": torch.zeros(128, 128, 3, 3),
        "quant_conv.weight": torch.zeros(8, 8, 1, 1),
    }
    path = tmp_path / "sd_vae.ckpt"
    torch.save({"state_dict": image_vae}, path)
    with pytest.raises(CheckpointError, match="2-D image VAE"):
        ReducioVAE.from_pretrained(path)
    dit = tmp_path / "dit.safetensors"
    save_file({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4)}, dit)
    with pytest.raises(CheckpointError, match="diffusion-model checkpoint"):
        ReducioVAE.from_pretrained(dit)


def test_strict_error_lists_missing_and_unexpected(tmp_path, tiny_weights, tiny_config):
    state = dict(tiny_weights)
    for key in [k for k in state if k.startswith("decoder.up.0.")]:
        del state[key]
    for i in range(12):
        state[f"extra.layer{i}.weight"] = torch.zeros(1)
    path = tmp_path / "partial.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        ReducioVAE.from_pretrained(path, config=tiny_config)
    message = str(err.value)
    assert "Missing" in message and "decoder.up.0.block_1.0.conv1.weight" in message
    assert "Unexpected 12 tensors" in message and "(4 more)" in message


def test_custom_model_without_config_cannot_be_detected(tmp_path, tiny_weights):
    path = tmp_path / "tiny.safetensors"
    save_file(dict(tiny_weights), path)
    with pytest.raises(CheckpointError, match="reducio_config"):
        ReducioVAE.from_pretrained(path)


def test_bad_config_metadata(tmp_path, tiny_weights):
    path = tmp_path / "tiny.safetensors"
    save_file(dict(tiny_weights), path, metadata={"reducio_config": "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ReducioVAE.from_pretrained(path)


# ------------------------------------------------------------------------------ converter
def test_convert_cli_writes_safetensors_with_config(tmp_path, tiny_weights, io):
    src = tmp_path / "tiny.ckpt"
    torch.save(training_checkpoint(tiny_weights), src)
    out = tmp_path / "tiny.safetensors"
    rc = convert_main(["vae", str(src), str(out), "--config", str(GOLDEN / "tiny_config.json")])
    assert rc == 0 and out.is_file()
    with safe_open(str(out), "pt") as handle:
        meta = handle.metadata()
        assert set(handle.keys()) == set(tiny_weights)
    assert json.loads(meta["reducio_config"])["embed_dim"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # the config comes from the metadata now: no config argument needed
    assert_tiny_parity(ReducioVAE.from_pretrained(out), io)


def test_convert_refuses_to_overwrite_without_force(tmp_path, tiny_weights, capsys):
    src = tmp_path / "tiny.ckpt"
    torch.save(dict(tiny_weights), src)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    config = str(GOLDEN / "tiny_config.json")
    assert convert_main(["vae", str(src), str(out), "--config", config]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert convert_main(["vae", str(src), str(out), "--config", config, "--force", "--dtype", "fp16"]) == 0
    assert {v.dtype for v in load_file(out).values()} == {torch.float16}


def test_convert_failure_leaves_nothing_behind(tmp_path):
    src = tmp_path / "broken.ckpt"
    src.write_bytes(b"PK\x03\x04 broken zip")
    out = tmp_path / "out.safetensors"
    assert convert_main(["vae", str(src), str(out)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.ckpt"]


def test_convert_module_entry_point_subprocess(tmp_path, tiny_weights):
    src = tmp_path / "tiny.pt"
    torch.save(dict(tiny_weights), src)
    out = tmp_path / "tiny.safetensors"
    cmd = [sys.executable, "-m", "reducio.convert", "vae", str(src), str(out), "--config",
           str(GOLDEN / "tiny_config.json")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and out.is_file()
    first = sha(out)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr
    assert sha(out) == first


def test_convert_rejects_non_safetensors_output(tmp_path, capsys):
    assert convert_main(["vae", str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_pixart_subcommand_dispatches_to_dit_converter(capsys):
    with pytest.raises(SystemExit) as done:
        convert_main(["pixart", "--help"])
    assert done.value.code == 0
    assert "python -m reducio.convert pixart" in capsys.readouterr().out
