#!/bin/bash
# The H200 measurements the code is waiting for (variants written and tested on CPU in session 5, never timed).
# Run from the repository root on the GPU machine, with the ml_collections wheel carried in .whl/ (see the device
# README); everything lands in $OUT. About 6 minutes; each step is under its own timeout.
#   1. pallas_chunked: carry_unroll (the carry's loads ahead of its stores) and fused_state (outer + carry in one
#      kernel per direction), per kernel, with --check against scan; random gates at two lengths, then the trained
#      model's gates.
#   2. The benchmark of issue 5, multi-head, bf16 and float32: the bf16 inputs now go into the kernel uncast.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
short() { grep -av Warning "$1" | cut -c1-200 | tail -"$2"; }

(cd experiments && timeout 360 python profile_pallas_chunked.py --out "$OUT" --check --lengths 1024,8192 \
    --variants default,carry_u4,carry_u8,fused_u4,fused_u8,fused_b8_u4,fused_b16_u4 > "$OUT/profile.log" 2>&1)
echo "== profile rc=$?"; short "$OUT/profile.log" 60
mv "$OUT/profile_pallas_chunked.json" "$OUT/profile_pallas_chunked_pending.json" 2>/dev/null

(cd experiments && timeout 120 python profile_pallas_chunked.py --out "$OUT" --check --lengths 8192 \
    --variants default,fused_u4 --gates_file results/gates_memory_horizon_multihead.npz:layer1 \
    > "$OUT/profile_learned.log" 2>&1)
echo "== profile learned gates rc=$?"; short "$OUT/profile_learned.log" 20
mv "$OUT/profile_pallas_chunked.json" "$OUT/profile_pallas_chunked_pending_learned.json" 2>/dev/null

timeout 200 python experiments/bench_modes.py --out "$OUT" --json modes_multihead_bf16.json --lengths 1024,4096,8192 \
    --settings multihead --dtypes bfloat16,float32 --passes fwdbwd --scopes op --modes pallas,auto --budget_s 120 \
    --order priority --priority_lengths 1024,8192,4096 --compile_workers 8 --config_budget_s 3 > "$OUT/bench.log" 2>&1
echo "== bench rc=$?"; short "$OUT/bench.log" 16
