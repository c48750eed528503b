"""The embedded default data set: deterministic scenes of simple shapes with every downstream task's
annotations in ALBEF's released JSON formats.

Each scene holds 1 to 3 shapes, each in its own cell of a 3x3 grid, with distinct colours, so "the red
shape" always names one shape. Every image's content and texts come from its own RNG, seeded by
(seed, split, index), so images can be made in parallel and the output is byte-identical per seed.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from vlpt.errors import VlptError

VERSION = 2  # 2: val splits of every task; VE images named without extension; ten VQA answers
SPLITS = ("train", "val", "test")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 235), "yellow": (240, 220, 40),
           "purple": (150, 60, 210), "orange": (245, 140, 20), "white": (240, 240, 240), "cyan": (40, 220, 230)}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")
# Grid cells in reading order: the answer to "where is ..." and the phrase used in sentences.
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PHRASES = ("at the top left", "at the top", "at the top right", "on the left", "in the center",
           "on the right", "at the bottom left", "at the bottom", "at the bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
MATERIALS = ("wood", "metal", "glass", "paper", "plastic")
FEELINGS = ("heavy", "soft", "warm", "cold")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
ANSWERS = sorted({*COLOURS, *SHAPES, *NUMBERS[:4], *PLACES, "yes", "no"})
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TEMPLATE_WORDS = """a an and at the of on in to top bottom left right center above below there is are
    shape shapes single picture image drawing what colour how many where both images contain contains has
    have more than same number exactly neither total made leftmost rightmost topmost bottommost""".split()
VOCAB = sorted({*TEMPLATE_WORDS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIZES, *NUMBERS, *MATERIALS,
                *FEELINGS, *" ".join(ANSWERS).split()})


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    cell: int  # 0..8, row-major
    cx: int
    cy: int
    r: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def row(self) -> int:
        return self.cell // 3

    @property
    def col(self) -> int:
        return self.cell % 3

    def outline(self) -> list[tuple[int, int]]:
        """Polygon vertices of the drawn shape (a circle is a 24-gon)."""
        corners = {"circle": 24, "square": 4, "triangle": 3, "star": 10, "diamond": 4}[self.shape]
        start = {"square": 45.0, "star": -90.0, "triangle": -90.0}.get(self.shape, 0.0)
        points = []
        for k in range(corners):
            radius = self.r * (0.45 if self.shape == "star" and k % 2 else 1.0)
            angle = math.radians(start + 360.0 * k / corners)
            points.append((round(self.cx + radius * math.cos(angle)), round(self.cy + radius * math.sin(angle))))
        return points

    @property
    def bbox(self) -> list[int]:
        """[x, y, w, h] in pixels of the drawn polygon."""
        xs, ys = zip(*self.outline())
        return [min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1]


@dataclass(frozen=True)
class ImageInfo:
    """One image: its path (relative to the data set root), its shapes and its per-image texts."""
    path: str
    scene: tuple[Shape, ...]
    captions: list[str]
    questions: list[tuple[str, str]]
    hypotheses: list[tuple[str, str]]
    refs: list[tuple[str, list[int]]]
    negatives: list[str]
    label: int | None


# ---------------------------------------------------------------- scenes and pixels

def sample_scene(rng: random.Random, image_size: int) -> tuple[tuple[int, int, int], tuple[Shape, ...]]:
    """A dark, slightly tinted background and 1-3 shapes in distinct cells with distinct colours.

    Single-shape scenes are kept rare (15 %): there are only 360 of them, so frequent ones would give many images
    the same caption, and hard negatives that are in truth matches."""
    grey = rng.randint(20, 70)
    background = tuple(grey + rng.randint(-8, 8) for _ in range(3))
    n = rng.choices((1, 2, 3), weights=(15, 40, 45))[0]
    cell_px = image_size / 3
    shapes = []
    for cell, colour in zip(sorted(rng.sample(range(9), n)), rng.sample(list(COLOURS), n)):
        size = rng.choice(SIZES)
        r = max(2, round(cell_px * (0.4 if size == "large" else 0.24)))
        jitter = max(0, int(cell_px / 2 - r) - 1)
        cx = int(cell_px * (cell % 3 + 0.5)) + rng.randint(-jitter, jitter)
        cy = int(cell_px * (cell // 3 + 0.5)) + rng.randint(-jitter, jitter)
        shapes.append(Shape(colour, rng.choice(SHAPES), size, cell, cx, cy, r))
    return background, tuple(shapes)


def draw(background: tuple[int, int, int], scene: tuple[Shape, ...], image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), background)
    pen = ImageDraw.Draw(img)
    for s in scene:
        pen.polygon(s.outline(), fill=COLOURS[s.colour])
    return img


# ---------------------------------------------------------------- wording helpers

def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _np(s: Shape, size: bool = False) -> str:
    """'a red circle', or 'a large red circle' with the size."""
    return _a(f"{s.size} {s.name}" if size else s.name)


def _count(n: int) -> str:
    return "there is one shape" if n == 1 else f"there are {NUMBERS[n]} shapes"


def _relation(a: Shape, b: Shape, rng: random.Random) -> str:
    """A true spatial relation of `a` to `b` (their cells differ)."""
    options = [rel for rel, holds in (("to the left of", a.col < b.col), ("to the right of", a.col > b.col),
                                      ("above", a.row < b.row), ("below", a.row > b.row)) if holds]
    return rng.choice(options)


def _at(cell: int, s: Shape) -> bool:
    """Whether PHRASES[cell] may be read as describing `s` ('at the top' also fits the top left shape)."""
    row, col = divmod(cell, 3)
    if cell == 4:
        return s.cell == 4
    return (row == 1 or s.row == row) and (col == 1 or s.col == col)


def _placed_uniquely(scene: tuple[Shape, ...], s: Shape) -> bool:
    return not any(_at(s.cell, t) for t in scene if t is not s)


# ---------------------------------------------------------------- per-image texts

def captions(scene: tuple[Shape, ...], rng: random.Random) -> list[str]:
    """Five paraphrases; the first (every shape with size, colour, shape and place) is the canonical one."""
    def listing(shapes, size=False):
        return " and ".join(f"{_np(s, size)} {PHRASES[s.cell]}" for s in shapes)

    shuffled = rng.sample(scene, len(scene))
    if len(scene) == 1:
        relational = f"a single {scene[0].name} {PHRASES[scene[0].cell]}"
    else:
        a, b = shuffled[:2]
        relational = f"{_np(a)} {_relation(a, b, rng)} {_np(b)}"
        relational += "".join(f" and {_np(c)} {_relation(c, b, rng)} the {b.name}" for c in shuffled[2:])
    return [
        listing(scene, size=True),
        f"{NUMBERS[len(scene)]} {'shape' if len(scene) == 1 else 'shapes'} {listing(shuffled)}",
        relational,
        " and ".join(f"{PHRASES[s.cell]} there is {_np(s, rng.random() < 0.5)}" for s in shuffled),
        f"{rng.choice(('a picture of', 'an image of', 'a drawing of'))} {listing(shuffled)}",
    ]


def hard_negatives(scene: tuple[Shape, ...], caption: str) -> list[str]:
    """`caption` with the colours of two differently shaped shapes swapped, one per such pair."""
    out = []
    for i, a in enumerate(scene):
        for b in scene[i + 1:]:
            if a.shape != b.shape:
                swap = {a.colour: b.colour, b.colour: a.colour}
                out.append(" ".join(swap.get(w, w) for w in caption.split()))
    return out


def questions(scene: tuple[Shape, ...], rng: random.Random, yes: bool) -> list[tuple[str, str]]:
    """One (question, answer) of each kind: colour, shape, count, position, yes/no (answer fixed by `yes`)."""
    s = rng.choice(scene)
    lone = [t for t in scene if sum(u.shape == t.shape for u in scene) == 1]
    placed = [t for t in scene if _placed_uniquely(scene, t)]  # never empty: corners and center always are
    if lone and rng.random() < 0.5:
        c = rng.choice(lone)
        colour = (f"what colour is the {c.shape}", c.colour)
    else:
        c = rng.choice(placed)
        colour = (f"what colour is the shape {PHRASES[c.cell]}", c.colour)
    kind = rng.choice(SHAPES)
    count = rng.choice([("how many shapes are there", NUMBERS[len(scene)]),
                        (f"how many {kind}s are there", NUMBERS[sum(t.shape == kind for t in scene)])])
    if yes:
        asked = rng.choice(scene).name
    else:  # half the time a wrong binding of attributes that are present
        present = {t.name for t in scene}
        mixes = [f"{t.colour} {u.shape}" for t in scene for u in scene if f"{t.colour} {u.shape}" not in present]
        absent = [name for name in CLASSES if name not in present]
        asked = rng.choice(mixes if mixes and rng.random() < 0.5 else absent)
    return [colour, (f"what shape is {s.colour}", s.shape), count,
            (f"where is the {s.name}", PLACES[s.cell]), (f"is there {_a(asked)}", "yes" if yes else "no")]


QUESTION_TYPES = ("colour", "shape", "count", "place", "yes/no")  # the kinds `questions` asks, in its order
ALTERNATIVES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": NUMBERS[:4], "place": PLACES,
                "yes/no": ("yes", "no")}


def annotators(answer: str, kind: str, rng: random.Random) -> list[str]:
    """Ten annotators' answers, as VQA v2 has: 6 to 10 give the true answer, the others another answer of the same
    kind; so the official score (min(1, matches / 3)) gives the true answer 1 and a minority answer partial credit."""
    right = rng.randint(6, 10)
    others = [a for a in ALTERNATIVES[kind] if a != answer]
    answers = [answer] * right + [rng.choice(others) for _ in range(10 - right)]
    rng.shuffle(answers)
    return answers


def hypotheses(scene: tuple[Shape, ...], rng: random.Random) -> list[tuple[str, str]]:
    """One entailed, one neutral and one contradicted statement about the scene."""
    s = rng.choice(scene)
    others = [t for t in scene if t is not s]
    far = [cell for cell in range(9) if cell // 3 != s.row and cell % 3 != s.col]
    present = {t.name for t in scene}
    absent = [name for name in CLASSES if name not in present]
    wrong_colour = rng.choice([c for c in COLOURS if c != s.colour])
    true = [f"there is {_np(s)}", f"the {s.name} is {PHRASES[s.cell]}", f"the {s.name} is {s.size}",
            _count(len(scene))]
    false = [f"there is {_a(rng.choice(absent))}", f"the {s.name} is {PHRASES[rng.choice(far)]}",
             f"the {s.name} is {'small' if s.size == 'large' else 'large'}",
             _count(rng.choice([n for n in (1, 2, 3) if n != len(scene)]))]
    if _placed_uniquely(scene, s):
        true.append(f"the shape {PHRASES[s.cell]} is {s.colour}")
        false.append(f"the shape {PHRASES[s.cell]} is {wrong_colour}")
    if others:
        o = rng.choice(others)
        rel = _relation(s, o, rng)
        true.append(f"the {s.name} is {rel} the {o.name}")
        false.append(f"the {s.name} is {OPPOSITE[rel]} the {o.name}")
    neutral = rng.choice([f"the {s.name} is made of {rng.choice(MATERIALS)}",
                          f"the {s.name} is {rng.choice(FEELINGS)}"])
    return [(rng.choice(true), "entailment"), (neutral, "neutral"), (rng.choice(false), "contradiction")]


def expressions(scene: tuple[Shape, ...], s: Shape) -> list[str]:
    """Referring expressions that pick out `s` and no other shape of the scene."""
    others = [t for t in scene if t is not s]
    out = [f"the {s.name}", f"the {s.colour} shape"]
    if all(t.shape != s.shape for t in others):
        out.append(f"the {s.shape}")
    if _placed_uniquely(scene, s):
        out.append(f"the shape {PHRASES[s.cell]}")
    if others:
        if all(t.size != s.size for t in others):
            out.append(f"the {s.size} shape")
        for word, holds in (("leftmost", s.col < min(t.col for t in others)),
                            ("rightmost", s.col > max(t.col for t in others)),
                            ("topmost", s.row < min(t.row for t in others)),
                            ("bottommost", s.row > max(t.row for t in others))):
            if holds:
                out.append(f"the {word} shape")
    return out


def class_label(scene: tuple[Shape, ...]) -> int | None:
    """CLASSES index of the only shape, or of the only large one; None when that is ambiguous."""
    large = [s for s in scene if s.size == "large"]
    target = scene[0] if len(scene) == 1 else large[0] if len(large) == 1 else None
    return None if target is None else CLASSES.index(target.name)


def make_image(job: tuple[str, int, str, int, int]) -> ImageInfo:
    """Sample, draw and save one image, and word its per-image annotations (a Pool worker)."""
    root, seed, split, index, image_size = job
    rng = random.Random(f"{seed}-{split}-{index}")
    background, scene = sample_scene(rng, image_size)
    path = f"images/{split}/{index:06d}.png"
    draw(background, scene, image_size).save(Path(root) / path, format="PNG", compress_level=1)
    caps = captions(scene, rng)
    return ImageInfo(path, scene, caps, questions(scene, rng, yes=index % 2 == 0), hypotheses(scene, rng),
                     [(rng.choice(expressions(scene, s)), s.bbox) for s in scene],
                     hard_negatives(scene, caps[0]), class_label(scene))


# ---------------------------------------------------------------- pair statements (NLVR2)

def _pair_statements(left: tuple[Shape, ...], right: tuple[Shape, ...]) -> list[list[tuple[str, bool]]]:
    """Candidate statements about an image pair with their truth, grouped by template."""
    (lc, ls, ln), (rc, rs, rn) = (({s.colour for s in x}, {s.shape for s in x}, {s.name for s in x})
                                  for x in (left, right))
    nl, nr = len(left), len(right)
    return [
        [(f"both images contain {_a(c)} shape", c in lc and c in rc) for c in COLOURS],
        [(f"both images contain {_a(k)}", k in ls and k in rs) for k in SHAPES],
        [(f"neither image contains {_a(c)} shape", c not in lc and c not in rc) for c in COLOURS],
        [(f"there is {_a(k)} in exactly one image", (k in ls) != (k in rs)) for k in SHAPES],
        [(f"there is {_a(c)} shape in exactly one image", (c in lc) != (c in rc)) for c in COLOURS],
        [(f"the left image contains {_a(name)}", name in ln) for name in CLASSES],
        [(f"the right image contains {_a(name)}", name in rn) for name in CLASSES],
        [("the left image has more shapes than the right image", nl > nr),
         ("the right image has more shapes than the left image", nr > nl),
         ("both images have the same number of shapes", nl == nr)],
        [(f"the {side} image contains exactly {NUMBERS[n]} {'shape' if n == 1 else 'shapes'}", len(scene) == n)
         for side, scene in (("left", left), ("right", right)) for n in (1, 2, 3)],
        [(f"there are {NUMBERS[n]} shapes in total", nl + nr == n) for n in range(2, 7)],
    ]


def nlvr_records(infos: list[ImageInfo], seed: int, split: str) -> list[dict]:
    """One statement per image, paired with another image of the split; labels alternate "True" / "False"."""
    records = []
    for i, info in enumerate(infos):
        rng = random.Random(f"{seed}-{split}-nlvr-{i}")
        j = (i + rng.randrange(1, len(infos))) % len(infos) if len(infos) > 1 else i
        label = i % 2 == 0
        groups = _pair_statements(info.scene, infos[j].scene)
        rng.shuffle(groups)
        # the count comparisons always hold one true and two false statements, so some group fits
        fitting = next(g for g in ([s for s, truth in group if truth == label] for group in groups) if g)
        records.append({"images": [info.path, infos[j].path], "sentence": rng.choice(fitting),
                        "label": str(label)})  # "True" / "False", as ALBEF's released nlvr_*.json
    return records


# ---------------------------------------------------------------- files

def annotation_files(infos: dict[str, list[ImageInfo]], seed: int) -> dict[str, list]:
    """Every JSON file of the data set, by file name."""
    train, test = infos["train"], infos["test"]
    pairs = [{"image": x.path, "caption": c, "image_id": i} for i, x in enumerate(train) for c in x.captions]
    files = {"pretrain.json": pairs, "retrieval_train.json": pairs}
    for split in ("val", "test"):
        files[f"retrieval_{split}.json"] = [{"image": x.path, "caption": x.captions} for x in infos[split]]
    files["retrieval_test_hard.json"] = [{"image": x.path, "caption": x.captions[0], "negatives": x.negatives}
                                         for x in test if x.negatives]
    for split, items in (("train", train), ("val", infos["val"]), ("test", test)):
        vqa = [(x.path, q, a, kind) for x in items for (q, a), kind in zip(x.questions, QUESTION_TYPES)]
        files[f"vqa_{split}.json"] = [
            {"image": p, "question": q, "answer": annotators(a, kind, random.Random(f"{seed}-{split}-vqa-{k}")),
             "question_id": k, "question_type": kind, "dataset": "vqa"} for k, (p, q, a, kind) in enumerate(vqa)]
        files[f"nlvr_{split}.json"] = nlvr_records(items, seed, split)
        files[f"ve_{split}.json"] = [{"image": x.path.removesuffix(".png"), "sentence": h, "label": lab}  # by id
                                     for x in items for h, lab in x.hypotheses]
        refs = [(x.path, text, box) for x in items for text, box in x.refs]
        files[f"grounding_{split}.json"] = [{"image": p, "text": t, "bbox": b, "ref_id": k}
                                            for k, (p, t, b) in enumerate(refs)]
    files["classification_test.json"] = [{"image": x.path, "label": x.label} for x in test if x.label is not None]
    files["classes.json"] = list(CLASSES)
    files["answer_list.json"] = ANSWERS
    return files


def render_all(root: Path, seed: int, sizes: dict[str, int], image_size: int, progress: bool
               ) -> dict[str, list[ImageInfo]]:
    """Draw every image under `root`, in a process pool when there are enough of them; results in order."""
    jobs = [(str(root), seed, split, i, image_size) for split in SPLITS for i in range(sizes[split])]
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True)
    workers = min(os.cpu_count() or 1, len(jobs) // 1000)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            images = stack.enter_context(multiprocessing.Pool(workers)).imap(make_image, jobs, chunksize=256)
        else:
            images = map(make_image, jobs)
        results = list(tqdm(images, total=len(jobs), desc="synthetic shapes", unit="img", disable=not progress))
    out, start = {}, 0
    for split in SPLITS:
        out[split], start = results[start:start + sizes[split]], start + sizes[split]
    return out


@contextlib.contextmanager
def _gc_paused():
    """The records hold no cycles; collecting while millions of them are made only costs time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=True) + "\n")


def generate(out: str | Path, seed: int = 0, train: int = 20000, val: int = 1000, test: int = 1000,
             image_size: int = 64, progress: bool = True) -> Path:
    """Write the whole data set to `out` (replacing it) via a temporary directory beside it; returns `out`."""
    sizes = {"train": train, "val": val, "test": test}
    if min(sizes.values()) < 1 or image_size < 24:
        raise VlptError(f"every split needs at least one image and image_size >= 24, got {sizes}, {image_size}")
    out = Path(out).absolute()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _gc_paused():
            files = annotation_files(render_all(tmp, seed, sizes, image_size, progress), seed)
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        (tmp / "vocab.txt").write_text("".join(f"{w}\n" for w in (*SPECIAL_TOKENS, *VOCAB)))
        meta = {"generator": "vlpt.data.synthetic", "version": VERSION, "seed": seed, **sizes,
                "image_size": image_size, "counts": {name: len(obj) for name, obj in files.items()}}
        _write_json(tmp / "meta.json", meta, indent=2)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is moved aside first, then deleted."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
