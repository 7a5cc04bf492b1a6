"""The fp8 teacher forward: close to the exact one, only the LLM's linears converted, refused where it can't work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.models.fp8 import Fp8Linear, convert_to_fp8, fp8_fidelity


def test_fp8_linear_is_close_to_the_exact_product():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64)
    exact, approx = linear(x), Fp8Linear(linear)(x)
    assert approx.shape == exact.shape and approx.dtype == x.dtype
    rel = (approx - exact).norm() / exact.norm()
    assert 1e-4 < rel < 0.08  # e4m3 keeps ~3 mantissa bits: close, but not exact
    rows = x.clone()
    rows[0] *= 1e4  # per-row scales: one huge row does not cost the others their precision
    approx_rows = Fp8Linear(linear)(rows)
    assert ((approx_rows[1:] - exact[1:]).norm() / exact[1:].norm()) < 0.08


def test_convert_to_fp8_touches_the_llm_linears_only(tiny_artifacts):
    from distill.models.student import load_vlm

    model, processor = load_vlm(str(tiny_artifacts / "teacher"))
    exact, _ = load_vlm(str(tiny_artifacts / "teacher"))
    counts = convert_to_fp8(model)
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert counts["converted"] == len(fp8) > 0
    assert all(n.startswith("model.language_model.") for n in fp8)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.multi_modal_projector.linear_1, nn.Linear)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        a, b = exact(input_ids=ids).logits, model(input_ids=ids).logits
    kl = fp8_fidelity(a, b)
    assert 0 < kl < 0.05
    assert fp8_fidelity(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fp8_teacher_config_is_for_live_teachers(tiny_artifacts, tmp_path):
    from distill.training.kd import MANIFEST, TeacherConfig

    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="live teacher"):
        TeacherConfig(cache=str(tmp_path), fp8=True)
    assert TeacherConfig(path=str(tiny_artifacts / "teacher"), fp8=True).fp8
