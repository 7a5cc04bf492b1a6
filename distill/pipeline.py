"""Runs a recipe's stages in order. Each stage writes ``<run.dir>/<stage>/`` and a ``DONE`` marker last.

Under a multi-process launch only rank 0 writes the pipeline's files; stages whose config class sets
``main_process_only`` (world, eval) run on rank 0 while the other ranks wait for their DONE marker.

Before any stage runs, the run is planned (distill/plan.py): a rerun of the same recipe skips every finished stage
and resumes an interrupted one from its last Trainer checkpoint, but a stage whose recorded settings or inputs
differ from the recipe's stops the run with a message naming them (``run.redo=[stage]`` reruns it and the stages
that read its output; ``run.plan=true`` only prints the plan). Stage configs are built from the recipe with hydra's
``instantiate`` (each stage's ``_target_`` is its config dataclass) and validated before the stage starts.

In a hydra multirun (``-m``), each sweep point runs in ``<run.dir>/sweep/<job number>-<overrides hash>/``, and a
stage whose settings and inputs equal a finished one of another point (or of ``<run.dir>`` itself) links to it
instead of running again: a sweep over ``stages.d2d.alpha`` builds the world, the teacher and adapter init once.

    run_pipeline(cfg)      # cfg: the composed hydra config (see recipes/config.yaml)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from distill.paths import pending
from distill.plan import (
    SETTINGS,
    StagePlan,
    clear_outputs,
    find_shared,
    format_plan,
    inputs_of,
    make_plan,
    record,
    settings_of,
)
from distill.training.context import StageContext

log = logging.getLogger(__name__)

DONE = "DONE"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate / deepspeed launch (or a plain single process)."""
    return int(os.environ.get("RANK", "0")) == 0


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """Hide the launcher's variables while the main process runs a stage alone: a Trainer inside it (the world
    stage trains its stand-ins) would otherwise join the process group that the waiting ranks never enter, and the
    launch would hang."""
    from accelerate.state import AcceleratorState

    saved = {k: os.environ.pop(k) for k in DIST_ENV if k in os.environ}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        os.environ.update(saved)
        # accelerate keeps its process state in a singleton: the next stage's Trainer must see the launch again.
        AcceleratorState._reset_state(reset_partial_state=True)


def wait_for(marker: Path, poll_s: float = 2.0, report_s: float = 300.0) -> None:
    """Block until ``marker`` exists (another rank is finishing a stage that only the main process runs)."""
    waited = 0.0
    while not marker.is_file():
        time.sleep(poll_s)
        waited += poll_s
        if waited % report_s < poll_s:
            log.warning("still waiting for %s (%.0f min): the main process is running that stage alone; if it "
                        "died, stop this job", marker, waited / 60)


def validate(cfg: DictConfig) -> list[str]:
    """Checks that need no stage to have run: stage names exist and every ``_target_`` imports."""
    order = list(cfg.pipeline)
    if not order:
        raise ValueError("pipeline: the recipe lists no stages")
    if len(set(order)) != len(order):
        raise ValueError(f"pipeline: a stage is listed twice: {order}")
    for name in order:
        if name not in cfg.stages:
            raise ValueError(f"pipeline: stage {name!r} has no entry under 'stages' (have {sorted(cfg.stages)})")
        target = cfg.stages[name].get("_target_")
        if target is None:
            raise ValueError(f"stages.{name}: missing _target_ (the stage's config class)")
        cls = get_class(target)
        if not callable(getattr(cls, "run", None)):
            raise ValueError(f"stages.{name}: {target} has no run(ctx) method")
    return order


def stage_config(cfg: DictConfig, name: str) -> DictConfig:
    """The stage's block, with the recipe's ``trainer`` defaults merged under its ``training`` block."""
    block = OmegaConf.create(OmegaConf.to_container(cfg.stages[name], resolve=True))
    if "training" in block:
        trainer = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
        block.training = OmegaConf.merge(trainer, block.training, {"seed": cfg.seed})
    return block


def check_stages(plans: list[Any], blocks: dict[str, DictConfig], run_dir: Path) -> list[str]:
    """Build every stage config that will run, before the first runs: a bad setting in a late stage is reported
    now, not after hours of earlier stages. Inputs that earlier stages will write count as present. Returns the
    settings that need a CUDA GPU in stages that would train on the CPU: this machine has no CUDA device, or the
    stage sets ``training.use_cpu`` (``run.plan`` shows them; a run stops on them)."""
    no_cuda = not torch.cuda.is_available()
    to_run = [p.name for p in plans if p.action != "skip"]
    errors, gpu_only = [], []
    with pending(run_dir / name for name in to_run):
        for name in to_run:
            try:
                stage = instantiate(blocks[name], _convert_="all")
            except Exception as err:  # hydra wraps the config's own error; report that one
                cause = err.__cause__ or err
                errors.append(f"stages.{name}: {type(cause).__name__}: {cause}")
                continue
            if no_cuda or blocks[name].get("training", {}).get("use_cpu", False):
                gpu_only += [f"stages.{name}.{s}" for s in gpu_only_settings(stage)]
    if errors:
        raise ValueError("invalid stage settings; nothing was run:\n  " + "\n  ".join(errors))
    return gpu_only


def gpu_only_settings(stage: Any) -> list[str]:
    """The stage's settings that run only on a CUDA GPU: the student's and the teacher's ``kernels``."""
    found = []
    for part in ("model", "teacher"):
        kernels = getattr(getattr(stage, part, None), "kernels", None)
        if kernels:
            found.append(f"{part}.kernels={list(kernels)}")
    return found


def _plan_file(run_dir: Path) -> Path:
    """Where the main process hands its plan to the other ranks of this launch (named by the launch's identity)."""
    key = "|".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                                                   "TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE"))
    return run_dir / f".plan-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def _plan_on_main(cfg: DictConfig, order: list[str], blocks: dict[str, DictConfig],
                  run_dir: Path) -> list[StagePlan] | None:
    """Plan and check on the main process, remove the redone stages' old outputs, then hand the plan to the other
    ranks, which must not plan themselves (they would see the outputs half removed). None: only show the plan."""
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        plans = make_plan(cfg, order, blocks)
        gpu_only = check_stages(plans, blocks, run_dir)
        if gpu_only:
            where = (f"{', '.join(gpu_only)}: need a CUDA GPU, and these stages would train on the CPU (no CUDA "
                     "device here, or training.use_cpu)")
            if not cfg.run.get("plan", False):
                raise ValueError(f"{where}; nothing was run (set those kernels to [] for a CPU run)")
            log.warning("%s; a run here would stop before its first stage", where)
        if cfg.run.get("plan", False):
            print(format_plan(plans))  # noqa: T201 (the plan is the command's output)
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        for plan in plans:
            if plan.action == "redo":
                log.info("stage %s: its old output is removed before it is redone", plan.name)
                clear_outputs(run_dir / plan.name)
    except Exception as err:
        if multi:  # the other ranks wait for the plan: tell them to stop instead of hanging
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(_plan_file(run_dir), json.dumps({"error": f"{type(err).__name__}: {err}"}))
        raise
    if multi:
        write_atomic(_plan_file(run_dir), json.dumps({"plans": [asdict(p) for p in plans]}))
    return plans


def _plan_from_main(run_dir: Path, entered: float, poll_s: float = 1.0) -> list[StagePlan]:
    """The main process's plan for this launch: a plan file written after this rank started (an older one is a
    previous launch's)."""
    path = _plan_file(run_dir)
    while not (path.is_file() and path.stat().st_mtime >= entered - 30):
        time.sleep(poll_s)
    data = json.loads(path.read_text())
    if "error" in data:
        raise RuntimeError(f"the main process stopped before any stage ran: {data['error']}")
    return [StagePlan(**p) for p in data["plans"]]


def run_pipeline(cfg: DictConfig, shared_roots: list[Path] | None = None) -> dict[str, Any]:
    """Run the recipe's stages. ``shared_roots``: other run folders whose finished stages may be linked in when
    their settings and inputs are the same (a sweep's points)."""
    entered = time.time()
    order = validate(cfg)
    run_dir = Path(cfg.run.dir)
    blocks = {name: stage_config(cfg, name) for name in order}
    main = is_main_process()
    if main:
        plans = _plan_on_main(cfg, order, blocks, run_dir)
        if plans is None:
            return {}
        write_atomic(run_dir / "recipe.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    else:
        if cfg.run.get("plan", False):
            return {}
        plans = _plan_from_main(run_dir, entered)
    results: dict[str, Any] = {}
    for plan in plans:
        name, block = plan.name, blocks[plan.name]
        stage_dir = run_dir / name
        if plan.action == "skip":
            log.info("stage %s: done already, same settings: skipped (%s)", name, stage_dir)
            results[name] = json.loads((stage_dir / "metrics.json").read_text())
            continue
        settings = settings_of(block, run_dir)
        upstream, files = inputs_of(settings, run_dir, [s for s in order if s != name])
        started = record(stage_dir, settings, upstream, files, run_dir)
        if plan.action == "run" and shared_roots:
            shared = find_shared(name, started, shared_roots)
            if shared is not None:
                if main:
                    stage_dir.parent.mkdir(parents=True, exist_ok=True)
                    if stage_dir.is_symlink():  # a link to a stage that was redone since
                        stage_dir.unlink()
                    stage_dir.symlink_to(shared.resolve(), target_is_directory=True)
                else:
                    wait_for(stage_dir / DONE)
                log.info("stage %s: same settings and inputs as %s: linked, not rerun", name, shared)
                results[name] = json.loads((stage_dir / "metrics.json").read_text())
                continue
        if plan.action == "redo":
            log.info("stage %s: redone (%s)", name, plan.reason)
        if not main and getattr(get_class(block["_target_"]), "main_process_only", False):
            log.info("stage %s: runs on the main process; waiting for it", name)
            wait_for(stage_dir / DONE)
            results[name] = json.loads((stage_dir / "metrics.json").read_text())
            continue
        log.info("stage %s: starting (%s)", name, plan.reason)
        set_seed(cfg.seed)
        stage = instantiate(block, _convert_="all")
        ctx = StageContext(name=name, run_dir=run_dir, training=getattr(stage, "training", {}),
                           report_to=OmegaConf.to_container(cfg.trainer, resolve=True).get("report_to"),
                           cache_root=shared_roots[0] if shared_roots else None)
        stage_dir.mkdir(parents=True, exist_ok=True)
        if main:
            write_atomic(stage_dir / "config.yaml", OmegaConf.to_yaml(block, resolve=True))
            write_atomic(stage_dir / SETTINGS, json.dumps(started, indent=1, default=str))
        start = time.time()
        alone = getattr(type(stage), "main_process_only", False)
        with single_process_env() if alone else contextlib.nullcontext():
            metrics = stage.run(ctx) or {}
        metrics["wall_s"] = round(time.time() - start, 2)
        if main:  # training stages return on every rank only after the artifact is complete (save_final)
            write_atomic(stage_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
            # A unique stamp: a later stage records the one it read, so a redone upstream makes it stale.
            write_atomic(stage_dir / DONE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {uuid.uuid4().hex[:12]}\n")
            if not cfg.run.get("keep_checkpoints", False) and (stage_dir / "checkpoints").is_dir():
                # The artifact is complete and marked done: its resume points are dead weight (tens of GB a stage
                # at 7B scale).
                shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        log.info("stage %s: done in %.1fs", name, metrics["wall_s"])
        results[name] = metrics
    return results
