"""Hostile and malformed checkpoint files (issue 8, findings 1, 6, 7, 8, 10): every one is refused with
one clear error, before the model is built or the file's claimed sizes are allocated.

"Before building" is observed with a spy on the model constructors that fails the test if a model
is ever constructed from a config the file's tensors do not back; nothing is timed.
"""
import json
import os
import random
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from reducio import ReducioDiT, ReducioVAE
from reducio.convert import main as convert_main
from reducio.dit import get_config, load_checkpoint, read_checkpoint, save_checkpoint
from reducio.dit.convert_pixart import ConversionError, read_source
from reducio.validation import CheckpointError, ConfigError
from reducio.vae.checkpoint import CONFIG_METADATA_KEY, load_model


def tiny_pixart(width=64, depth=2, caption=32, tokens=8):
    """The keys and shapes of a PixArt-alpha checkpoint (original layout) at a tiny width."""
    g = torch.Generator().manual_seed(0)
    shapes = {"x_embedder.proj.weight": (width, 4, 2, 2), "t_embedder.mlp.0.weight": (width, 256),
              "t_embedder.mlp.2.weight": (width, width), "t_block.1.weight": (6 * width, width),
              "y_embedder.y_proj.fc1.weight": (width, caption), "y_embedder.y_proj.fc2.weight": (width, width)}
    for i in range(depth):
        for name, shape in (("attn.qkv", (3 * width, width)), ("attn.proj", (width, width)),
                            ("cross_attn.q_linear", (width, width)), ("cross_attn.kv_linear", (2 * width, width)),
                            ("cross_attn.proj", (width, width)), ("mlp.fc1", (4 * width, width)),
                            ("mlp.fc2", (width, 4 * width))):
            shapes[f"blocks.{i}.{name}.weight"] = shape
    sd = {}
    for key, shape in shapes.items():
        sd[key] = torch.randn(shape, generator=g)
        sd[key.replace(".weight", ".bias")] = torch.randn(shape[0], generator=g)
    sd.update({f"blocks.{i}.scale_shift_table": torch.randn(6, width, generator=g) for i in range(depth)})
    sd["y_embedder.y_embedding"] = torch.randn(tokens, caption, generator=g)
    sd["final_layer.scale_shift_table"] = torch.randn(2, width, generator=g)
    return sd


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def vae_config(golden_dir):
    return json.loads((golden_dir / "reducio" / "tiny_config.json").read_text())["constructor_kwargs"]


@pytest.fixture(scope="module")
def vae_weights(golden_dir):
    return load_file(golden_dir / "reducio" / "tiny_weights.safetensors")


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory, vae_weights, vae_config):
    """The tiny VAE as a .safetensors file with its config in the metadata."""
    path = tmp_path_factory.mktemp("vae") / "tiny.safetensors"
    save_file(vae_weights, str(path), metadata={CONFIG_METADATA_KEY: json.dumps(vae_config)})
    return path


@pytest.fixture(scope="module")
def dit_model():
    torch.manual_seed(0)
    return ReducioDiT(get_config("tiny"))


def write_vae(path, weights, config_text):
    save_file(weights, str(path), metadata={CONFIG_METADATA_KEY: config_text})
    return path


def write_dit(path, model, config_text):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "reducio-dit", "format_version": "1", "config": config_text})
    return path


def _int_at_most(value, bound):
    return not isinstance(value, int) or isinstance(value, bool) or value <= bound


@pytest.fixture()
def no_unbacked_builds(monkeypatch):
    """Spy on both constructors: building a model whose size the file's tensors do not back fails the test."""
    vae_init, dit_init = ReducioVAE.__init__, ReducioDiT.__init__

    def guarded_vae(self, ddconfig, ddconfig_2d, embed_dim, **kwargs):
        sizes = [(ddconfig, "num_res_blocks", 16), (ddconfig, "temp_res", 1024), (ddconfig_2d, "num_res_blocks", 16)]
        for section, key, bound in sizes:
            if isinstance(section, dict) and not _int_at_most(section.get(key), bound):
                raise AssertionError(f"ReducioVAE built with {key}={section[key]} before the config was checked")
        if isinstance(ddconfig, dict) and isinstance(ddconfig.get("ch_mult"), list) and len(ddconfig["ch_mult"]) > 8:
            raise AssertionError("ReducioVAE built with a 50-level ch_mult before the config was checked")
        vae_init(self, ddconfig, ddconfig_2d, embed_dim, **kwargs)

    def guarded_dit(self, config, *args, **kwargs):
        if not _int_at_most(config.depth, 64) or not _int_at_most(config.hidden_size, 4096):
            raise AssertionError(f"ReducioDiT built with depth {config.depth}, hidden {config.hidden_size} before "
                                 "the config was checked against the file")
        dit_init(self, config, *args, **kwargs)

    monkeypatch.setattr(ReducioVAE, "__init__", guarded_vae)
    monkeypatch.setattr(ReducioDiT, "__init__", guarded_dit)


def mutate(config, path, value):
    out = json.loads(json.dumps(config))
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


# ------------------------------------------------------------------------------ finding 1: size bombs in the config
@pytest.mark.parametrize("path, value, field", [
    (("ddconfig", "num_res_blocks"), 3000, "ddconfig.num_res_blocks"),
    (("ddconfig", "temp_res"), 2 ** 28, "ddconfig.temp_res"),
    (("ddconfig", "ch_mult"), [1] * 50, "ddconfig.ch_mult"),
    (("ddconfig_2d", "num_res_blocks"), 3000, "ddconfig_2d.num_res_blocks"),
    (("ddconfig", "ch"), 10 ** 6, "ddconfig.ch"),
])
def test_vae_size_bomb_in_metadata_is_refused_before_building(tmp_path, vae_weights, vae_config, no_unbacked_builds,
                                                              path, value, field):
    hostile = write_vae(tmp_path / "hostile.safetensors", vae_weights, json.dumps(mutate(vae_config, path, value)))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ReducioVAE.from_pretrained(hostile)
    # the same config handed in by the caller (the loader node's sidecar path) is checked the same way
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_model(ReducioVAE, hostile, config=mutate(vae_config, path, value))


def test_vae_config_that_contradicts_the_tensors_names_field_and_file(tmp_path, vae_weights, vae_config,
                                                                      no_unbacked_builds):
    # within the bounds, but the file holds 1 ResNet block per level: the header says so before any build
    hostile = write_vae(tmp_path / "two_blocks.safetensors", vae_weights,
                        json.dumps(mutate(vae_config, ("ddconfig", "num_res_blocks"), 12)))
    with pytest.raises(ConfigError, match=r"ddconfig\.num_res_blocks = 12.*tensors.*1"):
        ReducioVAE.from_pretrained(hostile)
    hostile = write_vae(tmp_path / "frames.safetensors", vae_weights,
                        json.dumps(mutate(vae_config, ("ddconfig", "temp_res"), 64)))
    with pytest.raises(ConfigError, match=r"ddconfig\.temp_res = 64.*pos_embed.*4 frames"):
        ReducioVAE.from_pretrained(hostile)


@pytest.mark.parametrize("field, value, message", [
    ("depth", 20000, r"depth = 20000"),
    ("depth", 100000, r"depth = 100000"),
    ("depth", 200, r"depth = 200 does not match the file, which holds 4 blocks"),
    ("hidden_size", 2 ** 20, r"hidden_size"),
    ("text_tokens", 10 ** 9, r"text_tokens"),
    ("clip_tokens", 10 ** 9, r"clip_tokens"),
])
def test_dit_size_bomb_in_metadata_is_refused_before_building(tmp_path, dit_model, no_unbacked_builds, field, value,
                                                              message):
    config = dit_model.config.to_dict()
    config[field] = value
    hostile = write_dit(tmp_path / "hostile.safetensors", dit_model, json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_checkpoint(hostile)


def test_dit_loads_after_the_checks_and_weights_are_assigned_not_copied(tmp_path, dit_model):
    path = tmp_path / "good.safetensors"
    save_checkpoint(dit_model, path)
    loaded = load_checkpoint(path)
    for key, value in dit_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(p.is_meta for p in loaded.parameters())


# ------------------------------------------------------------------------------ finding 6: one clear error type
@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 0, r"num_heads = 0"),
    ("num_heads", "16", r"num_heads = '16'"),
    ("depth", None, r"depth = None"),
    ("patch_size", 5, r"patch_size"),
    ("mlp_ratio", -4, r"mlp_ratio"),
    ("cfg_dropout", [], r"cfg_dropout"),
    ("inference", "fast", r"inference"),
])
def test_dit_bad_config_field_is_one_clear_error(tmp_path, dit_model, field, value, message):
    config = dit_model.config.to_dict()
    config[field] = value
    path = write_dit(tmp_path / "bad.safetensors", dit_model, json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        read_checkpoint(path)


@pytest.mark.parametrize("text", ["[" * 100000, "{" * 50000, "null", "[1, 2]", "not json", '{"depth": 4'])
def test_malformed_config_json_is_one_clear_error(tmp_path, dit_model, vae_weights, text):
    with pytest.raises(ConfigError):
        read_checkpoint(write_dit(tmp_path / "dit.safetensors", dit_model, text))
    with pytest.raises(ConfigError):
        ReducioVAE.from_pretrained(write_vae(tmp_path / "vae.safetensors", vae_weights, text))


HOSTILE_VALUES = [0, -1, 3, 2 ** 31, 2 ** 62, 1.5, float("nan"), "28", "", None, True, False, [], [0], [[[]]],
                  {}, {"a": 1}, [1] * 40]


def _leaves(config, prefix=()):
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        yield prefix + (key,)


def _fuzz_cases(config, count, seed, skip=()):
    rng = random.Random(seed)
    paths = sorted(p for p in set(_leaves(config)) if p[-1] not in skip and p not in skip)
    cases = [(path, value) for path in paths for value in HOSTILE_VALUES]
    rng.shuffle(cases)
    return cases[:count]


def _load_or_refuse(load):
    """Either loads or raises ConfigError/CheckpointError; anything else (TypeError, KeyError, ZeroDivisionError,
    RecursionError, an AssertionError from the build spy) fails the test."""
    try:
        load()
    except CheckpointError as error:
        assert str(error), "empty error message"
        return "refused"
    return "loaded"


def _original(config, path):
    for key in path:
        config = config[key]
    return config


# Keys the official code reads only for training or logging (accepted with any value, never used to build).
VAE_INERT = {"lossconfig", "resolution", "attn_resolutions", "use_checkpoint", "fp32_attention", "dropout",
             ("ddconfig_2d", "z_channels"), ("ddconfig_2d", "out_ch")}


def test_fuzzed_vae_configs_give_only_clear_errors(vae_file, vae_config, no_unbacked_builds):
    loaded = []
    for path, value in _fuzz_cases(vae_config, 150, seed=8, skip=VAE_INERT):
        outcome = _load_or_refuse(lambda: load_model(ReducioVAE, vae_file, config=mutate(vae_config, path, value)))
        if outcome == "loaded":
            loaded.append((path, value))
    # (the inert keys are not fuzzed: they accept any value). What loads is a legitimate setting.
    legitimate = {("use_tiling",): (True, False), ("tile_overlap_factor",): (0, 0.25)}
    surprising = [(p, v) for p, v in loaded if v != _original(vae_config, p) and v not in legitimate.get(p, ())]
    assert not surprising, f"hostile values accepted: {surprising}"


def test_fuzzed_dit_configs_give_only_clear_errors(tmp_path, dit_model, no_unbacked_builds):
    config = dit_model.config.to_dict()
    loaded = []
    for number, (path, value) in enumerate(_fuzz_cases(config, 120, seed=6)):
        file = write_dit(tmp_path / f"fuzz{number}.safetensors", dit_model, json.dumps(mutate(config, path, value)))
        if _load_or_refuse(lambda: read_checkpoint(file)) == "loaded":
            loaded.append((path, value))
        file.unlink()
    def legitimate(path, value):
        original = _original(config, path)
        if path[-1] in ("vae", "sampler", "scheduler"):   # free-text names
            return isinstance(value, str)
        if isinstance(original, (int, float)) and not isinstance(original, bool):
            # a plausible number of the field's kind (0 for a rate or a cfg scale, 3 for an area, ...);
            # None, strings, lists, bools, NaN, negative and 2**62 must all be refused
            kinds = (int,) if isinstance(original, int) else (int, float)
            return (isinstance(value, kinds) and not isinstance(value, bool) and value == value
                    and 0 <= value <= 2 ** 40)
        return value == original

    surprising = [(p, v) for p, v in loaded if not legitimate(p, v)]
    assert not surprising, f"hostile values accepted: {surprising}"


def test_converter_on_a_malformed_source_is_one_clear_error(tmp_path, capsys):
    sd = tiny_pixart()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(0, 64)   # mlp_ratio 0 -> config refused, not a traceback
    save_file(sd, str(tmp_path / "bad.safetensors"))
    assert convert_main(["pixart", str(tmp_path / "bad.safetensors"), str(tmp_path / "out.safetensors")]) == 2
    assert "mlp_ratio" in capsys.readouterr().err
    sd = tiny_pixart()
    del sd["blocks.0.mlp.fc1.weight"]
    save_file(sd, str(tmp_path / "bad2.safetensors"))
    assert convert_main(["pixart", str(tmp_path / "bad2.safetensors"), str(tmp_path / "out.safetensors")]) == 2
    assert "blocks.0.mlp.fc1.weight" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------------------------------------ finding 7: converter output == input
def test_pixart_convert_refuses_to_overwrite_its_input_even_with_force(tmp_path, capsys):
    source = tmp_path / "pixart.safetensors"
    save_file(tiny_pixart(), str(source))
    before = source.read_bytes()
    assert convert_main(["pixart", str(source), str(source), "--force"]) == 2
    assert "input" in capsys.readouterr().err
    other_spelling = tmp_path / "sub" / ".." / "pixart.safetensors"
    (tmp_path / "sub").mkdir()
    assert convert_main(["pixart", str(source), str(other_spelling), "--force"]) == 2
    os.symlink(source, tmp_path / "link.safetensors")
    assert convert_main(["pixart", str(source), str(tmp_path / "link.safetensors"), "--force"]) == 2
    assert source.read_bytes() == before


# ------------------------------------------------------------------------------ finding 8: zip bombs
def zip_bomb(path, tensors):
    """torch.save's archive re-packed with deflate: a small file that expands to the full tensors."""
    plain = path.with_suffix(".plain")
    torch.save(tensors, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    return path


def test_zip_bomb_ckpt_is_refused_before_expanding(tmp_path, monkeypatch):
    bomb = zip_bomb(tmp_path / "bomb.ckpt", {"state_dict": {"decoder.w": torch.zeros(2 ** 22)}})   # 16 MiB inside
    assert bomb.stat().st_size < 64 * 1024
    # the real torch.load expands it (the bomb works) ...
    assert torch.load(bomb, weights_only=True)["state_dict"]["decoder.w"].numel() == 2 ** 22

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load ran on a zip bomb")

    monkeypatch.setattr(torch, "load", refuse)
    # ... the loaders never hand it to torch.load
    with pytest.raises(CheckpointError, match=r"bomb\.ckpt.*(compressed|expand)"):
        ReducioVAE.from_pretrained(bomb)
    with pytest.raises(ConversionError, match=r"(compressed|expand)"):
        read_source(bomb)


def test_plain_torch_archive_still_loads(tmp_path, vae_weights, vae_config):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": dict(vae_weights)}, path)
    model = load_model(ReducioVAE, path, config=vae_config)
    assert torch.equal(model.quant_conv.weight, vae_weights["quant_conv.weight"])


def test_vae_converter_config_file_and_output_spelling(tmp_path, vae_file, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    assert convert_main(["vae", str(vae_file), str(tmp_path / "out.safetensors"), "--config", str(deep)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    link = tmp_path / "link.safetensors"
    os.symlink(vae_file, link)
    before = vae_file.read_bytes()
    assert convert_main(["vae", str(vae_file), str(link), "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err and vae_file.read_bytes() == before
