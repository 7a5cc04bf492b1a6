"""The README's demo table is rendered from a run's results and compared; a stale table is reported."""

from __future__ import annotations

import json

from eval.readme_numbers import END, README, START, main, readme_table, render

ROWS = [{"model": "teacher", "vqa_acc": 0.5234, "pope_f1": 0.49, "chair_i": 0.0, "chair_recall": 0.92},
        {"model": "d2d", "vqa_acc": 0.25, "kl_teacher": 0.2049, "pope_f1": 0.5, "chair_i": 0.43}]


def test_write_then_compare_round_trip(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(ROWS))
    readme = tmp_path / "README.md"
    readme.write_text(f"text\n{START}\n| old |\n{END}\nmore\n")
    assert main([str(tmp_path), "--readme", str(readme)]) == 1  # stale
    assert "differs" in capsys.readouterr().err
    assert main([str(tmp_path), "--readme", str(readme), "--warn"]) == 0
    assert main([str(tmp_path), "--readme", str(readme), "--write"]) == 0
    assert readme_table(readme.read_text()) == render(ROWS) and readme.read_text().endswith(f"{END}\nmore\n")
    assert "| d2d | 0.25 | 0.20 | 0.50 | 0.43 | - |" in render(ROWS)  # missing values shown as "-"
    assert main([str(tmp_path), "--readme", str(readme)]) == 0


def test_the_readme_has_a_demo_table_in_this_format():
    table = readme_table(README.read_text()).splitlines()
    assert table[0].startswith("| model | VQA |") and table[1].startswith("|---|---:|")
    assert len(table) >= 7 and table[2].startswith("| teacher |")
