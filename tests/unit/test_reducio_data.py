"""Tier 1: reducio.data -- synthetic clips (seeded, split, captions that match the motion) and video
folders decoded with PyAV (frame rate, image sequences, corrupt and short files skipped and counted)."""
import numpy as np
import pytest
import torch

pytest.importorskip("av")
pytest.importorskip("skimage")

from reducio.data import CONTENT_INDEX, DatasetError, SyntheticClips, VideoFolder, content_frame, write_video  # noqa: E402
from reducio.data.synthetic import HELD_OUT_COLOURS, HELD_OUT_PHOTOS, PHOTOS, TINT  # noqa: E402


def phase_shift(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """Integer (dx, dy) that moves image a onto image b (phase correlation)."""
    cross = torch.fft.fft2(b) * torch.fft.fft2(a).conj()
    response = torch.fft.ifft2(cross / (cross.abs() + 1e-9)).real
    dy, dx = divmod(int(response.argmax()), response.shape[1])
    h, w = response.shape
    return (dx - w if dx > w // 2 else dx), (dy - h if dy > h // 2 else dy)


def test_synthetic_clips_are_seeded_and_shaped():
    a, b = SyntheticClips("train", 32, count=8, seed=3), SyntheticClips("train", 32, count=8, seed=3)
    first, again = a[5], b[5]
    assert first["video"].shape == (3, 16, 32, 32) and first["video"].dtype == torch.float32
    assert torch.equal(first["video"], again["video"]) and first["caption"] == again["caption"]
    assert -1.0 <= float(first["video"].min()) and float(first["video"].max()) <= 1.0
    assert not torch.equal(a[4]["video"], first["video"])
    assert not torch.equal(SyntheticClips("train", 32, count=8, seed=4)[5]["video"], first["video"])
    assert torch.equal(content_frame(first["video"]), first["video"][:, CONTENT_INDEX])


def test_heldout_split_uses_unseen_photos_and_colours():
    train, held = SyntheticClips("train", 32, count=80), SyntheticClips("heldout", 32, count=80)
    train_specs, held_specs = [train.spec(i) for i in range(80)], [held.spec(i) for i in range(80)]
    assert {s.photo for s in train_specs}.isdisjoint(HELD_OUT_PHOTOS)
    assert {s.photo for s in held_specs} <= set(HELD_OUT_PHOTOS)
    assert {sp.colour for s in train_specs for sp in s.sprites}.isdisjoint(HELD_OUT_COLOURS)
    assert {sp.colour for s in held_specs for sp in s.sprites} <= set(HELD_OUT_COLOURS)
    for spec in held_specs[:20]:
        caption = spec.caption()
        assert PHOTOS[spec.photo] in caption
        for sprite in spec.sprites:
            assert f"a {sprite.colour} {sprite.shape} moves {sprite.direction}" in caption


def test_pan_captions_match_the_measured_motion():
    clips = SyntheticClips("all", 64, count=200, seed=0)
    checked = 0
    for index in range(200):
        spec = clips.spec(index)
        if spec.camera != "pan" or spec.sprites:
            continue
        grey = clips.render(spec).mean(0)
        dx, dy = phase_shift(grey[0], grey[15])
        expected = (spec.scene_shift[0] * 15, spec.scene_shift[1] * 15)
        assert abs(dx - expected[0]) <= 1.5 and abs(dy - expected[1]) <= 1.5, (spec.caption(), (dx, dy), expected)
        # film convention: the camera pans left -> the content slides right
        sign = {"left": (1, 0), "right": (-1, 0), "up": (0, 1), "down": (0, -1)}[spec.direction]
        assert np.sign(dx) == sign[0] and np.sign(dy) == sign[1]
        checked += 1
        if checked == 4:
            break
    assert checked == 4


def test_photographs_are_mirrored_and_tinted_per_clip():
    clips = SyntheticClips("train", 32, count=40, seed=1)
    specs = [clips.spec(i) for i in range(40)]
    assert {s.flip for s in specs} == {True, False}
    assert all(TINT[0] <= g <= TINT[1] for s in specs for g in s.tint)
    assert len({s.tint for s in specs}) == 40
    # the tint scales the photograph's channels: halving the red gain halves red where nothing clips
    spec = next(s for s in specs if s.camera == "still" and not s.sprites)
    spec.tint = (1.0, 1.0, 1.0)
    full = (clips.render(spec) + 1) / 2
    spec.tint = (0.5, 1.0, 1.0)
    half = (clips.render(spec) + 1) / 2
    torch.testing.assert_close(half[0], full[0] * 0.5, atol=2e-3, rtol=0)
    torch.testing.assert_close(half[1:], full[1:])
    # the flip mirrors the photograph: frame 0 of a still clip looks at the mirrored place
    spec.tint, spec.flip = (1.0, 1.0, 1.0), not spec.flip
    assert not torch.allclose(clips.render(spec), full * 2 - 1)


def _counter_frames(count: int, size: int = 32) -> np.ndarray:
    """Frame i has grey level 6 * i, so the decoded value tells which frame it was."""
    return np.stack([np.full((size, size, 3), 6 * i, dtype=np.uint8) for i in range(count)])


def test_video_folder_decodes_at_the_requested_fps_and_skips_bad_files(tmp_path):
    from PIL import Image

    write_video(tmp_path / "a_good.mkv", _counter_frames(31 + 8), fps=32)        # lossless, 32 fps -> step 2
    (tmp_path / "a_good.txt").write_text("a grey ramp")
    write_video(tmp_path / "b_short.mkv", _counter_frames(5), fps=16)
    (tmp_path / "c_corrupt.mp4").write_bytes(b"\x00\x01not a video" * 100)
    frames_dir = tmp_path / "d_frames"
    frames_dir.mkdir()
    for i in range(20):
        Image.fromarray(_counter_frames(20)[i]).save(frames_dir / f"frame_{i}.png")
    data = VideoFolder(tmp_path, size=32, fps=16, random_crop=False)
    assert len(data) == 4
    good = data[0]
    assert good["video"].shape == (3, 16, 32, 32) and good["caption"] == "a grey ramp" and good["skipped"] == 0
    levels = ((good["video"][0, :, 0, 0] + 1) * 127.5 / 6).round()
    assert torch.all(levels.diff() == 2)                # every 2nd frame of the 32 fps file
    short = data[1]                                      # b_short (too short) and c_corrupt are skipped
    assert short["skipped"] == 2 and short["index"] == 3
    sequence_levels = ((short["video"][0, :, 0, 0] + 1) * 127.5 / 6).round()
    assert torch.all(sequence_levels.diff() == 1)       # natural order frame_2 < frame_10
    assert set(data.bad_files) == {str(tmp_path / "b_short.mkv"), str(tmp_path / "c_corrupt.mp4")}
    again = VideoFolder(tmp_path, size=32, fps=16, random_crop=False)
    assert torch.equal(again[(0, 0)]["video"], good["video"])


def test_empty_and_unusable_folders_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="holds no videos"):
        VideoFolder(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        VideoFolder(tmp_path / "missing")
    write_video(tmp_path / "short.mkv", _counter_frames(4), fps=16)
    with pytest.raises(DatasetError, match="none of the 1 videos"):
        VideoFolder(tmp_path, size=32)[0]
