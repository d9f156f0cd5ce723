"""Quick H200 timing of the Pallas GateLoop kernels against the pure-JAX modes and cuDNN attention, in one run.

Usage (on the GPU machine):
    python experiments/kernel_dev/bench_kernels.py --out $OUT [--suite ew,mh] [--ew-variants all]

What is timed: forward+backward of the op alone, i.e. jit(lambda *xs: vjp(op, *xs)) returning y and the five input
cotangents (no loss reduction around it), at 32768 tokens per batch (b = 32768 / L), L in {1024, 8192}:
  * ew (max-headed): 512 channels, d_qk = d_v = 1: pallas_elementwise variants, ops scan, ops chunked.
  * mh (multi-head): 8 heads, d_qk = d_v = 64: pallas_chunked, ops chunked, cuDNN causal attention (bf16).
Each figure: median of >= 10 timed runs after warm-up; each run is `reps` back-to-back calls then one
block_until_ready, divided by reps (so host dispatch overlaps device work), plus the single synchronised call
median for reference. A copy (read + write of 1 GiB) gives the bandwidth ceiling in the same run.
Correctness in the same run: every Pallas variant against ops scan (float32) on a smaller shape, max |diff| / max |ref|
for y and all gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(EXPERIMENTS)
sys.path[:0] = [REPO, EXPERIMENTS]
# The kernels need jax alone; the package's __init__ pulls in the model stack (flax, ml_collections, ...), which the
# GPU image need not have. (Always stubbing the package would also skip __init__'s settings in a process, e.g. the
# test run, that later builds models.)
try:
    import gateloop_jax  # noqa: F401 - the real package when its dependencies are installed
except ImportError:  # the GPU image lacks the model stack (flax, ml_collections, ...): load ops/ alone
    import types

    _pkg = types.ModuleType("gateloop_jax")
    _pkg.__path__ = [os.path.join(REPO, "gateloop_jax")]
    sys.modules["gateloop_jax"] = _pkg

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_common as bc  # noqa: E402

from gateloop_jax.ops import chunked, scan  # noqa: E402
from gateloop_jax.ops import pallas_elementwise as pe  # noqa: E402

try:
    from gateloop_jax.ops import pallas_chunked as pc  # noqa: E402
except Exception:  # noqa: BLE001 - reported, not fatal
    pc = None
    PC_IMPORT_ERROR = traceback.format_exc()

TOKENS = 32768
INTERPRET = False  # --smoke: tiny shapes in interpret mode, to check this script on a CPU


def make_inputs(key, b, t, h, dk, dv, dtype=jnp.float32):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, t, h, dk), dtype)
    k = jax.random.normal(ks[1], (b, t, h, dk), dtype) / np.sqrt(dk)
    v = jax.random.normal(ks[2], (b, t, h, dv), dtype)
    log_r = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, dk), jnp.float32) + 3.0)
    theta = jax.random.uniform(ks[4], (b, t, h, dk), jnp.float32, -np.pi, np.pi)
    dy = jax.random.normal(ks[5], (b, t, h, dv), jnp.float32)
    return q, k, v, log_r, theta, dy


def op_fwd_bwd(mode_fn):
    """jit of (q, k, v, log_r, theta, dy) -> (y, dq, dk, dv, dlog_r, dtheta)."""

    def f(q, k, v, log_r, theta, dy):
        y, pull = jax.vjp(lambda *xs: mode_fn(*xs, None)[0], q, k, v, log_r, theta)
        return (y, *pull(dy))

    return jax.jit(f)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check(fn, ref_fn, inputs):
    out, ref = fn(*inputs), ref_fn(*inputs)
    return {name: rel_err(o, r) for name, o, r in zip(("y", "dq", "dk", "dv", "dlog_r", "dtheta"), out, ref)}


def copy_bandwidth():
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 28,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda x: x * 1.0000001)
    r = bc.time_sync_and_pipelined(f, (x,), runs=10, reps=5)
    return {"bytes": 2 * x.nbytes, "ms": r["ms"], "TBps": 2 * x.nbytes / (r["ms"] * 1e-3) / 1e12}


EW_VARIANTS = {
    "default": pe.Config(),
    "default_again": pe.Config(),  # the same kernel timed twice: the run-to-run spread
    "cb128_w4_u8_p1024": pe.Config(block_channels=128, num_warps=4, unroll=8, min_programs=1024),
    "cb64_w2_u8_p2048": pe.Config(block_channels=64, num_warps=2, unroll=8, min_programs=2048),
    "cb256_w8_u8_p256": pe.Config(block_channels=256, num_warps=8, unroll=8, min_programs=256),
    "cb32_u8_p512": pe.Config(block_channels=32, num_warps=1, unroll=8, min_programs=512),  # one segment at L=1024
    # Measured (H200, fwd+bwd pipelined ms at L = 1024 / 8192; default 0.564 / 0.551, again 0.548 / 0.567): two or
    # four channels per thread (independent chains to interleave) did not help: 0.577 / 0.589 and 0.847 / 0.907.
    # (A Config.trig field, measured once and dropped, commit 78df046: PTX sin / cos.approx 0.744 / 0.741, and no
    # cos / sin at all 0.693 / 0.697, both slower than libdevice's: the trigonometry is not what bounds the kernel.)
    "cb256_w4": pe.Config(block_channels=256, num_warps=4),
    "cb512_w4": pe.Config(block_channels=512, num_warps=4),
}


def bench_ew(results, variants, lengths, runs):
    h = 512
    for L in lengths:
        b = TOKENS // L
        inputs = make_inputs(jax.random.PRNGKey(L), b, L, h, 1, 1)
        n = b * L * h
        # Fewest bytes: fwd reads q k v log_r theta, writes y; bwd reads those five and dy, writes five grads.
        min_bytes = 4 * n * (6 + 11)
        row = {"L": L, "b": b, "channels": h, "min_bytes": min_bytes}
        peers = {"scan": scan.gateloop_scan, "chunked": chunked.gateloop_chunked}
        for name, fn in peers.items():
            try:
                row[name] = bc.time_sync_and_pipelined(op_fwd_bwd(fn), inputs, runs=runs)
            except Exception as e:  # noqa: BLE001
                row[name] = {"error": repr(e)[:500]}
            print(L, name, row[name], flush=True)
        for vname in variants:
            cfg = EW_VARIANTS[vname]
            fn = op_fwd_bwd(lambda *a, cfg=cfg: pe.gateloop_pallas_elementwise(*a, interpret=INTERPRET, config=cfg))
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                compile_s = time.perf_counter() - t0
                r = bc.time_sync_and_pipelined(fn, inputs, runs=runs)
                r["compile_s"] = compile_s
                r["GBps_min_bytes"] = min_bytes / (r["ms"] * 1e-3) / 1e9
            except Exception as e:  # noqa: BLE001
                r = {"error": repr(e)[:2000]}
            row["pallas_" + vname] = r
            print(L, vname, r, flush=True)
        results["ew"].append(row)
    # Correctness on the GPU, smaller shape, every variant (incl. multi-segment paths) against ops scan.
    small = make_inputs(jax.random.PRNGKey(7), 2, 2048, 96, 1, 1)
    check_variants(
        results["ew_check"],
        small,
        {
            name: (
                lambda *a, cfg=EW_VARIANTS[name]._replace(segment_length=256): pe.gateloop_pallas_elementwise(
                    *a, interpret=INTERPRET, config=cfg
                )
            )
            for name in variants
        },
    )


def check_variants(out, inputs, fns):
    """Each variant's y and gradients against ops scan (float32) on the same inputs, into out[name]."""
    ref = op_fwd_bwd(scan.gateloop_scan)
    for name, fn in fns.items():
        try:
            out[name] = check(op_fwd_bwd(fn), ref, inputs)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out[name] = {"error": repr(e)[:2000]}
        print("check", name, out[name], flush=True)


def cudnn_attention_fwd_bwd():
    def f(q, k, v, dy):
        def att(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        y, pull = jax.vjp(att, q, k, v)
        return (y, *pull(dy))

    return jax.jit(f)


def bench_mh(results, variants, lengths, runs):
    h, d = 8, 64
    for L in lengths:
        b = TOKENS // L
        inputs = make_inputs(jax.random.PRNGKey(L), b, L, h, d, d)
        row = {"L": L, "b": b, "heads": h, "d": d}
        try:
            q, k, v, _, _, dy = inputs
            bf = [x.astype(jnp.bfloat16) for x in (q, k, v, dy)]
            row["cudnn_attention_bf16"] = bc.time_sync_and_pipelined(cudnn_attention_fwd_bwd(), bf, runs=runs)
        except Exception as e:  # noqa: BLE001
            row["cudnn_attention_bf16"] = {"error": repr(e)[:500]}
        print(L, "cudnn", row["cudnn_attention_bf16"], flush=True)
        try:
            row["chunked"] = bc.time_sync_and_pipelined(op_fwd_bwd(chunked.gateloop_chunked), inputs, runs=runs)
        except Exception as e:  # noqa: BLE001
            row["chunked"] = {"error": repr(e)[:500]}
        print(L, "chunked", row["chunked"], flush=True)
        if pc is None:
            row["pallas"] = {"error": PC_IMPORT_ERROR[-1500:]}
        else:
            for vname in variants:
                cfg = pc.VARIANTS[vname]
                fn = op_fwd_bwd(lambda *a, cfg=cfg: pc.gateloop_pallas_chunked(*a, interpret=INTERPRET, config=cfg))
                try:
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*inputs))
                    r = bc.time_sync_and_pipelined(fn, inputs, runs=runs)
                    r["compile_s"] = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    r = {"error": repr(e)[:2000]}
                row["pallas_" + vname] = r
                print(L, vname, r, flush=True)
            # Forward alone (what inference / prefill pays), default config.
            try:
                fwd = jax.jit(
                    lambda q, k, v, lr, th: pc.gateloop_pallas_chunked(q, k, v, lr, th, None, interpret=INTERPRET)[0]
                )
                row["pallas_forward_only"] = bc.time_sync_and_pipelined(fwd, inputs[:5], runs=runs)
            except Exception as e:  # noqa: BLE001
                row["pallas_forward_only"] = {"error": repr(e)[:2000]}
            print(L, "forward_only", row["pallas_forward_only"], flush=True)
        results["mh"].append(row)
    if pc is not None:
        small = make_inputs(jax.random.PRNGKey(7), 2, 512, 2, 64, 64)
        check_variants(
            results["mh_check"],
            small,
            {
                name: (
                    lambda *a, cfg=pc.VARIANTS[name]: pc.gateloop_pallas_chunked(*a, interpret=INTERPRET, config=cfg)
                )
                for name in variants
            },
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    p.add_argument("--suite", default="ew,mh")
    p.add_argument("--ew-variants", default="all")
    p.add_argument("--mh-variants", default="all")
    p.add_argument("--lengths", default="1024,8192")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    global TOKENS, INTERPRET
    if a.smoke:
        TOKENS, INTERPRET = 64, True
    import jaxlib

    dev = jax.devices()[0]
    results = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "command": " ".join(sys.argv),
        "tokens": TOKENS,
        "ew": [],
        "mh": [],
        "ew_check": {},
        "mh_check": {},
    }
    results["copy"] = copy_bandwidth() if not a.smoke else {"TBps": 0.0}
    print("copy", results["copy"], flush=True)
    lengths = [int(x) for x in a.lengths.split(",")]
    suites = a.suite.split(",")
    if "ew" in suites:
        v = list(EW_VARIANTS) if a.ew_variants == "all" else a.ew_variants.split(",")
        bench_ew(results, v, lengths, a.runs)
    if "mh" in suites:
        if a.mh_variants == "all":  # ablations compute wrong results on purpose: profile_pallas_chunked.py only
            v = [name for name, cfg in pc.VARIANTS.items() if not cfg.ablate] if pc is not None else []
        else:
            v = a.mh_variants.split(",")
        bench_mh(results, v, lengths, a.runs)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "bench_kernels.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    # Short table last: the reply carries the end of the output.
    print("\n=== summary (ms, fwd+bwd) copy %.2f TB/s" % results["copy"]["TBps"])
    for row in results["ew"] + results["mh"]:
        cells = {k: (v.get("ms") if isinstance(v, dict) else None) for k, v in row.items() if isinstance(v, dict)}
        print(row["L"], " ".join(f"{k}={v:.3f}" if v is not None else f"{k}=ERR" for k, v in cells.items()))
    for kind in ("ew_check", "mh_check"):
        for k, v in results[kind].items():
            print(
                kind,
                k,
                {n: (f"{e:.1e}" if isinstance(e, float) else e) for n, e in v.items()}
                if "error" not in v
                else v["error"][-600:],
            )


if __name__ == "__main__":
    main()
