"""Runs a recipe's stages in order. Each stage writes ``<run.dir>/<stage>/`` and a ``DONE`` marker last.

Under a multi-process launch only rank 0 writes the pipeline's files; stages whose config class sets
``main_process_only`` (world, eval) run on rank 0 while the other ranks wait for their DONE marker.

A rerun of the same recipe skips every stage whose DONE marker exists and resumes an interrupted stage from
its last Trainer checkpoint. Stage configs are built from the recipe with hydra's ``instantiate`` (each
stage's ``_target_`` is its config dataclass) and validated before the stage starts.

    run_pipeline(cfg)      # cfg: the composed hydra config (see recipes/config.yaml)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

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


def wait_for(marker: Path, poll_s: float = 2.0) -> None:
    """Block until ``marker`` exists (another rank is finishing a stage that only the main process runs)."""
    while not marker.is_file():
        time.sleep(poll_s)


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


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    order = validate(cfg)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    main = is_main_process()
    if main:
        write_atomic(run_dir / "recipe.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    results: dict[str, Any] = {}
    for name in order:
        stage_dir = run_dir / name
        if (stage_dir / DONE).is_file():
            log.info("stage %s: done already, skipped (%s)", name, stage_dir)
            results[name] = json.loads((stage_dir / "metrics.json").read_text())
            continue
        block = stage_config(cfg, name)
        if not main and getattr(get_class(block["_target_"]), "main_process_only", False):
            log.info("stage %s: runs on the main process; waiting for it", name)
            wait_for(stage_dir / DONE)
            results[name] = json.loads((stage_dir / "metrics.json").read_text())
            continue
        log.info("stage %s: starting", name)
        set_seed(cfg.seed)
        stage = instantiate(block, _convert_="all")
        ctx = StageContext(name=name, run_dir=run_dir, training=getattr(stage, "training", {}),
                           report_to=OmegaConf.to_container(cfg.trainer, resolve=True).get("report_to"))
        stage_dir.mkdir(parents=True, exist_ok=True)
        if main:
            write_atomic(stage_dir / "config.yaml", OmegaConf.to_yaml(block, resolve=True))
        start = time.time()
        metrics = stage.run(ctx) or {}
        metrics["wall_s"] = round(time.time() - start, 2)
        if main:  # training stages return on every rank only after the artifact is complete (save_final)
            write_atomic(stage_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
            write_atomic(stage_dir / DONE, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        log.info("stage %s: done in %.1fs", name, metrics["wall_s"])
        results[name] = metrics
    return results
