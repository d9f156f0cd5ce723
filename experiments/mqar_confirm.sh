#!/usr/bin/env bash
# MQAR at full size on one GPU, in one call of under 10 minutes: the shipped configs/mqar.py (GateLoop and the
# Transformer through the trainer CLI, 10k steps) beside plain-Adam probes of the Transformer's position encoding.
# Every process shares the GPU; each writes as it goes, so a run stopped by the budget still leaves its curve.
#
#   OUT=/tmp/out BUDGET=470 bash experiments/mqar_confirm.sh     # on the device: run(command=..., timeout_s=600)
# Results: $OUT/mqar_confirm.tar.gz holds the grid runs' metrics (mqar_grid.py pack) and the probes' JSON lines.
set -u
OUT=${OUT:?set OUT}
BUDGET=${BUDGET:-470}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
work=$(mktemp -d)
mkdir -p "$work/probes" "$work/grid"

# The Transformer's position encoding at L=256, K=16 (vocabulary 8192, d_model 128, 4 heads of 32, batch 64, untied
# head, lr 1e-3): RoPE on every channel, on a fraction of them, on none; and Zoology's batch of 256.
probe() {
    local name=$1; shift
    timeout $((BUDGET + 60)) $PY experiments/mqar_probe.py --size full --steps 20000 --eval_every 1000 \
        --budget_s "$BUDGET" --set model.tie_embeddings=False --probes transformer --out "$work/probes/$name" "$@" \
        > "$work/probes/$name.log" 2>&1 &
}
probe rope1.0
probe rope0.5 --set model.rope_fraction=0.5
probe rope0.25 --set model.rope_fraction=0.25
probe rope0 --set model.rope_fraction=0.0
probe rope0.25_kmix --set model.rope_fraction=0.25 --set min_num_kv_pairs=4
probe rope1.0_batch256 --set batch=256

# The shipped config through the trainer, 10k of its 20k steps.
timeout $((BUDGET + 90)) $PY experiments/mqar_grid.py run --root "$work/grid" --lk 256,16 --d_models 128 --lrs 1e-3 \
    --steps 10000 --eval_every 1000 --variants gateloop transformer --parallel 2 --budget_s "$BUDGET" --grace_s 45 \
    > "$work/grid.log" 2>&1
wait
$PY experiments/mqar_grid.py pack --root "$work/grid" --lk 256,16 --d_models 128 --lrs 1e-3 --steps 10000 \
    --variants gateloop transformer --to "$work/grid_pack.tar.gz" >> "$work/grid.log" 2>&1
tail -n 3 "$work"/probes/*/*.jsonl "$work/grid.log"
tar czf "$OUT/mqar_confirm.tar.gz" -C "$work" probes grid.log grid_pack.tar.gz
