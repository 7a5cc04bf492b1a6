#!/bin/bash
# The findings rerun (python -m eval.findings) on a lent GPU in calls of at most 10 minutes: each call goes on
# where the last stopped. BUDGET seconds after the start the driver gets SIGTERM, its pipelines checkpoint and stop,
# and the next call resumes them (on the same warm machine: runs/ stays there between calls). Repo root, .whl
# carried (../shared/gpu/make_wheels.sh):
#   BUDGET=500 bash eval/bench/findings_lease.sh     # again until it prints "findings: done"
# (the driver then has 60 s to let its pipelines checkpoint, and is killed 75 s after BUDGET at the latest)
# Brings back (at most 8 files on the lent machine): RESULTS.md once every seed has finished, and findings.tgz (the
# seeds' results and the logs).
set -o pipefail
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
if [ -z "$SKIP_INSTALL" ]; then  # SKIP_INSTALL=1: the wheels are installed and PYTHONPATH set already
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
DIR=${DIR:-runs/findings_gpu}; SEEDS=${SEEDS:-0 1 2}; BACK=${OUT:-$DIR}; mkdir -p "$BACK"; BACK=$(cd "$BACK" && pwd)
read -ra S <<< "$SEEDS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
timeout -k 75 -s TERM "${BUDGET:-500}" ${PY:-python3} -m eval.findings --dir "$DIR" --seeds "${S[@]}" --parts shared,seeds \
  -- trainer.report_to=none trainer.disable_tqdm=true ${EXTRA:-}
rc=$?
finished=0
for s in "${S[@]}"; do [ -f "$DIR/seed$s/eval/results.json" ] && finished=$((finished + 1)); done
status=0
if [ $rc -eq 0 ] && [ $finished -eq ${#S[@]} ]; then
  ${PY:-python3} -m eval.findings --dir "$DIR" --seeds "${S[@]}" --parts report --out "$BACK/RESULTS.md" \
    && echo "findings: done" || status=1
elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then  # the budget ran out: the pipelines checkpointed (or were killed)
  echo "findings: $finished of ${#S[@]} seeds finished; the budget ran out, run again to go on"
else
  echo "findings: the driver failed (exit $rc; $finished of ${#S[@]} seeds finished): see $DIR/logs"; status=$rc
fi
grep -h "done in" "$DIR"/logs/*.log 2>/dev/null | sed 's/^\[[^]]*\]//' | tail -40
( cd "$DIR" && tar czf "$BACK/findings.tgz" --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='predictions.json' \
    logs seed*/eval shared/teacher_eval 2>/dev/null )
exit $status
