"""Experiment tracking: one wandb run per stage (offline without an API key, resumable), throughput, MFU and
expert load in the training logs, and evaluation tables / sample galleries.

The Trainer's own ``WandbCallback`` (``report_to: wandb``) does the logging; this module only prepares it:

    args = training_arguments({**ctx.training, **tracking_arguments(ctx, ctx.training)}, ctx.checkpoint_dir)
    trainer = DistillTrainer(model=model, args=args, ...)
    add_tracking(trainer)             # perf/tokens_per_s, perf/mfu (and moe/load_*) in every training log
    trainer.train(resume_from_checkpoint=...)
    finish_wandb()                    # the WandbCallback leaves its run open; close it before the next stage

Runs land under ``runs/<run>/wandb``; the pipeline run is the wandb group, the stage the job type, and the run
is named ``<run>/<stage>``. A stage's run id is drawn once and kept in ``<stage dir>/wandb_run_id``, so a resumed
stage appends to the same wandb run. In wandb the Trainer prefixes training keys with ``train/``
(``train/perf/tokens_per_s``); ``trainer.state.log_history`` has them as added here (``perf/tokens_per_s``).
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import Trainer, TrainerCallback

from distill.losses.router import expert_load
from distill.models.upcycle import moe_blocks, parameter_counts
from distill.training.context import StageContext
from distill.training.moe import RouterRecorder

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "distill"
RUN_ID_FILE = "wandb_run_id"
STAGE_ENV = ("WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_RUN_ID",
             "WANDB_RESUME")
"""What wandb.init reads from the environment when the WandbCallback starts a run (transformers itself reads
only WANDB_PROJECT, and passes ``TrainingArguments.run_name`` as the run's name)."""
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
"""Dense bf16 tensor-core peak FLOP/s of one device, by a substring of its CUDA name (most specific first)."""

_owned: dict[str, str] = {}
"""The WANDB_* values this module set, so that the next stage can tell them from the user's own settings."""


# ---- the wandb run of a stage ----


def reports_to_wandb(training: dict[str, Any]) -> bool:
    report_to = training.get("report_to") or []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return "wandb" in names or "all" in names


def has_api_key() -> bool:
    """A wandb key in WANDB_API_KEY or in ~/.netrc for the wandb host (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def stage_run_id(stage_dir: Path) -> str:
    """The stage's wandb run id: read from ``<stage dir>/wandb_run_id``, drawn and written (atomically) once."""
    path = stage_dir / RUN_ID_FILE
    if path.is_file() and (run_id := path.read_text().strip()):
        return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def _user_value(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or _owned.get(name) == value else value


def _apply_env(values: dict[str, str]) -> None:
    """Set ``values``; unset what an earlier call set and this one does not. The user's own settings stay."""
    for name in STAGE_ENV:
        ours = _owned.pop(name, None)
        if name in values:
            os.environ[name] = _owned[name] = values[name]
        elif ours is not None and os.environ.get(name) == ours:
            del os.environ[name]


def configure_wandb(ctx: StageContext, training: dict[str, Any]) -> dict[str, Any]:
    """Point the Trainer's WandbCallback at this stage's run; returns the TrainingArguments changes for it.

    Off (nothing set, ``{}`` returned) unless ``training.report_to`` names ``wandb`` (or ``all``). Mode: the
    user's WANDB_MODE if set, else ``online`` with an API key and ``offline`` without. The user's WANDB_PROJECT
    wins over ``distill``; directory, group, job type, run id and resume are always the stage's. Any wandb run
    still open (an earlier stage's) is finished first. Only the main process draws the run id (others never
    start a run).
    """
    finish_wandb()
    if not reports_to_wandb(training):
        _apply_env({})
        return {}
    env = {"WANDB_DIR": str(ctx.run_dir.resolve()), "WANDB_RUN_GROUP": ctx.run_dir.name, "WANDB_JOB_TYPE": ctx.name}
    if int(os.environ.get("RANK", "0")) == 0:
        env |= {"WANDB_RUN_ID": stage_run_id(ctx.dir), "WANDB_RESUME": "allow"}
    if _user_value("WANDB_PROJECT") is None:
        env["WANDB_PROJECT"] = DEFAULT_PROJECT
    if _user_value("WANDB_MODE") is None:
        env["WANDB_MODE"] = "online" if has_api_key() else "offline"
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    _apply_env(env)
    log.info("wandb: %s run %s (id %s) under %s", os.environ["WANDB_MODE"], ctx.name, env.get("WANDB_RUN_ID"),
             env["WANDB_DIR"])
    return {} if training.get("run_name") else {"run_name": f"{ctx.run_dir.name}/{ctx.name}"}


def tracking_arguments(ctx: StageContext, training: dict[str, Any]) -> dict[str, Any]:
    """All TrainingArguments changes for tracking: the Trainer counts non-padding tokens (for perf/*), plus
    :func:`configure_wandb`'s. Merge them over the stage's ``training`` block."""
    changes = configure_wandb(ctx, training)
    if training.get("include_num_input_tokens_seen", "no") in ("no", False):
        changes["include_num_input_tokens_seen"] = "non_padding"
    return changes


def start_wandb_run(ctx: StageContext, report_to: str | list[str] | None) -> bool:
    """Open the stage's wandb run (before the Trainer, whose WandbCallback then uses it); False when off.

    Everything is passed to ``wandb.init`` explicitly: wandb reads its environment once per process, so a later
    stage relying on WANDB_RUN_ID & co. would be logged into the first stage's run.
    """
    changes = configure_wandb(ctx, {"report_to": report_to})
    if not reports_to_wandb({"report_to": report_to}) or int(os.environ.get("RANK", "0")) != 0:
        return False
    import wandb

    env = os.environ
    wandb.init(name=changes.get("run_name", f"{ctx.run_dir.name}/{ctx.name}"), id=env["WANDB_RUN_ID"],
               resume="allow", project=env["WANDB_PROJECT"], group=env["WANDB_RUN_GROUP"],
               job_type=env["WANDB_JOB_TYPE"], dir=env["WANDB_DIR"], mode=env["WANDB_MODE"])
    return True


def finish_wandb() -> None:
    """Close the open wandb run, if any (the WandbCallback leaves it open after training)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _active_run() -> Any:
    wandb = sys.modules.get("wandb")
    return None if wandb is None else wandb.run


def log_eval_table(rows: list[dict[str, Any]], key: str = "eval/results") -> bool:
    """Log evaluation rows (one dict per model) as a wandb.Table into the open run; False (a no-op) without one."""
    run = _active_run()
    if run is None or not rows:
        return False
    import wandb

    columns = list(dict.fromkeys(k for row in rows for k in row))
    run.log({key: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})
    return True


def log_samples(samples: list[tuple[str | Path, str, str]], key: str = "samples") -> bool:
    """Log ``(image path, question, answer)`` triples as a wandb.Table with images; False without an open run."""
    run = _active_run()
    if run is None or not samples:
        return False
    import wandb

    data = [[wandb.Image(str(image)), question, answer] for image, question, answer in samples]
    run.log({key: wandb.Table(columns=["image", "question", "answer"], data=data)})
    return True


# ---- keys added to the training logs ----


def _add_to_log(logs: dict[str, float], state: Any, extra: dict[str, float]) -> None:
    """Add ``extra`` to the log being emitted and to its copy in ``state.log_history`` (the Trainer appends that
    copy just before calling ``on_log``)."""
    logs.update(extra)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(extra)


class ThroughputCallback(TrainerCallback):
    """``perf/tokens_per_s`` (and ``perf/mfu`` when a peak FLOP/s is known) over the steps since the last log.

    The Trainer counts the tokens (``include_num_input_tokens_seen="non_padding"``: the attention mask's sum of
    every micro-batch, summed over processes, restored on resume); this callback divides their increase by the
    wall time. Evaluation and checkpoint saving restart the window, so they do not count as training time.
    MFU = 6 * N * tokens/s / (peak FLOP/s * devices), N the parameters active per token: the usual estimate,
    which leaves out attention's FLOPs, the savings of frozen parts, and the teacher's forward pass.
    """

    def __init__(self, n_params: int, peak_flops: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.n_params, self.peak_flops, self.clock = n_params, peak_flops, clock
        self._since, self._tokens = clock(), 0

    def _restart(self, state: Any) -> None:
        self._since, self._tokens = self.clock(), state.num_input_tokens_seen

    def on_train_begin(self, args, state, control, **kwargs):
        if args.include_num_input_tokens_seen == "no":
            log.warning("include_num_input_tokens_seen is off: perf/tokens_per_s and perf/mfu will not be logged")
        self._restart(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._restart(state)

    def on_save(self, args, state, control, **kwargs):
        self._restart(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or args.include_num_input_tokens_seen == "no":
            return
        seconds = self.clock() - self._since
        if seconds <= 0:
            return
        tokens_per_s = (state.num_input_tokens_seen - self._tokens) / seconds
        extra = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            extra["perf/mfu"] = 6 * self.n_params * tokens_per_s / (self.peak_flops * args.world_size)
        _add_to_log(logs, state, extra)
        self._restart(state)


class ExpertLoadCallback(TrainerCallback):
    """``moe/load_L<layer>_e<expert>``: each expert's share of its layer's top-k assignments on the non-padding
    tokens of the training forward passes since the last log (a layer's shares sum to 1).

    Owns a :class:`RouterRecorder` and a forward hook on the model that reads the recorder and the call's
    ``attention_mask`` after each training forward pass; both are removed when training ends.
    """

    def __init__(self, model: torch.nn.Module, top_k: int) -> None:
        self.model, self.top_k = model, top_k
        self.recorder: RouterRecorder | None = None
        self._hook: Any = None
        self._sum: torch.Tensor | None = None
        self._passes = 0

    def _after_forward(self, module, args, kwargs, output) -> None:
        router_logits = self.recorder.take_valid(kwargs.get("attention_mask"))
        if module.training and router_logits:
            load = expert_load(router_logits, self.top_k)
            self._sum = load if self._sum is None else self._sum + load
            self._passes += 1

    def on_train_begin(self, args, state, control, **kwargs):
        self.recorder = RouterRecorder(self.model)
        self._hook = self.model.register_forward_hook(self._after_forward, with_kwargs=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._passes:
            return
        load = (self._sum / self._passes).cpu()
        layers = [i for i, _ in self.recorder.blocks]
        _add_to_log(logs, state, {f"moe/load_L{layer}_e{e}": float(load[row, e])
                                  for row, layer in enumerate(layers) for e in range(load.size(1))})
        self._sum, self._passes = None, 0

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.remove()
            self._hook.remove()
            self.recorder = None


def device_peak_flops() -> float | None:
    """The current CUDA device's dense bf16 peak FLOP/s from :data:`PEAK_FLOPS`; None on CPU or unknown GPUs."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def _moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    try:
        return moe_blocks(model)
    except AttributeError:  # not a Llava-style model
        return []


class ProgressLine(TrainerCallback):
    """One line per log step when the Trainer's progress bar is off (CPU runs, output that is not a terminal):
    the stage, step / total, percent, elapsed and the estimated time left."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.start: float | None = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not args.disable_tqdm or self.start is None or not state.max_steps or not state.is_world_process_zero:
            return
        done = state.global_step - self.first_step
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
        shown = {k: v for k, v in (logs or {}).items() if (k == "loss" or (k.startswith("loss/") and k.count("/") == 1)
                                                           or k in ("grad_norm", "learning_rate"))}
        metrics = "".join(f", {k} {v:.4g}" for k, v in shown.items() if isinstance(v, int | float))
        log.info("%s: step %d/%d (%.0f%%), %s elapsed, about %s left%s", self.stage, state.global_step,
                 state.max_steps, 100 * state.global_step / state.max_steps, _clock(elapsed), _clock(left), metrics)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def tracking_callbacks(model: torch.nn.Module, peak_flops: float | None = None,
                       moe: bool = True) -> list[TrainerCallback]:
    """Throughput/MFU for any model; expert load for an MoE student unless ``moe`` is off (e.g. where
    the loss logs it already). ``peak_flops`` defaults to the device's (:func:`device_peak_flops`)."""
    blocks = _moe_blocks(model)
    top_k = model.config.text_config.num_experts_per_tok if blocks else 0
    n_active = parameter_counts(model, top_k)[1] if blocks else sum(p.numel() for p in model.parameters())
    callbacks: list[TrainerCallback] = [ThroughputCallback(n_active, peak_flops or device_peak_flops())]
    if blocks and moe:
        callbacks.append(ExpertLoadCallback(model, top_k))
    return callbacks


def add_tracking(trainer: Trainer, peak_flops: float | None = None, moe: bool = True) -> list[TrainerCallback]:
    """Put :func:`tracking_callbacks` FIRST among the trainer's callbacks: the keys they add to a log reach only
    the callbacks after them (WandbCallback, the progress bar), and ``Trainer(callbacks=...)`` appends."""
    callbacks = tracking_callbacks(trainer.model, peak_flops, moe)
    trainer.callback_handler.callbacks[:0] = callbacks
    return callbacks
