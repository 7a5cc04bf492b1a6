"""Keep the README's demo table equal to what a fresh run prints.

The README shows the demo's evaluation as a table between two markers; this script renders the same table from a
run's ``eval/results.json`` and compares (``make demo`` does it last), or writes it into the README.

    python -m eval.readme_numbers runs/demo            # compare: exit 1 and show both tables when they differ
    python -m eval.readme_numbers runs/demo --warn     # compare, but only warn (make demo)
    python -m eval.readme_numbers runs/demo --write    # put this run's table into the README
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- demo-table: python -m eval.readme_numbers runs/demo --write; make demo compares -->"
END = "<!-- /demo-table -->"
COLUMNS = {  # results.json key -> heading
    "model": "model", "vqa_acc": "VQA", "vqa_count": "counts", "vqa_existence": "existence",
    "vqa_shape": "shapes", "vqa_color": "colours", "kl_teacher": "KL to teacher", "pope_f1": "POPE F1",
    "chair_i": "CHAIR_i", "chair_recall": "object recall",
}


def render(rows: list[dict]) -> str:
    columns = [key for key in COLUMNS if any(key in row for row in rows)]
    lines = ["| " + " | ".join(COLUMNS[c] for c in columns) + " |",
             "|" + "|".join("---" if c == "model" else "---:" for c in columns) + "|"]
    for row in rows:
        cells = [row.get(c) for c in columns]
        lines.append("| " + " | ".join("-" if v is None else v if isinstance(v, str) else f"{v:.2f}"
                                       for v in cells) + " |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{README}: the demo table's markers are missing ({START!r} ... {END!r})")
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder of recipe=demo, e.g. runs/demo")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--warn", action="store_true", help="report a difference but exit 0")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    rows = json.loads((args.run / "eval" / "results.json").read_text())
    table = render(rows)
    text = args.readme.read_text()
    if args.write:
        old = readme_table(text)
        args.readme.write_text(text.replace(old, table, 1))
        print(f"{args.readme}: demo table written from {args.run}")
        return 0
    if readme_table(text) == table:
        print(f"{args.readme.name}'s demo table matches this run ({args.run})")
        return 0
    print(f"{args.readme.name}'s demo table differs from this run ({args.run}).\nREADME:\n{readme_table(text)}\n"
          f"this run:\n{table}", file=sys.stderr)
    return 0 if args.warn else 1


if __name__ == "__main__":
    sys.exit(main())
