"""The computations ALBEF's family shares, as functions of a `Method` and one step's `Features`: ITC (Eq. 1-3, 6;
CODIS Eq. 4-5), ITM with hard negatives (Eq. 4), MLM with distillation (Eq. 5, 7) and NLVR2's text assignment
(Sec. 5)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlpt.data.masking import masked_positions
from vlpt.engine import distributed, rng
from vlpt.objectives import assignment
from vlpt.objectives.contrastive import alignment_loss
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.matching import itm_loss, sample_hard_negatives


@dataclass(kw_only=True)
class Features:
    """One step's features: student tokens and normalised projections, the teacher's (None without a teacher), and
    the ITC keys (the global batch's teacher features then the queue, or the global batch's student features) with
    the positives of each local row and the global batch size."""
    image_tokens: torch.Tensor
    image_feat: torch.Tensor
    text_hidden: torch.Tensor
    text_feat: torch.Tensor
    text_mask: torch.Tensor
    image_id: torch.Tensor
    image_keys: torch.Tensor
    text_keys: torch.Tensor
    positives: torch.Tensor
    batch_size: int
    mlm_hidden: torch.Tensor | None = None
    teacher_tokens: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_image: torch.Tensor | None = None
    teacher_text: torch.Tensor | None = None
    teacher_mlm_hidden: torch.Tensor | None = None


def encode_captions(method, batch: dict, teacher: bool = False):
    """The caption's text states (B,L,Wt) and ITC feature (B,D), and the states of its masked copy (`mlm_ids`, where
    the batch has one; else None) from the same text-encoder call over both: one embedding backward instead of two
    (each zeroes and fills a dense vocabulary-sized gradient: issue 19)."""
    ids, mask = batch["text_ids"], batch["text_mask"]
    backbone = method.part("backbone", teacher)
    masked = None
    if "mlm_ids" in batch:
        hidden, masked = backbone.encode_text(torch.cat([ids, batch["mlm_ids"]]), torch.cat([mask, mask])).chunk(2)
    else:
        hidden = backbone.encode_text(ids, mask)
    return hidden, method.text_feature(hidden, mask, teacher), masked


def features(method, batch: dict) -> Features:
    """Student (and teacher) unimodal features, computed once per step and reused by every loss. With a teacher
    the ITC keys are its features of the global batch followed by the queue; without one, the students' features of
    the global batch, with gradient (in-batch ITC)."""
    image_tokens, image_feat = method.encode_image(batch["image"])
    text_hidden, text_feat, mlm_hidden = encode_captions(method, batch)
    ids = batch["image_id"]
    batch_ids = distributed.gather(ids)
    student = dict(image_tokens=image_tokens, image_feat=image_feat, text_hidden=text_hidden, text_feat=text_feat,
                   text_mask=batch["text_mask"], image_id=ids, batch_size=len(batch_ids), mlm_hidden=mlm_hidden)
    if method.teacher is None:
        return Features(**student, positives=ids[:, None] == batch_ids[None],
                        image_keys=distributed.gather(image_feat, grad=True),
                        text_keys=distributed.gather(text_feat, grad=True))
    with torch.no_grad():
        teacher_tokens, teacher_image = method.encode_image(batch["image"], teacher=True)
        teacher_hidden, teacher_text, teacher_mlm_hidden = encode_captions(method, batch, teacher=True)
        queues = method.queues
        positives = ids[:, None] == torch.cat([batch_ids, queues.ids])[None]
        image_keys = torch.cat([distributed.gather(teacher_image), queues.image])  # cat copies: the queue
        text_keys = torch.cat([distributed.gather(teacher_text), queues.text])     # push is safe
    return Features(**student, positives=positives, image_keys=image_keys, text_keys=text_keys,
                    teacher_tokens=teacher_tokens, teacher_hidden=teacher_hidden, teacher_image=teacher_image,
                    teacher_text=teacher_text,
                    teacher_mlm_hidden=teacher_mlm_hidden)


def push_queues(method, f: Features) -> None:
    method.queues.push(f.image_id, image=f.teacher_image, text=f.teacher_text)


def itc(method, f: Features, step: int, intra: bool = False) -> torch.Tensor:
    """ALBEF Eq. 1-3, 6 against the keys; with `intra`, CODIS Eq. 4-5 adds i2i and t2t."""
    return alignment_loss(f.image_feat, f.text_feat, f.image_keys, f.text_keys, f.positives, method.temperature(),
                          method.alpha(step), f.teacher_image, f.teacher_text, intra=intra)


def itm(method, f: Features, step: int, batch: dict | None = None) -> torch.Tensor:
    """ALBEF Eq. 4: one hard negative text per image and one hard negative image per text, drawn from the whole
    (global) batch by contrastive similarity (uniformly at random over the first `method.itm_easy_steps`: issue 13);
    the noise comes from a (seed, step) generator sliced by rank, so N ranks draw what one process with the global
    batch would. Rows: [positives | negative images | negative texts], labels 1 for the first third; with swapped
    captions in the batch (`method.itm_swap_words`), a fourth block of each image with its caption's swap, counted
    where the caption had one."""
    n_local, n_all = f.image_feat.shape[0], f.batch_size
    temp = method.temperature()
    with torch.no_grad():
        sim_i2t = f.image_feat @ f.text_keys[:n_all].t() / temp
        sim_t2i = f.text_feat @ f.image_keys[:n_all].t() / temp
        gen = rng.generator("itm_negatives", method.cfg.train.seed, step, device=sim_i2t.device)
        noise = torch.rand(2, n_all, n_all, generator=gen, device=sim_i2t.device)[:, distributed.local_rows(n_local)]
        positives = f.positives[:, :n_all]
        easy = method.cfg.method.itm_easy_steps
        share = 1.0 if step < easy else 0.0  # random negatives first, then hard ones
        neg_image = sample_hard_negatives(sim_t2i, positives, noise[0], share)
        neg_text = sample_hard_negatives(sim_i2t, positives, noise[1], share)
    all_tokens = distributed.gather(f.image_tokens, grad=True)
    all_hidden = distributed.gather(f.text_hidden, grad=True)
    all_mask = distributed.gather(f.text_mask)
    # index_select: its backward adds in a fixed order on the CPU; indexing's accumulates with atomics
    images = [f.image_tokens, all_tokens.index_select(0, neg_image), f.image_tokens]
    texts = [f.text_hidden, f.text_hidden, all_hidden.index_select(0, neg_text)]
    masks = [f.text_mask, f.text_mask, all_mask[neg_text]]
    weights = None
    if batch is not None and "swap_ids" in batch:
        swap_hidden, _ = method.encode_text(batch["swap_ids"], batch["swap_mask"])
        images.append(f.image_tokens)
        texts.append(swap_hidden)
        masks.append(batch["swap_mask"])
        weights = torch.cat([torch.ones(3 * n_local, device=swap_hidden.device), batch["swap_valid"].float()])
    labels = (torch.arange(len(images) * n_local, device=f.image_tokens.device) < n_local).long()  # no host copy
    return itm_loss(method.itm_logits(torch.cat(images), torch.cat(texts), torch.cat(masks)), labels, weights)


def mlm_positions(batch: dict) -> torch.Tensor:
    """Indices of the masked tokens in the flattened (B*L) text: `mlm_positions` from the data pipeline, found on the
    host, else from `mlm_labels` here (which waits for the device: the count sets the shape)."""
    if "mlm_positions" in batch:
        return batch["mlm_positions"]
    return masked_positions(batch["mlm_labels"])


def mlm(method, f: Features, batch: dict, step: int) -> torch.Tensor:
    """ALBEF Eq. 5 + 7: masked tokens predicted from text and image, distilled from the teacher when there is one."""
    positions, labels = mlm_positions(batch), batch["mlm_labels"]
    logits = method.mlm_logits(f.image_tokens, batch["mlm_ids"], f.text_mask, positions=positions,
                               hidden=f.mlm_hidden)
    teacher_logits = None
    if method.teacher is not None:
        with torch.no_grad():
            teacher_logits = method.mlm_logits(f.teacher_tokens, batch["mlm_ids"], f.text_mask, teacher=True,
                                               positions=positions, hidden=f.teacher_mlm_hidden)
    return mlm_loss(logits, labels.flatten()[positions], teacher_logits, method.alpha(step),
                    distributed.mean_count((labels >= 0).sum()))


def text_assignment(method, f: Features, step: int) -> torch.Tensor:
    """ALBEF Sec. 5 (TA before NLVR2): each caption with two images of the global batch, its own and one other or two
    others (`assignment.draw_assignment`, from image-image similarity over the fixed 0.07; noise from a (seed, step)
    generator sliced by rank), through the paired fusion; 3-way cross entropy on the pooled output."""
    n_local, n_all = f.image_feat.shape[0], f.batch_size
    rows = distributed.local_rows(n_local)
    with torch.no_grad():
        sim = f.image_feat @ distributed.gather(f.image_feat).t() / assignment.TEMPERATURE
        gen = rng.generator("text_assignment", method.cfg.train.seed, step, device=sim.device)
        noise = torch.rand(n_all, n_all + 2, generator=gen, device=sim.device)[rows]
        own = torch.arange(rows.start, rows.stop, device=sim.device)
        left, right, labels = assignment.draw_assignment(sim, f.positives[:, :n_all], own, noise)
    tokens = distributed.gather(f.image_tokens, grad=True)
    fused = method.pair_fusion(f.text_hidden, f.text_mask, tokens.index_select(0, left), tokens.index_select(0, right))
    return assignment.ta_loss(method.ta_head(method.backbone.pool(fused, f.text_mask)), labels)


def standard_losses(method, f: Features, batch: dict, step: int, losses, intra: bool = False) -> dict[str, torch.Tensor]:
    """ITC, ITM, MLM and text assignment (`nlvr_ta`), those of them listed in `losses`."""
    out = {}
    if "itc" in losses:
        out["itc"] = itc(method, f, step, intra)
    if "itm" in losses:
        out["itm"] = itm(method, f, step, batch)
    if "mlm" in losses:
        out["mlm"] = mlm(method, f, batch, step)
    if "nlvr_ta" in losses:
        out["nlvr_ta"] = text_assignment(method, f, step)
    return out
