"""Checkpoints: safetensors weights (teacher and queues included) + optimiser, scheduler, RNG and data position.

Layout: `<out>/checkpoints/step_000100/{model.safetensors, state.pt, config.yaml, vocab.txt}` and `<out>/latest`
naming the newest. Each checkpoint is written into a temporary folder and renamed into place, then `latest` is
replaced atomically, so a crash at any moment leaves the previous checkpoint loadable.

One format whatever ran it (one process, DDP or FSDP; `engine/parallel.py`): full weights, the optimiser state keyed
by parameter name, and each rank's RNG state; so a run resumes under another mode or number of ranks.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlpt.engine import distributed

WEIGHTS, STATE, CONFIG, VOCAB = "model.safetensors", "state.pt", "config.yaml", "vocab.txt"


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
         state: dict | None = None, keep: int = 0) -> Path:
    """Write checkpoint `step` under `out` atomically and point `out/latest` at it; keep the newest `keep`.
    `model` is a module or its (full) state dict."""
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
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _replace_text(Path(out) / "latest", final.name + "\n")
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


def load_config(path: Path) -> dict:
    return yaml.safe_load((path / CONFIG).read_text())


def load_weights(path: Path, model: torch.nn.Module) -> None:
    try:
        weights = load_file(str(path / WEIGHTS))
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"corrupt checkpoint weights {path / WEIGHTS}: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_state(path: Path) -> dict:
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
