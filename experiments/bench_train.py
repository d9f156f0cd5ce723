"""Training-throughput benchmark: tokens/s and MFU of one training step of the ~125M GateLoop LM and the same-size
Transformer at length 2048 on one device.

    python experiments/bench_train.py --out experiments/results
    python experiments/bench_train.py --out /tmp/t --models gateloop:test,transformer:test --length 32 --batch 2 \
        --reps 2 --isolate none                                         # what tests/bench_test.py runs (CPU)
    python experiments/bench_train.py --models gateloop:125m --loss_chunk_size 256 --json train_chunked_loss.json
                                                                        # the chunked loss (peak_bytes vs 0 = plain)

The step is written here (not imported from the trainer): cross-entropy on next tokens (the trainer's loss function,
plain or chunked by --loss_chunk_size), value_and_grad, optax adamw, jitted once with the parameters and optimizer
state donated; bf16 activations with float32 parameters (--dtype).
Each model runs in a fresh process (--isolate model) so its peak memory is its own.

MFU = model FLOPs per second / peak, model FLOPs per token = 6 N (N = all parameters; with tied embeddings the
output head's matrix product is what the embedding costs) + 12 L d T for softmax attention (PaLM's count, T the
length); GateLoop's recurrence adds O(L d) per token (max-headed) and is left out, as attention's softmax is.
Reported against the datasheet bf16 dense peak (989 TFLOP/s) and against the bf16 matmul rate measured in the
same run; XLA's own FLOP count of the compiled step over the time is given as well (hardware utilisation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def parse_args(argv=None):
    p = bc.model_bench_parser(__doc__, json_name="train.json", dtype_help="activation dtype")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mode", default="auto", help="GateLoop mode for the step")
    p.add_argument("--remat", action="store_true", help="rematerialise each block in the backward (long lengths)")
    p.add_argument(
        "--loss_chunk_size",
        type=int,
        default=0,
        help="head + cross-entropy over sequence chunks of this length (gateloop_jax/train/loss.py); "
        "0 = the plain loss over the full (b, t, V) logits",
    )
    p.add_argument("--matmul_n", type=int, default=8192, help="size of the matmul-rate measurement (0: skip)")
    p.add_argument("--peak_flops", type=float, default=bc.H200_BF16_PEAK_FLOPS)
    p.add_argument("--isolate", choices=("model", "none"), default="model")
    p.add_argument("--_model", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def bench_model(args, spec: str) -> dict:
    bc.configure_jax_memory()
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from gateloop_jax.models import build_model, param_count, preset_config
    from gateloop_jax.train.loss import model_token_stats

    name, preset = spec.split(":")
    config = preset_config(preset, name=name, dtype=args.dtype)
    if name != "transformer":
        config = config.replace(mode=args.mode)
    if args.remat:
        config = config.replace(remat=True)
    model = build_model(config, rngs=nnx.Rngs(0))
    n_params = param_count(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(params, rest, tokens):
        model = nnx.merge(graphdef, params, rest)
        mask = jnp.ones(tokens[:, 1:].shape, jnp.float32)
        stats = model_token_stats(model, tokens[:, :-1], tokens[:, 1:], mask, chunk_size=args.loss_chunk_size)
        return stats["nll"] / stats["count"]

    def step(params, opt_state, rest, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(0)
    batches = [jax.random.randint(jax.random.fold_in(key, i), (args.batch, args.length + 1), 0, config.vocab_size,
                                  jnp.int32) for i in range(2)]
    rec = {"model": spec, "name": name, "preset": preset, "mode": config.mode if name != "transformer" else "-",
           "params": n_params, "batch": args.batch, "length": args.length, "dtype": args.dtype,
           "tokens": args.batch * args.length, "loss_chunk_size": args.loss_chunk_size}
    compiled, rec["compile_s"], rec["xla_memory"] = bc.compile_fn(step, (params, opt_state, rest, batches[0]),
                                                                  donate_argnums=(0, 1))
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        rec["xla_flops"] = float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - not every backend reports costs
        rec["xla_flops"] = None
    state = {"params": params, "opt_state": opt_state, "i": 0, "losses": []}

    def call():
        # Rotating two token batches: a different input every step, as in training.
        state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"], rest,
                                                             batches[state["i"] % 2])
        state["i"] += 1
        state["losses"].append(loss)
        return loss

    rec.update(bc.time_calls(call, warmup=args.warmup, reps=args.reps))
    losses = [float(x) for x in jax.device_get(state["losses"])]
    rec["loss_first"], rec["loss_last"] = losses[0], losses[-1]
    rec["finite"] = all(map(lambda x: x == x and abs(x) != float("inf"), losses))
    stats = bc.memory_stats()
    rec["peak_bytes"] = stats.get("peak_bytes_in_use")
    rec["tokens_per_s"] = rec["tokens"] / rec["median_s"]
    per_token = 6.0 * n_params
    # Attention layers only: all of a Transformer's, a hybrid's "a" blocks.
    per_token += 12.0 * config.layer_kinds.count("a") * config.d_model * args.length
    rec["model_flops_per_token"] = per_token
    rec["mfu"] = per_token * rec["tokens_per_s"] / args.peak_flops
    if rec["xla_flops"]:
        rec["xla_flops_utilization"] = rec["xla_flops"] / rec["median_s"] / args.peak_flops
    if args.matmul_n:
        rec["matmul"] = bc.matmul_rate(args.matmul_n)
    return rec


def _child_record(text: str) -> dict | None:
    """The record a model's child process printed: its last output line that is a JSON object. (The child's stderr
    follows its stdout in the text, and XLA may log there after the record, e.g. a slow-compile alarm.)"""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def main(argv=None):
    args = parse_args(argv)
    if args._model:
        print(json.dumps(bench_model(args, args._model), default=bc._json_default))
        return None
    start = time.perf_counter()
    path = os.path.join(args.out, args.json)
    result = {"benchmark": "train", "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "peak_flops": args.peak_flops, "records": []}
    for i, spec in enumerate(args.models.split(",")):
        if args.isolate == "model":
            argv_child = [os.path.abspath(__file__), "--_model", spec]
            for k, v in result["args"].items():
                if isinstance(v, bool):  # store_true flags take no value
                    argv_child += [f"--{k}"] if v else []
                elif k not in ("models", "isolate"):
                    # The matmul rate is measured once, in the first model's process.
                    argv_child += [f"--{k}", str(0 if (k == "matmul_n" and i) else v)]
            code, text = bc.run_child(argv_child, timeout_s=600)
            rec = _child_record(text)
            if rec is None:
                rec = {"model": spec, "skipped": f"child failed (exit {code}): {text.strip()[-400:]}"}
        else:
            try:
                rec = bench_model(args, spec)
            except Exception as err:  # noqa: BLE001
                rec = {"model": spec, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        result["records"].append(rec)
        bc.write_json(path, result)  # partial results survive a timeout
        if "median_s" in rec:
            print(f"{spec:<28} {rec['median_s'] * 1e3:8.1f} ms/step {rec['tokens_per_s']:10.0f} tokens/s "
                  f"MFU {rec['mfu']:.3f} peak {bc.gib(rec.get('peak_bytes'))} GiB "
                  f"loss {rec['loss_first']:.3f}->{rec['loss_last']:.3f}", flush=True)
        else:
            print(f"{spec:<28} skipped: {rec.get('skipped')}", flush=True)
    bc.configure_jax_memory()
    result["env"] = bc.env_record()
    mm = next((r.pop("matmul") for r in result["records"] if "matmul" in r), None)
    if mm:
        result["matmul"] = mm
        for r in result["records"]:
            if "mfu" in r:
                r["mfu_measured_peak"] = r["mfu"] * args.peak_flops / mm["flops_per_s"]
    result["wall_s"] = time.perf_counter() - start
    bc.write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
