"""The eval stage: active vs total parameters, and extra benchmarks in GQA / TextVQA / POPE form on the tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, set_seed

from distill.models.student import StudentParts, build_student, save_artifact
from distill.models.upcycle import UpcycleConfig, upcycle
from distill.stages.evaluate import EvalConfig, parameter_columns
from distill.training.context import StageContext

HIDDEN, FFN = 32, 48


def _tiny_llava() -> LlavaForConditionalGeneration:
    text = Qwen2Config(vocab_size=96, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=95))


@pytest.mark.parametrize("top_k", [1, 3])
def test_active_params_drop_the_unrouted_experts(top_k):
    dense = _tiny_llava()
    cols = parameter_columns(dense)
    assert cols["params_active_m"] == cols["params_total_m"]  # dense: every parameter is used per token
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=top_k, layers="every_other"))  # layers 0 and 2
    cols = parameter_columns(moe)  # top_k comes from the model's own config
    per_expert = 3 * HIDDEN * FFN  # gate, up and down projections, no biases
    unrouted = 2 * (4 - top_k) * per_expert
    assert round((cols["params_total_m"] - cols["params_active_m"]) * 1e6) == unrouted
    assert cols["params_total_m"] * 1e6 == sum(p.numel() for p in moe.parameters())


def test_active_params_count_one_path_per_token_with_modality_experts():
    """A token goes through its layer's text FFN or its visual expert, never both: the visual experts are in the
    total but not in the active count, before and after the text FFNs are upcycled."""
    from distill.models.modality import ModalityExpertsConfig, add_modality_experts

    dense = _tiny_llava()
    dense_total = parameter_columns(dense)["params_total_m"]
    model = add_modality_experts(dense, ModalityExpertsConfig(layers=[1, 3]))
    cols = parameter_columns(model)
    per_ffn = 3 * HIDDEN * FFN
    assert round((cols["params_total_m"] - dense_total) * 1e6) == 2 * per_ffn
    assert cols["params_active_m"] == pytest.approx(dense_total)
    moe = parameter_columns(upcycle(model, UpcycleConfig(num_experts=4, top_k=1, layers="every_other")))
    assert round((moe["params_total_m"] - moe["params_active_m"]) * 1e6) == 2 * 3 * per_ffn + 2 * per_ffn


def _benchmark_copies(data: Path, out: Path) -> dict[str, dict[str, str]]:
    """The world's VQA and POPE files rewritten as LLaVA's GQA and TextVQA files and as a POPE file whose images
    live in a separate folder: same questions, so a model must score exactly as on the originals."""
    vqa = [json.loads(line) for line in (data / "eval/vqa.jsonl").read_text().splitlines()]
    qs = [{"question_id": str(r["question_id"]), "image": r["image"], "text": r["question"], "category": "default"}
          for r in vqa]
    (out / "gqa_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    (out / "gqa_answers.json").write_text(json.dumps({
        str(r["question_id"]): {"answer": r["answer"], "types": {"structural": r["question_type"]}} for r in vqa}))
    tv = [{"question_id": r["question_id"], "image": r["image"], "text": r["question"]} for r in vqa]
    (out / "textvqa_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in tv))
    # Three humans agree with the reference, seven say something no model says: min(3/3, 1) = exact match. (Not
    # punctuation: "@@" normalises to "", which an empty prediction matches.)
    (out / "textvqa_answers.json").write_text(json.dumps({"data": [
        {"question_id": r["question_id"], "answers": [r["answer"]] * 3 + ["xyzzy"] * 7} for r in vqa]}))
    pope = [json.loads(line) for line in (data / "eval/pope_random.jsonl").read_text().splitlines()]
    coco = out / "coco"
    for r in pope[:4]:
        (coco / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (coco / r["image"]).write_bytes((data / "images" / r["image"]).read_bytes())
    (out / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pope))
    return {
        "gqa": {"format": "gqa", "questions": str(out / "gqa_questions.jsonl"),
                "answers": str(out / "gqa_answers.json")},
        "textvqa": {"format": "textvqa", "questions": str(out / "textvqa_questions.jsonl"),
                    "answers": str(out / "textvqa_answers.json")},
        "coco_pope": {"format": "pope", "questions": str(out / "pope.jsonl"), "image_root": str(coco)},
    }


@pytest.fixture(scope="module")
def artifacts(tiny_world, tmp_path_factory) -> dict[str, str]:
    """A dense tiny student and its 4-expert top-1 upcycled sibling, as artifacts."""
    out = tmp_path_factory.mktemp("artifacts")
    set_seed(0)
    dense, proc = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))
    save_artifact(dense, proc, out / "dense")
    save_artifact(upcycle(dense, UpcycleConfig(num_experts=4, top_k=1, layers="all")), proc, out / "moe")
    return {"dense": str(out / "dense"), "moe": str(out / "moe")}


def _eval(tiny_world, models: dict[str, str], run_dir: Path, **kwargs) -> list[dict]:
    cfg = EvalConfig(models=models, data_dir=str(tiny_world["data"]), image_root=str(tiny_world["images"]),
                     chair=None, chair_synonyms=None, limit=4, max_new_tokens=4, **kwargs)
    return cfg.run(StageContext(name="eval", run_dir=run_dir))["rows"]


def test_eval_stage_reports_extra_benchmarks_and_efficiency(tiny_world, artifacts, tmp_path):
    rows = _eval(tiny_world, artifacts, tmp_path, pope={"random": "eval/pope_random.jsonl"},
                 benchmarks=_benchmark_copies(tiny_world["data"], tmp_path))
    assert [r["model"] for r in rows] == ["dense", "moe"]
    for row in rows:
        # Same questions, prompts and references in another format: identical scores, type by type.
        vqa_types = {k[4:]: v for k, v in row.items() if k.startswith("vqa_")}
        assert len(vqa_types) > 2  # acc and at least two question types
        assert {k[4:]: v for k, v in row.items() if k.startswith("gqa_")} == vqa_types
        assert row["textvqa_acc"] == row["vqa_acc"]
        assert [k for k in row if k.startswith("textvqa_")] == ["textvqa_acc"]
        assert (row["coco_pope_f1"], row["coco_pope_yes"]) == (row["pope_random_f1"], row["pope_random_yes"])
        assert "params_m" not in row and row["params_total_m"] > 0
        side = tiny_world_image_grid(tiny_world)
        assert row["image_tokens"] == side * side  # CLIP's CLS token dropped by the 'default' strategy
        assert ("peak_mem_mb" in row) == torch.cuda.is_available()
    dense_row, moe_row = rows
    assert dense_row["params_active_m"] == dense_row["params_total_m"]
    assert moe_row["params_active_m"] < moe_row["params_total_m"]
    preds = json.loads((tmp_path / "eval" / "dense" / "predictions.json").read_text())
    assert len(preds["gqa"]) == 4
    assert [p["prediction"] for p in preds["gqa"]] == [p["prediction"] for p in preds["vqa"]]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {"gqa_acc", "textvqa_acc", "coco_pope_f1", "params_active_m"} <= set(saved[1])

    # References set from the model's own answers: the scores follow exactly (the untrained model scores 0 above).
    said = [p["prediction"] for p in preds["vqa"]]
    benchmarks = {k: v for k, v in _benchmark_copies(tiny_world["data"], tmp_path).items() if k != "coco_pope"}
    vqa = [json.loads(line) for line in (tiny_world["data"] / "eval/vqa.jsonl").read_text().splitlines()][:4]
    gqa = {str(r["question_id"]): {"answer": said[i] if i < 2 else "xyzzy", "types": {"structural": r["question_type"]}}
           for i, r in enumerate(vqa)}
    (tmp_path / "gqa_answers.json").write_text(json.dumps(gqa))
    humans = [[said[0]] + ["xyzzy"] * 9, [said[1]] * 3 + ["xyzzy"] * 7, ["xyzzy"] * 10, ["xyzzy"] * 10]
    (tmp_path / "textvqa_answers.json").write_text(json.dumps({"data": [
        {"question_id": r["question_id"], "answers": h} for r, h in zip(vqa, humans)]}))
    (row,) = _eval(tiny_world, {"dense": artifacts["dense"]}, tmp_path / "again", vqa=None, pope={},
                   benchmarks=benchmarks)
    assert row["gqa_acc"] == 0.5
    types = [r["question_type"] for r in vqa]
    assert {t: row[f"gqa_{t}"] for t in types} == {t: float(t in types[:2]) for t in types}
    assert row["textvqa_acc"] == pytest.approx((1 / 3 + 1) / 4)


def test_eval_config_rejects_a_label_of_a_builtin(tiny_world, artifacts):
    with pytest.raises(ValueError, match=r"labels \['pope_random'\] are taken"):
        EvalConfig(models=artifacts, data_dir=str(tiny_world["data"]),
                   image_root=str(tiny_world["images"]),
                   benchmarks={"pope_random": {"format": "pope", "questions": "eval/pope_random.jsonl"}})


def tiny_world_image_grid(tiny_world) -> int:
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(tiny_world["vision_tower"])
    return vision.image_size // vision.patch_size
