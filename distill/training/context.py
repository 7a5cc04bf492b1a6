"""What the pipeline hands to a stage: where to write, the merged trainer settings, and earlier artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageContext:
    name: str
    """The stage's name in the recipe (also its folder under the run)."""
    run_dir: Path
    training: dict[str, Any] = field(default_factory=dict)
    """TrainingArguments kwargs: the recipe's ``trainer`` defaults merged with the stage's ``training``."""
    report_to: str | list[str] | None = None
    """The recipe's ``trainer.report_to``, for stages that log without a Trainer (eval)."""
    cache_root: Path | None = None
    """Where checked data is kept when ``data.cache_dir`` is unset (``<cache_root>/cache/data``); None: the run
    folder. A sweep's points share their base run folder's, so a file is checked once for the whole sweep."""

    @property
    def cache_base(self) -> Path:
        """The folder whose ``cache/data`` keeps checked data by default."""
        return self.cache_root if self.cache_root is not None else self.run_dir

    @property
    def dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def model_dir(self) -> Path:
        """Where this stage writes its model artifact."""
        return self.dir / "model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"
