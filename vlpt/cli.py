"""`vlpt` command line: sub-commands only parse arguments and call the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def find_config(name: str) -> Path:
    """A config path as given, else under the repository's `configs/` folder."""
    for path in (Path(name), CONFIGS / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"config file not found: {name} (also looked in {CONFIGS})")


def cmd_synth(args) -> None:
    from vlpt.data.synthetic import generate
    out = generate(out=args.out, seed=args.seed, train=args.train, val=args.val, test=args.test,
                   image_size=args.image_size)
    print(f"wrote {out}")


def cmd_shard(args) -> None:
    from vlpt.data.shards import write_shards
    try:
        index = write_shards(args.annotations, args.images or None, args.out, args.shard_size, shuffle=args.shuffle,
                             seed=args.seed, skip_bad=args.skip_bad, progress=sys.stderr.isatty())
    except FileExistsError as err:
        sys.exit(f"vlpt: error: {err}")
    shards, bad = len(index["shards"]), index["skipped_images"]
    names = f"{{000000..{shards - 1:06d}}}.tar" if shards > 1 else "000000.tar"
    print(f"wrote {index['samples']} samples in {shards} shards: data.train={Path(args.out) / names}")
    if bad:
        print(f"skipped the records of {len(bad)} unreadable images (listed in {Path(args.out) / 'index.json'}), "
              f"e.g. {bad[0]}")


def cmd_pretrain(args) -> None:
    from vlpt.config import load_config
    from vlpt.engine.trainer import train
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(find_config(args.config), overrides)
    print(f"run folder: {train(cfg)}")


def cmd_evaluate(args) -> None:
    import torch
    from vlpt.engine.checkpoint import load_method
    from vlpt.engine.trainer import pick_device
    from vlpt.tasks import retrieval

    device = pick_device(args.device)
    model, cfg, tokenizer = load_method(args.checkpoint, device)
    for key in ("k", "batch_size", "itc_weight"):  # flags default to the checkpoint's eval.* settings
        if getattr(args, key) is None:
            setattr(args, key, getattr(cfg.eval, key))
    data = Path(args.data or cfg.data.root)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        metrics = retrieval.evaluate(model, data / f"retrieval_{args.split}.json", data, tokenizer,
                                     image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len,
                                     k=args.k, batch_size=args.batch_size, itc_weight=args.itc_weight, device=device,
                                     num_workers=args.num_workers)
    print(format_table({"retrieval": metrics}))
    if hasattr(model, "quantizer"):  # a visual codebook (CB-ViLA): how much of it the split's patches use
        from vlpt.tasks.codebook import assign_codewords, usage
        images = [data / p for p in retrieval.read_split(data / f"retrieval_{args.split}.json")[0]]
        indices = assign_codewords(model, images, image_size=cfg.model.vision.image_size, batch_size=args.batch_size,
                                   device=device, num_workers=args.num_workers)
        metrics.update(usage(indices, len(model.quantizer.codewords)))
        print(f"codebook: {metrics['codebook_used']} of {len(model.quantizer.codewords)} codewords used by the "
              f"{args.split} images' patches ({100 * metrics['codebook_used_fraction']:.1f} %), "
              f"perplexity {metrics['codebook_perplexity']:.1f}")
        if metrics["codebook_used_fraction"] < 0.05:
            print("warning: under 5 % of the codebook is in use: it has collapsed (are restarts off? "
                  "method.cbvila.dead_after)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")


def format_table(rows: dict[str, dict]) -> str:
    cols = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
    lines = [f"{'':18s}" + "".join(f"{c:>9s}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name + ' (itm)':18s}" + "".join(f"{m[c]:9.2f}" for c in cols))
        lines.append(f"{name + ' (itc)':18s}" + "".join(f"{m['itc_' + c]:9.2f}" for c in cols))
    return "\n".join(lines)


def cmd_demo(args) -> None:
    from vlpt.config import load_config
    from vlpt.data.synthetic import generate
    from vlpt.engine.trainer import train

    start = time.perf_counter()
    data = Path(args.data)
    if not (data / "meta.json").is_file():
        generate(out=data, seed=0)
    out = Path(args.out) / args.method
    cfg = load_config(find_config(f"pretrain/{args.method}_tiny.yaml"),
                      [f"data.root={data}", f"train.out={out}", *args.overrides])
    train(cfg)
    eval_args = argparse.Namespace(checkpoint=str(out), data=str(data), split="test", k=None, batch_size=None,
                                   itc_weight=None, out=str(out / "metrics.json"), device="auto",
                                   num_workers=cfg.data.num_workers)
    cmd_evaluate(eval_args)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; metrics in {out / 'metrics.json'}")


def cmd_visualize_reconstruction(args) -> None:
    from vlpt.engine.checkpoint import load_method
    from vlpt.engine.trainer import pick_device
    from vlpt.tasks.reconstruction import masked_l1, save_reconstructions

    device = pick_device(args.device)
    model, cfg, tokenizer = load_method(args.checkpoint, device)
    data = Path(args.data or cfg.data.root)
    out = save_reconstructions(model, tokenizer, data / (args.annotation or cfg.data.train), data, args.out,
                               image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, n=args.n,
                               seed=args.seed, device=device)
    print(f"wrote {out} (columns: original, masked, reconstructed)")
    if args.l1:
        l1 = masked_l1(model, tokenizer, data / args.l1, data, image_size=cfg.model.vision.image_size,
                       max_len=cfg.model.text.max_len, seed=args.seed, device=device)
        print(f"masked-pixel L1 on {args.l1}: reconstruction {l1['model']:.4f}, "
              f"each image's mean visible colour {l1['mean_colour']:.4f}")


def cmd_visualize_codebook(args) -> None:
    from vlpt.engine.checkpoint import load_method
    from vlpt.engine.trainer import pick_device
    from vlpt.tasks.codebook import save_codebook_grid
    from vlpt.tasks.retrieval import read_split

    device = pick_device(args.device)
    model, cfg, _ = load_method(args.checkpoint, device)
    data = Path(args.data or cfg.data.root)
    images = [data / p for p in read_split(data / f"retrieval_{args.split}.json")[0]]
    out, rows, used = save_codebook_grid(model, images, args.out, image_size=cfg.model.vision.image_size,
                                         codewords=args.codewords, patches=args.patches, seed=args.seed, device=device)
    print(f"wrote {out}: one row per codeword ({', '.join(map(str, rows))}), patches of the {args.split} images "
          f"quantised to it; {used['codebook_used']} of {len(model.quantizer.codewords)} codewords in use")


def cmd_keys(args) -> None:
    from vlpt.config import describe
    for key, default, help in describe():
        print(f"{key:32s} {str(default):24s} {help}")


def picture_parser(vis, name: str, method: str, out: str, help: str) -> argparse.ArgumentParser:
    """A `vlpt visualize` sub-command: a checkpoint of `method` in, a PNG out."""
    s = vis.add_parser(name, help=help)
    s.add_argument("--checkpoint", required=True, help=f"checkpoint folder or run folder of a {method} run")
    s.add_argument("--out", default=out, help="PNG file to write")
    s.add_argument("--data", default="", help="data folder (default: the checkpoint's data.root)")
    s.add_argument("--device", default="auto")
    return s


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlpt", description="vision-language pretraining (ALBEF family)")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="generate the embedded shapes data set and every task's annotations")
    s.add_argument("--out", default="data/shapes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=20000, help="training images")
    s.add_argument("--val", type=int, default=1000)
    s.add_argument("--test", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.set_defaults(func=cmd_synth)

    s = data.add_parser("shard", help="write a pretraining annotation file and its images as WebDataset tar shards")
    s.add_argument("--annotations", required=True, help="JSON list of {image, caption[, image_id]} records")
    s.add_argument("--images", default="", help="folder the records' image paths are relative to "
                   "(default: the annotation file's folder)")
    s.add_argument("--out", required=True, help="folder for 000000.tar, 000001.tar, ... and index.json")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    s.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="write the records in a seeded random order (files list an image's captions together)")
    s.add_argument("--seed", type=int, default=0, help="seed of the order")
    s.add_argument("--skip-bad", action="store_true",
                   help="leave out (and count) records whose image cannot be read instead of failing (data.skip_bad)")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("pretrain", help="pretrain a method; key=value arguments override the config")
    s.add_argument("--config", required=True, help="YAML file (path, or relative to configs/)")
    s.add_argument("--resume", default="", help="checkpoint folder, run folder, or 'latest' (train.resume)")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100")
    s.set_defaults(func=cmd_pretrain)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint").add_subparsers(dest="task", required=True)
    s = ev.add_parser("retrieval", help="zero-shot / finetuned image-text retrieval (ITC top-k, ITM rerank)")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    s.add_argument("--data", default="", help="data folder (default: the checkpoint's data.root)")
    s.add_argument("--split", default="test", help="reads retrieval_<split>.json")
    s.add_argument("--k", type=int, default=None, help="candidates reranked by ITM per query (eval.k)")
    s.add_argument("--batch-size", type=int, default=None, help="pairs per ITM forward (eval.batch_size)")
    s.add_argument("--itc-weight", type=float, default=None,
                   help="ITC similarity added to the ITM score when reranking (eval.itc_weight)")
    s.add_argument("--num-workers", type=int, default=2)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default="", help="write the metrics as JSON here")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("demo", help="generate data if missing, pretrain a tiny model, evaluate retrieval")
    s.add_argument("--method", default="albef")
    s.add_argument("--data", default="data/shapes")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the tiny config")
    s.set_defaults(func=cmd_demo)

    vis = sub.add_parser("visualize", help="pictures of a checkpoint").add_subparsers(dest="what", required=True)
    s = picture_parser(vis, "reconstruction", "maskvlm", "recon.png",
                       "MaskVLM masked image reconstruction: original | masked | reconstructed")
    s.add_argument("--annotation", default="", help="pretraining annotation file in it (default: data.train)")
    s.add_argument("--n", type=int, default=8, help="image-text pairs (rows)")
    s.add_argument("--seed", type=int, default=0, help="seed of the image mask")
    s.add_argument("--l1", default="", help="also report the masked-pixel L1 over this annotation file (e.g. "
                   "retrieval_test.json) against predicting each image's mean visible colour")
    s.set_defaults(func=cmd_visualize_reconstruction)

    s = picture_parser(vis, "codebook", "cbvila", "codebook.png",
                       "CB-ViLA visual codebook: image patches assigned to sampled codewords (Fig. 3)")
    s.add_argument("--split", default="test", help="reads the images of retrieval_<split>.json")
    s.add_argument("--codewords", type=int, default=8, help="codewords drawn at random among those in use (rows)")
    s.add_argument("--patches", type=int, default=10, help="patches drawn per codeword (columns)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_visualize_codebook)

    s = sub.add_parser("config", help="list every config key with its default and help")
    s.set_defaults(func=cmd_keys)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from vlpt.config import ConfigError
    from vlpt.data.annotations import AnnotationError, ImageError
    try:
        args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
    except (ConfigError, AnnotationError, ImageError, FileNotFoundError, ValueError) as err:
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: torch prepends the worker's traceback
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        sys.exit(f"vlpt: error: {message}")
