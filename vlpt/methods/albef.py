"""ALBEF (Li et al., NeurIPS 2021): ITC with momentum queues and distillation, ITM with hard negatives, MLM."""
from __future__ import annotations

import torch

from vlpt.engine import distributed
from vlpt.methods.base import Method, register
from vlpt.objectives.contrastive import itc_loss
from vlpt.objectives.masked_language import mlm_loss
from vlpt.objectives.matching import itm_loss, sample_hard_negatives


@register("albef")
class ALBEF(Method):
    def forward(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        losses = self.cfg.method.losses
        image_tokens, image_feat = self.encode_image(batch["image"])
        text_hidden, text_feat = self.encode_text(batch["text_ids"], batch["text_mask"])
        alpha, temp = self.alpha(step), self.temperature()

        with torch.no_grad():  # the teacher's forward, computed once and reused by ITC and MLM
            teacher_tokens, teacher_image = self.encode_image(batch["image"], teacher=True)
            _, teacher_text = self.encode_text(batch["text_ids"], batch["text_mask"], teacher=True)
            ids = batch["image_id"]
            batch_image, batch_text = distributed.gather(teacher_image), distributed.gather(teacher_text)
            batch_ids = distributed.gather(ids)
            image_keys = torch.cat([batch_image, self.queues.image.clone()])
            text_keys = torch.cat([batch_text, self.queues.text.clone()])
            positives = ids[:, None] == torch.cat([batch_ids, self.queues.ids])[None]

        out = {}
        loss, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, image_keys, text_keys, positives, temp,
                                          alpha, teacher_image, teacher_text)
        if "itc" in losses:
            out["itc"] = loss
        if "itm" in losses:
            out["itm"] = self._itm(image_tokens, text_hidden, batch["text_mask"], sim_i2t, sim_t2i,
                                   positives[:, :len(batch_ids)], step)
        if "mlm" in losses:
            logits = self.mlm_logits(image_tokens, batch["mlm_ids"], batch["text_mask"])
            with torch.no_grad():
                teacher_logits = self.mlm_logits(teacher_tokens, batch["mlm_ids"], batch["text_mask"], teacher=True)
            labels = batch["mlm_labels"]
            out["mlm"] = mlm_loss(logits, labels, teacher_logits, alpha,
                                  distributed.mean_count((labels >= 0).sum()))
        self.queues.push(ids, image=teacher_image, text=teacher_text)
        return out

    def _itm(self, image_tokens, text_hidden, text_mask, sim_i2t, sim_t2i, positives, step):
        """One hard negative text per image and one hard negative image per text, from the whole (global) batch."""
        n_local, n_all = sim_i2t.shape[0], positives.shape[1]
        gen = torch.Generator(sim_i2t.device).manual_seed(self.cfg.train.seed * 7919 + step)
        rows = distributed.local_rows(n_local)  # the same draws as one process with the global batch
        noise = torch.rand(2, n_all, n_all, generator=gen, device=sim_i2t.device)[:, rows]
        with torch.no_grad():
            neg_image = sample_hard_negatives(sim_t2i[:, :n_all], positives, noise[0])
            neg_text = sample_hard_negatives(sim_i2t[:, :n_all], positives, noise[1])
        all_tokens = distributed.gather(image_tokens, grad=True)
        all_hidden = distributed.gather(text_hidden, grad=True)
        all_mask = distributed.gather(text_mask)
        images = torch.cat([image_tokens, all_tokens[neg_image], image_tokens])
        texts = torch.cat([text_hidden, text_hidden, all_hidden[neg_text]])
        masks = torch.cat([text_mask, text_mask, all_mask[neg_text]])
        labels = torch.cat([torch.ones(n_local), torch.zeros(2 * n_local)]).long().to(sim_i2t.device)
        return itm_loss(self.itm_logits(images, texts, masks), labels)
