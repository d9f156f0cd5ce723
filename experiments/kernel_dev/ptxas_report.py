"""Registers and spills of mode="mosaic_gpu"'s kernels, as ptxas reports them (GPU machine only).

Each variant's fwd+bwd is compiled at a small shape with Mosaic GPU's compiler dumps on (MOSAIC_GPU_DUMP_PTXAS,
MOSAIC_GPU_DUMP_TO): ptxas then writes, per kernel, the registers per thread and the bytes spilled to local memory.
A kernel that spills pays local-memory traffic inside its loops, which no change to its fetches hides.

Usage (GPU machine):
    python experiments/kernel_dev/ptxas_report.py --out $OUT [--variants padded_subblock_stream] [--d_heads 64,128]
Writes <out>/<--json> (ptxas.json): per (variant, d_head, kernel) the ptxas lines that report resources.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "experiments")]

from bench_kernels import make_inputs  # noqa: E402, I001
from profile_mosaic_gpu import op_fwd_bwd  # noqa: E402

import jax  # noqa: E402

import bench_common as bc  # noqa: E402
from gateloop_jax.ops import pallas_mosaic_gpu as pm  # noqa: E402

_RESOURCE_LINE = re.compile(r"registers|spill|stack frame|smem", re.IGNORECASE)


def kernel_resources(dump_dir: str) -> dict[str, list[str]]:
    """Per dumped kernel (file stem), the lines of its ptxas report and resource summary that name resources."""
    out: dict[str, list[str]] = {}
    paths = glob.glob(os.path.join(dump_dir, "*.ptxas")) + glob.glob(os.path.join(dump_dir, "*.resources.txt"))
    for path in sorted(paths):
        stem = os.path.basename(path).split(".")[0]
        with open(path, errors="replace") as f:
            out.setdefault(stem, []).extend(line.strip() for line in f if _RESOURCE_LINE.search(line))
    return out


def compile_with_dumps(variant: str, d: int, dump_dir: str) -> None:
    """Compiles (and runs once) the op's fwd+bwd; Mosaic GPU reads the dump settings when it compiles a kernel."""
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    os.environ["MOSAIC_GPU_DUMP_TO"] = dump_dir
    q, k, v, log_r, theta, dy = make_inputs(jax.random.key(0), 1, 256, 1, d, d, jax.numpy.bfloat16)
    jax.block_until_ready(jax.jit(op_fwd_bwd(variant, False))(q, k, v, log_r, theta, dy.astype(q.dtype)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    ap.add_argument("--json", default="ptxas.json", help="file name under --out")
    ap.add_argument("--variants", default=pm.VARIANT, help=f"comma list of {pm.VARIANTS}")
    ap.add_argument("--d_heads", default="64", help="comma list of head widths (d_qk = d_v)")
    args = ap.parse_args(argv)
    if pm.unavailable_reason() or jax.default_backend() != "gpu":
        ap.error("needs a GPU with Pallas Mosaic GPU (ptxas runs only there)")
    os.makedirs(args.out, exist_ok=True)
    result = {"env": bc.env_record(), "records": []}
    for variant in [x for x in args.variants.split(",") if x]:
        for d in [int(x) for x in args.d_heads.split(",") if x]:
            with tempfile.TemporaryDirectory() as dump_dir:
                try:
                    compile_with_dumps(variant, d, dump_dir)
                    record = {"variant": variant, "d_head": d, "kernels": kernel_resources(dump_dir)}
                except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others' reports
                    record = {"variant": variant, "d_head": d, "error": repr(e)[:2000]}
            result["records"].append(record)
            print(f"== {variant} d={d}", flush=True)
            for name, lines in record.get("kernels", {}).items():
                print(f"  {name}: " + " | ".join(dict.fromkeys(lines)), flush=True)
            if "error" in record:
                print(f"  error: {record['error'][:400]}", flush=True)
            bc.write_json(os.path.join(args.out, args.json), result)
    print(f"wrote {os.path.join(args.out, args.json)}")


if __name__ == "__main__":
    main()
