"""Tests for eval.report: Markdown table, bar chart PNG and report files."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from eval.report import bar_chart, markdown_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"model": "teacher", "vqa_acc": 0.81, "pope_f1": 0.9, "n": 100},
    {"model": "student", "vqa_acc": 0.7456, "chair_i": 0.12},
]


def test_markdown_table_default_columns_and_missing() -> None:
    table = markdown_table(ROWS)
    assert table.splitlines() == [
        "| model | vqa_acc | pope_f1 | n | chair_i |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| teacher | 0.810 | 0.900 | 100 | - |",
        "| student | 0.746 | - | - | 0.120 |",
    ]


def test_markdown_table_explicit_columns_and_floatfmt() -> None:
    table = markdown_table(ROWS, columns=["model", "vqa_acc", "unknown"], floatfmt=".1%")
    assert table.splitlines()[2:] == [
        "| teacher | 81.0% | - |",
        "| student | 74.6% | - |",
    ]


def test_markdown_table_none_nan_and_pipes() -> None:
    table = markdown_table([{"model": "a|b", "x": None, "y": float("nan")}])
    assert table.splitlines()[2] == "| a\\|b | - | - |"


def test_markdown_table_empty() -> None:
    assert markdown_table([]) == ""


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0


def test_bar_chart_writes_png(tmp_path: Path) -> None:
    out = bar_chart(ROWS, ["vqa_acc", "pope_f1", "missing"], tmp_path / "sub" / "chart.png", title="t")
    assert out == tmp_path / "sub" / "chart.png"
    _assert_png(out)


def test_bar_chart_nothing_plottable_writes_placeholder(tmp_path: Path) -> None:
    out = bar_chart(ROWS, ["missing"], tmp_path / "empty.png")
    _assert_png(out)


def test_write_report_writes_all_files(tmp_path: Path) -> None:
    paths = write_report(ROWS, tmp_path / "report", metrics_for_plot=["vqa_acc", "pope_f1", "chair_i"])
    assert set(paths) == {"json", "markdown", "plot"}
    assert paths["json"].name == "results.json"
    assert paths["markdown"].name == "results.md"
    assert paths["plot"].name == "results.png"
    assert json.loads(paths["json"].read_text()) == ROWS
    assert paths["markdown"].read_text().strip() == markdown_table(ROWS)
    _assert_png(paths["plot"])


def test_write_report_json_is_strict(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    rows = [{"model": "m", "x": np.float32(0.5), "y": float("nan"), "k": np.int64(3)}]
    paths = write_report(rows, tmp_path, metrics_for_plot=["x"])
    assert json.loads(paths["json"].read_text()) == [{"model": "m", "x": 0.5, "y": None, "k": 3}]
