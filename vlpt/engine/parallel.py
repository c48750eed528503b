"""How the model runs: gradient checkpointing and `torch.compile` of the blocks the model lists (`blocks()`), and how
torchrun ranks share it (`train.parallel`: DDP replicas or FSDP2 shards); the model and optimiser state in one portable format.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every transformer block (ViT blocks, text and fusion layers) as
its own unit and the rest of the model (embeddings, projections, heads, the temperature) as the root unit, whose
weights stay gathered from the root's forward to the end of its backward. The momentum teacher is sharded exactly
like the student: FSDP2 shards each parameter alone along dim 0, so a teacher parameter's local shard holds the same
elements as its student's, and the EMA update (`MomentumTeacher.update`) runs shard by shard with no communication.
The teacher's blocks are FSDP units too, gathered for their (no-grad) forward and freed after it. Queues are buffers,
which FSDP leaves unsharded: every rank pushes the same gathered features, as under DDP.

Checkpoints are the same in every mode: full (unsharded) weights and an optimiser state keyed by parameter name,
gathered to rank 0 and written there. A run may resume under another mode or number of ranks.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlpt.engine import distributed
from vlpt.errors import VlptError

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover - older torch: DDP only
    FSDPModule = fully_shard = None


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` each of the model's `blocks()` and its MLM heads in place (regional compilation: one graph
    serves all blocks of a kind; state-dict names do not change). Text lengths and masked-token counts vary per
    batch: dynamic shapes."""
    from vlpt.models.text import MLMHead
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for m in [*model.blocks(), *(m for m in model.modules() if isinstance(m, MLMHead))]:
        m.compile()


def is_fsdp(module: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


def shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2 in place: each block its own unit, the root unit for the rest; the teacher sharded like the student."""
    if fully_shard is None:
        raise RuntimeError(f"train.parallel=fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6); "
                           f"this is torch {torch.__version__}")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    for block in model.blocks():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        teacher.check_layout()


def prepare(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Apply `train.grad_checkpointing`, `train.compile` and, under torchrun, `train.parallel` to `model` (in place;
    before the optimiser is built: FSDP replaces the parameters). Returns the module the step calls: the DDP
    wrapper, or the model itself."""
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing()
    if cfg.train.compile:
        compile_blocks(model)
    if not distributed.is_distributed():
        return model
    if cfg.train.parallel == "fsdp":
        shard(model, device)
        return model
    # an ablation (e.g. losses: [itc]) leaves the fusion encoder and heads without gradient: DDP must look for them
    return DistributedDataParallel(model, find_unused_parameters=model.may_leave_parameters_unused())


@contextmanager
def grad_sync(module: nn.Module, enabled: bool):
    """Reduce gradients across ranks in this backward (`enabled`) or only accumulate them locally."""
    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
    elif is_fsdp(module):
        module.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the norm before clipping as a plain tensor (FSDP: over all shards)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if distributed.DTensor is not None and isinstance(norm, distributed.DTensor) else norm


# --- state in one format for every mode -----------------------------------------------------------------------------
def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full weights (teacher and queues included) on the CPU, on rank 0; None on other ranks. Under FSDP every rank
    must call it (the shards are gathered)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(model, options=_options(cpu_offload=True))
        return state if distributed.is_main() else None
    if not distributed.is_main():
        return None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimiser state keyed by parameter name (`state` and `param_groups[i]['params']` hold names), on rank 0;
    None on other ranks. The same layout in every mode, so a checkpoint resumes under any mode."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
        return state if distributed.is_main() else None
    if not distributed.is_main():
        return None
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()  # parameters numbered in param_groups order
    return {"state": {names[id(params[i])]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[id(params[i])] for i in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore `optimizer_state` (every rank reads the whole file); also takes an index-keyed state (older
    checkpoints) in a single process or under DDP."""
    keyed_by_name = all(isinstance(k, str) for k in state["state"]) and \
        all(isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if is_fsdp(model):
        if not keyed_by_name:
            raise VlptError("this checkpoint's optimiser state is keyed by index (an older format): resume it "
                             "with train.parallel=ddp or in one process")
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=_options())
        return
    if keyed_by_name:
        index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        params = dict(model.named_parameters())
        number = {name: index[id(params[name])] for g in state["param_groups"] for name in g["params"]}
        state = {"state": {number[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in state["param_groups"]]}
    optimizer.load_state_dict(state)
