#!/bin/bash
# Peak memory of the D2D 1.5B step at micro-batch 2 with the memory savers (issue 25), against the naive step and
# the stage's step without savers; one GPU, repo root, .whl carried (torchao among the wheels):
#   bash eval/bench/savers_memory.sh          # rows in $OUT/savers.jsonl, the table in $OUT/savers.md
# SKIP_INSTALL=1: the wheels are installed and PYTHONPATH set already. Times are not comparable when another job
# shares the GPU; the peaks are (max_memory_allocated of each process). TINY=1 PY=.venv/bin/python SKIP_INSTALL=1: the
# same rows at tiny shapes on CPU (a check of the script; CPU memory is max RSS).
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
if [ -z "$SKIP_INSTALL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
OUT=${OUT:-runs/savers_out}; mkdir -p "$OUT"
B="${PY:-python3} eval/bench/kd_throughput.py --stage d2d --student 1.5b --micro-batch 2 --steps 3 --warmup 2 --workers 4 --out $OUT/savers.jsonl ${TINY:+--tiny}"
P="--packing --attn ${TINY:+sdpa}"; [ -z "$TINY" ] && P="--packing --attn flex_attention"  # flex has no CPU backward
ROWS=("--variant naive" "--variant ours $P" "--variant ours $P --savers frozen_bf16 weights_bf16"
      "--variant ours $P --savers frozen_bf16 weights_bf16 --grad-ckpt"
      "--variant ours $P --savers frozen_bf16 weights_bf16 --teacher-fp8"
      "--variant ours $P --savers frozen_bf16 adam8bit" "--variant ours $P --savers frozen_bf16")
for args in "${ROWS[@]:0:${N_ROWS:-7}}"; do
  echo "=== $args ($(date -u +%H:%M:%S))"
  timeout ${RUN_TIMEOUT:-240} $B $args 2>&1 | grep -v "^{" | grep -iv "warn" | tail -3
done
${PY:-python3} - "$OUT/savers.jsonl" <<'PY' | tee "$OUT/savers.md"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = next((r["peak_gib"] for r in rows if r["variant"] == "naive" and r.get("peak_gib")), None)
print("| variant | savers | teacher fp8 | grad ckpt | peak GiB | vs naive | first loss | status |")
print("|---|---|---|---|---:|---:|---:|---|")
for r in rows:
    share = f"{r['peak_gib'] / base:.0%}" if base and r.get("peak_gib") else "-"
    print(f"| {r['variant']} | {' '.join(r.get('savers', [])) or '-'} | {bool(r.get('fp8_linears'))} | "
          f"{bool(r.get('grad_ckpt'))} | "
          f"{r.get('peak_gib', 0):.1f} | {share} | {r.get('first_loss')} | {r['status']} |")
PY
