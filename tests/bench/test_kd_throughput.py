"""eval/bench/kd_throughput.py: the data distribution and FLOP count in-process; every variant x stage run once at
tiny shapes on CPU through the script's own sweep (one process per run; slow: about 12 launches).

    .venv/bin/python -m pytest -q -m slow tests/bench/test_kd_throughput.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.bench import kd_throughput as kdt

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "eval" / "bench" / "kd_throughput.py"


def test_lengths_follow_the_documented_distribution():
    rng = np.random.default_rng(0)
    dist = kdt.DATA["real"]["text"]
    draws = np.array([dist.draw(rng) for _ in range(4000)])
    assert draws.min() >= dist.lo and draws.max() <= dist.hi
    assert 140 <= np.median(draws) <= 180  # median 160
    assert (draws > 1000).any() and (draws < 64).any()  # a few dozen to over a thousand


def test_conversations_put_three_quarters_of_the_text_in_the_answers():
    records = kdt.conversation_records(200, kdt.DATA["real"])
    assert records[:5] == kdt.conversation_records(5, kdt.DATA["real"])  # a prefix of every longer stream
    answers = questions = 0
    for r in records:
        turns = r["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and [t["from"] for t in turns[:2]] == ["human", "gpt"]
        questions += sum(len(t["value"].split()) - (t["value"].startswith("<image>")) for t in turns[0::2])
        answers += sum(len(t["value"].split()) for t in turns[1::2])
    assert 0.70 <= answers / (answers + questions) <= 0.80


def test_step_flops_is_the_documented_formula():
    s = kdt.FlopSpec(body=10, head=3, layers=2, attn_dim=4, vision=5, vision_layers=1, vision_dim=2,
                     vision_tokens=3, projector=7)
    t = kdt.FlopSpec(body=20, head=6, layers=3, attn_dim=8)
    lengths, responses, images = [4, 2], 3, 2
    tokens, squares = 6, 20

    def llm(spec, head_tokens):
        return 2 * spec.body * tokens + 2 * spec.head * head_tokens + 4 * spec.layers * spec.attn_dim * squares

    vision = images * (2 * 5 * 3 + 4 * 1 * 2 * 9)
    projector = images * 2 * 7 * 2
    want = 3 * llm(s, responses) + vision + 3 * projector + llm(t, responses)
    assert kdt.step_flops(s, t, lengths, responses, images) == want
    want_all = 3 * llm(s, tokens) + vision + 3 * projector + llm(t, tokens)
    assert kdt.step_flops(s, t, lengths, responses, images, all_positions=True) == want_all


def test_processor_expands_the_image_to_its_tokens():
    from distill.data.collate import count_image_tokens

    proc = kdt.make_processor(kdt.SHAPES["tiny"], kdt.DATA["tiny"]["words"])
    assert count_image_tokens(proc) == 16  # 32 / 8 squared
    ids = proc.tokenizer("<|im_start|>user\n<image>\nw1 w7<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert ids == [498, 400, 500, 1, 7, 499]


@pytest.mark.slow
def test_every_variant_and_stage_runs_at_tiny_shapes(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(SCRIPT), "--sweep", "tiny", "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "failed" not in proc.stdout and "timed out" not in proc.stdout, proc.stdout
    rows = {(r["variant"], r["stage"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {(v, s) for v in kdt.VARIANTS for s in kdt.STAGES}
    for (variant, stage), row in rows.items():
        if variant == "trl_gkd" and stage == "preference":
            assert row["status"] == "n/a"
            continue
        assert row["status"] == "ok", row
        assert row["timed_steps"] == 2 and len(row["step_s"]) == 2
        assert row["tokens_per_s"] > 0 and 0 <= row["padding"] < 1
        assert row["peak_gib"] > 0 and row["model_tflop_per_step"] > 0 and row["mfu"] is None
        assert row["loss_ms"] > 0 and math.isfinite(row["loss_share"])
        assert row["real_tokens"] == rows[("ours", stage)]["real_tokens"]  # the same batches everywhere
    for stage in kdt.STAGES:
        ours, bare, naive = (rows[(v, stage)]["first_loss"] for v in ("ours", "bare", "naive"))
        assert ours == pytest.approx(bare, rel=1e-6), stage  # the same computation, with and without the Trainer
        assert ours == pytest.approx(naive, rel=2e-2), stage  # the same objective, computed naively
        assert rows[("ours", stage)]["tokens_seen_check"] is True
    assert "ours / bare tokens/s" in proc.stdout  # the targets' summary


def test_profile_records_two_steps_after_the_warmup(tmp_path):
    out = tmp_path / "prof"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--variant", "bare", "--stage", "d2d", "--steps", "3",
           "--warmup", "1", "--profile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ops = (out / "ops.txt").read_text()
    assert "ProfilerStep*" in ops and "aten::mm" in ops
    steps = {e["name"] for e in json.loads((out / "trace.json").read_text())["traceEvents"]
             if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2  # warm-up steps and the schedule's own warm-up step are not recorded


def test_teacher_fp8_reports_its_fidelity(tmp_path):
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--variant", "ours", "--stage", "d2d", "--steps", "1",
           "--warmup", "1", "--teacher-fp8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["status"] == "ok" and row["fp8_linears"] > 0 and row["fp8_kl_tokens"] > 0
    assert 0 < row["fp8_kl"] < 1e-2  # an approximation: not exact, but close


def test_packing_runs_the_same_tokens_without_padding(tmp_path):
    out = tmp_path / "rows.jsonl"
    base = [sys.executable, str(SCRIPT), "--tiny", "--variant", "ours", "--stage", "d2s", "--steps", "2",
            "--warmup", "1", "--out", str(out)]
    for extra in ([], ["--packing"]):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    padded, packed = map(json.loads, out.read_text().splitlines())
    assert packed["packing"] and packed["status"] == "ok" and packed["tokens_seen_check"] is True
    assert packed["padding"] == 0 < padded["padding"]
    assert packed["real_tokens"] == padded["real_tokens"] and packed["response_tokens"] == padded["response_tokens"]
    assert packed["first_loss"] == pytest.approx(padded["first_loss"], rel=1e-5)
    refused = subprocess.run(base[:3] + ["naive", "--packing"], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "--packing" in refused.stderr


def test_savers_lower_the_student_as_the_stages_do():
    """frozen_bf16 casts only the frozen parameters; weights_bf16 all of them, with torchao's stochastic-rounding
    8-bit AdamW."""
    import torch

    student = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    student[0].requires_grad_(False)
    kdt.apply_savers(student, ["frozen_bf16"])
    assert [p.dtype for p in student.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2
    kdt.apply_savers(student, ["weights_bf16"])
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert kdt.saver_training(["weights_bf16"]) == {"optim": "adamw_torch_8bit",
                                                    "optim_args": "bf16_stochastic_round=True"}
    assert kdt.saver_training(["adam8bit"]) == {"optim": "adamw_torch_8bit"} and kdt.saver_training([]) == {}


@pytest.mark.slow
def test_savers_run_and_keep_the_first_loss(tmp_path):
    """A saver's run reports itself; its first loss is the plain run's to bf16 precision."""
    out = tmp_path / "rows.jsonl"
    base = [sys.executable, str(SCRIPT), "--tiny", "--variant", "ours", "--stage", "d2d", "--steps", "1",
            "--warmup", "1", "--out", str(out)]
    for extra in ([], ["--savers", "frozen_bf16"]):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    plain, saved = map(json.loads, out.read_text().splitlines())
    assert saved["savers"] == ["frozen_bf16"] and saved["status"] == "ok"
    assert saved["first_loss"] == pytest.approx(plain["first_loss"], rel=2e-2)
