"""Codebooks: a multimodal prototype codebook solved by IPOT optimal transport (CODIS Sec. 3.1, Alg. 2, Eq. 1-3) and
a visual vector quantiser with gumbel-softmax or straight-through gradients (CB-ViLA Sec. III-A, Eq. 1, 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.engine.distributed import all_sum, local, local_row_slice


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
        modality's plan, as Algorithm 1 writes it. Returns the loss and codebook health (usage and perplexity of
        the predictions P of the global batch: assignment counts and mass are summed over ranks before either is
        computed, so N ranks report what one process with the global batch would).
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
        logits = torch.cat([predict_image, predict_text]).detach()
        hits = all_sum(assignment_counts(logits.argmax(-1), len(codewords)))
        mass = all_sum(F.softmax(logits.float(), dim=-1).sum(0))
        return {"codebook": loss, **codebook_health(hits, mass)}


def assignment_counts(indices: torch.Tensor, size: int) -> torch.Tensor:
    """How many of `indices` name each of `size` codewords: (size,) float. Unlike `torch.bincount`, no host sync on
    CUDA (bincount reads the maximum index back to size its output)."""
    flat = indices.flatten()
    return torch.zeros(size, device=flat.device).index_add_(0, flat, torch.ones(flat.shape, device=flat.device))


@torch.no_grad()
def codebook_health(hits: torch.Tensor, mass: torch.Tensor) -> dict[str, torch.Tensor]:
    """`hits` (K,): features whose nearest codeword each one is this step; `mass` (K,): assignment mass per codeword.
    Usage is the number of codewords hit; perplexity is exp(entropy) of the normalised mass (K when uniform)."""
    mean = mass.float() / mass.float().sum().clamp_min(1e-12)
    perplexity = torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())
    return {"codebook_usage": (hits > 0).sum().float(), "codebook_perplexity": perplexity}


@dataclass
class Quantized:
    """A quantiser's output for encoder outputs v (..., d)."""
    tokens: torch.Tensor         # z_q(v) (..., d): the nearest codewords, with the estimator's gradient
    frozen_tokens: torch.Tensor | None  # the same values with no gradient to the codebook (sg[C]); None if not asked
    indices: torch.Tensor        # (...,) long: the nearest codeword's index, Eq. 1
    codebook: torch.Tensor       # ||sg[v] - c||^2, mean over elements: moves the codewords only (Eq. 3, 2nd term)
    commitment: torch.Tensor     # ||v - sg[c]||^2: moves the encoder only (Eq. 3, 3rd term, without beta)


class VectorQuantizer(nn.Module):
    """K learnable codewords of dimension d (CB-ViLA Sec. III-A). Forward values are the nearest codewords (Eq. 1);
    gradients come from a gumbel-softmax over negative mean squared distances (CB-ViLA; the one-hot of the nearest
    codeword plus soft - sg[soft]: a straight-through gumbel estimator that keeps the nearest-neighbour forward) or
    from VQ-VAE's straight-through copy v + sg[c - v], which gives the codebook no gradient from the decoder.

    `last_used` records the step each codeword was last chosen; `restart_dead` re-initialises codewords unused for
    `dead_after` steps from encoder outputs. It starts far in the past, so the first restart replaces every
    codeword step 0 did not choose: a data-dependent initialisation.
    """

    def __init__(self, size: int, dim: int, estimator: str = "gumbel", temperature: float = 1.0):
        super().__init__()
        if estimator not in ("gumbel", "straight_through"):
            raise ValueError(f"estimator must be gumbel or straight_through; got {estimator!r}")
        self.codewords = nn.Parameter(torch.randn(size, dim))
        self.estimator, self.temperature = estimator, temperature
        self.register_buffer("last_used", torch.full((size,), -(2 ** 40), dtype=torch.long))

    def distances(self, v: torch.Tensor, codewords: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared distance (n, K) between rows of v (n, d) and every codeword, in float32."""
        v, c = v.float(), (self.codewords if codewords is None else codewords).float()
        return ((v * v).sum(-1, keepdim=True) - 2 * v @ c.t() + (c * c).sum(-1)) / v.shape[-1]

    def forward(self, v: torch.Tensor, frozen: bool = True) -> Quantized:
        """Quantise v (..., d); `frozen`: also the tokens with sg[C] (a second distance product under gumbel)."""
        shape = v.shape[:-1]
        flat = v.reshape(-1, v.shape[-1])
        dist = self.distances(flat)
        indices = dist.argmin(-1)
        # A one-hot product rather than codewords[indices]: the backward of indexing accumulates with atomic adds
        # (CPU and CUDA), whose order varies from run to run, and the argmin turns such last bits into other codewords.
        hard = F.one_hot(indices, len(self.codewords)).float()
        nearest = (hard @ self.codewords.float()).to(v.dtype)
        if self.estimator == "gumbel":
            gumbel = -torch.empty_like(dist).exponential_().log()

            def lookup(dist: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
                soft = F.softmax((gumbel - dist) / self.temperature, dim=-1)
                return ((hard + soft - soft.detach()) @ codewords.float()).to(v.dtype)

            tokens = lookup(dist, self.codewords)
            detached = self.codewords.detach()
            frozen_tokens = lookup(self.distances(flat, detached), detached) if frozen else None
        else:
            tokens = frozen_tokens = flat + (nearest - flat).detach()
        codebook = F.mse_loss(nearest.float(), flat.detach().float())
        commitment = F.mse_loss(flat.float(), nearest.detach().float())
        frozen_tokens = None if frozen_tokens is None else frozen_tokens.view(*shape, -1)
        return Quantized(tokens.view(*shape, -1), frozen_tokens, indices.view(shape), codebook, commitment)

    @torch.no_grad()
    def restart_dead(self, counts: torch.Tensor, candidates: torch.Tensor, step: int, dead_after: int) -> torch.Tensor:
        """Record this step's use (`counts` (K,) assignments, identical on every rank) and replace every codeword
        unused for `dead_after` steps by the matching row of `candidates` (K, d). Returns how many were replaced."""
        self.last_used.copy_(torch.where(counts > 0, step, self.last_used))
        dead = step - self.last_used >= dead_after
        weights, rows = local(self.codewords), local_row_slice(self.codewords)  # this rank's rows under FSDP
        weights.copy_(torch.where(dead[rows, None], candidates[rows].to(weights.dtype), weights))
        self.last_used.copy_(torch.where(dead, step, self.last_used))
        return dead.sum()
