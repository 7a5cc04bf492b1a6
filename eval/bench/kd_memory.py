"""Peak memory and time of the chunked KD loss (forward + backward) against the naive full-vocab fp32 one.

Random data at a real vocabulary (151,936, Qwen2) and hidden size (1,536, Qwen2-1.5B); the student's hidden
states and LM head require grad, the teacher's do not. Each variant runs in a fresh process so that CPU peak
memory (max RSS) is its own; on CUDA the allocator's peak is used. Reported memory is the peak *above* the
inputs (hidden states and both LM heads), i.e. what the loss itself costs.

    python -m eval.bench.kd_memory --device cpu --tokens 2048
    python -m eval.bench.kd_memory --device cuda --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from distill.losses.kd import KDOptions, chunked_kd_loss, token_divergence


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(variant: str, device: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    h_s = torch.randn(tokens, hidden, device=dev) * 0.02
    h_s.requires_grad_(True)
    w_s = (torch.randn(vocab, hidden, device=dev) * 0.02).requires_grad_(True)
    h_t = torch.randn(tokens, hidden, device=dev) * 0.02
    w_t = torch.randn(vocab, hidden, device=dev) * 0.02
    targets = torch.randint(0, vocab, (tokens,), device=dev)
    opts = KDOptions()

    def step() -> float:
        if variant == "naive":
            s_logits = (h_s @ w_s.t()).float()
            with torch.no_grad():
                t_logits = (h_t @ w_t.t()).float()
            loss = token_divergence(s_logits, t_logits, opts).mean()
        else:
            loss, _, _ = chunked_kd_loss(h_s, w_s, h_t, w_t, targets, opts, 1.0, chunk)
        loss.backward()
        h_s.grad = None
        w_s.grad = None
        return float(loss)

    if dev.type == "cuda":
        step()  # warm-up
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _current_rss_bytes()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
        peak = _rss_bytes() - base
    times.sort()
    return {"variant": variant, "peak_gib": peak / 2**30, "median_s": times[len(times) // 2], "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", choices=["naive", "chunked"], help="run one variant in this process")
    args = parser.parse_args()
    if args.variant:
        res = run_variant(args.variant, args.device, args.tokens, args.vocab, args.hidden, args.chunk, args.repeats)
        print(json.dumps(res))  # noqa: T201 - read by the parent process
        return
    rows = []
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, "-m", "eval.bench.kd_memory", "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    naive, chunked = rows
    print(f"device={args.device} tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} chunk={args.chunk}")  # noqa: T201
    print("| variant | peak above inputs (GiB) | median fwd+bwd (s) | loss |")  # noqa: T201
    print("|---|---:|---:|---:|")  # noqa: T201
    for r in rows:
        print(f"| {r['variant']} | {r['peak_gib']:.2f} | {r['median_s']:.3f} | {r['loss']:.5f} |")  # noqa: T201
    print(f"chunked/naive memory: {chunked['peak_gib'] / naive['peak_gib']:.1%}; "  # noqa: T201
          f"time: {chunked['median_s'] / naive['median_s']:.2f}x")


if __name__ == "__main__":
    main()
