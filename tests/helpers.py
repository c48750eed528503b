"""A tiny model for tests that train: configs built from a shipped preset with small overrides."""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import vlpt.cli
from vlpt.config import load_config

CONFIG = "pretrain/albef_tiny.yaml"
TINY = ["model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32", "model.vision.depth=1",
        "model.vision.heads=2", "model.text.width=32", "model.text.heads=2", "model.text.intermediate=64",
        "model.text.text_layers=1", "model.text.fusion_layers=1", "model.text.max_len=24", "method.embed_dim=16",
        "method.queue_size=64", "data.batch_size=8", "data.num_workers=0", "train.progress=false",
        "train.device=cpu", "train.precision=fp32", "train.threads=1", "optim.warmup_steps=2"]


@dataclass(frozen=True)
class TinyMethod:
    """A method as the tests that train it across engine modes run it: its tiny preset, overrides that shrink it
    further (on top of TINY), and the losses it logs."""
    preset: str
    extra: tuple[str, ...] = ()
    losses: tuple[str, ...] = ("itc", "itm", "mlm")


METHODS = {
    "albef": TinyMethod(CONFIG),
    "simla": TinyMethod("pretrain/simla_tiny.yaml", ("method.simla.mim_min_block=1", "method.simla.tokens.codes=16"),
                        ("itc", "itm", "mlm", "mim", "psl")),
    "semmim": TinyMethod("pretrain/semmim_tiny.yaml", (
        "model.vision.depth=2", "method.semmim.head.codes=64", "method.semmim.head.hidden=32",
        "method.semmim.head.bottleneck=16", "method.semmim.tokens.codes=16"), ("itc", "itm", "mlm", "cls", "patch", "plm")),
}


def method_config(name: str, root: Path, out: Path, *extra: str):
    """`config` of METHODS[name]: its preset and overrides, then `extra`."""
    m = METHODS[name]
    return config(root, out, *m.extra, *extra, preset=m.preset)


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.root={root}", f"train.out={out}", *extra]


def config(root: Path, out: Path, *extra: str, preset: str = CONFIG):
    return load_config(vlpt.cli.find_config(preset), overrides(root, out, *extra))


def cli_error(argv: list[str], capsys) -> str:
    """The one line a command that must fail prints: it exits with code 2 (vlpt's own errors) and writes
    `vlpt: error: ...` to stderr."""
    import pytest
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        vlpt.cli.main(argv)
    assert excinfo.value.code == 2, excinfo.value.code
    error = excinfo.value  # free the frames it keeps (a DataLoader with workers would wait 5 s to join later)
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__context__
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlpt: error: ") and "\n" not in err, err
    return err


def pair_batch(vocab: int, b: int = 4, length: int = 10, seed: int = 0, pad: int = 0, views: bool = False) -> dict:
    """A seeded pretraining batch of 32 px images and `length`-token texts ([CLS]=2 ... [SEP]=3, the last `pad`
    positions padding) with MLM ids and labels; `views` adds a second image view."""
    import torch
    from vlpt.data.masking import mask_tokens
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=gen)
    mask = torch.ones_like(ids)
    ids[:, 0] = 2
    ids[:, length - 1 - pad] = 3
    if pad:
        ids[:, length - pad:], mask[:, length - pad:] = 0, 0
    mlm_ids, mlm_labels = mask_tokens(ids, 0.3, 4, vocab, [0, 1, 2, 3, 4], gen)
    batch = {"image": torch.randn(b, 3, 32, 32, generator=gen)}
    if views:
        batch["image_view2"] = torch.randn(b, 3, 32, 32, generator=gen)
    return {**batch, "text_ids": ids, "text_mask": mask, "image_id": torch.arange(b), "mlm_ids": mlm_ids,
            "mlm_labels": mlm_labels}
