"""The text decoder of VQA and captioning, written with the BERT layers of `text.py`: embeddings, causal layers with
cross-attention to a context (a fused question, or image tokens), and an LM head tied to its word embeddings
(ALBEF `model_vqa.py`'s BertLMHeadModel; BLIP's captioner). Decoding is batched greedy or beam search with a stop
token and length limits, each step computing only the newest position against cached keys and values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.config import TextConfig
from vlpt.models.text import Embeddings, Layer, MLMHead, TextEncoder, init_bert_, run_layer

IGNORE = -100


class Decoder(nn.Module):
    """ids (B,L) attending causally to themselves and fully to `context` (B,M,Wc) -> next-token logits (B,L,V)."""

    def __init__(self, vocab_size: int, cfg: TextConfig, context_width: int, layers: int):
        super().__init__()
        self.embeddings = Embeddings(vocab_size, cfg)
        self.layers = nn.ModuleList(Layer(cfg, cross=True, context_width=context_width) for _ in range(layers))
        self.head = MLMHead(cfg.width, vocab_size)
        init_bert_(self)

    @classmethod
    def from_method(cls, method, context_width: int, layers: int = 0) -> "Decoder":
        """A decoder at the method's text width cross-attending to contexts `context_width` wide (image tokens: the
        ViT's; a fused question: the text's), `layers` deep (0: `model.text.fusion_layers`, ALBEF's 6), initialised
        by `init_from` from the method's text encoder, its last fusion layers (a single stream's whole stack is its
        fusion encoder: SIMLA's decoder takes the top 6 of its 12, as ALBEF's takes BERT's layers 6-11) and MLM head."""
        backbone = method.backbone
        layers = layers or method.cfg.model.text.fusion_layers
        decoder = cls(backbone.text.embeddings.word.num_embeddings, method.cfg.model.text, context_width, layers)
        decoder.init_from(backbone.text, backbone.fusion.layers[-layers:], method.mlm_head)
        return decoder

    def init_from(self, text: TextEncoder, fusion_layers: nn.ModuleList, mlm_head: MLMHead) -> int:
        """ALBEF's VQA initialisation: the text encoder's embeddings, the fusion layers in order (decoder layer i
        from fusion layer i; ALBEF copies BERT layers 6-11 into a 6-layer decoder) and the MLM head; a cross-attention
        key or value of another context width than the fusion's stays fresh. Returns how many layers were copied
        (layers beyond the fusion's stay fresh)."""
        self.embeddings.load_state_dict(text.embeddings.state_dict())
        self.head.load_state_dict(mlm_head.state_dict())
        for mine, theirs in zip(self.layers, fusion_layers):
            shapes = {k: v.shape for k, v in mine.state_dict().items()}
            mine.load_state_dict({k: v for k, v in theirs.state_dict().items() if v.shape == shapes[k]}, strict=False)
        return min(len(self.layers), len(fusion_layers))

    grad_checkpointing = False
    set_grad_checkpointing = TextEncoder.set_grad_checkpointing

    def forward(self, ids, mask, context, context_mask=None) -> torch.Tensor:
        x = self.embeddings(ids)
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, mask, context, context_mask, causal=True)
        return self.head(x, self.embeddings.word.weight)

    def token_losses(self, ids, mask, context, context_mask=None, *, label_smoothing: float = 0.0,
                     ignore_first: int = 1, teacher_logits: torch.Tensor | None = None, alpha: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) summed loss of each sequence's tokens after its first `ignore_first` (the start token, a prompt),
        teacher-forced, padding never counting; the logits (B,L-1,V) predicting tokens 1..L-1). With
        `teacher_logits`, ALBEF's distilled form per token: (1 - alpha) cross entropy + alpha cross entropy with the
        teacher's softmax (`model_vqa.py`, Eq. 7's momentum distillation)."""
        logits = self(ids, mask, context, context_mask)[:, :-1]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        targets[:, :ignore_first - 1] = IGNORE
        logp = logits.float().log_softmax(-1)
        loss = F.nll_loss(logp.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean(-1).flatten() * (targets.flatten() != IGNORE)
        if teacher_logits is not None:
            soft = -(teacher_logits.float().softmax(-1) * logp).sum(-1).flatten() * (targets.flatten() != IGNORE)
            loss = (1 - alpha) * loss + alpha * soft
        return loss.view_as(targets).sum(1), logits

    def extend(self, ids, cache, cross_kv, context_mask=None):
        """`forward` one step at a time: ids (R,T) are the next T tokens of R sequences (T > 1 only at the start)
        whose earlier positions' self-attention keys and values are `cache` (per layer (k, v), each
        (R,heads,S,W/heads); None at the start); `cross_kv` per layer the context's cross-attention keys and values
        (`cross.project_kv`) for R rows or for R/beams contexts serving consecutive rows. Returns the T positions'
        logits (R,T,V) and the cache extended by them; every earlier position is attended (no padding inside a
        decoded sequence), so the logits equal `forward` on the whole sequence."""
        start = 0 if cache is None else cache[0][0].shape[2]
        x = self.embeddings(ids, start)
        extended = []
        for i, (layer, kv) in enumerate(zip(self.layers, cross_kv)):
            k, v = layer.attention.project_kv(x)
            if cache is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            extended.append((k, v))
            x = layer.attention(x, kv=(k, v), causal=cache is None and ids.shape[1] > 1)
            x = layer.feed_forward(layer.cross(x, mask=context_mask, kv=kv))
        return self.head(x, self.embeddings.word.weight), extended

    @torch.no_grad()
    def generate(self, context, context_mask, prefix: torch.Tensor, stop_id: int, max_new: int, beams: int = 1,
                 min_new: int = 0, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched beam search (greedy with `beams` 1) after `prefix` (B,P): each sequence ends at `stop_id` or
        after `max_new` tokens, and no earlier than `min_new`. Returns the best continuation per row (B,T, padded
        with `pad_id`, the stop token kept) and its summed log-probability (B,). The context's cross-attention keys and
        values are projected once (not per beam); each step runs the newest token only (`extend`)."""
        b, p = prefix.shape
        cross_kv = [layer.cross.project_kv(context) for layer in self.layers]  # once per context, for all its beams
        seqs = prefix.repeat_interleave(beams, 0)
        scores = torch.zeros(b, beams, device=prefix.device)
        scores[:, 1:] = float("-inf")  # every beam starts as the same prefix: keep one until they diverge
        done = torch.zeros(b * beams, dtype=torch.bool, device=prefix.device)
        logits, cache = self.extend(seqs, None, cross_kv, context_mask)
        for t in range(max_new):
            if t:  # the beams kept last step, their caches, then one position more
                cache = [(k[origin], v[origin]) for k, v in cache]
                logits, cache = self.extend(token[:, None], cache, cross_kv, context_mask)
            logp = logits[:, -1].float().log_softmax(-1)  # (B*beams,V)
            if t < min_new:
                logp[:, stop_id] = float("-inf")
            # a finished beam extends only with padding, at no cost
            logp[done] = float("-inf")
            logp[done, pad_id] = 0.0
            vocab = logp.shape[1]
            total = (scores.view(-1, 1) + logp).view(b, beams * vocab)
            scores, flat = total.topk(beams, dim=1)
            origin = (flat // vocab) + torch.arange(b, device=flat.device)[:, None] * beams
            token = (flat % vocab).view(-1)
            origin = origin.view(-1)
            seqs = torch.cat([seqs[origin], token[:, None]], dim=1)
            done = done[origin] | (token == stop_id)
            # a row is settled once a finished beam scores above every unfinished one: log-probabilities only fall
            finished = scores.masked_fill(~done.view(b, beams), float("-inf")).max(1).values
            open_best = scores.masked_fill(done.view(b, beams), float("-inf")).max(1).values
            if (finished >= open_best).all():
                break
        best = scores.argmax(1) + torch.arange(b, device=scores.device) * beams
        out = seqs[best, p:]
        used = (out != pad_id).any(0).nonzero()
        width = int(used[-1]) + 1 if len(used) else 0  # columns of nothing but padding at the end dropped
        return out[:, :width], scores.max(1).values
