"""D2S's router losses give the same update for any split of a step's batch: batch 8 x accumulation 1, 2 x 4, and
2 processes (gloo, CPU) x batch 1 x accumulation 4.

Every record of the data is the same conversation, so every micro-batch routes alike and the per-micro-batch
load-balancing loss of any split must add up to the full batch's. One plain-SGD step at learning rate 1 makes the
update the gradient itself. Before the router terms were weighted by each micro-batch's share of the step's tokens,
2 x 4 moved the routers 4x as far as 8 x 1 (and processes multiplied it again).

This file is also the worker of the 2-process run (``torchrun --nproc-per-node 2 <this file> <out> <artifacts>
<data> <batch> <accumulation> <aux_coef> <z_coef>``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run_d2s(out: Path, artifacts: Path, data: Path, images: Path, batch: int, accumulation: int,
            aux_coef: float, z_coef: float) -> None:
    from distill.stages.sparse_imitation import SparseImitationConfig
    from distill.training.context import StageContext

    training = {"max_steps": 1, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
                "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
                "use_cpu": True, "report_to": "none", "save_strategy": "no", "logging_steps": 1,
                "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0, "ddp_find_unused_parameters": True}
    cfg = SparseImitationConfig(
        model={"artifact": str(artifacts / "student")}, teacher={"path": str(artifacts / "teacher")},
        data={"train": [str(data)], "image_root": str(images)},
        upcycle={"num_experts": 4, "top_k": 2, "layers": "all"}, alpha=0.5, aux_coef=aux_coef, z_coef=z_coef,
        training=training)
    cfg.run(StageContext(name="d2s", run_dir=out, training=cfg.training))


def _routers(path: Path) -> dict[str, torch.Tensor]:
    from distill.models.student import load_vlm

    return {n: p for n, p in load_vlm(path)[0].state_dict().items() if n.endswith("mlp.gate.weight")}


@pytest.fixture(scope="module")
def same_records(tiny_world, tmp_path_factory) -> Path:
    records = json.loads((tiny_world["data"] / "instruct.json").read_text())
    one = next(r for r in records if "image" in r)
    path = tmp_path_factory.mktemp("same") / "same.json"
    path.write_text(json.dumps([{**one, "id": f"copy{i}"} for i in range(8)]))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_router_update_is_the_same_for_any_split(tiny_artifacts, tiny_world, same_records, tmp_path):
    aux_coef, z_coef = 1.0, 1.0  # both router terms at full weight (each failed alone before the fix)
    args = (tiny_artifacts, same_records, tiny_world["images"])
    updates = {}
    for name, batch, acc in (("8x1", 8, 1), ("2x4", 2, 4)):
        run_d2s(tmp_path / name, *args, batch, acc, aux_coef, z_coef)
        updates[name] = _routers(tmp_path / name / "d2s" / "model")
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(Path(__file__)), str(tmp_path / "2proc"), *(str(a) for a in args), "1", "4", str(aux_coef), str(z_coef)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    updates["2procx4"] = _routers(tmp_path / "2proc" / "d2s" / "model")
    # The routers start from the same seeded init in every run, so equal weights after one step = equal updates.
    reference = updates["8x1"]
    init = _upcycled_routers(tiny_artifacts)
    for name in ("2x4", "2procx4"):
        for key, value in reference.items():
            moved = value - init[key]
            assert float(moved.abs().max()) > 1e-4, "the router loss moved nothing: the test would not see a bug"
            torch.testing.assert_close(updates[name][key] - init[key], moved, rtol=2e-3, atol=1e-6,
                                       msg=f"{name} {key}")


def _upcycled_routers(artifacts: Path) -> dict[str, torch.Tensor]:
    from distill.models.student import load_vlm
    from distill.models.upcycle import UpcycleConfig, upcycle

    moe = upcycle(load_vlm(artifacts / "student")[0], UpcycleConfig(num_experts=4, top_k=2, layers="all"))
    return {n: p for n, p in moe.state_dict().items() if n.endswith("mlp.gate.weight")}


if __name__ == "__main__":
    out, artifacts, data, images, batch, acc, aux, z = sys.argv[1:9]
    run_d2s(Path(out), Path(artifacts), Path(data), Path(images), int(batch), int(acc), float(aux), float(z))
