"""A changed recipe never silently reuses a finished stage: stale stages stop the run before any work, run.redo
reruns them and what reads them, logging-only changes still skip, the plan view tells run / resume / skip, and a
sweep gives each point its own results while sharing the stages upstream of the swept keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from distill.cli import RECIPES
from distill.pipeline import run_pipeline
from distill.plan import StaleStageError

ROOT = Path(__file__).parent.parent
TWO = "pipeline=[world,teacher]"


def _cfg(run_dir: Path, tiny: list[str], *extra: str):
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return compose("config", overrides=["recipe=demo", f"run.dir={run_dir}", *tiny, TWO, *extra])


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


_FINISHED: dict[str, Path] = {}


@pytest.fixture
def finished(tmp_path_factory, tiny_recipe) -> Path:
    """A world + teacher run, built once for the module (tiny_recipe is per test, so no module fixture)."""
    if "run" not in _FINISHED:
        _FINISHED["run"] = tmp_path_factory.mktemp("plan")
        run_pipeline(_cfg(_FINISHED["run"], tiny_recipe))
    return _FINISHED["run"]


def test_changed_setting_stops_before_any_work_and_redo_reruns(finished, tiny_recipe, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    for f in run_dir.rglob("settings.json"):  # the copy's paths: rewrite the recorded run folder
        f.write_text(f.read_text().replace(str(finished), str(run_dir)))
    world, teacher = run_dir / "world" / "metrics.json", run_dir / "teacher" / "metrics.json"
    before = _mtime(world), _mtime(teacher)
    lr = "stages.teacher.training.learning_rate=0.005"
    with pytest.raises(StaleStageError) as err:
        run_pipeline(_cfg(run_dir, tiny_recipe, lr))
    msg = str(err.value)
    assert "stage teacher" in msg and "training.learning_rate: 0.001 -> 0.005" in msg and "run.redo=[teacher]" in msg
    assert "stage world" not in msg and (_mtime(world), _mtime(teacher)) == before  # nothing ran

    # Logging, loader workers and checkpoint cadence do not change results: still skipped.
    run_pipeline(_cfg(run_dir, tiny_recipe, "trainer.logging_steps=7", "trainer.dataloader_num_workers=1"))
    assert (_mtime(world), _mtime(teacher)) == before

    # The plan view says what would happen and runs nothing.
    run_pipeline(_cfg(run_dir, tiny_recipe, lr, "run.plan=true"))
    out = capsys.readouterr().out
    assert "world           skip" in out and "teacher         stale" in out and (_mtime(teacher)) == before[1]

    # run.redo reruns it; the world is not touched.
    run_pipeline(_cfg(run_dir, tiny_recipe, lr, "run.redo=[teacher]"))
    assert _mtime(world) == before[0] and _mtime(teacher) != before[1]
    assert json.loads((run_dir / "teacher" / "settings.json").read_text())["settings"][
        "training.learning_rate"] == 0.005

    # Redoing the world makes the teacher, which reads it, redone too.
    run_pipeline(_cfg(run_dir, tiny_recipe, lr, "run.redo=[world]", "run.plan=true"))
    out = capsys.readouterr().out
    assert "world           redo" in out and "teacher         redo    reads world" in out


def test_interrupted_stage_resumes_only_with_its_settings(finished, tiny_recipe, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    for f in run_dir.rglob("settings.json"):
        f.write_text(f.read_text().replace(str(finished), str(run_dir)))
    (run_dir / "teacher" / "DONE").unlink()  # killed before it finished
    run_pipeline(_cfg(run_dir, tiny_recipe, "run.plan=true"))
    assert "teacher         resume  interrupted, same settings" in capsys.readouterr().out
    with pytest.raises(StaleStageError, match="interrupted; settings changed"):
        run_pipeline(_cfg(run_dir, tiny_recipe, "stages.teacher.training.learning_rate=0.005"))


def test_changed_data_file_makes_the_stage_stale(finished, tiny_recipe, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    for f in run_dir.rglob("settings.json"):
        f.write_text(f.read_text().replace(str(finished), str(run_dir)))
    captions = run_dir / "world" / "data" / "captions.json"
    # A data file outside the run folder is compared by size and modification time.
    data = tmp_path / "extra.json"
    data.write_text(captions.read_text())
    extra = f"stages.teacher.data.train=[{data}]"
    run_pipeline(_cfg(run_dir, tiny_recipe, extra, "run.redo=[teacher]"))
    data.write_text(data.read_text() + " ")
    with pytest.raises(StaleStageError, match=f"file {data}"):
        run_pipeline(_cfg(run_dir, tiny_recipe, extra))


def test_a_sweep_gives_each_point_its_teacher_and_shares_the_world(tmp_path, tiny_recipe):
    cmd = [sys.executable, "-m", "distill", "-m", "recipe=demo", f"run.dir={tmp_path}", *tiny_recipe, TWO,
           "stages.teacher.training.learning_rate=0.001,0.01"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = sorted((tmp_path / "sweep").iterdir())
    assert len(points) == 2 and all((p / "teacher" / "DONE").is_file() for p in points)
    worlds = [p / "world" for p in points]
    assert sum(w.is_symlink() for w in worlds) == 1 and worlds[0].resolve() == worlds[1].resolve()
    assert not any((p / "teacher").is_symlink() for p in points)
    from safetensors.torch import load_file

    a, b = (load_file(p / "teacher" / "model" / "model.safetensors") for p in points)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert {(p / "overrides.txt").read_text().count("learning_rate=0.0") for p in points} == {1}
    # The points read the same (linked) data files: checked once, in the base run folder's cache.
    assert not any((p / "cache").exists() for p in points)
    assert len(list((tmp_path / "cache" / "data").glob("captions-*/stats.json"))) == 1


def test_redoing_a_linked_stage_removes_only_the_link(tmp_path):
    from distill.plan import DONE, clear_outputs, settings_of

    shared = tmp_path / "point0" / "world"
    shared.mkdir(parents=True)
    (shared / DONE).write_text("stamp\n")
    link = tmp_path / "point1" / "world"
    link.parent.mkdir()
    link.symlink_to(shared, target_is_directory=True)
    clear_outputs(link)
    assert not link.exists() and not link.is_symlink() and (shared / DONE).read_text() == "stamp\n"
    # The run folder is rewritten as ${run.dir} only where it is the folder itself, not a longer name.
    assert settings_of({"a": f"{tmp_path}/run/x", "b": f"{tmp_path}/run2/x", "c": f"{tmp_path}/run"},
                       tmp_path / "run") == {"a": "${run.dir}/x", "b": f"{tmp_path}/run2/x", "c": "${run.dir}"}
