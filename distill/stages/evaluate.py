"""The evaluation stage: every listed artifact on VQA, POPE and CHAIR, in one table (JSON, markdown, PNG).

File formats: VQA as JSONL ``{"question_id", "image", "question", "answer" (str or list), "question_type"}``;
POPE in its public JSONL (``question_id``, ``image``, ``text``, ``label``); CHAIR as JSONL ``{"image",
"objects"}`` plus a synonyms JSON (canonical object -> words). Paths are relative to ``data_dir``; images to
``image_root``.

    python -m distill recipe=demo pipeline=[eval] stages.eval.limit=50
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.data.collate import ConversationEncoder, SupervisedCollator
from distill.data.formats import IMAGE_PLACEHOLDER
from distill.data.templates import get_template
from distill.losses.kd import kd_loss, paired_positions
from distill.models.student import load_vlm
from distill.training.kd import split_inputs
from eval.generate import Generator
from eval.metrics import chair_metrics, pope_metrics, vqa_accuracy
from eval.report import markdown_table, write_report

log = logging.getLogger(__name__)


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


@dataclass
class EvalConfig:
    models: dict[str, str]
    """Label -> artifact folder, in table order."""
    data_dir: str
    image_root: str
    template: str = "chatml"
    vqa: str | None = "eval/vqa.jsonl"
    pope: dict[str, str] = field(default_factory=lambda: {
        s: f"eval/pope_{s}.jsonl" for s in ("random", "popular", "adversarial")})
    chair: str | None = "eval/chair.jsonl"
    chair_synonyms: str | None = "eval/chair_synonyms.json"
    caption_prompt: str = "Describe the image briefly."
    kl_reference: str | None = None
    """A teacher artifact: adds ``kl_teacher``, the forward KL(teacher || model) on the VQA answers."""
    limit: int | None = None
    """At most this many items per benchmark file (quick runs)."""
    batch_size: int = 32
    max_new_tokens: int = 8
    caption_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        get_template(self.template)
        if not self.models:
            raise ValueError("eval.models: nothing to evaluate")
        for label, path in self.models.items():
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"eval.models.{label}: no checkpoint at {path}")
        root = Path(self.data_dir)
        for rel in [self.vqa, self.chair, self.chair_synonyms, *self.pope.values()]:
            if rel is not None and not (root / rel).is_file():
                raise FileNotFoundError(f"eval: benchmark file {root / rel} not found")
        if self.kl_reference is not None and not (Path(self.kl_reference) / "config.json").is_file():
            raise FileNotFoundError(f"eval.kl_reference: no checkpoint at {self.kl_reference}")
        if self.kl_reference is not None and self.vqa is None:
            raise ValueError("eval.kl_reference needs eval.vqa (the KL is measured on its answers)")
        if (self.chair is None) != (self.chair_synonyms is None):
            raise ValueError("eval.chair and eval.chair_synonyms go together")

    def run(self, ctx: Any) -> dict[str, Any]:
        return run(self, ctx)


def evaluate_model(cfg: EvalConfig, gen: Generator, out_dir: Path) -> dict[str, Any]:
    root, images = Path(cfg.data_dir), Path(cfg.image_root)
    row: dict[str, Any] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    if cfg.vqa:
        items = _read_jsonl(root / cfg.vqa, cfg.limit)
        preds = gen.answer([(r.get("image"), r["question"]) for r in items], images, cfg.max_new_tokens, "vqa")
        res = vqa_accuracy(preds, [r["answer"] for r in items], [r.get("question_type", "all") for r in items])
        row["vqa_acc"] = res["accuracy"]
        row.update({f"vqa_{t}": v["accuracy"] for t, v in sorted(res["per_type"].items())})
        predictions["vqa"] = [{"question_id": r["question_id"], "prediction": p} for r, p in zip(items, preds)]
    for split, rel in cfg.pope.items():
        items = _read_jsonl(root / rel, cfg.limit)
        preds = gen.answer([(r["image"], r["text"]) for r in items], images, cfg.max_new_tokens, f"pope_{split}")
        res = pope_metrics(preds, [r["label"] for r in items])
        row[f"pope_{split}_f1"] = res["f1"]
        row[f"pope_{split}_acc"] = res["accuracy"]
        row[f"pope_{split}_yes"] = res["yes_ratio"]
        predictions[f"pope_{split}"] = [
            {"question_id": r["question_id"], "prediction": p} for r, p in zip(items, preds)
        ]
    if cfg.pope:
        row["pope_f1"] = sum(row[f"pope_{s}_f1"] for s in cfg.pope) / len(cfg.pope)
    if cfg.chair:
        items = _read_jsonl(root / cfg.chair, cfg.limit)
        synonyms = json.loads((root / cfg.chair_synonyms).read_text())
        caps = gen.answer([(r["image"], cfg.caption_prompt) for r in items], images, cfg.caption_max_new_tokens,
                          "chair")
        res = chair_metrics(caps, [r["objects"] for r in items], synonyms)
        row.update({"chair_s": res["CHAIR_s"], "chair_i": res["CHAIR_i"], "chair_recall": res["recall"]})
        predictions["chair"] = [{"image": r["image"], "caption": c} for r, c in zip(items, caps)]
    row.update(gen.stats.as_dict())
    row["params_m"] = sum(p.numel() for p in gen.model.parameters()) / 1e6
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(predictions, indent=1))
    return row


@torch.no_grad()
def kl_to_reference(cfg: EvalConfig, model: torch.nn.Module, processor, reference, ref_processor) -> float:
    """Mean forward KL(reference || model) per answer token, teacher-forced on the VQA questions and answers."""
    items = _read_jsonl(Path(cfg.data_dir) / cfg.vqa, cfg.limit)
    records = [{"id": str(r["question_id"]), "image": r.get("image"), "conversations": [
        {"from": "human", "value": (f"{IMAGE_PLACEHOLDER}\n" if r.get("image") else "") + r["question"]},
        {"from": "gpt", "value": r["answer"] if isinstance(r["answer"], str) else r["answer"][0]}]} for r in items]
    template = get_template(cfg.template)
    collator = SupervisedCollator(
        ConversationEncoder(processor, template, max_length=1 << 20), cfg.image_root,
        teacher=ConversationEncoder(ref_processor, template, max_length=1 << 20),
    )
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(records), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collator(records[start : start + cfg.batch_size]).items()}
        s_mask, t_mask, _ = paired_positions(batch["labels"], batch["teacher_labels"])
        s = model(**split_inputs(batch)).logits[s_mask]
        t_in = split_inputs(batch, "teacher_")
        if "pixel_values" in t_in:
            t_in["pixel_values"] = t_in["pixel_values"].to(reference.dtype)
        t = reference(**t_in).logits[t_mask]
        total += float(kd_loss(s, t)) * s.size(0)
        count += s.size(0)
    return total / max(count, 1)


def run(cfg: EvalConfig, ctx: Any) -> dict[str, Any]:
    rows = []
    reference = None
    if cfg.kl_reference is not None:
        reference = load_vlm(cfg.kl_reference, dtype=torch.float32)
        reference[0].to("cuda" if torch.cuda.is_available() else "cpu").eval()
    for label, path in cfg.models.items():
        log.info("evaluating %s (%s)", label, path)
        gen = Generator.from_artifact(path, cfg.template, batch_size=cfg.batch_size)
        row = {"model": label, **evaluate_model(cfg, gen, ctx.dir / label)}
        if reference is not None:
            gen.model.float()
            row["kl_teacher"] = kl_to_reference(cfg, gen.model, gen.processor, *reference)
        rows.append(row)
        del gen
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    write_report(rows, ctx.dir, ["vqa_acc", "pope_f1", "chair_i"])
    headline = ["model", "vqa_acc", "kl_teacher", "pope_f1", "pope_adversarial_f1", "chair_s", "chair_i",
                "tokens_per_s", "params_m"]
    table = markdown_table(rows, columns=[c for c in headline if any(c in r for r in rows)], floatfmt=".4f")
    log.info("evaluation (%s):\n%s", ctx.dir / "results.md", table)
    return {"rows": rows}
