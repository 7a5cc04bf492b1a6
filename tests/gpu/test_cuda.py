"""GPU checks, run on the lent machine with `make test-gpu` (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from distill.losses.kd import KDOptions, chunked_kd_loss, token_divergence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_chunked_kd_bf16_inputs_match_fp32_reference_on_cuda():
    torch.manual_seed(0)
    n, h, v = 1024, 256, 32000
    hs = (torch.randn(n, h, device="cuda") * 0.05).bfloat16().requires_grad_(True)
    ws = (torch.randn(v, h, device="cuda") * 0.05).bfloat16().requires_grad_(True)
    ht = (torch.randn(n, h, device="cuda") * 0.05).bfloat16()
    wt = (torch.randn(v, h, device="cuda") * 0.05).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda")
    loss, _, _ = chunked_kd_loss(hs, ws, ht, wt, targets, KDOptions(), 1.0, chunk_size=128)
    loss.backward()
    ref_h = hs.detach().float().requires_grad_(True)
    ref = token_divergence(ref_h @ ws.detach().float().t(), ht.float() @ wt.float().t(), KDOptions()).mean()
    ref.backward()
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-3)
    cos = torch.nn.functional.cosine_similarity(hs.grad.float().flatten(), ref_h.grad.flatten(), dim=0)
    assert float(cos) > 0.99


def test_d2d_step_on_cuda_bf16(tiny_world, tmp_path):
    from distill.models.student import StudentParts, build_student, save_artifact
    from distill.stages.imitation import ImitationConfig
    from distill.training.context import StageContext

    for name, llm in (("teacher", "llm_large"), ("student", "llm_small")):
        model, proc = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world[llm])))
        save_artifact(model, proc, tmp_path / name)
    cfg = ImitationConfig(
        model={"artifact": str(tmp_path / "student")},
        teacher={"path": str(tmp_path / "teacher")},
        data={"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"])},
        training={"max_steps": 3, "per_device_train_batch_size": 8, "bf16": True, "report_to": "none",
                  "save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-3},
    )
    metrics = cfg.run(StageContext(name="d2d", run_dir=tmp_path, training=cfg.training))
    assert metrics["global_step"] == 3 and torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_d2d_packed_flex_attention_with_gradient_checkpointing(tiny_artifacts, tiny_world, tmp_path):
    """The stage's flex_attention + packing + gradient checkpointing path (reentrant, chosen by checkpointing_for)
    trains. The non-reentrant failure it avoids showed at the 1.5B benchmark shapes, not with these tiny models
    (H100, 2026-12-07: this test passed with checkpointing_for disabled too), so this guards the path only."""
    from distill.stages.imitation import ImitationConfig
    from distill.training.context import StageContext

    cfg = ImitationConfig(
        model={"artifact": str(tiny_artifacts / "student"), "attn_implementation": "flex_attention"},
        teacher={"path": str(tiny_artifacts / "teacher")},
        data={"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"]),
              "packing": True},
        training={"max_steps": 3, "per_device_train_batch_size": 8, "bf16": True, "report_to": "none",
                  "save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-3, "gradient_checkpointing": True},
    )
    metrics = cfg.run(StageContext(name="d2d", run_dir=tmp_path, training=cfg.training))
    assert metrics["global_step"] == 3 and torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_kd_loss_reads_nothing_back_from_the_gpu(tiny_world, tiny_artifacts):
    """KDLoss finds the paired positions, targets and reply weights in the collator's host copy of the labels: its
    own code (the loss modules) makes no host-device synchronisation. (Model forwards may still synchronise inside
    transformers; those are not counted here.)"""
    import warnings
    from pathlib import Path

    import distill.losses.kd as losses_kd
    import distill.training.kd as training_kd
    from distill.data.formats import load_llava_json
    from distill.models.student import load_vlm
    from distill.stages.imitation import ImitationConfig, build_collator
    from distill.training.kd import KDConfig, KDLoss

    student, sproc = load_vlm(tiny_artifacts / "student")
    teacher, tproc = load_vlm(tiny_artifacts / "teacher")
    student, teacher = student.cuda().train(), teacher.cuda().eval()
    data = ImitationConfig(model={"artifact": str(tiny_artifacts / "student")},
                           teacher={"path": str(tiny_artifacts / "teacher")},
                           data={"train": [str(tiny_world["data"] / "instruct.json")],
                                 "image_root": str(tiny_world["images"])}).data
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    for normalise in ("tokens", "replies"):
        cfg = KDConfig(normalise=normalise, chunk_size=16)
        batch = build_collator(data, cfg, sproc, tproc)([ds[i] for i in range(8)])
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss_fn = KDLoss(teacher, cfg, alpha=0.5)
        num_items = (batch["labels"][:, 1:] != -100).sum()
        torch.cuda.synchronize()
        ours = {Path(losses_kd.__file__).resolve(), Path(training_kd.__file__).resolve()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loss, parts = loss_fn(student, batch, num_items)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [(Path(w.filename).name, w.lineno) for w in caught
                 if "synchroniz" in str(w.message) and Path(w.filename).resolve() in ours]
        assert not syncs, syncs
        assert torch.isfinite(loss) and set(parts) == {"kd", "ce"}
        loss.backward()


@pytest.mark.parametrize("stage", ["d2d", "d2s"])
def test_speed_preset_trains_both_imitation_stages(stage, tiny_artifacts, tiny_world, tmp_path, monkeypatch):
    """The settings of ``+speed=gpu`` (recipes/speed/gpu.yaml: packing, flex attention, compile on both models),
    read from the preset itself, train D2D and the upcycled D2S through the stages, each model's layers compiled."""
    from omegaconf import OmegaConf

    from distill.cli import RECIPES
    from distill.stages.imitation import ImitationConfig
    from distill.stages.sparse_imitation import SparseImitationConfig
    from distill.training import kernels as kernels_module
    from distill.training.context import StageContext

    preset = OmegaConf.to_container(OmegaConf.load(RECIPES / "speed" / "gpu.yaml").stages[stage])
    compiled = []
    real = kernels_module.compile_layers
    monkeypatch.setattr(kernels_module, "compile_layers", lambda model: compiled.append(real(model)) or compiled[-1])
    extra = {"upcycle": {"num_experts": 4, "top_k": 2, "layers": "every_other"}} if stage == "d2s" else {}
    cls = SparseImitationConfig if stage == "d2s" else ImitationConfig
    cfg = cls(
        model={"artifact": str(tiny_artifacts / "student"), **preset["model"]},
        teacher={"path": str(tiny_artifacts / "teacher"), **preset["teacher"]},
        data={"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"]),
              **preset["data"]},
        training={"max_steps": 3, "per_device_train_batch_size": 8, "bf16": True, "report_to": "none",
                  "save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-3},
        **extra,
    )
    metrics = cfg.run(StageContext(name=stage, run_dir=tmp_path, training=cfg.training))
    assert metrics["global_step"] == 3 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert len(compiled) == 2 and all(n > 0 for n in compiled)  # the student's and the teacher's layers
