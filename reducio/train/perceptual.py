"""Pluggable perceptual term of the VAE objective.

A perceptual loss is any callable ``(x, y) -> [N]`` on images ``[N, 3, H, W]`` in [-1, 1]. The
official objective uses LPIPS (VGG16, taming-transformers layout) with weight 0.1; no pretrained
network can be downloaded at run time, so it is only used when the user supplies the weights:

* :func:`load_lpips` reads one safetensors file with the taming LPIPS keys (``net.slice{1..5}.*`` =
  torchvision VGG16 ``features`` indices, ``lin{0..4}.model.1.weight``), strictly;
* :func:`convert_lpips` builds that file from torchvision's ``vgg16-397923af.pth`` and the LPIPS
  linear layers ``vgg.pth`` (both read with ``torch.load(weights_only=True)``):
  ``python -m reducio.train lpips --vgg vgg16.pth --lin vgg.pth --out lpips.safetensors``.

Without weights the perceptual term is off (weight 0) and the run says so.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .errors import TrainingError

VGG_CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16.features index ranges of the five LPIPS slices
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> list[nn.Module]:
    layers, in_ch = [], 3
    for block, (width, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if block:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = width
    return layers                       # indices match torchvision's vgg16().features[0:30]


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        features = _vgg16_features()
        self.net = nn.Module()
        for k, (start, stop) in enumerate(SLICES, start=1):
            part = nn.Sequential()
            for index in range(start, stop):
                part.add_module(str(index), features[index])
            setattr(self.net, f"slice{k}", part)
        for k, channels in enumerate(VGG_CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_x, h_y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = 0.0
        for k in range(len(SLICES)):
            part = getattr(self.net, f"slice{k + 1}")
            h_x, h_y = part(h_x), part(h_y)
            n_x = h_x / (h_x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n_y = h_y / (h_y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{k}").model((n_x - n_y).pow(2)).mean(dim=(2, 3))
        return total.reshape(-1)


def load_lpips(path: str | os.PathLike) -> LPIPS:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise TrainingError(f"LPIPS weights not found: {path}; build them with `python -m reducio.train lpips` "
                            f"or train without --perceptual-weights")
    state = {k: v for k, v in load_file(os.fspath(path)).items() if not k.startswith("scaling_layer.")}
    model = LPIPS()
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise TrainingError(f"{path} is not an LPIPS (VGG16) weight file: missing {missing[:4]}, unexpected "
                            f"{unexpected[:4]}, wrong shapes {wrong[:4]}")
    model.load_state_dict(state, strict=True)
    return model


def convert_lpips(vgg_path, lin_path, out_path) -> None:
    """torchvision vgg16 weights + LPIPS lin layers -> one safetensors file for :func:`load_lpips`."""
    from ..files import atomic_write_safetensors

    vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    tensors = {}
    for k, (start, stop) in enumerate(SLICES, start=1):
        for index in range(start, stop):
            for suffix in ("weight", "bias"):
                key = f"features.{index}.{suffix}"
                if key in vgg:
                    tensors[f"net.slice{k}.{index}.{suffix}"] = vgg[key].float()
    for key, value in lin.items():
        if key.startswith("lin") and key.endswith("model.1.weight"):
            tensors[key] = value.float()
    atomic_write_safetensors(tensors, {"format": "lpips-vgg16"}, out_path, overwrite=True, create_folder=True)
    load_lpips(out_path)     # refuse a file that would not load


def per_frame(perceptual, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Apply an image perceptual loss to videos ``[B, 3, T, H, W]`` frame by frame -> ``[B, 1, T, 1, 1]``."""
    batch, _, frames = x.shape[:3]
    fold = lambda v: v.permute(0, 2, 1, 3, 4).reshape(batch * frames, *v.shape[1:2], *v.shape[3:])  # noqa: E731
    return perceptual(fold(x), fold(y)).reshape(batch, 1, frames, 1, 1)
