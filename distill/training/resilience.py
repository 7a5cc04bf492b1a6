"""What keeps a long job alive: checked checkpoints, preemption, non-finite losses, and fault injection for tests.

- ``last_checkpoint(dir)``: the newest *complete and readable* ``checkpoint-N``; a corrupt one is skipped with a
  warning (the Trainer writes checkpoints into ``.staging/`` and renames them into place, see ``DistillTrainer``,
  so an interrupted write never looks complete; a stale ``.staging/`` is cleared here).
- ``PreemptionCallback``: SIGTERM (a cluster's preemption notice) makes the Trainer write a checkpoint at the end
  of the current step and stop; ``train`` then raises ``Preempted`` so the stage is not marked done. Data-loader
  workers leave SIGTERM to the main process (``DeferSigterm``): a notice sent to the whole process group
  (`scancel`, `timeout`) would otherwise kill them and crash the step before the checkpoint.
- ``NonFiniteLossError``: raised once more than ``max_nonfinite_losses`` micro-batches had a NaN/Inf loss.
- ``DISTILL_FAULT=step:N`` / ``checkpoint_write:N``: SIGKILL this process after optimizer step N, or after the
  checkpoint of step N is written but before it is published. Only the resume tests set it.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import TrainerCallback

log = logging.getLogger(__name__)

STAGING = ".staging"
STATE_FILE = "model_state.safetensors"
"""A checkpoint's weights under the model's own parameter names (see ``DistillTrainer``)."""
FAULT_ENV = "DISTILL_FAULT"


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint; rerun the same command to resume."""


class NonFiniteLossError(RuntimeError):
    pass


def fault_point(point: str, step: int) -> None:
    """Kill this process (SIGKILL: no cleanup, like a crashed node) if ``DISTILL_FAULT`` names this point."""
    if os.environ.get(FAULT_ENV) == f"{point}:{step}":
        log.warning("fault injection: SIGKILL at %s %d", point, step)
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None when its state, weights and optimizer all read back."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json unreadable ({err})"
    if state.get("global_step") != int(path.name.split("-")[-1]):
        return f"trainer_state.json says step {state.get('global_step')}"
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("global_step*")):  # DeepSpeed keeps its own layout
        return "no model weights"
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    f.get_slice(key)
        except Exception as err:  # noqa: BLE001 - any parse failure means corrupt
            return f"{file.name} unreadable ({err})"
    if not (path / "optimizer.pt").is_file() and not any(path.glob("global_step*")):
        return "no optimizer state"
    return None


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete, readable ``checkpoint-N`` under ``output_dir``; corrupt ones are skipped loudly."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    staging = output_dir / STAGING
    if staging.is_dir() and any(staging.iterdir()):
        log.warning("removing an interrupted checkpoint write: %s", sorted(p.name for p in staging.iterdir()))
        shutil.rmtree(staging)
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


_EXITING: dict[str, Any] = {}  # per start method: a shared flag set once this process begins to exit


def _exiting_flag(context: Any) -> Any:
    """A lock-free shared boolean (a signal handler must not take a lock) for workers of ``context``'s start
    method, set by an atexit hook. atexit runs its hooks last-registered first: this one runs before
    multiprocessing's own (registered when it was imported), which terminates the remaining workers and waits."""
    method = context.get_start_method()
    if method not in _EXITING:
        flag = _EXITING[method] = context.RawValue(ctypes.c_bool, False)
        atexit.register(setattr, flag, "value", True)
    return _EXITING[method]


class DeferSigterm:
    """A data-loader ``worker_init_fn``: the worker leaves SIGTERM to the main process, then runs ``inner``.

    A preemption notice sent to the whole process group (`scancel`, `timeout`) would otherwise kill the workers,
    and the main process's data loader raises as soon as one dies, in the middle of the step the checkpoint waits
    for. The main process handles the notice (``PreemptionCallback``) and stops its workers itself. Once it is
    exiting (``exiting`` set by an atexit hook), SIGTERM ends a worker quietly (exit 0, as PyTorch's own worker
    handler does), so a loader still alive at exit cannot hang the process; a worker whose main process died exits
    by itself (PyTorch's watchdog). A worker that gets SIGTERM before this runs (while starting) still dies."""

    def __init__(self, inner: Any, exiting: Any) -> None:
        self.inner = inner
        self.exiting = exiting

    @classmethod
    def wrap(cls, loader: Any) -> None:
        """Install on ``loader`` (a torch DataLoader with workers)."""
        context = loader.multiprocessing_context or multiprocessing.get_context()
        loader.worker_init_fn = cls(loader.worker_init_fn, _exiting_flag(context))

    def __call__(self, worker_id: int) -> None:
        exiting = self.exiting

        def on_sigterm(signum: int, frame: Any) -> None:
            if exiting.value:
                os._exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)
        if self.inner is not None:
            self.inner(worker_id)


class PreemptionCallback(TrainerCallback):
    """On SIGTERM: finish the current optimizer step, write a checkpoint, stop. Every rank stops at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.preempted_at: int | None = None
        self._previous = None

    def _handler(self, signum, frame) -> None:
        log.warning("SIGTERM received: writing a checkpoint at the end of this step, then stopping")
        self.requested = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([float(flag)], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            control.should_save = True
            control.should_training_stop = True
            self.preempted_at = state.global_step
        fault_point("step", state.global_step)
        return control
