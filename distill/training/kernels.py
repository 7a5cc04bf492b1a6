"""Opt-in faster kernels for a loaded model's LLM (GPU training): liger-kernel's fused Triton kernels and regional
``torch.compile`` of the decoder layers.

    from distill.training.kernels import apply_kernels
    apply_kernels(model, ["liger"])       # after loading (and after set_attn_implementation), before training

Settings (``model.kernels`` for the student, ``teacher.kernels`` for the teacher; a list, empty by default):

- ``liger``: liger-kernel's RMSNorm, SwiGLU and RoPE for every model family liger knows, applied through its generic
  instance API (``_apply_liger_kernel_to_instance``), which picks the functions by the checkpoint's ``model_type``
  (for a Llava-style model: its text model's, and its vision tower's where liger has one). Liger's fused linear +
  cross-entropy is left off: the stages compute their losses themselves from the hidden states. Liger patches
  transformers' modelling modules as well as the instance (its RoPE and the module classes of that family), so
  models of the same family built later in the process get the kernels too. Under autocast with fp32 master
  weights, transformers' RoPE multiplies the bf16 query and key by fp32 cos/sin tables and hands fp32 tensors to
  the attention, which casts them back to bf16 (SDPA and flex attention under autocast); liger's RoPE computes in
  fp32 and stores in the query's dtype, so the attention gets the same bf16 values without the fp32 copies.
- ``compile``: ``torch.compile(dynamic=True)`` of each decoder layer of the LLM (regional compilation: one graph
  for all layers of one shape, reused; the packed batches' varying lengths are symbolic, so they do not recompile).

Both need a CUDA device (liger's kernels are Triton kernels); on a machine without one, or without the package,
``apply_kernels`` raises with what is missing. The two together are refused with flex attention (inductor failed to
compile it behind liger's RoPE). ``[]`` changes nothing.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

KERNELS = ("liger", "compile")


def check_kernels(kernels: Sequence[str], where: str, attn_implementation: str | None = None) -> list[str]:
    """``kernels`` as a list of known, distinct names (``where`` names the setting in the message) that can run
    with the model's ``attn_implementation``."""
    if isinstance(kernels, str):
        kernels = [kernels] if kernels else []
    kernels = list(kernels)
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"{where}={kernels}: unknown {unknown}; expected a list of {KERNELS} (or [])")
    if len(set(kernels)) != len(kernels):
        raise ValueError(f"{where}={kernels}: each kernel at most once")
    if {"liger", "compile"} <= set(kernels) and attn_implementation == "flex_attention":
        raise ValueError(f"{where}={kernels} with flex attention: inductor fails to compile the text model's flex "
                         "attention behind liger's RoPE (H100, torch 2.11: a LoweringException in flex_attention; "
                         "BENCHMARKS.md). Use one of the two; compile alone was the faster one.")
    return kernels


def _require_cuda(model: torch.nn.Module, what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"kernels={what} needs a CUDA GPU (its kernels are Triton kernels); none is available. "
                           "Leave kernels empty on CPU.")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cuda", "meta"}:
        log.info("kernels=%s: model parameters on %s; the kernels run once it is on the GPU", what, sorted(devices))


def apply_liger(model: torch.nn.Module) -> int:
    """Liger's RMSNorm, SwiGLU and RoPE on ``model`` (chosen by liger from ``model.config.model_type``); returns
    the number of modules liger replaced. Raises if liger is missing or has no kernels for this model."""
    _require_cuda(model, "liger")
    if importlib.util.find_spec("liger_kernel") is None:
        raise RuntimeError("kernels=liger needs the liger-kernel package (the project's `gpu` extra: "
                           "pip install 'distill[gpu]')")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    patched = sum(1 for m in model.modules() if m._get_name().startswith("Liger"))
    if patched == 0:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise RuntimeError(f"kernels=liger: liger-kernel has no kernels for model type {model_type!r} (or its "
                           "text model's); remove 'liger' from this model's kernels")
    return patched


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LLM's decoder layers: the checkpointable layers (transformers' ``GradientCheckpointingLayer``) of
    ``model.get_decoder()`` (the text model of a VLM, the base model of a causal LM)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: torch.nn.Module) -> int:
    """``torch.compile(dynamic=True)`` each decoder layer in place (``nn.Module.compile``); returns how many."""
    _require_cuda(model, "compile")
    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"kernels=compile: no decoder layers found in {type(model).__name__}")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def apply_kernels(model: torch.nn.Module, kernels: Sequence[str]) -> dict[str, int]:
    """Apply ``kernels`` (see the module docstring) to ``model`` in place, liger first; returns what each one
    touched (modules replaced, layers compiled). ``[]``: nothing."""
    attn = getattr(model.config.get_text_config(), "_attn_implementation", None) if hasattr(model, "config") else None
    kernels = check_kernels(kernels, "kernels", attn)
    done: dict[str, int] = {}
    if "liger" in kernels:
        done["liger"] = apply_liger(model)
    if "compile" in kernels:
        done["compile"] = compile_layers(model)
    if done:
        log.info("kernels on %s: %s", type(model).__name__, done)
    return done
