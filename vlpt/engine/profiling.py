"""Measuring a training step: its FLOPs (`step_flops`, counted on a sub-batch `flop_batch`) and the CPU memory it
grows (`RSSPeak`); `benchmarks/train_throughput.py` prints them beside samples/s."""
from __future__ import annotations

import resource
import sys
from contextlib import nullcontext

import torch

from vlpt.config import Config
from vlpt.engine.fit import forward_backward


class RSSPeak:
    """CPU memory: peak resident set size growth over a baseline, in bytes.

    Linux: writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) to the current RSS, so the peak
    is measured from `reset()` on. Elsewhere (or if that file is not writable) it falls back to
    getrusage's ru_maxrss, the peak of the whole process's life, which an earlier, larger peak can hide.
    """

    def __init__(self):
        self.how = "VmHWM"
        try:
            self._clear()
            self._status("VmHWM")
        except OSError:
            self.how = "ru_maxrss"

    @staticmethod
    def _clear() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"no {key} in /proc/self/status")

    def _peak(self) -> int:
        if self.how == "VmHWM":
            return self._status("VmHWM")
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def reset(self) -> None:
        if self.how == "VmHWM":
            self._clear()
            self.base = self._status("VmRSS")
        else:
            self.base = self._peak()

    def growth(self) -> int:
        return self._peak() - self.base


def flop_batch(batch_size: int, most: int) -> int:
    """The batch the FLOPs are counted on: the largest divisor of `batch_size` not above `most`."""
    return max(b for b in range(1, min(batch_size, most) + 1) if batch_size % b == 0)


def step_flops(ddp, model, batches, step: int, cfg: Config, device: torch.device) -> int:
    """FLOPs of one step's forward + backward (student and teacher passes; matmuls, convolutions and attention,
    which FlopCounterMode counts; elementwise ops and the optimiser are not). Attention runs through the math
    backend here so that every device's kernels are counted alike (the fused kernels do the same matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    with counter, sdpa_kernel(SDPBackend.MATH), eager:  # compiled blocks run eagerly here: the same matmuls
        forward_backward(ddp, model, batches, step, cfg, device)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
