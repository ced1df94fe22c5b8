#!/usr/bin/env bash
# Does a 2-rank DeepSpeed CPU training exit cleanly, every time? N short runs (the default config, 3 steps) on RUN;
# counts non-zero exits, "terminate called" aborts and DeepSpeed buffers left in /dev/shm.
# Usage: bench/launch_exits.sh [N=60] [RUN=runs/demo]   (about 19 s a run on 2 cores with the demo run)
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-60}; RUN=${2:-runs/demo}
BIN=.venv/bin; OUT=$(mktemp -d)
export TORCH_EXTENSIONS_DIR=$PWD/.cache/torch_extensions HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
failed=0; aborted=0; left=0
for i in $(seq 1 "$N"); do
  port=$($BIN/python -c "from train.distributed import free_port; print(free_port())")
  $BIN/deepspeed --num_gpus 2 --master_port "$port" train/main.py --data "$RUN" --out "$OUT/run$i" \
    --set schedule.max_steps=3 > "$OUT/log$i" 2>&1 || failed=$((failed + 1))
  grep -q "terminate called" "$OUT/log$i" && aborted=$((aborted + 1))
  left=$((left + $(ls /dev/shm 2>/dev/null | grep -c "deepspeed_allreduce_buffer_.*_${port}_")))
  rm -rf "$OUT/run$i"
  echo "run $i/$N: non-zero exits $failed, 'terminate called' $aborted, /dev/shm buffers left $left"
done
echo "logs: $OUT"
echo "launch exits: $N runs, $failed non-zero exits, $aborted 'terminate called', $left /dev/shm buffers left"
