"""Process-group set-up for ``torchrun``: gloo on CPU, NCCL on GPU; the helpers the trainers need.

A single process (no ``WORLD_SIZE`` in the environment) runs without a process group: every helper
then degenerates to the identity, so the same trainer code serves 1 and N processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False     # created by setup() (and so destroyed by teardown())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a float tensor (a copy; the input is unchanged)."""
        out = values.detach().clone()
        if self.active:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            out /= self.world
        return out

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        out = values.detach().clone()
        if self.active:
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str = "auto") -> Distributed:
    """Initialise from the torchrun environment. ``device``: auto (CUDA if present), cpu or cuda."""
    want_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        from .errors import TrainingError

        raise TrainingError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if want_cuda else "gloo"
    if want_cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return Distributed(rank=rank, world=world, local_rank=local_rank, backend=backend, owns_group=owns,
                       device=torch.device(f"cuda:{local_rank}" if want_cuda else "cpu"))


def teardown(info: Distributed) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
