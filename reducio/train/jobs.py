"""Run several ``reducio.train`` commands in one ``torchrun`` launch (one process group, one start-up):

    torchrun --nproc_per_node 2 -m reducio.train.jobs JOBS.json

JOBS.json is a list of argument lists; each is run as ``python -m reducio.train ARGS``. Used by the
distributed tests and benchmarks, where process start-up would otherwise dominate.
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist

from .cli import main


def run_jobs(path: str) -> int:
    with open(path, encoding="utf-8") as handle:
        jobs = json.load(handle)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        for argv in jobs:
            code = main(argv)
            if code != 0:
                return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_jobs(sys.argv[1]))
