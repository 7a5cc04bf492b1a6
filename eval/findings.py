"""The paper's findings in miniature: run ``recipe=findings`` for several seeds and write RESULTS.md.

    python -m eval.findings                                   # shared part, seeds 0 1 2, report
    python -m eval.findings --parts shared                    # world + teacher + its evaluation (one part)
    python -m eval.findings --parts seeds --seeds 0 1 2       # the student lines, seeds run side by side
    python -m eval.findings --parts report --out RESULTS.md   # tables, verdicts and a plot from what exists
    python -m eval.findings -- budget.phase1=2 findings_dir=runs/f2   # anything after -- goes to every run

Each part is a ``python -m distill recipe=findings`` pipeline, so a killed part resumes where it stopped (finished
stages are skipped). The student lines and the comparisons are documented in recipes/recipe/findings.yaml.

Verdicts compare the mean over seeds of ``score`` (the mean of VQA accuracy and POPE F1, as the paper averages
benchmarks) or, for hallucination, of POPE F1 and CHAIR_i. A finding "reproduces" when the difference has the
paper's sign and exceeds twice its standard error (sqrt(s_a^2/n_a + s_b^2/n_b)); "same direction, within noise"
when it has the sign but not the margin; "no" otherwise. Text after the line ``NOTES_MARKER`` in an existing
report is kept when the report is rewritten.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOTES_MARKER = "<!-- notes: kept by eval.findings when it rewrites this file -->"
METRICS = ("score", "vqa_acc", "pope_f1", "chair_i", "kl_teacher", "params_active_m")
LINES = ("d2s", "preference", "d2s_only", "sft_moe", "dense", "d2s_top1", "d2s_e8", "d2d", "sft", "adapter_init")
LABELS = {
    "teacher": "teacher",
    "adapter_init": "adapter init",
    "d2d": "D2D (dense KD)",
    "d2s": "D2D + D2S (KD, 4 experts top-2)",
    "preference": "D2D + D2S + preference",
    "d2s_only": "D2S only",
    "sft": "SFT (dense)",
    "sft_moe": "SFT + MoE tuning (MoE-LLaVA style)",
    "dense": "D2D + dense phase 2",
    "d2s_top1": "D2D + D2S top-1",
    "d2s_e8": "D2D + D2S 8 experts",
}


@dataclass(frozen=True)
class Comparison:
    name: str
    a: str
    b: str
    metric: str
    higher_is_better: bool
    paper: str


COMPARISONS = (
    Comparison("1. KD student vs SFT-only MoE student", "d2s", "sft_moe", "score", True, "KD +8.1 average"),
    Comparison("1. KD student vs SFT-only MoE student", "d2s", "sft_moe", "vqa_acc", True, "KD +8.1 average"),
    Comparison("2. D2D + D2S vs D2S only", "d2s", "d2s_only", "score", True, "+4.0"),
    Comparison("2. D2D + D2S vs D2S only", "d2s", "d2s_only", "vqa_acc", True, "+4.0"),
    Comparison("3. MoE vs dense student, equal active parameters (top-1)", "d2s_top1", "dense", "score", True,
               "sparse +3.7"),
    Comparison("3. MoE vs dense student, equal active parameters (top-1)", "d2s_top1", "dense", "vqa_acc", True,
               "sparse +3.7"),
    Comparison("4a. + preference distillation: POPE F1", "preference", "d2s", "pope_f1", True,
               "hallucination drops"),
    Comparison("4b. + preference distillation: CHAIR_i", "preference", "d2s", "chair_i", False,
               "hallucination drops"),
    Comparison("4c. student (after preference) vs teacher: CHAIR_i", "preference", "teacher", "chair_i", False,
               "student hallucinates less than its teacher"),
    Comparison("5a. top-2 vs top-1 routing", "d2s", "d2s_top1", "score", True, "top-2 slightly above top-1"),
    Comparison("5a. top-2 vs top-1 routing", "d2s", "d2s_top1", "vqa_acc", True, "top-2 slightly above top-1"),
    Comparison("5b. 8 vs 4 experts", "d2s_e8", "d2s", "score", True, "8 experts no better than 4"),
    Comparison("5b. 8 vs 4 experts", "d2s_e8", "d2s", "vqa_acc", True, "8 experts no better than 4"),
)
"""Each ability comparison is judged on ``score`` and on VQA accuracy alone: a student that cannot yet tell
present from absent objects answers POPE near chance with a yes-ratio that swings from seed to seed, which makes
POPE F1 (and so ``score``) noisy."""


def with_score(row: dict[str, Any]) -> dict[str, Any]:
    """``score``: the mean of VQA accuracy and POPE F1 (what the paper's 'average' is over its benchmarks)."""
    if "vqa_acc" in row and "pope_f1" in row:
        return {**row, "score": (row["vqa_acc"] + row["pope_f1"]) / 2}
    return dict(row)


def aggregate(runs: list[list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per model and metric: (mean, sample standard deviation, number of runs) over the runs (one list of rows per
    seed; a model missing from a seed just has fewer runs)."""
    values: dict[str, dict[str, list[float]]] = {}
    for rows in runs:
        for row in map(with_score, rows):
            for metric in METRICS:
                if isinstance(row.get(metric), (int, float)):
                    values.setdefault(row["model"], {}).setdefault(metric, []).append(float(row[metric]))
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for model, metrics in values.items():
        for metric, xs in metrics.items():
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            out.setdefault(model, {})[metric] = (mean, std, len(xs))
    return out


def verdict(stats: dict[str, dict[str, tuple[float, float, int]]], c: Comparison) -> tuple[str, float | None]:
    """(verdict, difference a - b) for one comparison; see the module docstring for the rule."""
    if c.metric not in stats.get(c.a, {}) or c.metric not in stats.get(c.b, {}):
        return "not run", None
    (ma, sa, na), (mb, sb, nb) = stats[c.a][c.metric], stats[c.b][c.metric]
    diff = ma - mb
    better = diff if c.higher_is_better else -diff
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    if c.name.startswith("5b"):  # the paper's claim is "no better": reproduced unless 8 experts are clearly better
        return ("reproduces" if better <= 2 * se else "no"), diff
    if better > 2 * se and better > 0:
        return "reproduces", diff
    if better > 0:
        return "same direction, within noise", diff
    return "no", diff


def _cell(stat: tuple[float, float, int] | None, fmt: str = ".3f") -> str:
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{mean:{fmt}} ± {std:{fmt}}" if n > 1 else f"{mean:{fmt}}"


def _models(stats: dict[str, dict[str, tuple[float, float, int]]]) -> list[str]:
    """Table and plot order: the teacher, then the lines that were run."""
    return ["teacher", *[m for m in LINES if m in stats]]


def render(stats: dict[str, dict[str, tuple[float, float, int]]], seeds: list[int], header: str = "") -> str:
    models = _models(stats)
    lines = [header, "", f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))} (teacher: one run). "
             "score = (VQA accuracy + POPE F1) / 2.", "",
             "| model | line | score | VQA acc | POPE F1 | CHAIR_i | KL(teacher) | active params (M) | runs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        s = stats.get(m, {})
        runs = max((v[2] for v in s.values()), default=0)
        lines.append(f"| {m} | {LABELS.get(m, m)} | {_cell(s.get('score'))} | {_cell(s.get('vqa_acc'))} | "
                     f"{_cell(s.get('pope_f1'))} | {_cell(s.get('chair_i'))} | {_cell(s.get('kl_teacher'))} | "
                     f"{_cell(s.get('params_active_m'), '.2f')} | {runs} |")
    lines += ["", "| finding | compared | metric | paper | ours (a - b) | reproduces? |", "|---|---|---|---|---:|---|"]
    for c in COMPARISONS:
        v, diff = verdict(stats, c)
        lines.append(f"| {c.name} | {c.a} vs {c.b} | {c.metric} | {c.paper} | "
                     f"{'-' if diff is None else f'{diff:+.3f}'} | {v} |")
    return "\n".join(lines) + "\n"


def plot(stats: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> Path:
    """Bars of score, VQA accuracy and POPE F1 per line, with the seeds' standard deviation as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = _models(stats)
    metrics = ("score", "vqa_acc", "pope_f1", "chair_i")
    fig = Figure(figsize=(max(8, 1.1 * len(models)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        xs, means, stds = [], [], []
        for i, m in enumerate(models):
            if metric in stats.get(m, {}):
                mean, std, _ = stats[m][metric]
                xs.append(i + (k - (len(metrics) - 1) / 2) * width)
                means.append(mean)
                stds.append(std)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=metric)
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(ncols=len(metrics), fontsize=8)
    ax.set_title("The paper's findings in miniature (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def load_runs(findings_dir: Path, seeds: list[int]) -> tuple[list[list[dict[str, Any]]], list[int]]:
    """Each finished seed's eval rows plus the shared teacher evaluation (added to every seed's rows)."""
    teacher_file = findings_dir / "shared" / "teacher_eval" / "results.json"
    teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else []
    runs, done = [], []
    for seed in seeds:
        f = findings_dir / f"seed{seed}" / "eval" / "results.json"
        if f.is_file():
            runs.append(json.loads(f.read_text()) + (teacher if not runs else []))
            done.append(seed)
    if not runs and teacher:
        runs.append(teacher)
    return runs, done


def _distill(args: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "distill", "recipe=findings", *args], stdout=handle,
                                stderr=subprocess.STDOUT, env=os.environ.copy())


STOP_GRACE_S = 60
"""How long, after a SIGTERM, the driver waits for its pipelines to checkpoint before it kills them."""


class _Forward:
    """While active, SIGTERM to the driver goes on to its running pipelines, which write a checkpoint and stop
    (the stages' preemption handling); the driver then exits once they have. A killed or timed-out driver thus
    leaves every seed resumable where it stopped, not only at its last finished stage. The handler only signals:
    the waiting happens in the driver's loops (a handler that waited could deadlock on the ``wait`` it interrupted).
    """

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []
        self.labels: list[str] = []  # each child's log name (shared, seed0, ...)
        self.stopping = False
        self.previous = None

    def __enter__(self) -> _Forward:
        self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handler(self, signum: int, frame: object) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        proc = _distill(args, log)
        self.children.append(proc)
        self.labels.append(log.stem)
        if self.stopping:  # the notice came while it was being started
            proc.send_signal(signal.SIGTERM)
        return proc

    def stop_if_asked(self, grace_s: float = STOP_GRACE_S) -> None:
        """After a SIGTERM: wait for the pipelines to checkpoint and stop (killing any still running after
        ``grace_s``), then exit, naming those that ended otherwise than stopped or done."""
        if not self.stopping:
            return
        deadline = time.time() + grace_s
        for child in self.children:
            try:
                child.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        stopped = (0, 143, -signal.SIGTERM)  # done, stopped after its checkpoint, or stopped outside training
        odd = [f"{self.labels[i]}: exit {c.returncode}" for i, c in enumerate(self.children)
               if c.returncode not in stopped]
        raise SystemExit("findings: stopped on SIGTERM; the running pipelines checkpointed, rerun the same command "
                         "to resume" + (f". Not stopped cleanly: {odd}" if odd else ""))


def run_parts(parts: list[str], findings_dir: Path, seeds: list[int], parallel: int, overrides: list[str]) -> None:
    common = [f"findings_dir={findings_dir}", *overrides]
    with _Forward() as forward:
        if "shared" in parts:
            log = findings_dir / "logs" / "shared.log"
            t0 = time.time()
            proc = forward.start([f"run.dir={findings_dir}/shared", "pipeline=[world,teacher,teacher_eval]", *common],
                                 log)
            proc.wait()
            forward.stop_if_asked()
            if proc.returncode != 0:
                raise SystemExit(f"findings: the shared part failed (exit {proc.returncode}); see {log}")
            print(f"shared part: {time.time() - t0:.0f} s")  # noqa: T201 - CLI progress
        if "seeds" in parts:
            pending, running, failed = list(seeds), {}, []
            t0 = time.time()
            while pending or running:
                forward.stop_if_asked()
                while pending and len(running) < parallel:
                    seed = pending.pop(0)
                    running[seed] = forward.start([f"seed={seed}", *common],
                                                  findings_dir / "logs" / f"seed{seed}.log")
                for seed, proc in list(running.items()):
                    if proc.poll() is not None:
                        del running[seed]
                        if proc.returncode != 0:
                            failed.append(seed)
                time.sleep(2)
            forward.stop_if_asked()
            print(f"seeds {seeds}: {time.time() - t0:.0f} s")  # noqa: T201 - CLI progress
            if failed:
                raise SystemExit(f"findings: seeds {failed} failed; see {findings_dir}/logs/seed<N>.log")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("runs/findings"), help="findings_dir of the recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", default="shared,seeds,report", help="comma-separated: shared, seeds, report")
    parser.add_argument("--parallel", type=int, default=3, help="seeds trained at once (they share the GPU)")
    parser.add_argument("--out", type=Path, default=None, help="the report (default: <dir>/RESULTS.md)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - {"shared", "seeds", "report"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}")
    if any(o.startswith("findings_dir=") for o in overrides):
        parser.error("give the findings folder with --dir, not as an override")
    run_parts(parts, args.dir, args.seeds, args.parallel, overrides)
    if "report" in parts:
        runs, done = load_runs(args.dir, args.seeds)
        if not done:
            raise SystemExit(f"findings: no finished seed under {args.dir} (seed<N>/eval/results.json)")
        stats = aggregate(runs)
        out = args.out or args.dir / "RESULTS.md"
        png = plot(stats, out.with_suffix(".png"))
        header = (f"# The paper's findings in miniature\n\nProduced by `python -m eval.findings` "
                  f"(recipes/recipe/findings.yaml; folder {args.dir}). Plot: {png.name}.")
        notes = ""
        if out.is_file() and NOTES_MARKER in out.read_text():  # hand-written reading of a run survives a rerun
            notes = "\n" + NOTES_MARKER + out.read_text().split(NOTES_MARKER, 1)[1]
        out.write_text(render(stats, done, header) + notes)
        print(out.read_text())  # noqa: T201 - CLI output


if __name__ == "__main__":
    main()
