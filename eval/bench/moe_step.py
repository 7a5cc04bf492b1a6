"""Training-step time of a Qwen2-0.5B-shaped student, dense vs upcycled to 4 experts top-2 (random weights).

The student is a Llava model (CLIP-L/336-shaped tower, 576 image tokens, frozen; LLaVA MLP projector; Qwen2-0.5B
LLM) in bf16; one step is forward + CE loss + backward + AdamW over the trainable parameters, on random token
batches. The MoE student is the dense one upcycled on every other layer (LLaVA-MoD's layout), timed with each of
transformers' training-capable expert implementations (grouped_mm, the default, and eager, a loop over
experts). CUDA events, median after warm-up.

    python -m eval.bench.moe_step --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from distill.losses.ce import response_ce
from distill.models.trainable import apply_trainability
from distill.models.upcycle import UpcycleConfig, parameter_counts, upcycle


def build_dense() -> LlavaForConditionalGeneration:
    text = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=151646, vision_feature_layer=-2)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


def time_steps(model, batch: int, seq: int, steps: int, warmup: int) -> dict:
    model.cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    n_img = 576
    ids = torch.randint(0, 151000, (batch, seq), device="cuda")
    ids[:, 1 : 1 + n_img] = 151646
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=0).logits
        loss = response_ce(logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
    times.sort()
    med = times[len(times) // 2]
    return {"step_s": med, "tokens_per_s": batch * seq / med, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    rows = []
    dense = build_dense()
    modes = {"vision_tower": "frozen", "projector": "full", "llm": "full"}
    apply_trainability(dense, modes)
    total, _ = parameter_counts(dense, 1)
    rows.append({"model": "dense", "experts": "-", "params_m": total / 1e6, "active_m": total / 1e6,
                 **time_steps(dense, args.batch, args.seq, args.steps, args.warmup)})
    dense.cpu()
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, layers="every_other"))
    del dense
    apply_trainability(moe, modes)
    total, active = parameter_counts(moe, 2)
    # batched_mm gathers each token's expert weights (532 GiB here): a decode-time kernel, not for training.
    for impl in ("grouped_mm", "eager"):
        # Set on the text config, which the experts read (the Llava wrapper refuses set_experts_implementation).
        moe.config.text_config._experts_implementation = impl
        torch.cuda.empty_cache()
        rows.append({"model": "moe 4x top-2", "experts": impl, "params_m": total / 1e6, "active_m": active / 1e6,
                     **time_steps(moe, args.batch, args.seq, args.steps, args.warmup)})
    device = torch.cuda.get_device_name()
    print(f"{device} batch={args.batch} seq={args.seq} bf16 autocast, AdamW, LLM + projector trained")  # noqa: T201
    print("| model | experts impl | params (M) | active (M) | step (s) | tokens/s | peak (GiB) |")  # noqa: T201
    print("|---|---|---:|---:|---:|---:|---:|")  # noqa: T201
    for r in rows:
        print(f"| {r['model']} | {r['experts']} | {r['params_m']:.0f} | {r['active_m']:.0f} | {r['step_s']:.3f} | "  # noqa: T201
              f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} |")
    print(json.dumps(rows))  # noqa: T201


if __name__ == "__main__":
    main()
