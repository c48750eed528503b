"""VQA scoring as the official evaluation does it (Antol et al. 2015, VQA v2's `vqaEval.py`): answers normalised
(punctuation, number words to digits, articles dropped, contractions restored), then per question
min(1, matches / 3) over the humans' answers, averaged over the ten leave-one-out subsets of ten; exact match where a
question has fewer than ten answers. And the result file the evaluation server takes, checked before writing.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from vlpt.errors import VlptError

# The official punctuation rules: these characters vanish when next to a space (or in a text with a digit-comma-digit
# group), else become a space; a period not between digits vanishes.
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophes are given them back ("dont" -> "don't").
CONTRACTIONS = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
    he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've
    might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she'd she'll she's should've
    shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
    something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
    they're they've 'twas wasn't we'd've we'd we'll we're we've weren't what'll what're what's what've when's where'd
    where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
    y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
RESTORE = {c.replace("'", ""): c for c in CONTRACTIONS}


def strip_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD.sub("", out)


def normalise_words(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split() if NUMBERS.get(w, w) not in ARTICLES]
    return " ".join(RESTORE.get(w, w) for w in words)


def normalise(answer: str) -> str:
    """One answer as the official evaluation compares it."""
    return normalise_words(strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction in [0, 1]: with ten human answers, the mean over each one left out of
    min(1, (matches among the other nine) / 3); with fewer, 1 when the prediction equals the first answer."""
    pred = normalise(prediction)
    gts = [normalise(a) for a in answers]
    if len(gts) < 10:
        return float(bool(gts) and pred == gts[0])
    return sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)


def score(predictions: dict[int, str], records: list[dict]) -> dict:
    """Overall VQA accuracy in percent, per question type (`question_type`, where records have it), and how many
    questions were scored. Every record's `question_id` must have a prediction."""
    missing = [r["question_id"] for r in records if r["question_id"] not in predictions]
    if missing:
        raise VlptError(f"{len(missing)} questions have no prediction (first: question_id {missing[0]})")
    total, by_type = [], defaultdict(list)
    for r in records:
        answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        acc = accuracy(predictions[r["question_id"]], answers)
        total.append(acc)
        if "question_type" in r:
            by_type[r["question_type"]].append(acc)
    out = {"vqa_accuracy": round(100 * sum(total) / max(len(total), 1), 2), "questions": len(total)}
    out.update({f"vqa_accuracy_{kind}": round(100 * sum(v) / len(v), 2) for kind, v in sorted(by_type.items())})
    return out


def write_results(predictions: dict[int, str], question_ids: list[int], path: str | Path) -> Path:
    """The evaluation server's result file, [{"question_id": int, "answer": str}, ...] in `question_ids`' order;
    refused (nothing written) when a question has no answer or an answer is not a string."""
    missing = [q for q in question_ids if q not in predictions]
    if missing:
        raise VlptError(f"result file incomplete: {len(missing)} of {len(question_ids)} questions have no answer "
                        f"(first: question_id {missing[0]}); nothing written to {path}")
    bad = [q for q in question_ids if not isinstance(predictions[q], str)]
    if bad:
        raise VlptError(f"question_id {bad[0]}: the answer must be a string, got {predictions[bad[0]]!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"question_id": int(q), "answer": predictions[q]} for q in question_ids]))
    return path
