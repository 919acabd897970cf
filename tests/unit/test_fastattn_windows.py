"""Window specs: flash-attn semantics, grid windows, global text tokens, pair counts, key ranges."""

import itertools

import pytest
import torch

from fastattn.windows import CallInfo, GridWindow, Window1D, grid_window_fraction, window_1d_fraction


def brute_1d(n, left, right):
    """flash-attn 2 window_size normalisation written out literally (spec 3.1)."""
    if left >= n:
        left = -1
    if right >= n:
        right = -1
    if left < 0 and right >= 0:
        left = n
    if left >= 0 and right < 0:
        right = n
    if left < 0 and right < 0:
        return torch.ones(n, n, dtype=torch.bool)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            mask[i, j] = i - left <= j <= i + right
    return mask


@pytest.mark.parametrize(
    "left,right",
    [(-1, -1), (8, 8), (0, 0), (3, 5), (-8, 8), (8, -1), (64, 64), (100, 2), (0, 63), (63, 0)],
)
def test_window1d_matches_flash_attn_semantics(left, right):
    window = Window1D(left, right)
    expected = brute_1d(64, left, right)
    assert torch.equal(window.mask(64), expected)
    assert window.kept_pairs(64) == int(expected.sum())
    assert window.kept_fraction(64) == pytest.approx(expected.float().mean().item())
    assert window.is_full(64) == bool(expected.all())


def test_official_window_fraction_is_about_a_quarter():
    # DiT-XL-2-512: N = 1024, w = 128 per side -> ~23.5 % of the scores (spec 1.3)
    # closed form of spec 3.2: N(l+r+1) - l(l+1)/2 - r(r+1)/2
    assert Window1D(128, 128).kept_pairs(1024) == 1024 * 257 - 128 * 129
    assert Window1D(128, 128).kept_fraction(1024) == pytest.approx(0.235, abs=0.001)
    # the pre-fix [-w, w] reading keeps ~62 %
    assert Window1D(-128, 128).kept_fraction(1024) == pytest.approx(0.62, abs=0.01)


@pytest.mark.parametrize("prefix,suffix", [(5, 0), (0, 7), (3, 4)])
def test_text_tokens_stay_global(prefix, suffix):
    n_image = 20
    window = Window1D(2, 3, prefix_tokens=prefix, suffix_tokens=suffix)
    length = prefix + n_image + suffix
    mask = window.mask(length)
    image = slice(prefix, prefix + n_image)
    assert torch.equal(mask[image, image], brute_1d(n_image, 2, 3))  # band on image indices
    text = torch.ones(length, dtype=torch.bool)
    text[image] = False
    assert mask[text].all() and mask[:, text].all()  # arrow: text rows and columns kept
    assert window.kept_pairs(length) == int(mask.sum())


def brute_grid(grid, radius):
    grid3 = grid if len(grid) == 3 else (1,) + tuple(grid)
    radius3 = radius if len(radius) == 3 else (0,) + tuple(radius)
    coords = list(itertools.product(*(range(n) for n in grid3)))
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            mask[i, j] = all(r < 0 or abs(x - y) <= r for x, y, r in zip(a, b, radius3))
    return mask


@pytest.mark.parametrize(
    "grid,radius", [((4, 6), (1, 2)), ((5, 5), (0, 0)), ((3, 4, 5), (1, 1, 2)), ((2, 3, 4), (-1, 0, 1)), ((4, 4), (9, 9))]
)
def test_grid_window_mask_and_counts(grid, radius):
    window = GridWindow(grid, radius)
    n = 1
    for size in grid:
        n *= size
    expected = brute_grid(grid, radius)
    assert torch.equal(window.mask(n), expected)
    assert window.kept_pairs(n) == int(expected.sum())


def test_grid_window_with_text_prefix_and_suffix():
    window = GridWindow((3, 4), (1, 1), prefix_tokens=2, suffix_tokens=3)
    mask = window.mask(2 + 12 + 3)
    assert torch.equal(mask[2:14, 2:14], brute_grid((3, 4), (1, 1)))
    assert mask[:2].all() and mask[14:].all() and mask[:, :2].all() and mask[:, 14:].all()
    assert window.kept_pairs(17) == int(mask.sum())


def test_grid_window_rejects_wrong_token_count():
    window = GridWindow((4, 4), (1, 1), prefix_tokens=1)
    with pytest.raises(ValueError, match="needs 16 image tokens"):
        window.mask(16)


def test_invalid_specs_raise_clear_errors():
    with pytest.raises(ValueError, match="grid"):
        GridWindow((4,), (1,))
    with pytest.raises(ValueError, match="radius"):
        GridWindow((4, 4), (1,))
    with pytest.raises(ValueError, match="text tokens"):
        Window1D(2, 2, prefix_tokens=-1)
    with pytest.raises(TypeError):
        Window1D(2.5, 2)
    with pytest.raises(ValueError, match="shorter"):
        Window1D(2, 2, prefix_tokens=10).mask(5)


@pytest.mark.parametrize(
    "window,length",
    [
        (Window1D(5, 3), 50),
        (Window1D(-4, 4), 50),
        (Window1D(5, 5, prefix_tokens=6, suffix_tokens=2), 40),
        (GridWindow((5, 6), (1, 2)), 30),
        (GridWindow((3, 4, 5), (1, 1, 1), prefix_tokens=4), 64),
        (GridWindow((3, 4, 5), (0, 2, 1), suffix_tokens=3), 63),
    ],
)
@pytest.mark.parametrize("block", [1, 7, 16])
def test_key_ranges_cover_every_kept_pair(window, length, block):
    """The chunked kernel only looks at key_ranges; they must contain every kept key."""
    mask = window.mask(length)
    for start in range(0, length, block):
        end = min(start + block, length)
        covered = torch.zeros(length, dtype=torch.bool)
        for a, b in window.key_ranges(start, end, length):
            assert 0 <= a < b <= length
            covered[a:b] = True
        assert not (mask[start:end] & ~covered).any()


def test_row_mask_with_key_subset():
    window = GridWindow((4, 5), (1, 1))
    keys = torch.tensor([0, 3, 7, 19])
    rows = torch.tensor([2, 8])
    assert torch.equal(window.row_mask(rows, 20, keys), window.mask(20)[rows][:, keys])


def test_window_factories():
    info = CallInfo(layer=0, step=0, seq_len=1024 + 77, prefix_tokens=77)
    window = window_1d_fraction(1 / 8)(info)
    assert window == Window1D(128, 128, prefix_tokens=77)
    grid_info = CallInfo(layer=0, step=0, seq_len=4 * 16 * 16, token_grid=(4, 16, 16))
    grid = grid_window_fraction(0.25)(grid_info)
    assert isinstance(grid, GridWindow) and grid.grid == (4, 16, 16)
    assert 0.1 < grid.kept_fraction(1024) < 0.4
    # no grid known -> the 1-D window with the same share
    assert grid_window_fraction(0.25)(info) == Window1D(128, 128, prefix_tokens=77)
    with pytest.raises(ValueError):
        grid_window_fraction(0.0)


@pytest.mark.parametrize(
    "window,length",
    [
        (GridWindow((6, 7), (2, 1)), 42),
        (GridWindow((3, 4, 5), (1, 2, 1), prefix_tokens=3), 63),
        (GridWindow((2, 8, 8), (-1, 2, 3), suffix_tokens=4), 132),
        (GridWindow((5, 5), (0, 0)), 25),
    ],
)
def test_grid_tiles_partition_queries_and_cover_kept_keys(window, length):
    mask = window.mask(length)
    start, end = window.image_range(length)
    seen = torch.zeros(length, dtype=torch.int64)
    for query_index, key_index in window.blocks(length, min_queries=4):
        seen[query_index] += 1
        covered = torch.zeros(length, dtype=torch.bool)
        covered[key_index] = True
        assert not (mask[query_index] & ~covered).any()
        assert len(torch.unique(key_index)) == len(key_index)
    assert (seen[start:end] == 1).all() and (seen[:start] == 0).all() and (seen[end:] == 0).all()


def test_both_window_kinds_satisfy_the_protocol():
    from fastattn.windows import WindowSpec

    assert isinstance(Window1D(1, 1), WindowSpec)
    assert isinstance(GridWindow((2, 2), (1, 1)), WindowSpec)
