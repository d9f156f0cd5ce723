#!/bin/bash
# The H200 measurements the code is waiting for: variants written and tested on CPU in session 5, never timed.
# Run from the repository root on the GPU machine, with the ml_collections wheel carried in .whl/ (see the device
# README); logs and JSON land in $OUT. Parts (each well under the 10-minute device call; default: all three):
#   state  (~4 min) pallas_chunked carry_unroll (the carry's loads ahead of its stores) and fused_state (outer +
#          carry in one kernel per direction), per kernel, --check against scan, random gates at two lengths,
#          then the trained model's gates
#   step   (~3 min) step_state (query and key sides walk each chunk's sub-blocks with the state in registers, no
#          off-diagonal pairs) at chunks 32 and 64, alone and with the fused state pass
#   bench  (~2 min) the benchmark of issue 5, multi-head, bf16 and float32: bf16 inputs now enter the kernel uncast
#   usage: bash experiments/h200_pending.sh [state] [step] [bench]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
short() { grep -av Warning "$1" | cut -c1-200 | tail -"$2"; }

profile() {  # name timeout args...: one profile_pallas_chunked run, its JSON renamed to profile_<name>.json
    local name=$1 limit=$2; shift 2
    (cd experiments && timeout "$limit" python profile_pallas_chunked.py --out "$OUT" --check "$@" \
        > "$OUT/profile_$name.log" 2>&1)
    echo "== profile $name rc=$?"; short "$OUT/profile_$name.log" 60
    mv "$OUT/profile_pallas_chunked.json" "$OUT/profile_$name.json" 2>/dev/null
}

for part in ${@:-state step bench}; do
    case $part in
    state)
        profile state 330 --lengths 1024,8192 \
            --variants default,carry_u4,carry_u8,fused_u4,fused_u8,fused_b8_u4,fused_b16_u4
        profile state_learned 120 --lengths 8192 --variants default,fused_u4 \
            --gates_file results/gates_memory_horizon_multihead.npz:layer1 ;;
    step)
        profile step 240 --lengths 1024,8192 --variants default,step32,step64,step64_fused_u4
        profile step_forgetting 120 --lengths 8192 --forgetting 2 --variants default,step64 ;;
    bench)
        timeout 200 python experiments/bench_modes.py --out "$OUT" --json modes_multihead_bf16.json \
            --lengths 1024,4096,8192 --settings multihead --dtypes bfloat16,float32 --passes fwdbwd --scopes op \
            --modes pallas,auto --budget_s 120 --order priority --priority_lengths 1024,8192,4096 \
            --compile_workers 8 --config_budget_s 3 > "$OUT/bench.log" 2>&1
        echo "== bench rc=$?"; short "$OUT/bench.log" 16 ;;
    *) echo "unknown part $part (state, step, bench)"; exit 2 ;;
    esac
done
