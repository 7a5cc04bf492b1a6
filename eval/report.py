"""Tables and plots comparing evaluation results across model artifacts.

A "row" is one flat dict per evaluated artifact (teacher, student, distilled
checkpoints...) mapping column names to values, e.g.
``{"model": "teacher", "vqa_acc": 0.81, "pope_f1": 0.90}``. Rows need not share
keys; missing values are rendered as "-" in tables and left out of plots.

Example::

    from pathlib import Path
    from eval.report import write_report

    rows = [
        {"model": "teacher", "vqa_acc": 0.81, "pope_f1": 0.90},
        {"model": "student", "vqa_acc": 0.74, "pope_f1": 0.86},
    ]
    paths = write_report(rows, Path("runs/eval"), metrics_for_plot=["vqa_acc", "pope_f1"])
    # paths == {"json": .../results.json, "markdown": .../results.md, "plot": .../results.png}

Plotting uses matplotlib's object-oriented API with the Agg canvas directly
(no ``pyplot``), so importing this module never changes the global backend and
works on headless machines.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["bar_chart", "markdown_table", "write_report"]

MISSING = "-"


def _is_number(value: Any) -> bool:
    # bool is an Integral, but True/False are flags, not metrics.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format_cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return MISSING
    if _is_number(value) and not isinstance(value, numbers.Integral):
        value = float(value)
        if not math.isfinite(value):
            return MISSING
        return format(value, floatfmt)
    # "|" would split the cell and a newline would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _union_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    # dict preserves insertion order, giving first-seen column order.
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3f") -> str:
    """Render rows as a GitHub-flavoured Markdown table.

    Args:
        rows: one dict per artifact.
        columns: column order; defaults to the union of the rows' keys in
            first-seen order.
        floatfmt: ``format`` spec applied to non-integer numbers (ints are
            printed as-is).

    Returns:
        The table (no trailing newline). Missing, None and non-finite values
        are shown as "-". Columns whose present values are all numeric are
        right-aligned. An empty string when there are no columns.
    """
    cols = list(columns) if columns is not None else _union_keys(rows)
    if not cols:
        return ""

    def align(col: str) -> str:
        values = [row[col] for row in rows if row.get(col) is not None]
        return "---:" if values and all(_is_number(v) for v in values) else "---"

    lines = [
        "| " + " | ".join(_format_cell(c, floatfmt) for c in cols) + " |",
        "| " + " | ".join(align(c) for c in cols) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c), floatfmt) for c in cols) + " |")
    return "\n".join(lines)


def _plot_value(row: Mapping[str, Any], metric: str) -> float | None:
    value = row.get(metric)
    if not _is_number(value) or not math.isfinite(float(value)):
        return None
    return float(value)


def bar_chart(
    rows: list[dict],
    metrics: list[str],
    path: Path,
    label_key: str = "model",
    title: str | None = None,
) -> Path:
    """Write a grouped bar chart PNG: one group per metric, one bar per row.

    Args:
        rows: one dict per artifact.
        metrics: keys to plot. Metrics with no numeric value in any row are
            skipped; a row lacking a metric simply has no bar in that group.
        path: output PNG path (parent directories are created).
        label_key: row key used for the legend; rows without it are labelled
            ``row <index>``.
        title: optional figure title.

    Returns:
        ``path``. If nothing is plottable a placeholder figure saying so is
        written (and a warning logged) so report generation never fails on a
        missing plot.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    plotted = [m for m in metrics if any(_plot_value(row, m) is not None for row in rows)]
    skipped = [m for m in metrics if m not in plotted]
    if skipped:
        logger.info("bar_chart: skipping metrics missing from every row: %s", skipped)

    # Widen the figure with the number of bars so labels stay readable.
    width_in = max(6.0, 1.0 + 0.35 * max(1, len(plotted)) * max(1, len(rows)))
    fig = Figure(figsize=(width_in, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    if not plotted or not rows:
        logger.warning("bar_chart: nothing to plot for metrics %s; writing placeholder %s", metrics, path)
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        group_x = np.arange(len(plotted), dtype=float)
        # Leave 20% of each group's slot as a gap between groups.
        bar_w = 0.8 / len(rows)
        for i, row in enumerate(rows):
            label = str(row.get(label_key, f"row {i}"))
            xs, heights = [], []
            for j, metric in enumerate(plotted):
                value = _plot_value(row, metric)
                if value is not None:
                    xs.append(group_x[j] - 0.4 + bar_w * (i + 0.5))
                    heights.append(value)
            bars = ax.bar(xs, heights, width=bar_w, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.set_xticks(group_x, plotted)
        ax.set_ylabel("value")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    if title:
        ax.set_title(title)

    fig.savefig(path, format="png", dpi=120)
    logger.info("wrote bar chart %s", path)
    return path


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats into strict-JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        # NaN/inf are not valid JSON; null keeps the file loadable everywhere.
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(rows: list[dict], out_dir: Path, metrics_for_plot: list[str]) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``.

    Args:
        rows: one dict per artifact.
        out_dir: output directory (created if needed); existing files are
            overwritten.
        metrics_for_plot: metrics passed to :func:`bar_chart`.

    Returns:
        ``{"json": Path, "markdown": Path, "plot": Path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "markdown": out_dir / "results.md",
        "plot": out_dir / "results.png",
    }
    paths["json"].write_text(json.dumps(_jsonable(rows), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(rows) + "\n", encoding="utf-8")
    bar_chart(rows, metrics_for_plot, paths["plot"], title="Evaluation results")
    logger.info("wrote report to %s", out_dir)
    return paths
