"""The real entry point trains D2D on the LLaVA-JSON demo data from a teacher of another architecture (a tiny
Qwen2-VL: its own processor, chat template, image-token layout and 3-D rope) than the Llava student."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from data_prep.tiny_families import build_family

ROOT = Path(__file__).parent.parent


def _distill(run_dir: Path, tiny: list[str], *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distill", "recipe=demo", f"run.dir={run_dir}", *tiny, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_d2d_with_a_qwen2_vl_teacher(tmp_path, tiny_recipe):
    _distill(tmp_path, tiny_recipe, "pipeline=[world,adapter_init]")
    teacher = build_family("qwen2_vl", tmp_path / "qwen2_vl_teacher", tmp_path / "world" / "tokenizer")
    _distill(tmp_path, tiny_recipe, "pipeline=[d2d]", f"stages.d2d.teacher.path={teacher}")
    assert (tmp_path / "d2d" / "DONE").is_file()
    metrics = json.loads((tmp_path / "d2d" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert (tmp_path / "d2d" / "model" / "model.safetensors").is_file()
