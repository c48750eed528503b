"""Typed configs: dataclasses loaded from YAML, with `key=value` overrides and unknown keys rejected by name.

A YAML file may name other files under `base:` (paths relative to it); they are merged first, in order.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from vlpt.errors import ConfigError  # noqa: F401  (re-exported: `from vlpt.config import ConfigError`)


def opt(default, help: str):
    """A config field: a default and one line of help (the values it may take are its type, e.g. `Literal`)."""
    meta = {"help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class VisionConfig:
    image_size: int = opt(64, "input resolution in pixels (square)")
    patch_size: int = opt(8, "ViT patch size in pixels")
    width: int = opt(128, "ViT embedding dimension")
    depth: int = opt(4, "number of ViT blocks")
    heads: int = opt(4, "attention heads per ViT block")
    mlp_ratio: float = opt(4.0, "ViT MLP hidden size as a multiple of width")
    drop_path: float = opt(0.0, "stochastic depth rate")
    pretrained: str = opt("", "local file (.safetensors/.pth/.npz) of timm ViT weights; empty trains from scratch")


@dataclass
class TextConfig:
    width: int = opt(128, "hidden size of the text and fusion encoders")
    heads: int = opt(4, "attention heads per layer")
    intermediate: int = opt(512, "MLP hidden size")
    text_layers: int = opt(3, "layers of the text encoder (self-attention only)")
    fusion_layers: int = opt(3, "layers of the fusion encoder (self- and cross-attention)")
    max_len: int = opt(32, "maximum tokens per text, [CLS] and [SEP] included")
    dropout: float = opt(0.0, "dropout in text and fusion layers (BERT uses 0.1)")
    pool: Literal["cls", "mean"] = opt("cls", "text and fused states -> one vector for ITC and ITM: cls (BERT, ALBEF) or mean over tokens "
                    "(small post-norm encoders trained from scratch learn far faster with it)")
    pretrained: str = opt("", "Hugging Face BERT folder (config.json + safetensors) to initialise from; empty trains from scratch")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class MethodConfig:
    """The keys every method shares; a method registers a subclass with its own (`vlpt.methods.register`), which
    `method.name` selects when the config is built."""
    name: str = opt("albef", "registered method name (see `vlpt.methods.available()`)")
    losses: list[str] = opt(["itc", "itm", "mlm"], "losses to train; the papers' ablations are subsets")
    loss_weights: dict[str, float] = opt({}, "weight per loss name; missing names weigh 1")
    embed_dim: int = opt(256, "dimension of the contrastive projections")
    temperature: float = opt(0.07, "initial ITC temperature (learnable, clamped to [0.001, 0.5])")
    queue_size: int = opt(65536, "features kept in each momentum queue (methods with a momentum teacher)")
    momentum: float = opt(0.995, "EMA coefficient of the momentum teacher")
    alpha: float = opt(0.4, "momentum-distillation weight of the teacher's soft targets")
    alpha_warmup_steps: int = opt(0, "steps over which alpha ramps linearly from 0 (ALBEF: first epoch)")
    mlm_probability: float = opt(0.15, "fraction of text tokens masked for MLM (MaskVLM: 0.3, Table 7)")
    mlm_mask_only: bool = opt(False, "every masked token becomes [MASK] (MaskVLM) instead of BERT's 80/10/10 mask/random/keep")


@dataclass
class TaskConfig:
    """The keys every downstream task shares; a task registers a subclass with its own (`vlpt.tasks.register`),
    which `task.name` selects when the config is built. Pretraining configs leave `task.name` empty."""
    name: str = opt("", "registered task name (see `vlpt tasks`); empty in pretraining configs")
    checkpoint: str = opt("", "pretraining (or task) checkpoint or run folder whose encoders the task starts from")


@dataclass
class DataConfig:
    root: str = opt("data/shapes", "data set folder; annotation and image paths are relative to it")
    train: str = opt("pretrain.json", "training data, relative to root unless absolute: a .json annotation file, or "
                     "WebDataset .tar shards as brace patterns, sources joined by '::' "
                     "(shards/{000000..000099}.tar::coco/{000..009}.tar; see `vlpt data shard`)")
    weights: list[float] = opt([], "share of the samples drawn from each '::' source of sharded data.train (normalised); "
                        "empty: in proportion to their sample counts")
    streams: int = opt(0, "sharded data: independent shard streams making up the global batch (must divide it; the "
                       "same value gives the same batches on any number of processes; at least world x num_workers "
                       "keeps every worker busy); 0: the largest divisor of the global batch up to 64")
    shuffle_block: int = opt(64, "sharded data: samples of a stream shuffled together (seeded), held per stream as "
                             "raw bytes; a bad sample is replaced by the next readable one of its block")
    vocab: str = opt("vocab.txt", "WordPiece vocab, relative to root (or absolute); a missing file is trained from the captions")
    batch_size: int = opt(64, "samples per step per process")
    num_workers: int = opt(2, "DataLoader worker processes")
    skip_bad: bool = opt(False, "skip unreadable images (counted in the log) instead of failing; sharded data "
                         "always skips and counts them")
    augment: bool = opt(False, "RandomResizedCrop + RandAugment (off for spatial captions: flips and crops change 'left of')")


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "peak learning rate of AdamW")
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = opt(0.02, "AdamW weight decay (not on biases, norms, embeddings of positions)")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    warmup_steps: int = opt(100, "linear warm-up steps")
    warmup_lr: float = opt(0.0, "learning rate the linear warm-up starts from (ALBEF: 1e-5); scaled per group like lr")
    module_lr: dict[str, float] = opt({}, "peak learning rate per module of the model, by dotted name, e.g. "
                                      "{backbone.vision: 1.0e-5, backbone.text: 1.0e-5} (MaskVLM's encoders)")
    module_min_lr: dict[str, float] = opt({}, "final learning rate per module named in module_lr (SemMIM decays "
                                          "both groups to 1e-6); unnamed modules end at min_lr scaled by their peak / lr")
    grad_clip: float = opt(5.0, "maximum global gradient norm; 0 disables")
    accumulate: int = opt(1, "micro-batches accumulated per optimiser step")


@dataclass
class TrainConfig:
    steps: int = opt(1000, "optimiser steps to train")
    seed: int = opt(0, "seed of weights, data order and masking")
    out: str = opt("runs/albef", "run folder: checkpoints, metrics.jsonl, config.yaml")
    log_every: int = opt(10, "steps between metric lines")
    save_every: int = opt(500, "steps between checkpoints (one is always written at the end)")
    keep: int = opt(2, "checkpoints kept on disk (the best one, when an evaluation selects it, is kept apart)")
    eval_every: int = opt(0, "steps between evaluations on the validation split (tasks that have one); 0: at the end only")
    precision: Literal["auto", "bf16", "fp32"] = opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int = opt(0, "torch intra-op threads on CPU; 0 keeps torch's default")
    resume: str = opt("", "checkpoint folder, or 'latest' in train.out, to resume from")
    progress: bool = opt(True, "show a tqdm progress bar")
    tensorboard: bool = opt(True, "also write the logged metrics as TensorBoard events in <train.out>/tensorboard")
    parallel: Literal["ddp", "fsdp"] = opt("ddp", "how torchrun ranks share the model: ddp (full replicas, gradients all-reduced) or fsdp "
                        "(FSDP2 fully_shard per transformer block: weights, gradients, AdamW state sharded)")
    compile: bool = opt(False, "torch.compile each transformer block and the MLM head (student and teacher)")
    grad_checkpointing: bool = opt(False, "recompute the encoders' block activations in backward (less memory, more compute)")


@dataclass
class EvalConfig:
    k: int = opt(16, "ITC candidates reranked by ITM per query")
    batch_size: int = opt(256, "images or texts per encoder forward, and pairs per ITM forward")
    itc_weight: float = opt(0.0, "rerank score = ITM match logit + itc_weight * ITC logit (similarity / temperature); 0 is ALBEF's rule")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Sections whose dataclass is chosen by their `name` key, from the registry of that kind.
SELECTED = {MethodConfig: ("methods", "method"), TaskConfig: ("tasks", "task")}


def selected_class(base: type, name: str) -> type:
    """The registered config dataclass that `name` selects for a `SELECTED` section (`base` when `name` is empty)."""
    if not name:
        return base
    import importlib
    registry = importlib.import_module(f"vlpt.{SELECTED[base][0]}").registry
    return getattr(registry.get(name), "config", base)


def _fields(cls) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(typ) -> str:
    origin, args = get_origin(typ), get_args(typ)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(typ, "__name__", str(typ))


def _coerce(value, typ, key: str):
    """`value` as `typ` (element types of lists and dicts checked, `Literal` choices enforced); ConfigError if not."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; got {value!r}")
        return _build(typ, value, key + ".")
    origin, args = get_origin(typ) or typ, get_args(typ)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false; got {value!r}")
        return value
    if origin is float:
        if isinstance(value, str):  # YAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' expects float; got {value!r}")
    if origin in (int, str, list, dict) and not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' expects {type_name(typ)}; got {value!r}")
    if origin is list and args:
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and args:
        return {_coerce(k, args[0], f"{key} (a key)"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    return value


def _build(cls, values: dict, prefix: str = ""):
    if cls in SELECTED:  # the method's (or task's) own dataclass, chosen by its name
        cls = selected_class(cls, values.get("name", _default(cls, "name")))
    fields = _fields(cls)
    for key in values:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    return cls(**{k: _coerce(v, fields[k], prefix + k) for k, v in values.items()})


def _default(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _merge(into: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key not in ("loss_weights", "module_lr"):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    merged: dict = {}
    for base in data.pop("base", []):
        _merge(merged, _read_yaml((path.parent / base).resolve()))
    return _merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict:
    """['train.steps=10', 'method.losses=[itc,itm]'] -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- `base` dict (e.g. a checkpoint's config) <- YAML file <- key=value overrides."""
    values: dict = copy.deepcopy(base or {})  # merges below write into nested dicts: never the caller's
    if path:
        _merge(values, _read_yaml(Path(path)))
    _merge(values, parse_overrides(list(overrides)))
    return _build(Config, values)


def describe(cls=Config, prefix: str = "", note: str = "") -> list[tuple[str, Any, str]]:
    """Every key with its default and help line, for `vlpt config`; a method's or task's own keys follow the shared
    ones of its section, their help prefixed with the names of the entries that have them."""
    rows = []
    for f in dataclasses.fields(cls):
        typ = get_type_hints(cls)[f.name]
        if typ in SELECTED:
            rows += describe(typ, prefix + f.name + ".", note)
            rows += _selected_rows(typ, prefix + f.name + ".")
        elif dataclasses.is_dataclass(typ):
            rows += describe(typ, prefix + f.name + ".", note)
        else:
            rows.append((prefix + f.name, _default(cls, f.name), note + f.metadata.get("help", "")))
    return rows


def _selected_rows(base: type, prefix: str) -> list[tuple[str, Any, str]]:
    """The keys registered entries add to a `SELECTED` section, each listed once with the entries that declare it."""
    import importlib
    registry = importlib.import_module(f"vlpt.{SELECTED[base][0]}").registry
    shared, owners, rows = {f.name for f in dataclasses.fields(base)}, {}, {}
    for name in registry.names():
        cls = getattr(registry.get(name), "config", base)
        for key, default, help in describe(cls, prefix):
            if key[len(prefix):].split(".")[0] not in shared:
                owners.setdefault(key, []).append(name)
                rows.setdefault(key, (default, help))
    return [(key, rows[key][0], f"[{', '.join(owners[key])}] {rows[key][1]}") for key in rows]
