"""VQA (ALBEF Sec. 5, `model_vqa.py`): the question through the text and fusion encoders, a causal decoder that
cross-attends to the fused question and writes the answer: one made from the fusion layers, or the method's
pretrained one (SemMIM's prefix LM: the question is the prefix it was pretrained to continue from the fused states
of, the answer the suffix; SemMIM Sec. 4.3 also appends OFA's object labels and OCR tokens, which we do not have).
Trained with each distinct answer's LM loss weighted by its share of annotators, distilled per token from a momentum
copy where the method has a teacher. Answers by `rank` over the answer list (first-token top-k, the k answers
teacher-forced and rescored) or `generate` (open vocabulary, SemMIM); scored as the official evaluation does
(`vqa_eval.py`), per question type too.
"""
from __future__ import annotations

import functools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from vlpt.config import NON_NEGATIVE, POSITIVE, fail, opt
from vlpt.data.annotations import AnnotationError, load_annotations
from vlpt.data.loader import eval_loader, train_loader
from vlpt.engine import distributed
from vlpt.errors import MissingFileError
from vlpt.models.decoder import Decoder
from vlpt.tasks import vqa_eval
from vlpt.tasks.base import SplitsConfig, Task, TaskModel, register

INFERENCE = ("rank", "generate")


@dataclass
class VQAConfig(SplitsConfig):
    files: str = opt("vqa_{split}.json", "annotation files under data.root, '{split}' standing for train, val and "
                     "test: records {image, question, answer (a list: one per annotator), question_id}")
    answer_list: str = opt("answer_list.json", "the candidate answers of `rank` inference, under data.root "
                           "(ALBEF's answer_list.json)")
    inference: str = opt("rank", "rank (over the answer list, ALBEF) or generate (open vocabulary, SemMIM)")
    k: int = opt(128, "rank: answers kept by first-token probability, then rescored whole (ALBEF: 128)", POSITIVE)
    decoder_layers: int = opt(0, "layers of the answer decoder, initialised from the fusion layers in order "
                              "(ALBEF: 6); 0: as many as the fusion encoder has (a method's pretrained decoder keeps "
                              "its own)", NON_NEGATIVE)
    max_answer_len: int = opt(10, "generate: most answer tokens written, the stop token included", POSITIVE)

    def validate(self, prefix: str, root) -> None:
        if self.inference not in INFERENCE:
            fail(prefix + "inference", "one of " + ", ".join(INFERENCE), self.inference)


def read_vqa(path: Path, train: bool) -> list[dict]:
    """VQA records as pairs {image, caption: question, question_id[, question_type], answers, weights}: the distinct
    answers with their shares of the annotators (ALBEF's vqa_dataset.py); a record without a question id or with
    no answer (to train on) names the file and record."""
    out = []
    for i, r in enumerate(load_annotations(path, "vqa")):
        if "question_id" not in r:
            raise AnnotationError(f"{path}: record {i} has no 'question_id'")
        answers = r.get("answer", [])
        answers = [answers] if isinstance(answers, str) else answers
        if train and not answers:
            raise AnnotationError(f"{path}: record {i} has no 'answer' to train on")
        counts = Counter(answers)
        rec = {"image": r["image"], "caption": r["question"], "question_id": r["question_id"], "answer": answers,
               "answers": list(counts), "weights": [c / len(answers) for c in counts.values()]}
        if "question_type" in r:
            rec["question_type"] = r["question_type"]
        out.append(rec)
    return out


class VQAModel(TaskModel):
    """The method's encoders and an answer decoder over the fused question (ALBEF `model_vqa.py`)."""

    losses = ["vqa"]

    def __init__(self, method, layers: int):
        super().__init__(method)
        self.add_decoder(method.cfg.model.text.width, layers)  # over the fused question
        distill = method.teacher is not None
        self.replace_teacher({"backbone": method.backbone, "decoder": self.decoder} if distill else None)

    def question(self, batch: dict, teacher: bool = False) -> torch.Tensor:
        """The fused question states (B,L,W)."""
        backbone = self.teacher["backbone"] if teacher else self.method.backbone
        mask = batch["text_mask"]
        tokens = backbone.encode_image(batch["image"])
        return backbone.fuse(tokens, backbone.encode_text(batch["text_ids"], mask), mask)

    def forward(self, batch: dict, step: int) -> dict:
        owner, ids, mask = batch["answer_owner"], batch["answer_ids"], batch["answer_mask"]
        context_mask = batch["text_mask"][owner]
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                context = self.question(batch, teacher=True)[owner]
                teacher_logits = self.teacher["decoder"](ids, mask, context, context_mask)[:, :-1]
        losses, _ = self.decoder.token_losses(ids, mask, self.question(batch)[owner], context_mask,
                                              teacher_logits=teacher_logits, alpha=self.method.alpha(step))
        return {"vqa": (batch["answer_weight"] * losses).sum() / batch["image"].shape[0]}


@torch.no_grad()
def rank_answers(decoder: Decoder, context, context_mask, answer_ids, answer_mask, k: int, start_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's `rank_answer`: each question's k answers most probable by their first token, rescored by their whole
    log-likelihood (first-token log-probability + the rest teacher-forced), batched over questions. Returns the
    indices (B,k) into the answer list, best first, and their probabilities renormalised over the k (B,k)."""
    b, k = context.shape[0], min(k, answer_ids.shape[0])
    start = torch.full((b, 1), start_id, dtype=torch.long, device=context.device)
    first = decoder(start, torch.ones_like(start), context, context_mask)[:, 0].float().softmax(-1)
    top_p, top = first.index_select(1, answer_ids[:, 1]).topk(k, dim=1)          # (B,k)
    ids, mask = answer_ids[top.flatten()], answer_mask[top.flatten()]
    width = int(mask.sum(1).max())
    rest, _ = decoder.token_losses(ids[:, :width], mask[:, :width], context.repeat_interleave(k, 0),
                                   context_mask.repeat_interleave(k, 0), ignore_first=2)
    scores = (top_p.log() - rest.view(b, k)).softmax(1)
    order = scores.argsort(1, descending=True)
    return top.gather(1, order), scores.gather(1, order)


@register("vqa", VQAConfig)
class VQA(Task):
    """visual question answering: image + question -> answer (ranked over the answer list, or generated)"""

    trains, select = True, "vqa_accuracy"
    options = ("eval.batch_size", "task.inference", "task.k")

    def build(self, method) -> VQAModel:
        return VQAModel(method, self.cfg.task.decoder_layers)

    def batches(self, start: int):
        records = read_vqa(self.cfg.task.split_file(self.data, "train"), train=True)
        return train_loader(self.cfg, records, self.tokenizer, (), distributed.rank(), distributed.world_size(),
                            start)

    def answer_list(self) -> list[str]:
        path = self.data / self.cfg.task.answer_list
        if not path.is_file():
            raise MissingFileError(f"answer list not found: {path} (task.answer_list; `rank` inference needs it, "
                                   f"`task.inference=generate` does not)")
        return json.loads(path.read_text())

    @torch.no_grad()
    def predict(self, model: VQAModel, records: list[dict]) -> dict[int, str]:
        """{question_id: answer} for every record, batched."""
        t, tok = self.cfg.task, self.tokenizer
        if t.inference == "rank":
            answers = self.answer_list()
            answer_ids, answer_mask = (x.to(self.device) for x in tok(answers, self.cfg.model.text.max_len))
        predictions, row = {}, 0
        for batch in eval_loader(self.cfg, [{k: v for k, v in r.items() if k != "answers"} for r in records], tok):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            context, mask = model.question(batch), batch["text_mask"]
            if t.inference == "rank":
                best, _ = rank_answers(model.decoder, context, mask, answer_ids, answer_mask, t.k, tok.cls_id)
                texts = [answers[i] for i in best[:, 0].tolist()]
            else:
                start = torch.full((len(context), 1), tok.cls_id, dtype=torch.long, device=self.device)
                ids, _ = model.decoder.generate(context, mask, start, tok.sep_id, t.max_answer_len, pad_id=tok.pad_id)
                texts = [tok.decode([i for i in seq if i not in tok.special_ids]) for seq in ids.tolist()]
            for text in texts:
                predictions[records[row]["question_id"]] = text
                row += 1
        return predictions

    def evaluate(self, model, split: str) -> dict:
        records = read_vqa(self.cfg.task.split_file(self.data, split), train=False)
        self.predictions = self.predict(model, records)
        self.question_ids = [r["question_id"] for r in records]
        if not all(r["answer"] for r in records):  # a test-dev style split: answers only the server has
            return {"questions": len(records), "inference": self.cfg.task.inference}
        return {**vqa_eval.score(self.predictions, records), "inference": self.cfg.task.inference,
                "prior_baseline": self.prior_baseline(records)}

    @functools.cached_property
    def top_answers(self) -> tuple[dict[str, str], str]:
        """The most frequent training answer per question type ("" for records without one) and overall; read once."""
        counts: dict[str, Counter] = defaultdict(Counter)
        for r in read_vqa(self.cfg.task.split_file(self.data, "train"), train=True):
            counts[r.get("question_type", "")].update(r["answer"])
        overall = sum(counts.values(), Counter()).most_common(1)[0][0]
        return {kind: c.most_common(1)[0][0] for kind, c in counts.items()}, overall

    def prior_baseline(self, records: list[dict]) -> float:
        """The trivial baseline: VQA accuracy of answering every question with the most frequent training answer of
        its question type (of all questions for a type training lacks)."""
        by_type, overall = self.top_answers
        guess = {r["question_id"]: by_type.get(r.get("question_type", ""), overall) for r in records}
        return vqa_eval.score(guess, records)["vqa_accuracy"]

    def save(self, metrics: dict, out: Path) -> None:
        """The metrics, and beside them `vqa_result.json` in the evaluation server's format."""
        super().save(metrics, out)
        vqa_eval.write_results(self.predictions, self.question_ids, out.parent / "vqa_result.json")

    label = "VQA"

    @staticmethod
    def headline(m: dict):
        return "VQA accuracy", m["vqa_accuracy"], "type's top answer", m["prior_baseline"]

    def table(self, m: dict) -> str:
        if "vqa_accuracy" not in m:
            return f"{m['questions']} questions answered ({m['inference']}); no answers to score them against"
        kinds = ", ".join(f"{k[len('vqa_accuracy_'):]} {v:.2f}" for k, v in m.items() if k.startswith("vqa_accuracy_"))
        return (f"VQA accuracy {m['vqa_accuracy']:.2f} % on {m['questions']} questions ({m['inference']}; each "
                f"type's most frequent answer: {m['prior_baseline']:.2f} %)" + (f"; per type: {kinds}" if kinds else ""))
