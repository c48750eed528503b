"""WordPiece tokenizer (Hugging Face `tokenizers`): from a local BERT vocab, or trained on the captions; texts cleaned
first by the rule `model.text.preprocess` names."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch
from tokenizers.implementations import BertWordPieceTokenizer

from vlpt.errors import MissingFileError, VlptError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

ALBEF_DELETED = re.compile(r"[,.'!?\"()*#:;~]")
ALBEF_MAX_WORDS = 30  # the max_words of every ALBEF data set (pre-training, retrieval, VE, NLVR2, grounding)


def albef_caption(text: str) -> str:
    """ALBEF's `pre_caption(text, 30)`: lower-cased; the characters ,.'!?"()*#:;~ deleted; '-' and '/' replaced by
    spaces and '<person>' by 'person'; each run of two or more whitespace characters replaced by one space; a
    trailing newline and surrounding spaces stripped; the first 30 space-separated words kept."""
    text = ALBEF_DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:ALBEF_MAX_WORDS])


# `model.text.preprocess` -> the cleaning applied to every text before tokenizing.
PREPROCESS = {"none": lambda text: text, "albef": albef_caption}


class Tokenizer:
    """Uncased BERT WordPiece: texts -> padded ids and attention mask, [CLS] first and [SEP] last; each text first
    cleaned by the rule `preprocess` names (`PREPROCESS`)."""

    def __init__(self, vocab: str | Path, preprocess: str = "none"):
        if preprocess not in PREPROCESS:
            raise VlptError(f"unknown text preprocessing {preprocess!r}; choose from {', '.join(PREPROCESS)}")
        self.preprocess = preprocess
        self.vocab_path = Path(vocab)
        if not self.vocab_path.is_file():
            raise MissingFileError(f"vocab file not found: {self.vocab_path}")
        self._tok = BertWordPieceTokenizer(str(self.vocab_path), lowercase=True)
        ids = {name: self._tok.token_to_id(name) for name in SPECIALS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise VlptError(f"{self.vocab_path} lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[n] for n in SPECIALS)
        self.special_ids = sorted(ids.values())
        self.vocab_size = self._tok.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], out: str | Path, vocab_size: int = 8000,
              preprocess: str = "none") -> "Tokenizer":
        """Train a WordPiece vocab on `texts` (cleaned by `preprocess`) and save it as `out` (a vocab.txt)."""
        tok = BertWordPieceTokenizer(lowercase=True)
        tok.train_from_iterator(map(PREPROCESS[preprocess], texts), vocab_size=vocab_size, min_frequency=1,
                                special_tokens=SPECIALS, show_progress=False)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
        out.write_text("".join(f"{token}\n" for token, _ in vocab))
        return cls(out, preprocess)

    def __call__(self, texts: list[str], max_len: int, fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated to `max_len`, padded to the longest text rounded up to a multiple of 8 but never beyond
        `max_len`, or to `max_len` when `fixed` (equal shapes on every rank, for gathers under DDP): ids, mask (B,L)
        long. (Rounding 25 or 30 up to 32 would add columns of padding every layer computes: issue 19.)"""
        self._tok.enable_truncation(max_len)
        self._tok.enable_padding(pad_id=self.pad_id, length=max_len if fixed else None, pad_to_multiple_of=8)
        enc = self._tok.encode_batch([PREPROCESS[self.preprocess](t) for t in texts])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids[:, :max_len], mask[:, :max_len]  # past max_len there is only the rounding's padding

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def tokenizer_for(cfg, texts: Iterable[str | list[str]], out: str | Path) -> Tokenizer:
    """The pretrained text model's vocab if one is configured; else `data.vocab` (absolute or under `data.root`);
    else a vocab trained on `texts` and saved as `<out>/vocab.txt`; texts cleaned by `model.text.preprocess`."""
    preprocess = cfg.model.text.preprocess
    if cfg.model.text.pretrained:
        return Tokenizer(Path(cfg.model.text.pretrained) / "vocab.txt", preprocess)
    vocab = Path(cfg.data.root) / cfg.data.vocab
    if vocab.is_file():
        return Tokenizer(vocab, preprocess)
    flat = (t for item in texts for t in ([item] if isinstance(item, str) else item))
    return Tokenizer.train(flat, Path(out) / "vocab.txt", preprocess=preprocess)
