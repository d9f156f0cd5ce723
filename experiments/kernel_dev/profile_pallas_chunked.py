"""Per-kernel timing of the multi-head Pallas chunked op (ops/pallas_chunked.py) on a GPU: where the time goes.

Usage (GPU machine):
    python experiments/kernel_dev/profile_pallas_chunked.py --out $OUT [--variants default,w8] [--lengths 1024,8192] \
        [--forgetting 0,2] [--gates_file results/kernel_dev/gates_memory_horizon_multihead.npz:layer1] \
        [--dtypes float32,bfloat16] [--check]
Each stage of the forward and backward is jitted alone on the real intermediate inputs and timed like
bench_kernels.py (median of runs x reps back-to-back calls), at 32768 tokens, 8 heads, d_qk = d_v = 64.
"""

from __future__ import annotations

import argparse
import os

# bench_kernels first: it puts the repository on sys.path and loads gateloop_jax/ops alone where the model stack
# (flax, ml_collections, ...) is missing, as on the GPU image.
from bench_kernels import check_variants, make_inputs  # noqa: I001

import jax
import jax.numpy as jnp

import bench_common as bc
from bench_common import load_gates, tile_gates
from gateloop_jax.ops import pallas_chunked as pc
from gateloop_jax.ops.common import polar_pair


def with_forgetting_channels(log_r, n):
    """The first n key channels of every head forget at every step (log|a| = -20): each sub-block of 16 rows then
    decays by 320 nats there, beyond any tame_nats, so every diagonal sub-block takes the exact row loop."""
    return log_r.at[..., :n].set(-20.0) if n else log_r


def stages(cfg, L, interpret, runs, tokens, h=8, forgetting=0, gates=None, dtype="float32"):
    b, d = max(1, tokens // L), 64
    q, k, v, lr, th, dy = make_inputs(jax.random.PRNGKey(0), b, L, h, d, d)
    # As ops.gateloop passes them: q, k, v and the cotangent in the model's dtype, y in it too; gates float32.
    q, k, v, dy = (x.astype(dtype) for x in (q, k, v, dy))
    lr = with_forgetting_channels(lr, forgetting)
    if gates is not None:  # learned gates tiled to this shape instead of the random ones
        lr = jnp.asarray(tile_gates(gates, b, L, h, d))
    p = pc.make_plan(cfg, b, h, L, d, d, interpret=interpret, y_dtype=dtype)
    z = jnp.zeros((b, h, d, d), jnp.float32)
    out = {}

    def t(name, fn, *args):
        f = jax.jit(fn)
        res = jax.block_until_ready(f(*args))
        out[name] = bc.time_sync_and_pipelined(f, args, runs=runs)["ms"]
        print(f"  {name:>14s} {out[name]:8.3f} ms", flush=True)
        return res

    inc_re, inc_im, tl, tt = t(
        "fwd_outer", lambda *a: pc._outer(p, *a, to_end=True, conj=False, totals=True), k, v, lr, th
    )
    tr, ti = polar_pair(tl, tt)
    s_re, s_im, _, _ = t("fwd_carry", lambda *a: pc._carry(p, *a, reverse=False), tr, ti, inc_re, inc_im, z, z)
    t("fwd_query", lambda *a: pc._query_side(p, *a, grad=False), q, k, v, lr, th, v, s_re, s_im)
    loc_re, loc_im = t("bwd_outer", lambda *a: pc._outer(p, *a, to_end=False, conj=True, totals=False), q, dy, lr, th)
    e_re, e_im, _, _ = t("bwd_carry", lambda *a: pc._carry(p, *a, reverse=True), tr, ti, loc_re, loc_im, z, z)
    t("bwd_query", lambda *a: pc._query_side(p, *a, grad=True), q, k, v, lr, th, dy, s_re, s_im)
    t("bwd_key", lambda *a: pc._key_side(p, *a), q, k, v, lr, th, dy, e_re, e_im)
    out["sum"] = sum(out.values())

    def fwd_bwd(q, k, v, lr, th, dy):  # y and the five gradients: without y returned, XLA drops the fwd query kernel
        y, pull = jax.vjp(
            lambda *x: pc.gateloop_pallas_chunked(*x, None, interpret=interpret, config=cfg, out_dtype=dtype)[0],
            q,
            k,
            v,
            lr,
            th,
        )
        return y, *pull(dy)

    full = jax.jit(fwd_bwd)
    jax.block_until_ready(full(q, k, v, lr, th, dy))
    out["fwd_bwd_total"] = bc.time_sync_and_pipelined(full, (q, k, v, lr, th, dy), runs=runs)["ms"]
    print(f"  {'fwd_bwd_total':>14s} {out['fwd_bwd_total']:8.3f} ms (stages sum {out['sum']:.3f})", flush=True)
    return out


def _op(cfg, interpret):
    return lambda q, k, v, lr, th, h0: pc.gateloop_pallas_chunked(q, k, v, lr, th, h0, interpret=interpret, config=cfg)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    ap.add_argument("--variants", default="default")
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // length)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dtypes", default="float32", help="q, k, v, dy and y dtypes, e.g. float32,bfloat16")
    ap.add_argument(
        "--forgetting",
        default="0",
        help="comma list: key channels per head with log|a| = -20 (0 = the usual gates, all tame)",
    )
    ap.add_argument(
        "--gates_file",
        default="",
        help="path.npz:layerN from tame_fraction.py --save_gates: also time (and --check) every variant "
        "on those learned gates, tiled to the shape (e.g. "
        "results/kernel_dev/gates_memory_horizon_multihead.npz:layer1)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="also check every variant's y and gradients against ops scan (float32), usual gates and "
        "2 forgetting channels, at 2 x 1024 x 8 heads x 64",
    )
    a = ap.parse_args(argv)
    tokens = 256 if a.smoke else a.tokens
    results = {"env": bc.env_record(), "rows": []}
    variants = a.variants.split(",")
    learned = load_gates(a.gates_file) if a.gates_file else None
    if a.check:
        b, L = (1, 32) if a.smoke else (2, 1024)
        results["check"] = {}
        cases = [("forgetting0", 0), ("forgetting2", 2)] + ([("gates_file", None)] if a.gates_file else [])
        for case, forgetting in cases:
            q, k, v, lr, th, dy = make_inputs(jax.random.PRNGKey(1), b, L, a.heads, 64, 64)
            lr = (
                with_forgetting_channels(lr, forgetting)
                if forgetting is not None
                else jnp.asarray(tile_gates(learned, b, L, a.heads, 64))
            )
            fns = {name: _op(pc.VARIANTS[name], a.smoke) for name in variants}
            check_variants(results["check"].setdefault(case, {}), (q, k, v, lr, th, dy), fns)
    gate_sets = [(f"forgetting={x}", int(x), None) for x in a.forgetting.split(",")]
    if a.gates_file:
        gate_sets.append((a.gates_file, 0, learned))
    for vname in variants:
        cfg = pc.VARIANTS[vname]
        for gate_name, forgetting, gates in gate_sets:
            for dtype in a.dtypes.split(","):
                for L in (int(x) for x in a.lengths.split(",")):
                    L = min(L, tokens)
                    print(vname, L, gate_name, dtype, cfg, flush=True)
                    try:
                        row = stages(cfg, L, a.smoke, a.runs, tokens, a.heads, forgetting, gates, dtype)
                    except Exception as e:  # noqa: BLE001
                        row = {"error": repr(e)[-1500:]}
                        print(row, flush=True)
                    results["rows"].append(
                        {"variant": vname, "L": L, "forgetting": forgetting, "gates": gate_name, "dtype": dtype, **row}
                    )
    os.makedirs(a.out, exist_ok=True)
    bc.write_json(os.path.join(a.out, "profile_pallas_chunked.json"), results)
    return results


if __name__ == "__main__":
    main()
