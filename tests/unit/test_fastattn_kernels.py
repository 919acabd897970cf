"""Kernels: golden window semantics, fast paths agree with the masked reference, layouts."""


import pytest
import torch

from fastattn import kernels
from fastattn.kernels import (
    banded_window_attention,
    choose_backend,
    flex_window_attention,
    from_bhld,
    masked_reference_window_attention,
    reference_attention,
    to_bhld,
    window_attention,
)
from fastattn.windows import GridWindow, Window1D

from testkit.golden import golden_path

GOLDEN = golden_path("fastattn")
WINDOW_CASES = {
    "full": (-1, -1),
    "win_8_8": (8, 8),
    "win_0_0": (0, 0),
    "win_3_5": (3, 5),
    "win_neg8_8": (-8, 8),
    "win_8_neg1": (8, -1),
    "win_64_64": (64, 64),
}


@pytest.fixture(scope="module")
def golden_window():
    path = GOLDEN / "window_kernel.safetensors"
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
@pytest.mark.parametrize("backend", ["reference", "banded", "auto"])
def test_golden_window_kernel(golden_window, case, backend):
    q, k, v = (to_bhld(golden_window[name], "blhd") for name in "qkv")
    out = window_attention(q, k, v, Window1D(*WINDOW_CASES[case]), backend=backend)
    expected = golden_window[f"out_{case}"]
    torch.testing.assert_close(from_bhld(out, "blhd"), expected, atol=1e-5, rtol=0)


def test_golden_window_kernel_with_small_blocks(golden_window):
    q, k, v = (to_bhld(golden_window[name], "blhd") for name in "qkv")
    for case, (left, right) in WINDOW_CASES.items():
        for block in (1, 5, 64):
            out = banded_window_attention(q, k, v, Window1D(left, right), block_size=block)
            torch.testing.assert_close(from_bhld(out, "blhd"), golden_window[f"out_{case}"], atol=1e-5, rtol=0)


def random_qkv(batch=2, heads=3, length=96, dim=8, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) for _ in range(3)]


WINDOWS = [
    (Window1D(7, 7), 96),
    (Window1D(2, 11), 96),
    (Window1D(-5, 5), 96),
    (Window1D(6, 6, prefix_tokens=10), 96),
    (Window1D(6, 6, suffix_tokens=9), 96),
    (Window1D(4, 4, prefix_tokens=5, suffix_tokens=7), 96),
    (GridWindow((8, 12), (2, 3)), 96),
    (GridWindow((4, 4, 6), (1, 1, 2)), 96),
    (GridWindow((2, 5, 8), (0, 1, 2), prefix_tokens=16), 96),
    (GridWindow((8, 10), (1, 2), suffix_tokens=16), 96),
]


@pytest.mark.parametrize("window,length", WINDOWS)
@pytest.mark.parametrize("block", [None, 1, 13, 40])
def test_banded_agrees_with_reference(window, length, block):
    q, k, v = random_qkv(length=length)
    expected = masked_reference_window_attention(q, k, v, window)
    torch.testing.assert_close(banded_window_attention(q, k, v, window, block_size=block), expected, atol=1e-5, rtol=1e-5)


def test_reference_mask_is_true_masked_softmax():
    q, k, v = random_qkv(batch=1, heads=1, length=20, dim=4, dtype=torch.float64)
    window = Window1D(3, 2)
    scores = (q @ k.transpose(-1, -2)) / 2.0
    scores = scores.masked_fill(~window.mask(20), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    torch.testing.assert_close(masked_reference_window_attention(q, k, v, window), expected)


@pytest.mark.parametrize("window,length", [WINDOWS[0], WINDOWS[3], WINDOWS[7]])
def test_flex_eager_agrees_with_reference(window, length):
    q, k, v = random_qkv(length=length)
    expected = masked_reference_window_attention(q, k, v, window)
    torch.testing.assert_close(flex_window_attention(q, k, v, window, compile=False), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_compiled_agrees_with_reference():
    q, k, v = random_qkv(length=128)
    window = Window1D(16, 16, prefix_tokens=8)
    expected = masked_reference_window_attention(q, k, v, window)
    torch.testing.assert_close(flex_window_attention(q, k, v, window), expected, atol=1e-5, rtol=1e-5)


def test_full_window_short_circuits_to_plain_attention():
    q, k, v = random_qkv()
    assert torch.equal(window_attention(q, k, v, Window1D(-1, -1)), reference_attention(q, k, v))


def test_auto_backend_on_cpu_is_banded():
    q, _, _ = random_qkv()
    assert choose_backend(q, Window1D(4, 4)) == "banded"
    assert "banded" in kernels.available_backends("cpu")


def test_unknown_backend_and_cross_attention_rejected():
    q, k, v = random_qkv()
    with pytest.raises(ValueError, match="backend"):
        window_attention(q, k, v, Window1D(4, 4), backend="magic")
    with pytest.raises(ValueError, match="self-attention"):
        window_attention(q, k[:, :, :50], v[:, :, :50], Window1D(4, 4))


def test_flash_backend_fails_clearly_without_flash_attn():
    if kernels.flash_attn_available():
        pytest.skip("flash_attn is installed")
    q, k, v = random_qkv()
    with pytest.raises(RuntimeError, match="flash_attn"):
        window_attention(q, k, v, Window1D(4, 4), backend="flash")


@pytest.mark.parametrize("layout", ["blc", "bhld", "blhd"])
def test_layout_round_trip(layout):
    q, _, _ = random_qkv(batch=2, heads=3, length=10, dim=4)
    converted = from_bhld(q, layout)
    assert torch.equal(to_bhld(converted, layout, heads=3), q)


def test_blc_layout_channel_order_is_head_major():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6)  # heads=2, dim=3
    bhld = to_bhld(x, "blc", heads=2)
    assert torch.equal(bhld[:, 1, :, :], x[:, :, 3:6])


def test_layout_errors():
    with pytest.raises(ValueError, match="heads"):
        to_bhld(torch.zeros(1, 4, 6), "blc")
    with pytest.raises(ValueError, match="divisible"):
        to_bhld(torch.zeros(1, 4, 7), "blc", heads=2)
    with pytest.raises(ValueError, match="layout"):
        to_bhld(torch.zeros(1, 4, 6), "lbc")
    with pytest.raises(ValueError, match="4-D"):
        to_bhld(torch.zeros(1, 4, 6), "bhld")


def test_half_precision_banded_agrees():
    q, k, v = random_qkv(length=64, dtype=torch.bfloat16)
    window = Window1D(8, 8)
    expected = masked_reference_window_attention(q, k, v, window)
    out = banded_window_attention(q, k, v, window, block_size=16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_flex_degrades_to_eager_when_compile_fails(monkeypatch):
    def broken_compile():
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr(kernels, "_compiled_flex_attention", broken_compile)
    q, k, v = random_qkv(length=64)
    window = Window1D(5, 5)
    with pytest.warns(UserWarning, match="eagerly"):
        out = flex_window_attention(q, k, v, window)
    torch.testing.assert_close(out, masked_reference_window_attention(q, k, v, window), atol=1e-5, rtol=1e-5)
    kernels.compiled_flex_works.cache_clear()
    with pytest.warns(UserWarning, match="banded"):
        assert not kernels.compiled_flex_works("cpu")
    kernels.compiled_flex_works.cache_clear()
