"""What a run will do with each stage, decided before any stage runs: run, resume, skip, redo, or refuse.

A stage's *settings* are its resolved recipe block (the ``config.yaml`` the pipeline writes), less the keys that
cannot change its results (``NON_RESULT_KEYS``), with the run folder written as ``${run.dir}`` so that the same
settings read the same in any run folder. Its *inputs* are the earlier stages whose folders its block names (each
recorded by the ``DONE`` stamp of the output it read) and the data files it names outside the run folder (size and
modification time). Both are recorded in ``<stage>/settings.json`` when the stage starts.

- a finished stage whose settings and inputs are unchanged is skipped;
- a finished stage whose settings or inputs differ, or an interrupted one whose settings differ, stops the run
  before any work, naming the stage, the differing keys (old -> new) and the ways out: a new ``run.name``, or
  ``run.redo=[stage]``, which reruns that stage and every later stage that reads its output;
- ``run.plan=true`` prints this plan and exits.

    plan = make_plan(cfg, order)      # [StagePlan(name, action, reason), ...]; raises StaleStageError
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SETTINGS = "settings.json"
DONE = "DONE"
NON_RESULT_KEYS = (
    "training.logging_steps", "training.logging_first_step", "training.report_to", "training.run_name",
    "training.dataloader_num_workers", "training.dataloader_pin_memory", "training.dataloader_persistent_workers",
    "training.dataloader_prefetch_factor", "training.disable_tqdm", "training.save_strategy", "training.save_steps",
    "training.save_total_limit", "training.peak_flops", "training.logging_dir", "batch_size", "progress",
    "data.cache_dir",
)
"""Setting paths (suffixes of a stage block's dotted keys) that cannot change a stage's results: logging, loader
workers, checkpoint cadence, evaluation batch size. A change of one of them never makes a finished stage stale.
(Checkpoint cadence matters to a resumed stage only through where it resumes; its results are the same.)"""


class StaleStageError(RuntimeError):
    """A finished or interrupted stage's recorded settings or inputs differ from the recipe's."""


@dataclass
class StagePlan:
    name: str
    action: str
    """``run`` (not started), ``resume`` (interrupted, same settings), ``skip`` (finished, same settings and
    inputs), ``redo`` (``run.redo`` or downstream of a redone stage: its old output is removed first), ``stale``."""
    reason: str = ""
    diff: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _ignored(key: str) -> bool:
    return any(key == s or key.endswith("." + s) for s in NON_RESULT_KEYS)


def _relative(value: Any, run_dir: str) -> Any:
    if isinstance(value, str) and run_dir in value:  # the folder itself or a path under it, not a longer name
        return re.sub(re.escape(run_dir) + r"(?=/|$)", "${run.dir}", value)
    if isinstance(value, list):
        return [_relative(v, run_dir) for v in value]
    return value


def settings_of(block: DictConfig | dict, run_dir: Path) -> dict[str, Any]:
    """The result-relevant settings of a stage block, flat, with the run folder written as ``${run.dir}``."""
    data = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else block
    # A key set to null reads as unset (a setting added to the recipes later does not make old stages stale).
    return {k: _relative(v, str(run_dir)) for k, v in sorted(flatten(data).items())
            if not _ignored(k) and v is not None}


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def inputs_of(settings: dict[str, Any], run_dir: Path, stages: list[str]) -> tuple[list[str], dict[str, list[int]]]:
    """The earlier stages a stage reads (their folders appear in its settings) and the data files it names."""
    upstream, files = [], {}
    for value in settings.values():
        for s in _strings(value):
            if s.startswith("${run.dir}/"):
                first = s[len("${run.dir}/"):].split("/", 1)[0]
                if first in stages and first not in upstream:
                    upstream.append(first)
            elif "/" in s and Path(s).is_file():
                st = Path(s).stat()
                files[s] = [st.st_size, st.st_mtime_ns]
    return upstream, files


def _stamp(stage_dir: Path) -> str | None:
    done = stage_dir / DONE
    return done.read_text().strip() if done.is_file() else None


def record(stage_dir: Path, settings: dict[str, Any], upstream: list[str], files: dict[str, list[int]],
           run_dir: Path) -> dict[str, Any]:
    """What ``settings.json`` holds for a stage starting now."""
    return {"settings": settings, "inputs": {u: _stamp(run_dir / u) for u in upstream}, "files": files}


def _recorded(stage_dir: Path, run_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / SETTINGS
    if path.is_file():
        return json.loads(path.read_text())
    config = stage_dir / "config.yaml"
    if config.is_file():  # a stage finished before settings were recorded: its config, no inputs to compare
        return {"settings": settings_of(OmegaConf.load(config), run_dir), "inputs": None, "files": None}
    return None


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k, "<unset>"), new.get(k, "<unset>")) for k in sorted(set(old) | set(new))
            if old.get(k, "<unset>") != new.get(k, "<unset>")}


def _started(stage_dir: Path) -> bool:
    return (stage_dir / SETTINGS).is_file() or (stage_dir / "checkpoints").is_dir()


def make_plan(cfg: DictConfig, order: list[str], blocks: dict[str, DictConfig]) -> list[StagePlan]:
    """The action for each stage of ``order``; raises ``StaleStageError`` (naming every stale stage) unless
    ``run.plan`` asks only to show it."""
    run_dir = Path(cfg.run.dir)
    redo = set(cfg.run.get("redo") or [])
    unknown = redo - set(order)
    if unknown:
        raise ValueError(f"run.redo: {sorted(unknown)} are not stages of this pipeline {order}")
    plans: dict[str, StagePlan] = {}
    for name in order:
        stage_dir = run_dir / name
        settings = settings_of(blocks[name], run_dir)
        upstream, files = inputs_of(settings, run_dir, [s for s in order if s != name])
        changed_up = [u for u in upstream if u in plans and plans[u].action in ("run", "redo", "resume", "stale")]
        old = _recorded(stage_dir, run_dir)
        done = (stage_dir / DONE).is_file()
        if name in redo:
            plans[name] = StagePlan(name, "redo", "run.redo")
        elif (done or _started(stage_dir)) and changed_up and any(plans[u].action == "redo" for u in changed_up):
            plans[name] = StagePlan(name, "redo", f"reads {', '.join(changed_up)}, which is redone")
        elif done:
            diff = _diff(old["settings"], settings) if old else {}
            if old and old.get("inputs") is not None:
                for u, stamp in old["inputs"].items():
                    now = _stamp(run_dir / u)
                    if u in changed_up or now != stamp:
                        diff[f"input {u}"] = (stamp, now if u not in changed_up else f"to be {plans[u].action}")
                for path, sig in (old.get("files") or {}).items():
                    now = files.get(path) or (list(_file_sig(path)) if Path(path).is_file() else None)
                    if now != sig:
                        diff[f"file {path}"] = (sig, now)
            elif changed_up:
                diff.update({f"input {u}": ("finished", f"to be {plans[u].action}") for u in changed_up})
            plans[name] = StagePlan(name, "stale", "settings or inputs changed", diff) if diff else \
                StagePlan(name, "skip", "finished, same settings")
        elif _started(stage_dir):
            diff = _diff(old["settings"], settings) if old else {}
            for u, stamp in ((old or {}).get("inputs") or {}).items():  # resumed on other inputs: not the same run
                now = _stamp(run_dir / u)
                if u in changed_up or now != stamp:
                    diff[f"input {u}"] = (stamp, now if u not in changed_up else f"to be {plans[u].action}")
            plans[name] = StagePlan(name, "stale", "interrupted; settings changed", diff) if diff else \
                StagePlan(name, "resume", "interrupted, same settings")
        else:
            plans[name] = StagePlan(name, "run", "not started")
    result = [plans[n] for n in order]
    stale = [p for p in result if p.action == "stale"]
    if stale and not cfg.run.get("plan", False):
        raise StaleStageError(stale_message(stale, cfg))
    return result


def _file_sig(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


def stale_message(stale: list[StagePlan], cfg: DictConfig) -> str:
    lines = [f"the recipe differs from what {len(stale)} finished or interrupted stage(s) in {cfg.run.dir} were "
             "run with; nothing was run:"]
    for plan in stale:
        lines.append(f"  stage {plan.name} ({plan.reason}):")
        for key, (old, new) in list(plan.diff.items())[:20]:
            lines.append(f"    {key}: {old!r} -> {new!r}")
        if len(plan.diff) > 20:
            lines.append(f"    ... and {len(plan.diff) - 20} more")
    names = ",".join(p.name for p in stale)
    lines.append(f"Ways out: a new run folder (run.name=<new name>), or rerun them and every stage after them that "
                 f"reads their output: run.redo=[{names}]. See what would run with run.plan=true.")
    return "\n".join(lines)


def format_plan(plans: list[StagePlan]) -> str:
    lines = [f"{'stage':<16}{'action':<8}why"]
    for p in plans:
        lines.append(f"{p.name:<16}{p.action:<8}{p.reason}")
        for key, (old, new) in list(p.diff.items())[:10]:
            lines.append(f"{'':<24}{key}: {old!r} -> {new!r}")
    return "\n".join(lines)


def clear_outputs(stage_dir: Path) -> None:
    """Remove a stage's old output before it is redone (its DONE first, so a crash leaves it unfinished). A stage
    linked from another sweep point loses only its link: the other point's output stays."""
    if stage_dir.is_symlink():
        stage_dir.unlink()
        return
    (stage_dir / DONE).unlink(missing_ok=True)
    if stage_dir.is_dir():
        shutil.rmtree(stage_dir)


def find_shared(name: str, started: dict[str, Any], roots: list[Path]) -> Path | None:
    """A finished ``name`` stage under one of ``roots`` (other sweep points' run folders) that was run with the
    same settings on the same inputs, or None."""
    for root in roots:
        candidate = root / name
        if candidate.is_symlink() or not (candidate / DONE).is_file() or not (candidate / SETTINGS).is_file():
            continue
        old = json.loads((candidate / SETTINGS).read_text())
        if old["settings"] == started["settings"] and old["inputs"] == started["inputs"] and \
                old["files"] == started["files"]:
            return candidate
    return None
