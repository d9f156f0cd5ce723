"""Context-parallel training step: tokens/s, per-device memory and the collectives of one step, with the length split
over the mesh axis "sequence" (gateloop_jax/context_parallel.py).

    # 8 GPUs, one 1M-token row split 8 ways, the max-headed and multi-head 125M models (issue 24 item 2):
    python experiments/bench_context_parallel.py --sequence 8 --length 1048576 --batch 1 --remat \
        --models gateloop:125m,gateloop:125m_multihead --out experiments/results
    # the same length on fewer devices, for the scaling curve: --sequence 1 / 2 / 4 (OOM is recorded, not fatal)
    # CPU, no run: the collectives XLA emits for one step (what docs/training.md's plan counts), 8 fake devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python experiments/bench_context_parallel.py \
        --sequence 8 --length 4096 --batch 1 --layers 1 --mode chunked --collectives_only --out /tmp/cp

The step is bench_train.py's (cross-entropy, value_and_grad, adamw; parameters float32 replicated, activations
bf16), jitted under the trainer's mesh and logical axis rules so the mixers take the context-parallel path; the
tokens are split (batch over data, length over sequence). Peak memory is the largest over the local devices.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8,
          "c64": 8, "c128": 16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--models", default="gateloop:125m,gateloop:125m_multihead", help="comma list of name:preset")
    p.add_argument("--sequence", type=int, default=8, help="mesh sequence size (context parallelism)")
    p.add_argument("--data", type=int, default=1, help="mesh data size")
    p.add_argument("--length", type=int, default=1 << 20)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=0, help="override num_layers (0: the preset's)")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--collectives_only", action="store_true", help="compile and count collectives; no run")
    p.add_argument("--json", default="context_parallel.json")
    return p.parse_args(argv)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Per collective kind in an optimized HLO module: how many ops and the bytes of their results (per device)."""
    out = {}
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not match:
            continue
        nbytes = sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)))
        rec = out.setdefault(match.group(2), {"ops": 0, "bytes": 0})
        rec["ops"] += 1
        rec["bytes"] += nbytes
    return out


def bench_model(args, spec: str) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from gateloop_jax.models import build_model, param_count, preset_config
    from gateloop_jax.sharding import BATCH, DEFAULT_RULES, LENGTH, logical_to_spec, make_mesh

    name, preset = spec.split(":")
    overrides = dict(dtype=args.dtype, remat=args.remat)
    if args.layers:
        overrides["num_layers"] = args.layers
    if name != "transformer":
        overrides["mode"] = args.mode
    config = preset_config(preset, name=name, **overrides)
    mesh = make_mesh({"data": args.data, "sequence": args.sequence})
    rules = DEFAULT_RULES
    with nnx.logical_axis_rules(rules):
        model = build_model(config, rngs=nnx.Rngs(0))
    n_params = param_count(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    tx = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = tx.init(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    tokens_sharding = NamedSharding(mesh, logical_to_spec((BATCH, LENGTH), rules))

    def loss_fn(params, rest, inputs, targets):
        logits = nnx.merge(graphdef, params, rest)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def step(params, opt_state, rest, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(0)
    shape = (args.batch, args.length)
    rec = {"model": spec, "params": n_params, "mode": config.mode if name != "transformer" else "-",
           "mesh": dict(mesh.shape), "batch": args.batch, "length": args.length, "dtype": args.dtype,
           "remat": args.remat, "layers": config.num_layers, "tokens": args.batch * args.length}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        params, opt_state, rest = jax.device_put((params, opt_state, rest), replicated)
        batches = [[jax.device_put(jax.random.randint(jax.random.fold_in(key, 2 * i + j), shape, 0, config.vocab_size,
                                                      jnp.int32), tokens_sharding) for j in range(2)] for i in range(2)]
        jitted = jax.jit(step, in_shardings=(replicated, replicated, replicated, tokens_sharding, tokens_sharding),
                         out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
        start = time.perf_counter()
        compiled = jitted.lower(params, opt_state, rest, batches[0][0], batches[0][1]).compile()
        rec["compile_s"] = time.perf_counter() - start
    rec["collectives"] = collectives(compiled.as_text())
    if args.collectives_only:
        return rec
    state = {"params": params, "opt_state": opt_state, "i": 0, "losses": []}

    def call():
        inputs, targets = batches[state["i"] % 2]
        state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"], rest, inputs,
                                                             targets)
        state["i"] += 1
        state["losses"].append(loss)
        return loss

    rec.update(bc.time_calls(call, warmup=args.warmup, reps=args.reps))
    rec["tokens_per_s"] = rec["tokens"] / rec["median_s"]
    rec["loss_last"] = float(jax.device_get(state["losses"][-1]))
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
    rec["peak_bytes_max_device"] = max(peaks) if peaks else None
    return rec


def main(argv=None):
    args = parse_args(argv)
    path = os.path.join(args.out, args.json)
    result = {"benchmark": "context_parallel", "args": vars(args), "records": []}
    for spec in args.models.split(","):
        try:
            rec = bench_model(args, spec)
        except Exception as err:  # noqa: BLE001 - an OOM at one size is a result, not the end of the sweep
            rec = {"model": spec, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        result["records"].append(rec)
        bc.write_json(path, result)
        print(json.dumps(rec, default=bc._json_default), flush=True)
    result["env"] = bc.env_record()
    bc.write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
