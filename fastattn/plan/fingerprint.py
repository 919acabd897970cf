"""A cheap fingerprint of a model's weights (recorded in a plan, compared by the compatibility check).

Apart from the plan format because it reads tensors (torch), which the format itself never does.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable


def weights_fingerprint(named_tensors: Iterable[tuple[str, Any]], sample_tensors: int = 4,
                        sample_elements: int = 4096, per_tensor_samples: int = 64) -> str:
    """A cheap fingerprint of a model's weights.

    Hashes every tensor's name, shape and dtype, ``per_tensor_samples`` evenly strided
    elements of every tensor, and the first ``sample_elements`` elements of a few tensors
    spread over the model. Different checkpoints, fine-tunes and merged LoRAs change it; it
    reads a few KB per tensor at most instead of the whole model.
    """
    items = sorted(named_tensors, key=lambda kv: kv[0])
    digest = hashlib.sha256()
    for name, tensor in items:
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        numel = tensor.numel()
        if numel:
            stride = max(1, numel // per_tensor_samples)
            digest.update(_tensor_bytes(tensor, stride, per_tensor_samples))
    if items:
        count = min(sample_tensors, len(items))
        picks = sorted({round(k * (len(items) - 1) / max(count - 1, 1)) for k in range(count)})
        for index in picks:
            name, tensor = items[index]
            digest.update(name.encode())
            digest.update(_tensor_bytes(tensor, 1, sample_elements))
    return "sha256:" + digest.hexdigest()


def _tensor_bytes(tensor: Any, stride: int, count: int) -> bytes:
    try:
        flat = tensor.detach().reshape(-1)[::stride][:count].to("cpu").contiguous()
    except Exception:  # exotic tensor subclasses (quantized wrappers): shape/dtype only
        return b""
    try:
        return flat.view(dtype=_uint8()).numpy().tobytes()
    except (RuntimeError, TypeError):  # dtypes numpy cannot hold: hash a float32 copy
        return flat.float().numpy().tobytes()


def _uint8():
    import torch

    return torch.uint8
