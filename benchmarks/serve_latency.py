"""Search latency of `vlpt serve` after indexing: the Search tab's handler (`Demo.search`, what a page request runs
beyond Gradio's own few milliseconds) over the embedded test images, by ITC alone and with ITM reranking of the
checkpoint's eval.k candidates; plus the time to index the folder and to start again from the cache.

    python benchmarks/serve_latency.py --checkpoint runs/demo/albef [--images data/shapes/images/test]

Queries are the folder's own captions (those within the model's text length), one at a time as a user types them.
Target (issue 18): under 200 ms per query on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/demo/albef", help="checkpoint or run folder")
    p.add_argument("--images", default="data/shapes/images/test", help="image folder (`vlpt data synth` writes it)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--top", type=int, default=8, help="results per query (the page's default)")

    p.add_argument("--threads", type=int, default=1, help="torch threads (vlpt serve --threads; 0: torch's default, "
                   "which on a machine shared with training runs waits on busy cores)")
    p.add_argument("--cache", default="", help="cache folder (default: a temporary one, so indexing is measured)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vlpt.serve.demo import Demo

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or tmp)
        start = time.perf_counter()
        demo = Demo(args.checkpoint, args.images, cache, progress=True)
        first = time.perf_counter() - start
        start = time.perf_counter()
        again = Demo(args.checkpoint, args.images, cache, progress=False)
        restart = time.perf_counter() - start
        assert again.index.reused
        limit = demo.cfg.model.text.max_len
        queries = [c for c in demo.caption_texts if int(demo.tokenizer([c], 512)[1].sum()) <= limit][:args.queries]
        if not queries:
            queries = ["a red circle on the left"] * args.queries
        print(f"{demo.name} checkpoint {demo.path}; {len(demo.index.paths)} images in {demo.index.folder}; "
              f"{torch.get_num_threads()} torch threads; {len(queries)} queries, top {args.top}, ITM reranks the "
              f"top {max(args.top, demo.cfg.eval.k)}")
        print(f"index: {first:.2f} s to build (images and captions, model load included), {restart:.2f} s to "
              f"start again from the cache")
        rows = []
        for label, rerank in (("ITC only", False), ("ITC + ITM rerank", True)):
            demo.search(queries[0], args.top, rerank)  # warm-up
            times = []
            for q in queries:
                t = time.perf_counter()
                demo.search(q, args.top, rerank)
                times.append(1000 * (time.perf_counter() - t))
            times.sort()
            rows.append((label, statistics.median(times), times[int(0.9 * (len(times) - 1))], times[-1]))
        print(f"\n| search | median ms | p90 ms | max ms |\n|---|---|---|---|")
        for label, median, p90, worst in rows:
            print(f"| {label} | {median:.1f} | {p90:.1f} | {worst:.1f} |")


if __name__ == "__main__":
    main()
