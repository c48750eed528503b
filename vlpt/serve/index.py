"""The on-disk feature cache of `vlpt serve`: every image of a folder encoded once by the checkpoint's ITC image
encoder (and the captions of a caption file by its text encoder), stored under the cache folder and found again on
restart by a key of the checkpoint's identity and the folder's content.

- checkpoint identity: a hash of its config.yaml, vocab.txt and model.safetensors bytes (another checkpoint, or the
  same folder re-saved with other weights, is another key);
- folder content: a hash of every image file's path relative to the folder, size and modification time (a file
  added, removed, renamed or rewritten is another key); a caption file's key is a hash of its bytes.

A cache file is `<cache>/index-<key>.safetensors` (features, float32) beside `<cache>/index-<key>.json` (the image
paths in order); written to a temporary name and renamed, so a crash never leaves a half-written index that a later
start would read. Nothing is written anywhere else.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from vlpt.data.loader import ImageFiles
from vlpt.data.transforms import image_transform
from vlpt.errors import MissingFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMAT = 1  # of the cache files; part of every key


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively, by suffix), sorted by relative path; MissingFileError for a
    folder that is not there or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise MissingFileError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def _hash_file(h, path: Path, chunk: int = 1 << 22) -> None:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)


def checkpoint_key(path: str | Path) -> str:
    """The identity of a checkpoint folder: a hash of its config, vocabulary and weights."""
    from vlpt.engine.checkpoint import CONFIG, VOCAB, WEIGHTS
    h = hashlib.blake2b(digest_size=16)
    for name in (CONFIG, VOCAB, WEIGHTS):
        h.update(name.encode())
        _hash_file(h, Path(path) / name)
    return h.hexdigest()


def folder_key(folder: str | Path, paths: list[Path]) -> str:
    """The content of an image folder: each image's relative path, size and modification time."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_key(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    _hash_file(h, Path(path))
    return h.hexdigest()


def _key(*parts: str) -> str:
    return hashlib.blake2b("/".join((str(FORMAT), *parts)).encode(), digest_size=16).hexdigest()


def _write(cache: Path, name: str, tensors: dict, meta: dict) -> None:
    """`<name>.safetensors` and `<name>.json` under `cache`, each written to a temporary name and renamed; the JSON
    last, so an index is found only once both are complete."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{name}.tmp{os.getpid()}"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, cache / f"{name}.safetensors")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, cache / f"{name}.json")


def _read(cache: Path, name: str) -> tuple[dict, dict] | None:
    meta, weights = cache / f"{name}.json", cache / f"{name}.safetensors"
    if not (meta.is_file() and weights.is_file()):
        return None
    try:
        return load_file(str(weights)), json.loads(meta.read_text())
    except Exception:  # a damaged cache file is rebuilt, never fatal
        return None


@dataclass
class ImageIndex:
    """An indexed folder: its image paths and their normalised ITC features (N,D); `reused` says whether they came
    from the cache."""

    folder: Path
    paths: list[Path]
    features: torch.Tensor
    key: str
    reused: bool


@torch.no_grad()
def index_folder(model, folder: str | Path, cache: str | Path, ckpt_key: str, *, image_size: int,
                 batch_size: int = 256, device="cpu", progress=True) -> ImageIndex:
    """The ITC image features of every image under `folder`, from the cache when a file of the same checkpoint and
    folder content is there, else computed (a tqdm bar on stderr; `progress` may also be a callable
    `progress(done, total)`, e.g. the page's) and stored."""
    folder = Path(folder).resolve()
    paths = list_images(folder)
    key = _key("images", ckpt_key, folder_key(folder, paths), str(image_size))
    name = f"index-{key}"
    found = _read(Path(cache), name)
    if found is not None and found[1].get("paths") == [p.relative_to(folder).as_posix() for p in paths]:
        return ImageIndex(folder, paths, found[0]["features"].to(device), key, True)
    loader = DataLoader(ImageFiles(paths, image_transform(image_size)), batch_size=batch_size)
    feats, done = [], 0
    bar = tqdm(total=len(paths), desc=f"indexing {folder.name}", unit="img", disable=progress is False)
    for pixels in loader:
        feats.append(model.encode_image(pixels.to(device))[1].float())
        done += len(pixels)
        bar.update(len(pixels))
        if callable(progress):
            progress(done, len(paths))
    bar.close()
    features = torch.cat(feats)
    _write(Path(cache), name, {"features": features},
           {"folder": str(folder), "paths": [p.relative_to(folder).as_posix() for p in paths]})
    return ImageIndex(folder, paths, features, key, False)


@torch.no_grad()
def index_texts(model, tokenizer, texts: list[str], source_key: str, cache: str | Path, ckpt_key: str, *,
                max_len: int, batch_size: int = 256, device="cpu", progress=True) -> tuple[torch.Tensor, bool]:
    """Normalised ITC text features (T,D) of `texts` (a caption file's, whose content `source_key` names), cached as
    the image features are; and whether they came from the cache."""
    key = _key("texts", ckpt_key, source_key, str(max_len))
    name = f"captions-{key}"
    found = _read(Path(cache), name)
    if found is not None and found[1].get("count") == len(texts):
        return found[0]["features"].to(device), True
    feats = []
    for start in tqdm(range(0, len(texts), batch_size), desc="indexing captions", unit="batch",
                      disable=progress is False):
        ids, mask = tokenizer(texts[start:start + batch_size], max_len)
        feats.append(model.encode_text(ids.to(device), mask.to(device))[1].float())
    features = torch.cat(feats) if feats else torch.zeros(0, 1)
    _write(Path(cache), name, {"features": features}, {"count": len(texts)})
    return features, False
