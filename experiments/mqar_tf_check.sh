#!/usr/bin/env bash
# The full-size Transformer on MQAR through the trainer, three settings at once on one GPU, each stopped after
# $SECONDS_EACH seconds of training (the schedule stays the config's 20k-step one): partial rotary at 0.5 with and
# without the K mixture, and at 0.25 with the probes' optimiser (b2 0.999, no weight decay, no clipping).
#   SECONDS_EACH=100 bash experiments/mqar_tf_check.sh
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
S=${SECONDS_EACH:-100}
run() {
    local name=$1; shift
    python3 -m gateloop_jax.main --config=configs/mqar.py:variant=transformer --workdir="/tmp/tf_$name" \
        --config.progress_bar=False --config.max_train_seconds="$S" --config.ckpt_every_steps=0 "$@" \
        > "/tmp/tf_$name.log" 2>&1 &
}
run rope0.5_kmix --config.model.rope_fraction=0.5
run rope0.5_k16 --config.model.rope_fraction=0.5 --config.data.min_num_kv_pairs=0
run rope0.25_kmix_adam --config.model.rope_fraction=0.25 --config.optimizer.b2=0.999 \
    --config.optimizer.weight_decay=0.0 --config.optimizer.grad_clip_norm=0.0
wait
for f in /tmp/tf_*.log; do echo "== $f"; grep -E "eval/accuracy|Error|error" "$f" | tail -14; done
