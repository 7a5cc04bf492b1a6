"""Hand-made cases for eval.metrics (VQA accuracy, POPE, CHAIR)."""

from __future__ import annotations

import math

import pytest

from eval.metrics import (
    chair_metrics,
    extract_objects,
    normalize_answer,
    parse_yes_no,
    pope_metrics,
    vqa_accuracy,
)

# --------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Circle.", "circle"),
        ("circle", "circle"),
        ("two", "2"),
        ("Ten", "10"),
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("  red   and\tblue  ", "red and blue"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("yes.", "yes"),
        ("man's", "mans"),
        ("t-shirt", "t shirt"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_vqa_exact_match_after_normalisation() -> None:
    res = vqa_accuracy(["The Circle.", "two", "blue"], ["circle", "2", "red"])
    assert res["accuracy"] == pytest.approx(2 / 3)
    assert res["n"] == 3
    assert res["per_type"] == {}


def test_vqa_is_strict_about_extra_words() -> None:
    # Only normalisation, no answer extraction: a sentence does not match "yes".
    assert vqa_accuracy(["Yes, there is."], ["yes"])["accuracy"] == 0.0
    assert vqa_accuracy(["Yes."], ["yes"])["accuracy"] == 1.0


def test_vqa_soft_accuracy_with_human_answers() -> None:
    assert vqa_accuracy(["cat"], [["cat", "dog", "dog"]])["accuracy"] == pytest.approx(1 / 3)
    assert vqa_accuracy(["dog"], [["cat", "dog", "dog"]])["accuracy"] == pytest.approx(2 / 3)
    assert vqa_accuracy(["Dog."], [["dog", "a dog", "the dog", "cat"]])["accuracy"] == 1.0
    assert vqa_accuracy(["bird"], [["cat", "dog", "dog"]])["accuracy"] == 0.0


def test_vqa_per_type_breakdown() -> None:
    res = vqa_accuracy(
        ["yes", "no", "3", "red"],
        ["yes", "yes", ["three", "3", "3"], "blue"],
        question_types=["yes/no", "yes/no", "number", "other"],
    )
    assert res["n"] == 4
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["per_type"] == {
        "yes/no": {"accuracy": 0.5, "n": 2},
        "number": {"accuracy": 1.0, "n": 1},
        "other": {"accuracy": 0.0, "n": 1},
    }


def test_vqa_empty_and_errors() -> None:
    assert vqa_accuracy([], []) == {"accuracy": 0.0, "n": 0, "per_type": {}}
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], [])
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], ["a"], question_types=[])
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], [[]])


# -------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("There is no circle.", "no"),
        ("yes", "yes"),
        ("no", "no"),
        ("Yes, there is a dog. It is not a cat.", "yes"),  # only the first sentence counts
        ("The dog is not visible", "no"),
        ("", "yes"),
    ],
)
def test_parse_yes_no(text: str, expected: str) -> None:
    assert parse_yes_no(text) == expected


def test_pope_all_yes_on_balanced_labels() -> None:
    res = pope_metrics(["yes"] * 4, ["yes", "no", "yes", "no"])
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["precision"] == pytest.approx(0.5)
    assert res["recall"] == pytest.approx(1.0)
    assert res["f1"] == pytest.approx(2 / 3)
    assert res["yes_ratio"] == pytest.approx(1.0)
    assert res["n"] == 4


def test_pope_all_no_has_no_nan() -> None:
    res = pope_metrics(["No, there is not."] * 4, ["yes", "no", "yes", "no"])
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["precision"] == 0.0
    assert res["recall"] == 0.0
    assert res["f1"] == 0.0
    assert res["yes_ratio"] == 0.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in res.values())


def test_pope_mixed_and_raw_text() -> None:
    preds = ["Yes, there is.", "There is no dog.", "Yes.", "No."]
    labels = ["YES", "yes", " no ", "no"]
    res = pope_metrics(preds, labels)  # tp=1, fn=1, fp=1, tn=1
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["precision"] == pytest.approx(0.5)
    assert res["recall"] == pytest.approx(0.5)
    assert res["f1"] == pytest.approx(0.5)
    assert res["yes_ratio"] == pytest.approx(0.5)


def test_pope_empty_and_errors() -> None:
    res = pope_metrics([], [])
    assert res["n"] == 0 and res["accuracy"] == 0.0 and res["f1"] == 0.0
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


# ------------------------------------------------------------------------- CHAIR

SYNONYMS = {
    "square": ["square", "box", "cube"],
    "circle": ["circle", "disc", "ring"],
    "dog": ["dog", "puppy", "puppies"],
    "hot dog": ["hot dog", "hotdog"],
    "traffic light": ["traffic light", "stop light"],
    "light": ["lamp"],
}


def test_extract_objects_empty_caption() -> None:
    assert extract_objects("", SYNONYMS) == set()
    assert extract_objects("Nothing to see here.", SYNONYMS) == set()


def test_extract_objects_synonyms_and_case() -> None:
    assert extract_objects("A red Box next to a DISC.", SYNONYMS) == {"square", "circle"}


def test_extract_objects_plurals() -> None:
    assert extract_objects("Three boxes and two circles.", SYNONYMS) == {"square", "circle"}
    assert extract_objects("Some puppies.", SYNONYMS) == {"dog"}  # explicit irregular plural
    assert extract_objects("Two dogs.", SYNONYMS) == {"dog"}


def test_extract_objects_whole_words_only() -> None:
    # "boxer" / "circles-ish" substrings must not match partially.
    assert extract_objects("A boxer in a discotheque.", SYNONYMS) == set()


def test_extract_objects_multiword_synonyms_win() -> None:
    assert extract_objects("A man eating a hot dog.", SYNONYMS) == {"hot dog"}
    assert extract_objects("Two hot-dogs and a dog.", SYNONYMS) == {"hot dog", "dog"}
    assert extract_objects("A stop light near a lamp.", SYNONYMS) == {"traffic light", "light"}
    assert extract_objects("The traffic lights are red.", SYNONYMS) == {"traffic light"}


def test_chair_one_hallucination_among_two() -> None:
    res = chair_metrics(["A box and a circle."], [["square"]], SYNONYMS)
    assert res["CHAIR_i"] == pytest.approx(0.5)
    assert res["CHAIR_s"] == pytest.approx(1.0)
    assert res["recall"] == pytest.approx(1.0)
    assert res["n"] == 1
    assert res["avg_mentioned"] == pytest.approx(2.0)


def test_chair_empty_caption_does_not_hallucinate() -> None:
    res = chair_metrics(["", "A dog."], [["dog"], ["dog"]], SYNONYMS)
    assert res["CHAIR_s"] == 0.0
    assert res["CHAIR_i"] == 0.0
    assert res["recall"] == pytest.approx(0.5)
    assert res["avg_mentioned"] == pytest.approx(0.5)

    res = chair_metrics([""], [["dog"]], SYNONYMS)
    assert res["CHAIR_i"] == 0.0  # nothing mentioned -> 0.0, not NaN
    assert res["CHAIR_s"] == 0.0


def test_chair_gt_given_as_synonyms_and_mixed_captions() -> None:
    captions = ["Two cubes and a puppy.", "A ring.", "A hotdog on a box."]
    gt = [["box", "dogs"], ["circle", "square"], ["hot dog"]]
    res = chair_metrics(captions, gt, SYNONYMS)
    # Caption 3 hallucinates "square"; 5 mentioned objects in total.
    assert res["CHAIR_s"] == pytest.approx(1 / 3)
    assert res["CHAIR_i"] == pytest.approx(1 / 5)
    assert res["recall"] == pytest.approx(4 / 5)
    assert res["n"] == 3
    assert res["avg_mentioned"] == pytest.approx(5 / 3)


def test_chair_length_mismatch() -> None:
    with pytest.raises(ValueError):
        chair_metrics(["a"], [], SYNONYMS)
