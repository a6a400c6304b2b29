#!/usr/bin/env bash
# The CUDA checks of the README's "On a GPU" section, as run on a lent GPU machine: the benchmark's
# forward and gradient tables on the GPU and, at the same time, on the same machine's CPU (one
# thread, the GPU hidden), the smoke sweep with `device: cuda`, then the qubit scaling table on the
# GPU. Everything lands in DIR/results.tgz (rewritten after each step) and DIR/log.txt.
#
#   bash tools/cuda_check.sh DIR [cuda|cpu]     # cpu: the same steps without a GPU (a dry run)
set -u
out=$(realpath -m "${1:?usage: tools/cuda_check.sh DIR [cuda|cpu]}")
device=${2:-cuda}
work=$(mktemp -d /tmp/cuda-check-XXXX)
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 QMLBENCH_JAX_CACHE="$work/jax-cache"
log() { echo "== $(date +%T) $*" | tee -a "$out/log.txt"; }
pack() { tar czf "$out/results.tgz" -C "$work" --exclude jax-cache . ; }
pairs="classical/backprop tensorcircuit/backprop pennylane/backprop pennylane-torch/backprop tensorcircuit/spsa"

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  nproc; grep -m1 "model name" /proc/cpuinfo; } 2>&1 | tee -a "$out/log.txt"

log "cpu benchmark (background, GPU hidden)"
( CUDA_VISIBLE_DEVICES= JAX_PLATFORMS=cpu timeout 420 python3 bench.py --device cpu --sections forward gradient --limit scan --budget-s 0.5 \
    --only $pairs --out "$work/bench_cpu" --tracking-uri "sqlite:///$work/bench_cpu.db" > "$work/bench_cpu.log" 2>&1
  echo "cpu benchmark exit $?" >> "$work/bench_cpu.log" ) &
cpu_job=$!

log "$device benchmark: forward, gradient"
timeout 200 python3 bench.py --device "$device" --sections forward gradient --limit scan --budget-s 0.5 --only $pairs --out "$work/bench_$device" \
    --tracking-uri "sqlite:///$work/bench_$device.db" > "$work/bench_$device.log" 2>&1
log "exit $?"; tail -n 30 "$work/bench_$device.log" >> "$out/log.txt"; pack

log "smoke sweep, device $device"
timeout 100 python3 run.py --only classical_backprop pl_backprop tc_backprop --set "device=$device" \
    --tracking-uri "sqlite:///$work/smoke.db" > "$work/smoke.log" 2>&1
log "exit $?"; tail -n 25 "$work/smoke.log" >> "$out/log.txt"; pack

log "$device benchmark: qubit scaling"
timeout 200 python3 bench.py --device "$device" --sections scaling --qubits 4 8 12 --budget-s 0.5 --only tensorcircuit/backprop pennylane/backprop \
    --out "$work/scaling_$device" --tracking-uri "sqlite:///$work/scaling_$device.db" > "$work/scaling_$device.log" 2>&1
log "exit $?"; tail -n 20 "$work/scaling_$device.log" >> "$out/log.txt"; pack

wait "$cpu_job"
log "cpu benchmark done"; tail -n 30 "$work/bench_cpu.log" >> "$out/log.txt"; pack
log "done"
