"""Tier 1: the Reducio quality benches run end to end on tiny random models (so they cannot rot) and
write what their docs promise. The figures themselves come from trained models (docs/embedded_models.md)."""
import json
import math

import pytest

pytest.importorskip("skimage")

from bench import eval_reducio_dit, eval_reducio_vae  # noqa: E402
from reducio.dit import ReducioDiT, ReducioDiTConfig  # noqa: E402
from reducio.dit.checkpoint import save_checkpoint  # noqa: E402
from reducio.train.testing import write_test_dit_config, write_test_vae  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    vae = write_test_vae(root / "vae.safetensors")
    config = ReducioDiTConfig.from_json(write_test_dit_config(root / "dit.json").read_text())
    dit = root / "dit.safetensors"
    save_checkpoint(ReducioDiT(config), dit, config)
    return {"vae": vae, "dit": dit, "root": root}


def test_vae_bench_reports_both_baselines_at_two_sizes(models):
    out = models["root"] / "vae_quality"
    assert eval_reducio_vae.main(["--vae", str(models["vae"]), "--size", "16", "--clips", "2", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["size"] for r in report["results"]] == [16, 32]
    for result in report["results"]:
        assert {"vae", "repeat_content", "untrained"} <= set(result)
        assert result["gain_over_repeat_db"] == pytest.approx(
            result["vae"]["psnr"] - result["repeat_content"]["psnr"], abs=0.02)
        assert result["vae"]["psnr_min"] <= result["vae"]["psnr"] + 1e-6      # pooled error >= the best clip's
        followed, pans = map(int, result["vae"]["pan_followed"].split("/"))
        assert 0 <= followed <= pans <= result["clips"]
        assert result["repeat_content"]["pan_followed"] == f"0/{pans}"     # a still video follows no pan
        measured, total = map(int, result["input_pan_measured"].split("/"))
        assert total == pans and 0 <= measured <= pans
        assert result["posterior"]["std_mean"] > 0 and result["posterior"]["mean_spread"] >= 0
        # the ceilings know the motion exactly: each adds what the one before lacks
        assert result["camera_exact"]["psnr"] <= result["camera_and_sprites"]["psnr"] + 0.05
        assert result["camera_and_sprites"]["psnr"] <= result["holes_filled"]["psnr"] + 0.05
        followed = {name: tuple(map(int, value.split("/"))) for name, value in result["sprites_followed"].items()}
        assert len({total for _, total in followed.values()}) == 1
        assert all(0 <= count <= total for count, total in followed.values())
        # by sprite count: the groups hold every clip, and their errors pool back to the whole's
        for name in ("vae", "repeat_content", "holes_filled"):
            groups = result["psnr_by_sprites"][name].values()
            assert sum(g["clips"] for g in groups) == result["clips"]
            pooled = sum(g["clips"] * 10 ** (-g["psnr"] / 10) for g in groups) / result["clips"]
            assert -10 * math.log10(pooled) == pytest.approx(result[name]["psnr"], abs=0.02)
    assert "Posterior at 16 px" in out.with_suffix(".md").read_text()
    assert "(e) + the ghosts' holes filled" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_the_vae_ceilings_reproduce_the_clips_they_are_made_from():
    """Without sprites, (c) is the clip itself (up to resampling and the edges the camera brings in), and
    the hole filling leaves every pixel outside the hole as it is."""
    import copy

    import torch

    from reducio.data import SyntheticClips

    data = SyntheticClips(split="heldout", size=64, count=32, seed=123)
    index = next(i for i in range(32) if data.spec(i).camera == "pan" and data.spec(i).sprites)
    spec = copy.deepcopy(data.spec(index))
    spec.sprites = []
    data.spec = lambda i: spec           # this one clip, without its sprites
    video = data.render(spec)[None]
    outputs = eval_reducio_vae.ceilings(data, index, video)
    # 38.9 dB measured on this clip; the first and last frames lose a strip at the edge the camera brings in
    assert eval_reducio_vae.psnr(video, outputs["camera_exact"]) > 30
    torch.testing.assert_close(outputs["camera_and_sprites"], outputs["camera_exact"])
    hole = torch.zeros(64, 64, dtype=torch.bool)
    hole[20:30, 10:18] = True
    filled = eval_reducio_vae.fill_holes(video[0, :, 7], hole)
    torch.testing.assert_close(filled[:, ~hole], video[0, :, 7][:, ~hole])
    assert (filled[:, hole] - video[0, :, 7][:, hole]).abs().mean() < 0.2     # smooth, near the real pixels


def test_dit_bench_counts_every_caption_and_compares_with_the_untrained_model(models):
    out = models["root"] / "dit_quality"
    assert eval_reducio_dit.main(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--size", "16",
                                  "--images", "1", "--steps", "2", "--sprite-images", "2", "--zoom-roll-images", "1",
                                  "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    for name in ("trained", "untrained"):
        result = report[name]
        assert result["samples"] == 4 and sum(result["directions_seen"].values()) == 4
        assert result["sprite_samples"] == 8          # not the pan count (4): each summary keeps its own
        assert 0.0 <= result["direction_accuracy"] <= 1.0
        assert sum(result["sprite_directions_seen"].values()) == 8 and 0.0 <= result["sprite_accuracy"] <= 1.0
        assert sum(result["zoom_roll_seen"].values()) == 4 and 0.0 <= result["zoom_roll_accuracy"] <= 1.0
        assert [sum(read.values()) for read in result["zoom_roll_by_caption"].values()] == [1, 1, 1, 1]
    assert (models["root"] / "dit_quality_sprites.png").stat().st_size > 0
    assert (models["root"] / "dit_quality_zoom_roll.png").stat().st_size > 0
    assert "Chance is 25 %" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0
