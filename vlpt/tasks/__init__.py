"""Downstream tasks: a registry of name -> Task with its config dataclass; the built-in ones register on first use."""
from __future__ import annotations

from vlpt.tasks.base import Task, TaskModel, evaluate_checkpoint, finetune, register, registry  # noqa: F401
