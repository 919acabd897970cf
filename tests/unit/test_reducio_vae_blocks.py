"""Windowed attention paths checked against straightforward per-window loops."""
import math

import torch
import torch.nn.functional as F

from reducio.vae.blocks import CrossAttention, SelfAttention, sinusoid_table


def reference_attention(q, k, v, heads):
    """Plain softmax(q k^T / sqrt(d)) v on [N, C] token matrices, heads split head-major."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        qs, ks, vs = (t[:, h * d : (h + 1) * d] for t in (q, k, v))
        out.append(torch.softmax(qs @ ks.T / math.sqrt(d), dim=-1) @ vs)
    return torch.cat(out, dim=-1)


def test_windowed_2d_self_attention_matches_loop():
    torch.manual_seed(0)
    block = SelfAttention(64, dims=2, heads=8, window=(4, 4)).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 64, 6, 10)
    with torch.no_grad():
        out = block(x)
        h = F.pad(block.norm(x), (0, 2, 0, 2))  # zero-padded to 8x12 after the norm
        result = torch.zeros(1, 64, 8, 12)
        for top in range(0, 8, 4):
            for left in range(0, 12, 4):
                win = h[:, :, top : top + 4, left : left + 4]
                q, k, v = (conv(win)[0].flatten(1).T for conv in (block.q, block.k, block.v))
                att = reference_attention(q, k, v, 8)
                result[0, :, top : top + 4, left : left + 4] = att.T.reshape(64, 4, 4)
        expected = x + block.proj_out(result[:, :, :6, :10])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_windowed_cross_attention_matches_loop():
    torch.manual_seed(1)
    attn = CrossAttention(query_dim=64, context_dim=32, heads=1, window=(4, 4)).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 64, 3, 5, 7)       # video 5x7 per frame, 3 frames
    context = torch.randn(1, 32, 10, 14)  # content 10x14 > 4x4 -> windows
    # 5*7 = 35 >= 16 video positions and 140 > 16 content positions: windows are used
    assert attn.uses_windows((5, 7), (10, 14))
    assert not attn.uses_windows((3, 3), (10, 14))
    with torch.no_grad():
        out = attn(x, context)
        # the video-side window at this size is (ceil(4*5/10), ceil(4*7/14)) = (2, 2) latent cells
        xp = F.pad(x, (0, 1, 0, 1))                 # 6x8
        cp = F.pad(context, (0, 2, 0, 2))           # 12x16
        result = torch.zeros(1, 3, 6, 8, 64)
        for i in range(3):
            for j in range(4):
                xv = xp[0, :, :, i * 2 : i * 2 + 2, j * 2 : j * 2 + 2].flatten(1).T  # (t,h,w) tokens
                cv = cp[0, :, i * 4 : i * 4 + 4, j * 4 : j * 4 + 4].flatten(1).T
                att = reference_attention(attn.to_q(xv), attn.to_k(cv), attn.to_v(cv), 1)
                result[0, :, i * 2 : i * 2 + 2, j * 2 : j * 2 + 2] = att.reshape(3, 2, 2, 64)
        expected = attn.to_out[0](result[:, :, :5, :7].reshape(1, -1, 64))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sinusoid_table_values():
    table = sinusoid_table(4, 8)
    assert table[0, 0] == 0 and table[0, 1] == 1
    torch.testing.assert_close(table[3, 2], torch.tensor(math.sin(3 / 10000 ** (2 / 8))))
    torch.testing.assert_close(table[3, 3], torch.tensor(math.cos(3 / 10000 ** (2 / 8))))
