"""eval/bench/kd_signal.py on the tiny world: shares, the teacher's own numbers, and a student equal to the teacher."""

from __future__ import annotations

import pytest

from eval.bench.kd_signal import measure, question_kind, reply_runs


def test_question_kinds_and_reply_runs():
    import torch

    assert question_kind("<image>\nIs there a red cross in the image?") == "existence"
    assert question_kind("Is the red square above the blue circle?") == "relation"
    assert question_kind("What color is the square?") == "colour"
    assert reply_runs(torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1]).bool()) == [[1, 2], [5], [7, 8, 9]]


def test_the_teacher_as_its_own_student_differs_nowhere(tiny_world, tiny_artifacts):
    teacher = tiny_artifacts / "teacher"
    alone = measure(teacher, tiny_world["data"], records=16)
    rows = measure(teacher, tiny_world["data"], student_dir=teacher, records=16)
    kinds = {r["kind"] for r in rows}
    assert "caption" in kinds and "existence" in kinds
    assert sum(r["token_share"] for r in rows) == pytest.approx(1.0)
    for r, a in zip(rows, alone):
        assert r["kind"] == a["kind"] and r["teacher_p_label"] == pytest.approx(a["teacher_p_label"])
        assert 0.0 <= r["teacher_p_label"] <= 1.0 and r["teacher_entropy"] >= 0.0
        assert 0.0 <= r["teacher_p_label_per_token"] <= 1.0 and r["teacher_entropy_per_token"] >= 0.0
        assert r["student_p_label"] == pytest.approx(r["teacher_p_label"], abs=1e-5)
        assert r["kl_first"] == pytest.approx(0.0, abs=1e-5) and r["kl_per_token"] == pytest.approx(0.0, abs=1e-5)
    other = measure(teacher, tiny_world["data"], student_dir=tiny_artifacts / "student", records=16)
    assert any(r["kl_per_token"] > 1e-3 for r in other)  # a different model does differ
