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
