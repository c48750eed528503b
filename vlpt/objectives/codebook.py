"""Codebooks: a multimodal prototype codebook solved by IPOT optimal transport (CODIS Sec. 3.1, Alg. 2, Eq. 1-3)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def ipot(cost: torch.Tensor, epsilon: float = 0.05, outer: int = 10, inner: int = 1) -> torch.Tensor:
    """IPOT (CODIS Alg. 2; Xie et al. 2019) in the log domain: a plan T (..., N, K) for cost D (..., N, K)
    with rows summing to 1/N and columns to 1/K.

    Each outer step solves a Sinkhorn problem with kernel exp(-D / epsilon) * T (a proximal point step), so the
    plan approaches the exact OT plan as `outer` grows, even for small epsilon; logs keep exp(-D / eps) finite.
    """
    cost = cost.float()
    n, k = cost.shape[-2:]
    log_mu, log_nu = -math.log(n), -math.log(k)
    log_kernel = -cost / epsilon
    log_plan = torch.zeros_like(cost)                       # T(1) = 1 1^T
    log_sigma = torch.full(cost.shape[:-2] + (k,), log_nu, device=cost.device)
    for _ in range(outer):
        log_q = log_kernel + log_plan                       # Q = A (.) T
        for _ in range(inner):
            log_delta = log_mu - torch.logsumexp(log_q + log_sigma[..., None, :], dim=-1)
            log_sigma = log_nu - torch.logsumexp(log_q + log_delta[..., :, None], dim=-2)
        log_plan = log_delta[..., :, None] + log_q + log_sigma[..., None, :]
    return log_plan.exp()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """H(targets, softmax(logits)) averaged over rows; targets are detached (CODIS Alg. 1, `H`)."""
    return -(targets.detach() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class PrototypeCodebook(nn.Module):
    """K learnable prototypes of dimension d shared by image and text features (CODIS Sec. 3.1)."""

    def __init__(self, size: int, dim: int, epsilon: float = 0.1, outer: int = 20, inner: int = 1):
        super().__init__()
        self.codewords = nn.Parameter(F.normalize(torch.randn(size, dim), dim=-1))
        self.epsilon, self.outer, self.inner = epsilon, outer, inner

    def loss(self, image: torch.Tensor, text: torch.Tensor, plan_image: torch.Tensor, plan_text: torch.Tensor,
             temperature: torch.Tensor, swapped: bool = True, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        """CODIS Eq. 1-3: L_ot(Z_v^m, C) + L_ot(Z_t^m, C) + H(P_i2p, T) + H(P_t2p, T').

        `image`, `text` (n,d): normalised student features, whose predictions P = softmax(Z C / temperature) are
        trained; `plan_image`, `plan_text` (N,d): normalised features the transport plans are solved from (the
        teacher's in CODIS; all ranks' under DDP, `rows` being this rank's). With `swapped` (the paper's text and
        Fig. 3) the image prediction is supervised by the text plan and vice versa; otherwise each by its own
        modality's plan, as Algorithm 1 writes it. Returns the loss and codebook health.
        """
        codewords = F.normalize(self.codewords, dim=-1)
        cost_image = 1 - plan_image.detach().float() @ codewords.t()      # D_ij = 1 - cos(z_i^m, c_j)
        cost_text = 1 - plan_text.detach().float() @ codewords.t()
        plans = ipot(torch.stack([cost_image.detach(), cost_text.detach()]), self.epsilon, self.outer, self.inner)
        ot = (plans[0] * cost_image).sum() + (plans[1] * cost_text).sum()  # <T, D>: moves the codewords
        targets = (plans / plans.sum(-1, keepdim=True))[:, rows]           # row-normalised plans
        target_image, target_text = (targets[1], targets[0]) if swapped else (targets[0], targets[1])
        predict_image = image.float() @ codewords.t() / temperature
        predict_text = text.float() @ codewords.t() / temperature
        loss = ot + soft_cross_entropy(predict_image, target_image) + soft_cross_entropy(predict_text, target_text)
        return {"codebook": loss, **codebook_health(torch.cat([predict_image, predict_text]).detach())}


@torch.no_grad()
def codebook_health(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codewords that are some feature's nearest (argmax) this step, and the perplexity of the mean assignment."""
    usage = torch.zeros(logits.shape[-1], device=logits.device).index_fill_(0, logits.argmax(-1), 1).sum()
    mean = F.softmax(logits.float(), dim=-1).mean(0)
    perplexity = torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())
    return {"codebook_usage": usage, "codebook_perplexity": perplexity}
