"""Checkpoints: safetensors weights (teacher and queues included) + optimiser, scheduler, RNG and data position.

Layout: `<out>/checkpoints/step_000100/{model.safetensors, state.pt, config.yaml, vocab.txt, meta.json}` and
`<out>/latest` naming the newest; with an evaluation that selects, `<out>/best` is a copy of the best one.
`meta.json` holds the format number, the vlpt version, the method and the task heads the checkpoint has trained. Each checkpoint is written into a temporary folder and renamed into place, then `latest` is
replaced atomically, so a crash at any moment leaves the previous checkpoint loadable.

One format whatever ran it (one process, DDP or FSDP; `engine/parallel.py`): full weights, the optimiser state keyed
by parameter name, and each rank's RNG state; so a run resumes under another mode or number of ranks.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlpt.engine import distributed

WEIGHTS, STATE, CONFIG, VOCAB, META = "model.safetensors", "state.pt", "config.yaml", "vocab.txt", "meta.json"
FORMAT = 2  # 1: before backbones (no meta.json; keys map by `Method.legacy_keys`); 2: `Method.backbone`


def vlpt_version() -> str:
    try:
        return version("vlpt")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree that is not installed
        return "unknown"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | list[dict]) -> None:
    """Restore `rng_state()`; given one per rank (as the trainer saves them), this rank's; when the number of ranks
    changed, rank 0's, from which every other rank then derives a stream of its own (`distributed.seed_rank`)."""
    split = False
    if isinstance(state, list):
        split = len(state) != distributed.world_size()
        state = state[0] if split else state[distributed.rank()]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if split:
        distributed.seed_rank(int(torch.randint(2**31, ())))


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(out: str | Path, step: int, model: torch.nn.Module | dict, config: dict, vocab: str | Path,
         state: dict | None = None, keep: int = 0, meta: dict | None = None, as_best: bool = False) -> Path:
    """Write checkpoint `step` under `out` atomically and point `out/latest` at it; keep the newest `keep`; with
    `as_best`, also replace `out/best` by a copy of it. `model` is a module or its (full) state dict; `meta` goes
    into meta.json beside the format number and the version."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    for stale in root.glob(".step_*.tmp*"):  # left by a crash mid-save (one writer per run: rank 0)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu()
               for k, v in (model if isinstance(model, dict) else model.state_dict()).items()}
    save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(step)})
    torch.save({"step": step, **(state or {})}, tmp / STATE)
    (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copyfile(vocab, tmp / VOCAB)
    (tmp / META).write_text(json.dumps({"format": FORMAT, "vlpt": vlpt_version(), "step": step, **(meta or {})},
                                       indent=2) + "\n")
    if as_best:
        best_tmp = Path(out) / f".best.tmp{os.getpid()}"
        shutil.rmtree(best_tmp, ignore_errors=True)
        shutil.copytree(tmp, best_tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _replace_text(Path(out) / "latest", final.name + "\n")
    if as_best:
        shutil.rmtree(Path(out) / "best", ignore_errors=True)
        os.rename(best_tmp, Path(out) / "best")
    if keep > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    return final


def resolve(path: str | Path, out: str | Path | None = None) -> Path:
    """A checkpoint folder from: a checkpoint folder, a run folder (its latest), or 'latest' (in `out`)."""
    path = Path(out) if str(path) == "latest" and out else Path(path)
    if (path / "latest").is_file():
        path = path / "checkpoints" / (path / "latest").read_text().strip()
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (expected {WEIGHTS}; give a checkpoint or run folder)")
    return path


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint folder; a checkpoint written before it existed is format 1."""
    file = path / META
    if not file.is_file():
        return {"format": 1}
    meta = json.loads(file.read_text())
    if meta.get("format", 0) > FORMAT:
        raise ValueError(f"{path} is a checkpoint of format {meta['format']} (vlpt {meta.get('vlpt')}); this vlpt "
                         f"({vlpt_version()}) reads formats up to {FORMAT}: upgrade vlpt")
    return meta


def load_config(path: Path) -> dict:
    """The checkpoint's config as a dict; format 1 configs (every method's section in each) are cut to the keys of
    the method they name."""
    values = yaml.safe_load((path / CONFIG).read_text())
    if read_meta(path)["format"] == 1:
        from vlpt import methods
        values["method"] = known_keys(values["method"], methods.registry.get(values["method"]["name"]).config)
        values.get("optim", {})["module_lr"] = {f"backbone.{k}" if k in ("vision", "text", "fusion") else k: v
                                                for k, v in values.get("optim", {}).get("module_lr", {}).items()}
    return values


def known_keys(values: dict, cls) -> dict:
    """`values` without the keys dataclass `cls` (and its nested sections) does not declare."""
    import dataclasses
    from typing import get_type_hints
    hints = get_type_hints(cls)
    return {k: known_keys(v, hints[k]) if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) else v
            for k, v in values.items() if k in hints}


def migrate_keys(weights: dict, legacy_keys: dict[str, str]) -> dict:
    """Format 1 weights under format 2 names: each key starting with an old prefix gets the new one."""
    def rename(key: str) -> str:
        for old, new in legacy_keys.items():
            if key == old or (old.endswith(".") and key.startswith(old)):
                return new + key[len(old):]
        return key
    return {rename(k): v for k, v in weights.items()}


def load_weights(path: Path, model: torch.nn.Module, strict: bool = True) -> tuple[list[str], list[str]]:
    """Load a checkpoint's weights into `model` (format 1 keys renamed); returns the (missing, unexpected) keys,
    which are an error naming them when `strict`."""
    try:
        weights = load_file(str(path / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"corrupt checkpoint weights {path / WEIGHTS}: {err}") from None
    if read_meta(path)["format"] == 1:
        weights = migrate_keys(weights, getattr(model, "legacy_keys", {}))
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} weights have another shape than this config's model (another "
                         f"model size or method?): {'; '.join(wrong[:4])}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: weights do not match the model ({len(missing)} missing: {missing[:5]}; "
                         f"{len(unexpected)} unexpected: {unexpected[:5]})")
    return missing, unexpected


def load_state(path: Path) -> dict:
    if read_meta(path)["format"] == 1:
        raise ValueError(f"{path} is a format 1 checkpoint (before backbones): its weights load for evaluation and "
                         f"finetuning, but its optimiser state does not fit this vlpt's parameter groups: resume it "
                         f"with vlpt at commit a6bf737")
    return torch.load(path / STATE, map_location="cpu", weights_only=False)
def load_method(path: str | Path, device="cpu"):
    """(method in eval mode, its Config, its Tokenizer) from a checkpoint or run folder."""
    from vlpt import methods
    from vlpt.config import load_config as build_config
    from vlpt.data.tokenizer import Tokenizer

    path = resolve(path)
    cfg = build_config(base=load_config(path), overrides=["model.text.pretrained=", "model.vision.pretrained="])
    tokenizer = Tokenizer(path / VOCAB)
    model = methods.build(cfg, tokenizer.vocab_size)
    load_weights(path, model)
    return model.to(device).eval(), cfg, tokenizer
