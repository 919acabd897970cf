"""Training for Reducio: the VAE objective, feature precomputation and the DiT objective.

Command line (see docs/training.md)::

    python -m reducio.train vae    --data synthetic --model tiny --out runs/vae ...
    python -m reducio.train encode --vae runs/vae/final/model.safetensors --out features/ ...
    python -m reducio.train dit    --features features/ --model tiny --out runs/dit ...
    torchrun --nproc_per_node N -m reducio.train {vae,dit} ...   # DDP (VAE) / FSDP2 (DiT)

Everything here is pure PyTorch (+ PyAV / scikit-image through ``reducio.data``).
"""
from .errors import CheckpointWriteError, ConfigMismatchError, NonFiniteLossError, TrainingError, TrainingStopped

__all__ = ["CheckpointWriteError", "ConfigMismatchError", "NonFiniteLossError", "TrainingError", "TrainingStopped"]
