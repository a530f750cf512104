"""The published evaluation sets' scorers against hand-computed figures."""

import json

import pytest

from tessera.model import eval_sets


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("a dog.", "dog"), ("The Red one!", "red 1"), ("isnt", "isn't"), ("yes, it is", "yes it is"),
    ("1,000", "1000"), ("3.5", "3.5"), ("  An   apple ", "apple"), ("left-hand", "left hand"),
])
def test_vqa_normalisation_follows_the_official_evaluation(raw, normal):
    assert eval_sets.vqa_normalize(raw) == normal


def test_vqa_accuracy_is_min_one_matches_over_three_over_leave_one_out_subsets():
    ten = ["red"] * 2 + ["blue"] * 8
    # each of the 10 subsets leaves one answer out: leaving a "red" out gives 1 match (1/3), a "blue" 2 (2/3)
    assert eval_sets.vqa_accuracy("Red.", ten) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert eval_sets.vqa_accuracy("blue", ten) == 1.0
    assert eval_sets.vqa_accuracy("green", ten) == 0.0
    assert eval_sets.vqa_accuracy("Two", ["2"]) == 1.0, "one reference: an exact match after normalisation"
    assert eval_sets.answers_of({"answers": [{"answer": "a", "answer_confidence": "yes"}, {"answer": "b"}]}) == ["a", "b"]


def test_pope_reads_free_answers_and_scores_yes_as_positive():
    preds = ["Yes, there is.", "no", "yes", "No.", "yes"]
    labels = ["yes", "yes", "no", "no", "yes"]
    s = eval_sets.pope_scores(preds, labels)
    assert (s["accuracy"], s["precision"], s["recall"], s["yes_ratio"]) == (0.6, 2 / 3, 2 / 3, 0.6)
    assert s["f1"] == pytest.approx(2 / 3)


def test_caption_scores_rank_a_right_caption_above_a_wrong_one():
    refs = [["a red circle at the top left", "a red circle in the top left corner"], ["two blue squares", "a pair of blue squares"],
            ["a green triangle at the bottom", "one green triangle near the bottom"]]
    right = eval_sets.caption_scores(["A red circle at the top left.", "Two blue squares.", "A green triangle at the bottom."], refs)
    wrong = eval_sets.caption_scores(["two blue squares", "a green triangle at the bottom", "a red circle at the top left"], refs)
    assert right["cider"] > 2.0 > 0.5 > wrong["cider"] and right["bleu4"] > wrong["bleu4"]


def test_sets_are_loaded_with_their_fields_checked(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text("\n".join(json.dumps({"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg",
                                          "text": "Is there a dog in the image?", "label": "no"}) for i in range(3)))
    rows = eval_sets.load_items("pope", str(path))
    assert len(rows) == 3 and eval_sets.question_of("pope", rows[0]) == "Is there a dog in the image?"
    bad = tmp_path / "vqa.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "question": "What?"}) + "\n")
    with pytest.raises(ValueError, match="line 1: missing \\['answers'\\]"):
        eval_sets.load_items("vqa", str(bad))
