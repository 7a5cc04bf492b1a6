"""What the teacher's distributions carry beyond the labels, and where a student still differs, by reply kind.

    python -m eval.bench.kd_signal --teacher runs/demo/teacher/model --data runs/demo/world/data \
        [--student runs/demo/d2d/model] [--records 512]

For each reply kind of the world's training files (captions; instruction answers by question: existence, colour,
count, shape, position, relation, other), over the first ``--records`` records of each file:

- ``tokens``: the kind's share of the response tokens D2D distils (per-token KD spends its signal in proportion);
- at the answer's first token (the one VQA and POPE read): the teacher's entropy (nats), the probability it gives
  the label, whether its argmax is the label; with ``--student``, the student's probability of the label and
  KL(teacher || student) there;
- over all the kind's response tokens: the teacher's entropy and p(label), and KL(teacher || student).

A teacher that is nearly one-hot on the label (entropy near 0, p(label) near 1) gives KD little beyond SFT on the
same data; a teacher at chance (entropy near log 2 on yes/no) has nothing to give.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

from distill.data.formats import load_llava_json
from distill.losses.kd import KDOptions, shifted_response_mask, token_divergence
from distill.models.student import load_vlm
from distill.stages.imitation import ImitationConfig, build_collator
from distill.training.kd import KDConfig, split_inputs

KINDS = (("is there", "existence"), ("color", "colour"), ("how many", "count"), ("shape", "shape"),
         ("where", "position"), ("is the ", "relation"))


def question_kind(question: str) -> str:
    q = question.lower()
    return next((name for key, name in KINDS if key in q), "other")


def reply_runs(mask_row: torch.Tensor) -> list[list[int]]:
    """The positions of each run of consecutive True values in a 1-D mask (one run per reply)."""
    runs: list[list[int]] = []
    for p in mask_row.nonzero().flatten().tolist():
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def measure(teacher_dir: Path, data_dir: Path, student_dir: Path | None = None, records: int = 512,
            batch: int = 32) -> list[dict]:
    teacher, processor = load_vlm(teacher_dir)
    student, s_processor = load_vlm(student_dir) if student_dir else (None, None)
    stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for split in ("captions", "instruct"):
        ds, _ = load_llava_json(data_dir / f"{split}.json", data_dir / "images")
        data = ImitationConfig(model={"artifact": str(student_dir or teacher_dir)}, teacher={"path": str(teacher_dir)},
                               data={"train": [str(data_dir / f"{split}.json")],
                                     "image_root": str(data_dir / "images")}).data
        collator = build_collator(data, KDConfig(), s_processor or processor, processor)
        for start in range(0, min(records, len(ds)), batch):
            recs = [ds[i] for i in range(start, min(start + batch, records, len(ds)))]
            b = collator(recs)
            with torch.no_grad():
                t_logits = teacher.eval()(**split_inputs(b, "teacher_")).logits.float()
                s_logits = student.eval()(**split_inputs(b)).logits.float() if student else None
            t_mask, s_mask = shifted_response_mask(b["teacher_labels"]), shifted_response_mask(b["labels"])
            for row, rec in enumerate(recs):
                questions = [t["value"] for t in rec["conversations"] if t["from"] == "human"]
                t_runs, s_runs = reply_runs(t_mask[row]), reply_runs(s_mask[row])
                for q, t_run, s_run in zip(questions, t_runs, s_runs):
                    kind = "caption" if split == "captions" else question_kind(q)
                    st = stats[kind]
                    t_logp = t_logits[row, t_run].log_softmax(-1)
                    label = b["teacher_labels"][row, t_run[0] + 1]
                    first = t_logp[0]
                    st["replies"] += 1
                    st["tokens"] += len(t_run)
                    st["entropy"] += float(-(first.exp() * first).sum())
                    st["p_label"] += float(first[label].exp())
                    st["argmax"] += int(first.argmax() == label)
                    labels = b["teacher_labels"][row, [p + 1 for p in t_run]]
                    st["entropy_tokens"] += float(-(t_logp.exp() * t_logp).sum())
                    st["p_label_tokens"] += float(t_logp.gather(-1, labels[:, None]).exp().sum())
                    if s_logits is not None:  # forward KL over the common vocabulary, as the stages' loss
                        kl = token_divergence(s_logits[row, s_run], t_logits[row, t_run], KDOptions())
                        st["s_p_label"] += float(s_logits[row, s_run[0]].softmax(-1)[label])
                        st["kl_first"] += float(kl[0])
                        st["kl_tokens"] += float(kl.sum())
    total = sum(s["tokens"] for s in stats.values())
    rows = []
    for kind, s in sorted(stats.items()):
        n = s["replies"]
        row = {"kind": kind, "replies": n, "token_share": s["tokens"] / total, "teacher_entropy": s["entropy"] / n,
               "teacher_p_label": s["p_label"] / n, "teacher_argmax_is_label": s["argmax"] / n,
               "teacher_entropy_per_token": s["entropy_tokens"] / s["tokens"],
               "teacher_p_label_per_token": s["p_label_tokens"] / s["tokens"]}
        if student is not None:
            row.update({"student_p_label": s["s_p_label"] / n, "kl_first": s["kl_first"] / n,
                        "kl_per_token": s["kl_tokens"] / s["tokens"]})
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cols = [c for c in rows[0] if c != "kind"]
    lines = ["| kind | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['kind']} | " + " | ".join(
            f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, required=True, help="the teacher artifact (e.g. runs/demo/teacher/model)")
    p.add_argument("--data", type=Path, required=True, help="the world's data folder (captions.json, instruct.json, "
                   "images/)")
    p.add_argument("--student", type=Path, default=None, help="a student artifact to compare with the teacher")
    p.add_argument("--records", type=int, default=512, help="records of each training file")
    args = p.parse_args()
    print(table(measure(args.teacher, args.data, args.student, args.records)))


if __name__ == "__main__":
    main()
