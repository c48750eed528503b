"""`vlpt` command line: sub-commands only parse arguments and call the library. `finetune`, `evaluate` and
`visualize` get one sub-command per registered task or picture, with the flags those declare."""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import sys
from pathlib import Path

from vlpt.errors import MissingFileError, VlptError

CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped with the package


def find_config(name: str) -> Path:
    """A config path as given, else under the package's `configs/` folder (`configs/` in the repository)."""
    for path in (Path(name), CONFIGS / name):
        if path.is_file():
            return path
    raise MissingFileError(f"config file not found: {name} (also looked in {CONFIGS})")


def cmd_synth(args) -> None:
    from vlpt.data.synthetic import generate
    out = generate(out=args.out, seed=args.seed, train=args.train, val=args.val, test=args.test,
                   image_size=args.image_size)
    print(f"wrote {out}")


def cmd_train_image_tokenizer(args) -> None:
    from vlpt.models.visual_tokens import train_from_images
    out, n = train_from_images(args.images, args.out, codes=args.codes, patch=args.patch, image_size=args.image_size,
                               iterations=args.iterations, seed=args.seed, limit=args.limit)
    print(f"wrote {out}: {args.codes} codes over the {args.patch} px patches of {n} images "
          f"(method.simla.tokens: {{source: kmeans, path: {out}, codes: {args.codes}}})")


def cmd_shard(args) -> None:
    from vlpt.data.shards import write_shards
    try:
        index = write_shards(args.annotations, args.images or None, args.out, args.shard_size, shuffle=args.shuffle,
                             seed=args.seed, skip_bad=args.skip_bad, progress=sys.stderr.isatty())
    except FileExistsError as err:
        raise VlptError(str(err)) from None
    shards, bad = len(index["shards"]), index["skipped_images"]
    names = f"{{000000..{shards - 1:06d}}}.tar" if shards > 1 else "000000.tar"
    print(f"wrote {index['samples']} samples in {shards} shards: data.train={Path(args.out) / names}")
    if bad:
        print(f"skipped the records of {len(bad)} unreadable images (listed in {Path(args.out) / 'index.json'}), "
              f"e.g. {bad[0]}")


def cmd_pretrain(args) -> None:
    from vlpt.pretrain import pretrain, pretrain_config
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = pretrain_config(find_config(args.config), overrides)
    print(f"run folder: {pretrain(cfg)}")


def cmd_finetune(args) -> None:
    from vlpt.tasks.base import finetune, finetune_config
    overrides = [f"task.name={args.task}", *([f"task.checkpoint={args.checkpoint}"] if args.checkpoint else []),
                 *([f"train.resume={args.resume}"] if args.resume else []), *args.overrides]
    out = finetune(finetune_config(find_config(args.config) if args.config else None, overrides))
    print(f"run folder: {out}; test metrics in {out / 'metrics.json'}")


def cmd_evaluate(args) -> dict:
    from vlpt.engine.runtime import pick_device
    from vlpt.tasks.base import evaluate_checkpoint
    values = {key: getattr(args, key.split(".")[-1]) for key in args.options}
    overrides = [f"{key}={json.dumps(v) if isinstance(v, list) else v}" for key, v in values.items()
                 if v is not None]  # flags default to the checkpoint's values; a list as YAML (JSON) flow
    overrides += [f"data.num_workers={args.num_workers}", *([f"data.root={args.data}"] if args.data else []),
                  *args.overrides]
    task, metrics = evaluate_checkpoint(args.task, args.checkpoint, pick_device(args.device), args.split, overrides)
    if args.out:
        task.save(metrics, Path(args.out))
    print(task.table(metrics))
    return metrics


def cmd_evaluate_all(args) -> dict:
    from vlpt.engine.runtime import pick_device
    from vlpt.tasks.base import evaluate_all
    overrides = [f"data.num_workers={args.num_workers}", *([f"data.root={args.data}"] if args.data else []),
                 *args.overrides]
    tasks, results = evaluate_all(args.checkpoint, pick_device(args.device), args.split, args.tasks, overrides)
    for name, metrics in results.items():
        print(f"== {name}\n{tasks[name].table(metrics)}")
    if args.out:  # one metrics.json of every task, and each task's own file (and figures) beside it
        out = Path(args.out)
        for name, metrics in results.items():
            tasks[name].save(metrics, out / f"{name}.json")
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def cmd_demo(args) -> None:
    from vlpt import demo
    rows = demo.run(args.method, Path(args.data), Path(args.out), args.overrides, jobs=args.jobs)
    print(demo.table(rows))
    print(f"metrics of every stage under {args.out}; this table in {Path(args.out) / 'demo.json'}")
    print("try it in a browser:", serve_command(Path(args.out), args.method, Path(args.data)))


def serve_command(out: Path, method: str, data: Path) -> str:
    """The `vlpt serve` line for a `vlpt demo` run folder: its pretrained checkpoint on the test images, with the
    VQA and captioning heads it finetuned."""
    heads = [str(out / task) for task in ("vqa", "caption") if (out / task / "latest").is_file()]
    return (f"vlpt serve --checkpoint {out / method} --images {data / 'images' / 'test'}"
            + (f" --heads {' '.join(heads)}" if heads else ""))


def cmd_visualize(args) -> None:
    from vlpt.engine.checkpoint import load_method
    from vlpt.engine.runtime import pick_device
    from vlpt.viz import registry, require

    device = pick_device(args.device)
    model, cfg, tokenizer = load_method(args.checkpoint, device)
    picture = registry.get(args.what)()
    if picture.capability:
        require(model, picture.capability)
    print(picture.draw(model, cfg, tokenizer, args, device))


def cmd_serve(args) -> None:
    from vlpt.serve import serve
    serve(args)


def cmd_report(args) -> None:
    from vlpt.report import write_report
    out = write_report(args.runs, args.out, args.metrics, args.title)
    print(f"wrote {out} ({len(args.runs)} runs)")


def cmd_convert(args) -> None:
    from vlpt.engine.convert_albef import convert_albef
    print(convert_albef(args.checkpoint, args.out, args.vocab, args.vision_heads, args.text_heads).summary())


def cmd_keys(args) -> None:
    from vlpt.config import describe
    for key, default, help in describe():
        print(f"{key:32s} {str(default):24s} {help}")


def option_flag(p: argparse.ArgumentParser, key: str) -> None:
    """A flag for config key `key` (`eval.k` -> --k), typed and helped by its dataclass field; default None: the
    checkpoint's value."""
    from vlpt.config import describe
    rows = {k: (default, help) for k, default, help in describe()}
    default, help = rows[key]
    many = {"nargs": "+", "type": str} if isinstance(default, list) else {"type": type(default)}  # --prompts a b
    p.add_argument("--" + key.split(".")[-1].replace("_", "-"), default=None,
                   help=f"{help} ({key}; default: the checkpoint's)", **many)


def task_parsers(sub) -> None:
    """`vlpt finetune TASK` for every task that trains and `vlpt evaluate TASK` for every task."""
    from vlpt.tasks import registry
    ft = sub.add_parser("finetune", help="finetune a task from a checkpoint").add_subparsers(dest="task", required=True)
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on a task").add_subparsers(dest="task", required=True)
    for name in registry.names():
        task = registry.get(name)
        doc = (task.__doc__ or name).strip().splitlines()[0]
        if task.trains:
            s = ft.add_parser(name, help=doc)
            s.add_argument("--config", default="", help="task YAML (path, or relative to configs/)")
            s.add_argument("--checkpoint", default="", help="checkpoint or run folder to start from (task.checkpoint)")
            s.add_argument("--resume", default="", help="checkpoint folder, run folder, or 'latest' (train.resume)")
            s.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100")
            s.set_defaults(func=cmd_finetune)
        s = ev.add_parser(name, help=doc)
        s.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
        s.add_argument("--data", default="", help="data folder (default: the checkpoint's data.root)")
        s.add_argument("--split", default="test", help="the split's annotation file to read")
        for key in task.options:
            option_flag(s, key)
        s.add_argument("--num-workers", type=int, default=2, help="image-loading workers (data.num_workers)")
        s.add_argument("--device", default="auto")
        s.add_argument("--out", default="", help="write the metrics as JSON here")
        s.add_argument("overrides", nargs="*", help="key=value over the checkpoint's config, e.g. eval.batch_size=64")
        s.set_defaults(func=cmd_evaluate, options=task.options)
    s = ev.add_parser("all", help="every task the checkpoint has a head for, and the zero-shot ones")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    s.add_argument("--data", default="", help="data folder (default: the checkpoint's data.root)")
    s.add_argument("--split", default="test", help="the split's annotation files to read")
    s.add_argument("--tasks", nargs="+", default=[], help="only these tasks (each must have its head)")
    s.add_argument("--num-workers", type=int, default=2, help="image-loading workers (data.num_workers)")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default="", help="folder: metrics.json ({task: metrics}), and each task's file")
    s.add_argument("overrides", nargs="*", help="key=value over each task's config, e.g. eval.batch_size=64")
    s.set_defaults(func=cmd_evaluate_all)


def visualize_parsers(sub) -> None:
    """`vlpt visualize NAME` for every registered picture: a checkpoint in, a PNG out."""
    from vlpt.viz import registry
    vis = sub.add_parser("visualize", help="pictures of a checkpoint").add_subparsers(dest="what", required=True)
    for name in registry.names():
        picture = registry.get(name)()
        s = vis.add_parser(name, help=picture.help)
        s.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder"
                       + (f" of a method with {picture.capability}" if picture.capability else ""))
        s.add_argument("--out", default=picture.out, help="PNG file to write")
        s.add_argument("--data", default="", help="data folder (default: the checkpoint's data.root)")
        s.add_argument("--device", default="auto")
        picture.arguments(s)
        s.set_defaults(func=cmd_visualize)


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

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="tokenizer_command", required=True)
    s = tok.add_parser("train-image", help="a discrete image tokenizer (k-means of patch pixels) for masked image "
                                           "modelling targets (SIMLA's method.simla.tokens)")
    s.add_argument("--images", required=True, help="image folder, or a JSON annotation file whose records name images")
    s.add_argument("--out", required=True, help="tokenizer file to write (.safetensors)")
    s.add_argument("--codes", type=int, default=256, help="codes K")
    s.add_argument("--patch", type=int, default=16, help="patch size in pixels (model.vision.patch_size)")
    s.add_argument("--image-size", type=int, default=64, help="images resized to this (model.vision.image_size)")
    s.add_argument("--iterations", type=int, default=20, help="k-means iterations")
    s.add_argument("--limit", type=int, default=0, help="use at most this many images (0: all)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_train_image_tokenizer)

    s = sub.add_parser("pretrain", help="pretrain a method; key=value arguments override the config")
    s.add_argument("--config", required=True, help="YAML file (path, or relative to configs/)")
    s.add_argument("--resume", default="", help="checkpoint folder, run folder, or 'latest' (train.resume)")
    s.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100")
    s.set_defaults(func=cmd_pretrain)

    task_parsers(sub)

    s = sub.add_parser("demo", help="generate data if missing, pretrain a tiny model, evaluate it zero-shot, finetune "
                                    "and evaluate every downstream task: one table")
    s.add_argument("--method", default="albef")
    s.add_argument("--data", default="data/shapes")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--jobs", type=int, default=0, help="downstream stages run at a time, each with its share of the "
                                                      "CPU's threads (default 0: 2 on a CPU, 1 on a GPU)")
    s.add_argument("overrides", nargs="*", help="key=value overrides of every stage (after configs/demo/stages.yaml)")
    s.set_defaults(func=cmd_demo)

    visualize_parsers(sub)

    s = sub.add_parser("serve", help="a web demo of a checkpoint: search an image folder, Grad-CAM, VQA, captions, "
                                     "classification (needs pip install 'vlpt[demo]')")
    s.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder (any method)")
    s.add_argument("--images", required=True, help="image folder to search (indexed once, cached)")
    s.add_argument("--heads", nargs="+", default=[], help="task checkpoints (vlpt finetune vqa / caption runs) "
                   "whose heads add the Ask and Describe tabs")
    s.add_argument("--captions", default="", help="caption file ({image, caption} records) for image queries and "
                   "result captions (default: a retrieval_*.json in or above the folder naming its images)")
    s.add_argument("--cache", default="", help="folder of the feature cache and the page's files; nothing is "
                   "written elsewhere (default: $VLPT_CACHE or ~/.cache/vlpt/serve)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0: every "
                   "interface)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads for the model (0: torch's default; "
                   "one answers a tiny model fastest, more help a large one on a quiet machine)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("report", help="one self-contained HTML page comparing runs: loss, learning-rate and "
                                      "samples/s curves, metrics, config differences, ablation tables")
    s.add_argument("runs", nargs="+", help="run folders (vlpt pretrain / finetune output: metrics.jsonl or "
                   "metrics.json, and a checkpoint)")
    s.add_argument("--out", default="report.html", help="HTML file to write")
    s.add_argument("--metrics", nargs="+", default=[], help="the ablation tables' columns (default: every numeric "
                   "metric whose value differs within the group)")
    s.add_argument("--title", default="", help="the page's heading (default: the runs' names)")
    s.set_defaults(func=cmd_report)

    convert = sub.add_parser("convert", help="another code base's checkpoint as a vlpt checkpoint")
    s = convert.add_subparsers(dest="source", required=True).add_parser(
        "albef", help="a checkpoint ALBEF released (pre-training, retrieval, VQA, ...): method albef, its model "
                      "sizes read from the tensor shapes, ALBEF's text preprocessing")
    s.add_argument("checkpoint", help="ALBEF's .pth file")
    s.add_argument("--out", required=True, help="run folder to write (checkpoints/step_000000 and latest)")
    s.add_argument("--vocab", default="", help="BERT's uncased WordPiece vocab.txt (bert-base-uncased's for ALBEF's "
                   "checkpoints); default: vocab.txt beside the checkpoint")
    s.add_argument("--vision-heads", type=int, default=12, help="ViT attention heads (no tensor shape holds them)")
    s.add_argument("--text-heads", type=int, default=12, help="BERT attention heads (no tensor shape holds them)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("config", help="list every config key with its default and help")
    s.set_defaults(func=cmd_keys)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run one command. vlpt's own errors (bad input: a key, a value, a file) print one line and exit with code 2;
    anything else is a bug and keeps its traceback."""
    args = parser().parse_args(argv)
    if not faulthandler.is_enabled():  # a crash in native code (a segfault in a library) prints every thread's stack
        with contextlib.suppress(OSError, ValueError):  # a stderr with no file descriptor (captured) cannot have it
            faulthandler.enable()
    try:
        args.func(args)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
    except VlptError as err:
        message = str(err)
        if "Original Traceback" in message:  # raised in a DataLoader worker: torch prepends the worker's traceback
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"vlpt: error: {message}", file=sys.stderr)
        sys.exit(2)
