"""mode="mosaic_gpu" on the real GPU lowering (Hopper) against the float64 oracle, at every head width.

    python experiments/kernel_dev/check_mosaic_gpu.py --out /tmp/mosaic_accuracy.json

Per (d_qk, d_v) pair (every width in {32, 64, 96, 128, 256} on each side, as in tests/mosaic_gpu_test.py) and gate
regime (tests/mosaic_gpu_test._inputs: |a| log-uniform in [1e-6, 1], ~1e-6, within 1e-5 of 1, both extremes
interleaved; phases to +-100 rad; a carried initial state; an odd length over several chunks): the max relative
error of y, the final state and every gradient, each against its own scale in that regime, float32 inputs. The
issue's target is < 1e-4 everywhere. Writes the JSON after every pair (and says which pairs failed to run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
# This script is how the kernel gets verified on a GPU: run it even where gateloop() refuses the unverified kernel.
os.environ.setdefault("GATELOOP_MOSAIC_GPU_UNVERIFIED", "1")

# Every width on each side, and d_qk != d_v both ways.
PAIRS = ((32, 32), (64, 64), (96, 96), (128, 128), (256, 256), (32, 96), (256, 64))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="mosaic_accuracy.json")
    p.add_argument("--length", type=int, default=197, help="odd, several 64-row chunks")
    p.add_argument("--pairs", default="", help="d_qk:d_v,... (default: the module's PAIRS)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from mosaic_gpu_test import _inputs
    from pallas_test import _oracle_grads_with_final
    from reference import gateloop_forward, max_rel_error

    from gateloop_jax import ops

    pairs = [tuple(map(int, s.split(":"))) for s in args.pairs.split(",")] if args.pairs else PAIRS
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "length": args.length, "target": 1e-4,
              "rows": []}

    def fn(q, k, v, log_r, theta, h0):
        a = ops.PolarTransition(log_r, theta)
        return ops.gateloop(q, k, v, a, mode="mosaic_gpu", initial_state=h0, return_state=True)

    step = jax.jit(lambda *xs_ct: _fwd_bwd(fn, *xs_ct))
    for dk, dv in pairs:
        row = {"d_qk": dk, "d_v": dv}
        try:
            q, k, v, lr, th, h0, dy, dfinal = _inputs(np.random.default_rng(dk * 1000 + dv), 4, args.length, 2, dk, dv)
            start = time.perf_counter()
            (y, final), grads = step(q, k, v, lr, th, h0, dy, jnp.conj(jnp.asarray(dfinal)))
            jax.block_until_ready(grads)
            row["compile_and_run_s"] = round(time.perf_counter() - start, 2)
            y_ref, states = gateloop_forward(q, k, v, lr, th, h0)
            ref = _oracle_grads_with_final(q, k, v, lr, th, h0, dy, dfinal)
            final, dh0 = np.asarray(final), np.conj(np.asarray(grads[5]))
            outs = {"y": (y, y_ref), "final.re": (final.real, states[:, -1].real),
                    "final.im": (final.imag, states[:, -1].imag), "dh0.re": (dh0.real, ref[5].real),
                    "dh0.im": (dh0.imag, ref[5].imag)}
            outs.update(zip(("dq", "dk", "dv", "dlog_r", "dtheta"), zip(grads, ref)))
            row["errors"] = {name: [max_rel_error(np.asarray(x)[i], r[i]) for i in range(4)]
                             for name, (x, r) in outs.items()}
            row["max_error"] = max(max(e) for e in row["errors"].values())
            row["ok"] = bool(np.isfinite(row["max_error"]) and row["max_error"] < 1e-4)
        except Exception as e:  # noqa: BLE001 - one failing width must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        result["rows"].append(row)
        print(json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "errors"}), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def _fwd_bwd(fn, q, k, v, lr, th, h0, dy, dfinal_ct):
    import jax

    out, vjp = jax.vjp(fn, q, k, v, lr, th, h0)
    return out, vjp((dy, dfinal_ct))


if __name__ == "__main__":
    main()
