"""EMA teacher of any set of modules: one implementation for every method (ALBEF Sec. 3.3, MoCo)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from vlpt.engine.distributed import local


class MomentumTeacher(nn.Module):
    """Frozen copies of named student modules, updated as teacher <- m * teacher + (1 - m) * student.

    Registered as a submodule so its weights travel with `state_dict()` (checkpoints, resume); receives no gradient.
    """

    def __init__(self, students: dict[str, nn.Module], momentum: float):
        super().__init__()
        self.momentum = momentum
        self.copies = nn.ModuleDict({name: copy.deepcopy(module) for name, module in students.items()})
        self.copies.requires_grad_(False)
        self._students = list(students.values())  # a plain list: not registered, not saved twice

    @torch.no_grad()
    def reset(self) -> None:
        """Every copy set to its student's current weights (a teacher starts from loaded weights, not random ones)."""
        for t, s in zip(*self._pairs()):
            t.copy_(s)

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def _pairs(self):
        teacher = [p for m in self.copies.values() for p in m.parameters()]
        student = [p for m in self._students for p in m.parameters()]
        return teacher, student

    def check_layout(self) -> None:
        """Under FSDP: every teacher parameter is sharded like its student, so the EMA can run shard by shard."""
        for t, s in zip(*self._pairs()):
            if getattr(t, "placements", None) != getattr(s, "placements", None) or local(t).shape != local(s).shape:
                raise RuntimeError("momentum teacher and student are sharded differently")

    @torch.no_grad()
    def update(self) -> None:
        """The EMA step, on this rank's shards when the model is sharded (FSDP): no communication."""
        teacher, student = self._pairs()
        if not teacher:  # a method without a teacher (MaskVLM)
            return
        teacher = [local(t) for t in teacher]
        torch._foreach_mul_(teacher, self.momentum)
        torch._foreach_add_(teacher, [local(s.detach()) for s in student], alpha=1.0 - self.momentum)
