#!/bin/bash
# What limits the distilled student on the GPU preset (issue 26): capacity (LLM depth) x budget (D2D epochs).
# One warm GPU, repo root, the wheel set carried as .whl (../shared/gpu/make_wheels.sh):
#   bash eval/bench/student_probes.sh            # writes runs/probes_out/{probes.md,<probe>.log,<probe>/...}
# On the lent GPU machine ($OUT set, at most 8 files come back) the results also go to $OUT as probes.md and one
# tarball, probes.tgz, of runs/probes_out.
# Builds the shapes_gpu world and teacher once, pretrains a 4-layer student LLM on the world's text like the
# world's 2-layer one, then runs adapter init + D2D + eval for each probe, all probes at once on the one GPU (the
# tiny models leave it mostly idle). p4_savers: the base probe with every memory saver (issue 25); p5: the 4-layer
# probe with per-reply KD; p6: the base probe with per-reply KD (kd.normalise=replies). The projector-frozen probe
# (CPU: within noise) left the default grid; its override is FROZEN_PROJECTOR below, to paste into PROBES.
# PROBES="name layers epochs [extra overrides...];..." changes the grid.
set -o pipefail
T0=$(date +%s)
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
if [ -z "$SKIP_INSTALL" ]; then  # SKIP_INSTALL=1: the wheels are installed and PYTHONPATH set already
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
DEVICE_OUT=$OUT; OUT=${PROBES_OUT:-runs/probes_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-585}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/env.txt"
RECIPE=${RECIPE:-shapes_gpu}  # RECIPE=demo EXTRA="<smaller world and steps>": the same flow on CPU in minutes
export W=runs/$RECIPE/world; TEACHER=runs/$RECIPE/teacher/model
read -ra EXTRA_ARGS <<< "${EXTRA:-}"
D="${PY:-python3} -m distill recipe=$RECIPE trainer.report_to=none trainer.disable_tqdm=true"
D="$D trainer.dataloader_num_workers=${WORKERS:-2}"

echo "=== world + teacher ($(date -u +%H:%M:%S))"
$D "${EXTRA_ARGS[@]}" 'pipeline=[world]' > "$OUT/world.log" 2>&1 || { tail -30 "$OUT/world.log"; exit 2; }
$D "${EXTRA_ARGS[@]}" 'pipeline=[teacher]' > "$OUT/teacher.log" 2>&1 &
TPID=$!
${PY:-python3} - <<'PY' > "$OUT/llm4.log" 2>&1
import os
from pathlib import Path
from data_prep.standins import StandinConfig, chat_documents, token_blocks, pretrain_llm
from distill.models.tiny import LLMSize
w = Path(os.environ["W"]); cfg = StandinConfig()
blocks = token_blocks(chat_documents(w / "data"), w / "tokenizer", cfg.block_size)
for layers in (4,):
    pretrain_llm(blocks, w / "tokenizer", LLMSize(hidden_size=64, intermediate_size=192, num_hidden_layers=layers),
                 w / f"llm_small{layers}", cfg)
PY
wait $TPID || { tail -30 "$OUT/teacher.log"; exit 3; }
echo "world + teacher + 4-layer LLM: $(( $(date +%s) - T0 )) s"

SAVERS='++stages.d2d.model.frozen_dtype=bfloat16 ++stages.d2d.model.weights_dtype=bfloat16 ++stages.d2d.training.optim=adamw_torch_8bit ++stages.d2d.training.optim_args=bf16_stochastic_round\=True'
FROZEN_PROJECTOR='++stages.d2d.trainable.modes={vision_tower:frozen,projector:frozen,llm:full}'
DEFAULT="p0_base 2 2 +teacher;p1_budget 2 4;p2_depth4 4 2;p3_depth4_budget 4 4;p4_savers 2 2 $SAVERS"
DEFAULT="$DEFAULT;p5_depth4_replies 4 2 ++stages.d2d.kd.normalise=replies;p6_replies 2 2 ++stages.d2d.kd.normalise=replies"
IFS=';' read -ra GRID <<< "${PROBES:-$DEFAULT}"
pids=()
for spec in "${GRID[@]}"; do
  read -ra f <<< "$spec"; name=${f[0]} layers=${f[1]} epochs=${f[2]}; extra=("${f[@]:3}")
  llm=$W/llm_small; [ "$layers" != 2 ] && llm=$W/llm_small$layers
  models=('~stages.eval.models' '++stages.eval.models.d2d=${run.dir}/d2d/model')
  args=()
  for e in "${extra[@]}"; do
    if [ "$e" = +teacher ]; then models+=("++stages.eval.models.teacher=$TEACHER"); else args+=("$e"); fi
  done
  $D "${EXTRA_ARGS[@]}" world_dir=$W 'pipeline=[adapter_init,d2d,eval]' run.name=$name stages.adapter_init.model.parts.llm=$llm \
     stages.d2d.training.num_train_epochs=$epochs stages.d2d.teacher.path=$TEACHER \
     stages.eval.kl_reference=$TEACHER "${models[@]}" "${args[@]}" > "$OUT/$name.log" 2>&1 &
  pids+=($!)
done
( sleep $(( $(left) - 20 )); kill "${pids[@]}" 2>/dev/null ) & GUARD=$!
for p in "${pids[@]}"; do wait "$p"; done
kill $GUARD 2>/dev/null

${PY:-python3} - "$OUT" "${GRID[@]}" <<'PY' | tee "$OUT/probes.md"
import json, sys
from pathlib import Path
out, grid = Path(sys.argv[1]), sys.argv[2:]
cols = ["vqa_acc", "vqa_existence", "vqa_shape", "vqa_color", "vqa_count", "pope_f1", "pope_adversarial_f1",
        "pope_random_yes", "chair_i", "kl_teacher"]
print("| probe | LLM layers | D2D epochs | model | " + " | ".join(cols) + " | D2D wall s |")
print("|---|---:|---:|---|" + "---:|" * (len(cols) + 1))
for spec in grid:
    name, layers, epochs = spec.split()[:3]
    run = Path("runs") / name
    (out / name).mkdir(parents=True, exist_ok=True)
    for f in ("eval/results.md", "eval/metrics.json", "d2d/metrics.json", "adapter_init/metrics.json"):
        if (run / f).exists():
            (out / name / f.replace("/", "_")).write_text((run / f).read_text())
    try:
        rows = json.loads((run / "eval/metrics.json").read_text())["rows"]
        wall = json.loads((run / "d2d/metrics.json").read_text()).get("wall_s")
    except FileNotFoundError as e:
        print(f"| {name} | {layers} | {epochs} | unfinished ({e.filename}) |")
        continue
    for r in rows:
        vals = " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols)
        print(f"| {name} | {layers} | {epochs} | {r['model']} | {vals} | {wall} |")
PY
# Where the students still differ from the teacher, by reply kind (eval/bench/kd_signal.py), while time is left
for spec in "${GRID[@]}"; do
  name=${spec%% *}
  if [ -d "runs/$name/d2d/model" ] && [ "$(left)" -gt 40 ]; then
    timeout $(( $(left) - 20 )) ${PY:-python3} -m eval.bench.kd_signal --teacher "$TEACHER" --data "$W/data" \
      --student "runs/$name/d2d/model" --records 512 2>/dev/null | grep '^|' > "$OUT/$name/kd_signal.md"
    echo "=== $name: kd_signal"; cat "$OUT/$name/kd_signal.md"
  fi
done
cp -r "$TEACHER" "$OUT/teacher_model" 2>/dev/null; cp -r "$W/llm_small4" "$OUT/llm_small4" 2>/dev/null
if [ -n "$DEVICE_OUT" ] && [ "$DEVICE_OUT" != "$OUT" ]; then
  cp "$OUT/probes.md" "$DEVICE_OUT/" 2>/dev/null
  tar czf "$DEVICE_OUT/probes.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
fi
echo "total $(( $(date +%s) - T0 )) s"
