#!/usr/bin/env bash
# GPU smoke test (one GPU, well under 10 minutes on an H100): a few hundred co-training steps of the
# demo config under the deepspeed launcher with nccl and bf16 (both chosen by train/main.py when CUDA
# is present), then a resume from a checkpoint and the export. Last line: `tokens/s N` (fresh run,
# windows after the first).
#
#   bash bench/gpu_smoke.sh                 # data: runs/demo if present, else a synthetic run directory
#   DATA=runs/demo STEPS=300 PYTHON=.venv/bin/python bash bench/gpu_smoke.sh
#
# Needs a CUDA build of torch and deepspeed in $PYTHON's environment (the CPU venv of `make install`
# will not do).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
WORK=${WORK:-$(mktemp -d)}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} HF_HUB_OFFLINE=1

"$PYTHON" -c '
import torch, deepspeed
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device: install a CUDA build"
print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")'

DATA=${DATA:-}
if [ -z "$DATA" ]; then
  if [ -f runs/demo/stages/pack.json ]; then
    DATA=runs/demo
  else  # k=8, depth=3 like the demo run, 512-token sequences, random tokens
    DATA=$WORK/run
    "$PYTHON" -c "from tests.fixtures import make_run_dir; make_run_dir('$DATA', k=8, depth=3, seq_len=512, seqs_per_leaf=[4] * 512)"
  fi
fi
echo "data $DATA, work dir $WORK"

run() {  # --master_port avoids clashes with other jobs on the machine; --module: from this checkout, installed or not
  "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port "${PORT:-29650}" --module train.main \
    --data "$DATA" --out "$WORK/model" --set data.batch_size="$BATCH" --set schedule.log_every=50 "$@"
}

# 1. fresh run with a checkpoint 50 steps before the end (nccl, bf16, subgroups, touched-block AdamW)
run --no-resume --set schedule.max_steps="$STEPS" --set schedule.checkpoint_every=$((STEPS - 50)) \
    --set schedule.save=false 2>&1 | grep -v "INFO" | tail -n 20
RATE=$("$PYTHON" -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
rows = [r for r in rows if r["step"] > 50]  # the first window holds start-up and kernel autotuning
print(round(len(rows) / sum(1 / r["tokens_per_s"] for r in rows)))' "$WORK/model")

# 2. resume from that checkpoint to the end, then export
run --set schedule.max_steps="$STEPS" 2>&1 | grep -E "resumed|step |exported|Error|error" | tail -n 8
test -f "$WORK/model/export/meta.json" || { echo "export missing in $WORK/model" >&2; exit 1; }
echo "tokens/s $RATE"
