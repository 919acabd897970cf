"""Contact sheets show the frames they claim, in the columns they claim."""
import numpy as np
import pytest
import torch
from PIL import Image

from reducio.contact_sheet import contact_sheet, difference, pick_frames, save_contact_sheet


def _clip(value, t=16, h=16, w=24):
    return torch.full((3, t, h, w), value)


def test_pick_frames_spreads_over_the_clip():
    assert pick_frames(16, 4) == [0, 5, 10, 15]
    assert pick_frames(3, 4) == [0, 1, 2]


def test_columns_and_rows_hold_the_right_pixels(tmp_path):
    a = _clip(-1.0)
    a[0, 5] = 1.0                          # frame 5 of the input is red
    b = _clip(1.0)                         # white
    sheet = contact_sheet([("input", a), ("output", b), ("difference", difference(a, b))], frames=[0, 5],
                          caption="PSNR 12.0 dB", scale=2)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3
    top, label_w, cell_h, cell_w, gap = 28 + 22, 64, 32, 48, 6
    assert tuple(sheet[top + 10, label_w + 10]) == (0, 0, 0)                       # input frame 0: black
    assert tuple(sheet[top + cell_h + gap + 10, label_w + 10]) == (255, 0, 0)     # input frame 5: red
    assert tuple(sheet[top + 10, label_w + cell_w + gap + 10]) == (255, 255, 255)  # output: white
    assert tuple(sheet[top + 10, label_w + 2 * (cell_w + gap) + 10]) == (255, 255, 255)  # |diff| saturated
    path = save_contact_sheet(tmp_path / "x" / "sheet.png", [("a", a), ("b", b)])
    assert Image.open(path).size[0] > 2 * 24


def test_mismatched_videos_are_named():
    with pytest.raises(ValueError, match="same frames and size"):
        contact_sheet([("a", _clip(0.0)), ("b", _clip(0.0, h=8))])
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        contact_sheet([("a", torch.zeros(2, 2))])
