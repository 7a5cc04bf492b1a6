"""Pure metric functions for evaluating vision-language model outputs.

Every function here takes already-generated text (model predictions) plus
references and returns plain Python numbers, so the same code scores a teacher,
a student or any distilled checkpoint. Nothing here loads a model or touches the
GPU.

Metrics
-------
VQA accuracy
    :func:`normalize_answer` and :func:`vqa_accuracy`. Normalised exact match;
    when several human answers are given, the usual soft score
    ``min(#matching humans / 3, 1)``.
POPE (object-hallucination probing with yes/no questions)
    :func:`parse_yes_no` and :func:`pope_metrics`. Parsing follows the official
    POPE evaluation script so numbers are comparable with published ones.
CHAIR (object hallucination in free-form captions)
    :func:`extract_objects` and :func:`chair_metrics`.

Example::

    from eval.metrics import vqa_accuracy, pope_metrics, chair_metrics

    vqa = vqa_accuracy(["Two", "red"], [["2", "2", "two"], "blue"])
    vqa["accuracy"]  # 0.5

    pope = pope_metrics(["Yes, there is a dog.", "No."], ["yes", "yes"])
    pope["recall"]  # 0.5

    synonyms = {"dog": ["dog", "puppy"], "cat": ["cat", "kitten"]}
    chair = chair_metrics(["A puppy and a kitten."], [["dog"]], synonyms)
    chair["CHAIR_i"]  # 0.5 -- "cat" is hallucinated
"""

from __future__ import annotations

import logging
import re
import string
from collections import defaultdict
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "chair_metrics",
    "extract_objects",
    "normalize_answer",
    "parse_yes_no",
    "pope_metrics",
    "vqa_accuracy",
]

# ---------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
# Thousands separators ("1,000") must vanish rather than become a space,
# otherwise "1,000" would normalise to "1 000" and never match "1000".
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
# A period is only meaningful as a decimal point ("2.5"); everywhere else
# (sentence end, abbreviations) it is dropped.
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
# Apostrophes are deleted (not spaced) so "man's" -> "mans" stays one token.
_APOSTROPHES = re.compile(r"['\u2019`]")
# Any remaining punctuation separates words ("t-shirt" -> "t shirt"); the same
# rule is applied to references, so both sides end up tokenised identically.
_OTHER_PUNCT = re.compile("[" + re.escape("".join(c for c in string.punctuation if c not in ".'`")) + "]")


def normalize_answer(s: str) -> str:
    """Normalise a short answer for exact-match comparison.

    Steps, in order: lowercase and strip; drop commas between digits
    ("1,000" -> "1000"); drop periods that are not decimal points (so a
    trailing "." disappears but "2.5" survives); delete apostrophes; turn all
    other punctuation into spaces; drop the articles "a", "an", "the"; map the
    number words "zero" .. "ten" to digits; collapse whitespace.

    This is a simplified, deterministic variant of the official VQA
    normalisation (which also expands contractions such as "dont" -> "don't").
    Because both prediction and reference go through the same function, the
    simplification only matters for answers that differ solely in such forms.

    >>> normalize_answer("  The Circle. ")
    'circle'
    >>> normalize_answer("Two")
    '2'
    """
    text = s.lower().strip()
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _APOSTROPHES.sub("", text)
    text = _OTHER_PUNCT.sub(" ", text)
    tokens = [_NUMBER_WORDS.get(tok, tok) for tok in text.split() if tok not in _ARTICLES]
    return " ".join(tokens)


def _vqa_item_score(prediction: str, answer: str | Sequence[str]) -> float:
    """Score one prediction against a single answer or a list of human answers."""
    pred = normalize_answer(prediction)
    if isinstance(answer, str):
        return float(pred == normalize_answer(answer))
    if len(answer) == 0:
        raise ValueError("empty list of reference answers")
    matches = sum(pred == normalize_answer(a) for a in answer)
    # Standard VQA soft accuracy: an answer given by 3+ annotators is fully
    # correct. (The official script additionally averages this over all
    # leave-one-annotator-out subsets of the 10 answers; that refinement is
    # not applied here -- see vqa_accuracy.)
    return min(matches / 3.0, 1.0)


def vqa_accuracy(
    predictions: list[str],
    answers: list[str | list[str]],
    question_types: list[str] | None = None,
) -> dict:
    """VQA accuracy with optional per-question-type breakdown.

    Args:
        predictions: model answers, one per question.
        answers: for each question either a single reference string (scored by
            normalised exact match, 0 or 1) or a list of human answers
            (VQAv2/TextVQA style, scored ``min(#matches / 3, 1)``).
        question_types: optional type label per question (e.g. "yes/no",
            "number", "other") for the ``per_type`` breakdown.

    Returns:
        ``{"accuracy": float, "n": int, "per_type": {type: {"accuracy": float,
        "n": int}}}``. ``accuracy`` is 0.0 when there are no questions;
        ``per_type`` is empty when ``question_types`` is None.

    Matching is deliberately strict: only :func:`normalize_answer` is applied,
    with no answer extraction. "Yes, there is." normalises to "yes there is" and
    does NOT match "yes"; a long prediction whose first word equals a one-word
    answer gets no credit. Prompt the model for short answers instead.

    The multi-answer score is the common simplified form ``min(m / 3, 1)``. The
    official VQAv2 script averages that score over the 10 leave-one-out subsets
    of annotators, which gives slightly lower values for partially-matching
    predictions (e.g. 0.3 instead of 1/3 for one match out of ten).

    Raises:
        ValueError: on length mismatch or an empty list of reference answers.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if question_types is not None and len(question_types) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(question_types)} question types")

    scores = [_vqa_item_score(p, a) for p, a in zip(predictions, answers, strict=True)]
    n = len(scores)
    result: dict = {"accuracy": sum(scores) / n if n else 0.0, "n": n, "per_type": {}}

    if question_types is not None:
        by_type: dict[str, list[float]] = defaultdict(list)
        for qtype, score in zip(question_types, scores, strict=True):
            by_type[qtype].append(score)
        result["per_type"] = {
            qtype: {"accuracy": sum(vals) / len(vals), "n": len(vals)} for qtype, vals in by_type.items()
        }
    return result


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------

_NEGATION_WORDS = frozenset({"No", "not", "no"})


def parse_yes_no(text: str) -> str:
    """Map a free-form answer to "yes" or "no" exactly as the official POPE eval does.

    The reference script (``evaluate.py`` in the POPE repository, copied by
    LLaVA's ``eval_pope.py``) keeps the text before the first ".", removes
    commas, splits on single spaces and answers "no" iff one of the words is
    ``"No"``, ``"not"`` or ``"no"``; everything else -- including empty or
    off-topic text -- counts as "yes".

    The quirks are kept on purpose so scores match published numbers: the word
    check is case-sensitive ("NO" or a leading "Not" are read as yes), and
    "No!" or "no?" are not recognised because only "." and "," are handled.

    >>> parse_yes_no("No, there is not.")
    'no'
    >>> parse_yes_no("There is no circle.")
    'no'
    >>> parse_yes_no("Yes.")
    'yes'
    """
    first_sentence = text.split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NEGATION_WORDS.intersection(words) else "yes"


def _safe_div(num: float, den: float) -> float:
    # Empty denominators (no predicted positives, no positives, ...) score 0.0
    # rather than NaN so downstream tables and JSON stay well-formed.
    return num / den if den else 0.0


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """POPE accuracy / precision / recall / F1 with "yes" as the positive class.

    Args:
        predictions: raw model outputs; each is parsed with :func:`parse_yes_no`
            (already-clean "yes"/"no" strings pass through unchanged).
        labels: ground truth, "yes" or "no" (case and surrounding whitespace
            are ignored).

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}`` where
        ``yes_ratio`` is the fraction of predictions parsed as "yes". Any
        ratio with a zero denominator is 0.0, never NaN.

    Raises:
        ValueError: on length mismatch or a label that is not yes/no. (The
            official script silently treats any non-"no" label as "yes"; a typo
            in the labels should fail loudly here instead.)
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    gold = []
    for label in labels:
        norm = label.strip().lower()
        if norm not in ("yes", "no"):
            raise ValueError(f"POPE label must be 'yes' or 'no', got {label!r}")
        gold.append(norm == "yes")
    pred = [parse_yes_no(p) == "yes" for p in predictions]

    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(not p and g for p, g in zip(pred, gold, strict=True))
    tn = sum(not p and not g for p, g in zip(pred, gold, strict=True))
    n = len(pred)

    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "accuracy": _safe_div(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "yes_ratio": _safe_div(tp + fp, n),
        "n": n,
    }


# ---------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def _tokenize(text: str) -> list[str]:
    # Apostrophes are removed first so "dog's" -> "dogs" (caught by the plural
    # rule) instead of "dog" + "s"; every other non-alphanumeric char splits.
    return _WORD.findall(_APOSTROPHES.sub("", text.lower()))


def _build_phrase_table(synonyms: Mapping[str, Sequence[str]]) -> dict[tuple[str, ...], str]:
    """Map every surface form (as a token tuple) to its canonical object name.

    Explicit forms (the canonical name itself and its listed synonyms) are
    inserted before the generated "+s"/"+es" plurals, so a listed word always
    beats an accidental generated plural of another object's synonym.
    """
    table: dict[tuple[str, ...], str] = {}

    def add(tokens: tuple[str, ...], canonical: str, explicit: bool) -> None:
        if not tokens:
            return
        owner = table.setdefault(tokens, canonical)
        if explicit and owner != canonical:
            logger.warning(
                "CHAIR synonym %r is listed for both %r and %r; keeping %r", " ".join(tokens), owner, canonical, owner
            )

    explicit_forms = [(tuple(_tokenize(form)), canon) for canon, forms in synonyms.items() for form in (canon, *forms)]
    for tokens, canon in explicit_forms:
        add(tokens, canon, explicit=True)
    for tokens, canon in explicit_forms:
        if tokens:
            # Pluralise the head noun, i.e. the last word ("hot dog" -> "hot dogs").
            for suffix in ("s", "es"):
                add((*tokens[:-1], tokens[-1] + suffix), canon, explicit=False)
    return table


def _match_objects(caption: str, table: Mapping[tuple[str, ...], str]) -> set[str]:
    """Greedy left-to-right longest-phrase match of the caption against ``table``."""
    tokens = _tokenize(caption)
    if not tokens or not table:
        return set()
    max_len = max(len(k) for k in table)
    found: set[str] = set()
    i = 0
    while i < len(tokens):
        # Trying the longest span first makes "hot dog" win over "dog" and
        # consumes its tokens so "dog" is not reported a second time.
        for span in range(min(max_len, len(tokens) - i), 0, -1):
            canonical = table.get(tuple(tokens[i : i + span]))
            if canonical is not None:
                found.add(canonical)
                i += span
                break
        else:
            i += 1
    return found


def extract_objects(caption: str, synonyms: dict[str, list[str]]) -> set[str]:
    """Canonical object names mentioned in ``caption``.

    Args:
        caption: free-form text.
        synonyms: canonical object name -> surface forms (e.g.
            ``{"square": ["box", "cube"], "hot dog": ["hotdog"]}``). The
            canonical name is always a surface form of itself.

    Matching is on whole words, case-insensitive, with punctuation and hyphens
    treated as word breaks ("hot-dog" matches "hot dog"). At each position the
    longest matching phrase wins, so multi-word synonyms take precedence over
    their single-word parts. Plurals: list irregular ones explicitly; the
    simple "+s" and "+es" forms of every surface form (applied to its last
    word) are accepted automatically.
    """
    return _match_objects(caption, _build_phrase_table(synonyms))


def chair_metrics(captions: list[str], gt_objects: list[list[str]], synonyms: dict[str, list[str]]) -> dict:
    """CHAIR object-hallucination metrics for a set of captions.

    Args:
        captions: generated captions.
        gt_objects: objects actually present, per image. Each entry is mapped
            to its canonical name through ``synonyms`` (so "box" and "square"
            are interchangeable); entries unknown to ``synonyms`` are kept
            lowercased as-is.
        synonyms: vocabulary, as for :func:`extract_objects`.

    Returns:
        ``CHAIR_s``: fraction of captions mentioning at least one object not in
        their ground truth. ``CHAIR_i``: hallucinated mentioned objects / all
        mentioned objects (0.0 when nothing is mentioned). ``recall``:
        ground-truth objects mentioned / ground-truth objects. ``n``: number of
        captions. ``avg_mentioned``: mean number of distinct objects mentioned
        per caption.

    Objects are counted once per caption (a set), unlike the original CHAIR
    code which counts repeated mentions. Ground-truth objects outside the
    ``synonyms`` vocabulary cannot be detected in any caption, so they are left
    out of the recall denominator. Empty captions mention nothing and hence
    never hallucinate.

    Raises:
        ValueError: on length mismatch.
    """
    if len(captions) != len(gt_objects):
        raise ValueError(f"{len(captions)} captions but {len(gt_objects)} ground-truth object lists")
    table = _build_phrase_table(synonyms)
    vocab = set(table.values())

    n_hallucinating_captions = 0
    n_mentioned = 0
    n_hallucinated = 0
    n_gt = 0
    n_gt_mentioned = 0
    n_gt_out_of_vocab = 0
    for caption, gt_list in zip(captions, gt_objects, strict=True):
        mentioned = _match_objects(caption, table)
        gt = {table.get(tuple(_tokenize(obj)), obj.strip().lower()) for obj in gt_list}
        hallucinated = mentioned - gt
        gt_in_vocab = gt & vocab
        n_gt_out_of_vocab += len(gt - vocab)

        n_hallucinating_captions += bool(hallucinated)
        n_mentioned += len(mentioned)
        n_hallucinated += len(hallucinated)
        n_gt += len(gt_in_vocab)
        n_gt_mentioned += len(gt_in_vocab & mentioned)

    if n_gt_out_of_vocab:
        logger.debug(
            "%d ground-truth objects are outside the CHAIR vocabulary and ignored for recall", n_gt_out_of_vocab
        )
    n = len(captions)
    return {
        "CHAIR_s": _safe_div(n_hallucinating_captions, n),
        "CHAIR_i": _safe_div(n_hallucinated, n_mentioned),
        "recall": _safe_div(n_gt_mentioned, n_gt),
        "n": n,
        "avg_mentioned": _safe_div(n_mentioned, n),
    }
