#!/bin/bash
# Several bench/qat.py runs sharing one GPU, in parallel: QAT on SmolLM2 is launch-bound (a step
# takes ~0.35 s on an H200 however many runs share it), so four runs cost little more than one.
#
#   bash bench/qat_sweep.sh [--ptq] NAME:LOSS:STEPS:LR[:T] ...     writes $OUT/NAME.json (OUT=. if unset)
#
# LOSS is kd or bild, T the distillation temperature (default: the loss's own). The export cache is
# warmed once first; each run gets THREADS onnxruntime/torch threads (default 4: runs that each
# take one thread per core stall one another). LIMIT (s) bounds the whole sweep; EXTRA adds bench/qat.py
# options to every run (EXTRA=--fused).
set -u
OUT=${OUT:-.}
THREADS=${THREADS:-4}
LIMIT=${LIMIT:-3600}
COMMON="--rotate --observer mse --batch 8 --train-windows 448 --int16-budget 0.15
        --sensitivity samples/recipes/smollm2-rotated-sensitivity.json --device cuda --threads $THREADS ${EXTRA:-}"
PYTHON=${PYTHON:-python}
timeout "$LIMIT" "$PYTHON" -c "import graphopt; graphopt.lower(graphopt.load('sample:smollm2'))" 2>&1 \
    | grep -v "it/s" | tail -3
echo "qat sweep: export cache warm at $SECONDS s"
export OMP_NUM_THREADS=$THREADS
LOGS=$(mktemp -d)
if [ "${1:-}" = "--ptq" ]; then
    shift
    timeout $((LIMIT - SECONDS)) "$PYTHON" bench/qat.py --rows ptq $COMMON --json "$OUT/ptq.json" \
        > "$LOGS/ptq.md" 2> "$LOGS/ptq.log" &
fi
for spec in "$@"; do
    IFS=: read -r name loss steps lr temperature <<< "$spec"
    extra=()
    [ -n "${temperature:-}" ] && extra=(--temperature "$temperature")
    timeout $((LIMIT - SECONDS)) "$PYTHON" bench/qat.py --rows "qat-$loss" $COMMON --steps "$steps" --lr "$lr" \
        "${extra[@]}" --json "$OUT/$name.json" > "$LOGS/$name.md" 2> "$LOGS/$name.log" &
done
wait
echo "qat sweep: done at $SECONDS s"
for f in "$LOGS"/*.md; do echo "== $(basename "$f" .md)"; cat "$f"; done
for f in "$LOGS"/*.log; do echo "== $(basename "$f" .log)"; grep -v "it/s\]" "$f" | tail -40; done > "$OUT/qat-sweep-logs.txt"
