#!/usr/bin/env bash
# One lent-GPU session's checks in one call (device time is short: about 6 minutes here):
#   bash perf/gpu_session.sh OUTDIR
# 1. perf/gpu_check.py (correctness vs float64 at ResNet-50 sizes, kernel timings, CUDA graphs,
#    arrival counters, the opt-in persistent path in a killable child);
# 2. triton-bn bench --shapes resnet50 --modes forward_backward (batch 32, triton_bn / torch eager /
#    torch.compile);
# 3. triton-bn bench --model resnet50 (training steps, eager and one CUDA graph);
# 4. perf/graph_bench.py (each ResNet-50 BN layer's training step in CUDA graphs: GPU time only).
# STEPS (default "check bench model graph") picks some; each step has its own time limit so that
# one that hangs leaves the others their time.
set -u
OUT=${1:-perf/results/tmp-gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=" ${STEPS:-check bench model graph} "
{
  date -u +"%Y-%m-%dT%H:%MZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
t0=$(date +%s)
[[ $STEPS == *" check "* ]] && { timeout -k 5 ${T_CHECK:-180} $PY perf/gpu_check.py --batch 64 \
  --max-seconds 90 --persistent-timeout 60 ${CHECK_ARGS:-} > "$OUT/gpu_check.log" 2>&1
echo "gpu_check: exit $? after $(( $(date +%s) - t0 )) s"; }
t1=$(date +%s)
[[ $STEPS == *" bench "* ]] && { timeout -k 5 ${T_BENCH:-120} $PY -m triton_bn.cli bench --shapes resnet50 --batches 32 \
  --modes forward_backward --max-minutes 1.5 --no-plot --no-progress --rep-ms 25 \
  --csv "$OUT/bench_resnet50.csv" > "$OUT/bench_resnet50.log" 2>&1
echo "bench resnet50 shapes: exit $? after $(( $(date +%s) - t1 )) s"; }
t2=$(date +%s)
[[ $STEPS == *" model "* ]] && { timeout -k 5 ${T_MODEL:-80} $PY -m triton_bn.cli bench --model resnet50 --model-batch 64 \
  --exec eager,cuda_graph --no-plot --csv "$OUT/bench_model.csv" > "$OUT/bench_model.log" 2>&1
echo "bench resnet50 model: exit $? after $(( $(date +%s) - t2 )) s"; }
t3=$(date +%s)
[[ $STEPS == *" graph "* ]] && { timeout -k 5 ${T_GRAPH:-120} $PY perf/graph_bench.py --batch 32 \
  > "$OUT/graph_bench.log" 2>&1
echo "graph_bench: exit $? after $(( $(date +%s) - t3 )) s"; }
for f in gpu_check:25 bench_resnet50:30 bench_model:20 graph_bench:40; do
  [[ -f "$OUT/${f%%:*}.log" ]] && { echo "===== ${f%%:*} (tail)"; tail -n "${f##*:}" "$OUT/${f%%:*}.log"; }
done
true  # the exit status is each step's line above, not the last test
