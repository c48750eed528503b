"""Pretraining: a method (`method.name`) on image-text pairs (`data.train`), through the one engine (`engine.fit`)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from vlpt import methods
from vlpt.config import Config
from vlpt.data.loader import captions, train_loader, training_set
from vlpt.data.tokenizer import Tokenizer, tokenizer_for
from vlpt.engine import checkpoint, distributed
from vlpt.engine.fit import fit
from vlpt.engine.runtime import setup


def pretrain(cfg: Config) -> Path:
    """Pretrain `cfg.method.name` on `cfg.data.train`; returns the run folder."""
    method_cls = methods.check(cfg)  # a misnamed method or loss stops here, before any work
    device = setup(cfg.train)
    out = Path(cfg.train.out)
    path = checkpoint.resolve(cfg.train.resume, out) if cfg.train.resume else None
    data = training_set(cfg)  # JSON records or shards: a missing file or shard fails here
    tokenizer = (Tokenizer(path / checkpoint.VOCAB, cfg.model.text.preprocess) if path
                 else tokenizer_for(cfg, captions(data), out))
    warn_if_from_scratch(cfg)

    torch.manual_seed(cfg.train.seed)
    model = method_cls(cfg, tokenizer.vocab_size).to(device)
    needs = method_cls.batch_needs(cfg.method)
    world, rank = distributed.world_size(), distributed.rank()
    return fit(model, cfg, device, lambda start: train_loader(cfg, data, tokenizer, needs, rank, world, start),
               vocab=tokenizer.vocab_path, resume=path, meta={"method": cfg.method.name, "heads": []},
               desc=cfg.method.name)


def warn_if_from_scratch(cfg: Config) -> None:
    """The papers start from pretrained ViT and BERT weights: a base-sized run without them says so once."""
    v, t = cfg.model.vision, cfg.model.text
    if v.width >= 768 and not (v.pretrained and t.pretrained) and distributed.is_main():
        missing = [key for key, value in (("model.vision.pretrained", v.pretrained),
                                          ("model.text.pretrained", t.pretrained)) if not value]
        warnings.warn(f"a base-sized model trains from scratch ({' and '.join(missing)} empty); the papers start "
                      f"from DeiT/CLIP ViT and BERT weights", stacklevel=2)
