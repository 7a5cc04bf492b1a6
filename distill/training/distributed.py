"""Multi-process training: where the frozen teacher lives, ZeRO-3 weights used outside their module, the final
artifact, and Slurm's task variables.

The student trains through the transformers ``Trainer`` and its DeepSpeed integration (a stage's
``training.deepspeed: recipes/deepspeed/zero3.json``); the teacher is not the Trainer's model, so the loss that
holds it places it, once the Trainer (and so its accelerator) exists (``loss_fn.prepare(trainer)``):

    teacher = prepare_teacher(teacher, trainer.accelerator)

- ZeRO-3: the teacher becomes an inference-only DeepSpeed engine partitioned across the ranks like the student
  (no optimizer; its dtype follows the student's bf16/fp16 setting), so no rank holds a full copy after setup.
- ZeRO-0/1/2: a plain replica on each rank in the student's dtype (a stage-0 engine: no optimizer, no partitioning).
- Without DeepSpeed (one process, DDP): moved to the accelerator's device; never wrapped in DDP (it has no
  gradients to reduce).

This is TRL's ``prepare_deepspeed`` (what its DPO / KTO / GKD trainers do with their reference and teacher models),
called as it is. The chunked KD loss applies both LM heads outside the models' forwards (distill/losses/kd.py):
under ZeRO-3 ``gathered`` collects those weights for the loss, and ``run_in_forward`` runs the loss as the student
engine's forward so that DeepSpeed reduces the student head's gradient (TRL's DistillationTrainer does the same).
``save_final`` writes the stage's artifact from rank 0, ZeRO-3 shards gathered; ``SlurmTorchEnv`` is the Hydra
callback of recipes/launcher/slurm.yaml.

    torchrun --nproc-per-node 2 -m distill recipe=<name> stages.d2d.training.deepspeed=recipes/deepspeed/zero3.json
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from hydra.experimental.callback import Callback
from transformers import ProcessorMixin, Trainer

from distill.models.student import save_processor

log = logging.getLogger(__name__)


def prepare_teacher(teacher: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The frozen teacher placed for the way the student trains (see the module docstring)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed

        from distill.models.fp8 import Fp8Linear

        if any(isinstance(m, Fp8Linear) for m in teacher.modules()):
            raise ValueError("teacher.fp8 does not combine with DeepSpeed (its engine would cast the fp8 weights); "
                             "turn one of them off")

        stage = accelerator.state.deepspeed_plugin.zero_stage
        engine = prepare_deepspeed(teacher, accelerator)
        log.info("teacher: %s", "partitioned across ranks (ZeRO-3)" if stage == 3 else
                 f"replicated on each rank in {engine.module.dtype} (ZeRO-{stage} student)")
        return engine
    return teacher.to(accelerator.device)


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ZeRO-3 parameter (its data lives in shards across the ranks)."""
    return hasattr(param, "ds_id")


def is_zero3_engine(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a DeepSpeed engine partitioning its module's parameters (ZeRO-3)."""
    ds = sys.modules.get("deepspeed")  # not imported: no engine can exist
    return ds is not None and isinstance(model, ds.DeepSpeedEngine) and model.zero_optimization_stage() == 3


@contextlib.contextmanager
def gathered(*params: torch.Tensor) -> Iterator[None]:
    """Inside the block, ZeRO-3-partitioned ``params`` hold their full data on every rank; others are untouched.

    Read-only gathering (``modifier_rank=None``). Parameters already gathered (e.g. a head tied to the
    embedding, kept by its module) are left alone: partitioning them on exit would pull them from under it.
    A gradient into a gathered parameter reaches ZeRO only when this runs inside the engine's forward
    (``run_in_forward``).
    """
    todo = {id(p): p for p in params if is_partitioned(p)}
    if todo:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        todo = {k: p for k, p in todo.items() if p.ds_status != ZeroParamStatus.AVAILABLE}
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None):
        yield


def run_in_forward(model: torch.nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; for a ZeRO-3 engine, run as that engine's forward pass.

    A loss that applies a weight outside its module (the chunked KD's LM head) and stores that weight's gradient
    in its forward needs this under ZeRO-3: DeepSpeed then treats the loss as the model's output and has the
    weight in place when the gradient lands, as for any module's weight. This is the forward redirection of
    PyTorch Lightning that TRL's DistillationTrainer uses for its chunked divergence. Inside ``fn`` the engine's
    module is called directly (its ``base_model``), not the engine.
    """
    if not is_zero3_engine(model):
        return fn(*args)
    module = unwrap(model)
    own = module.__dict__.get("forward")  # accelerate may have set one on the instance

    def restore() -> None:
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    def redirected(*inner: Any) -> Any:
        restore()  # fn may call the module's own forward
        return fn(*inner)

    module.forward = redirected
    try:
        return model(*args)
    finally:
        restore()


def save_final(trainer: Trainer, processor: ProcessorMixin, path: str | Path) -> Path:
    """The stage's artifact (safetensors + processor) from any setup, written by the main process only.

    Under ZeRO-3 every rank holds a shard: the weights are gathered onto rank 0 first (a collective, so every
    rank calls this). Under DeepSpeed the weights are those the engine trains, in its dtype (bf16 with
    ``training.bf16``). Every rank returns once the folder is complete, so the next stage can read it.
    """
    path = Path(path)
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_deepspeed_enabled else None
    if trainer.args.should_save:
        path.mkdir(parents=True, exist_ok=True)
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(path, state_dict=state, safe_serialization=True)
        save_processor(processor, path)
    trainer.accelerator.wait_for_everyone()
    return path


def local_device() -> torch.device:
    """This process's device before any Trainer exists: ``cuda:$LOCAL_RANK`` under a launcher (torchrun,
    accelerate, deepspeed all set it), ``cuda:0`` alone, ``cpu`` without a GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP / DeepSpeed wrapper (the model itself when unwrapped)."""
    return getattr(model, "module", model)


class SlurmTorchEnv(Callback):
    """Hydra callback for Slurm (recipes/launcher/slurm.yaml): before the pipeline starts in each Slurm task, export
    the variables torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    from Slurm's, with submitit's helper (the submitit launcher brings submitit). A single task, or a process
    started by torchrun / accelerate / deepspeed (RANK already set), is left alone."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
            return
        from submitit.helpers import TorchDistributedEnvironment

        # Every task keeps seeing all the node's GPUs: the Trainer picks cuda:LOCAL_RANK itself.
        env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        log.info("Slurm task %d of %d (local %d), master %s:%d", env.rank, env.world_size, env.local_rank,
                 env.master_addr, env.master_port)
