"""ALBEF's fusion encoder for two images (Sec. 5, NLVR2): every fusion layer replicated into two consecutive blocks,
the first attending to the left image and the second to the right, both copies of the pretrained layer, sharing the
cross-attention's key and value projections.

As ALBEF's code does it: `models/model_nlvr.py` (`share_cross_attention`: blocks 6 + 2i and 7 + 2i share
`crossattention.self.key` and `.value`), `models/xbert.py` (`BertLayer` given a list of two image states attends to
entry `(layer_num - fusion_layer) % 2`) and `Pretrain_nlvr.py` (the pretrained layer k loaded into blocks 2k and
2k + 1, the whole layer: self-attention, cross-attention and MLP). The blocks are `text.Layer`s.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from vlpt.models.text import FusionEncoder, Layer, run_layer


class LayerPair(nn.Module):
    """One fusion layer as two blocks: `first` (left image), then `second` (right image); `second.cross.key` and
    `.value` are `first`'s modules (the same Parameters). One FSDP unit, as the shared projections require."""

    def __init__(self, layer: Layer):
        super().__init__()
        self.first, self.second = copy.deepcopy(layer), copy.deepcopy(layer)
        self.second.cross.key, self.second.cross.value = self.first.cross.key, self.first.cross.value

    def forward(self, x, mask, left, right, left_mask=None, right_mask=None):
        return self.second(self.first(x, mask, left, left_mask), mask, right, right_mask)


class PairedFusion(nn.Module):
    """Text states (B,L,W) attend to themselves and to two images' tokens (B,M,Wc) each, through `LayerPair`s copied
    from `fusion` as it is when this is built."""

    def __init__(self, fusion: FusionEncoder):
        super().__init__()
        self.layers = nn.ModuleList(LayerPair(layer) for layer in fusion.layers)

    grad_checkpointing = False
    set_grad_checkpointing = FusionEncoder.set_grad_checkpointing

    def forward(self, x: torch.Tensor, mask: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, mask, left, right)
        return x


def pair_from_fusion(state: dict, pair: str, fusion: str) -> None:
    """Give a state dict without paired-fusion weights under prefix `pair` those of the fusion encoder under prefix
    `fusion`, layer k to both blocks of pair k (ALBEF Pretrain_nlvr.py's key mapping), in place; no-op when it has
    some already."""
    if any(key.startswith(pair) for key in state):
        return
    for key in [k for k in state if k.startswith(fusion + "layers.")]:
        index, rest = key[len(fusion + "layers."):].split(".", 1)
        for block in ("first", "second"):
            state[f"{pair}layers.{index}.{block}.{rest}"] = state[key]
