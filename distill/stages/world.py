"""Build the synthetic Shapes world and its stand-in checkpoints (tokenizer, small and large LLM, vision tower).

Writes ``<run>/<stage>/data`` (images + JSON in the public formats) and one checkpoint folder per stand-in;
later stages point at them by path. Deterministic by seed.

    python -m distill recipe=demo pipeline=[world]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from data_prep.shapes import PRESETS, build_world
from data_prep.standins import StandinConfig, build_standins
from distill.training.config import as_dataclass
from distill.training.context import StageContext


@dataclass
class WorldConfig:
    main_process_only = True  # one copy of the world / one evaluation, not one per rank
    seed: int = 0
    preset: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the world preset to change, e.g. ``{n_train_images: 500}``."""
    standins: StandinConfig = field(default_factory=StandinConfig)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"world.preset={self.preset!r}: expected one of {sorted(PRESETS)}")
        self.standins = as_dataclass(self.standins, StandinConfig)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        manifest = build_world(ctx.dir / "data", seed=self.seed, preset=self.preset, **self.overrides)
        paths = build_standins(ctx.dir / "data", ctx.dir, self.standins)
        return {"counts": manifest["counts"], "standins": paths, "standin_config": asdict(self.standins)}
