"""BERT-style layers written once: self-attention, optional cross-attention, causal mode; loads Hugging Face BERT weights.

The text encoder is BERT's embeddings + the first `text_layers` layers; the fusion encoder is the next
`fusion_layers` layers with cross-attention added (ALBEF Sec. 3.1), so both initialise from one BERT.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlpt.config import TextConfig
from vlpt.errors import MissingFileError, VlptError


def init_bert_(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights for linear and embedding layers, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`; BERT's post-norm residual output. With `capture`
    the probabilities are computed explicitly and kept as `probs` (B,heads,N,M), their gradient as `probs.grad`
    after backward (Grad-CAM); see `capture_attention`."""

    def __init__(self, width: int, heads: int, dropout: float, kv_width: int | None = None):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width or width, width)
        self.value = nn.Linear(kv_width or width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.capture = False
        self.probs: torch.Tensor | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A context's keys and values (B,M,Wk) -> (B,heads,M,W/heads) each, as `forward` computes them: projected
        once, they serve every query that attends to that context (`forward(..., kv=...)`)."""
        return self._split(self.key(context)), self._split(self.value(context))

    def forward(self, x, context=None, mask=None, causal: bool = False, kv=None):
        """x (B,N,W); context (B,M,Wk) or None for self-attention; mask (B,M) with 1 = attend.

        `kv`: keys and values from `project_kv` in place of `context`, with B rows (one per row of x) or G rows, G
        dividing B: then row j serves the B/G consecutive rows of x from j * B/G on, whose queries are folded into one
        sequence of (B/G)*N queries against that one context (no copy of its keys and values); `mask` then has B rows
        (rows of a group alike: the first of each is read) or G. Not with `causal`."""
        b, n = x.shape[:2]
        if kv is None:
            context = x if context is None else context
            k, v = self._split(self.key(context)), self._split(self.value(context))
        else:
            k, v = kv
        q = self._split(self.query(x))
        group = b // k.shape[0]
        if k.shape[0] != b:
            if k.shape[0] * group != b or causal:
                raise ValueError(f"keys and values for {k.shape[0]} contexts cannot serve {b} rows"
                                 + (" causally" if causal else ""))
            if mask is not None and mask.shape[0] != k.shape[0]:
                mask = mask[::group]
            if self.capture:  # the kept probabilities stay (B,heads,N,M): one copy of the context per row
                k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
                mask = None if mask is None else mask.repeat_interleave(group, 0)
                group = 1
            else:
                q = q.view(k.shape[0], group, self.heads, n, -1).transpose(1, 2).flatten(2, 3)  # (G,heads,group*N,d)
        bias = None
        if mask is not None:
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask == 0, float("-inf"))
            bias = bias[:, None, None, :]
        if causal and (bias is not None or self.capture):
            n = x.shape[1]
            tri = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            bias = (q.new_zeros(n, n) if bias is None else bias).masked_fill(~tri, float("-inf"))
            causal = False
        if self.capture:
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
            probs = (scores if bias is None else scores + bias).softmax(-1)
            if probs.requires_grad:
                probs.retain_grad()
            self.probs = probs
            h = F.dropout(probs, self.dropout, self.training) @ v
        else:
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        if group > 1:
            h = h.unflatten(2, (group, n)).transpose(1, 2).flatten(0, 1)  # back to (B,heads,N,d)
        h = h.transpose(1, 2).flatten(2)
        return self.norm(x + self.drop(self.out(h)))


@contextmanager
def capture_attention(*attentions: Attention) -> Iterator[tuple[Attention, ...]]:
    """Within the block the given layers keep their attention probabilities (`.probs`, `.probs.grad` after a
    backward), cleared on entry; after it they run fast again and the last captured probabilities stay readable."""
    before = [a.capture for a in attentions]
    for a in attentions:
        a.capture, a.probs = True, None
    try:
        yield attentions
    finally:
        for a, capture in zip(attentions, before):
            a.capture = capture


class Layer(nn.Module):
    """One BERT layer; with `cross` it attends to a context (the other modality) between self-attention and MLP,
    when one is given: called without a context the same layer is a text-only layer (a single stream, SIMLA)."""

    def __init__(self, cfg: TextConfig, cross: bool = False, context_width: int | None = None):
        super().__init__()
        self.attention = Attention(cfg.width, cfg.heads, cfg.dropout)
        self.cross = Attention(cfg.width, cfg.heads, cfg.dropout, context_width) if cross else None
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, context=None, context_mask=None, causal=False, context_kv=None,
                first: int | None = None, self_attended: bool = False):
        """`context_kv`: the cross-attention's keys and values of the context (`cross.project_kv`) in its place.
        `first`: only the first `first` positions are computed and returned (B,first,W): their queries attend to
        every token's keys and values, as in the whole layer, and the rest of the layer runs on them alone.
        `self_attended`: x is already `self.attention`'s output (it depends on x alone: computed once per text, it
        serves every pair of that text)."""
        if self_attended:
            x = x if first is None else x[:, :first]
        elif first is not None:
            if causal:
                raise ValueError("first= serves a non-causal layer only")
            x = self.attention(x[:, :first], context=x, mask=mask)
        else:
            x = self.attention(x, mask=mask, causal=causal)
        if self.cross is not None and (context is not None or context_kv is not None):
            x = self.cross(x, context, context_mask, kv=context_kv)
        return self.feed_forward(x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP and its post-norm residual, after the attentions."""
        return self.norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, cfg: TextConfig, max_positions: int = 512):
        super().__init__()
        self.word = nn.Embedding(vocab_size, cfg.width, padding_idx=0)
        self.position = nn.Embedding(max_positions, cfg.width)
        self.token_type = nn.Embedding(2, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids (B,L) at positions start..start+L-1 (`start` > 0: the next tokens of a decoded sequence)."""
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(pos)[None] + self.token_type.weight[0]
        return self.drop(self.norm(x))


def run_layer(layer: nn.Module, checkpointed: bool, *args, **kwargs) -> torch.Tensor:
    """layer(*args), through `torch.utils.checkpoint` when `checkpointed` and gradients are being recorded, unless
    an attention of the layer captures (its recomputation in backward would replace the kept probabilities)."""
    if (checkpointed and torch.is_grad_enabled()
            and not any(isinstance(m, Attention) and m.capture for m in layer.modules())):
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


class TextEncoder(nn.Module):
    """BERT embeddings + self-attention layers: text ids (B,L) -> hidden states (B,L,W)."""

    def __init__(self, vocab_size: int, cfg: TextConfig, layers: int | None = None):
        super().__init__()
        self.embeddings = Embeddings(vocab_size, cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.text_layers if layers is None else layers))
        init_bert_(self)

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward instead of keeping them (`train.grad_checkpointing`)."""
        self.grad_checkpointing = enable

    def forward(self, ids, mask, causal: bool = False):
        x = self.embeddings(ids)
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, mask, causal=causal)
        return x


class FusionEncoder(nn.Module):
    """Layers with cross-attention: queries (B,N,W) attend to themselves and to a context (B,M,Wc)."""

    def __init__(self, cfg: TextConfig, context_width: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg, cross=True, context_width=context_width)
                                    for _ in range(cfg.fusion_layers))
        init_bert_(self)

    grad_checkpointing = False
    set_grad_checkpointing = TextEncoder.set_grad_checkpointing

    def context_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys and values of a context (B,M,Wc): (B,heads,M,W/heads) each. The
        context does not change from layer to layer, so these serve any number of queries attending to it."""
        return [layer.cross.project_kv(context) for layer in self.layers]

    def self_attend(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The first layer's self-attention of x (B,L,W): it reads no context, so one computation per text serves
        all its pairs (`forward(self_attended=True)`)."""
        return self.layers[0].attention(x, mask=mask)

    def forward(self, x, mask, context=None, context_mask=None, causal: bool = False, context_kv=None,
                first: int | None = None, self_attended: bool = False):
        """`context_kv`: `context_kv(context)` in place of `context` (its rows selected or grouped, see
        `Attention.forward`). `first`: only the first `first` positions of the output are wanted, (B,first,W): the
        last layer computes just those (`Layer.forward`), the same values as the whole pass's; [CLS] pooling reads
        one. Unless an attention of the last layer captures its probabilities (Grad-CAM keeps every token's).
        `self_attended`: x is `self_attend(x, mask)` already (not with a capturing first self-attention)."""
        if self_attended and self.layers and self.layers[0].attention.capture:
            raise ValueError("self_attended states bypass the first self-attention, which is capturing")
        for i, layer in enumerate(self.layers):
            kv = None if context_kv is None else context_kv[i]
            cut = None
            if first is not None and i == len(self.layers) - 1 and not any(
                    isinstance(m, Attention) and m.capture for m in layer.modules()):
                cut = first
            x = run_layer(layer, self.grad_checkpointing, x, mask, context, context_mask, causal=causal, context_kv=kv,
                          first=cut, self_attended=self_attended and i == 0)
        return x if first is None else x[:, :first]


class MLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, then a decoder tied to the word embeddings."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        init_bert_(self)

    def forward(self, x, word_embeddings: torch.Tensor):
        """x (..., W) -> logits (..., V); `word_embeddings` (V, W) is the tied decoder weight."""
        return self.norm(F.gelu(self.dense(x))) @ word_embeddings.t() + self.bias


# Hugging Face BERT parameter names -> ours, per layer.
_LAYER_KEYS = {
    "attention.self.query": "attention.query", "attention.self.key": "attention.key",
    "attention.self.value": "attention.value", "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "attention.norm", "intermediate.dense": "fc1",
    "output.dense": "fc2", "output.LayerNorm": "norm",
}
_EMBED_KEYS = {"word_embeddings": "word", "position_embeddings": "position",
               "token_type_embeddings": "token_type", "LayerNorm": "norm"}
# BertForMaskedLM's prediction head -> ours; its decoder weight is the word embeddings (tied).
_HEAD_KEYS = {"transform.dense.weight": "dense.weight", "transform.dense.bias": "dense.bias",
              "transform.LayerNorm.weight": "norm.weight", "transform.LayerNorm.bias": "norm.bias", "bias": "bias"}


def read_bert_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MissingFileError(f"no Hugging Face config.json in {folder}")
    return json.loads(path.read_text())


def load_bert_weights(folder: str | Path, text: TextEncoder, fusion: FusionEncoder | None = None,
                      mlm_head: MLMHead | None = None) -> list[str]:
    """Copy BERT weights into the text encoder (layers 0..n-1) and the fusion encoder's self-attention and MLP
    (layers n..n+m-1); cross-attention stays freshly initialised (ALBEF). `mlm_head` takes BertForMaskedLM's head
    when the weights hold one (a warning otherwise). Returns the loaded parameter names."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"no *.safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    ours: dict[str, torch.Tensor] = {}
    for hf, name in _EMBED_KEYS.items():
        for p in ("weight", "bias"):
            if f"embeddings.{hf}.{p}" in state:
                ours[f"text.embeddings.{name}.{p}"] = state[f"embeddings.{hf}.{p}"]
    n_text = len(text.layers)
    stacks = [("text", i, i) for i in range(n_text)]
    if fusion is not None:
        stacks += [("fusion", i, n_text + i) for i in range(len(fusion.layers))]
    for prefix, ours_i, hf_i in stacks:
        for hf, name in _LAYER_KEYS.items():
            for p in ("weight", "bias"):
                key = f"encoder.layer.{hf_i}.{hf}.{p}"
                if key not in state:
                    raise VlptError(f"{folder}: BERT weights lack {key} (the model has fewer layers than configured)")
                ours[f"{prefix}.layers.{ours_i}.{name}.{p}"] = state[key]
    if mlm_head is not None:
        ours.update(_mlm_head_weights(folder, state))
    modules = {"text": text, "fusion": fusion, "mlm_head": mlm_head}
    for key, value in ours.items():
        prefix, rest = key.split(".", 1)
        param = modules[prefix].get_parameter(rest)
        if param.shape != value.shape:
            raise VlptError(f"{folder}: {key} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)
    return sorted(ours)


def _mlm_head_weights(folder: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertForMaskedLM's prediction head in `state` under our names; none (and a warning) when the weights lack it."""
    head = {k.removeprefix("cls.predictions."): v for k, v in state.items() if k.startswith("cls.predictions.")}
    if "decoder.bias" in head:  # older checkpoints name the output bias after the decoder
        head.setdefault("bias", head["decoder.bias"])
    if not head:
        warnings.warn(f"{folder}: no cls.predictions.* in the BERT weights; the MLM head stays freshly initialised")
        return {}
    missing = sorted(set(_HEAD_KEYS) - set(head))
    if missing:
        raise VlptError(f"{folder}: BERT weights lack cls.predictions.{missing[0]} of the MLM head")
    if "decoder.weight" in head and not torch.equal(head["decoder.weight"], state["embeddings.word_embeddings.weight"]):
        raise VlptError(f"{folder}: the MLM decoder is not tied to the word embeddings, as our MLM head is")
    act = read_bert_config(folder).get("hidden_act", "gelu")
    if act != "gelu":
        raise VlptError(f"{folder}: config.json has hidden_act={act!r}; the MLM head applies exact GELU ('gelu')")
    return {f"mlm_head.{ours}": head[hf] for hf, ours in _HEAD_KEYS.items()}
