"""The command line: ``python -m distill recipe=<name> [hydra overrides]`` (or the ``distill`` script).

Recipes live in ``recipes/recipe/``; every key can be overridden, e.g.

    python -m distill recipe=demo run.name=try2 stages.d2d.training.learning_rate=1e-4
    python -m distill recipe=demo run.plan=true      # which stages would run, resume, be skipped, and why
    python -m distill recipe=demo 'run.redo=[d2d]' stages.d2d.alpha=0.5   # rerun d2d and what reads it
    python -m distill -m recipe=demo stages.d2d.alpha=0.5,1.0   # a sweep: one folder per point, shared stages
    python -m distill recipe=demo --cfg job          # print the composed config and exit
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# Runs are offline by design: never reach for a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# wandb's own console lines (a third of the demo's output) say nothing the run's log does not; WANDB_SILENT=false
# brings them back.
os.environ.setdefault("WANDB_SILENT", "true")


@hydra.main(version_base="1.3", config_path=str(RECIPES), config_name="config")
def _main(cfg: DictConfig) -> None:
    from distill.pipeline import run_pipeline
    from distill.training.resilience import Preempted

    # Every rank runs the pipeline; only rank 0 narrates it (the Trainer already logs and reports from rank 0 only).
    logging.getLogger("distill").setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    try:
        run_pipeline(cfg, shared_roots=_sweep_point(cfg))
    except Preempted as stop:
        logging.getLogger("distill").warning("%s", stop)
        sys.exit(143)  # 128 + SIGTERM, what a scheduler expects from a job it asked to stop


def _sweep_point(cfg: DictConfig) -> list[Path] | None:
    """In a hydra multirun, move this job's run folder to ``<run.dir>/sweep/<job number>-<overrides hash>`` (its
    overrides written beside) and return the folders whose finished stages it may share; None otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    base = Path(cfg.run.dir)
    overrides = sorted(hydra_cfg.overrides.task)
    point = base / "sweep" / f"{hydra_cfg.job.num}-{hashlib.sha1(chr(10).join(overrides).encode()).hexdigest()[:8]}"
    cfg.run.dir = str(point)
    point.mkdir(parents=True, exist_ok=True)  # on every rank: the listing below must not race rank 0's mkdir
    if int(os.environ.get("RANK", "0")) == 0:
        (point / "overrides.txt").write_text("\n".join(overrides) + "\n")
    return [base, *sorted(p for p in (base / "sweep").iterdir() if p.is_dir() and p != point)]


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
