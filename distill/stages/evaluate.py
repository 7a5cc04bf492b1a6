"""The evaluation stage: every listed artifact on VQA, POPE, CHAIR and extra benchmarks, in one table.

File formats: VQA as JSONL ``{"question_id", "image", "question", "answer" (str or list), "question_type"}``;
POPE in its public JSONL (``question_id``, ``image``, ``text``, ``label``); CHAIR as JSONL ``{"image",
"objects"}`` plus a synonyms JSON (canonical object -> words). Paths are relative to ``data_dir``; images to
``image_root``. ``benchmarks`` adds GQA and TextVQA as LLaVA ships them, and more VQA/POPE files (e.g. POPE on
COCO), each with its own image folder: see ``eval/benchmarks.py``. Every file is read and every image checked
before the first model is loaded.

Columns: ``<label>_acc`` (+ ``<label>_<question type>``) per VQA-like benchmark, ``<label>_f1/_acc/_yes`` per
POPE file, ``pope_f1`` (mean over ``pope``), ``chair_s/_i/_recall``, ``kl_teacher`` (with ``kl_reference``), and
efficiency: ``image_tokens`` (LLM positions one image takes), ``tokens_per_s``, ``latency_ms_per_sample``,
``params_total_m``, ``params_active_m`` (parameters used per token: an MoE model counts top-k of each MoE
layer's experts; dense: equal to the total) and, on CUDA only,
``peak_mem_mb`` (peak allocated memory while the model is loaded and generates, net of what was allocated before,
e.g. the KL reference; absent on CPU, where it is not measured).

    python -m distill recipe=demo pipeline=[eval] stages.eval.limit=50
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill import paths as fs
from distill.data.collate import ConversationEncoder, SupervisedCollator, count_image_tokens
from distill.data.formats import IMAGE_PLACEHOLDER
from distill.data.templates import get_template
from distill.losses.kd import kd_loss, paired_positions
from distill.models.modality import visual_experts
from distill.models.student import load_vlm
from distill.models.upcycle import parameter_counts
from distill.training.kd import split_inputs
from distill.training.tracking import finish_wandb, log_eval_table, log_samples, start_wandb_run
from eval.benchmarks import Benchmark, Item, check_images, read_jsonl
from eval.generate import Generator
from eval.metrics import chair_metrics, pope_metrics, vqa_accuracy
from eval.report import markdown_table, write_report

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    main_process_only = True  # one copy of the world / one evaluation, not one per rank
    models: dict[str, str | None]
    """Label -> artifact folder, in table order. A label set to null is left out (a recipe drops a model that the
    recipe it extends lists)."""
    data_dir: str
    image_root: str
    template: str = "chatml"
    vqa: str | None = "eval/vqa.jsonl"
    pope: dict[str, str] = field(default_factory=lambda: {
        s: f"eval/pope_{s}.jsonl" for s in ("random", "popular", "adversarial")})
    chair: str | None = "eval/chair.jsonl"
    chair_synonyms: str | None = "eval/chair_synonyms.json"
    benchmarks: dict[str, dict[str, str]] = field(default_factory=dict)
    """More benchmarks, label -> ``{format: gqa|textvqa|vqa|pope, questions, answers (gqa, textvqa), image_root
    (default: the stage's)}``; relative paths are under ``data_dir``. See eval/benchmarks.py."""
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
        self.models = {label: path for label, path in self.models.items() if path is not None}
        if not self.models:
            raise ValueError("eval.models: nothing to evaluate")
        for label, path in self.models.items():
            if not fs.is_file(Path(path) / "config.json"):
                raise FileNotFoundError(f"eval.models.{label}: no checkpoint at {path}")
        root = Path(self.data_dir)
        for rel in [self.chair, self.chair_synonyms]:
            if rel is not None and not fs.is_file(root / rel):
                raise FileNotFoundError(f"eval: benchmark file {root / rel} not found")
        reserved = {"vqa", "pope", "chair", *(f"pope_{s}" for s in self.pope)}
        clash = sorted(reserved & set(self.benchmarks))
        if clash:
            raise ValueError(f"eval.benchmarks: labels {clash} are taken by the built-in benchmarks")
        self.suites()  # checks formats and files
        if self.kl_reference is not None and not fs.is_file(Path(self.kl_reference) / "config.json"):
            raise FileNotFoundError(f"eval.kl_reference: no checkpoint at {self.kl_reference}")
        if self.kl_reference is not None and self.vqa is None:
            raise ValueError("eval.kl_reference needs eval.vqa (the KL is measured on its answers)")
        if (self.chair is None) != (self.chair_synonyms is None):
            raise ValueError("eval.chair and eval.chair_synonyms go together")

    def suites(self) -> list[Benchmark]:
        """The VQA and POPE benchmarks to run, built-in ones first; the label prefixes their columns."""
        specs: dict[str, tuple[str, dict[str, Any]]] = {}
        if self.vqa is not None:
            specs["vqa"] = ("eval.vqa", {"format": "vqa", "questions": self.vqa})
        for split, rel in self.pope.items():
            specs[f"pope_{split}"] = (f"eval.pope.{split}", {"format": "pope", "questions": rel})
        for label, spec in self.benchmarks.items():
            specs[label] = (f"eval.benchmarks.{label}", spec)
        return [Benchmark.from_spec(label, spec, self.data_dir, self.image_root, key)
                for label, (key, spec) in specs.items()]

    def run(self, ctx: Any) -> dict[str, Any]:
        return run(self, ctx)


def score(bench: Benchmark, items: list[Item], gen: Generator, max_new_tokens: int) -> tuple[dict, list]:
    """Generate for one benchmark: its table columns and its predictions."""
    preds = gen.answer([(r["image"], r["question"]) for r in items], bench.image_root, max_new_tokens, bench.label)
    if bench.kind == "pope":
        res = pope_metrics(preds, [r["label"] for r in items])
        cols = {f"{bench.label}_f1": res["f1"], f"{bench.label}_acc": res["accuracy"],
                f"{bench.label}_yes": res["yes_ratio"]}
    else:
        types = [r["question_type"] for r in items]
        res = vqa_accuracy(preds, [r["answer"] for r in items], types)
        cols = {f"{bench.label}_acc": res["accuracy"]}
        if set(types) != {"all"}:
            cols.update({f"{bench.label}_{t}": v["accuracy"] for t, v in sorted(res["per_type"].items())})
    return cols, [{"question_id": r["question_id"], "prediction": p} for r, p in zip(items, preds)]


def parameter_columns(model: torch.nn.Module) -> dict[str, float | None]:
    """``params_total_m`` and ``params_active_m`` (per token; top-k from the text config's ``num_experts_per_tok``)."""
    total = sum(p.numel() for p in model.parameters())
    text = getattr(model.config, "text_config", None) or model.config
    top_k = getattr(text, "num_experts_per_tok", None)
    active: float | None = total
    if top_k:
        try:
            active = parameter_counts(model, top_k)[1]
        except AttributeError:  # an MoE whose layers are not laid out as model.language_model.layers[i].mlp
            log.warning("%s: MoE layers not found, params_active_m left out", type(model).__name__)
            active = None
    if active is not None:  # a token takes its layer's text FFN or its visual expert, never both: count the text path
        active -= sum(p.numel() for _, expert in visual_experts(model) for p in expert.parameters())
    return {"params_total_m": total / 1e6, "params_active_m": None if active is None else active / 1e6}


def evaluate_model(cfg: EvalConfig, gen: Generator, data: dict[str, tuple[Benchmark, list[Item]]],
                   chair: list[Item] | None, out_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    for label, (bench, items) in data.items():
        cols, predictions[label] = score(bench, items, gen, cfg.max_new_tokens)
        row.update(cols)
    if cfg.pope:
        row["pope_f1"] = sum(row[f"pope_{s}_f1"] for s in cfg.pope) / len(cfg.pope)
    if chair is not None:
        synonyms = json.loads((Path(cfg.data_dir) / cfg.chair_synonyms).read_text())
        caps = gen.answer([(r["image"], cfg.caption_prompt) for r in chair], Path(cfg.image_root),
                          cfg.caption_max_new_tokens, "chair")
        res = chair_metrics(caps, [r["objects"] for r in chair], synonyms)
        row.update({"chair_s": res["CHAIR_s"], "chair_i": res["CHAIR_i"], "chair_recall": res["recall"]})
        predictions["chair"] = [{"image": r["image"], "caption": c} for r, c in zip(chair, caps)]
    row["image_tokens"] = count_image_tokens(gen.processor)
    row.update(gen.stats.as_dict())
    row.update(parameter_columns(gen.model))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predictions.json").write_text(json.dumps(predictions, indent=1))
    return row


@torch.no_grad()
def kl_to_reference(cfg: EvalConfig, items: list[Item], model: torch.nn.Module, processor, reference,
                    ref_processor) -> float:
    """Mean forward KL(reference || model) per answer token, teacher-forced on the VQA items' questions and answers."""
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
        t = reference(**split_inputs(batch, "teacher_", reference.dtype)).logits[t_mask]
        total += float(kd_loss(s, t)) * s.size(0)
        count += s.size(0)
    return total / max(count, 1)


def run(cfg: EvalConfig, ctx: Any) -> dict[str, Any]:
    suites = cfg.suites()
    data = {b.label: (b, b.load(cfg.limit)) for b in suites}
    chair = None
    if cfg.chair:
        chair = read_jsonl(Path(cfg.data_dir) / cfg.chair, cfg.limit)
        check_images([{"question_id": f"#{i}", **r} for i, r in enumerate(chair)], Path(cfg.image_root),
                     Path(cfg.data_dir) / cfg.chair)
    cuda = torch.cuda.is_available()  # the Generator's device
    reference = None
    if cfg.kl_reference is not None:
        reference = load_vlm(cfg.kl_reference, dtype=torch.float32)
        reference[0].to("cuda" if cuda else "cpu").eval()
    rows = []
    for label, path in cfg.models.items():
        log.info("evaluating %s (%s)", label, path)
        if cuda:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        gen = Generator.from_artifact(path, cfg.template, batch_size=cfg.batch_size)
        row = {"model": label, **evaluate_model(cfg, gen, data, chair, ctx.dir / label)}
        if cuda:
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        if reference is not None:
            gen.model.float()
            row["kl_teacher"] = kl_to_reference(cfg, data["vqa"][1], gen.model, gen.processor, *reference)
        rows.append(row)
        del gen
        if cuda:
            torch.cuda.empty_cache()
    extra = [f"{b.label}_{'f1' if b.kind == 'pope' else 'acc'}" for b in suites if b.label in cfg.benchmarks]
    write_report(rows, ctx.dir, ["vqa_acc", "pope_f1", "chair_i", *extra])
    headline = ["model", "vqa_acc", "kl_teacher", "pope_f1", "pope_adversarial_f1", "chair_s", "chair_i", *extra,
                "image_tokens", "tokens_per_s", "params_total_m", "params_active_m", "peak_mem_mb"]
    table = markdown_table(rows, columns=[c for c in headline if any(c in r for r in rows)], floatfmt=".4f")
    log.info("evaluation (%s):\n%s", ctx.dir / "results.md", table)
    if start_wandb_run(ctx, getattr(ctx, "report_to", None)):
        log_eval_table(rows)
        log_samples(_samples(cfg, data, ctx.dir))
        finish_wandb()
    return {"rows": rows}


def _samples(cfg: EvalConfig, data: dict[str, tuple[Benchmark, list[Item]]], out: Path, n: int = 4) -> list:
    """The first ``n`` VQA items with every model's answer, for the wandb sample gallery."""
    if "vqa" not in data:
        return []
    bench, items = data["vqa"]
    answers = {label: json.loads((out / label / "predictions.json").read_text())["vqa"] for label in cfg.models}
    return [(bench.image_root / item["image"], f"{item['question']} (truth: {item['answer']})",
             "; ".join(f"{label}: {preds[i]['prediction']}" for label, preds in answers.items()))
            for i, item in enumerate(items[:n]) if item.get("image")]
