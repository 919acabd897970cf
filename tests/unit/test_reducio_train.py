"""Tier 1: reducio.train on tiny models -- resume follows the unstopped loss curve (Ctrl-C saves),
resume checks, full disk during a checkpoint write, NaN loss, empty data, the objectives, exports."""
import errno
import json
import os
import signal

import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("skimage")

from reducio.train import (CheckpointWriteError, ConfigMismatchError, NonFiniteLossError,  # noqa: E402
                           TrainingError, TrainingStopped)
from reducio.train.cli import build_parser, main, run_command  # noqa: E402
from reducio.train.diffusion import GaussianDiffusion  # noqa: E402
from reducio.train.testing import write_test_dit_config, write_test_vae  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    vae = write_test_vae(root / "vae.safetensors")
    dit_config = write_test_dit_config(root / "dit.json")
    run_command(build_parser().parse_args(
        ["encode", "--vae", str(vae), "--dit-config", str(dit_config), "--size", "16", "--clips", "12",
         "--shard-size", "5", "--out", str(root / "features"), "--quiet"]))
    return {"root": root, "vae": vae, "dit_config": dit_config, "features": root / "features"}


# measured: bf16 autocast moves the test VAE's normalised latents by 0.4 % of their largest value (10x margin)
BF16_LATENT_ERROR = 0.04


def dit_args(tiny, out, steps, *extra):
    return ["dit", "--features", str(tiny["features"]), "--model-config", str(tiny["dit_config"]), "--out", str(out),
            "--steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2", "--ema-decay", "0.9",
            "--log-every", "1", "--ckpt-every", "2", "--quiet", *extra]


def run(argv):
    return run_command(build_parser().parse_args(argv))


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_stopped_and_resumed_run_follows_the_unstopped_loss_curve(tiny, tmp_path, monkeypatch):
    from reducio.dit import load_checkpoint
    from reducio.train.dit_trainer import DiTTrainer

    straight = tmp_path / "straight"
    run(dit_args(tiny, straight, 5))
    stopped = tmp_path / "stopped"
    original = DiTTrainer.train_step

    def ctrl_c_at_step_3(self, batch, numbers, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)      # what Ctrl-C delivers; the loop saves after this step
        return original(self, batch, numbers, step)

    monkeypatch.setattr(DiTTrainer, "train_step", ctrl_c_at_step_3)
    with pytest.raises(TrainingStopped, match="--resume"):
        run(dit_args(tiny, stopped, 5))
    monkeypatch.setattr(DiTTrainer, "train_step", original)
    assert (stopped / "checkpoints" / "latest").read_text() == "step_00000003"
    assert main(dit_args(tiny, stopped, 5, "--resume")) == 0
    assert len(losses(stopped)) == 5
    assert losses(stopped) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    a = load_checkpoint(straight / "final" / "ema.safetensors")
    b = load_checkpoint(stopped / "final" / "ema.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)

    # resume guards: a different setting, and an existing run without --resume
    with pytest.raises(ConfigMismatchError, match=r"lr: checkpoint 0\.001 vs now 0\.002"):
        run(dit_args(tiny, stopped, 6, "--resume", "--lr", "2e-3"))
    with pytest.raises(TrainingError, match="already holds a run"):
        run(dit_args(tiny, stopped, 6))
    with pytest.raises(ConfigMismatchError, match=r"high_noise_weight: checkpoint 1\.0 vs now 100\.0"):
        run(dit_args(tiny, stopped, 6, "--resume", "--high-noise-weight", "100"))
    # a checkpoint from before --high-noise-weight existed (no such identity entry) resumes as the default
    state_file = stopped / "checkpoints" / (stopped / "checkpoints" / "latest").read_text() / "state.json"
    state = json.loads(state_file.read_text())
    del state["identity"]["high_noise_weight"]
    state_file.write_text(json.dumps(state))
    assert main(dit_args(tiny, stopped, 6, "--resume")) == 0


def test_full_disk_during_checkpoint_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    import reducio.train.checkpoint as ckpt

    out = tmp_path / "disk"
    real_write, calls = ckpt.atomic_write_safetensors, {"n": 0}

    def write_until_full(tensors, metadata, path, **kwargs):
        if "step_00000004" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:      # the second file of the second checkpoint
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(tensors, metadata, path, **kwargs)

    monkeypatch.setattr(ckpt, "atomic_write_safetensors", write_until_full)
    with pytest.raises(CheckpointWriteError, match="previous checkpoint .*step_00000002 is intact"):
        run(dit_args(tiny, out, 4))
    folder = out / "checkpoints"
    assert (folder / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000002"]   # no temporary left
    from reducio.dit import load_checkpoint

    load_checkpoint(folder / "step_00000002" / "model.safetensors")
    monkeypatch.setattr(ckpt, "atomic_write_safetensors", real_write)
    run(dit_args(tiny, out, 4, "--resume"))
    assert (folder / "latest").read_text() == "step_00000004"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    from reducio.train import distributed
    from reducio.train.dit_trainer import DiTTrainer
    from reducio.train.features import FeatureShards

    class Poisoned(FeatureShards):
        def __getitem__(self, key):
            item = super().__getitem__(key)
            item["z"] = torch.full_like(item["z"], float("nan"))
            return item

    out = tmp_path / "nan"
    run(dit_args(tiny, out, 2))
    settings = {k: v for k, v in vars(build_parser().parse_args(dit_args(tiny, out, 4, "--resume"))).items()
                if k != "command"}
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3.*step_00000002.*--lr"):
        DiTTrainer(settings, Poisoned(tiny["features"]), distributed.setup("cpu")).run()
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert len(losses(out)) == 2


def test_vae_run_writes_loadable_checkpoints_and_samples(tiny, tmp_path, capsys):
    from reducio.vae import ReducioVAE

    out = tmp_path / "vae"
    args = ["vae", "--model", "test", "--size", "16", "--clips", "8", "--steps", "2", "--batch-size", "2",
            "--out", str(out), "--ckpt-every", "1", "--sample-every", "2", "--sample-clips", "1", "--log-every", "1",
            "--lr", "1e-3", "--quiet"]
    assert main(args) == 0
    vae = ReducioVAE.from_pretrained(out / "final" / "model.safetensors")
    assert vae.embed_dim == 8 and vae.latent_frames == 4
    assert (out / "samples" / "step_00000002.mp4").stat().st_size > 0
    record = json.loads((out / "samples" / "samples.jsonl").read_text().splitlines()[0])
    assert record["psnr_db"] > 0
    # fine-tune start from those weights: the run takes the checkpoint's configuration
    assert main(["vae", "--init", str(out / "final" / "model.safetensors"), "--size", "16", "--clips", "8",
                 "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    # the discriminator needs 32 px: said before the run starts
    assert main(args[:-1] + ["--out", str(tmp_path / "d"), "--disc-start", "0"]) == 2
    assert "at least 32x32" in capsys.readouterr().err


def test_vae_run_resumes_although_some_parameters_never_get_a_gradient(tmp_path):
    # the content encoder's last mid block feeds no decoder (as in the official model), so Adam holds no
    # state for it; resuming must accept that and follow the unstopped run
    common = ["vae", "--model", "test", "--size", "16", "--clips", "8", "--batch-size", "2", "--log-every", "1",
              "--ckpt-every", "1", "--lr", "1e-3", "--posterior", "mean", "--quiet"]
    assert main([*common, "--steps", "3", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "split")]) == 0
    assert main([*common, "--steps", "3", "--out", str(tmp_path / "split"), "--resume"]) == 0
    whole, split = (losses(tmp_path / name) for name in ("whole", "split"))
    assert len(split) == len(whole) == 3
    torch.testing.assert_close(torch.tensor(split), torch.tensor(whole), rtol=1e-4, atol=1e-6)


def test_init_matching_takes_the_tensors_that_fit_a_changed_architecture(tmp_path, capsys):
    from reducio.train.vae_trainer import VAE_PRESETS
    from reducio.vae import ReducioVAE

    start = tmp_path / "start"
    common = ["--size", "16", "--clips", "4", "--steps", "1", "--batch-size", "2", "--lr", "1e-3", "--quiet"]
    assert main(["vae", "--model", "test", "--out", str(start), *common]) == 0
    changed = VAE_PRESETS["test"]()
    changed["ddconfig"].update(ch_fuse=[0, 1, -1], content_position="sincos2d")    # one more fusion block
    config = tmp_path / "changed.json"
    config.write_text(json.dumps(changed))
    weights = str(start / "final" / "model.safetensors")
    # plain --init refuses the other architecture; --init-matching takes what fits and says so
    assert main(["vae", "--init", weights, "--model-config", str(config), "--out", str(tmp_path / "a"), *common]) == 2
    assert "different VAE configuration" in capsys.readouterr().err
    out = tmp_path / "b"
    assert main(["vae", "--init", weights, "--init-matching", "--model-config", str(config), "--lr", "0",
                 "--out", str(out), *common[:-3], "--quiet"]) == 0
    assert "start fresh" in capsys.readouterr().err
    before, after = ReducioVAE.from_pretrained(weights), ReducioVAE.from_pretrained(out / "final" / "model.safetensors")
    assert after.config["ddconfig"]["content_position"] == "sincos2d"
    old = before.state_dict()
    for key, value in after.state_dict().items():
        if key.startswith("decoder.up.0.fuse"):
            assert key not in old
        elif "discriminator" not in key:
            torch.testing.assert_close(value, old[key])           # lr 0: what was taken is unchanged
    # a file of another family is refused before anything runs
    big = VAE_PRESETS["tiny"]()
    config.write_text(json.dumps(big))
    assert main(["vae", "--init", weights, "--init-matching", "--model-config", str(config),
                 "--out", str(tmp_path / "c"), *common]) == 2
    assert "not the same family" in capsys.readouterr().err
    # --init-matching reads the tensors only (the file's own architecture need not build any more);
    # a file that is not safetensors is refused by name
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert main(["vae", "--init", str(junk), "--init-matching", "--model-config", str(config),
                 "--out", str(tmp_path / "d"), *common]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_empty_dataset_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "videos"
    empty.mkdir()
    assert main(["vae", "--data", str(empty), "--out", str(tmp_path / "run"), "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds no videos" in err and "--data synthetic" in err
    assert not (tmp_path / "run").exists()


def test_encode_in_bf16_records_it_and_stays_near_fp32(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    run(["encode", "--vae", str(tiny["vae"]), "--dit-config", str(tiny["dit_config"]), "--size", "16", "--clips", "5",
         "--shard-size", "5", "--precision", "bf16", "--out", str(out), "--quiet"])
    assert json.loads((out / "manifest.json").read_text())["precision"] == "bf16"
    assert json.loads((tiny["features"] / "manifest.json").read_text())["precision"] == "fp32"  # auto on CPU
    low, full = load_file(out / "shard_00000.safetensors"), load_file(tiny["features"] / "shard_00000.safetensors")
    assert low["z"].dtype == torch.float32
    error = float((low["z"] - full["z"]).abs().max() / full["z"].abs().max())
    assert 0 < error < BF16_LATENT_ERROR, error


def test_conditions_from_an_earlier_folder_equal_encoding_them_again(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    other_vae = write_test_vae(tmp_path / "other_vae.safetensors", seed=7)
    common = ["encode", "--vae", str(other_vae), "--dit-config", str(tiny["dit_config"]), "--size", "16",
              "--clips", "7", "--shard-size", "4", "--quiet"]
    run(common + ["--out", str(tmp_path / "direct")])
    run(common + ["--out", str(tmp_path / "reused"), "--conditions-from", str(tiny["features"])])
    manifest = json.loads((tmp_path / "reused" / "manifest.json").read_text())
    assert manifest["conditions_from"] == str(tiny["features"]) and manifest["count"] == 7
    for shard in ("shard_00000.safetensors", "shard_00001.safetensors"):
        direct, reused = load_file(tmp_path / "direct" / shard), load_file(tmp_path / "reused" / shard)
        assert direct.keys() == reused.keys()
        for key in direct:
            assert torch.equal(direct[key], reused[key]), (shard, key)
    original = load_file(tiny["features"] / "shard_00000.safetensors")["z"][:4]
    assert not torch.allclose(original, load_file(tmp_path / "reused" / "shard_00000.safetensors")["z"])  # new VAE's
    # other clips (another seed) are refused before anything is written
    assert main(common[:-1] + ["--seed", "3", "--out", str(tmp_path / "bad"), "--conditions-from",
                               str(tiny["features"]), "--quiet"]) == 2
    assert "made from other clips" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_features_must_fit_the_dit(tiny, tmp_path, capsys):
    assert main(["dit", "--features", str(tiny["features"]), "--model", "tiny", "--out", str(tmp_path / "r"),
                 "--steps", "1", "--quiet"]) == 2
    assert "do not fit this DiT config" in capsys.readouterr().err
    assert main(["dit", "--features", str(tiny["features"]), "--model-config", str(tiny["dit_config"]),
                 "--high-noise-weight", "0.5", "--out", str(tmp_path / "w"), "--steps", "1", "--quiet"]) == 2
    assert "--high-noise-weight: high_noise_weight must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    assert main(["dit", "--features", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "1", "--quiet"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_iddpm_terms_vanish_for_the_true_noise_and_variance():
    diffusion = GaussianDiffusion()
    x0 = torch.randn(3, 4, 2, 2, 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    # v = -1 selects the posterior variance exactly: with the true eps the KL is 0
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = diffusion.training_losses(perfect, x0, x_t, t, noise)
    assert torch.allclose(terms["mse"], torch.zeros(3)) and torch.allclose(terms["vb"], torch.zeros(3), atol=1e-6)
    wrong = diffusion.training_losses(torch.cat([noise, torch.ones_like(noise)], dim=1), x0, x_t, t, noise)
    assert wrong["vb"][0] > 1e-2          # near t = 0 the two variance bounds differ the most
    # x_t has the scale ComfyUI's EPS models see: x_sigma / sqrt(1 + sigma^2)
    from reducio.dit.sampling import training_sigmas

    sigma = training_sigmas()[t].reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_t, (x0 + sigma * noise) / (1 + sigma ** 2).sqrt(), rtol=1e-4, atol=1e-5)


def test_high_noise_weight_scales_the_eps_mse_by_the_clamped_sigma_squared():
    from reducio.dit.sampling import training_sigmas

    x0 = torch.randn(4, 4, 2, 2, 2)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 200, 600, 999])
    output = torch.cat([noise + 0.3 * torch.randn_like(noise), torch.zeros_like(noise)], dim=1)
    plain = GaussianDiffusion().training_losses(output, x0, GaussianDiffusion().q_sample(x0, t, noise), t, noise)
    weighted_diffusion = GaussianDiffusion(high_noise_weight=100.0)
    weighted = weighted_diffusion.training_losses(output, x0, weighted_diffusion.q_sample(x0, t, noise), t, noise)
    expected = (training_sigmas()[t].double() ** 2).clamp(1.0, 100.0).float()
    assert expected[0] == 1.0 and expected[-1] == 100.0 and 1.0 < expected[2] <= 100.0
    torch.testing.assert_close(weighted["mse"], plain["mse"])          # the reported mse stays the plain one
    torch.testing.assert_close(weighted["loss"] - weighted["vb"], plain["mse"] * expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(plain["loss"], plain["mse"] + plain["vb"])   # default: PixArt's objective
    with pytest.raises(ValueError, match="high_noise_weight must be >= 1"):
        GaussianDiffusion(high_noise_weight=0.5)


def test_motion_hint_targets_are_the_clips_own_global_motion():
    from reducio.data import SyntheticClips
    from reducio.train.vae_objective import motion_hint_targets

    data = SyntheticClips(split="train", size=64, count=60)
    pans = [i for i in range(60) if data.spec(i).camera == "pan" and not data.spec(i).sprites][:3]
    assert pans
    for index in pans:
        spec = data.spec(index)
        target = motion_hint_targets(data[index]["video"][None], 7)[0]       # [2, T] (dx, dy)
        # the content frame reaches frame t by the pan's shift per frame times (7 - t): measured within
        # 0.35 pixel (phase correlation with sub-pixel refinement; the clip edge reflects)
        expected = torch.tensor(spec.scene_shift)[:, None] * (7 - torch.arange(16.0))[None]
        assert (target - expected).abs().max() < 0.35, (spec.direction, target, expected)


def test_motion_hint_trains_a_warp_decoder_and_is_refused_without_one(tmp_path, capsys):
    from reducio.train.vae_trainer import VAE_PRESETS

    common = ["--size", "16", "--clips", "4", "--steps", "2", "--batch-size", "2", "--quiet", "--log-every", "1"]
    assert main(["vae", "--model", "test", "--motion-hint-weight", "0.02", "--out", str(tmp_path / "a"), *common]) == 2
    assert "needs a decoder with warp fusion levels" in capsys.readouterr().err
    config = VAE_PRESETS["test"]()
    config["ddconfig"].update(ch_fuse=[0, 1, -1], fuse_type=["warp", "attn+warp", "attn"])
    path = tmp_path / "warp.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "b"
    assert main(["vae", "--model-config", str(path), "--motion-hint-weight", "0.02", "--out", str(out), *common]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["motion_hint"] >= 0 for r in rows if "loss" in r)
    assert any("motion_hint" in r for r in rows)


def test_posterior_mean_training_shows_the_decoder_the_mean_not_a_sample():
    from reducio.train.vae_trainer import VAE_PRESETS, VAEForTraining
    from reducio.vae import ReducioVAE

    torch.manual_seed(0)
    vae = ReducioVAE(**VAE_PRESETS["test"]()).eval()
    video = torch.rand(1, 3, 16, 16, 16) * 2 - 1
    noise = [torch.randn(1, vae.embed_dim, vae.latent_frames, 4, 4, generator=torch.Generator().manual_seed(s))
             for s in (1, 2)]
    with torch.no_grad():
        mean_runs = [VAEForTraining(vae, sample=False)(video, n)[0] for n in noise]
        sampled = [VAEForTraining(vae)(video, n)[0] for n in noise]
    torch.testing.assert_close(mean_runs[0], mean_runs[1])
    assert not torch.allclose(sampled[0], sampled[1])
    assert build_parser().parse_args(["vae", "--out", "x", "--steps", "1"]).posterior == "sample"   # official default
