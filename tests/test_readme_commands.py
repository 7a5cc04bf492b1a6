"""Every ``distill`` command line in the README's code blocks works as written: its overrides compose and every stage
it would run is built and checked (``run.plan=true``: the same checks a real run makes before its first stage,
no work). Launchers are stripped (``torchrun ... -m distill`` runs the same config on every rank; tests/
test_launch.py runs that line with 2 CPU processes); ``<name>`` placeholders become the demo recipe, a sweep
(``-m``, ``a=x,y``) is composed once per value, ``hydra.*`` settings (launcher options) are left to hydra."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distill.cli import RECIPES
from distill.pipeline import run_pipeline

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = {"<name>": "demo", "my_gpu_recipe": "demo", "<partition>": "cpu"}
PLUGINS = {"+launcher=slurm"}  # needs hydra-submitit-launcher (not a dependency); its file is checked below


def shell_blocks() -> list[str]:
    blocks, lines, language = [], None, None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if lines is None:
                lines, language = [], line[3:].strip()
            else:
                if language in ("bash", "sh", "shell", "console"):
                    blocks.append("\n".join(lines))
                lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def readme_commands() -> list[tuple[str, list[str]]]:
    """Each distill command, with what the commands before it in its block write (their ``--out`` folders and the
    stages of their pipelines): a command that reads them is run after them in the README."""
    commands = []
    for block in shell_blocks():
        made = []
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "distill" in words and words[words.index("distill") - 1] in ("-m", "--module"):
                commands.append((" ".join(shlex.quote(w) for w in words), list(made)))
                made += [f"/{stage}/" for w in words if w.startswith("pipeline=")
                         for stage in w.split("=", 1)[1].strip("[]").split(",")]
            if "--out" in words:
                made.append(words[words.index("--out") + 1])
    return commands


def overrides_of(command: str) -> list[list[str]]:
    """The command's hydra overrides, one list per sweep point."""
    words = shlex.split(command)
    args = [w for w in words[words.index("distill") + 1:] if w not in ("-m", "--multirun")]
    if "--cfg" in args:
        i = args.index("--cfg")
        del args[i:i + 2]
    for placeholder, value in PLACEHOLDERS.items():
        args = [a.replace(placeholder, value) for a in args]
    args = [a for a in args if not a.startswith("hydra.") and a not in PLUGINS]
    points = [[]]
    for arg in args:
        key, _, value = arg.partition("=")
        values = value.split(",") if "," in value and not value.startswith(("[", "{")) else [value]
        points = [p + [f"{key}={v}" if _ else arg] for p in points for v in values]
    return points


def test_every_code_block_says_its_language():
    """A block without a language would be skipped here; the README marks each (bash, text, yaml, ...)."""
    fences = [line for line in README.read_text().splitlines() if line.startswith("```")]
    assert all(f.strip() != "```" for f in fences[0::2])


def test_the_readme_has_the_commands_this_test_reads():
    commands = [c for c, _ in readme_commands()]
    assert len(commands) >= 10
    assert any(c.startswith("torchrun") for c in commands) and any("-m recipe=demo" in c for c in commands)


@pytest.mark.parametrize("command, made_before", readme_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_readme_command_composes_and_every_stage_validates(command, made_before, tmp_path):
    for i, overrides in enumerate(overrides_of(command)):
        run_dir = tmp_path / str(i)
        with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"run.dir={run_dir}", "run.plan=true"])
        try:
            run_pipeline(cfg)
        except ValueError as err:  # allowed: only inputs that the block's earlier commands write
            problems = str(err).splitlines()[1:]
            assert problems and all(any(m in p for m in made_before) for p in problems), str(err)
        assert not (run_dir / "world").exists()  # nothing ran
