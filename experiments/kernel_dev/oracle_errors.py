"""Max relative error of every mode against the float64 oracle at a long length, and CPU time per mode.

    python experiments/kernel_dev/oracle_errors.py --length 4096 \
        --out experiments/results/kernel_dev/oracle_errors_cpu.json

Errors are max|y - y_ref| / max|y_ref| for the forward output and for the gradient w.r.t. each input (float32
inputs, fresh random data: |a| uniform in (0, 1) mixed with |a| within 1e-3 of 1, phases up to 3 pi, a carried
initial state). Times are forward+backward medians on this machine's CPU (not a benchmark of record: see
experiments/bench_modes.py for the H200 figures).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))

from gateloop_jax import ops  # noqa: E402
from reference import gateloop_backward, gateloop_forward, max_rel_error  # noqa: E402


def make_inputs(rng, b, t, h, dk, dv):
    q, k = rng.normal(size=(2, b, t, h, dk))
    v = rng.normal(size=(b, t, h, dv))
    magnitude = np.where(
        rng.uniform(size=(b, t, h, dk)) < 0.5,
        rng.uniform(0, 1, size=(b, t, h, dk)),
        1 - rng.uniform(0, 1e-3, size=(b, t, h, dk)),
    )
    log_r = np.log(np.maximum(magnitude, 1e-30))
    theta = rng.uniform(-3 * np.pi, 3 * np.pi, size=(b, t, h, dk))
    h0 = rng.normal(size=(b, h, dk, dv)) + 1j * rng.normal(size=(b, h, dk, dv))
    return q, k, v, log_r, theta, h0


def fwd_bwd(mode):
    def f(q, k, v, log_r, theta, h0, dy):
        y, vjp = jax.vjp(
            lambda *x: ops.gateloop(*x[:3], ops.PolarTransition(x[3], x[4]), mode=mode, initial_state=x[5]),
            q,
            k,
            v,
            log_r,
            theta,
            h0,
        )
        return y, vjp(dy)

    return jax.jit(f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="experiments/results/kernel_dev/oracle_errors_cpu.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layouts = {
        "multihead (b=1, h=2, d_qk=d_v=8)": (1, args.length, 2, 8, 8),
        "maxheaded (b=1, h=16, d_qk=d_v=1)": (1, args.length, 16, 1, 1),
    }
    rows = []
    for layout, dims in layouts.items():
        q, k, v, log_r, theta, h0 = make_inputs(rng, *dims)
        dy = rng.normal(size=v.shape)
        ref_y, _ = gateloop_forward(q, k, v, log_r, theta, h0)
        ref_grads = gateloop_backward(q, k, v, log_r, theta, h0, dy)
        args32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, log_r, theta)] + [
            jnp.asarray(h0, jnp.complex64),
            jnp.asarray(dy, jnp.float32),
        ]
        modes = list(ops.MODES) + (["pallas"] if dims[3] == 1 else [])
        for mode in modes:
            fn = fwd_bwd(mode)
            start = time.perf_counter()
            y, grads = jax.block_until_ready(fn(*args32))
            compile_s = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args32))
                times.append(time.perf_counter() - start)
            errors = {"y": max_rel_error(y, ref_y)}
            for name, g, ref in zip(("q", "k", "v", "log_r", "theta"), grads, ref_grads):
                errors[f"grad_{name}"] = max_rel_error(g, ref)
            rows.append(
                dict(
                    layout=layout,
                    mode=mode,
                    length=args.length,
                    max_rel_error=errors,
                    fwd_bwd_ms_median=1e3 * statistics.median(times),
                    first_call_s=compile_s,
                )
            )
            print(
                f"{layout:36s} {mode:10s} y {errors['y']:.2e}  worst grad "
                f"{max(v for k_, v in errors.items() if k_ != 'y'):.2e}  {rows[-1]['fwd_bwd_ms_median']:9.1f} ms"
            )
    record = dict(
        command=" ".join(sys.argv),
        jax=jax.__version__,
        device=str(jax.devices()[0]),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        rows=rows,
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
