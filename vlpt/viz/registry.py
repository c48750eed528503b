"""Visualisations: name -> a `Visualization` (its command-line arguments and what it draws), and the capability
check by which a picture asks a method for what it needs (`Method.capabilities`) instead of probing attributes."""
from __future__ import annotations

import argparse

from vlpt.errors import VlptError
from vlpt.registry import Registry


registry = Registry("visualisation", package="vlpt.viz")
register = registry.register


def require(model, capability: str) -> None:
    """VlptError unless the model's method has `capability` (e.g. 'codebook', 'reconstruction')."""
    if capability not in getattr(model, "capabilities", ()):
        from vlpt import methods
        having = [name for name in methods.available() if capability in methods.registry.get(name).capabilities]
        raise VlptError(f"method '{model.name}' has no {capability} (it needs {' or '.join(having) or 'a method with it'})")


class Visualization:
    """A `vlpt visualize NAME` picture: `arguments` adds its flags beyond --checkpoint/--out/--data/--device,
    `draw(model, cfg, tokenizer, args, device)` writes the PNG and returns the line to print."""

    name = ""
    capability = ""  # what the method must have; empty: any method
    help = ""
    out = "picture.png"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def draw(self, model, cfg, tokenizer, args, device) -> str:
        raise NotImplementedError


def add_pair_arguments(parser: argparse.ArgumentParser, n: int) -> None:
    """--annotation and --n: the first pairs of an annotation file, for pictures drawn over image-caption pairs."""
    parser.add_argument("--annotation", default="retrieval_test.json",
                        help="annotation file in the data folder whose first pairs are drawn")
    parser.add_argument("--n", type=int, default=n, help="image-caption pairs")


def first_pairs(cfg, args, device):
    """(PIL pictures, their model-size tensors on `device`, one caption each) of the first `--n` records of
    `--annotation` under the data folder (`--data`, else the checkpoint's)."""
    from pathlib import Path

    import torch

    from vlpt.data.annotations import load_annotations, load_image
    from vlpt.data.transforms import image_transform
    data = Path(args.data or cfg.data.root)
    records = load_annotations(data / args.annotation, "pretrain")[:args.n]
    transform = image_transform(cfg.model.vision.image_size)
    pictures = [load_image(data / r["image"]) for r in records]
    images = torch.stack([transform(p) for p in pictures]).to(device)
    captions = [r["caption"][0] if isinstance(r["caption"], list) else r["caption"] for r in records]
    return pictures, images, captions
