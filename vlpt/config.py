"""Typed configs: dataclasses loaded from YAML, with `key=value` overrides and unknown keys rejected by name.

A YAML file may name other files under `base:` (paths relative to it); they are merged first, in order. An override's
value is read by its key's declared type (a `str` key takes the text as it is, so `data.train={000..009}.tar` needs
no quoting). Every value is then checked once, when the config is built: a field's range (`opt(..., check=RULE)`)
and each section's cross-field rules (its `validate(prefix, root)` method); a bad value is one ConfigError line
naming the key, the value and the rule.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, NoReturn, get_args, get_origin, get_type_hints

import yaml

from vlpt.errors import ConfigError  # noqa: F401  (re-exported: `from vlpt.config import ConfigError`)


def opt(default, help: str, check: "Rule | None" = None):
    """A config field: a default, one line of help (the values it may take are its type, e.g. `Literal`) and the
    range its value (each element, for a list or a dict) must lie in, checked when the config is built."""
    meta = {"help": help, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Rule:
    """A range of values, as the error says it: `config key 'data.batch_size' must be >= 1; got 0`."""
    text: str
    test: Callable[[Any], bool]


def at_least(low) -> Rule:
    return Rule(f">= {low}", lambda v: v >= low)


def within(low, high, closed: str = "[]") -> Rule:
    """low <= v <= high; `closed` "(]", "[)" or "()" leaves that end out."""
    lo_ok = (lambda v: v > low) if closed[0] == "(" else (lambda v: v >= low)
    hi_ok = (lambda v: v < high) if closed[1] == ")" else (lambda v: v <= high)
    return Rule(f"in {closed[0]}{low}, {high}{closed[1]}", lambda v: lo_ok(v) and hi_ok(v))


POSITIVE = at_least(1)                                   # sizes and counts
NON_NEGATIVE = at_least(0)
ABOVE_ZERO = Rule("> 0", lambda v: v > 0)                # rates, temperatures
UNIT = within(0, 1)                                      # probabilities, ratios, momentum, weights of a mix
DROP_RATE = within(0, 1, "[)")                           # a rate of 1 would drop everything
MLM_PROBABILITY = within(0, 1, "()")                     # no masked token, or no text left to predict from


def fail(key: str, rule: str, value) -> NoReturn:
    raise ConfigError(f"config key '{key}' must be {rule}; got {value!r}")


def divides_width(section, prefix: str) -> None:
    if section.width % section.heads:
        fail(prefix + "heads", f"a divisor of {prefix}width ({section.width})", section.heads)


@dataclass
class VisionConfig:
    image_size: int = opt(64, "input resolution in pixels (square)", POSITIVE)
    patch_size: int = opt(8, "ViT patch size in pixels (divides image_size)", POSITIVE)
    width: int = opt(128, "ViT embedding dimension (a multiple of heads)", POSITIVE)
    depth: int = opt(4, "number of ViT blocks", POSITIVE)
    heads: int = opt(4, "attention heads per ViT block", POSITIVE)
    mlp_ratio: float = opt(4.0, "ViT MLP hidden size as a multiple of width", ABOVE_ZERO)
    drop_path: float = opt(0.0, "stochastic depth rate", DROP_RATE)
    pretrained: str = opt("", "local file (.safetensors/.pth/.npz) of timm ViT weights; empty trains from scratch")

    def validate(self, prefix: str, root) -> None:
        if self.image_size % self.patch_size:
            fail(prefix + "patch_size", f"a divisor of {prefix}image_size ({self.image_size})", self.patch_size)
        divides_width(self, prefix)


@dataclass
class TextConfig:
    width: int = opt(128, "hidden size of the text and fusion encoders (a multiple of heads)", POSITIVE)
    heads: int = opt(4, "attention heads per layer", POSITIVE)
    intermediate: int = opt(512, "MLP hidden size", POSITIVE)
    text_layers: int = opt(3, "layers of the text encoder (self-attention only)", POSITIVE)
    fusion_layers: int = opt(3, "layers of the fusion encoder (self- and cross-attention)", POSITIVE)
    max_len: int = opt(32, "maximum tokens per text, [CLS] and [SEP] included", at_least(3))
    dropout: float = opt(0.0, "dropout in text and fusion layers (BERT uses 0.1)", DROP_RATE)
    pool: Literal["cls", "mean"] = opt("cls", "text and fused states -> one vector for ITC and ITM: cls (BERT, ALBEF) or mean over tokens "
                    "(small post-norm encoders trained from scratch learn far faster with it)")
    pretrained: str = opt("", "Hugging Face BERT folder (config.json + safetensors) to initialise from; empty trains from scratch")
    preprocess: Literal["none", "albef"] = opt("none", "cleaning of every text before tokenizing, in every data path: "
                                               "none, or albef (ALBEF's pre_caption, what its checkpoints saw; see "
                                               "vlpt.data.tokenizer.albef_caption)")

    def validate(self, prefix: str, root) -> None:
        divides_width(self, prefix)


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
    loss_weights: dict[str, float] = opt({}, "weight per loss name; missing names weigh 1", NON_NEGATIVE)
    embed_dim: int = opt(256, "dimension of the contrastive projections", POSITIVE)
    temperature: float = opt(0.07, "initial ITC temperature (learnable, clamped to [0.001, 0.5])", ABOVE_ZERO)
    queue_size: int = opt(65536, "features kept in each momentum queue (methods with a momentum teacher); "
                          "the last queue_size are kept, so it may be smaller than the global batch", POSITIVE)
    momentum: float = opt(0.995, "EMA coefficient of the momentum teacher", UNIT)
    alpha: float = opt(0.4, "momentum-distillation weight of the teacher's soft targets", UNIT)
    alpha_warmup_steps: int = opt(0, "steps over which alpha ramps linearly from 0 (ALBEF: first epoch)", NON_NEGATIVE)
    mlm_probability: float = opt(0.15, "fraction of text tokens masked for MLM (MaskVLM: 0.3, Table 7)",
                                 MLM_PROBABILITY)
    mlm_mask_only: bool = opt(False, "every masked token becomes [MASK] (MaskVLM) instead of BERT's 80/10/10 mask/random/keep")
    itm_easy_steps: int = opt(0, "steps whose ITM negatives are drawn uniformly at random, before ALBEF's hard ones "
                              "(drawn by ITC similarity); 0: hard from the first step (ALBEF)", check=NON_NEGATIVE)
    itm_swap_words: list[list[str]] = opt([], "word groups (colours, sizes, ...) whose members swap places in a caption "
                                          "to make one more ITM negative per pair (NegCLIP's swapped attributes; "
                                          "issue 13); empty: ALBEF's negatives only")

    def validate(self, prefix: str, root) -> None:
        """Cross-field rules; a method's subclass adds its own (calling this one), with `root`, the whole config,
        for rules across sections."""
        if not self.losses:
            fail(prefix + "losses", "a list of at least one loss", self.losses)
        from vlpt.data.swaps import check_groups
        try:
            check_groups(self.itm_swap_words)
        except ValueError:
            fail(prefix + "itm_swap_words", "groups of at least two distinct words", self.itm_swap_words)


@dataclass
class TaskConfig:
    """The keys every downstream task shares; a task registers a subclass with its own (`vlpt.tasks.register`),
    which `task.name` selects when the config is built. Pretraining configs leave `task.name` empty."""
    name: str = opt("", "registered task name (`vlpt evaluate --help` lists them); empty in pretraining configs")
    checkpoint: str = opt("", "pretraining (or task) checkpoint or run folder whose encoders the task starts from")
    val_split: str = opt("val", "the split that selects the best checkpoint while finetuning (SNLI-VE and NLVR2 "
                         "name theirs 'dev'); empty: no validation, the last step is tested")


@dataclass
class DataConfig:
    root: str = opt("data/shapes", "data set folder; annotation and image paths are relative to it")
    train: str = opt("pretrain.json", "training data, relative to root unless absolute: a .json annotation file, or "
                     "WebDataset .tar shards as brace patterns, sources joined by '::' "
                     "(shards/{000000..000099}.tar::coco/{000..009}.tar; see `vlpt data shard`)")
    weights: list[float] = opt([], "share of the samples drawn from each '::' source of sharded data.train (normalised); "
                        "empty: in proportion to their sample counts", NON_NEGATIVE)
    streams: int = opt(0, "sharded data: independent shard streams making up the global batch (must divide it; the "
                       "same value gives the same batches on any number of processes; at least world x num_workers "
                       "keeps every worker busy); 0: the largest divisor of the global batch up to 64", NON_NEGATIVE)
    shuffle_block: int = opt(64, "sharded data: samples of a stream shuffled together (seeded), held per stream as "
                             "raw bytes; a bad sample is replaced by the next readable one of its block", POSITIVE)
    vocab: str = opt("vocab.txt", "WordPiece vocab, relative to root (or absolute); a missing file is trained from the captions")
    batch_size: int = opt(64, "samples per step per process", POSITIVE)
    num_workers: int = opt(2, "DataLoader worker processes (0: load in the main process)", NON_NEGATIVE)
    skip_bad: bool = opt(False, "skip unreadable images (counted in the log) instead of failing; sharded data "
                         "always skips and counts them")
    augment: bool = opt(False, "RandomResizedCrop + RandAugment (off for spatial captions: flips and crops change 'left of')")

    def validate(self, prefix: str, root) -> None:
        # data.streams must also divide the global batch, which needs the world size: checked by shards.shard_loader
        if not self.train.strip():
            fail(prefix + "train", "a .json file or .tar shard patterns", self.train)


@dataclass
class OptimConfig:
    lr: float = opt(3e-4, "peak learning rate of AdamW", ABOVE_ZERO)
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine decay", NON_NEGATIVE)
    weight_decay: float = opt(0.02, "AdamW weight decay (not on biases, norms, embeddings of positions)", NON_NEGATIVE)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas (two, each in [0, 1])", UNIT)
    warmup_steps: int = opt(100, "linear warm-up steps", NON_NEGATIVE)
    warmup_lr: float = opt(0.0, "learning rate the linear warm-up starts from (ALBEF: 1e-5); scaled per group like lr",
                            NON_NEGATIVE)
    module_lr: dict[str, float] = opt({}, "peak learning rate per module of the model, by dotted name, e.g. "
                                      "{backbone.vision: 1.0e-5, backbone.text: 1.0e-5} (MaskVLM's encoders)",
                                      NON_NEGATIVE)
    module_min_lr: dict[str, float] = opt({}, "final learning rate per module named in module_lr (SemMIM decays "
                                          "both groups to 1e-6); unnamed modules end at min_lr scaled by their "
                                          "peak / lr", NON_NEGATIVE)
    grad_clip: float = opt(5.0, "maximum global gradient norm; 0 disables", NON_NEGATIVE)
    accumulate: int = opt(1, "micro-batches accumulated per optimiser step", POSITIVE)

    def validate(self, prefix: str, root) -> None:
        if len(self.betas) != 2:
            fail(prefix + "betas", "two numbers (AdamW's beta1, beta2)", self.betas)


@dataclass
class TrainConfig:
    steps: int = opt(1000, "optimiser steps to train", POSITIVE)
    seed: int = opt(0, "seed of weights, data order and masking")
    out: str = opt("runs/albef", "run folder: checkpoints, metrics.jsonl, config.yaml")
    log_every: int = opt(10, "steps between metric lines", POSITIVE)
    save_every: int = opt(500, "steps between checkpoints (one is always written at the end)", POSITIVE)
    keep: int = opt(2, "checkpoints kept on disk (the best one, when an evaluation selects it, is kept apart)",
                    POSITIVE)
    eval_every: int = opt(0, "steps between evaluations on the validation split (tasks that have one); 0: at the "
                          "end only", NON_NEGATIVE)
    precision: Literal["auto", "bf16", "fp32"] = opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int = opt(0, "torch intra-op threads on CPU; 0 keeps torch's default", NON_NEGATIVE)
    resume: str = opt("", "checkpoint folder, or 'latest' in train.out, to resume from")
    init: str = opt("", "pretraining: checkpoint or run folder whose weights (and vocab, model and method sections) "
                    "start the run, with a fresh optimiser at step 0, e.g. NLVR2's text assignment on a method's "
                    "checkpoint; weights it lacks are reported")
    max_bad_steps: int = opt(3, "optimiser steps in a row whose loss or gradient norm is not finite (each one skipped: "
                                "no update) before the run stops with an error; 1 stops at the first", POSITIVE)
    progress: bool = opt(True, "show a tqdm progress bar")
    tensorboard: bool = opt(True, "also write the logged metrics as TensorBoard events in <train.out>/tensorboard")
    parallel: Literal["ddp", "fsdp"] = opt("ddp", "how torchrun ranks share the model: ddp (full replicas, gradients all-reduced) or fsdp "
                        "(FSDP2 fully_shard per transformer block: weights, gradients, AdamW state sharded)")
    compile: bool = opt(False, "torch.compile each transformer block and the MLM head (student and teacher)")
    grad_checkpointing: bool = opt(False, "recompute the encoders' block activations in backward (less memory, more compute)")


@dataclass
class EvalConfig:
    k: int = opt(16, "ITC candidates reranked by ITM per query", POSITIVE)
    batch_size: int = opt(256, "images or texts per encoder forward, and pairs per ITM forward", POSITIVE)
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
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false; got {value!r}")
        return value
    if origin is float:
        number = None
        if isinstance(value, str):  # YAML reads `1e-3` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise ConfigError(f"config key '{key}' expects float; got {value!r}")
        if not math.isfinite(number):
            fail(key, "a finite number", value)
        return number
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


def _split(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    return key, raw


def key_type(key: str, names: dict[str, str] | None = None):
    """The declared type of the dotted config `key`, the method's and task's own keys found in the dataclasses that
    `names` ({"method": name, "task": name}; missing: the defaults) select; None when there is no such key."""
    typ = Config
    for part in key.split("."):
        if dataclasses.is_dataclass(typ):
            if typ in SELECTED:
                section = SELECTED[typ][1]
                try:
                    typ = selected_class(typ, (names or {}).get(section, _default(typ, "name")))
                except ConfigError:  # an unknown name: its error comes when the config is built
                    pass
            fields = _fields(typ)
            if part not in fields:
                return None
            typ = fields[part]
        elif get_origin(typ) is dict and get_args(typ):  # one entry of a dict: `method.loss_weights.itc=2`
            typ = get_args(typ)[1]
        else:
            return None
    return typ


def parse_value(raw: str, typ, key: str):
    """An override's text by its key's type: str (and string choices) as it is, int as such, bool and float left
    as text for `_coerce` (which refuses, naming the key, what is not one), lists, dicts and sections as YAML (flow
    style). An unknown key's (typ None) as YAML, or as it is when that fails: the key's own error (did you mean ...)
    comes when the config is built."""
    if typ is None:
        try:
            return yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            return raw
    origin, args = get_origin(typ) or typ, get_args(typ)
    if origin is str or (origin is Literal and all(isinstance(a, str) for a in args)):
        return raw
    if origin is int:
        try:
            return int(raw)
        except ValueError:
            return raw
    if origin in (bool, float):
        return raw  # `_coerce` reads true/false and numbers from text, and names the key when it is neither
    if not raw:
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"config key '{key}' expects {type_name(typ)} in YAML flow style (e.g. [a, b] or "
                          f"{{a: 1}}); got {raw!r}") from None


def _names(overrides: list[str], values: dict) -> dict[str, str]:
    """The method and task names the overrides (the last one wins), else `values` (base dict and YAML) give."""
    names = {}
    for cls, (_, section) in SELECTED.items():
        given = values.get(section)
        names[section] = given.get("name", _default(cls, "name")) if isinstance(given, dict) else _default(cls, "name")
    for item in overrides:
        key, raw = _split(item)
        if key in (f"{section}.name" for section in names):
            names[key.split(".")[0]] = raw
    return names


def parse_overrides(overrides: list[str], values: dict | None = None) -> dict:
    """['train.steps=10', 'method.losses=[itc,itm]'] -> nested dict, each value read by its key's declared type
    (`parse_value`); the method's and task's own keys are those of the names set in the overrides or in `values`."""
    names = _names(list(overrides), values or {})
    out: dict = {}
    for item in overrides:
        key, raw = _split(item)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(raw, key_type(key, names), key)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- `base` dict (e.g. a checkpoint's config) <- YAML file <- key=value overrides; then every value
    is checked (`validate`)."""
    values: dict = copy.deepcopy(base or {})  # merges below write into nested dicts: never the caller's
    if path:
        _merge(values, _read_yaml(Path(path)))
    _merge(values, parse_overrides(list(overrides), values))
    return validate_config(_build(Config, values))


def _sections(section, prefix: str = ""):
    """(dataclass instance, key prefix) of `section` and every section inside it, outer ones first."""
    yield section, prefix
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")


def _elements(key: str, value) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(f"{key}.{k}", v) for k, v in value.items()]
    if isinstance(value, list):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return [(key, value)]


def validate_config(cfg: Config) -> Config:
    """Every field's range (`opt(..., check=RULE)`; each element of a list or dict), then each section's cross-field
    rules (its `validate(prefix, root)`, which may read other sections of `root`, their ranges checked by then).
    The first failure is a ConfigError naming the key, the value and the rule. Returns `cfg`."""
    sections = list(_sections(cfg))
    for section, prefix in sections:
        for f in dataclasses.fields(section):
            rule = f.metadata.get("check")
            for key, value in _elements(prefix + f.name, getattr(section, f.name)) if rule else ():
                if not rule.test(value):
                    fail(key, rule.text, value)
    for section, prefix in sections:
        if hasattr(section, "validate"):
            section.validate(prefix, cfg)
    return cfg


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
                owners.setdefault(key, {})[name] = default
                rows.setdefault(key, help)
    out = []
    for key, defaults in owners.items():  # one default, or each entry's where they differ
        values = list(defaults.values())
        default = values[0] if all(v == values[0] for v in values) else \
            ", ".join(f"{name}: {value}" for name, value in defaults.items())
        out.append((key, default, f"[{', '.join(defaults)}] {rows[key]}"))
    return out
