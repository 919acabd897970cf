"""Full-size ft4/ft2 models (built on the meta device) have exactly the official keys and shapes."""
import json

import pytest
import torch

from reducio import ReducioVAE
from reducio.vae import OFFICIAL_PARAM_COUNTS, official_config
from reducio.vae.checkpoint import CheckpointError, check_keys, detect_variant

from testkit.golden import golden_path

GOLDEN = golden_path("reducio")


def meta_model(variant):
    with torch.device("meta"):
        return ReducioVAE(**official_config(variant))


@pytest.mark.parametrize("variant", ["ft4", "ft2"])
def test_official_key_sets_and_shapes(variant):
    golden = json.loads((GOLDEN / f"keys_{variant}.json").read_text())
    expected = {k: tuple(v[0]) for k, v in golden["inference"].items()}
    state = meta_model(variant).state_dict()
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert all(v[1] == "float32" for v in golden["inference"].values())
    assert all(v.dtype == torch.float32 for v in state.values())
    # state-dict order matches the official order of the inference keys
    assert list(state) == [k for k in golden["inference"]]


@pytest.mark.parametrize("variant", ["ft4", "ft2"])
def test_official_param_counts(variant):
    model = meta_model(variant)
    total = sum(p.numel() for p in model.parameters())
    assert total == OFFICIAL_PARAM_COUNTS[variant]
    golden = json.loads((GOLDEN / f"keys_{variant}.json").read_text())["param_counts"]
    assert total == golden["inference_total"]
    for part in ("encoder_3d", "encoder_2d", "decoder", "quant_conv", "post_quant_conv"):
        assert sum(p.numel() for p in getattr(model, part).parameters()) == golden[part], part


@pytest.mark.parametrize("variant", ["ft4", "ft2"])
def test_detect_variant_from_weights(variant):
    state = meta_model(variant).state_dict()
    assert detect_variant(state) == variant
    check_keys(meta_model(variant).state_dict(), state, "x")  # no error


def test_ft4_weights_do_not_fit_ft2_model():
    with pytest.raises(CheckpointError) as err:
        check_keys(meta_model("ft2").state_dict(), meta_model("ft4").state_dict(), "ft4.ckpt")
    message = str(err.value)
    assert "Wrong shapes for 2 tensors" in message
    assert "decoder.mid.fuse.0.pos_embed (1, 4, 1, 512) (expected (1, 8, 1, 512))" in message


def test_fixed_sinusoid_tables_are_parameters_without_grad():
    model = meta_model("ft4")
    golden = json.loads((GOLDEN / "keys_ft4.json").read_text())["fixed_sinusoid_tables"]
    for key in golden:
        param = model.get_parameter(key)
        assert not param.requires_grad


def test_dead_content_weights_are_kept():
    golden = json.loads((GOLDEN / "keys_ft4.json").read_text())["dead_in_official_forward"]
    state = meta_model("ft4").state_dict()
    assert all(key in state for key in golden)


def test_official_structure_derivations():
    model = meta_model("ft4")
    kinds = {l: type(getattr(model.encoder_3d.down[l], "downsample", None)).__name__ for l in range(6)}
    assert kinds[5] == "NoneType"
    assert model.encoder_3d.down[3].downsample.conv.kernel_size == (3, 3, 3)
    assert model.encoder_3d.down[2].downsample.conv.kernel_size == (1, 3, 3)
    assert [model.decoder.up[l].upsample.scale for l in (5, 4, 3, 2, 1)] == [
        (2.0, 2.0, 2.0), (2.0, 2.0, 2.0), (1.0, 2.0, 2.0), (1.0, 2.0, 2.0), (1.0, 2.0, 2.0)]
    assert [model.decoder.up[l].fuse[0].attn.heads for l in (3, 2)] == [8, 4]
    assert model.decoder.mid.fuse[0].attn.heads == 8
    assert model.latent_frames == 4 and meta_model("ft2").latent_frames == 8


def test_flops_match_the_official_counts():
    """FLOPs of the full ft4 model on meta tensors equal the official counts (spec section 10);
    the content encoder is lower by exactly the skipped dead compute (mid.block_2 at 32x32)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_model("ft4").eval()
    video = torch.empty(1, 3, 16, 256, 256, device="meta")

    def flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            result = fn()
        return counter.get_total_flops(), result

    content_flops, feats = flops(lambda: model.encode_2d(video[:, :, 7]))
    encode_flops, _ = flops(lambda: model.moments(video))
    latent = torch.empty(1, 16, 4, 8, 8, device="meta")
    decode_flops, _ = flops(lambda: model.decode_features(latent, feats))
    dead_block = 2 * (2 * 512 * 512 * 9 * 32 * 32)  # two 3x3 convs 512->512 at 32x32, 2 FLOPs/MAC
    assert content_flops == 272_646_537_216 - dead_block
    assert encode_flops == 9_092_941_217_792
    assert decode_flops == 26_273_636_286_464
