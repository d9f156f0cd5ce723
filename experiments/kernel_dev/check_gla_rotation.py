"""Mode "gla_rotation" on the GPU: its errors per output against float32 "recurrent", with a carried state and the
final state, the layer with config mode "gla_rotation" against "pallas", and its fwd+bwd time beside "pallas".

    python experiments/kernel_dev/check_gla_rotation.py --out experiments/results     # H200: gla_rotation_h200.json

Needs jax-linear-attention (pip install -e ".[peers]") and a Hopper GPU; elsewhere every row records the mode's own
error (what tests/bench_test.py checks on CPU). Inputs are bench_modes.op_inputs' (bf16 q, k, v, dy; |a| in
[0.5, 0.9975], phases in [-pi, pi)), plus a random complex initial state. Time: median over 10 runs of 5 calls in
flight per synchronisation (bench_modes' "pipelined").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
import bench_common as bc  # noqa: E402
import bench_modes  # noqa: E402

OUTPUTS = ("y", "final", "dq", "dk", "dv", "dlog_magnitude", "dphase", "dh0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--json", default="gla_rotation_h200.json")
    p.add_argument("--shapes", default="32x1024,4x8192", help="batch x length of the op checks")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d_head", type=int, default=64)
    p.add_argument("--layer_shape", default="4x2048", help="batch x length of the layer check")
    return p.parse_args(argv)


def fwdbwd(mode, upcast=False):
    """jit(y, final state and the six input cotangents) of ops.gateloop with a carried state."""
    import jax
    import jax.numpy as jnp

    from gateloop_jax import ops

    def forward(q, k, v, log_magnitude, phase, h0):
        if upcast:
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return ops.gateloop(
            q, k, v, ops.PolarTransition(log_magnitude, phase), mode=mode, initial_state=h0, return_state=True
        )

    @jax.jit
    def run(q, k, v, log_magnitude, phase, h0, dy):
        (y, final), vjp = jax.vjp(forward, q, k, v, log_magnitude, phase, h0)
        return (y, final) + vjp((dy.astype(y.dtype), jnp.zeros_like(final)))

    return run


def pipelined_ms(fn, args, runs=10, in_flight=5):
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(in_flight):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / in_flight)
    return 1e3 * float(np.median(times))


def check_op(b, t, heads, d_head):
    import jax
    import jax.numpy as jnp

    dims = {"heads": heads, "d_qk": d_head, "d_v": d_head}
    inputs = bench_modes.op_inputs(7 + t, b, t, dims, "bfloat16")
    shape = (b, heads, d_head, d_head)
    h0 = jax.random.normal(jax.random.key(1), shape) + 1j * jax.random.normal(jax.random.key(2), shape)
    args = tuple(inputs[n] for n in ("q", "k", "v", "log_magnitude", "phase")) + (
        h0.astype(jnp.complex64),
        inputs["dy"],
    )
    row = {"b": b, "t": t}
    try:
        got = [np.asarray(x) for x in fwdbwd("gla_rotation")(*args)]
        ref = [np.asarray(x) for x in fwdbwd("recurrent", upcast=True)(*args)]
        row["errors"] = {
            name: float(np.max(np.abs(g.astype(np.complex128) - r)) / np.max(np.abs(r)))
            for name, g, r in zip(OUTPUTS, got, ref)
        }
        for mode in ("gla_rotation", "pallas"):
            row[f"{mode}_ms_pipelined"] = pipelined_ms(fwdbwd(mode), args)
    except Exception as err:  # noqa: BLE001 - recorded: e.g. no kernel on this machine
        row["error"] = f"{type(err).__name__}: {str(err)[:800]}"
    return row


def check_layer(b, t, heads, d_head):
    """y and the parameter gradients of a bf16 GateLoopMixer in mode "gla_rotation" against mode "pallas"."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import gateloop_jax.models  # noqa: F401 - before layers: importing layers first is a circular import
    from gateloop_jax.layers import GateLoopMixer
    from gateloop_jax.models.config import ModelConfig

    d_model = heads * d_head
    config = ModelConfig(
        name="gateloop",
        d_model=d_model,
        num_heads=heads,
        d_qk=d_head,
        d_v=d_head,
        dtype="bfloat16",
        mode="gla_rotation",
    )
    layer = GateLoopMixer(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (b, t, d_model)).astype(jnp.bfloat16)

    def rel(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))

    try:
        y = {mode: layer(x, mode=mode) for mode in ("gla_rotation", "pallas")}
        grads = {
            mode: jax.tree.leaves(
                nnx.state(nnx.grad(lambda m, mode=mode: jnp.mean(m(x, mode=mode).astype(jnp.float32) ** 2))(layer))
            )
            for mode in ("gla_rotation", "pallas")
        }
        return {
            "layer_y_vs_pallas": rel(y["gla_rotation"], y["pallas"]),
            "layer_worst_param_grad_vs_pallas": max(rel(a, b) for a, b in zip(grads["gla_rotation"], grads["pallas"])),
        }
    except Exception as err:  # noqa: BLE001
        return {"layer_error": f"{type(err).__name__}: {str(err)[:800]}"}


def main(argv=None):
    args = parse_args(argv)
    bc.configure_jax_memory()
    out = {"env": bc.env_record(), "rows": []}
    for shape in bench_modes.csv(args.shapes):
        b, t = map(int, shape.split("x"))
        out["rows"].append(check_op(b, t, args.heads, args.d_head))
        print(out["rows"][-1], flush=True)
    b, t = map(int, args.layer_shape.split("x"))
    out["layer"] = check_layer(b, t, args.heads, args.d_head)
    print(out["layer"], flush=True)
    bc.write_json(os.path.join(args.out, args.json), out)
    return out


if __name__ == "__main__":
    main()
