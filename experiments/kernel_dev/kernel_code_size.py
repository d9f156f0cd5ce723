"""The size of mode="mosaic_gpu"'s kernels as Mosaic GPU builds them, read on any machine (no GPU needed).

The op's fwd+bwd is lowered for CUDA (jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))), and each Mosaic GPU
kernel's module is captured as it is serialised into the custom call. Per kernel: its lines of MLIR, the warpgroup
products (wgmma) and the exp / sin / cos call sites in full precision (library calls, each inlined as dozens of
instructions with a slow path) or by the special-function units (one instruction per element). A kernel's code is
executed once per program, mostly straight through: when it outgrows the instruction cache, every program streams it
from L2 again.

Usage (any machine with jax >= 0.11):
    python experiments/kernel_dev/kernel_code_size.py --out $OUT [--variant padded_subblock_stream] [--d_head 64]
        [--gate_factors kernel] [--gates_form kernel_unrolled]
Writes <out>/<--json> (kernel_code_size.json): per kernel (by name, in the order lowered) those counts.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_common as bc  # noqa: E402
from gateloop_jax.ops import mosaic_gpu_gates as mgg  # noqa: E402
from gateloop_jax.ops import pallas_mosaic_gpu as pm  # noqa: E402


def count(module_text: str) -> dict:
    """The counts of one kernel's MLIR text."""
    ops = collections.Counter(re.findall(r"= ([a-z_0-9]+\.[a-z_.0-9]+)", module_text))
    asm = re.findall(r'llvm.inline_asm[^"]*"([^"]*)"', module_text)
    names = re.findall(r"func.func (?:public |private )?@(\w+)", module_text)
    return {
        "kernel": next((n for n in names if n.startswith("gateloop")), names[0] if names else "?"),
        "mlir_lines": module_text.count("\n"),
        "wgmma": sum("wgmma.mma_async" in a for a in asm),
        "precise_transcendentals": sum(ops[f"math.{f}"] for f in ("exp", "exp2", "sin", "cos")),
        "approx_transcendentals": sum(any(f"{f}.approx" in a for f in ("ex2", "sin", "cos")) for a in asm),
    }


def kernel_sizes(variant: str, d_head: int, length: int = 128) -> list[dict]:
    """Lower the op's fwd+bwd (batch 2, 2 heads) for CUDA and count each Mosaic GPU kernel it builds."""
    try:
        from jax.experimental.mosaic.gpu import core
    except ImportError as e:  # pragma: no cover - depends on the installed jax
        raise SystemExit(f"kernel_code_size: jax.experimental.mosaic.gpu does not import ({e})") from e
    if not hasattr(core, "_run_serde_pass"):
        raise SystemExit("kernel_code_size: this jax's Mosaic GPU has no _run_serde_pass to read the modules from")
    records, serialise = [], core._run_serde_pass

    def capture(module, **kwargs):
        records.append(count(str(module)))
        return serialise(module, **kwargs)

    q = jnp.zeros((2, length, 2, d_head), jnp.bfloat16)
    gates = jnp.zeros(q.shape, jnp.float32)

    def fwd_bwd(*x):  # y is returned too: without it the forward's kernels would be dropped
        y, pull = jax.vjp(lambda *x: pm.gateloop_mosaic_gpu(*x, None, interpret=False, variant=variant)[0], *x)
        return y, pull(y)

    core._run_serde_pass = capture
    try:
        jax.jit(fwd_bwd).trace(q, q, q, gates, gates).lower(lowering_platforms=("cuda",))
    finally:
        core._run_serde_pass = serialise
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    ap.add_argument("--json", default="kernel_code_size.json", help="file name under --out")
    ap.add_argument("--variant", default=pm.VARIANT, choices=pm.VARIANTS)
    ap.add_argument("--d_head", type=int, default=64)
    ap.add_argument("--gate_factors", default=None, choices=mgg.GATE_FACTOR_METHODS)
    ap.add_argument("--gates_form", default=None, help="bench_gate_factors.py's EXACT_FORMS")
    args = ap.parse_args(argv)
    if pm.unavailable_reason():
        ap.error(f"mode mosaic_gpu is unavailable here: {pm.unavailable_reason()}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_gate_factors

    os.makedirs(args.out, exist_ok=True)
    method = mgg.GATE_FACTORS
    mgg.GATE_FACTORS = args.gate_factors or method
    saved = bench_gate_factors.apply_form(args.gates_form) if args.gates_form else None
    try:
        records = kernel_sizes(args.variant, args.d_head)
    finally:
        mgg.GATE_FACTORS = method
        if saved is not None:
            bench_gate_factors.restore_form(saved)
    for r in records:
        print(f"{r['kernel']:45s} {r['mlir_lines']:7d} lines  {r['wgmma']:4d} wgmma  "
              f"{r['precise_transcendentals']:4d} precise / {r['approx_transcendentals']:4d} approx exp, sin, cos")
    result = {"env": bc.env_record(), "variant": args.variant, "d_head": args.d_head,
              "gate_factors": args.gate_factors, "gates_form": args.gates_form, "kernels": records}
    bc.write_json(os.path.join(args.out, args.json), result)
    print(f"wrote {os.path.join(args.out, args.json)}")


if __name__ == "__main__":
    main()
