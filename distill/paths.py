"""Existence checks that know which files the pipeline has yet to write.

The pipeline validates every stage's config before the first stage runs, when a later stage's inputs (an earlier
stage's artifact, the world's data) do not exist yet. Inside ``pending(folders)`` a path under one of those
folders counts as present; everywhere else (a stage built on its own, the stage about to run) the check is real.

    with pending([run_dir / "teacher", run_dir / "d2d"]):
        ImitationConfig(**block)          # model.artifact under run_dir/d2d passes; a typo elsewhere does not
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from pathlib import Path

_PENDING: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("pending_outputs", default=())


@contextlib.contextmanager
def pending(folders: Iterable[str | Path]) -> Iterator[None]:
    token = _PENDING.set(tuple(Path(f).absolute() for f in folders))
    try:
        yield
    finally:
        _PENDING.reset(token)


def _pending(path: str | Path) -> bool:
    p = Path(path).absolute()
    return any(p == f or p.is_relative_to(f) for f in _PENDING.get())


def is_file(path: str | Path) -> bool:
    """``Path(path).is_file()``, or True for a path a stage that has not run yet will write."""
    return _pending(path) or Path(path).is_file()


def is_dir(path: str | Path) -> bool:
    """``Path(path).is_dir()``, or True for a path a stage that has not run yet will write."""
    return _pending(path) or Path(path).is_dir()
