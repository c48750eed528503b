"""Checkpoints: safetensors weights (teacher and queues included) + optimiser, scheduler, RNG and data position.

Layout: `<out>/checkpoints/step_000100/{model.safetensors, state.pt, config.yaml, vocab.txt, meta.json}` and
`<out>/latest` naming the newest; with an evaluation that selects, `<out>/best` is a copy of the best one.
`meta.json` holds the format number, the vlpt version, the method and the task heads the checkpoint has trained.

Crash safety: each checkpoint is written into a temporary folder and renamed into place, then `latest` is replaced
atomically, so a crash at any moment leaves the previous checkpoint loadable. Re-saving a step that exists (or
`best`) moves the old folder aside (`.step_N.old`), renames the new one into place, then deletes the aside: in the
moment between the two renames the folder `latest` names is the aside, which `resolve` reads, and the next save
puts an aside whose folder is missing back in place. Pruning (`keep`) never removes the folder `latest` names.

`state.pt` is read with `torch.load(weights_only=True)`: tensors and plain values only, so a shared checkpoint cannot
run code; RNG states are saved as tensors and plain types for it.

One format whatever ran it (one process, DDP or FSDP; `engine/parallel.py`): full weights, the optimiser state keyed
by parameter name, and each rank's RNG state; so a run resumes under another mode or number of ranks.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from vlpt.engine import distributed
from vlpt.errors import MissingFileError, VlptError

WEIGHTS, STATE, CONFIG, VOCAB, META = "model.safetensors", "state.pt", "config.yaml", "vocab.txt", "meta.json"
FORMAT = 2  # 1: before backbones (no meta.json; keys map by `Method.legacy_keys`); 2: `Method.backbone`


class CheckpointError(VlptError, ValueError):
    """A checkpoint that cannot be read or written: missing, corrupt, of another format, or unsafe (one line)."""


class NoCheckpoint(MissingFileError):
    """No checkpoint where one was named."""


def vlpt_version() -> str:
    try:
        return version("vlpt")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree that is not installed
        return "unknown"


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain types (`torch.load(weights_only=True)` reads them back)."""
    numpy = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key": uint32 array, "pos"}, ...}
    numpy["state"] = {**numpy["state"], "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64))}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(state: dict) -> dict:
    """np.random.set_state's argument from `rng_state()["numpy"]`."""
    return {**state, "state": {**state["state"], "key": state["state"]["key"].numpy().astype(np.uint32)}}


def set_rng_state(state: dict | list[dict]) -> None:
    """Restore `rng_state()`; given one per rank (as the trainer saves them), this rank's; when the number of ranks
    changed, rank 0's, from which every other rank then derives a stream of its own (`distributed.seed_rank`)."""
    split = False
    if isinstance(state, list):
        split = len(state) != distributed.world_size()
        state = state[0] if split else state[distributed.rank()]
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(_numpy_state(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if split:
        distributed.seed_rank(int(torch.randint(2**31, ())))


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _aside(folder: Path) -> Path:
    """Where `_swap_in` keeps the previous `folder` while the new one is renamed into place."""
    return folder.with_name(f".{folder.name}.old")


def _swap_in(new: Path, final: Path) -> None:
    """Rename the complete folder `new` to `final`, replacing an existing `final` so that a crash at any moment
    leaves `final` or its aside complete: the old folder goes aside, the new one into place, then the aside away."""
    aside = _aside(final)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)  # an aside beside its folder is stale: a crash after the swap
        os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)


def _recover(parent: Path, pattern: str) -> None:
    """After a crash mid-swap: put back each aside whose folder is missing (it is the complete previous one), drop
    the others."""
    for aside in parent.glob(f".{pattern}.old"):
        folder = parent / aside.name[1:-len(".old")]
        if folder.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, folder)


def _step_of(folder: Path) -> int:
    match = re.fullmatch(r"step_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def save(out: str | Path, step: int, model: torch.nn.Module | dict, config: dict, vocab: str | Path | bytes,
         state: dict | None = None, keep: int = 0, meta: dict | None = None, as_best: bool = False) -> Path:
    """Write checkpoint `step` under `out` atomically and point `out/latest` at it; keep `keep` checkpoints: this
    one, which `latest` names, and the newest others (by step); with `as_best`, also replace `out/best` by a copy
    of it (never pruned). `model` is a module or its (full) state dict; `vocab` the vocabulary file or its
    contents; `meta` goes into meta.json beside the format number and the version."""
    # read before anything below moves folders: a resumed run may have read its vocabulary from an aside
    vocab = vocab if isinstance(vocab, bytes) else Path(vocab).read_bytes()
    out = Path(out)
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    _recover(root, "step_*")
    _recover(out, "best")
    for stale in [*root.glob(".step_*.tmp*"), *out.glob(".best.tmp*")]:  # a crash mid-save (one writer: rank 0)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    tmp.mkdir()
    weights, stored = {}, set()
    for k, v in (model if isinstance(model, dict) else model.state_dict()).items():
        v = v.detach().contiguous().cpu()
        if v.untyped_storage().data_ptr() in stored:  # a tied weight (shared under two names): a copy per name,
            v = v.clone()                             # which safetensors requires
        stored.add(v.untyped_storage().data_ptr())
        weights[k] = v
    save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(step)})
    torch.save({"step": step, **(state or {})}, tmp / STATE)
    (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp / VOCAB).write_bytes(vocab)
    (tmp / META).write_text(json.dumps({"format": FORMAT, "vlpt": vlpt_version(), "step": step, **(meta or {})},
                                       indent=2) + "\n")
    if as_best:
        best_tmp = out / f".best.tmp{os.getpid()}"
        shutil.copytree(tmp, best_tmp)
    _swap_in(tmp, final)
    _replace_text(out / "latest", final.name + "\n")
    if as_best:
        _swap_in(best_tmp, out / "best")
    if keep > 0:
        others = sorted((p for p in root.glob("step_*") if p.is_dir() and p != final), key=_step_of)
        for old in others[:max(0, len(others) - (keep - 1))]:
            shutil.rmtree(old)
    return final


def _present(folder: Path) -> Path:
    """`folder`, or its aside when a crash between the two renames of `_swap_in` left only that."""
    aside = _aside(folder)
    return aside if not (folder / WEIGHTS).is_file() and (aside / WEIGHTS).is_file() else folder


def resolve(path: str | Path, out: str | Path | None = None, latest: bool = False) -> Path:
    """A checkpoint folder from: a checkpoint folder, a run folder, or 'latest' (in `out`). A run folder gives its
    `best` checkpoint where an evaluation selected one (what its metrics.json reports), else its latest; with
    `latest` (resuming), always its latest."""
    path = Path(out) if str(path) == "latest" and out else Path(path)
    if (path / "latest").is_file():
        run, best = path, _present(path / "best")
        use_best = not latest and (best / WEIGHTS).is_file()
        path = best if use_best else path / "checkpoints" / (path / "latest").read_text().strip()
        if not latest and not use_best:
            _warn_if_unfinished(run, path)
    path = _present(path)
    if not (path / WEIGHTS).is_file():
        raise NoCheckpoint(f"no checkpoint at {path} (expected {WEIGHTS}; give a checkpoint or run folder)")
    return path


def _warn_if_unfinished(run: Path, path: Path) -> None:
    """Say so when a run folder's latest checkpoint falls short of its `train.steps`: a run still training (or one
    that stopped early) would otherwise be evaluated or finetuned from a half-trained checkpoint without a word. A
    converted release (step 0 of the paper's schedule) is not a run."""
    try:
        steps = int(yaml.safe_load((path / CONFIG).read_text())["train"]["steps"])
        if "converted" in read_meta(path):
            return
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):  # ValueError: a CheckpointError too
        return
    if 0 <= _step_of(path) < steps:
        warnings.warn(f"{run}: its latest checkpoint is step {_step_of(path)} of {steps} (the run is still "
                      f"training, or stopped early): using {path}", stacklevel=3)


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint folder; a checkpoint written before it existed is format 1."""
    file = path / META
    if not file.is_file():
        return {"format": 1}
    try:
        meta = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not a vlpt checkpoint's meta.json (not JSON: {err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise CheckpointError(f"{file} is not a vlpt checkpoint's meta.json (no format number)")
    if meta["format"] > FORMAT:
        raise CheckpointError(f"{path} is a checkpoint of format {meta['format']} (vlpt {meta.get('vlpt')}); this "
                              f"vlpt ({vlpt_version()}) reads formats up to {FORMAT}: upgrade vlpt")
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
        raise CheckpointError(f"corrupt checkpoint weights {path / WEIGHTS}: {err}") from None
    meta = read_meta(path)
    if meta["format"] == 1:
        weights = migrate_keys(weights, getattr(model, "legacy_keys", {}))
    own = model.state_dict()
    if meta.get("task") and not any(k.startswith("method.") for k in own):  # a task's encoders into a method:
        weights = {k.removeprefix("method."): v for k, v in weights.items() if k.startswith("method.")}  # no head,
        weights = {k: v for k, v in weights.items() if k in own or not k.startswith(("teacher.", "queues."))}
    weights = resample_position_embeddings(weights, own)
    wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} weights have another shape than this config's model "
                              f"(another model size or method?): {'; '.join(wrong[:4])}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path}: weights do not match the model ({len(missing)} missing: {missing[:5]}; "
                              f"{len(unexpected)} unexpected: {unexpected[:5]})")
    return missing, unexpected


def resample_position_embeddings(weights: dict, own: dict) -> dict:
    """ViT position embeddings of another grid (a 256 px checkpoint finetuned at 384 px) resampled to the model's,
    bicubically, the [CLS] position kept (timm's `resample_abs_pos_embed`; ALBEF's `interpolate_pos_embed`)."""
    from timm.layers import resample_abs_pos_embed
    out = dict(weights)
    for key, value in weights.items():
        if key.endswith("pos_embed") and key in own and value.shape != own[key].shape and value.ndim == 3:
            side = int(round((own[key].shape[1] - 1) ** 0.5))
            out[key] = resample_abs_pos_embed(value, [side, side], num_prefix_tokens=1)
    return out


def load_state(path: Path) -> dict:
    """`state.pt` (optimiser, scheduler, RNG, data position) of a checkpoint folder, read with `weights_only=True`:
    a file holding anything but tensors and plain values is refused before anything in it runs."""
    if read_meta(path)["format"] == 1:
        raise CheckpointError(f"{path} is a format 1 checkpoint (before backbones): its weights load for evaluation "
                              f"and finetuning, but its optimiser state does not fit this vlpt's parameter groups: "
                              f"resume it with vlpt at commit a6bf737")
    file = path / STATE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: this checkpoint has weights but no training state to resume from")
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if scan is not None:  # the pickle's globals read, nothing executed: for a message that names what would run
        try:
            unsafe = list(scan(file))
        except Exception:
            raise CheckpointError(f"{file} is not a vlpt training state (not an archive torch.save writes: "
                                  f"truncated, or another kind of file)") from None
        if unsafe:
            raise CheckpointError(f"{file} is refused: besides tensors and plain values it names "
                                  f"{', '.join(unsafe[:4])}, which loading it would call; vlpt writes no such "
                                  f"thing (a file from elsewhere?)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's own refusal (a disallowed instruction), or a corrupt archive
        reason = " ".join(line.strip() for line in str(err).splitlines() if "Unsupported" in line or
                          "error" in line.lower()) or type(err).__name__
        raise CheckpointError(f"{file} is not a readable vlpt training state ({reason[:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file} is not a vlpt training state (no step number in it)")
    return state


def open_checkpoint(path: str | Path, overrides: list[str] = (), task: str = ""):
    """(checkpoint folder, its Config, its Tokenizer) from a checkpoint or run folder; the config does not point at
    pretrained weights again (the checkpoint holds them), `overrides` are applied on top. With `task`, the config
    is that task's: the checkpoint's task keys if it was finetuned on that task, the task's defaults otherwise."""
    from vlpt.config import load_config as build_config
    from vlpt.data.tokenizer import Tokenizer

    path = resolve(path)
    base = load_config(path)
    if task and base.get("task", {}).get("name") != task:
        base["task"] = {"name": task}
    cfg = build_config(base=base, overrides=["model.text.pretrained=", "model.vision.pretrained=", *overrides])
    return path, cfg, Tokenizer(path / VOCAB, cfg.model.text.preprocess)


def load_method(path: str | Path, device="cpu"):
    """(method in eval mode, its Config, its Tokenizer) from a checkpoint or run folder."""
    from vlpt import methods

    path, cfg, tokenizer = open_checkpoint(path)
    model = methods.build(cfg, tokenizer.vocab_size)
    load_weights(path, model)
    return model.to(device).eval(), cfg, tokenizer
