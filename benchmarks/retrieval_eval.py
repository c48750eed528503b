"""ITM reranking for retrieval: the batched `retrieval.rerank` against the reference per-query `rerank_loop`.

Encodes the split once (`retrieval.encode_split`), computes the ITC similarities, then times both rerankers on the
same encodings with the same k, and checks that they rank every query's candidates identically.

    python benchmarks/retrieval_eval.py --checkpoint runs/albef_tiny --data data/shapes
    python benchmarks/retrieval_eval.py --data data/shapes --limit 50      # untrained tiny ALBEF, 50 images
    python benchmarks/retrieval_eval.py                                    # also makes a small shapes set in /tmp

See benchmarks/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from vlpt import methods  # noqa: E402
from vlpt.config import load_config  # noqa: E402
from vlpt.data.tokenizer import Tokenizer  # noqa: E402
from vlpt.engine import checkpoint  # noqa: E402
from vlpt.engine.runtime import autocast, pick_device  # noqa: E402
from vlpt.tasks import retrieval  # noqa: E402

TINY = ROOT / "configs/pretrain/albef_tiny.yaml"


def load_model(args, data: Path, device: torch.device):
    """(model in eval mode, config, tokenizer, description): from --checkpoint, else an untrained tiny ALBEF."""
    if args.checkpoint:
        model, cfg, tokenizer = checkpoint.load_method(args.checkpoint, device)
        return model, cfg, tokenizer, f"checkpoint {checkpoint.resolve(args.checkpoint)}"
    cfg = load_config(TINY, list(args.overrides))
    tokenizer = Tokenizer(data / "vocab.txt")
    torch.manual_seed(cfg.train.seed)
    model = methods.build(cfg, tokenizer.vocab_size).to(device).eval()
    return model, cfg, tokenizer, f"untrained {TINY.stem} (seed {cfg.train.seed})"


def limit_split(images, texts, img2txt, txt2img, n: int | None):
    """The first `n` images of the split and their texts (read_split numbers texts image by image)."""
    if not n or n >= len(images):
        return images, texts, img2txt, txt2img
    n_texts = max(img2txt[n - 1]) + 1
    return images[:n], texts[:n_texts], img2txt[:n], txt2img[:n_texts]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int):
    """(result of the last call, median seconds over `repeats` calls)."""
    seconds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return out, float(np.median(seconds))


def candidate_rankings(full: torch.Tensor, top: torch.Tensor) -> np.ndarray:
    """Each query's top-k candidates (indices `top`, (Q,k)) in the order of their reranked scores, best first."""
    scores = full.gather(1, top).float().cpu().numpy()
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(top.cpu().numpy(), order, axis=1)


def compare(batched: list[torch.Tensor], loop: list[torch.Tensor], sim: torch.Tensor, k: int, img2txt, txt2img,
            tol: float) -> dict:
    """Same candidates, same order of candidates per query, score gap, and recall metrics of both."""
    same_candidates, differing, max_diff = True, 0, 0.0
    for a, b, scores in zip(batched, loop, (sim, sim.t())):
        same_candidates &= bool(torch.equal(a != -100.0, b != -100.0))
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        differing += int((candidate_rankings(a, top) != candidate_rankings(b, top)).any(axis=1).sum())
        max_diff = max(max_diff, float((a.float() - b.float()).abs().max()))
    metrics = [retrieval.recall_metrics(i2t.float().cpu().numpy(), t2i.float().cpu().numpy(), img2txt, txt2img)
               for i2t, t2i in (batched, loop)]
    return {"same_candidates": same_candidates, "queries_ranked_differently": differing,
            "identical_rankings": same_candidates and differing == 0, "max_abs_score_diff": max_diff,
            "scores_within_tol": max_diff <= tol, "tol": tol, "same_recall": metrics[0] == metrics[1],
            "recall_batched": metrics[0], "recall_loop": metrics[1]}


def table(rows: list[dict]) -> str:
    head = ["method", "pairs", "seconds", "pairs/s", "speed-up", "identical rankings"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pairs']} | {r['seconds']:.3f} | {r['pairs_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['identical']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="key=value arguments override the tiny config (only without --checkpoint)")
    p.add_argument("--checkpoint", default="", help="checkpoint or run folder (default: an untrained tiny ALBEF)")
    p.add_argument("--data", default="", help="data folder with retrieval_<split>.json (and vocab.txt without "
                                              "--checkpoint); default: a small shapes set generated in a temp folder")
    p.add_argument("--split", default="test", help="reads retrieval_<split>.json (default test)")
    p.add_argument("--k", type=int, default=0, help="candidates reranked per query (default: the config's eval.k)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="images/texts per encoder pass and pairs per batched ITM pass (default: eval.batch_size)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images of the split (and their texts)")
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times; report the median")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA, as `vlpt evaluate`), bf16, fp32")
    p.add_argument("--num-workers", type=int, default=0, help="image loader workers for the encoding")
    p.add_argument("--tol", type=float, default=1e-4, help="score tolerance for 'scores equal' (default 1e-4)")
    p.add_argument("--json", default="", help="also write the rows and the comparison to this file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the tiny config")
    args = p.parse_args(argv)
    if args.overrides and args.checkpoint:
        p.error("key=value overrides apply to the untrained tiny model only, not to --checkpoint")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        if data is None:
            from vlpt.data.synthetic import generate
            data = generate(Path(tmp) / "shapes", train=1, val=1, test=args.limit or 100, progress=False)
            print(f"no --data: generated {args.limit or 100} shapes test images in {data}")
        model, cfg, tokenizer, what = load_model(args, data, device)
        k, batch_size = args.k or cfg.eval.k, args.batch_size or cfg.eval.batch_size
        images, texts, img2txt, txt2img = limit_split(*retrieval.read_split(data / f"retrieval_{args.split}.json"),
                                                      args.limit)
        start = time.perf_counter()
        with autocast(device, args.precision):
            enc = retrieval.encode_split(model, [data / p for p in images], texts, tokenizer,
                                         cfg.model.vision.image_size, cfg.model.text.max_len, batch_size, device,
                                         args.num_workers, progress=False)
        sim = retrieval.itc_logits(model, enc)
        sync(device)
        encode_s = time.perf_counter() - start
        with autocast(device, args.precision), torch.no_grad():
            # warm-up: one ITM pass at each method's shape (k pairs, batch_size pairs), untimed
            for n in {min(k, len(texts)), batch_size}:
                i, t = torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device) % len(texts)
                model.itm_logits(enc["image_tokens"][i], enc["text_hidden"][t], enc["text_mask"][t])
            w = cfg.eval.itc_weight
            batched, t_batched = timed(lambda: retrieval.rerank(model, enc, sim, k, batch_size, False, w), device,
                                       args.repeats)
            loop, t_loop = timed(lambda: retrieval.rerank_loop(model, enc, sim, k, w), device, args.repeats)

    n_img, n_txt = len(images), len(texts)
    pairs = n_img * min(k, n_txt) + n_txt * min(k, n_img)
    check = compare(batched, loop, sim, k, img2txt, txt2img, args.tol)
    same = "yes" if check["identical_rankings"] else f"no ({check['queries_ranked_differently']} queries differ)"
    rows = [{"method": "rerank_loop (per query)", "pairs": pairs, "seconds": t_loop, "pairs_per_s": pairs / t_loop,
             "speedup": 1.0, "identical": "reference"},
            {"method": f"rerank (batched, {batch_size} pairs/pass)", "pairs": pairs, "seconds": t_batched,
             "pairs_per_s": pairs / t_batched, "speedup": t_loop / t_batched, "identical": same}]
    precision = "bf16" if isinstance(autocast(device, args.precision), torch.autocast) else "fp32"
    print(f"\n{what}; {n_img} images, {n_txt} texts of retrieval_{args.split}.json; k={k}; device {device} "
          f"({precision}); encoding took {encode_s:.2f} s (not in the table); median of {args.repeats} run(s)\n")
    print(table(rows))
    print(f"\nsame candidates: {'yes' if check['same_candidates'] else 'no'}; "
          f"max |score difference| {check['max_abs_score_diff']:.2e} "
          f"({'within' if check['scores_within_tol'] else 'above'} {args.tol:g}); "
          f"recall metrics {'identical' if check['same_recall'] else 'DIFFERENT'}: "
          f"r_mean {check['recall_batched']['r_mean']} (batched) vs {check['recall_loop']['r_mean']} (loop)")
    result = {"setup": {"model": what, "images": n_img, "texts": n_txt, "k": k, "batch_size": batch_size,
                        "device": str(device), "precision": precision, "encode_seconds": encode_s,
                        "repeats": args.repeats, "torch": torch.__version__}, "rows": rows, "check": check}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
