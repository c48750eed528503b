"""Readers for ALBEF-style JSON annotation files, with errors that name the file and the position."""
from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vlpt.errors import MissingFileError, VlptError

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


class AnnotationError(VlptError, ValueError):
    pass


def load_annotations(path: str | Path, task: str = "pretrain") -> list[dict]:
    """A JSON list of records; raises AnnotationError naming the file, line and column, or the record index."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"annotation file not found: {path}")
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
        if task == "pretrain" and isinstance(record.get("image_id"), (list, dict)):
            raise AnnotationError(f"{path}: record {i} has image_id {json.dumps(record['image_id'])}; an image id is "
                                  f"a number or a string")
    return records


def integer_id(value) -> int | None:
    """An image id that is an integer already: an int (a bool is not), an integral float, or the decimal text of an
    int ("391895", read as 391895 as it always was; not "0391895"); None for any other value (text such as
    "coco_391895", other numbers, booleans, null)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?(0|[1-9][0-9]*)", value):
        return int(value)
    return None


def image_ids(records: list[dict]) -> list[int]:
    """One integer image id per pretraining record, the same for the JSON path and the shards `vlpt data shard`
    writes: an integer id (`integer_id`) stays as it is; each distinct other id ("coco_391895") and, for records
    without one, each distinct image path gets its own integer, in order of first appearance, counting up from above
    the file's largest integer id (and from 0 at least, below which the ITC queues mark empty slots): two captions
    of one image share an id, two images never do."""
    ints = [integer_id(r.get("image_id")) for r in records]
    start = max([0, *(i + 1 for i in ints if i is not None)])
    mapped: dict[tuple, int] = {}
    out = []
    for record, value in zip(records, ints):
        if value is None:
            raw = record.get("image_id")
            key = ("image", record["image"]) if raw is None else ("id", type(raw).__name__, raw)
            value = mapped.setdefault(key, start + len(mapped))
        out.append(value)
    return out


class ImageError(VlptError, OSError):
    pass


def load_image(path: str | Path) -> Image.Image:
    """An RGB image; ImageError naming the file when it is missing or corrupt. A name without an extension that is
    no file is read with .jpg, else .png (SNLI-VE's records name Flickr30K images by id; ALBEF appends .jpg)."""
    path = Path(path)
    if not path.suffix and not path.exists():
        path = next((p for p in (path.with_suffix(".jpg"), path.with_suffix(".png")) if p.exists()), path)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"corrupt image {path}: {err}") from None
