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
