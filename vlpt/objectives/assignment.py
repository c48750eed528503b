"""Text assignment (TA), ALBEF Sec. 5's pretraining step before NLVR2: a caption with two images, classified 3-way as
describing the left image, the right one, or neither; the pairs drawn as ALBEF's `models/model_pretrain_nlvr.py`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LEFT, RIGHT, NEITHER = 0, 1, 2
TEMPERATURE = 0.07  # model_pretrain_nlvr.py: image-image similarity over a fixed 0.07, not the learnt temperature


def draw_assignment(sim: torch.Tensor, positives: torch.Tensor, own: torch.Tensor,
                    uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left, right, labels), each (B,): the images each caption is shown with, and the label.

    As model_pretrain_nlvr.py: with probability 2/3 the caption's own image and one other, drawn with probability
    softmax(sim) over the others, the own image on the left (LEFT) or on the right (RIGHT) with probability 1/2 each;
    otherwise (1/3) two distinct other images, drawn so without replacement (NEITHER). "Other" excludes every
    candidate showing the caption's image (`positives`), not only its own column as ALBEF does: a batch holding two
    captions of one image would otherwise label a true caption NEITHER.

    sim (B,C) similarities of each caption's image to the candidates; positives (B,C) bool, True for its own
    column `own` (B,) and any other showing the same image; uniform (B,2+C) noise in (0,1): the branch, the side,
    and a Gumbel-top-2 draw (sampling without replacement) over the candidates. Needs two non-positive candidates
    per row."""
    weights = F.softmax(sim.float(), dim=1).masked_fill(positives, 0)
    gumbel = -torch.log(-torch.log(uniform[:, 2:].clamp(1e-12, 1 - 1e-7)))
    first, second = (weights.log() + gumbel).topk(2, dim=1).indices.unbind(1)
    neither = uniform[:, 0] < 1 / 3
    own_left = uniform[:, 1] >= 0.5
    labels = torch.where(neither, NEITHER, torch.where(own_left, LEFT, RIGHT))
    left = torch.where(neither, first, torch.where(own_left, own, first))
    right = torch.where(neither, second, torch.where(own_left, first, own))
    return left, right, labels


def ta_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the 3-way assignment (LEFT, RIGHT, NEITHER) from the fused [CLS] (model_pretrain_nlvr.py)."""
    return F.cross_entropy(logits.float(), labels)
