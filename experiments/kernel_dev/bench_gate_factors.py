"""The gates' decay factors of mode="mosaic_gpu" (mosaic_gpu_gates.gate_factors) timed alone, by method, and the
kernel with one of its stages taken out, to see which one costs the time.

Forms: "xla" (window sums in XLA), "kernel" (the op's kernel, plain loads and stores, the windows in one loop body),
"_unrolled" (the windows unrolled: six times the code, most of it inlined exp / cos / sin), "kernel_tma" (loads and
stores through staging tiles by TMA), "_approx" (exp / cos / sin by the special-function units), "kernel_no_polar"
(the sums written as they are, no exp / cos / sin), "kernel_no_sums" (no tensor-core products: the factors of zero
sums), "kernel_chunk_only" (the two chunk windows, no sub-block ones), "_4chunks" (four chunks in turn per program).
The "_no_" and "_chunk_only" forms exist only to be timed.

Usage (GPU machine; --smoke: a tiny shape in interpret mode on CPU):
    python experiments/kernel_dev/bench_gate_factors.py --out $OUT
Writes <out>/<--json> (gate_factors.json): per form the median ms of one call, with the bytes it reads and writes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_common as bc  # noqa: E402
from gateloop_jax.ops import mosaic_gpu_gates as mgg  # noqa: E402
from gateloop_jax.ops.mosaic_gpu_common import _wrap  # noqa: E402

FORMS = ("kernel", "kernel_unrolled", "kernel_approx", "kernel_tma", "kernel_4chunks", "kernel_no_polar",
         "kernel_no_sums", "kernel_chunk_only", "kernel_tma_approx", "kernel_tma_4chunks", "kernel_unrolled_approx",
         "xla")


@contextlib.contextmanager
def _patched(form):
    """The module as `form` wants it while the function is traced."""
    saved = mgg._polar, mgg.plgpu
    if form == "kernel_no_polar":
        mgg._polar = lambda r, p: (r, p)
    if form == "kernel_no_sums":
        mgg.plgpu = types.SimpleNamespace(**{n: getattr(saved[1], n) for n in dir(saved[1]) if not n.startswith("_")})
        mgg.plgpu.wgmma = lambda acc, a, b: None
    try:
        yield
    finally:
        mgg._polar, mgg.plgpu = saved


# The forms that give the right factors, as the module's GATES_ settings.
EXACT_FORMS = ("kernel", "kernel_unrolled", "kernel_approx", "kernel_tma", "kernel_4chunks", "kernel_tma_approx",
               "kernel_tma_4chunks", "kernel_unrolled_approx")


def kernel_settings(form):
    """A kernel form's keywords of mosaic_gpu_gates._factors_kernel."""
    return {"approx_math": form.endswith("_approx"), "io": "tma" if "_tma" in form else "direct",
            "per_program": 4 if form.endswith("_4chunks") else 1,
            "loop": "unrolled" if "_unrolled" in form else "rolled"}


def apply_form(form):
    """Set mosaic_gpu_gates' GATES_ settings to an EXACT_FORMS form; returns the previous settings (restore_form)."""
    if form not in EXACT_FORMS:
        raise ValueError(f"{form!r} is not one of {EXACT_FORMS}")
    saved = mgg.GATES_APPROX_MATH, mgg.GATES_IO, mgg.GATES_PER_PROGRAM, mgg.GATES_LOOP
    settings = kernel_settings(form)
    mgg.GATES_APPROX_MATH, mgg.GATES_IO, mgg.GATES_PER_PROGRAM, mgg.GATES_LOOP = (
        settings[k] for k in ("approx_math", "io", "per_program", "loop"))
    return saved


def restore_form(saved):
    mgg.GATES_APPROX_MATH, mgg.GATES_IO, mgg.GATES_PER_PROGRAM, mgg.GATES_LOOP = saved


def factors_fn(form, interpret):
    if form == "xla":
        return lambda lr, th: mgg._factors_xla(lr, th, True)
    return lambda lr, th: mgg._factors_kernel(lr, th, sub=form != "kernel_chunk_only", interpret=interpret,
                                              **kernel_settings(form))


def main(argv=None):
    ap = bc.kernel_part_parser(__doc__, json_name="gate_factors.json", forms=FORMS)
    args = ap.parse_args(argv)
    b, t, h, d = bc.kernel_part_shape(args)
    os.makedirs(args.out, exist_ok=True)
    key_r, key_p = jax.random.split(jax.random.key(0))
    lr = -jax.random.uniform(key_r, (b, t, h, d), jnp.float32, 0.0, 14.0)
    th = _wrap(jax.random.uniform(key_p, (b, t, h, d), jnp.float32, -100.0, 100.0))
    result = {"env": bc.env_record(), "shape": [b, t, h, d], "records": []}
    for form in [f for f in args.forms.split(",") if f]:
        try:
            with _patched(form):
                f = jax.jit(factors_fn(form, args.smoke))
                outs = jax.block_until_ready(f(lr, th))
            stats = bc.time_sync_and_pipelined(f, (lr, th), runs=2 if args.smoke else args.reps)
            record = {"form": form, "ms": stats["ms"], "ms_sync": stats["ms_sync"],
                      "bytes": lr.nbytes * (2 + len(outs))}
            print(f"{form:18} {record['ms']:.3f} ms  ({record['bytes'] / 1e9:.2f} GB moved)", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing form must not lose the others' figures
            record = {"form": form, "error": repr(e)[:2000]}
            print(f"{form:18} {e!r}"[:400], flush=True)
        result["records"].append(record)
        bc.write_json(os.path.join(args.out, args.json), result)
    exact = [r for r in result["records"] if r["form"] in EXACT_FORMS and "ms" in r]
    if exact:
        best = min(exact, key=lambda r: r["ms"])
        result["best_kernel_form"] = best["form"]
        bc.write_json(os.path.join(args.out, args.json), result)
        print(f"best kernel form: {best['form']}")
    print(f"wrote {os.path.join(args.out, args.json)}")


if __name__ == "__main__":
    main()
