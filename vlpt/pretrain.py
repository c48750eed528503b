"""Pretraining: a method (`method.name`) on image-text pairs (`data.train`), through the one engine (`engine.fit`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vlpt import methods
from vlpt.config import Config, load_config
from vlpt.data.loader import captions, train_loader, training_set
from vlpt.data.tokenizer import Tokenizer, tokenizer_for
from vlpt.engine import checkpoint, distributed
from vlpt.engine.fit import fit
from vlpt.engine.runtime import setup
from vlpt.tasks.base import report_keys


def pretrain(cfg: Config) -> Path:
    """Pretrain `cfg.method.name` on `cfg.data.train`; returns the run folder."""
    method_cls = methods.check(cfg)  # a misnamed method or loss stops here, before any work
    device = setup(cfg.train)
    out = Path(cfg.train.out)
    path = checkpoint.resolve(cfg.train.resume, out, latest=True) if cfg.train.resume else None
    init = checkpoint.resolve(cfg.train.init) if cfg.train.init and not path else None  # a resumed run has weights
    data = training_set(cfg)  # JSON records or shards: a missing file or shard fails here
    vocab = path or init
    tokenizer = (Tokenizer(vocab / checkpoint.VOCAB, cfg.model.text.preprocess) if vocab
                 else tokenizer_for(cfg, captions(data), out))
    if not init:
        warn_if_from_scratch(cfg)

    torch.manual_seed(cfg.train.seed)
    model = method_cls(cfg, tokenizer.vocab_size)
    if init:
        report_keys(init, checkpoint.load_weights(init, model, strict=False))
    model = model.to(device)
    needs = method_cls.batch_needs(cfg.method)
    world, rank = distributed.world_size(), distributed.rank()
    return fit(model, cfg, device, lambda start: train_loader(cfg, data, tokenizer, needs, rank, world, start),
               vocab=tokenizer.vocab_path, resume=path, meta={"method": cfg.method.name, "heads": []},
               desc=cfg.method.name)


def pretrain_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """The YAML `path` and key=value overrides; with `train.init`, on top of that checkpoint's model and method
    sections (the YAML's keys and the overrides win: a text-assignment preset names only its losses), its
    pretrained-weight paths cleared (the checkpoint holds the weights)."""
    cfg = load_config(path, overrides)
    if not cfg.train.init:
        return cfg
    base = checkpoint.load_config(checkpoint.resolve(cfg.train.init))
    return load_config(path, ["model.text.pretrained=", "model.vision.pretrained=", *overrides],
                       base={k: base[k] for k in ("model", "method")})


def warn_if_from_scratch(cfg: Config) -> None:
    """The papers start from pretrained ViT and BERT weights: a base-sized run without them says so once."""
    v, t = cfg.model.vision, cfg.model.text
    if v.width >= 768 and not (v.pretrained and t.pretrained) and distributed.is_main():
        missing = [key for key, value in (("model.vision.pretrained", v.pretrained),
                                          ("model.text.pretrained", t.pretrained)) if not value]
        warnings.warn(f"a base-sized model trains from scratch ({' and '.join(missing)} empty); the papers start "
                      f"from DeiT/CLIP ViT and BERT weights", stacklevel=2)
