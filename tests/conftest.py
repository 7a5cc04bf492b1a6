"""Shared fixtures: a tiny Shapes world with tiny stand-in checkpoints, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

TINY_WORLD = {"n_train_images": 48, "n_eval_images": 8, "n_preference_pairs": 16}
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1}
_LARGE = {**_SMALL, "hidden_size": 48, "intermediate_size": 96}
_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "image_size": 32, "patch_size": 8, "projection_dim": 32}
TINY_STANDINS = {"vocab_size": 400, "small": _SMALL, "large": _LARGE, "vision": _VISION,
                 "llm_steps": 4, "llm_batch_size": 4, "vision_steps": 4, "vision_batch_size": 8,
                 "projector_steps": 20}


def _hydra_dict(d: dict) -> str:
    return "{" + ",".join(f"{k}:{_hydra_dict(v) if isinstance(v, dict) else v}" for k, v in d.items()) + "}"


# Hydra overrides that shrink the demo recipe to seconds (used by the CLI and pipeline tests).
TINY_RECIPE = [
    f"+stages.world.overrides={_hydra_dict(TINY_WORLD)}",
    f"++stages.world.standins={_hydra_dict(TINY_STANDINS)}",  # merged into the recipe's block
    "trainer.max_steps=2",
    "trainer.per_device_train_batch_size=4",
    "trainer.logging_steps=1",
    "trainer.save_strategy=no",
    "stages.eval.limit=4",
    "stages.eval.caption_max_new_tokens=8",
]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 48-image world plus tokenizer, two LLMs and a vision tower, all tiny."""
    from data_prep.shapes import build_world
    from data_prep.standins import StandinConfig, build_standins

    root = tmp_path_factory.mktemp("world")
    build_world(root / "data", seed=0, preset="demo", **TINY_WORLD)
    paths = build_standins(root / "data", root, StandinConfig(**TINY_STANDINS))
    return {"root": root, "data": root / "data", "images": root / "data" / "images",
            **{k: Path(v) for k, v in paths.items()}}


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_world, tmp_path_factory) -> Path:
    """``teacher/`` (large LLM) and ``student/`` (small LLM) VLM artifacts built from the tiny world's stand-ins."""
    from transformers import set_seed

    from distill.models.student import StudentParts, build_student, save_artifact

    root = tmp_path_factory.mktemp("artifacts")
    for seed, name, llm in ((0, "teacher", "llm_large"), (1, "student", "llm_small")):
        set_seed(seed)
        model, processor = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world[llm])))
        save_artifact(model, processor, root / name)
    return root


@pytest.fixture
def cpu_training() -> dict:
    """TrainingArguments for a few quick CPU steps."""
    return {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "use_cpu": True,
            "report_to": "none", "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
            "dataloader_num_workers": 0, "dataloader_pin_memory": False, "lr_scheduler_type": "constant", "seed": 0}


@pytest.fixture
def tiny_recipe() -> list[str]:
    """Hydra overrides that shrink the demo recipe to seconds."""
    return list(TINY_RECIPE)
