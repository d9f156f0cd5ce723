"""Decode benchmark: per-token latency and throughput of GateLoop's recurrent decoding vs a Transformer's KV cache.

    python experiments/bench_decode.py --out experiments/results
    python experiments/bench_decode.py --out /tmp/d --models gateloop:test,transformer:test --contexts 16,32 \
        --batches 1 --steps 4 --reps 3                                   # what tests/bench_test.py runs (CPU)

For each model (registry name : preset) and context length, the cache is set up as it would be after a prompt of that
length - GateLoop: one complex state per layer, O(1) in the context; Transformer: a KV cache of max_len = context +
the decoded tokens, filled with random keys and values (a prefill of 64k tokens would only cost time, not change the
per-token cost) - and `--steps` tokens are decoded greedily inside one jitted lax.scan (so Python dispatch is not
in the figure). Per-token latency = median call time / steps; throughput = batch * steps / median call time.
The cache is donated, so the KV cache is updated in place as a serving loop would.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def parse_args(argv=None):
    p = bc.model_bench_parser(__doc__, json_name="decode.json", dtype_help="activation and KV-cache dtype")
    p.add_argument("--contexts", default="1024,4096,16384,65536")
    p.add_argument("--batches", default="1,16", help="batch 1: latency; larger: throughput")
    p.add_argument("--steps", type=int, default=32, help="tokens decoded per timed call")
    p.add_argument("--budget_s", type=float, default=0.0, help="overall time budget (0: none)")
    return p.parse_args(argv)


def fill_cache(cache, context: int, seed: int):
    """Random cache contents 'after a prompt of `context` tokens' (never zeros), drawn on the host: no compile."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for layer in cache:
        if isinstance(layer, dict):  # KV cache
            layer = dict(layer)
            for name in ("k", "v"):
                shape, dtype = layer[name].shape, layer[name].dtype
                layer[name] = jax.device_put(rng.standard_normal(shape, np.float32).astype(dtype))
            layer["length"] = jnp.full_like(layer["length"], context)
            layer["start"] = jnp.zeros(layer["start"].shape, layer["start"].dtype)  # one document from position 0
        else:  # recurrent state, complex
            noise = rng.standard_normal((2,) + layer.shape, np.float32) * 0.1
            layer = jax.device_put((noise[0] + 1j * noise[1]).astype(layer.dtype))
        out.append(layer)
    return out


def main(argv=None):
    args = parse_args(argv)
    bc.configure_jax_memory()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gateloop_jax.models import build_model, param_count, preset_config

    start = time.perf_counter()
    result = {
        "benchmark": "decode",
        "env": bc.env_record(),
        "args": vars(args),
        "records": [],
        "notes": [
            "ms_per_token: median time of one jitted call decoding `steps` tokens greedily (lax.scan), divided by "
            "steps",
            "tokens_per_s: batch * steps / median call time",
            "cache_bytes: the cache arrays' sizes (GateLoop: a complex64 state per layer; Transformer: K and V)",
        ],
    }
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    for spec in args.models.split(","):
        name, preset = spec.split(":")
        config = preset_config(preset, name=name, dtype=args.dtype)
        model = build_model(config, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        n_params = param_count(model)
        del model

        def decode(params, token, cache):
            model = nnx.merge(graphdef, params)

            def body(carry, _):
                token, cache = carry
                logits, cache = model.decode_step(token, cache)
                token = jnp.argmax(logits, axis=-1).astype(token.dtype)
                return (token, cache), token

            (token, cache), tokens = jax.lax.scan(body, (token, cache), None, length=args.steps)
            return tokens, cache

        executables = {}
        for batch in batches:
            for context in contexts:
                rec = {
                    "model": f"{name}:{preset}",
                    "name": name,
                    "preset": preset,
                    "batch": batch,
                    "context": context,
                    "params": n_params,
                    "dtype": args.dtype,
                    "steps": args.steps,
                }
                if args.budget_s and time.perf_counter() - start > args.budget_s:
                    rec["skipped"] = "overall time budget (--budget_s) spent"
                    result["records"].append(rec)
                    continue
                try:
                    max_len = context + args.steps * (args.warmup + args.reps + 2)
                    template = jax.eval_shape(lambda: nnx.merge(graphdef, params).init_cache(batch, max_len))
                    cache = fill_cache(template, context, seed=context)
                    del template
                    rec["cache_bytes"] = int(
                        sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim > 1)
                    )
                    token = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (batch,), np.int32))
                    # GateLoop's cache does not depend on the context: one executable serves every context.
                    shapes = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(cache))
                    if shapes not in executables:
                        executables[shapes] = bc.compile_fn(decode, (params, token, cache), donate_argnums=(2,))
                    else:
                        rec["compile_reused"] = True
                    compiled, rec["compile_s"], rec["xla_memory"] = executables[shapes]
                    state = {"cache": cache, "token": token}

                    def call():  # state is deleted below, after use (hence the noqa: F821)
                        tokens, state["cache"] = compiled(params, state["token"], state["cache"])  # noqa: F821
                        state["token"] = tokens[-1]  # noqa: F821
                        return tokens

                    rec.update(bc.time_calls(call, warmup=args.warmup, reps=args.reps))
                    tokens = jax.device_get(call())
                    rec["tokens_in_range"] = bool(((tokens >= 0) & (tokens < config.vocab_size)).all())
                    rec["ms_per_token"] = rec["median_s"] / args.steps * 1e3
                    rec["tokens_per_s"] = batch * args.steps / rec["median_s"]
                    del state, cache
                except Exception as err:  # noqa: BLE001 - e.g. out of memory at a long context
                    rec["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                result["records"].append(rec)
                bc.write_json(os.path.join(args.out, args.json), result)  # partial results survive a timeout
                print(
                    f"{rec['model']:<28} batch {batch:>3} context {context:>6}: "
                    + (
                        f"{rec['ms_per_token']:.3f} ms/token, {rec['tokens_per_s']:.0f} tokens/s"
                        if "ms_per_token" in rec
                        else rec.get("skipped", "")
                    ),
                    flush=True,
                )
    result["wall_s"] = time.perf_counter() - start
    path = os.path.join(args.out, args.json)
    bc.write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
