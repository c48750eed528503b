"""Downstream tasks: the `Task` protocol, its registry, and the two ways any task runs on any method's checkpoint,
`finetune` (through the one engine, `engine.fit`) and `evaluate`.

A task is a subclass in a file of its own, registered with its config dataclass (`@register("name", NameConfig)`,
a subclass of `TaskConfig` whose keys sit under `task.`). It builds its head on a method's encoders (`build`),
gives training batches (`batches`) and measures a split (`evaluate(model, split) -> metrics`); `select` names the
validation metric that keeps the best checkpoint. `vlpt finetune NAME` and `vlpt evaluate NAME` are generated
from the registry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from vlpt import methods
from vlpt.config import Config, ConfigError, TaskConfig, load_config
from vlpt.errors import VlptError
from vlpt.registry import Registry


registry = Registry("task", package="vlpt.tasks")
register = registry.register


class Task:
    name = ""
    config = TaskConfig
    trains = False  # whether it has a head to finetune (`vlpt finetune NAME`)
    select = ""     # the validation metric whose highest value keeps the best checkpoint
    options: tuple[str, ...] = ()  # config keys `vlpt evaluate NAME` takes as flags (--leaf-name)

    def __init__(self, cfg: Config, tokenizer, device: torch.device):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.data = Path(cfg.data.root)

    def build(self, method: nn.Module) -> nn.Module:
        """The task model: the method's encoders and the task's head (a `TaskModel`)."""
        raise VlptError(f"task '{self.name}' has nothing to finetune")

    def batches(self, start: int) -> Iterable[dict]:
        """Endless training batches from micro-batch `start` on."""
        raise VlptError(f"task '{self.name}' has nothing to finetune")

    def evaluate(self, model: nn.Module, split: str) -> dict:
        raise NotImplementedError

    def table(self, metrics: dict) -> str:
        """The printed form of `evaluate`'s metrics."""
        return "\n".join(f"{k:24s} {v}" for k, v in metrics.items())

    def save(self, metrics: dict, out: Path) -> None:
        """`evaluate`'s metrics as JSON in file `out`; a task that draws figures writes them next to it."""
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")


class TaskModel(nn.Module):
    """A method's encoders (`self.method`) with a task's head: what `engine.fit` trains for a task. Subclasses
    write `forward(batch, step)` and set `losses`."""

    losses: list[str] = []
    loss_weights: dict[str, float] = {}

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    @property
    def legacy_keys(self) -> dict[str, str]:
        return {f"method.{k}": f"method.{v}" for k, v in self.method.legacy_keys.items()}

    def after_step(self, step: int) -> None:
        self.method.after_step(step)

    def blocks(self) -> list[nn.Module]:
        return self.method.blocks()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.method.set_grad_checkpointing(enable)

    def may_leave_parameters_unused(self) -> bool:
        return True  # the pretraining heads a task does not use (MLM, ITM, ...) get no gradient


def finetune_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A task config on top of its checkpoint's: the checkpoint's model and method, then the task's YAML, then
    key=value overrides."""
    from vlpt.engine import checkpoint
    first = load_config(path, overrides)
    if not first.task.checkpoint:
        raise ConfigError("task.checkpoint is empty: give the pretraining checkpoint to start from (--checkpoint)")
    base = checkpoint.load_config(checkpoint.resolve(first.task.checkpoint))
    base.pop("task", None)
    return load_config(path, overrides, base={k: v for k, v in base.items() if k in ("model", "method")})


def finetune(cfg: Config) -> Path:
    """Train task `task.name` from the encoders of `task.checkpoint`, keep the best validation step, and write its
    test metrics to `<train.out>/metrics.json`; returns the run folder."""
    from vlpt.engine import checkpoint
    from vlpt.engine.fit import fit
    from vlpt.engine.runtime import setup
    from vlpt.data.tokenizer import Tokenizer

    task_cls = registry.get(cfg.task.name)
    if not task_cls.trains:
        raise VlptError(f"task '{task_cls.name}' has nothing to finetune: run `vlpt evaluate {task_cls.name}`")
    device = setup(cfg.train)
    source = checkpoint.resolve(cfg.task.checkpoint)
    tokenizer = Tokenizer(source / checkpoint.VOCAB, cfg.model.text.preprocess)
    resume = checkpoint.resolve(cfg.train.resume, cfg.train.out) if cfg.train.resume else None
    torch.manual_seed(cfg.train.seed)
    method = methods.build(cfg, tokenizer.vocab_size)
    report_keys(source, checkpoint.load_weights(source, method, strict=False))
    task = task_cls(cfg, tokenizer, device)
    model = task.build(method).to(device)
    meta = {"method": cfg.method.name, "task": task.name,
            "heads": sorted({*checkpoint.read_meta(source).get("heads", []), task.name})}
    out = fit(model, cfg, device, task.batches, vocab=tokenizer.vocab_path, resume=resume,
              evaluate=lambda m: task.evaluate(m, "val"), select=task.select, meta=meta, desc=task.name)
    checkpoint.load_weights(out / "best", model)
    model.eval()
    metrics = {"protocol": "finetuned", "selected_step": checkpoint.read_meta(out / "best")["step"],
               **task.evaluate(model, "test")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def report_keys(path: Path, keys: tuple[list[str], list[str]]) -> None:
    """One line each for the weights a checkpoint lacks (initialised here) and those the model does not use."""
    missing, unexpected = keys
    for what, names in (("not in the checkpoint (initialised here)", missing),
                        ("in the checkpoint but unused", unexpected)):
        if names:
            print(f"{path}: {len(names)} weights {what}: {', '.join(names)}")


def load(task_cls: type[Task], path: str | Path, device, overrides: list[str] = ()):
    """(task, model in eval mode) from a checkpoint: a method's, or for a task that trains, one finetuned on it (its
    head recorded in meta.json; otherwise an error saying what to run first)."""
    from vlpt.engine import checkpoint

    path, cfg, tokenizer = checkpoint.open_checkpoint(path, [f"task.name={task_cls.name}", *overrides])
    task = task_cls(cfg, tokenizer, device)
    model = methods.build(cfg, tokenizer.vocab_size)
    if task_cls.trains:
        if task_cls.name not in checkpoint.read_meta(path).get("heads", []):
            raise VlptError(f"{path} has no trained '{task_cls.name}' head: run `vlpt finetune {task_cls.name} "
                            f"--checkpoint {path}` first")
        model = task.build(model)
    checkpoint.load_weights(path, model)
    return task, model.to(device).eval()


def evaluate_checkpoint(name: str, path: str | Path, device, split: str = "test", overrides: list[str] = ()):
    """(task, metrics) of task `name` on `split`, from a checkpoint; bf16 autocast on a GPU."""
    task, model = load(registry.get(name), path, device, overrides)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), torch.no_grad():
        return task, task.evaluate(model, split)
