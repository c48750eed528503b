"""Where a run executes: the device, this process's place in torchrun's group, and mixed precision."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from vlpt.engine import distributed


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.is_distributed():
        name = f"cuda:{distributed.rank() % torch.cuda.device_count()}"
    return torch.device(name)


def setup(train) -> torch.device:
    """Threads, torchrun's process group (gloo on CPU, NCCL on GPU) and this rank's device, from `train.*`."""
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    distributed.init(pick_device(train.device))  # the backend follows the device type
    device = pick_device(train.device)            # now with this rank's GPU
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL and FSDP use the current device
    return device


def autocast(device: torch.device, precision: str):
    """bf16 autocast for `bf16`, and for `auto` on a GPU; nothing for fp32 (and `auto` on the CPU)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
