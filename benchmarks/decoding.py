"""Decoding speed: `Decoder.generate` (each step runs the newest token against cached self-attention keys and values,
the context's cross-attention keys and values projected once) against a greedy loop that runs the whole prefix
through `Decoder.forward` every step, as decoding did before the cache. Same model, same contexts, one table.

    python benchmarks/decoding.py [--size tiny|base] [--batch 16] [--tokens 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vlpt.cli import find_config  # noqa: E402
from vlpt.config import load_config  # noqa: E402
from vlpt.models.decoder import Decoder  # noqa: E402

PRESETS = {"tiny": "pretrain/albef_tiny.yaml", "base": "pretrain/albef_base.yaml"}


def recompute_greedy(d: Decoder, context, mask, prefix, steps: int) -> torch.Tensor:
    seq = prefix
    for _ in range(steps):
        logits = d(seq, torch.ones_like(seq), context, mask)[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq[:, prefix.shape[1]:]


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=65, help="context tokens (a ViT's patches + [CLS])")
    p.add_argument("--tokens", type=int, default=20, help="tokens generated per sequence (no stop token)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the preset's fusion layers)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cfg = load_config(find_config(PRESETS[args.size])).model
    torch.manual_seed(0)
    d = Decoder(30522, cfg.text, cfg.vision.width, args.layers or cfg.text.fusion_layers).eval()
    context = torch.randn(args.batch, args.context, cfg.vision.width)
    mask = torch.ones(args.batch, args.context, dtype=torch.long)
    prefix = torch.full((args.batch, 1), 101)
    stop = -1  # never produced: every sequence runs all steps
    rows = []
    print(f"| {args.size}: {args.batch} sequences x {args.tokens} tokens | s per batch | tokens/s |\n|---|---|---|")
    with torch.no_grad():
        old, old_ids = timed(lambda: recompute_greedy(d, context, mask, prefix, args.tokens), args.repeats)
        new, (new_ids, _) = timed(lambda: d.generate(context, mask, prefix, stop, args.tokens), args.repeats)
        beam, _ = timed(lambda: d.generate(context, mask, prefix, stop, args.tokens, beams=3), args.repeats)
    assert torch.equal(old_ids, new_ids), "cached greedy decoding differs from the recomputed one"
    for name, s in [("greedy, whole prefix each step", old), ("greedy, cached (generate)", new),
                    ("beam 3, cached (generate)", beam)]:
        rows.append({"mode": name, "seconds": s, "tokens_per_s": args.batch * args.tokens / s})
        print(f"| {name} | {s:.3f} | {args.batch * args.tokens / s:.0f} |")
    print(f"\ncached greedy is {old / new:.2f}x the recomputing loop; identical tokens")
    return rows


if __name__ == "__main__":
    main()
