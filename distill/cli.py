"""The command line: ``python -m distill recipe=<name> [hydra overrides]`` (or the ``distill`` script).

Recipes live in ``recipes/recipe/``; every key can be overridden, e.g.

    python -m distill recipe=demo run.name=try2 stages.d2d.training.learning_rate=1e-4
    python -m distill recipe=demo --cfg job          # print the composed config and exit
"""

from __future__ import annotations

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


@hydra.main(version_base="1.3", config_path=str(RECIPES), config_name="config")
def _main(cfg: DictConfig) -> None:
    from distill.pipeline import run_pipeline
    from distill.training.resilience import Preempted

    # Every rank runs the pipeline; only rank 0 narrates it (the Trainer already logs and reports from rank 0 only).
    logging.getLogger("distill").setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    try:
        run_pipeline(cfg)
    except Preempted as stop:
        logging.getLogger("distill").warning("%s", stop)
        sys.exit(143)  # 128 + SIGTERM, what a scheduler expects from a job it asked to stop


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
