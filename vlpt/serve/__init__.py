"""`vlpt serve`: a web demo of any checkpoint (Gradio, `pip install 'vlpt[demo]'`). `demo.Demo` computes what each
tab shows, `index` caches an image folder's features on disk, `app` builds the page."""
from __future__ import annotations


def serve(args) -> None:
    """`vlpt serve`: load, index (a progress bar; the cache reused on restart), then serve until interrupted."""
    from pathlib import Path

    from vlpt.engine.runtime import pick_device
    from vlpt.serve.app import build, import_gradio, launch
    from vlpt.serve.demo import Demo, default_cache

    import torch
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else default_cache()
    import_gradio(cache)  # before any work: a missing extra is one line
    demo = Demo(args.checkpoint, args.images, cache, heads=args.heads, captions=args.captions or None,
                device=pick_device(args.device))
    print(demo.summary(), flush=True)
    app = build(demo)
    host = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"serving on http://{host}:{args.port} (Ctrl-C stops)", flush=True)
    launch(app, args.host, args.port)
