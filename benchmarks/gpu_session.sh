#!/usr/bin/env bash
# Issue 9's GPU work in few device calls (the GPU machine has torch, torchvision, pandas, seaborn, tqdm).
#
# Once, on the CPU machine, in the project root (.carry is git-ignored; never commit the images). Carry the
# archive, not the unpacked tree of 60,000 small files:
#     mkdir -p .carry && cp ../shared/data/cifar10-jpeg.tar.gz .carry/
# Device calls, each with carry [".carry"]; call again within the machine's idle time (30 s), or the
# background runs go back with the machine:
#     bash benchmarks/gpu_session.sh start      # throughput benchmark, then the verification runs in the background
#     bash benchmarks/gpu_session.sh wait 570   # poll up to N seconds; repeat until it says "all runs finished"
# Settings by environment: VERIFY_ARGS (the runs), THROUGHPUT_ARGS (the benchmark), DATA_ROOT, RUNS, RESULTS,
# PYTHON (default python3).
# Every call leaves under $OUT: session.log, results.tgz (the results folder and the run logs: metrics
# only) and train_throughput.json. Back on the CPU machine: tar -xzf <files_at>/results.tgz,
# then commit results/ and add the throughput numbers to benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-runs/gpu-session}"
PYTHON="${PYTHON:-python3}"
DATA_ROOT="${DATA_ROOT:-.data/cifar10-jpeg}"
RUNS="${RUNS:-runs/verify}"
RESULTS="${RESULTS:-results}"
# --epochs auto: as many epochs as let all runs (ce, dbt, hdkd x 2 seeds) train in --minutes at the measured speeds;
# 14 leaves room in a 30-minute lease for the start, the benchmark, compilation and evaluation.
VERIFY_ARGS="${VERIFY_ARGS:---epochs auto --minutes 14 --jobs 3 --device cuda --compile step --compile-mode reduce-overhead}"
THROUGHPUT_ARGS="${THROUGHPUT_ARGS:---batch-sizes 64 --modes eager compile --steps 200 --warmup 30}"
CIFAR10_JPEG_SHA256=1d26e266d748fedf13fb464d83e11ea734f0c5a9f15db57ca72e409919b435c7  # ../shared/data/README.md
LOG="$RUNS/session.log"
mkdir -p "$OUT" "$RUNS"

pack() {  # what comes back: at most 8 files, 2 folders deep, so one archive ($OUT is emptied before each call)
    cp "$LOG" "$OUT/session.log"
    cp "$RUNS/train_throughput.json" "$OUT/" 2>/dev/null || true
    tar -czf "$OUT/results.tgz" $(ls -d "$RESULTS" "$RUNS"/*.log "$RUNS"/train_throughput.json 2>/dev/null)
}

running() { pgrep -f "verify_real_data.py .*--runs $RUNS( |$)" > /dev/null; }

case "${1:-}" in
start)
    if [ ! -d "$DATA_ROOT/train" ]; then
        test -f .carry/cifar10-jpeg.tar.gz || { echo "no $DATA_ROOT and no .carry/cifar10-jpeg.tar.gz to unpack (carry .carry)" >&2; exit 2; }
        echo "$CIFAR10_JPEG_SHA256  .carry/cifar10-jpeg.tar.gz" | sha256sum -c --quiet
        mkdir -p "$(dirname "$DATA_ROOT")" && tar -xzf .carry/cifar10-jpeg.tar.gz -C "$(dirname "$DATA_ROOT")"
    fi
    running && { echo "verification runs already running in $RUNS: use wait" >&2; exit 2; }
    { date -u; command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      "$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
    } 2>&1 | tee -a "$LOG"
    # One-run speed first, alone on the device (the runs below share it).
    "$PYTHON" benchmarks/train_throughput.py $THROUGHPUT_ARGS --json "$RUNS/train_throughput.json" 2>&1 | tee -a "$LOG"
    setsid nohup "$PYTHON" benchmarks/verify_real_data.py --data-root "$DATA_ROOT" $VERIFY_ARGS --runs "$RUNS" \
        --results "$RESULTS" --throughput "$RUNS/train_throughput.json" >> "$LOG" 2>&1 < /dev/null &
    echo "verification runs started in the background: $VERIFY_ARGS" | tee -a "$LOG"
    sleep 20
    pack
    ;;
wait)
    deadline=$((SECONDS + ${2:-570}))
    while [ $SECONDS -lt $deadline ] && running; do sleep 5; done
    if running; then echo "still running"; else echo "all runs finished"; fi
    tail -n 20 "$LOG"
    pack
    ;;
*)
    echo "usage: $0 start | wait [seconds]" >&2
    exit 2
    ;;
esac
