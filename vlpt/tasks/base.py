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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from vlpt import methods
from vlpt.config import Config, ConfigError, TaskConfig, load_config, opt
from vlpt.engine.logging import read_metrics
from vlpt.errors import VlptError
from vlpt.models.decoder import Decoder
from vlpt.models.momentum import MomentumTeacher
from vlpt.registry import Registry


registry = Registry("task", package="vlpt.tasks")
register = registry.register


@dataclass
class SplitsConfig(TaskConfig):
    """Keys of a task that reads annotation files per split; each task gives its own default `files`."""
    files: str = opt("", "annotation files under data.root, '{split}' standing for train, the validation split and "
                     "test (ALBEF's: coco_{split}.json, ve_{split}.json, nlvr_{split}.json)")

    def split_file(self, root: str | Path, split: str) -> Path:
        return Path(root) / self.files.format(split=split)


class Task:
    name = ""
    config = TaskConfig
    trains = False  # whether it has a head to finetune (`vlpt finetune NAME`)
    zero_shot = False  # whether a trainable task also evaluates a checkpoint without its head (retrieval)
    select = ""     # the validation metric whose highest value keeps the best checkpoint
    options: tuple[str, ...] = ()  # config keys `vlpt evaluate NAME` takes as flags (--leaf-name)

    def __init__(self, cfg: Config, tokenizer, device: torch.device):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.data = Path(cfg.data.root)
        self.meta: dict = {}  # the meta.json of the checkpoint the evaluated model was loaded from

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

    label = ""  # the task's name in one-line summaries (`vlpt demo`)

    @staticmethod
    def headline(metrics: dict) -> tuple[str, float, str, float | None]:
        """(metric, its value, trivial baseline, its value or None) of test metrics: one row of `vlpt demo`."""
        raise NotImplementedError

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
        self.teacher: MomentumTeacher | None = None  # the task's own (`replace_teacher`)

    def replace_teacher(self, parts: dict[str, nn.Module] | None) -> None:
        """Drop the method's momentum teacher and queues (pretraining's) and, given `parts` (the modules the task
        runs, its head included), make a teacher of those, copied now: from `build`, which runs after the pretrained
        weights are loaded, it starts as the loaded student (ALBEF's NLVR.py copies before loading: a random one)."""
        self.method.teacher = self.method.queues = None
        self.teacher = MomentumTeacher(parts, self.method.cfg.method.momentum) if parts else None

    def add_decoder(self, context_width: int, layers: int) -> bool:
        """`self.decoder`, the text decoder of a task that writes text: the method's pretrained one where it has one
        (`Method.pretrained_decoder`; its own depth and context width then, not `layers` and `context_width`), which
        stays the method's module (its weights once, under the method's keys, as pretraining wrote them), or else one
        made from the fusion layers, `layers` deep over contexts `context_width` wide (`Decoder.from_method`, ALBEF's
        VQA initialisation). Returns whether it is the pretrained one."""
        pretrained = self.method.pretrained_decoder()
        if pretrained is None:
            self.decoder = Decoder.from_method(self.method, context_width, layers)
            return False
        object.__setattr__(self, "decoder", pretrained)  # a reference: nn.Module would register it a second time
        return True

    @property
    def legacy_keys(self) -> dict[str, str]:
        return {f"method.{k}": f"method.{v}" for k, v in self.method.legacy_keys.items()}

    def after_step(self, step: int) -> None:
        self.method.after_step(step)
        if self.teacher is not None:
            self.teacher.update()

    def own_decoder(self) -> list[nn.Module]:
        """The text decoder `add_decoder` made for the task, where it made one; not the method's pretrained decoder,
        which the method's own blocks and checkpointing cover."""
        return [self._modules["decoder"]] if "decoder" in self._modules else []

    def blocks(self) -> list[nn.Module]:
        found = self.method.blocks() + [layer for d in self.own_decoder() for layer in d.layers]
        if self.teacher is not None:  # the blocks of its copies: a backbone's, a fusion encoder's layers
            found += [b for m in self.teacher.copies.values()
                      for b in (m.blocks() if hasattr(m, "blocks") else getattr(m, "layers", []))]
        return found

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.method.set_grad_checkpointing(enable)
        for decoder in self.own_decoder():
            decoder.set_grad_checkpointing(enable)

    def may_leave_parameters_unused(self) -> bool:
        return True  # the pretraining heads a task does not use (MLM, ITM, ...) get no gradient


def finetune_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A task config on top of its checkpoint's: the checkpoint's model, method and evaluation rule (`eval`: so a
    finetuned model is ranked as its zero-shot figures were, unless the task's YAML says otherwise), then the task's
    YAML, then key=value overrides."""
    from vlpt.engine import checkpoint
    first = load_config(path, overrides)
    if not first.task.checkpoint:
        raise ConfigError("task.checkpoint is empty: give the pretraining checkpoint to start from (--checkpoint)")
    base = checkpoint.load_config(checkpoint.resolve(first.task.checkpoint))
    return load_config(path, overrides, base={k: v for k, v in base.items() if k in ("model", "method", "eval")})


def finetune(cfg: Config) -> Path:
    """Train task `task.name` from the encoders of `task.checkpoint`, keep the best validation step (the last one
    where `task.val_split` is empty), and write its test metrics to `<train.out>/metrics.json`; returns the run
    folder."""
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
    resume = checkpoint.resolve(cfg.train.resume, cfg.train.out, latest=True) if cfg.train.resume else None
    torch.manual_seed(cfg.train.seed)
    method = methods.build(cfg, tokenizer.vocab_size)
    missing, unexpected = checkpoint.load_weights(source, method, strict=False)
    report_keys(source, (missing, unexpected))
    if method.teacher is not None and any(k.startswith("teacher.") for k in missing):
        method.teacher.reset()  # a checkpoint without the teacher's copies: it starts as the loaded student
    task = task_cls(cfg, tokenizer, device)
    model = task.build(method).to(device)
    meta = {"method": cfg.method.name, "task": task.name, "heads": [task.name], "data": cfg.data.root}
    validate = (lambda m: task.evaluate(m, cfg.task.val_split)) if cfg.task.val_split else None
    out = fit(model, cfg, device, task.batches, vocab=tokenizer.vocab_path, resume=resume, evaluate=validate,
              select=task.select, meta=meta, desc=task.name)
    chosen = out / "best" if validate else checkpoint.resolve(out, latest=True)  # no validation: the last step
    checkpoint.load_weights(chosen, model)
    model.eval()
    step = checkpoint.read_meta(chosen)["step"]
    selected = [r for r in read_metrics(out) if r["step"] == step and f"val_{task.select}" in r][-1:]
    metrics = {"protocol": "finetuned", "selected_step": step,  # with the validation metrics of that step
               **{k: v for row in selected for k, v in row.items() if k.startswith("val_")},
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
    head recorded in meta.json; otherwise, unless the task also runs zero-shot, an error saying what to run
    first). A task checkpoint's encoders serve a method-only task too (its `method.` weights)."""
    from vlpt.engine import checkpoint

    path, cfg, tokenizer = checkpoint.open_checkpoint(path, overrides, task=task_cls.name)
    task = task_cls(cfg, tokenizer, device)
    task.meta = checkpoint.read_meta(path)
    model = methods.build(cfg, tokenizer.vocab_size)
    if task_cls.trains and task_cls.name in task.meta.get("heads", []):
        model = task.build(model)
    elif task_cls.trains and not task_cls.zero_shot:
        raise VlptError(f"{path} has no trained '{task_cls.name}' head: run `vlpt finetune {task_cls.name} "
                        f"--checkpoint {path}` first")
    elif task.meta.get("task"):  # another task's checkpoint: its encoders; evaluation needs no teacher or queue
        model.teacher = model.queues = None
    checkpoint.load_weights(path, model)
    return task, model.to(device).eval()


def runnable(path: str | Path) -> tuple[list[str], list[str]]:
    """(tasks a checkpoint can be evaluated on: those whose head it has trained and those that need none; the
    others, which need `vlpt finetune` first)."""
    from vlpt.engine import checkpoint
    heads = checkpoint.read_meta(checkpoint.resolve(path)).get("heads", [])
    names = registry.names()
    ready = [n for n in names if not registry.get(n).trains or registry.get(n).zero_shot or n in heads]
    return ready, [n for n in names if n not in ready]


def evaluate_all(path: str | Path, device, split: str = "test", tasks: list[str] = (), overrides: list[str] = ()
                 ) -> tuple[dict[str, Task], dict[str, dict]]:
    """Every task of `runnable(path)` (or just `tasks`, each of which must be), on `split`: ({name: task},
    {name: metrics}); a zero-shot task whose annotation file the data folder lacks is skipped with a line."""
    from vlpt.errors import MissingFileError
    ready, untrained = runnable(path)
    for name in tasks:
        registry.get(name)  # an unknown name: the registry's error, with the known ones
        if name in untrained:
            raise VlptError(f"{path} has no trained '{name}' head: run `vlpt finetune {name} --checkpoint {path}` "
                            f"first")
    done, results = {}, {}
    for name in tasks or ready:
        try:
            done[name], results[name] = evaluate_checkpoint(name, path, device, split, overrides)
        except MissingFileError as err:
            if tasks:
                raise
            print(f"skipped {name}: {err}")
    if untrained and not tasks:
        print(f"not evaluated (no trained head; `vlpt finetune NAME --checkpoint {path}` first): "
              f"{', '.join(untrained)}")
    return done, results


def evaluate_checkpoint(name: str, path: str | Path, device, split: str = "test", overrides: list[str] = ()):
    """(task, metrics) of task `name` on `split`, from a checkpoint; bf16 autocast on a GPU."""
    task, model = load(registry.get(name), path, device, overrides)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), torch.no_grad():
        return task, task.evaluate(model, split)
