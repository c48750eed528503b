"""`vlpt convert albef`: a checkpoint as ALBEF released them (its pretrain, retrieval, VQA, ... models' state dict,
under "model" beside its config, or alone) into a vlpt checkpoint of method albef.

The model config comes from the tensor shapes (widths, depths, MLP sizes, patch and image size from `patch_embed` and
`pos_embed`, the text / fusion split from the first layer with cross-attention), the attention heads from the caller
(no shape holds them). ALBEF's preprocessing is recorded: `model.text.preprocess=albef` (its `pre_caption`); its
bicubic resize and CLIP statistics are vlpt's own (`data.transforms`).

Names: `visual_encoder.*` is timm's ViT layout already; `text_encoder.*` (`text_encoder.bert.*` in pre-training) is
Hugging Face BERT, mapped with `models.text`'s tables; `text_encoder.cls.predictions.*` is the MLM head; the `_m`
modules are the momentum teacher; the queues are (D, Q) there, (Q, D) here. What vlpt's ALBEF has no place for (VQA's
`text_decoder`, a decoder not tied to the word embeddings) is reported, not written; what the file lacks is
initialised as a new model's (a teacher copy: as its student).
"""
from __future__ import annotations

import dataclasses
import re
from importlib.resources import files
from pathlib import Path

import torch

from vlpt import methods
from vlpt.config import ConfigError, load_config
from vlpt.data.tokenizer import Tokenizer
from vlpt.engine import checkpoint
from vlpt.errors import MissingFileError, VlptError
from vlpt.models.text import _EMBED_KEYS, _HEAD_KEYS, _LAYER_KEYS

PRESET = "configs/pretrain/albef_base.yaml"  # ALBEF's settings; the shapes of the file replace its model sizes
TEACHER = "teacher.copies."
# BERT's cross-attention under our names: `crossattention.*` is laid out as `attention.*`.
_CROSS_KEYS = {f"cross{hf}": f"cross.{ours.split('.', 1)[1]}" for hf, ours in _LAYER_KEYS.items()
               if hf.startswith("attention.")}
# vlpt buffer -> ALBEF buffer; the queues are transposed, the pointer and the ids flattened.
_QUEUES = {"queues.image": "image_queue", "queues.text": "text_queue", "queues.ptr": "queue_ptr",
           "queues.ids": "idx_queue"}


class ConvertError(VlptError, ValueError):
    """A file that is not a checkpoint in ALBEF's layout, or one vlpt's ALBEF cannot hold (one line)."""


@dataclasses.dataclass
class Conversion:
    """What `convert_albef` wrote and what it could not carry over."""
    folder: Path              # the vlpt checkpoint folder
    model: str                # the model config read from the shapes, in words
    unplaced: list[str]       # ALBEF keys with no place in vlpt's ALBEF: not converted
    initialised: list[str]    # vlpt weights the file lacks: a new model's
    from_student: list[str]   # teacher weights the file lacks: copies of the student's

    def summary(self) -> str:
        """Lines for the command line: the folder, then each list of keys, layer numbers folded."""
        lines = [f"wrote {self.folder}: {self.model}"]
        for what, keys in (("ALBEF weights with no place in vlpt's ALBEF, not converted", self.unplaced),
                           ("weights not in the file, initialised as a new model's", self.initialised),
                           ("teacher weights not in the file, copied from the student", self.from_student)):
            if keys:
                lines.append(f"{len(keys)} {what}:")
                lines += [f"  {name}" + (f" (x{n})" if n > 1 else "") for name, n in fold(keys).items()]
        return "\n".join(lines)


def fold(keys: list[str]) -> dict[str, int]:
    """Keys with their layer numbers written as N -> how many keys each stands for."""
    out: dict[str, int] = {}
    for key in keys:
        name = re.sub(r"\.\d+\.", ".N.", key)
        out[name] = out.get(name, 0) + 1
    return out


def read_albef(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, ALBEF's config or {}) of a file torch.save wrote in ALBEF's layout; read with
    `weights_only=True`, so the file runs no code."""
    if not path.is_file():
        raise MissingFileError(f"ALBEF checkpoint not found: {path}")
    unreadable = ConvertError(f"{path} is not a checkpoint torch.save wrote (truncated, or another kind of file)")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip archive, or a truncated one
        raise unreadable from None
    if unsafe:
        raise ConvertError(f"{path} is refused: besides tensors and plain values it names {', '.join(unsafe[:4])}, "
                           f"which loading it would call; ALBEF's checkpoints hold no such thing")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a corrupt member
        raise unreadable from None
    state = saved.get("model", saved) if isinstance(saved, dict) else saved
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path} is not in ALBEF's layout: expected a state dict, or a dict holding one under "
                           f"'model'; got {type(saved).__name__}" + (f" with keys {', '.join(map(str, saved))[:80]}"
                                                                     if isinstance(saved, dict) else ""))
    for part in ("visual_encoder", "text_encoder"):
        if not any(k.startswith(part + ".") for k in state):
            raise ConvertError(f"{path} is not an ALBEF checkpoint: it has no {part}.* weights (its keys begin "
                               f"{', '.join(list(state)[:3])})")
    config = saved.get("config") if isinstance(saved, dict) else None
    return state, config if isinstance(config, dict) else {}


def bert_root(state: dict, module: str) -> str:
    """The prefix of the BERT weights of `module`: `text_encoder.bert.` (pre-training) or `text_encoder.`."""
    return f"{module}.bert." if f"{module}.bert.embeddings.word_embeddings.weight" in state else f"{module}."


def _need(state: dict, key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise ConvertError(f"{path} lacks {key}: not an ALBEF checkpoint, or a damaged one")
    return state[key]


def text_layers(state: dict, path: Path) -> tuple[int, int]:
    """(BERT layers, index of the first with cross-attention: ALBEF's `fusion_layer`) of the student."""
    bert = bert_root(state, "text_encoder")
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(bert) + r"encoder\.layer\.(\d+)\.", k))}
    cross = sorted({int(m.group(1)) for k in state
                    if (m := re.match(re.escape(bert) + r"encoder\.layer\.(\d+)\.crossattention\.", k))})
    layers = max(found, default=-1) + 1
    if not cross:
        raise ConvertError(f"{path}: {bert}encoder has no layer with cross-attention: not ALBEF's fusion BERT")
    if found != set(range(layers)) or cross != list(range(cross[0], layers)) or cross[0] == 0:
        raise ConvertError(f"{path}: {bert}encoder's layers {sorted(found)}, cross-attention in {cross}: vlpt's "
                           f"ALBEF holds text-only layers followed by cross-attention layers")
    return layers, cross[0]


def infer_overrides(state: dict, config: dict, path: Path, vision_heads: int, text_heads: int) -> list[str]:
    """Config overrides of the ALBEF preset that give vlpt's ALBEF the shapes of `state`."""
    pos = _need(state, "visual_encoder.pos_embed", path)
    patch = _need(state, "visual_encoder.patch_embed.proj.weight", path)
    grid = round((pos.shape[1] - 1) ** 0.5)
    if pos.ndim != 3 or grid * grid != pos.shape[1] - 1 or patch.ndim != 4 or patch.shape[2] != patch.shape[3]:
        raise ConvertError(f"{path}: visual_encoder.pos_embed {tuple(pos.shape)} and patch_embed.proj.weight "
                           f"{tuple(patch.shape)} are not those of a ViT on a square grid of square patches")
    width = pos.shape[2]
    fc1 = _need(state, "visual_encoder.blocks.0.mlp.fc1.weight", path)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k)))
    bert = bert_root(state, "text_encoder")
    words = _need(state, f"{bert}embeddings.word_embeddings.weight", path)
    layers, fusion = text_layers(state, path)
    mlp = _need(state, f"{bert}encoder.layer.0.intermediate.dense.weight", path)
    overrides = [f"model.vision.image_size={grid * patch.shape[2]}", f"model.vision.patch_size={patch.shape[2]}",
                 f"model.vision.width={width}", f"model.vision.depth={depth}", f"model.vision.heads={vision_heads}",
                 f"model.vision.mlp_ratio={fc1.shape[0] / width}", "model.vision.drop_path=0.0",
                 f"model.text.width={words.shape[1]}", f"model.text.heads={text_heads}",
                 f"model.text.intermediate={mlp.shape[0]}", f"model.text.text_layers={fusion}",
                 f"model.text.fusion_layers={layers - fusion}", "model.text.pool=cls",
                 "model.text.preprocess=albef", "model.text.max_len=30"]  # Retrieval.py's max_length
    if "vision_proj.weight" in state:
        overrides.append(f"method.embed_dim={state['vision_proj.weight'].shape[0]}")
    if "image_queue" in state:
        overrides.append(f"method.queue_size={state['image_queue'].shape[1]}")
    overrides += [f"method.{key}={config[key]}" for key in ("momentum", "alpha") if key in config]
    if "k_test" in config:
        overrides.append(f"eval.k={config['k_test']}")
    return overrides


def albef_names(state: dict, layers: int, fusion: int) -> dict[str, str]:
    """vlpt name -> ALBEF name of each weight that has a place in both, the teacher's from the `_m` modules."""
    names: dict[str, str] = {}
    for ours, suffix in (("", ""), (TEACHER, "_m")):
        for key in state:
            if key.startswith(f"visual_encoder{suffix}."):
                names[f"{ours}backbone.vision.{key.split('.', 1)[1]}"] = key
        bert = bert_root(state, f"text_encoder{suffix}")
        for hf, name in _EMBED_KEYS.items():
            for p in ("weight", "bias"):
                names[f"{ours}backbone.text.embeddings.{name}.{p}"] = f"{bert}embeddings.{hf}.{p}"
        for i in range(layers):
            stack, j, table = ("text", i, _LAYER_KEYS) if i < fusion else \
                ("fusion", i - fusion, {**_LAYER_KEYS, **_CROSS_KEYS})
            for hf, name in table.items():
                for p in ("weight", "bias"):
                    names[f"{ours}backbone.{stack}.layers.{j}.{name}.{p}"] = f"{bert}encoder.layer.{i}.{hf}.{p}"
        for hf, name in _HEAD_KEYS.items():
            names[f"{ours}mlm_head.{name}"] = f"text_encoder{suffix}.cls.predictions.{hf}"
        for proj in ("vision_proj", "text_proj"):
            for p in ("weight", "bias"):
                names[f"{ours}{proj}.{p}"] = f"{proj}{suffix}.{p}"
    names.update({"itm_head.weight": "itm_head.weight", "itm_head.bias": "itm_head.bias", "temp": "temp", **_QUEUES})
    return names


def derived(state: dict) -> set[str]:
    """ALBEF keys vlpt computes instead of storing: BERT's position ids (0, 1, 2, ...) and the MLM decoder when it is
    tied to the word embeddings (its bias is the head's)."""
    out = set()
    for suffix in ("", "_m"):
        bert, head = bert_root(state, f"text_encoder{suffix}"), f"text_encoder{suffix}.cls.predictions."
        ids = state.get(f"{bert}embeddings.position_ids")
        if ids is not None and torch.equal(ids.flatten(), torch.arange(ids.numel())):
            out.add(f"{bert}embeddings.position_ids")
        for key, same in ((f"{head}decoder.weight", f"{bert}embeddings.word_embeddings.weight"),
                          (f"{head}decoder.bias", f"{head}bias")):
            if key in state and same in state and torch.equal(state[key], state[same]):
                out.add(key)
    return out


def as_ours(name: str, value: torch.Tensor, like: torch.Tensor, albef: str, path: Path) -> torch.Tensor:
    """ALBEF's tensor in the layout and dtype of ours; an error naming both shapes when it does not fit."""
    if name in ("queues.image", "queues.text"):
        value = value.t()
    elif name in ("queues.ptr", "queues.ids", "temp") and value.numel() == like.numel():
        value = value.reshape(like.shape)
    if value.shape != like.shape:
        raise ConvertError(f"{path}: {albef} {tuple(value.shape)} does not fit {name} {tuple(like.shape)} of the model "
                           f"the other shapes give")
    return value.to(like.dtype).contiguous()


def convert_albef(path: str | Path, out: str | Path, vocab: str | Path = "", vision_heads: int = 12,
                  text_heads: int = 12) -> Conversion:
    """Write ALBEF checkpoint `path` as a vlpt checkpoint under the run folder `out` (its step 0, `latest`), with
    `vocab` (BERT's uncased WordPiece vocab.txt; default: vocab.txt beside `path`)."""
    path = Path(path)
    state, config = read_albef(path)
    try:
        cfg = load_config(files("vlpt") / PRESET, infer_overrides(state, config, path, vision_heads, text_heads))
    except ConfigError as err:
        raise ConvertError(f"{path}: {err} (attention heads: --vision-heads, --text-heads)") from None
    vocab = Path(vocab) if vocab else path.parent / checkpoint.VOCAB
    if not vocab.is_file():
        raise MissingFileError(f"no vocabulary {vocab}: give BERT's uncased vocab.txt (bert-base-uncased's for "
                               f"ALBEF's checkpoints) with --vocab")
    words = state[f"{bert_root(state, 'text_encoder')}embeddings.word_embeddings.weight"].shape[0]
    size = Tokenizer(vocab).vocab_size
    if size != words:
        raise ConvertError(f"{vocab} has {size} tokens, the checkpoint's word embeddings {words}: not its vocabulary")

    with torch.random.fork_rng(devices=[]):  # the weights the file lacks: the same on every conversion
        torch.manual_seed(0)
        template = methods.build(cfg, words).state_dict()
    t = cfg.model.text
    names = {name: albef for name, albef in albef_names(state, t.text_layers + t.fusion_layers, t.text_layers).items()
             if albef in state and name in template}
    weights = {name: as_ours(name, state[albef], template[name], albef, path) for name, albef in names.items()}
    from_student = sorted(n for n in template.keys() - weights.keys()
                          if n.startswith(TEACHER) and n[len(TEACHER):] in weights)
    weights.update({n: weights[n[len(TEACHER):]].clone() for n in from_student})  # safetensors: no shared storage
    initialised = sorted(template.keys() - weights.keys())
    weights.update({n: template[n] for n in initialised})
    unplaced = sorted(state.keys() - set(names.values()) - derived(state))
    meta = {"method": cfg.method.name, "heads": [],
            "converted": {"from": "albef", "file": str(path), "unplaced": unplaced}}
    folder = checkpoint.save(out, 0, weights, cfg.to_dict(), vocab, meta=meta)
    v = cfg.model.vision
    model = (f"ViT {v.width} x {v.depth} blocks, {v.heads} heads, {v.image_size} px in {v.patch_size} px patches; "
             f"BERT {t.width}, {t.heads} heads, {t.text_layers} text + {t.fusion_layers} fusion layers; "
             f"text preprocessing {t.preprocess}")
    return Conversion(folder, model, unplaced, initialised, from_student)
