"""The findings driver: aggregation over seeds, verdicts, the recipe's wiring, and one tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distill.cli import RECIPES
from eval.findings import COMPARISONS, aggregate, main, render, verdict


def _rows(seed_shift: float, sft_gap: float) -> list[dict]:
    base = {"vqa_acc": 0.5 + seed_shift, "pope_f1": 0.6, "chair_i": 0.2}
    return [{"model": "d2s", **base},
            {"model": "sft_moe", **base, "vqa_acc": base["vqa_acc"] - sft_gap},
            {"model": "preference", **base, "chair_i": 0.25},
            {"model": "d2s_e8", **base, "vqa_acc": base["vqa_acc"] + 0.2}]


def test_aggregate_gives_mean_sample_std_and_score():
    stats = aggregate([_rows(0.0, 0.1), _rows(0.02, 0.1), _rows(0.04, 0.1)])
    mean, std, n = stats["d2s"]["vqa_acc"]
    assert (n, mean) == (3, pytest.approx(0.52)) and std == pytest.approx(0.02)
    assert stats["d2s"]["score"][0] == pytest.approx((0.52 + 0.6) / 2)


def test_verdicts_follow_sign_and_margin():
    by_name = {c.name[:2]: c for c in COMPARISONS if c.metric != "vqa_acc"}
    clear = aggregate([_rows(s, 0.1) for s in (0.0, 0.01, 0.02)])  # KD ahead by 0.05 score, noise 0.01
    assert verdict(clear, by_name["1."]) == ("reproduces", pytest.approx(0.05))
    noisy = aggregate([_rows(0.0, 0.02), _rows(0.0, -0.01), _rows(0.0, 0.02)])
    assert verdict(noisy, by_name["1."])[0] == "same direction, within noise"
    reversed_ = aggregate([_rows(s, -0.1) for s in (0.0, 0.01, 0.02)])
    assert verdict(reversed_, by_name["1."])[0] == "no"
    assert verdict(clear, by_name["4b"])[0] == "no"  # preference raised CHAIR_i
    assert verdict(clear, by_name["5b"])[0] == "no"  # 8 experts clearly better: the paper says no better
    assert verdict(clear, by_name["2."]) == ("not run", None)
    table = render(clear, [0, 1, 2])
    assert "| d2s | D2D + D2S" in table and "0.510 ± 0.010" in table


def test_findings_recipe_gives_every_line_the_same_budget():
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=findings", "seed=1"])
    stages = OmegaConf.to_container(cfg.stages, resolve=True)
    epochs = {k: stages[k]["training"]["num_train_epochs"] for k in ("d2d", "d2s", "d2s_only", "sft", "sft_moe",
                                                                      "dense", "d2s_top1", "d2s_e8")}
    phase1, phase2 = cfg.budget.phase1, cfg.budget.phase2
    assert epochs["d2s_only"] == cfg.budget.total == phase1 + phase2
    assert epochs["d2d"] == epochs["sft"] == phase1
    assert {epochs[k] for k in ("d2s", "sft_moe", "dense", "d2s_top1", "d2s_e8")} == {phase2}
    assert stages["d2s_only"]["model"]["artifact"].endswith("seed1/adapter_init/model")
    assert stages["sft_moe"]["alpha"] == 0.0 and stages["sft_moe"]["model"]["artifact"].endswith("sft/model")
    assert stages["sft"]["alpha"] == 0.0  # SFT = the KD line without its KD term: the same weighting of the replies
    lines = ("d2d", "d2s", "d2s_only", "sft", "sft_moe", "dense", "d2s_top1", "d2s_e8")
    assert {stages[k]["kd"]["normalise"] for k in lines} == {"replies"}
    assert (stages["d2s_top1"]["upcycle"]["top_k"], stages["d2s_e8"]["upcycle"]["num_experts"]) == (1, 8)
    assert stages["eval"]["models"]["teacher"] is None
    assert all(stages[k]["teacher"]["path"] == cfg.teacher_model for k in ("d2d", "d2s", "preference", "dense"))


@pytest.mark.slow  # 46-60 s on the 2-core CI machine: the default suite's largest test, near its 10-minute budget
def test_findings_driver_runs_a_tiny_world_end_to_end(tmp_path, tiny_recipe, capsys):
    tiny = [o for o in tiny_recipe if not o.startswith("stages.eval.")]
    main(["--dir", str(tmp_path), "--seeds", "0", "--", "trainer=cpu", "trainer.report_to=none", "stages.eval.limit=4",
          "stages.eval.caption_max_new_tokens=8", "stages.teacher_eval.limit=4", *tiny])
    rows = json.loads((tmp_path / "seed0" / "eval" / "results.json").read_text())
    assert [r["model"] for r in rows] == ["adapter_init", "d2d", "d2s", "preference", "d2s_only", "sft", "sft_moe",
                                          "dense", "d2s_top1", "d2s_e8"]
    report = (tmp_path / "RESULTS.md").read_text()
    assert "| teacher | teacher |" in report and "| 1. KD student vs SFT-only MoE student |" in report
    assert (tmp_path / "RESULTS.png").stat().st_size > 0
    from eval.findings import NOTES_MARKER

    (tmp_path / "RESULTS.md").write_text(report + NOTES_MARKER + "\nour reading\n")
    main(["--dir", str(tmp_path), "--seeds", "0", "--parts", "report"])
    assert (tmp_path / "RESULTS.md").read_text().endswith(NOTES_MARKER + "\nour reading\n")
    active = {r["model"]: r["params_active_m"] for r in rows}
    total = {r["model"]: r["params_total_m"] for r in rows}
    assert active["dense"] < active["d2s_top1"] < active["d2s"] == pytest.approx(active["d2s_e8"], rel=0.01)
    assert total["d2s_e8"] > total["d2s"]


@pytest.mark.parametrize("part", ["shared", "seeds"])
def test_sigterm_to_the_driver_reaches_its_running_pipelines(tmp_path, monkeypatch, part):
    """A killed or timed-out driver passes SIGTERM on to the pipelines it started (which then checkpoint, as a
    preempted stage does) and waits for them, whether it was waiting on one (shared) or polling several (seeds)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    import eval.findings as findings

    child = ("import pathlib, signal, sys, time\n"
             "out = pathlib.Path(sys.argv[1])\n"
             "def stop(*_):\n"
             "    time.sleep(0.5); out.with_suffix('.stopped').write_text('checkpointed'); sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "out.with_suffix('.ready').write_text('')\n"
             "time.sleep(60)\n")
    started = []

    def fake_distill(args, log):
        started.append(subprocess.Popen([sys.executable, "-c", child, str(tmp_path / f"run{len(started)}")]))
        return started[-1]

    def notice():
        deadline = time.time() + 30
        while time.time() < deadline and not (len(started) == expected
                                              and all((tmp_path / f"run{i}.ready").exists() for i in range(expected))):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    expected = 1 if part == "shared" else 2
    monkeypatch.setattr(findings, "_distill", fake_distill)
    threading.Thread(target=notice, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.time()
    with pytest.raises(SystemExit, match="stopped on SIGTERM"):
        findings.run_parts([part], tmp_path, [0, 1], parallel=2, overrides=[])
    assert time.time() - t0 < 30  # stopped on the notice, not after the children's 60 s
    assert [(tmp_path / f"run{i}.stopped").read_text() for i in range(expected)] == ["checkpointed"] * expected
    assert all(c.returncode == 0 for c in started)
    assert signal.getsignal(signal.SIGTERM) == before  # restored on the way out


def test_a_pipeline_that_does_not_stop_is_killed_after_the_grace_and_named(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    import eval.findings as findings

    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "print('ready', flush=True)\ntime.sleep(60)\n")
    monkeypatch.setattr(findings, "_distill", lambda args, log: subprocess.Popen(
        [sys.executable, "-c", stubborn], stdout=subprocess.PIPE, text=True))
    with findings._Forward() as forward:
        proc = forward.start(["seed=0"], tmp_path / "logs" / "seed0.log")
        proc.stdout.readline()
        forward._handler(signal.SIGTERM, None)
        with pytest.raises(SystemExit, match=r"Not stopped cleanly: \['seed0: exit -9'\]"):
            forward.stop_if_asked(grace_s=1)
