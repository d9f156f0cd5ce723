"""Where the time of mode="mosaic_gpu" goes, per kernel variant: each stage jitted alone on real inputs and timed like
bench_modes.py (median of runs, back-to-back calls), at 32768 tokens, 8 heads of 64, bf16 q, k, v and dy (the model's
dtype; the op computes in float32), on bench_kernels.py's inputs.

Usage (GPU machine; --smoke runs tiny shapes in interpret mode on CPU):
    python experiments/kernel_dev/profile_mosaic_gpu.py --out $OUT [--variants padded,padded_subblock] \
        [--lengths 1024,8192] [--d_head 64]

Stages (ops/pallas_mosaic_gpu.py):
- factors: the gates' decay factors (mosaic_gpu_gates.gate_factors, the sub-block ones for "_subblock");
- fwd_kernel: the forward kernel (intra-chunk y);
- fwd_total: the whole forward (+ chunk increments, associative scan over chunks, inter-chunk y, in XLA);
- bwd_kernel: the backward kernel (intra-chunk coefficients and dv);
- bwd_total: the whole backward (+ the reversed scan, inter-chunk terms, dlog|a| and darg a sums, in XLA);
- fwd_bwd_total: y and the five gradients through the public op.
XLA's share of a pass is its total minus its kernel. Writes <out>/mosaic_profile.json as it goes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

# bench_kernels first: it loads gateloop_jax/ops alone where the model stack is missing, as on the GPU image.
from bench_kernels import make_inputs  # noqa: E402, I001

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_common as bc  # noqa: E402
from gateloop_jax.ops import pallas_mosaic_gpu as pm  # noqa: E402


def op_fwd_bwd(variant, interpret):
    """(q, k, v, log_r, theta, dy) -> y and the five input cotangents through the public op with this kernel variant.
    y is returned too: without it XLA would drop the forward kernel."""

    def fwd_bwd(q, k, v, log_r, theta, dy):
        y, pull = jax.vjp(lambda *x: pm.gateloop_mosaic_gpu(*x, None, interpret=interpret, variant=variant)[0],
                          q, k, v, log_r, theta)
        return y, *pull(dy.astype(y.dtype))

    return fwd_bwd


def stages(variant, length, tokens, heads, d, dtype, interpret, runs):
    b = max(1, tokens // length)
    q, k, v, log_r, theta, dy = make_inputs(jax.random.key(0), b, length, heads, d, d, dtype)
    dy = dy.astype(dtype)
    opts = (interpret, variant)
    zeros = jnp.zeros((b, heads, d, d), jnp.float32)
    qp, kp, vp, lr, th, h0re, h0im = pm._padded(q, k, v, log_r, theta, zeros, zeros)
    dyp = pm._pad_to(dy.astype(jnp.float32), vp.shape)
    out = {}

    def timed(name, fn, *args):
        f = jax.jit(fn)
        res = jax.block_until_ready(f(*args))
        # At the smoke size (interpret mode) one call per stage: the figures mean nothing there.
        reps = {"runs": 1, "reps": 1, "warmup": 0} if interpret else {"runs": runs}
        out[name] = bc.time_sync_and_pipelined(f, args, **reps)["ms"]
        print(f"  {variant:>22s} L={length:<6d} {name:>14s} {out[name]:8.3f} ms", flush=True)
        return res

    gates = timed("factors", lambda *a: pm._gate_factors(*a, opts), lr, th)
    timed("fwd_kernel", lambda *a: pm._forward_intra(*a, gates.sub, opts=opts), qp, kp, vp, lr, th)
    timed("fwd_total", lambda *a: pm._forward(*a, opts=opts), qp, kp, vp, lr, th, h0re, h0im)
    s_re, s_im, _, _ = pm._chunk_starts(kp, vp, gates, h0re, h0im, opts=opts)
    timed("bwd_kernel", lambda *a: pm._backward_intra(*a, gates.sub, opts=opts), qp, kp, vp, lr, th, dyp)
    timed("bwd_total", lambda *a: pm._backward(*a, opts=opts), qp, kp, vp, lr, th, gates, s_re, s_im, dyp, h0re,
          h0im)

    timed("fwd_bwd_total", op_fwd_bwd(variant, interpret), q, k, v, log_r, theta, dy)
    out["fwd_xla"] = out["fwd_total"] - out["fwd_kernel"]
    out["bwd_xla"] = out["bwd_total"] - out["bwd_kernel"]
    return {"variant": variant, "length": length, "batch": b, "heads": heads, "d_head": d, "dtype": dtype, "ms": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    ap.add_argument("--variants", default="padded_scan,padded,padded_subblock", help=f"comma list of {pm.VARIANTS}")
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // length)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d_head", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget_s", type=float, default=400.0, help="start no new (variant, length) after this")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    args = ap.parse_args(argv)
    variants = [x for x in args.variants.split(",") if x]
    unknown = [x for x in variants if x not in pm.VARIANTS]
    if unknown:
        ap.error(f"--variants {','.join(unknown)}: not in ops/pallas_mosaic_gpu.VARIANTS {pm.VARIANTS}")
    if pm.unavailable_reason():
        ap.error(f"mode mosaic_gpu is unavailable here: {pm.unavailable_reason()}")
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.smoke:
        lengths, args.tokens, args.heads, args.d_head, args.runs = [64], 64, 1, 32, 1
    os.makedirs(args.out, exist_ok=True)
    result = {"env": bc.env_record(), "records": []}
    start = time.time()
    for length in lengths:
        for variant in variants:
            if time.time() - start > args.budget_s:
                result["records"].append({"variant": variant, "length": length, "skipped": "budget"})
                continue
            try:
                result["records"].append(stages(variant, length, args.tokens, args.heads, args.d_head, args.dtype,
                                                 args.smoke, args.runs))
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' figures
                result["records"].append({"variant": variant, "length": length, "error": repr(e)[:2000]})
                print(f"  {variant} L={length}: {e!r}"[:500], flush=True)
            bc.write_json(os.path.join(args.out, "mosaic_profile.json"), result)
    print(f"wrote {os.path.join(args.out, 'mosaic_profile.json')}")


if __name__ == "__main__":
    main()
