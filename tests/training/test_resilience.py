"""Killed, preempted and NaN-struck jobs: staged checkpoints, corrupt-checkpoint skipping, SIGTERM, SIGKILL resume."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from distill.training.resilience import STAGING, STATE_FILE, NonFiniteLossError, checkpoint_problem, last_checkpoint
from distill.training.trainer import DistillTrainer, training_arguments

REPO = Path(__file__).resolve().parents[2]


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return ((self.lin(x).squeeze(-1) - y) ** 2).mean()


def _collate(rows):
    return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}


def _trainer(tmp_path: Path, cpu_training: dict, nan_calls=frozenset(), **training) -> DistillTrainer:
    """A linear regression through DistillTrainer; the loss is NaN on the micro-batches numbered in nan_calls."""
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"x": torch.randn(4, generator=g).tolist(), "y": float(i % 3)} for i in range(64)])
    calls = iter(range(1 << 30))

    def loss_fn(model, inputs, num_items_in_batch):
        loss = model(inputs["x"], inputs["y"])
        if next(calls) in nan_calls:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}

    args, ours = training_arguments({**cpu_training, **training}, tmp_path / "checkpoints")
    return DistillTrainer(model=_Tiny(), args=args, train_dataset=data, data_collator=_collate, loss_fn=loss_fn,
                          token_normalised=False, max_nonfinite_losses=ours["max_nonfinite_losses"])


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, cpu_training):
    clean = _trainer(tmp_path / "clean", cpu_training, max_steps=8)
    clean.train()
    trainer = _trainer(tmp_path / "a", cpu_training, nan_calls={1, 5}, max_nonfinite_losses=2, max_steps=8)
    trainer.train()
    assert trainer.nonfinite_losses == 2
    assert trainer.state.global_step == 8
    for p, q in zip(trainer.model.parameters(), clean.model.parameters()):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, q)  # two batches did not contribute
    assert any(h.get("nonfinite_losses") == 2 for h in trainer.state.log_history)

    # NaN from step 3 on: steps 3 and 4 are skipped (their checkpoint-4 holds step 2's weights), step 5 stops.
    doomed = _trainer(tmp_path / "b", cpu_training, nan_calls=set(range(2, 100)), max_nonfinite_losses=2,
                      max_steps=8, save_strategy="steps", save_steps=2)
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_losses=2"):
        doomed.train()
    assert doomed.nonfinite_losses == 3
    good = last_checkpoint(tmp_path / "b" / "checkpoints")
    assert good is not None and good.endswith("checkpoint-4")


def test_checkpoints_are_staged_rotated_and_checked(tmp_path, cpu_training, caplog):
    trainer = _trainer(tmp_path, cpu_training, max_steps=6, per_device_train_batch_size=4, save_strategy="steps",
                       save_steps=2, save_total_limit=2)
    trainer.train()
    out = tmp_path / "checkpoints"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not any((out / STAGING).iterdir())
    assert last_checkpoint(out) == str(out / "checkpoint-6")

    # A torn weights file in the newest checkpoint: skipped with a warning, the previous one is used.
    weights = out / "checkpoint-6" / STATE_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "unreadable" in checkpoint_problem(out / "checkpoint-6")
    # An interrupted write left in staging is cleared, never used.
    (out / STAGING / "checkpoint-8").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="distill.training.resilience"):
        assert last_checkpoint(out) == str(out / "checkpoint-4")
    assert "skipping checkpoint" in caplog.text and "interrupted checkpoint write" in caplog.text
    assert not (out / STAGING).exists()


def _cli(run_dir: Path, world: Path, tiny: list[str], *extra: str, fault: str | None = None, **popen):
    env = {**os.environ, "DISTILL_FAULT": fault or ""}
    cmd = [sys.executable, "-m", "distill", "recipe=demo", f"run.dir={run_dir}", f"world_dir={world}",
           "pipeline=[teacher]", *tiny, "trainer.save_strategy=steps", "trainer.save_steps=2",
           "trainer.save_total_limit=2", "trainer.lr_scheduler_type=constant", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _finish(proc) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def test_sigkill_anywhere_then_resume_gives_identical_weights(tmp_path, tiny_world, tiny_recipe):
    steps = ["trainer.max_steps=8"]
    code, out = _finish(_cli(tmp_path / "ref", tiny_world["root"], tiny_recipe, *steps))
    assert code == 0, out[-3000:]
    reference = (tmp_path / "ref" / "teacher" / "model" / "model.safetensors").read_bytes()

    run = tmp_path / "killed"
    code, out = _finish(_cli(run, tiny_world["root"], tiny_recipe, *steps, fault="step:3"))
    assert code == -signal.SIGKILL, out[-3000:]
    assert not (run / "teacher" / "DONE").exists()
    assert last_checkpoint(run / "teacher" / "checkpoints").endswith("checkpoint-2")

    code, out = _finish(_cli(run, tiny_world["root"], tiny_recipe, *steps, fault="checkpoint_write:6"))
    assert code == -signal.SIGKILL, out[-3000:]
    ckpt = run / "teacher" / "checkpoints"
    assert (ckpt / STAGING / "checkpoint-6").is_dir() and not (ckpt / "checkpoint-6").exists()

    code, out = _finish(_cli(run, tiny_world["root"], tiny_recipe, *steps))
    assert code == 0, out[-3000:]
    assert "resuming teacher from" in out and "checkpoint-4" in out
    assert (run / "teacher" / "DONE").is_file()
    assert (run / "teacher" / "model" / "model.safetensors").read_bytes() == reference


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path, tiny_world, tiny_recipe, target):
    """SIGTERM to the main process, or to its whole process group (`scancel`, `timeout`), data-loader workers
    included: either way a checkpoint, not a crash."""
    run = tmp_path / "preempted"
    proc = _cli(run, tiny_world["root"], tiny_recipe, "trainer.max_steps=400", "trainer.save_steps=1000",
                "trainer.dataloader_num_workers=1", "trainer.disable_tqdm=true", start_new_session=True)
    for line in proc.stdout:  # the first progress line means the Trainer (and its SIGTERM handler) is running
        if "teacher: step " in line:
            break
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 143, out[-3000:]
    assert "stopped on SIGTERM" in out
    ckpt = last_checkpoint(run / "teacher" / "checkpoints")
    assert ckpt is not None and 0 < int(ckpt.split("-")[-1]) < 400
    assert not (run / "teacher" / "DONE").exists()  # resuming from it is what the SIGKILL test checks


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_data_loader_workers_still_exit_with_the_process(tmp_path, context):
    """Workers that leave SIGTERM to the main process must not keep it from exiting, nor make it fail on the way
    out: a loader still iterating when the process ends (an exception out of the training loop) is shut down as
    usual."""
    script = tmp_path / "lingering.py"
    script.write_text(
        "import signal, sys, torch\n"
        "from datasets import Dataset\n"
        "from distill.training.trainer import DistillTrainer, training_arguments\n"
        "def collate(rows):\n"
        "    return {'x': torch.tensor([[float(signal.getsignal(signal.SIGTERM) not in (0, signal.SIG_DFL))]])}\n"
        "if __name__ == '__main__':\n"
        "    args, _ = training_arguments({'max_steps': 1, 'per_device_train_batch_size': 1, 'use_cpu': True,\n"
        "        'report_to': 'none', 'dataloader_num_workers': 4,\n"
        "        'dataloader_multiprocessing_context': sys.argv[2]}, sys.argv[1])\n"
        "    t = DistillTrainer(model=torch.nn.Linear(1, 1), args=args, loss_fn=None, token_normalised=False,\n"
        "        train_dataset=Dataset.from_list([{'n': i} for i in range(8)]), data_collator=collate)\n"
        "    it = iter(t.get_train_dataloader())\n"
        "    print('worker handles SIGTERM:', bool(next(it)['x'].item()), flush=True)\n"
        "    raise SystemExit(3)  # exits with the iterator and its workers alive\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), context], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "worker handles SIGTERM: True" in proc.stdout
    if context == "fork":  # a spawned worker still importing at exit can die by the signal, with or without us
        assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr, proc.stderr[-3000:]
