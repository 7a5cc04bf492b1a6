"""D2S: upcycles the D2D student, trains only experts + routers + projector, and the experts diversify."""

from __future__ import annotations

import json

import torch
from transformers import set_seed

from distill.models.student import StudentParts, build_student, load_vlm, save_artifact
from distill.stages.sparse_imitation import SparseImitationConfig
from distill.training.context import StageContext


def test_d2s_trains_experts_and_routers_only(tiny_world, tmp_path, cpu_training):
    set_seed(0)
    teacher, tproc = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_large"])))
    save_artifact(teacher, tproc, tmp_path / "teacher")
    student, sproc = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))
    save_artifact(student, sproc, tmp_path / "dense")
    cfg = SparseImitationConfig(
        model={"artifact": str(tmp_path / "dense")},
        teacher={"path": str(tmp_path / "teacher")},
        data={"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"])},
        upcycle={"num_experts": 4, "top_k": 2, "layers": "all"},
        training={**cpu_training, "max_steps": 12, "learning_rate": 5e-3},
    )
    metrics = cfg.run(StageContext(name="d2s", run_dir=tmp_path, training=cfg.training))
    moe, _ = load_vlm(tmp_path / "d2s" / "model")
    assert moe.config.text_config.model_type == "qwen2_moe"
    dense = load_vlm(tmp_path / "dense")[0].state_dict()
    after = moe.state_dict()
    # Frozen: vision tower, attention, norms, embeddings, LM head: bit-identical to the dense student.
    for name, value in dense.items():
        if ".mlp." not in name and "multi_modal_projector" not in name:
            assert torch.equal(value, after[name]), name
    assert any(not torch.equal(dense[n], after[n]) for n in dense if "multi_modal_projector" in n)
    # The experts started as identical copies and became different from each other.
    for layer in range(moe.config.text_config.num_hidden_layers):
        experts = after[f"model.language_model.layers.{layer}.mlp.experts.down_proj"]
        diffs = [float((experts[i] - experts[j]).abs().max()) for i in range(4) for j in range(i + 1, 4)]
        assert min(diffs) > 0, layer
    assert metrics["params_active"] < metrics["params_total"]
    last = metrics["last_logged"]
    assert {"loss/kd", "loss/ce", "loss/aux"} <= set(last) and any(k.startswith("loss/expert_load/") for k in last)
    load = json.loads((tmp_path / "d2s" / "expert_load.json").read_text())["load"]
    assert all(abs(sum(row) - 1) < 1e-5 for row in load)
    assert (tmp_path / "d2s" / "expert_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_d2s_trains_the_ffns_of_dense_layers_as_llava_mod(tiny_artifacts, tiny_world, tmp_path, cpu_training):
    """MoE on layer 0 only (every_other of 2): layer 1's FFN trains with the experts (``dense_ffn``, LLaVA-MoD's
    choice) unless frozen; attention never does."""
    after = {}
    for name, extra in (("default", {}), ("frozen", {"trainable": {"modes": {
            "vision_tower": "frozen", "projector": "full", "experts": "full", "router": "full",
            "dense_ffn": "frozen"}}})):
        cfg = SparseImitationConfig(
            model={"artifact": str(tiny_artifacts / "student")}, teacher={"path": str(tiny_artifacts / "teacher")},
            data={"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"]),
                  "limit": 16},
            upcycle={"num_experts": 4, "top_k": 2, "layers": "every_other"},
            training={**cpu_training, "max_steps": 2}, **extra)
        cfg.run(StageContext(name=name, run_dir=tmp_path, training=cfg.training))
        after[name] = load_vlm(tmp_path / name / "model")[0].state_dict()
    dense = load_vlm(tiny_artifacts / "student")[0].state_dict()
    ffn = "model.language_model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(after["default"][ffn], dense[ffn])
    assert torch.equal(after["frozen"][ffn], dense[ffn])
    for state in after.values():
        for key in (k for k in dense if ".self_attn." in k):
            assert torch.equal(state[key], dense[key]), key
