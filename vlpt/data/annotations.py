"""Readers for ALBEF-style JSON annotation files, with errors that name the file and the position."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Fields every record of a task must have (ALBEF's released formats).
REQUIRED = {
    "pretrain": ("image", "caption"),
    "retrieval": ("image", "caption"),
    "vqa": ("image", "question"),
    "nlvr": ("images", "sentence", "label"),
    "ve": ("image", "sentence", "label"),
    "grounding": ("image", "text"),
    "classification": ("image", "label"),
}


class AnnotationError(ValueError):
    pass


def load_annotations(path: str | Path, task: str = "pretrain") -> list[dict]:
    """A JSON list of records; raises AnnotationError naming the file, line and column, or the record index."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise AnnotationError(f"{path}: record {i} is not an object")
        missing = [k for k in REQUIRED[task] if k not in record]
        if missing:
            raise AnnotationError(f"{path}: record {i} lacks {', '.join(missing)} (a {task} record needs "
                                  f"{', '.join(REQUIRED[task])})")
    return records


class ImageError(OSError):
    pass


def load_image(path: str | Path) -> Image.Image:
    """An RGB image; ImageError naming the file when it is missing or corrupt."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"corrupt image {path}: {err}") from None
