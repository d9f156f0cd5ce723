#!/usr/bin/env bash
# mode="mosaic_gpu" on a Hopper GPU (jax 0.11 CUDA): accuracy at every width, the op benchmark beside its peers, the
# 125M multi-head LM's training step. Each part has its own timeout and writes JSON under $OUT as it goes; a failing
# part does not stop the next. accuracy + bench take about 8 minutes; give "train" a call of its own.
#
#   OUT=/tmp/out bash experiments/kernel_dev/gpu_mosaic_check.sh        # on the device: run(command=..., timeout_s=600)
#   PARTS="accuracy bench" OUT=... bash ... # a subset of accuracy, bench (d = 64, L <= 32768), bench_more (L = 65536,
#                                          # d = 128), train (alone: about 7 minutes), ...
#   PARTS=subblock OUT=... bash ...        # the "_subblock" variant beside "padded": accuracy at d = 32, 64, op benchmark
#   PARTS=subblock_widths OUT=... bash ... # the "_subblock" variant's accuracy at the other widths
#   PARTS=profile OUT=... bash ...         # per-stage times (kernels vs XLA) of the default, the state-pass kernel and the sub-block variant
#   PARTS=trace OUT=... bash ...           # device time per kernel (XLA fusions by name) from a profiler trace
#   PARTS=state_pass OUT=... bash ...      # the serial state-pass kernel ("padded") beside its XLA form ("padded_scan")
#                                          # and the streamed fetches ("_stream"): accuracy, the op benchmark with the
#                                          # peers (~7 minutes)
#   PARTS="io trace" OUT=... bash ...      # the io variants in ~6 minutes, then the kernels' device times (~8 in all)
#   PARTS=long LONG_VARIANT=... OUT=... bash ... # the op at L = 32768 and 65536, batch 1 (~3 minutes)
#   PARTS=ptxas OUT=... bash ...           # registers and spills per kernel (PTXAS_VARIANTS), ~1 minute
#   PARTS=window_sums OUT=... bash ...     # the within-chunk sums by method, alone and in the op (~2 minutes)
#   PARTS=gates OUT=... bash ...           # the gate-factor kernel alone by form, then the op with its fastest exact
#                                          # form and with XLA's factors (~3 minutes)
#   PARTS=rolled OUT=... bash ...          # the "_rolled" variant beside the default: device time per kernel, accuracy
#   PARTS=gate_grads OUT=... bash ...      # the backward's gate-gradient sums by kernel and by XLA in the op, then the
#                                          # op's accuracy with the kernel (~3 minutes)
#   PARTS=backward_kernel OUT=... bash ... # the backward kernel alone, whole and by part, with ptxas (~3 minutes)
#   PARTS=opt_in OUT=... bash ...          # the "_paired" variant beside the default: device time per kernel, with the
#                                          # HLO, then its accuracy with the gate-gradient-sums kernel (~5 minutes)
#   ACCURACY_REST=256:256,32:96 ...          # the widths checked after d = 32 and 64 (check_mosaic_gpu.py --rest)
#   PACK=1 ...                             # at the end, everything the parts wrote as one $OUT/results.tgz (the
#                                          # device returns at most 8 files from $OUT; the parts write more)
set -u
PARTS=${PARTS:-accuracy bench bench_more train}
want() { [[ " $PARTS " == *" $1 "* ]]; }
OUT=${OUT:-experiments/results/mosaic_gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }

log "device"; nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee -a "$OUT/log.txt"
$PY -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee -a "$OUT/log.txt"
DEFAULT_VARIANT=$($PY -c 'from gateloop_jax.ops import pallas_mosaic_gpu as p; print(p.VARIANT)')

# (1) y, final state and every gradient against the float64 oracle at every width, real GPU lowering, the default
# kernel variant (check_mosaic_gpu.py --variants padded,dense,swizzled,padded_exact compares the variants).
if want accuracy; then
    log "accuracy"
    # Every width takes ~230 s on an H100 (d = 128 and 256 ~70 s together).
    timeout 250 $PY experiments/kernel_dev/check_mosaic_gpu.py --out "$OUT/mosaic_accuracy.json" \
        --variants "$DEFAULT_VARIANT" \
        --rest "${ACCURACY_REST:-32:96,256:64,96:96,128:128,256:256}" --budget_s 220 --bench_length 0 2>&1 \
        | grep -v '^ ' | tail -40 | tee -a "$OUT/log.txt"
fi

# (1b) The "_subblock" variant (diagonals within 16-row sub-blocks, the rest on the tensor cores) beside the default:
# accuracy at d = 32 and 64, the op benchmark with the peers (bench_modes.py's mosaic_gpu:VARIANT); its other widths
# in their own part.
if want subblock; then
    log "subblock accuracy"
    timeout 170 $PY experiments/kernel_dev/check_mosaic_gpu.py --variants padded padded_subblock --rest '' \
        --bench_length 0 --budget_s 140 --out "$OUT/subblock.json" 2>&1 | grep -v '^ ' | tail -30 | tee -a "$OUT/log.txt"
    log "subblock bench"
    timeout 170 $PY experiments/bench_modes.py --out "$OUT" --json modes_subblock.json --settings multihead --scopes op \
        --passes fwdbwd,fwd --dtypes bfloat16 --modes mosaic_gpu,mosaic_gpu:padded_subblock,pallas,chunked \
        --peers softmax_cudnn,jla_gla --reference chunked --reps 5 --warmup 1 --pipeline 0 --order priority \
        --lengths 1024,8192,32768 --budget_s 140 2>&1 | tail -20 | tee -a "$OUT/log.txt"
fi
if want subblock_widths; then
    log "subblock widths"
    timeout 170 $PY experiments/kernel_dev/check_mosaic_gpu.py --variants padded_subblock \
        --rest 96:96,128:128,256:256,32:96,256:64 --bench_length 0 --budget_s 140 --out "$OUT/subblock_rest.json" \
        2>&1 | grep -v '^ ' | tail -30 | tee -a "$OUT/log.txt"
fi

# (1c) Where the time goes: each variant's kernels and XLA parts timed alone (profile_mosaic_gpu.py).
if want profile; then
    log "profile"
    timeout 300 $PY experiments/kernel_dev/profile_mosaic_gpu.py --out "$OUT" \
        --variants padded_scan,padded,padded_subblock --lengths 1024,8192 --budget_s 240 2>&1 | tail -30 | tee -a "$OUT/log.txt"
fi

# (1c') The state pass between chunks as a serial kernel ("padded", "padded_subblock") against XLA's associative scan
# ("padded_scan", the default), and the intra-chunk kernels with their fetches streamed two ahead ("_stream") or
# loaded and stored without staging ("_direct"): accuracy at d = 32, 64 for each and every width for the best, then
# the op benchmark with the peers.
if want state_pass; then
    log "state pass accuracy"
    timeout 170 $PY experiments/kernel_dev/check_mosaic_gpu.py --bench_length 0 --budget_s 140 \
        --variants padded_subblock_direct padded_subblock_stream padded_subblock padded padded_stream padded_scan \
        --rest 96:96,128:128,256:256,32:96,256:64 --out "$OUT/state_pass.json" 2>&1 \
        | grep -v '^ ' | tail -40 | tee -a "$OUT/log.txt"
    log "state pass bench"
    timeout 200 $PY experiments/bench_modes.py --out "$OUT" --json modes_state_pass.json --settings multihead \
        --scopes op --passes fwdbwd,fwd --dtypes bfloat16 --reference chunked --reps 5 --warmup 1 --pipeline 0 \
        --modes mosaic_gpu,mosaic_gpu:padded_subblock_direct,mosaic_gpu:padded_subblock_stream,mosaic_gpu:padded_subblock,mosaic_gpu:padded,mosaic_gpu:padded_stream,pallas,chunked \
        --peers softmax_cudnn,jla_gla --order priority --lengths 8192,1024,32768 --budget_s 170 2>&1 | tail -40 \
        | tee -a "$OUT/log.txt"
fi

# (1c'') The same question in about 6 minutes: the io variants and the state-pass kernel beside the default, accuracy
# at d = 32, 64 (every width for the best), the op at L = 8192 and 1024 with the peers.
if want io; then
    log "io accuracy"
    timeout 175 $PY experiments/kernel_dev/check_mosaic_gpu.py --bench_length 0 --budget_s 150 \
        --variants ${IO_VARIANTS:-padded_subblock_stream padded_subblock_direct} \
        --rest 96:96,128:128,256:256,32:96,256:64 --out "$OUT/io.json" 2>&1 | grep -v '^ ' | tail -30 \
        | tee -a "$OUT/log.txt"
    # Only the variants that met the target on every width checked go on to the benchmark (a faulty one could hang it).
    passing=$($PY -c 'import json, sys
d = json.load(open(sys.argv[1])); bad = {r["variant"] for r in d["rows"] if "errors" not in r
    or max(max(e) for e in r["errors"].values()) >= d["target"]}
print("".join(f",mosaic_gpu:{v}" for v in dict.fromkeys(r["variant"] for r in d["rows"]) if v not in bad and v != "padded_scan"))' \
        "$OUT/io.json" 2>/dev/null)
    log "io bench (passing:${passing:- none})"
    timeout 160 $PY experiments/bench_modes.py --out "$OUT" --json modes_io.json --settings multihead --scopes op \
        --passes fwdbwd,fwd --dtypes bfloat16 --reference chunked --reps 5 --warmup 1 --pipeline 0 --order priority \
        --modes "mosaic_gpu$passing,pallas" --peers jla_gla,softmax_cudnn --lengths 8192,1024 --budget_s 135 2>&1 \
        | tail -30 | tee -a "$OUT/log.txt"
fi

# (1c''') The least that says whether "_direct" pays (about 2.5 minutes): its accuracy at d = 32, 64, then the op at
# L = 8192 beside the default and jax-linear-attention's GLA.
if want io_mini; then
    log "io_mini accuracy"
    timeout 60 $PY experiments/kernel_dev/check_mosaic_gpu.py --bench_length 0 --budget_s 45 --rest '' \
        --variants padded_subblock_direct --out "$OUT/io_mini.json" 2>&1 | grep -v '^ ' | tail -10 | tee -a "$OUT/log.txt"
    log "io_mini bench"
    timeout 90 $PY experiments/bench_modes.py --out "$OUT" --json modes_io_mini.json --settings multihead --scopes op \
        --passes fwdbwd --dtypes bfloat16 --reference chunked --reps 5 --warmup 1 --pipeline 0 \
        --modes mosaic_gpu,mosaic_gpu:padded_subblock_direct --peers jla_gla --lengths 8192 --budget_s 75 2>&1 \
        | tail -15 | tee -a "$OUT/log.txt"
fi

# (1e) Long sequences at a small batch, where the serial state pass cuts its chain into segments: the op at L = 32768
# and 65536 (batch 1) for the default and LONG_VARIANT beside the Triton kernel and GLA (~3 minutes).
if want long; then
    log "long (${LONG_VARIANT:-padded_subblock_direct})"
    # length, repetitions, timeout and budget (s), output file
    for run in "32768 5 100 80 modes_long.json" "65536 3 80 60 modes_long_L65536.json"; do
        read -r L reps limit budget json <<< "$run"
        timeout "$limit" $PY experiments/bench_modes.py --out "$OUT" --json "$json" --settings multihead \
            --scopes op --passes fwdbwd --dtypes bfloat16 --reference chunked --reps "$reps" --warmup 1 --pipeline 0 \
            --order priority --modes "mosaic_gpu,mosaic_gpu:${LONG_VARIANT:-padded_subblock_direct},pallas" \
            --peers jla_gla --lengths "$L" --tokens "$L" --budget_s "$budget" 2>&1 | tail -12 | tee -a "$OUT/log.txt"
    done
fi

# (1f) Registers and spills per kernel as ptxas reports them (ptxas_report.py; ~1 minute).
if want ptxas; then
    log "ptxas"
    timeout 120 $PY experiments/kernel_dev/ptxas_report.py --out "$OUT" --variants ${PTXAS_VARIANTS:-padded_subblock_stream} \
        --d_heads 64,128 2>&1 | grep -a "^==\|gateloop" | cut -c1-400 | tee -a "$OUT/log.txt"
fi

# (1g) The within-chunk sums by each method (mosaic_gpu_common.WINDOW_SUMS): alone, then the op's device time per
# kernel with each method other than the default (~2 minutes).
if want window_sums; then
    log "window sums"
    timeout 110 $PY experiments/kernel_dev/bench_window_sums.py --out "$OUT" 2>&1 | tail -33 | tee -a "$OUT/log.txt"
    for method in ${WINDOW_SUM_TRACE:-batched_matmul}; do
        timeout 120 $PY experiments/kernel_dev/trace_mosaic_gpu.py --out "$OUT" --json "mosaic_trace_L8192_$method.json" \
            --variants padded_subblock_stream --length 8192 --window_sums "$method" 2>&1 | head -12 | tee -a "$OUT/log.txt"
    done
fi

# (1h) The gates' decay factors (mosaic_gpu_gates): the kernel alone by form, each with one stage taken out or run
# another way (bench_gate_factors.py), then the op's device time per kernel with the fastest exact form and with XLA's
# factors (~3 minutes). Small outputs per trace: a closed pipe would stop the script before it writes its JSON.
if want gates; then
    log "gate factors"
    timeout 120 $PY experiments/kernel_dev/bench_gate_factors.py --out "$OUT" 2>&1 | tail -14 | tee -a "$OUT/log.txt"
    best=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1])).get("best_kernel_form", "kernel"))' \
        "$OUT/gate_factors.json" 2>/dev/null || echo kernel)
    for run in "kernel --gates_form $best" "xla"; do
        name=$(echo "$run" | cut -d' ' -f1)
        timeout 120 $PY experiments/kernel_dev/trace_mosaic_gpu.py --out "$OUT" --json "mosaic_trace_L8192_gates_$name.json" \
            --variants padded_subblock_stream --length 8192 --gate_factors $run > "$OUT/trace_$name.txt" 2>&1
        head -14 "$OUT/trace_$name.txt" | tee -a "$OUT/log.txt"
    done
fi

# (1i) The intra-chunk backward kernel alone, whole and with one part taken out at a time, beside the forward kernel,
# with ptxas's registers and spills per form (bench_backward_kernel.py; ~3 minutes).
if want backward_kernel; then
    log "backward kernel"
    timeout 240 $PY experiments/kernel_dev/bench_backward_kernel.py --out "$OUT" > "$OUT/backward_kernel.txt" 2>&1
    tail -30 "$OUT/backward_kernel.txt" | tee -a "$OUT/log.txt"
fi

# (1j) The "_rolled" variant (the products across sub-blocks in a loop over d: a third less kernel code) beside the
# default: the op's device time per kernel, then its accuracy at d = 32 and 64 (~3 minutes).
if want rolled; then
    log "rolled: device time per kernel"
    timeout 150 $PY experiments/kernel_dev/trace_mosaic_gpu.py --out "$OUT" --json mosaic_trace_L8192_rolled.json \
        --variants padded_subblock_stream,padded_subblock_stream_rolled --length 8192 > "$OUT/trace_rolled.txt" 2>&1
    grep -A12 "ms of device kernels" "$OUT/trace_rolled.txt" | tee -a "$OUT/log.txt"
    log "rolled accuracy"
    timeout 90 $PY experiments/kernel_dev/check_mosaic_gpu.py --variants padded_subblock_stream_rolled --rest '' \
        --bench_length 0 --budget_s 70 --out "$OUT/rolled_accuracy.json" 2>&1 | grep -v '^ ' | tail -12 \
        | tee -a "$OUT/log.txt"
fi

# (1k) The backward's gate-gradient sums by the kernel (mosaic_gpu_gates.GATE_GRAD_SUMS) beside XLA's: the op's
# device time per kernel with each, then the op's accuracy with the kernel at d = 32 and 64 (~3 minutes).
if want gate_grads; then
    for method in kernel xla; do
        log "gate-gradient sums: $method"
        timeout 100 $PY experiments/kernel_dev/trace_mosaic_gpu.py --out "$OUT" --json "mosaic_trace_L8192_grads_$method.json" \
            --variants "$DEFAULT_VARIANT" --length 8192 \
            --gate_grad_sums $method > "$OUT/trace_grads_$method.txt" 2>&1
        grep -A10 "ms of device" "$OUT/trace_grads_$method.txt" | tee -a "$OUT/log.txt"
    done
    log "gate-gradient sums: accuracy with the kernel"
    timeout 90 $PY experiments/kernel_dev/check_mosaic_gpu.py --gate_grad_sums kernel \
        --variants "$DEFAULT_VARIANT" --rest '' --bench_length 0 --budget_s 70 \
        --out "$OUT/gate_grads_accuracy.json" 2>&1 | grep -v '^ ' | tail -12 | tee -a "$OUT/log.txt"
fi

# (1l) The opt-in "_paired" variant beside the default (~5 minutes): device time per kernel (with the compiled HLO,
# which names XLA's fusions), then its accuracy with the gate-gradient-sums kernel (timed by the gate_grads part) at
# d = 32 and 64.
if want opt_in; then
    log "opt-in: $DEFAULT_VARIANT beside ${DEFAULT_VARIANT}_paired, device time per kernel"
    timeout 170 $PY experiments/kernel_dev/trace_mosaic_gpu.py --out "$OUT" --json mosaic_trace_L8192_paired.json \
        --variants "$DEFAULT_VARIANT,${DEFAULT_VARIANT}_paired" --length 8192 --hlo > "$OUT/trace_paired.txt" 2>&1
    grep -A14 "ms of device" "$OUT/trace_paired.txt" | tee -a "$OUT/log.txt"
    log "opt-in: accuracy of ${DEFAULT_VARIANT}_paired with the gate-gradient-sums kernel"
    timeout 100 $PY experiments/kernel_dev/check_mosaic_gpu.py --gate_grad_sums kernel \
        --variants "${DEFAULT_VARIANT}_paired" --rest '' --bench_length 0 --budget_s 80 \
        --out "$OUT/opt_in_accuracy.json" 2>&1 | grep -v '^ ' | tail -12 | tee -a "$OUT/log.txt"
fi

# (1d) Device time per kernel, fwd+bwd through the public op (trace_mosaic_gpu.py), at L = 1024 and 8192.
if want trace; then
    for L in ${TRACE_LENGTHS:-8192 1024}; do
        log "trace L=$L"
        timeout ${TRACE_TIMEOUT:-120} $PY experiments/kernel_dev/trace_mosaic_gpu.py --out "$OUT" --json "mosaic_trace_L$L.json" \
            --variants ${TRACE_VARIANTS:-padded_scan,padded_subblock_direct,padded_subblock_stream} --length $L --hlo 2>&1 | tail -60 | tee -a "$OUT/log.txt"
    done
fi

# (2) The op, fwd+bwd, bf16, 8 heads of 64 (then 128) at 32768 tokens: mosaic_gpu beside the Triton kernel, the
# pure-JAX chunked form and cuDNN causal attention (fwd alone too at d = 64: how the time splits); L = 65536 at
# batch 1 in its own call (--tokens 65536).
common=(--settings multihead --scopes op --passes fwdbwd --dtypes bfloat16 --modes mosaic_gpu,pallas,chunked
        --peers softmax_cudnn,jla_gla --reference chunked --reps 5 --warmup 1 --pipeline 0 --order priority)
if want bench; then
    log "bench d=64"
    # Its 30 configs compile for ~100 s on an H100 before the first is timed.
    timeout 250 $PY experiments/bench_modes.py --out "$OUT" --json modes_d64.json "${common[@]}" --passes fwdbwd,fwd \
        --lengths 1024,8192,32768 --budget_s 230 2>&1 | tail -30 | tee -a "$OUT/log.txt"
fi
# (2') The op at L = 65536 (batch 1) and at heads of 128.
if want bench_more; then
    log "bench d=64 L=65536"
    timeout 55 $PY experiments/bench_modes.py --out "$OUT" --json modes_d64_L65536.json "${common[@]}" \
        --lengths 65536 --tokens 65536 --budget_s 40 2>&1 | tail -15 | tee -a "$OUT/log.txt"
    log "bench d=128"
    # Its configs compile for ~40 s (H100): the Triton kernel is the reference, "chunked" is left out.
    timeout 110 $PY experiments/bench_modes.py --out "$OUT" --json modes_d128.json "${common[@]}" \
        --modes mosaic_gpu,pallas --reference pallas --compile_workers 8 \
        --d_head 128 --lengths 1024,8192 --budget_s 100 2>&1 | tail -15 | tee -a "$OUT/log.txt"
fi

# (3) The 125M multi-head GateLoop LM (8 heads of 96) through mode="mosaic_gpu" against the Transformer (this part
# alone takes about 7 minutes).
if want train; then
    log "train"
    # The GateLoop model compiles for ~3.5 minutes (H100), the Transformer for ~1; every child's output is kept.
    BENCH_LOG="$OUT/train_children.log" timeout 450 $PY experiments/bench_train.py --out "$OUT" --json train_mosaic.json \
        --length 2048 --batch 16 \
        --models gateloop:125m_multihead,transformer:125m_multihead --mode mosaic_gpu --reps 5 --warmup 1 \
        --matmul_n 0 2>&1 | tail -20 | tee -a "$OUT/log.txt"
fi
log "done"
if [[ "${PACK:-0}" == 1 ]]; then
    tar czf /tmp/gpu_mosaic_results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
        && mv /tmp/gpu_mosaic_results.tgz "$OUT/results.tgz" && echo "packed into $OUT/results.tgz"
fi
