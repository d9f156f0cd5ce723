#!/usr/bin/env bash
# configs/mqar.py at full size through the trainer CLI, several settings at once on one GPU, each stopped after
# $BUDGET seconds of training (the schedule stays the config's 20k-step one) and evaluated every 500 steps:
#   - the Transformer as shipped, then with one of the trainer's optimiser settings set to what the plain-Adam probes
#     use (experiments/mqar_probe.py: no weight decay, b2 0.999, no clipping, 200 warm-up steps then constant), then
#     with all of them: which setting keeps it at 1/K where the probe learns;
#   - GateLoop with the probes' optimiser, with a quarter or an eighth of its channels phased, and at lr 3e-3
#   (SET=optimizer, the default; results/mqar_probes/h100_levers.json);
#   - SET=phase_grad: GateLoop as shipped (no phase-path gradient into the mixer's input, model.phase_input_grad = 0)
#     beside the full gradient (1.0) and a tenth of it, with an eighth of the channels phased, and real;
#   - SET=final: the five variants as shipped (the issue's table), GateLoop's second seed and GateLoop with the full
#     phase-path gradient (phase_input_grad 1.0) for the cause at full size;
#   - SET=schedule: real, fixed and GateLoop's seed 1 over the whole 20k steps (BUDGET=450: three trainers make ~50
#     steps/s each), for "not below real" at the end of the schedule;
#   - SET=coupling: real beside GateLoop with the phase coupled to the decay (model.phase_coupling = "decay"), with
#     half of the channels phased and with every channel phased (what configs/mqar.py ships), over the whole schedule
#     (results/mqar_full_coupling_h100.*).
#
#   OUT=/tmp/out BUDGET=470 bash experiments/mqar_levers.sh     # on the device: run(command=..., timeout_s=600)
# Results: $OUT/mqar_levers.tar.gz holds every run's metrics.jsonl and log.
set -u
OUT=${OUT:?set OUT}
BUDGET=${BUDGET:-470}
PY=${PY:-python3}
# ",test" runs every setting at the config's two-step test size (a check of this script on CPU).
ARG=${ARG:-}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
work=$(mktemp -d)
PROBE_OPTIMIZER="--config.optimizer.weight_decay=0.0 --config.optimizer.b2=0.999 --config.optimizer.grad_clip_norm=0.0
    --config.optimizer.warmup_steps=200 --config.optimizer.decay=constant"

run() {
    local name=$1 variant=$2; shift 2
    mkdir -p "$work/$name"
    # shellcheck disable=SC2068
    timeout $((BUDGET + 40)) $PY -m gateloop_jax.main --config="configs/mqar.py:variant=$variant$ARG" \
        --workdir="$work/$name" --config.progress_bar=False --config.max_train_seconds="$BUDGET" \
        --config.eval_every_steps=500 --config.ckpt_every_steps=0 $@ > "$work/$name/log.txt" 2>&1 &
}
SET=${SET:-optimizer}
case $SET in
    optimizer)
        run tf_shipped transformer
        run tf_wd0 transformer --config.optimizer.weight_decay=0.0
        run tf_b2_0.999 transformer --config.optimizer.b2=0.999
        run tf_noclip transformer --config.optimizer.grad_clip_norm=0.0
        run tf_constant_lr transformer --config.optimizer.warmup_steps=200 --config.optimizer.decay=constant
        run tf_probe_optimizer transformer $PROBE_OPTIMIZER
        run gl_probe_optimizer gateloop $PROBE_OPTIMIZER
        run gl_phase0.25 gateloop --config.model.phase_fraction=0.25
        run gl_phase0.25_probe_optimizer gateloop --config.model.phase_fraction=0.25 $PROBE_OPTIMIZER
        run gl_lr3e-3 gateloop --config.optimizer.learning_rate=3e-3
        run gl_phase0.125 gateloop --config.model.phase_fraction=0.125
        ;;
    phase_grad)
        run gl_shipped gateloop
        run gl_phase_input_grad1 gateloop --config.model.phase_input_grad=1.0
        run gl_phase_input_grad0.1 gateloop --config.model.phase_input_grad=0.1
        run gl_phase0.125 gateloop --config.model.phase_fraction=0.125
        run real real
        ;;
    final)
        for variant in gateloop real fixed linear_attention transformer; do run "$variant" "$variant"; done
        run gateloop_seed1 gateloop --config.seed=1
        run gateloop_phase_input_grad1 gateloop --config.model.phase_input_grad=1.0
        ;;
    schedule)
        run real real
        run fixed fixed
        run gateloop_seed1 gateloop --config.seed=1
        ;;
    coupling)
        run real real
        run gateloop_decay_coupled gateloop --config.model.phase_coupling=decay --config.model.phase_fraction=0.5
        run gateloop_decay_coupled_every_channel gateloop --config.model.phase_coupling=decay \
            --config.model.phase_fraction=1.0
        ;;
    *) echo "SET=$SET: one of optimizer, phase_grad, final, schedule, coupling" >&2; exit 2 ;;
esac
wait
for d in "$work"/*/; do
    echo "== $(basename "$d") $(grep -o '"eval/accuracy": [0-9.e-]*' "$d/metrics.jsonl" 2>/dev/null | tr '\n' ' ')"
    grep -iE "error|Traceback" "$d/log.txt" | tail -3
done
tar czf "$OUT/mqar_levers.tar.gz" -C "$work" --exclude=checkpoints --exclude='events.*' .
