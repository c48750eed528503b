"""torch.distributed helpers that are identities in a single process."""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from vlpt.engine import rng

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def seed_rank(seed: int) -> None:
    """Give each rank its own random stream, once the model is built (alike on every rank): dropout, drop-path and
    the loader workers' augmentation then draw independently on each rank's slice of the batch instead of repeating
    rank 0's draws. Rank 0, and a single process, keep their stream."""
    if rank() > 0:
        torch.manual_seed(rng.seed_of("rank", seed, rank()))


def init(device: torch.device) -> None:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on GPU); nothing without torchrun."""
    if "RANK" not in os.environ or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    atexit.register(close)


def close() -> None:
    """Leave the process group, if in one. `init` registers it to run at exit, while the interpreter is whole: a
    process that exits in a group leaves gloo's worker threads holding tensors that interpreter finalisation then
    frees, which aborts it now and then ("terminate called without an active exception", then SIGSEGV; the rare
    crash of tests/test_parallel.py; pytorch/pytorch#190489)."""
    if is_distributed():
        dist.destroy_process_group()


def gather(x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, in rank order; with `grad`, gradients flow back to each rank."""
    if not is_distributed():
        return x
    if grad:
        return torch.cat(dist_fn.all_gather(x), 0)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def local_rows(n_local: int) -> slice:
    """This rank's rows of a tensor gathered with `gather`."""
    start = rank() * n_local
    return slice(start, start + n_local)


def mean_count(count: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a per-rank count: dividing a local sum by it makes DDP's gradient average a global mean."""
    if not is_distributed():
        return count
    count = count.detach().clone().float()
    dist.all_reduce(count)
    return count / world_size()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks, without gradient."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def gather_objects(obj) -> list:
    """A picklable object from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over ranks (for logging)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP (DTensor) parameter; the tensor itself otherwise."""
    return p.to_local() if DTensor is not None and isinstance(p, DTensor) else p


def local_row_slice(p: torch.Tensor) -> slice:
    """The rows of the full parameter that `local(p)` holds: FSDP2 shards dim 0 in `torch.chunk` pieces."""
    if DTensor is None or not isinstance(p, DTensor):
        return slice(None)
    chunk = -(-p.shape[0] // p.device_mesh.size())
    start = p.device_mesh.get_local_rank() * chunk
    return slice(start, start + p.to_local().shape[0])
