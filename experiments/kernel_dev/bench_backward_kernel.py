"""mode="mosaic_gpu"'s intra-chunk backward kernel (mosaic_gpu_intra._backward_intra) timed alone, whole and with one
of its parts taken out, beside the forward kernel: which part costs the time, and what ptxas says of each form.

Forms: "forward" (the forward kernel, for scale), "backward" (as the op runs it), "backward_no_polar" (the walks'
pair decays left in log space: no exp / cos / sin), "backward_no_diag" (the walks' weights taken elementwise, not
as a diagonal: no reduction across the threads of a row), "backward_one_offset" (each walk takes one row offset of
15), "backward_no_walks" (no offsets at all), "backward_no_cross" (no products across sub-blocks: neither their
fetches nor their tensor-core work). Every form but "forward" and "backward" exists only to be timed: its outputs
are wrong.

Usage (GPU machine; --smoke: a tiny shape in interpret mode on CPU):
    python experiments/kernel_dev/bench_backward_kernel.py --out $OUT [--variant padded_subblock_stream]
Writes <out>/<--json> (backward_kernel.json): per form the median ms of one call and, on the GPU, the ptxas lines on
registers and spills of each kernel it compiled, and its SASS instruction counts by opcode.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
import sys
import tempfile
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments"), os.path.dirname(os.path.abspath(__file__))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_common as bc  # noqa: E402
from gateloop_jax.ops import mosaic_gpu_intra as mgi  # noqa: E402
from gateloop_jax.ops import pallas_mosaic_gpu as pm  # noqa: E402
from gateloop_jax.ops.mosaic_gpu_common import CHUNK, SUB, _wrap  # noqa: E402
from ptxas_report import kernel_resources  # noqa: E402

FORMS = ("forward", "backward", "backward_no_polar", "backward_no_diag", "backward_one_offset", "backward_no_walks",
         "backward_no_cross")


def _with_fori_loop(fori_loop):
    """A stand-in for the module's `jax` whose lax.fori_loop is `fori_loop` for the diagonal walks (the loops to 16 or
    64 row offsets; the "_rolled" loop over d = 1..3 stays)."""
    lax = types.SimpleNamespace(**{n: getattr(jax.lax, n) for n in dir(jax.lax) if not n.startswith("__")})

    def walk_or_loop(lower, upper, body, init):
        walk = lower == 1 and upper in (SUB, CHUNK)
        return (fori_loop if walk else jax.lax.fori_loop)(lower, upper, body, init)

    lax.fori_loop = walk_or_loop
    namespace = types.SimpleNamespace(**{n: getattr(jax, n) for n in dir(jax) if not n.startswith("__")})
    namespace.lax = lax
    return namespace


@contextlib.contextmanager
def _patched(form):
    """mosaic_gpu_intra as `form` wants it while the kernel is traced."""
    names = ("jax", "_cross_query_rows", "_cross_key_rows", "_cross_key_scores", "_cross_query_rows_fetches",
             "_cross_key_rows_fetches", "_cross_key_scores_fetches")
    saved_module = {n: getattr(mgi, n) for n in names}
    saved_ctx = {n: getattr(mgi._Ctx, n) for n in ("decay", "diagonal", "bcast")}
    if form == "backward_no_polar":
        mgi._Ctx.decay = lambda self, state, imag=True: (state[0], state[1] if imag else None)
    if form == "backward_no_diag":
        mgi._Ctx.diagonal = lambda self, mat, delta, upper=False: mat
        mgi._Ctx.bcast = lambda self, col: col if col.ndim == 2 else saved_ctx["bcast"](self, col)
    if form == "backward_one_offset":
        mgi.jax = _with_fori_loop(lambda lower, upper, body, init: body(lower, init))
    if form == "backward_no_walks":
        mgi.jax = _with_fori_loop(lambda lower, upper, body, init: init)
    if form == "backward_no_cross":
        mgi._cross_query_rows = lambda x, *a: (x.zeros, x.zeros)
        mgi._cross_key_rows = lambda x, *a: (x.zeros, x.zeros)
        mgi._cross_key_scores = lambda x, *a: x.zeros
        for n in names[4:]:
            setattr(mgi, n, lambda *args: [])
    try:
        yield
    finally:
        for n, value in saved_module.items():
            setattr(mgi, n, value)
        for n, value in saved_ctx.items():
            setattr(mgi._Ctx, n, value)


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_summary(dump_dir: str) -> dict:
    """Per SASS dump (MOSAIC_GPU_DUMP_SASS): its instruction count and the count of the opcodes that say where a
    kernel spends its issue slots (local memory = spills, barriers, tensor-core and special-function instructions,
    shuffles, shared-memory traffic)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(dump_dir, "*"))):
        if "sass" not in os.path.basename(path).lower():
            continue
        with open(path, errors="replace") as f:
            ops = collections.Counter(m.group(1).split(".")[0] for m in map(_SASS_LINE.search, f) if m)
        if ops:
            keep = ("LDL", "STL", "BAR", "HGMMA", "WARPGROUP", "MUFU", "SHFL", "LDS", "STS", "LDG", "STG", "BRA",
                    "FFMA", "FADD", "FMUL", "FSEL", "SEL", "IMAD", "LOP3", "ISETP", "FSETP")
            out[os.path.basename(path)] = {"instructions": sum(ops.values()), **{k: ops[k] for k in keep if ops[k]}}
    if not out:  # the dump's naming, to read it another way
        out["files"] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(dump_dir, "*")))[:40]
    return out


def kernel_fn(form, variant, interpret):
    opts = (interpret, variant)
    sub = mgi._split_variant(variant)[3]

    def run(q, k, v, lr, th, dy):
        gates = pm.gate_factors(lr, th, sub=sub, interpret=interpret)
        if form == "forward":
            return mgi._forward_intra(q, k, v, lr, th, gates.sub, opts=opts)
        return mgi._backward_intra(q, k, v, lr, th, dy, gates.sub, opts=opts)

    return run


def main(argv=None):
    ap = bc.kernel_part_parser(__doc__, json_name="backward_kernel.json", forms=FORMS)
    ap.add_argument("--variant", default=pm.VARIANT)
    args = ap.parse_args(argv)
    b, t, h, d = bc.kernel_part_shape(args)
    os.makedirs(args.out, exist_ok=True)
    keys = jax.random.split(jax.random.key(0), 6)
    q, k, v, dy = (jax.random.normal(key, (b, t, h, d), jnp.float32) for key in keys[:4])
    lr = -jax.random.uniform(keys[4], (b, t, h, d), jnp.float32, 0.0, 14.0)
    th = _wrap(jax.random.uniform(keys[5], (b, t, h, d), jnp.float32, -100.0, 100.0))
    operands = (q, k, v, lr, th, dy)
    on_gpu = jax.default_backend() == "gpu"
    result = {"env": bc.env_record(), "variant": args.variant, "shape": [b, t, h, d], "records": []}
    # The gate factors (timed inside each form) by themselves, to subtract.
    for form in ["gate_factors"] + [f for f in args.forms.split(",") if f]:
        record = {"form": form}
        with tempfile.TemporaryDirectory() as dump_dir:
            if on_gpu:
                os.environ.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_TO=dump_dir)
            try:
                if form == "gate_factors":
                    f = jax.jit(lambda lr, th: pm.gate_factors(lr, th, sub=True, interpret=args.smoke))
                    call_args = (lr, th)
                else:
                    with _patched(form):
                        f = jax.jit(kernel_fn(form, args.variant, args.smoke))
                        jax.block_until_ready(f(*operands))
                    call_args = operands
                stats = bc.time_sync_and_pipelined(f, call_args, runs=2 if args.smoke else args.reps)
                record.update(ms=stats["ms"], ms_sync=stats["ms_sync"])
                if on_gpu:
                    record["ptxas"] = {n: list(dict.fromkeys(lines)) for n, lines in kernel_resources(dump_dir).items()
                                       if "gateloop" in n}
                    record["sass"] = sass_summary(dump_dir)
            except Exception as e:  # noqa: BLE001 - one failing form must not lose the others' figures
                record["error"] = repr(e)[:2000]
            finally:
                os.environ.pop("MOSAIC_GPU_DUMP_PTXAS", None)
                os.environ.pop("MOSAIC_GPU_DUMP_SASS", None)
                os.environ.pop("MOSAIC_GPU_DUMP_TO", None)
        result["records"].append(record)
        line = f"{form:22} " + (f"{record['ms']:.3f} ms" if "ms" in record else record["error"][:300])
        for name, lines in record.get("ptxas", {}).items():
            if "backward" in name or "forward" in name:
                line += f"\n    {name}: " + " | ".join(lines)[:300]
        for name, counts in record.get("sass", {}).items():
            line += f"\n    {name[:60]}: {counts}"
        print(line, flush=True)
        bc.write_json(os.path.join(args.out, args.json), result)
    print(f"wrote {os.path.join(args.out, args.json)}")


if __name__ == "__main__":
    main()
