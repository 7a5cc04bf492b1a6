"""Training-step time, tokens/s and peak memory per GPU of D2D and D2S under DeepSpeed ZeRO-2 / ZeRO-3.

Real-size shapes, random weights: a Qwen2-7B-shaped teacher and a Qwen2-1.5B-shaped student, both Llava models
with a CLIP-L/336-shaped tower (576 image tokens; LLaVA MLP projector). D2D trains the student's LLM + projector;
D2S trains the experts, routers and projector of the student upcycled to 4 experts top-2 on every other layer
(LLaVA-MoD's layout; built from the MoE config directly, since the weights are random anyway). One step is what
the stage runs: the DistillTrainer with the stage's own loss (KDLoss / SparseKDLoss: student and teacher forwards,
chunked KD + CE, router loss for D2S), backward and AdamW, through the Trainer's DeepSpeed integration with
``recipes/deepspeed/zero{2,3}.json`` and bf16. Under ZeRO-3 the teacher is partitioned too (``prepare_teacher``).

Times are medians after warm-up (the step is synchronised on every rank); tokens/s counts every rank's tokens;
memory is ``torch.cuda.max_memory_allocated`` over the timed steps, the largest of the ranks. Rank 0 prints one
markdown row (and the header with ``--header``) and a JSON line.

    torchrun --nproc_per_node 2 eval/bench/zero_step.py --stage d2d --zero 3 --steps 10
    torchrun --nproc_per_node 1 eval/bench/zero_step.py --stage d2s --zero 2 --header
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 eval/bench/zero_step.py --tiny --stage d2s --zero 3 --steps 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script by torchrun from a checkout, not only as an installed package

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    TrainerCallback,
    set_seed,
)

from distill.models.teacher import freeze  # noqa: E402
from distill.models.trainable import apply_trainability  # noqa: E402
from distill.models.upcycle import UpcycleConfig, moe_text_config, parameter_counts  # noqa: E402
from distill.stages.sparse_imitation import SPARSE_TRAINABLE  # noqa: E402
from distill.training.kd import KDConfig, KDLoss  # noqa: E402
from distill.training.moe import RouterRecorder, SparseKDLoss  # noqa: E402
from distill.training.trainer import DistillTrainer, training_arguments  # noqa: E402

log = logging.getLogger("zero_step")

IMAGE_TOKEN = 151646
# Qwen2 text configs and a CLIP vision config per size; the teacher's vocabulary is padded differently on purpose.
SHAPES = {
    "real": {
        "teacher": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        "student": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
        "image_token": IMAGE_TOKEN,
    },
    "tiny": {
        "teacher": dict(vocab_size=520, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        "student": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8, projection_dim=32),
        "image_token": 500,
    },
}


def llava(text: dict, vision: dict, image_token: int, moe: UpcycleConfig | None = None) -> LlavaConfig:
    text_config = Qwen2Config(max_position_embeddings=4096, **text)
    if moe is not None:
        text_config, _ = moe_text_config(text_config, moe)
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text_config,
                       image_token_index=image_token, vision_feature_layer=-2,
                       tie_word_embeddings=text["tie_word_embeddings"])


def image_tokens(vision: dict) -> int:
    return (vision["image_size"] // vision["patch_size"]) ** 2  # "default" strategy: CLS dropped


class SyntheticBatches:
    """Collator of random image-conversation batches: [image tokens][prompt][response], the last half labelled.

    Teacher and student see the same tokens (same tower shape, shared tokenizer), as the KD loss pairs them."""

    def __init__(self, seq: int, vocab: int, n_image: int, image_size: int, image_token: int) -> None:
        self.seq, self.vocab, self.n_image, self.image_size, self.image_token = seq, vocab, n_image, image_size, \
            image_token

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(int(rows[0]["i"]))
        b = len(rows)
        ids = torch.randint(0, min(self.vocab, self.image_token) - 1, (b, self.seq), generator=g)
        ids[:, 1 : 1 + self.n_image] = self.image_token
        labels = ids.clone()
        labels[:, : self.seq // 2] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                 "pixel_values": torch.randn(b, 3, self.image_size, self.image_size, generator=g)}
        return {**batch, **{f"teacher_{k}": v for k, v in batch.items()}}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronised), and the peak memory of the steps after warm-up."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda, self.times, self.start = warmup, cuda, [], 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step == self.warmup and self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.start)


def build(args: argparse.Namespace, device: torch.device):
    """Student (fp32 master weights, as the stages load it) and frozen teacher (bf16 on GPU), random weights."""
    shapes = SHAPES["tiny" if args.tiny else "real"]
    moe = UpcycleConfig(num_experts=args.experts, top_k=args.top_k, layers="every_other") \
        if args.stage == "d2s" else None
    teacher_dtype = torch.float32 if args.tiny else torch.bfloat16
    set_seed(0)
    with device:  # built in place: a 7B model initialised on the host takes minutes
        student = LlavaForConditionalGeneration(llava(shapes["student"], shapes["vision"], shapes["image_token"],
                                                      moe))
        torch.set_default_dtype(teacher_dtype)  # never a full fp32 copy of the teacher
        try:
            teacher = LlavaForConditionalGeneration(llava(shapes["teacher"], shapes["vision"], shapes["image_token"]))
        finally:
            torch.set_default_dtype(torch.float32)
    freeze(teacher)
    for model in (student, teacher):
        model.set_attn_implementation("sdpa")
    if moe is not None:
        student.config.text_config._experts_implementation = "sorted"  # the D2S stage's default
        apply_trainability(student, dict(SPARSE_TRAINABLE))
    else:
        apply_trainability(student, {"vision_tower": "frozen", "projector": "full", "llm": "full"})
    return student, teacher, shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("d2d", "d2s"), default="d2d")
    parser.add_argument("--zero", type=int, choices=(2, 3), default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2, help="per GPU")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (image tokens included)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024, help="KD chunk size (tokens)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the student")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (gloo): checks that it runs")
    parser.add_argument("--header", action="store_true", help="print the table header too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.tiny:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        args.seq = min(args.seq, 64)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    student, teacher, shapes = build(args, device)
    total, active = parameter_counts(student, args.top_k)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_image = image_tokens(shapes["vision"])
    collator = SyntheticBatches(args.seq, shapes["student"]["vocab_size"], n_image, shapes["vision"]["image_size"],
                                shapes["image_token"])
    out = tempfile.mkdtemp(prefix="zero_step_")
    training = {
        "deepspeed": str(REPO / "recipes" / "deepspeed" / f"zero{args.zero}.json"),
        "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
        "max_steps": args.warmup + args.steps, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "bf16": cuda, "use_cpu": not cuda, "report_to": "none", "save_strategy": "no",
        "logging_steps": 1000, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0,
        "gradient_checkpointing": args.grad_ckpt,
    }
    targs, _ = training_arguments(training, Path(out))
    world = targs.world_size
    dataset = Dataset.from_dict({"i": list(range(args.batch * world * (args.warmup + args.steps)))})
    kd = KDConfig(chunk_size=args.chunk)
    if args.stage == "d2s":
        loss_fn = SparseKDLoss(teacher, kd, 0.5, RouterRecorder(student), args.top_k, 0.01, 0.0)
    else:
        loss_fn = KDLoss(teacher, kd, 1.0)
    timer = StepTimer(args.warmup, cuda)
    trainer = DistillTrainer(model=student, args=targs, train_dataset=dataset, data_collator=collator,
                             loss_fn=loss_fn, callbacks=[timer])
    loss_fn.prepare(trainer)  # the teacher: ZeRO-3 shards or a bf16 replica
    if cuda:
        torch.cuda.empty_cache()
    status = "ok"
    try:
        trainer.train()
    except torch.OutOfMemoryError as oom:
        if world > 1:  # the other ranks wait in a collective: let the launcher stop them all
            raise
        log.warning("out of memory at step %d: %s", trainer.state.global_step, str(oom).split(". ")[0])
        status = "OOM"
    step = statistics.median(timer.times) if timer.times else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    peaks = [peak]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, peak)
        peaks = gathered
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if targs.process_index != 0:
        return
    tokens = args.batch * args.seq * world
    name = torch.cuda.get_device_name() if cuda else "cpu (--tiny)"
    row = {"stage": args.stage, "zero": args.zero, "gpus": world, "device": name, "batch_per_gpu": args.batch,
           "seq": args.seq, "params_total_m": total / 1e6, "params_active_m": active / 1e6,
           "trainable_m": trainable / 1e6, "step_s": step, "tokens_per_s": tokens / step if timer.times else 0.0,
           "peak_gib_max": max(peaks), "peak_gib": peaks, "status": status, "date": time.strftime("%Y-%m-%d")}
    if args.header:
        print("| stage | ZeRO | GPUs | device | batch/GPU x seq | student params (M, active) | step (s) | "  # noqa: T201
              "tokens/s | peak GiB/GPU |")
        print("|---|---|---:|---|---|---|---:|---:|---:|")  # noqa: T201
    print(f"| {args.stage} | {args.zero} | {world} | {name} | {args.batch} x {args.seq} | "  # noqa: T201
          f"{total / 1e6:,.1f} ({active / 1e6:,.1f}) | {step:.3f} | {row['tokens_per_s']:,.0f} | "
          f"{max(peaks):.1f}{'' if status == 'ok' else ' ' + status} |")
    print(json.dumps(row))  # noqa: T201


if __name__ == "__main__":
    main()
