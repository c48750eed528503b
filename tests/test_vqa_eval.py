"""The official VQA score: normalisation, leave-one-out accuracy against hand counts, result files."""
from __future__ import annotations

import json

import pytest

from vlpt.errors import VlptError
from vlpt.tasks import vqa_eval


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the dog.", "dog"), ("a red Circle", "red circle"), ("dont", "don't"), ("yes!", "yes"),
    ("3.5", "3.5"), ("black/white", "black white"), ("1,000", "1000"), ("  none\t", "0"), ("its", "its"),
])
def test_answers_are_normalised_as_the_official_evaluation_does(raw, expected):
    assert vqa_eval.normalise(raw) == expected


def test_ten_answers_score_the_mean_over_leave_one_out_subsets():
    answers = ["purple"] * 8 + ["blue"] * 2
    assert vqa_eval.accuracy("purple", answers) == pytest.approx(1.0)
    # leaving out one of the 2 blues leaves 1 match (1/3), one of the 8 purples leaves 2 (2/3): (2/3 + 16/3) / 10
    assert vqa_eval.accuracy("blue", answers) == pytest.approx(0.6)
    assert vqa_eval.accuracy("Blue.", answers) == pytest.approx(0.6)
    assert vqa_eval.accuracy("green", answers) == 0.0
    three = ["a"] * 3 + ["b"] * 7  # 3 matches: 7 subsets keep 3 (1.0), 3 keep 2 (2/3)
    assert vqa_eval.accuracy("a", three) == pytest.approx((7 + 3 * 2 / 3) / 10)


def test_fewer_than_ten_answers_score_exact_match():
    assert vqa_eval.accuracy("two", ["2", "3"]) == 1.0
    assert vqa_eval.accuracy("3", ["2", "3"]) == 0.0


def test_score_breaks_down_by_question_type_and_refuses_a_missing_prediction():
    records = [{"question_id": 0, "answer": ["red"] * 10, "question_type": "colour"},
               {"question_id": 1, "answer": ["2"] * 10, "question_type": "count"},
               {"question_id": 2, "answer": ["blue"] * 10, "question_type": "colour"}]
    m = vqa_eval.score({0: "red", 1: "two", 2: "green"}, records)
    assert m == {"vqa_accuracy": pytest.approx(200 / 3, abs=0.01), "questions": 3, "vqa_accuracy_colour": 50.0,
                 "vqa_accuracy_count": 100.0}
    with pytest.raises(VlptError, match="question_id 1"):
        vqa_eval.score({0: "red", 2: "blue"}, records)


def test_result_file_is_complete_or_not_written(tmp_path):
    path = tmp_path / "out" / "vqa_result.json"
    vqa_eval.write_results({3: "yes", 1: "2"}, [1, 3], path)
    assert json.loads(path.read_text()) == [{"question_id": 1, "answer": "2"}, {"question_id": 3, "answer": "yes"}]
    with pytest.raises(VlptError, match="1 of 3 questions have no answer.*question_id 7"):
        vqa_eval.write_results({3: "yes", 1: "2"}, [1, 3, 7], tmp_path / "bad.json")
    with pytest.raises(VlptError, match="must be a string"):
        vqa_eval.write_results({1: 2}, [1], tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
