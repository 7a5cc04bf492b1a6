"""The README's multi-GPU launch line works as written, on CPU: ``torchrun --nproc-per-node 2 -m distill ...
trainer.deepspeed=...`` (here without DeepSpeed, gloo) runs a main-process-only stage (the world, whose stand-ins
are trained with a Trainer) and then a training stage on both ranks, without hanging."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, tiny: list[str], *extra: str) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "distill", "recipe=demo", f"run.dir={run_dir}", *tiny, "pipeline=[world,teacher]", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_torchrun_two_processes_world_then_teacher_then_a_redo(tmp_path, tiny_recipe):
    _launch(tmp_path, tiny_recipe, "trainer.deepspeed=null")
    assert (tmp_path / "world" / "DONE").is_file() and (tmp_path / "teacher" / "DONE").is_file()
    assert (tmp_path / "teacher" / "model" / "model.safetensors").is_file()
    # A redo under the launcher: the main process removes the old output before any rank plans on it, and the
    # other rank follows the main process's plan (the world is skipped by both, the teacher redone by both).
    world, teacher = ((tmp_path / s / "DONE").read_text() for s in ("world", "teacher"))
    _launch(tmp_path, tiny_recipe, "trainer.deepspeed=null", "run.redo=[teacher]",
            "stages.teacher.training.learning_rate=0.005")
    assert (tmp_path / "world" / "DONE").read_text() == world
    assert (tmp_path / "teacher" / "DONE").read_text() != teacher
