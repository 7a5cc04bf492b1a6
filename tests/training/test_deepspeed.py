"""DeepSpeed on CPU: the D2D stage on 2 processes (gloo, ``DS_ACCELERATOR=cpu``) under ZeRO-2, ZeRO-3 and
ZeRO-3-offload follows the loss curve of 1 process with twice the gradient accumulation, writes the same artifact,
and under ZeRO-3 keeps only a shard of the teacher on each rank; the preference stage (its LM heads applied
outside the forward, as the KD loss's) the same under ZeRO-3. Slow: seven launches (about 2 min once DeepSpeed's
CPU ops are built, a few minutes more the first time).

    .venv/bin/python -m pytest -q -m slow tests/training/test_deepspeed.py

This file is also the worker each run launches (``torchrun --nproc-per-node 2 tests/training/test_deepspeed.py
<out> <zero2|zero3|zero3_offload|none> <batch> <accumulation> <artifacts> [d2d|preference]``): it runs the
stage's own ``run``, and the Trainer writes the loss curve into its final checkpoint's trainer_state.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def worker(out: Path, zero: str, batch: int, accumulation: int, artifacts: Path, stage: str = "d2d") -> None:
    """One D2D or preference run (every rank runs this); each rank also writes what its teacher looked like."""
    import torch.distributed as dist
    from transformers import set_seed

    from distill.stages import imitation, preference
    from distill.training.context import StageContext
    from distill.training.distributed import is_partitioned, unwrap

    world = artifacts / "world"

    def record_teacher(teacher) -> None:
        params = list(unwrap(teacher).parameters())
        local = sum((p.ds_tensor if is_partitioned(p) else p).numel() for p in params)
        total = sum(p.ds_numel if is_partitioned(p) else p.numel() for p in params)
        rank = dist.get_rank() if dist.is_initialized() else 0
        (out / f"teacher_rank{rank}.json").write_text(json.dumps({"local": local, "total": total}))

    class RecordingKDLoss(imitation.KDLoss):
        def prepare(self, trainer) -> None:
            super().prepare(trainer)
            record_teacher(self.teacher)

    class RecordingPreferenceLoss(preference.PreferenceLoss):
        def prepare(self, trainer) -> None:
            super().prepare(trainer)
            record_teacher(self.teacher)

    imitation.KDLoss = RecordingKDLoss
    preference.PreferenceLoss = RecordingPreferenceLoss
    training = {
        "max_steps": STEPS, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
        "learning_rate": 5e-3, "lr_scheduler_type": "constant", "max_grad_norm": 1.0, "seed": 0,
        "use_cpu": True, "report_to": "none", "logging_steps": 1, "disable_tqdm": True,
        "dataloader_num_workers": 0, "dataloader_pin_memory": False,
        "save_strategy": "steps", "save_steps": STEPS,  # the final checkpoint carries the loss curve
    }
    if zero != "none":
        training["deepspeed"] = str(REPO / "recipes" / "deepspeed" / f"{zero}.json")
    out.mkdir(parents=True, exist_ok=True)
    models = {"model": {"artifact": str(artifacts / "student")}, "teacher": {"path": str(artifacts / "teacher")}}
    images = str(world / "data" / "images")
    if stage == "preference":  # the student is dense: train its LLM and projector
        cfg = preference.PreferenceConfig(
            **models, data={"train": [str(world / "data" / "preference.json")], "image_root": images},
            loss_type="kto_pair", nll_coef=0.5, trainable={"modes": {"projector": "full", "llm": "full"}},
            training=training)
    else:
        cfg = imitation.ImitationConfig(
            **models, data={"train": [str(world / "data" / "instruct.json")], "image_root": images},
            alpha=0.5, training=training)
    set_seed(0)
    cfg.run(StageContext(name=stage, run_dir=out, training=cfg.training))
    if dist.is_initialized():  # leave together: a rank that exits while the other still talks to it aborts it
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, zero: str, nproc: int, batch: int, accumulation: int, artifacts: Path,
            stage: str = "d2d") -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [str(Path(__file__)), str(out), zero, str(batch), str(accumulation), str(artifacts), stage]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    state = json.loads((out / stage / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def artifacts(tiny_world, tiny_artifacts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds_artifacts")
    for name in ("teacher", "student"):
        (root / name).symlink_to(tiny_artifacts / name)
    (root / "world").symlink_to(tiny_world["data"].parent)
    return root


_REFERENCES: dict[str, tuple[list[dict], Path]] = {}


@pytest.fixture(scope="module")
def reference(artifacts, tmp_path_factory):
    """One process, no DeepSpeed, batch 4 x accumulation 2, per stage (launched once each)."""
    def run(stage: str) -> tuple[list[dict], Path]:
        if stage not in _REFERENCES:
            out = tmp_path_factory.mktemp(f"ds_reference_{stage}")
            _REFERENCES[stage] = _launch(out, "none", 1, 4, 2, artifacts, stage), out / stage / "model"
        return _REFERENCES[stage]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("zero,stage", [("zero2", "d2d"), ("zero3", "d2d"), ("zero3_offload", "d2d"),
                                        ("zero3", "preference")])
def test_two_processes_follow_one_with_twice_the_accumulation(zero, stage, artifacts, reference, tmp_path):
    import torch

    from distill.models.student import load_vlm

    ref_curve, ref_model = reference(stage)
    curve = _launch(tmp_path, zero, 2, 4, 1, artifacts, stage)
    assert [h["step"] for h in curve] == [h["step"] for h in ref_curve] == list(range(1, STEPS + 1))
    for ours, ref in zip(curve, ref_curve):
        assert ours["num_input_tokens_seen"] == ref["num_input_tokens_seen"]
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-4), (curve, ref_curve)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3), (curve, ref_curve)
    assert curve[-1]["loss"] < curve[0]["loss"]

    # The artifact: a full model (ZeRO-3 shards gathered), equal to the one-process run's within tolerance.
    theirs, ours = load_vlm(ref_model)[0].state_dict(), load_vlm(tmp_path / stage / "model")[0].state_dict()
    assert theirs.keys() == ours.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5, msg=name)

    teacher = [json.loads((tmp_path / f"teacher_rank{r}.json").read_text()) for r in (0, 1)]
    for rank in teacher:
        if zero.startswith("zero3"):  # each rank holds about half the teacher (shards are padded to equal sizes)
            assert rank["local"] < 0.55 * rank["total"]
        else:
            assert rank["local"] == rank["total"]


def test_deepspeed_configs_leave_the_trainer_settings_to_the_trainer():
    for name, stage in {"zero2": 2, "zero3": 3, "zero3_offload": 3}.items():
        cfg = json.loads((REPO / "recipes" / "deepspeed" / f"{name}.json").read_text())
        assert cfg["zero_optimization"]["stage"] == stage
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                    "gradient_clipping"):
            assert cfg[key] == "auto", (name, key)
        assert cfg["bf16"]["enabled"] == "auto"
        # No scheduler block: the Trainer's own (lr_scheduler_type, warm-up) stays in charge.
        assert "scheduler" not in cfg


def test_without_deepspeed_the_helpers_do_nothing():
    import torch

    from distill.training.distributed import gathered, is_zero3_engine, run_in_forward, unwrap

    model = torch.nn.Linear(3, 2)
    assert not is_zero3_engine(model) and unwrap(model) is model
    with gathered(model.weight):
        assert model.weight.shape == (2, 3)
    assert run_in_forward(model, lambda m, x: m(x).sum(), model, torch.ones(1, 3)).shape == ()
    assert "forward" not in model.__dict__


def test_slurm_tasks_become_torch_distributed_ranks(monkeypatch):
    import types

    from distill.training.distributed import SlurmTorchEnv

    exported = []

    class FakeEnvironment:  # submitit.helpers.TorchDistributedEnvironment, as far as the callback uses it
        rank, world_size, local_rank, master_addr, master_port = 3, 16, 3, "node1", 29500

        def export(self, set_cuda_visible_devices: bool):
            exported.append(set_cuda_visible_devices)
            return self

    helpers = types.ModuleType("submitit.helpers")
    helpers.TorchDistributedEnvironment = FakeEnvironment
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))
    monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    SlurmTorchEnv().on_job_start(config=None)
    assert exported == []  # one task: nothing distributed
    monkeypatch.setenv("SLURM_NTASKS", "16")
    SlurmTorchEnv().on_job_start(config=None)
    assert exported == [False]  # every task keeps all the node's GPUs
    monkeypatch.setenv("RANK", "0")  # started by torchrun: its variables stay
    SlurmTorchEnv().on_job_start(config=None)
    assert exported == [False]


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]), *sys.argv[6:])
