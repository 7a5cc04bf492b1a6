#!/bin/bash
# issue 25 levers, one warm H100: STEPS="base liger ..." BUDGET=560 bash eval/bench/kd25_levers.sh
# (old_* rows: the package in .whl/base, e.g. git archive <rev> distill | tar -x -C .whl/base)
# liger + compile is refused with flex attention (distill/training/kernels.py: inductor fails to lower it).
# Brings back rows.jsonl and logs.tgz (each step's stdout and stderr; d2s_mb12 dumps its stacks every 60 s and
# when its timeout stops it, to show where it stalls).
T0=$(date +%s)
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
left() { echo $(( ${BUDGET:-585} - ($(date +%s) - T0) )); }
P=$(python3 eval/bench/kd_throughput.py --measure-peak --quiet); echo "peak $P  ($(( $(date +%s) - T0 )) s)"
BASE="python3 eval/bench/kd_throughput.py --micro-batch 8 --packing --attn flex_attention --peak-flops $P --out $OUT/rows.jsonl"
D2D="--stage d2d --student 1.5b"; D2S="--stage d2s --student 0.5b"
run() {  # name, min seconds needed, args...
  local name=$1 need=$2; shift 2
  local l=$(left)
  if [ $l -lt $need ]; then echo "=== skip $name (left $l s)"; return; fi
  echo "=== $name: $* (left $l s, $(date -u +%H:%M:%S))"
  local t=$(date +%s)
  local cap=$(( l - 5 )); [ -n "$CAP" ] && [ $CAP -lt $cap ] && cap=$CAP
  timeout -k 10 $cap $BASE ${WORKLOAD:-$D2D} "$@" > /tmp/$name.out 2> /tmp/$name.err
  echo "rc=$? $(( $(date +%s) - t )) s"; grep '^|' /tmp/$name.out; grep -v '^{' /tmp/$name.out | grep -v '^|' | tail -3
  grep -ci "recompil" /tmp/$name.err | sed 's/^/recompile log lines: /'; grep -iv "USDT\|warn" /tmp/$name.err | tail -4
  ( cd /tmp && tar czf "$OUT/logs.tgz" ./*.out ./*.err 2>/dev/null )  # after every step: a lease cut short keeps them
}
for step in ${STEPS:-prof_base base liger ours_base ours_liger compile vision prof_liger}; do
  case $step in
    old_base) PYTHONPATH=$PWD/.whl/base:/tmp/site run old_base 50 --variant bare --phases --steps 6 --warmup 3;;
    old_ours) PYTHONPATH=$PWD/.whl/base:/tmp/site run old_ours 60 --variant ours --steps 6 --warmup 3 --workers 8;;
    old_prof) PYTHONPATH=$PWD/.whl/base:/tmp/site run old_prof 60 --variant bare --steps 3 --warmup 3 --profile /tmp/prof_old --profile-no-trace; cp /tmp/prof_old/summary.md $OUT/prof_old_summary.md;;
    prof_base) run prof_base 60 --variant bare --steps 3 --warmup 3 --profile /tmp/prof_base --profile-no-trace; cp /tmp/prof_base/summary.md $OUT/prof_base_summary.md; cp /tmp/prof_base/ops.txt $OUT/prof_base_ops.txt;;
    base) run base 50 --variant bare --phases --steps 6 --warmup 3;;
    liger) run liger 50 --variant bare --phases --steps 6 --warmup 3 --kernels liger;;
    ours_base) run ours_base 60 --variant ours --steps 6 --warmup 3 --workers 8;;
    ours_liger) run ours_liger 60 --variant ours --steps 6 --warmup 3 --workers 8 --kernels liger;;
    vision) run vision 50 --variant bare --phases --steps 6 --warmup 3 --savers frozen_bf16;;
    compile) CAP=150 TORCH_LOGS=recompiles run compile 90 --variant bare --phases --steps 6 --warmup 3 --kernels compile;;
    ours_compile) CAP=150 TORCH_LOGS=recompiles run ours_compile 100 --variant ours --steps 6 --warmup 3 --workers 8 --kernels compile;;
    ours_compile_savers) CAP=170 TORCH_LOGS=recompiles run ours_compile_savers 110 --variant ours --steps 6 --warmup 3 --workers 8 --kernels compile --savers frozen_bf16 weights_bf16;;  # no fp32 master casts: the raw loop's bf16 weights
    savers_speed) run savers_speed 50 --variant bare --phases --steps 6 --warmup 3 --savers frozen_bf16 adam8bit weights_bf16;;
    d2s_base) WORKLOAD=$D2S run d2s_base 60 --variant ours --steps 6 --warmup 3 --workers 8;;
    d2s_liger) WORKLOAD=$D2S run d2s_liger 60 --variant ours --steps 6 --warmup 3 --workers 8 --kernels liger;;
    d2s_compile) CAP=150 WORKLOAD=$D2S TORCH_LOGS=recompiles run d2s_compile 100 --variant ours --steps 6 --warmup 3 --workers 8 --kernels compile;;
    d2s_compile_gmm) CAP=150 WORKLOAD=$D2S TORCH_LOGS=recompiles run d2s_compile_gmm 100 --variant ours --steps 6 --warmup 3 --workers 8 --kernels compile --experts grouped_mm;;  # no host read per MoE layer, so no graph break there
    d2s_phases) WORKLOAD=$D2S run d2s_phases 50 --variant bare --phases --steps 6 --warmup 3;;
    d2s_mb12) TORCH_LOGS=recompiles CAP=${CAP12:-120} WORKLOAD=$D2S run d2s_mb12 60 --variant bare --steps 3 --warmup 1 --micro-batch 12 --progress --recompile-limit 8;;  # torch's default limit: the stall as first seen
    d2s_mb12_lim) TORCH_LOGS=recompiles CAP=${CAP12:-120} WORKLOAD=$D2S run d2s_mb12_lim 60 --variant bare --steps 3 --warmup 1 --micro-batch 12 --progress;;  # the stages' limit with flex attention (64); H200 2026-12-07: no recompiles, the time goes to compiling the teacher's block mask
    d2s_mb12_long) TORCH_LOGS=recompiles CAP=580 WORKLOAD=$D2S run d2s_mb12_long 300 --variant bare --steps 3 --warmup 1 --micro-batch 12 --progress --stack-every 120;;  # how long the block mask's first compile takes, and what follows it
    d2s_mb12_bm) TORCH_LOGS=recompiles CAP=${CAP12:-120} WORKLOAD=$D2S run d2s_mb12_bm 60 --variant bare --steps 3 --warmup 1 --micro-batch 12 --progress --block-mask;;  # the block mask from the records' boundaries: no compile of transformers' mask
    d2s_mb*_row) mb=${step#d2s_mb}; mb=${mb%_row}; WORKLOAD=$D2S run $step 120 --variant ours --steps 6 --warmup 3 --workers 8 --micro-batch $mb --block-mask;;  # a D2S row through the Trainer at micro-batch N (d2s_mb12_row, d2s_mb16_row), uncompiled; its compile steps in the warm-up
    d2s_bm) WORKLOAD=$D2S run d2s_bm 60 --variant ours --steps 6 --warmup 3 --workers 8 --block-mask;;
    ours_compile_bm) CAP=150 TORCH_LOGS=recompiles run ours_compile_bm 100 --variant ours --steps 6 --warmup 3 --workers 8 --kernels compile --block-mask;;
    d2s_compile_bm) CAP=150 WORKLOAD=$D2S TORCH_LOGS=recompiles run d2s_compile_bm 100 --variant ours --steps 6 --warmup 3 --workers 8 --kernels compile --block-mask;;
    d2s_compile_gmm_bm) CAP=150 WORKLOAD=$D2S TORCH_LOGS=recompiles run d2s_compile_gmm_bm 100 --variant ours --steps 6 --warmup 3 --workers 8 --kernels compile --experts grouped_mm --block-mask;;  # grouped_mm once more: its 2026-12-07 row compiled each MoE layer apart (the router hook), past the limit eager
    d2s_mb*_compile) mb=${step#d2s_mb}; mb=${mb%_compile}; CAP=170 WORKLOAD=$D2S TORCH_LOGS=recompiles run $step 110 --variant ours --steps 6 --warmup 3 --workers 8 --micro-batch $mb --kernels compile --block-mask;;  # d2s_mb12_compile, d2s_mb16_compile
    ours_mb*_compile) mb=${step#ours_mb}; mb=${mb%_compile}; CAP=170 TORCH_LOGS=recompiles run $step 110 --variant ours --steps 6 --warmup 3 --workers 8 --micro-batch $mb --kernels compile --block-mask;;  # D2D at micro-batch N: ours_mb16_compile (73.5 GiB on an H100 80GB, 2026-12-07)
    d2s_compile_phases) CAP=150 WORKLOAD=$D2S TORCH_LOGS=recompiles run d2s_compile_phases 90 --variant bare --phases --steps 6 --warmup 3 --kernels compile --block-mask;;  # teacher forward vs the student's half of the compiled D2S step
    compile_prof) TORCH_LOGS=recompiles run compile_prof 90 --variant bare --steps 3 --warmup 3 --kernels compile --block-mask --profile /tmp/prof_c --profile-no-trace; cp /tmp/prof_c/summary.md $OUT/prof_compile_summary.md; cp /tmp/prof_c/ops.txt $OUT/prof_compile_ops.txt;;  # where the compiled D2D step's time goes
    ours_bm) run ours_bm 60 --variant ours --steps 6 --warmup 3 --workers 8 --block-mask;;
    d2s_mb12_exp) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CAP=${CAP12:-120} WORKLOAD=$D2S run d2s_mb12_exp 60 --variant bare --steps 3 --warmup 1 --micro-batch 12 --progress --recompile-limit 8;;  # is the stall the allocator's (retries near the card's limit)?
    d2s_prof) WORKLOAD=$D2S run d2s_prof 60 --variant bare --steps 3 --warmup 3 --profile /tmp/prof_d2s --profile-no-trace; cp /tmp/prof_d2s/summary.md $OUT/prof_d2s_summary.md;;
    prof_liger) run prof_liger 50 --variant bare --steps 3 --warmup 3 --kernels liger --profile /tmp/prof_liger --profile-no-trace; cp /tmp/prof_liger/summary.md $OUT/prof_liger_summary.md;;
  esac
done
python3 - <<'PY'
import json, os
for line in open(os.environ["OUT"] + "/rows.jsonl"):
    r = json.loads(line)
    print(r.get("kernels"), r["variant"], " ".join(r.get("savers", [])), f"tok/s {r.get('tokens_per_s', 0):.0f} mfu {r.get('mfu') or 0:.3f} peak {r.get('peak_gib', 0):.1f} med {r.get('step_s_median', 0):.3f} loss0 {r.get('first_loss')}",
          {k: r.get(k) for k in ("phases_ms", "loss_insitu_ms", "compiled_graphs", "graphs_after_warmup", "graphs_per_step", "kernels_applied", "status") if r.get(k) is not None})
PY
( cd /tmp && tar czf "$OUT/logs.tgz" ./*.out ./*.err 2>/dev/null )  # every step's full stdout / stderr
echo "total $(( $(date +%s) - T0 )) s"; date -u
