"""H200 timing of the multi-head pure-JAX chunked form: the secondary-chunking version (gateloop_jax/ops/chunked.py)
against the previous per-channel-decay version (kept below as `old_chunked`), mode="scan" and cuDNN attention.

Usage (GPU machine):  python experiments/kernel_dev/bench_chunked.py --out $OUT [--budget-s 200]
                      python experiments/kernel_dev/bench_chunked.py --smoke   (tiny shapes on CPU: the script only)

What is timed: forward+backward of the op alone, jit(vjp(op)) returning y and the five input cotangents, at 32768 tokens
per batch (b = 32768 / L), 8 heads, d_qk = d_v = 64, L in {8192, 1024}; median of `runs` timed runs of `reps`
back-to-back calls after a warm-up (as kernel_dev/bench_kernels.py). Memory: XLA's temp allocation of the compiled
fwd+bwd (memory_analysis). Errors: max |x - ref| / max |ref| of y and each gradient against mode="scan" float32 on the
same inputs (for bf16 rows: on the same bf16-rounded inputs). The script watches its own time and skips the rest of
the list once --budget-s is spent; the JSON is rewritten after every measurement.
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
if "gateloop_jax" not in sys.modules:  # import ops/ alone, without the model stack (see bench_kernels.py)
    import types

    _pkg = types.ModuleType("gateloop_jax")
    _pkg.__path__ = [os.path.join(REPO, "gateloop_jax")]
    sys.modules["gateloop_jax"] = _pkg

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_common as bc  # noqa: E402

from gateloop_jax.ops import chunked, scan  # noqa: E402
from gateloop_jax.ops.common import polar_to_complex, reverse_exclusive_cumsum, segsum, wrap_phase  # noqa: E402


# ---- the previous multi-head chunked form (commit c84aa21), verbatim apart from names, for a same-run comparison ----
def _old_to_chunks(x, chunk_size):
    b, t, h, d = x.shape
    return jnp.transpose(x.reshape(b, t // chunk_size, chunk_size, h, d), (0, 3, 1, 2, 4))


def _old_from_chunks(x):
    b, h, c, cs, d = x.shape
    return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, c * cs, h, d)


def old_chunked(q, k, v, log_r, theta, h0, chunk_size=32):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    assert t % chunk_size == 0
    if h0 is None:
        h0 = jnp.zeros((b, h, dk, dv), jnp.complex64)
    q, k, v, log_r, theta = (_old_to_chunks(x, chunk_size) for x in (q, k, v, log_r, wrap_phase(theta)))
    cum_r = jnp.cumsum(log_r, axis=3)
    cum_theta = jnp.cumsum(theta, axis=3)
    log_r_t = jnp.swapaxes(log_r, -1, -2)
    seg_r = segsum(log_r_t)
    seg_theta = jnp.where(jnp.isfinite(seg_r), segsum(jnp.swapaxes(theta, -1, -2)), 0.0)
    decay = jnp.exp(seg_r) * jnp.cos(seg_theta)
    scores = jnp.einsum("bhcnk,bhcmk,bhcknm->bhcnm", q, k, decay)
    y = jnp.einsum("bhcnm,bhcmv->bhcnv", scores, v)
    to_end_r = reverse_exclusive_cumsum(log_r, axis=3)
    to_end_theta = reverse_exclusive_cumsum(theta, axis=3)
    k_to_end = k * jnp.exp(to_end_r)
    inc_re = jnp.einsum("bhcmk,bhcmv->bhckv", k_to_end * jnp.cos(to_end_theta), v)
    inc_im = jnp.einsum("bhcmk,bhcmv->bhckv", k_to_end * jnp.sin(to_end_theta), v)
    transitions = polar_to_complex(cum_r[..., -1, :], cum_theta[..., -1, :])
    starts, final = chunked._carry_states(transitions, jax.lax.complex(inc_re, inc_im), h0)
    q_scaled = q * jnp.exp(cum_r)
    y = y + jnp.einsum("bhcnk,bhckv->bhcnv", q_scaled * jnp.cos(cum_theta), jnp.real(starts))
    y = y - jnp.einsum("bhcnk,bhckv->bhcnv", q_scaled * jnp.sin(cum_theta), jnp.imag(starts))
    return _old_from_chunks(y), final


# ---- harness ----
TOKENS, HEADS, D = 32768, 8, 64


def make_inputs(key, b, t, h, dk, dv):
    ks = jax.random.split(key, 6)
    q = jax.random.normal(ks[0], (b, t, h, dk), jnp.float32)
    k = jax.random.normal(ks[1], (b, t, h, dk), jnp.float32) / np.sqrt(dk)
    v = jax.random.normal(ks[2], (b, t, h, dv), jnp.float32)
    log_r = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, dk), jnp.float32) + 3.0)
    theta = jax.random.uniform(ks[4], (b, t, h, dk), jnp.float32, -np.pi, np.pi)
    dy = jax.random.normal(ks[5], (b, t, h, dv), jnp.float32)
    return q, k, v, log_r, theta, dy


def fwd_bwd(op, cast=None):
    """(q, k, v, log_r, theta, dy) -> (y, dq, dk, dv, dlog_r, dtheta). cast: compute dtype of q, k, v inside (the
    dispatcher's behaviour for bf16 inputs: the op runs in float32, y is cast back)."""

    def f(q, k, v, log_r, theta, dy):
        def g(q, k, v, log_r, theta):
            out_dtype = q.dtype
            if cast is not None:
                q, k, v = (x.astype(cast) for x in (q, k, v))
            return op(q, k, v, log_r, theta, None)[0].astype(out_dtype)

        y, pull = jax.vjp(g, q, k, v, log_r, theta)
        return (y, *pull(dy.astype(y.dtype)))

    return f


def cudnn_fwd_bwd(q, k, v, log_r, theta, dy):
    def att(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    y, pull = jax.vjp(att, q, k, v)
    return (y, *pull(dy))


def compile_and_time(f, args, runs, reps, compiled=None):
    t0 = time.perf_counter()
    compiled = compiled or jax.jit(f).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = None
    try:
        ma = compiled.memory_analysis()
        mem = {
            "temp_GB": ma.temp_size_in_bytes / 1e9,
            "out_GB": ma.output_size_in_bytes / 1e9,
            "arg_GB": ma.argument_size_in_bytes / 1e9,
        }
    except Exception:  # noqa: BLE001
        pass
    out = jax.block_until_ready(compiled(*args))
    r = {
        **bc.time_sync_and_pipelined(compiled, args, runs=runs, reps=reps, warmup=0),
        "compile_s": compile_s,
        "mem": mem,
    }
    return r, out, compiled


def rel_errs(out, ref):
    names = ("y", "dq", "dk", "dv", "dlog_r", "dtheta")
    res = {}
    for name, x, r in zip(names, out, ref):
        x, r = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(r.astype(jnp.float32), np.float64)
        res[name] = float(np.max(np.abs(x - r)) / max(np.max(np.abs(r)), 1e-30))
    res["max"] = max(res.values())
    return res


def new_variant(chunk_size, sub_block, carry="associative", precision=jax.lax.Precision.HIGHEST):
    def op(q, k, v, log_r, theta, h0):
        # Module constants are read at trace time; set them for this trace only.
        saved = (chunked.SUB_BLOCK, chunked.CARRY, chunked.MATMUL_PRECISION)
        chunked.SUB_BLOCK, chunked.CARRY, chunked.MATMUL_PRECISION = sub_block, carry, precision
        try:
            return chunked.gateloop_chunked(q, k, v, log_r, theta, h0, chunk_size=chunk_size)
        finally:
            chunked.SUB_BLOCK, chunked.CARRY, chunked.MATMUL_PRECISION = saved

    return op


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--lengths", default="8192,1024")
    args = ap.parse_args()
    global TOKENS, HEADS, D
    runs, reps = 7, 3
    if args.smoke:
        TOKENS, HEADS, D, runs, reps = 512, 2, 8, 2, 1
        args.lengths = "256"
    start = time.perf_counter()
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "tokens": TOKENS,
        "heads": HEADS,
        "d": D,
        "timing": f"median of {runs} runs x {reps} back-to-back calls",
        "rows": [],
    }
    path = os.path.join(args.out, "kernel_dev/bench_chunked_h200.json") if args.out else None

    def save():
        if path:
            with open(path, "w") as fh:
                json.dump(results, fh, indent=1)

    default = jax.lax.Precision.DEFAULT
    core = [  # (name, op, dtype of q k v dy, compare to)
        ("new_C64_c16", new_variant(64, 16), "f32"),
        ("new_C64_c16_bf16in", new_variant(64, 16), "bf16"),
        ("old_C32", lambda *a: old_chunked(*a, chunk_size=32), "f32"),
        ("cudnn_attention", None, "bf16"),
    ]
    sweep = [
        ("new_C128_c16", new_variant(128, 16), "f32"),
        ("new_C64_c32", new_variant(64, 32), "f32"),
        ("new_C64_c16_seqcarry", new_variant(64, 16, carry="sequential"), "f32"),
        ("new_C64_c16_tf32", new_variant(64, 16, precision=default), "f32"),
        ("new_C128_c32", new_variant(128, 32), "f32"),
        ("new_C128_c16_seqcarry", new_variant(128, 16, carry="sequential"), "f32"),
        ("new_C64_c16_again", new_variant(64, 16), "f32"),
    ]
    data = {}
    for L in lengths:
        b = TOKENS // L
        x = make_inputs(jax.random.PRNGKey(L), b, L, HEADS, D, D)
        xb = tuple(t.astype(jnp.bfloat16) if i in (0, 1, 2, 5) else t for i, t in enumerate(x))
        xr = tuple(t.astype(jnp.float32) for t in xb)  # bf16-rounded inputs, float32
        row = {"L": L, "b": b}
        results["rows"].append(row)
        r, ref, scan_compiled = compile_and_time(fwd_bwd(scan.gateloop_scan), x, runs, reps)
        row["scan"] = r
        print(L, "scan", r, flush=True)
        _, ref_b, _ = compile_and_time(None, xr, 1, 1, compiled=scan_compiled)
        data[L] = (x, xb, row, ref, ref_b)
        save()
    for group in (core, sweep):
        for L in lengths:
            x, xb, row, ref, ref_b = data[L]
            for name, op, dt in group:
                if time.perf_counter() - start > args.budget_s:
                    row[name] = {"skipped": "budget"}
                    continue
                try:
                    if op is None:
                        if args.smoke or jax.default_backend() != "gpu":
                            continue
                        q, k, v, _, _, dy = xb
                        r, _, _ = compile_and_time(cudnn_fwd_bwd, (q, k, v, x[3], x[4], dy), runs, reps)
                    elif dt == "bf16":
                        r, out, _ = compile_and_time(fwd_bwd(op, cast=jnp.float32), xb, runs, reps)
                        r["err_vs_scan_same_bf16_inputs"] = rel_errs(out, ref_b)
                    else:
                        r, out, _ = compile_and_time(fwd_bwd(op), x, runs, reps)
                        r["err_vs_scan"] = rel_errs(out, ref)
                except Exception as e:  # noqa: BLE001
                    r = {"error": repr(e)[:1500], "tb": traceback.format_exc()[-1500:]}
                row[name] = r
                print(L, name, {k_: v_ for k_, v_ in r.items() if k_ != "tb"}, flush=True)
                save()
    results["elapsed_s"] = time.perf_counter() - start
    save()
    # Short table last.
    print("\nL     variant                      ms     sync   temp_GB  max_err")
    for row in results["rows"]:
        for name, r in row.items():
            if isinstance(r, dict) and "ms" in r:
                err = r.get("err_vs_scan", r.get("err_vs_scan_same_bf16_inputs", {})).get("max", float("nan"))
                mem = (r.get("mem") or {}).get("temp_GB", float("nan"))
                print(f"{row['L']:<5} {name:<26} {r['ms']:7.3f} {r['ms_sync']:7.3f} {mem:7.2f}  {err:.1e}")
    print("elapsed", results["elapsed_s"])


if __name__ == "__main__":
    main()
