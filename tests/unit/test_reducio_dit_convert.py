"""PixArt-alpha -> Reducio-DiT conversion on tiny PixArt-shaped state dicts (spec §7)."""
import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from reducio.convert import main as convert_main
from reducio.dit import load_checkpoint, read_checkpoint
from reducio.dit.convert_pixart import ConversionError, convert_state_dict, diffusers_to_original

D, DEPTH, CAPTION, TOKENS = 64, 3, 32, 8   # head dim 64/1 -> num_heads = max(1, 64 // 72) = 1


def tiny_pixart(ms=True, seed=0):
    """Keys and shapes of PixArt-alpha XL/2 at a tiny width (original layout)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"x_embedder.proj.weight": r(D, 4, 2, 2), "x_embedder.proj.bias": r(D),
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "t_block.1.weight": r(6 * D, D), "t_block.1.bias": r(6 * D),
          "y_embedder.y_proj.fc1.weight": r(D, CAPTION), "y_embedder.y_proj.fc1.bias": r(D),
          "y_embedder.y_proj.fc2.weight": r(D, D), "y_embedder.y_proj.fc2.bias": r(D),
          "y_embedder.y_embedding": r(TOKENS, CAPTION),
          "final_layer.scale_shift_table": r(2, D),
          "final_layer.linear.weight": r(32, D), "final_layer.linear.bias": r(32),
          "pos_embed": r(1, 16, D)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd[p + "scale_shift_table"] = r(6, D)
        for name, shape in (("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("cross_attn.q_linear", (D, D)),
                            ("cross_attn.kv_linear", (2 * D, D)), ("cross_attn.proj", (D, D)),
                            ("mlp.fc1", (4 * D, D)), ("mlp.fc2", (D, 4 * D))):
            sd[p + name + ".weight"] = r(*shape)
            sd[p + name + ".bias"] = r(shape[0])
    if ms:
        sd.update({"csize_embedder.mlp.0.weight": r(D // 3, 256), "ar_embedder.mlp.0.weight": r(D // 3, 256)})
    return sd


def to_diffusers(sd):
    """The same tensors under diffusers PixArtTransformer2DModel names (split qkv / kv)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "adaln_single.emb.timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
           "adaln_single.emb.timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
           "adaln_single.emb.timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
           "adaln_single.emb.timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
           "adaln_single.linear.weight": sd["t_block.1.weight"], "adaln_single.linear.bias": sd["t_block.1.bias"],
           "caption_projection.linear_1.weight": sd["y_embedder.y_proj.fc1.weight"],
           "caption_projection.linear_1.bias": sd["y_embedder.y_proj.fc1.bias"],
           "caption_projection.linear_2.weight": sd["y_embedder.y_proj.fc2.weight"],
           "caption_projection.linear_2.bias": sd["y_embedder.y_proj.fc2.bias"],
           "scale_shift_table": sd["final_layer.scale_shift_table"],
           "proj_out.weight": sd["final_layer.linear.weight"], "proj_out.bias": sd["final_layer.linear.bias"]}
    for i in range(DEPTH):
        s, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[d + "scale_shift_table"] = sd[s + "scale_shift_table"]
        for suffix in ("weight", "bias"):
            for x, chunk in zip("qkv", sd[f"{s}attn.qkv.{suffix}"].chunk(3)):
                out[f"{d}attn1.to_{x}.{suffix}"] = chunk
            out[f"{d}attn1.to_out.0.{suffix}"] = sd[f"{s}attn.proj.{suffix}"]
            out[f"{d}attn2.to_q.{suffix}"] = sd[f"{s}cross_attn.q_linear.{suffix}"]
            for x, chunk in zip("kv", sd[f"{s}cross_attn.kv_linear.{suffix}"].chunk(2)):
                out[f"{d}attn2.to_{x}.{suffix}"] = chunk
            out[f"{d}attn2.to_out.0.{suffix}"] = sd[f"{s}cross_attn.proj.{suffix}"]
            out[f"{d}ff.net.0.proj.{suffix}"] = sd[f"{s}mlp.fc1.{suffix}"]
            out[f"{d}ff.net.2.{suffix}"] = sd[f"{s}mlp.fc2.{suffix}"]
    return out


MAPPED_TOP = ["t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
              "t_block.1.weight", "t_block.1.bias", "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc1.bias",
              "y_embedder.y_proj.fc2.weight", "y_embedder.y_proj.fc2.bias", "y_embedder.y_embedding",
              "final_layer.scale_shift_table"]


def test_mapped_weights_are_copied_unchanged_and_new_weights_follow_the_spec():
    source = tiny_pixart()
    out, config, report = convert_state_dict(source, seed=3)
    assert (config.depth, config.hidden_size, config.caption_channels, config.text_tokens) == (DEPTH, D, CAPTION, TOKENS)
    block_keys = [k for k in source if k.startswith("blocks.")]
    assert report["mapped"] == len(block_keys) + len(MAPPED_TOP) == 15 * DEPTH + 12
    for key in block_keys + MAPPED_TOP:
        assert torch.equal(out[key], source[key]), key
    # never copied, although the shape matches at patch (1,1,1) (pitfall 2): zero-initialised instead
    assert out["final_layer.linear.weight"].shape == source["final_layer.linear.weight"].shape
    assert out["final_layer.linear.weight"].abs().max() == 0 and out["final_layer.linear.bias"].abs().max() == 0
    for key in ("clip_embedder.proj.fc2.weight", "clip_embedder.proj.fc2.bias", "content_embedder.fc.weight",
                "content_embedder.fc.bias", "content_embedder.null_latent", "x_embedder.proj.bias",
                "content_embedder.proj.bias", "clip_embedder.proj.fc1.bias"):
        assert out[key].abs().max() == 0, key
    w = out["x_embedder.proj.weight"].reshape(D, -1)
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound      # xavier-uniform
    assert abs(out["clip_embedder.proj.fc1.weight"].std() - 0.02) < 0.004
    null = out["clip_embedder.null_embedding"]
    assert abs(null.std() - 1 / math.sqrt(config.clip_channels)) < 0.1 / math.sqrt(config.clip_channels)
    assert sorted(report["ignored"]) == sorted(["x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed",
                                                "final_layer.linear.weight", "final_layer.linear.bias",
                                                "csize_embedder.mlp.0.weight", "ar_embedder.mlp.0.weight"])
    assert report["unknown_source_keys"] == []


def test_diffusers_layout_gives_the_same_backbone():
    source = tiny_pixart(ms=False)
    original, _, _ = convert_state_dict(source, seed=1)
    from_diffusers, _, report = convert_state_dict(to_diffusers(source) | {"caption_projection.y_embedding":
                                                                           source["y_embedder.y_embedding"]}, seed=1)
    assert report["layout"] == "diffusers"
    for key, value in original.items():
        assert torch.equal(from_diffusers[key], value), key
    # without y_embedding (older diffusers exports) the null caption is initialised normal / sqrt(caption)
    # (the token count then falls back to the config default, 120)
    no_null = convert_state_dict(to_diffusers(source), seed=1)[0]["y_embedder.y_embedding"]
    assert no_null.shape == (120, CAPTION)
    assert abs(no_null.std() - 1 / math.sqrt(CAPTION)) < 0.1 / math.sqrt(CAPTION)


def test_diffusers_qkv_concatenation_order():
    source = tiny_pixart(ms=False)
    back = diffusers_to_original(to_diffusers(source))
    assert torch.equal(back["blocks.1.attn.qkv.weight"], source["blocks.1.attn.qkv.weight"])
    assert torch.equal(back["blocks.2.cross_attn.kv_linear.bias"], source["blocks.2.cross_attn.kv_linear.bias"])


def test_cli_pth_and_safetensors_inputs(tmp_path, capsys):
    source = tiny_pixart()
    pth = tmp_path / "PixArt-XL-2-tiny.pth"
    torch.save({"state_dict": source}, str(pth))
    out = tmp_path / "reducio_dit_init.safetensors"
    assert convert_main(["pixart", str(pth), str(out), "--dtype", "bf16", "--seed", "5"]) == 0
    assert "tensors copied from PixArt" in capsys.readouterr().out
    model = load_checkpoint(out)
    assert model.x_embedder.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"].bfloat16())
    _, config = read_checkpoint(out)
    assert config.depth == DEPTH and config.in_channels == 16
    # the output exists: refuse without --force, leave it untouched
    before = out.read_bytes()
    assert convert_main(["pixart", str(pth), str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    st = tmp_path / "PixArt-XL-2-tiny.safetensors"
    save_file(source, str(st))
    assert convert_main(["pixart", str(st), str(out), "--force", "--patch-size", "1,2,2", "--in-channels", "8"]) == 0
    model = load_checkpoint(out)
    assert tuple(model.x_embedder.proj.weight.shape) == (D, 8, 1, 2, 2)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"blocks.0.attn.qkv.weight": _Exploit()}}, f)
    out = tmp_path / "out.safetensors"
    assert convert_main(["pixart", str(path), str(out)]) == 2
    captured = capsys.readouterr()
    assert "weights_only" in captured.err and "this must never run" not in captured.out
    assert not out.exists()


def test_non_pixart_inputs_are_named(tmp_path):
    with pytest.raises(ConversionError, match="Reducio VAE"):
        convert_state_dict({"encoder_3d.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="not a PixArt-alpha checkpoint"):
        convert_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="already a Reducio-DiT"):
        convert_state_dict({"clip_embedder.null_embedding": torch.zeros(1)})
