"""Device time per GPU kernel of mode="mosaic_gpu" (fwd+bwd through the public op), from a jax.profiler trace.

profile_mosaic_gpu.py times whole stages; this names the kernels inside them: the op is run under
jax.profiler.trace, the trace's device plane read back with jax.profiler.ProfileData, and every kernel's time summed
per name and divided by the number of traced calls. XLA's fusions keep their HLO names (loop_multiply_fusion.12,
...), so the table says which of the XLA passes around the Pallas kernels cost what.

Usage (GPU machine; --smoke: a tiny shape in interpret mode on CPU, where the trace has no device plane):
    python experiments/kernel_dev/trace_mosaic_gpu.py --out $OUT [--variants padded_subblock] [--length 8192]
Writes <out>/<--json> (mosaic_trace.json): per variant the top kernels by time (ms per call) and the total.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

from bench_kernels import make_inputs  # noqa: E402, I001
from profile_mosaic_gpu import op_fwd_bwd  # noqa: E402
import bench_gate_factors  # noqa: E402

import jax  # noqa: E402

import bench_common as bc  # noqa: E402
from gateloop_jax.ops import mosaic_gpu_common as mgc  # noqa: E402
from gateloop_jax.ops import mosaic_gpu_gates as mgg  # noqa: E402
from gateloop_jax.ops import pallas_mosaic_gpu as pm  # noqa: E402


def device_kernel_times(trace_dir: str) -> tuple[dict[str, float], dict[str, float]]:
    """Summed duration (ns) per event name over the device planes' stream lines of the trace written under
    trace_dir, and the summed duration per line name (every line: says what the planes hold)."""
    totals: dict[str, float] = collections.defaultdict(float)
    lines: dict[str, float] = collections.defaultdict(float)
    for root, _, files in os.walk(trace_dir):
        for name in files:
            if not name.endswith(".xplane.pb"):
                continue
            data = jax.profiler.ProfileData.from_file(os.path.join(root, name))
            for plane in data.planes:
                if not plane.name.startswith("/device:GPU"):
                    continue
                for line in plane.lines:
                    lines[f"{plane.name} {line.name}"] += sum(e.duration_ns for e in line.events)
                    # One line per CUDA stream; "XLA Ops" / "XLA Modules" lines repeat the kernels' time.
                    if "stream" not in line.name.lower():
                        continue
                    for event in line.events:
                        totals[event.name] += event.duration_ns
    return totals, lines


def traced(variant, length, tokens, heads, d, dtype, interpret, calls, hlo_dir=None):
    b = max(1, tokens // length)
    q, k, v, log_r, theta, dy = make_inputs(jax.random.key(0), b, length, heads, d, d, dtype)
    dy = dy.astype(dtype)

    args = (q, k, v, log_r, theta, dy)
    f = jax.jit(op_fwd_bwd(variant, interpret)).lower(*args).compile()  # compiled once, traced and dumped
    if hlo_dir:  # the compiled program: maps the fusions' names in the table to the ops they hold
        with open(os.path.join(hlo_dir, f"hlo_{variant}_L{length}_d{d}.txt"), "w") as fh:
            fh.write(f.as_text())
    jax.block_until_ready(f(*args))
    jax.block_until_ready(f(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
        totals, lines = device_kernel_times(trace_dir)
    per_call = sorted(((name, ns / calls / 1e6) for name, ns in totals.items()), key=lambda x: -x[1])
    total = sum(ms for _, ms in per_call)
    print(f"{variant} L={length}: {total:.3f} ms of device kernels per call, {len(per_call)} kernels", flush=True)
    for name, ms in per_call[:40]:
        print(f"  {ms:8.3f}  {name[:110]}", flush=True)
    return {"variant": variant, "length": length, "batch": b, "heads": heads, "d_head": d, "dtype": dtype,
            "total_ms": total, "kernels_ms": per_call[:80],
            "lines_ms": {name: ns / calls / 1e6 for name, ns in lines.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    ap.add_argument("--json", default="mosaic_trace.json", help="file name under --out")
    ap.add_argument("--variants", default="padded_scan,padded", help=f"comma list of {pm.VARIANTS}")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // length)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d_head", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--window_sums", default=None, choices=mgc.WINDOW_SUM_METHODS,
                    help="how the within-chunk sums are formed (mosaic_gpu_common.WINDOW_SUMS)")
    ap.add_argument("--gate_factors", default=None, choices=mgg.GATE_FACTOR_METHODS,
                    help="how the gates' decay factors are formed (mosaic_gpu_gates.GATE_FACTORS)")
    ap.add_argument("--gate_grad_sums", default=None, choices=mgg.GATE_GRAD_SUM_METHODS,
                    help="how the backward's gate-gradient sums are formed (mosaic_gpu_gates.GATE_GRAD_SUMS)")
    ap.add_argument("--gates_form", default=None,
                    help="the gate-factor kernel's settings by a form of bench_gate_factors.py (EXACT_FORMS)")
    ap.add_argument("--hlo", action="store_true", help="also write each variant's compiled HLO text under --out")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape in interpret mode (CPU)")
    args = ap.parse_args(argv)
    if pm.unavailable_reason():
        ap.error(f"mode mosaic_gpu is unavailable here: {pm.unavailable_reason()}")
    if args.smoke:
        args.length, args.tokens, args.heads, args.d_head, args.calls = 64, 64, 1, 32, 1
    os.makedirs(args.out, exist_ok=True)
    defaults = mgc.WINDOW_SUMS, mgg.GATE_FACTORS, mgg.GATE_GRAD_SUMS
    mgc.WINDOW_SUMS = args.window_sums or mgc.WINDOW_SUMS
    mgg.GATE_FACTORS = args.gate_factors or mgg.GATE_FACTORS
    mgg.GATE_GRAD_SUMS = args.gate_grad_sums or mgg.GATE_GRAD_SUMS
    gates_saved = bench_gate_factors.apply_form(args.gates_form) if args.gates_form else None
    result = {"env": bc.env_record(), "window_sums": mgc.WINDOW_SUMS, "gate_factors": mgg.GATE_FACTORS,
              "gate_grad_sums": mgg.GATE_GRAD_SUMS, "gates_form": args.gates_form, "records": []}
    try:
        for variant in [x for x in args.variants.split(",") if x]:
            try:
                result["records"].append(traced(variant, args.length, args.tokens, args.heads, args.d_head,
                                                args.dtype, args.smoke, args.calls, args.out if args.hlo else None))
            except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' figures
                result["records"].append({"variant": variant, "error": repr(e)[:2000]})
                print(f"  {variant}: {e!r}"[:500], flush=True)
            bc.write_json(os.path.join(args.out, args.json), result)
    finally:  # the methods are module settings: a caller in the same process (a test) gets its own back
        mgc.WINDOW_SUMS, mgg.GATE_FACTORS, mgg.GATE_GRAD_SUMS = defaults
        if gates_saved is not None:
            bench_gate_factors.restore_form(gates_saved)
    print(f"wrote {os.path.join(args.out, args.json)}")


if __name__ == "__main__":
    main()
