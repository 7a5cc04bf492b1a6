"""The pipeline runs a recipe's stages, writes config/metrics/DONE per stage, and skips finished ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distill.cli import RECIPES
from distill.pipeline import run_pipeline, validate


def _cfg(run_dir: Path, tiny: list[str], *extra: str):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose("config", overrides=["recipe=demo", f"run.dir={run_dir}", *tiny, *extra])


def test_finished_stage_is_skipped(tmp_path, tiny_recipe):
    cfg = _cfg(tmp_path, tiny_recipe, "pipeline=[world]")
    run_pipeline(cfg)
    stage = tmp_path / "world"
    assert (stage / "DONE").is_file() and (stage / "config.yaml").is_file()
    first = (stage / "metrics.json").stat().st_mtime_ns
    results = run_pipeline(cfg)
    assert (stage / "metrics.json").stat().st_mtime_ns == first  # not rerun
    assert results["world"] == json.loads((stage / "metrics.json").read_text())
    (stage / "DONE").unlink()
    run_pipeline(cfg)
    assert (stage / "metrics.json").stat().st_mtime_ns != first  # rerun once the marker is gone


def test_recipe_validation_names_the_problem(tmp_path, tiny_recipe):
    with pytest.raises(ValueError, match="no entry under 'stages'"):
        validate(_cfg(tmp_path, tiny_recipe, "pipeline=[world,nosuchstage]"))
    with pytest.raises(ValueError, match="listed twice"):
        validate(_cfg(tmp_path, tiny_recipe, "pipeline=[world,world]"))


def test_every_stage_is_checked_before_the_first_runs(tmp_path, tiny_recipe):
    """A bad setting of a late stage stops the run before the world is built (its inputs, the earlier stages'
    artifacts, do not exist yet and count as present); a wrong path outside the run folder is still caught."""
    with pytest.raises(ValueError, match=r"stages\.d2d: ValueError: alpha=1\.5"):
        run_pipeline(_cfg(tmp_path, tiny_recipe, "stages.d2d.alpha=1.5"))
    assert not (tmp_path / "world").exists()
    with pytest.raises(ValueError, match=r"stages\.teacher: FileNotFoundError: data\.train: /nowhere\.json"):
        run_pipeline(_cfg(tmp_path, tiny_recipe, "stages.teacher.data.train=[/nowhere.json]"))


def test_gpu_only_settings_stop_a_cpu_run_before_any_work(tmp_path, tiny_recipe, monkeypatch, caplog):
    """The GPU preset (``+speed=gpu``: packed flex attention, compiled layers) composes over a recipe; where a stage
    would train on the CPU (no CUDA device, or ``training.use_cpu``) a run stops before its first stage and names
    each setting, while ``run.plan`` (a login node checking a recipe) warns and shows the plan."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    cfg = _cfg(tmp_path, tiny_recipe, "+speed=gpu")
    for stage in ("d2d", "d2s"):
        block = cfg.stages[stage]
        assert block.data.packing and block.model.kernels == block.teacher.kernels == ["compile"]
        assert block.model.attn_implementation == block.teacher.attn_implementation == "flex_attention"
    assert not cfg.stages.preference.get("data", {}).get("packing", False)  # preference pads
    with pytest.raises(ValueError, match=r"stages\.d2d\.model\.kernels=\['compile'\].*stages\.d2s\.teacher\.kernels="
                                         r"\['compile'\]: need a CUDA GPU.*nothing was run"):
        run_pipeline(cfg)
    assert not (tmp_path / "world").exists()
    run_pipeline(_cfg(tmp_path, tiny_recipe, "+speed=gpu", "run.plan=true"))
    assert "need a CUDA GPU" in caplog.text and not (tmp_path / "world").exists()
    run_pipeline(_cfg(tmp_path, tiny_recipe, "pipeline=[world]", "+speed=gpu", "run.plan=true"))  # no d2d: no warning
    assert caplog.text.count("need a CUDA GPU") == 1
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a GPU machine, but the recipe trains on the CPU
    with pytest.raises(ValueError, match=r"stages\.d2d\.model\.kernels=.*training\.use_cpu"):
        run_pipeline(_cfg(tmp_path, tiny_recipe, "+speed=gpu"))
    assert not (tmp_path / "world").exists()
    run_pipeline(_cfg(tmp_path, tiny_recipe, "+speed=gpu", "trainer.use_cpu=false", "run.plan=true"))
    assert caplog.text.count("need a CUDA GPU") == 1  # on the GPU: nothing to warn of


def test_cli_runs_the_demo_recipe_end_to_end(tmp_path, tiny_recipe):
    """The real entry point, in a subprocess, on tiny models: every stage finishes and the table is printed."""
    cmd = [sys.executable, "-m", "distill", "recipe=demo", f"run.dir={tmp_path}", *tiny_recipe]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("world", "teacher", "adapter_init", "d2d", "d2s", "preference", "eval"):
        assert (tmp_path / stage / "DONE").is_file(), stage
    assert (tmp_path / "teacher" / "model" / "model.safetensors").is_file()
    assert "| model |" in proc.stdout and "| teacher |" in proc.stdout
    # Progress without a progress bar: the stage, step / total, ETA and the losses, one line per log step.
    assert "d2d: step 2/2 (100%)" in proc.stdout and "about 0:00 left, loss " in proc.stdout
    assert "{'loss'" not in proc.stdout  # the raw log dicts are not printed
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["model"] for r in rows] == ["teacher", "adapter_init", "d2d", "d2s", "preference"]
    assert rows[0]["kl_teacher"] == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    assert all(r["kl_teacher"] > 0 for r in rows[1:])


def _students_cfg(run_dir: Path, tiny: list[str]):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose("config", overrides=["recipe=students", f"run.dir={run_dir}", *tiny,
                                            "stages.world.standins.vision_towers=[clip,siglip]"])


def test_students_recipe_composes_five_student_lines(tmp_path, tiny_recipe):
    cfg = _students_cfg(tmp_path, tiny_recipe)
    order = validate(cfg)
    assert order[:2] == ["world", "teacher"] and order[-1] == "compare"
    stages = cfg.stages
    parts = {p: stages[f"{p}adapter_init"].model.parts for p in ("", "siglip_", "ldp_", "resampler_", "modality_")}
    assert parts["siglip_"].vision_tower.endswith("vision_tower_siglip")
    assert parts["siglip_"].vision_feature_select_strategy == "full"
    assert (parts["ldp_"].projector, parts["resampler_"].projector) == ("ldp", "resampler")
    assert parts["modality_"].modality_experts.layers == "all"
    # every line continues from its own previous stage
    for p in ("siglip_", "ldp_", "resampler_", "modality_"):
        assert stages[f"{p}d2d"].model.artifact.endswith(f"{p}adapter_init/model")
        assert stages[f"{p}preference"].model.artifact.endswith(f"{p}d2s/model")
    assert set(stages.compare.models) == {"teacher", "clip_mlp", "siglip", "ldp", "resampler", "modality"}


def test_students_recipe_runs_end_to_end(tmp_path, tiny_recipe):
    """Every student line trains through adapter init -> D2D -> D2S -> preference; the comparison has a row each."""
    run_pipeline(_students_cfg(tmp_path, tiny_recipe))
    rows = {r["model"]: r for r in json.loads((tmp_path / "compare" / "results.json").read_text())}
    assert set(rows) == {"teacher", "clip_mlp", "siglip", "ldp", "resampler", "modality"}
    patches = 16  # the tiny towers' 4x4 patch grid (conftest); LDP pools it 2x2, the resampler has 4 queries
    assert rows["clip_mlp"]["image_tokens"] == rows["siglip"]["image_tokens"] == patches
    assert rows["ldp"]["image_tokens"] == rows["resampler"]["image_tokens"] == 4
    assert rows["modality"]["params_total_m"] > rows["clip_mlp"]["params_total_m"]  # the visual experts
