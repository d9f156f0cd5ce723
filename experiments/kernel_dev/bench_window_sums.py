"""The within-chunk sums of mode="mosaic_gpu" (mosaic_gpu_common._window_sums) by each method, timed alone.

The op forms its chunk-relative gate sums (64 rows) and the sub-block factors' sums (16 rows) in XLA, and the
backward sums its gate-gradient terms the same way. Each method ("matmul", "cumsum", "associative_scan") is timed
on the op's shapes at 32768 tokens x 8 heads of 64, forward and reverse, inclusive and exclusive, with an
elementwise producer in front (z = a * b - c, as in the backward) so that XLA may fuse it as it does in the op.

Usage (GPU machine; --smoke: a tiny shape on CPU):
    python experiments/kernel_dev/bench_window_sums.py --out $OUT
Writes <out>/<--json> (window_sums.json): per (rows, direction, method) the median ms of one sum.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_common as bc  # noqa: E402
from gateloop_jax.ops.mosaic_gpu_common import WINDOW_SUM_METHODS, _window_sums  # noqa: E402


def timed_sum(shape, reverse, inclusive, method, reps):
    keys = jax.random.split(jax.random.key(0), 3)
    a, b, c = (jax.random.normal(key, shape, jnp.float32) for key in keys)

    @jax.jit
    def f(a, b, c):
        return _window_sums(a * b - c, 2, reverse=reverse, inclusive=inclusive, method=method)

    stats = bc.time_sync_and_pipelined(f, (a, b, c), runs=reps)
    return {"ms": stats["ms"], "ms_sync": stats["ms_sync"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    ap.add_argument("--json", default="window_sums.json", help="file name under --out")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape (CPU)")
    args = ap.parse_args(argv)
    tokens, heads, d = (256, 1, 8) if args.smoke else (args.tokens, 8, 64)
    os.makedirs(args.out, exist_ok=True)
    result = {"env": bc.env_record(), "records": []}
    for rows in (64, 16):
        shape = (1, tokens // rows, rows, heads, d)  # (b, chunks, rows, h, d) as the op lays them out
        for reverse, inclusive in ((False, True), (True, False), (True, True), (False, False)):
            for method in WINDOW_SUM_METHODS:
                record = {"rows": rows, "reverse": reverse, "inclusive": inclusive, "method": method,
                          **timed_sum(shape, reverse, inclusive, method, 2 if args.smoke else args.reps)}
                result["records"].append(record)
                print(f"rows={rows} reverse={reverse!s:5} inclusive={inclusive!s:5} {method:17} "
                      f"{record['ms']:.3f} ms", flush=True)
                bc.write_json(os.path.join(args.out, args.json), result)
    print(f"wrote {os.path.join(args.out, args.json)}")


if __name__ == "__main__":
    main()
