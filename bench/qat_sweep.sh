#!/bin/bash
# Several bench/qat.py runs sharing one GPU, in parallel: QAT on SmolLM2 is launch-bound (a step
# takes ~0.35 s on an H200 however many runs share it), so four runs cost little more than one.
#
#   bash bench/qat_sweep.sh [--ptq] [--detach] NAME:LOSS:STEPS:LR[:T] ...   runs, results in $OUT/NAME.json
#   bash bench/qat_sweep.sh --collect SECONDS                              waits for detached runs
#
# LOSS is kd, rkl or bild, T the distillation temperature (default: the loss's own). The export
# cache is warmed once first. Each run gets THREADS onnxruntime/torch threads (default 4: runs that
# each take one thread per core stall one another). LIMIT (s) bounds every run; EXTRA adds
# bench/qat.py options to every run (EXTRA="--weight-rounding gptq"), EXTRA_NAME to run NAME alone.
# GENERATED=N writes N windows of the float model's own text once (bench/qat.py --generate-only,
# beside the export warm-up) for the runs whose options say --generated N (they read the file).
# DEVICE (default cuda) is the torch device of training and generation.
# --detach starts the runs in sessions of their own and returns: they go on between device calls
# while the machine is held; --collect waits for them (at most SECONDS) and prints what finished.
set -u
OUT=${OUT:-.}
THREADS=${THREADS:-4}
LIMIT=${LIMIT:-3600}
RUNS=${RUNS:-/tmp/qat-sweep}
GENERATED_FILE=${GENERATED_FILE:-/tmp/qat-generated-${GENERATED:-0}.npy}
COMMON="--rotate --observer mse --batch 8 --train-windows 448 --int16-budget 0.15
        --sensitivity samples/recipes/smollm2-rotated-sensitivity.json --device ${DEVICE:-cuda} --threads $THREADS
        --generated-file $GENERATED_FILE ${EXTRA:-}"
PYTHON=${PYTHON:-python}

report() {
    for f in "$RUNS"/*.md; do [ -e "$f" ] && { echo "== $(basename "$f" .md)"; cat "$f"; }; done
    for f in "$RUNS"/*.log; do [ -e "$f" ] && { echo "== $(basename "$f" .log)"; grep -v "it/s\]" "$f" | tail -40; }; done \
        > "$OUT/qat-sweep-logs.txt"
    cp "$RUNS"/*.json "$OUT"/ 2>/dev/null
    return 0
}

if [ "${1:-}" = "--collect" ]; then
    deadline=$((SECONDS + ${2:-540}))
    while ls "$RUNS"/*.pid >/dev/null 2>&1 && [ $SECONDS -lt $deadline ]; do
        for pid in "$RUNS"/*.pid; do kill -0 "$(cat "$pid")" 2>/dev/null || rm -f "$pid"; done
        sleep 5
    done
    echo "qat sweep: $(ls "$RUNS"/*.pid 2>/dev/null | wc -l) runs still going at $SECONDS s"
    for f in "$RUNS"/*.log; do echo "-- $(basename "$f" .log): $(grep -v "it/s\]" "$f" | tail -1)"; done
    report
    exit 0
fi

ptq=0 detach=0
while [ "${1:-}" = "--ptq" ] || [ "${1:-}" = "--detach" ]; do
    [ "$1" = "--ptq" ] && ptq=1
    [ "$1" = "--detach" ] && detach=1
    shift
done
mkdir -p "$RUNS"
export OMP_NUM_THREADS=$THREADS
timeout "$LIMIT" "$PYTHON" -c "import graphopt; graphopt.lower(graphopt.load('sample:smollm2'))" 2>&1 \
    | grep -v "it/s" | tail -3 &
warm=$!
if [ -n "${GENERATED:-}" ] && [ ! -f "$GENERATED_FILE" ]; then
    timeout "$LIMIT" "$PYTHON" bench/qat.py $COMMON --generated "$GENERATED" --generate-only 2>&1 | tail -2
fi
wait $warm
echo "qat sweep: export cache warm at $SECONDS s"

start() {  # NAME ARGS...: one bench/qat.py process, detached or a child of this script
    local name=$1
    shift
    if [ $detach = 1 ]; then
        setsid nohup timeout "$LIMIT" "$PYTHON" bench/qat.py "$@" --json "$RUNS/$name.json" \
            > "$RUNS/$name.md" 2> "$RUNS/$name.log" < /dev/null &
    else
        timeout "$LIMIT" "$PYTHON" bench/qat.py "$@" --json "$RUNS/$name.json" > "$RUNS/$name.md" 2> "$RUNS/$name.log" &
    fi
    echo $! > "$RUNS/$name.pid"
}

[ $ptq = 1 ] && start ptq --rows ptq $COMMON
for spec in "$@"; do
    IFS=: read -r name loss steps lr temperature <<< "$spec"
    extra=()
    [ -n "${temperature:-}" ] && extra=(--temperature "$temperature")
    own="EXTRA_$name"
    start "$name" --rows "qat-$loss" $COMMON --steps "$steps" --lr "$lr" "${extra[@]}" ${!own:-}
done
if [ $detach = 1 ]; then
    echo "qat sweep: $# runs started detached at $SECONDS s; collect with: bash bench/qat_sweep.sh --collect SECONDS"
    exit 0
fi
wait
rm -f "$RUNS"/*.pid
echo "qat sweep: done at $SECONDS s"
report
