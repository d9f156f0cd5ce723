"""The H100 fault of mode="mosaic_gpu" reproduced on CPU: Mosaic GPU's GPU interpret mode with the hardware's
addressing of the inferred 128-byte swizzle emulated in the shifted reads.

    PYTHONPATH=$PWD /work/venv312/bin/python experiments/kernel_dev/mosaic_swizzle_emulation.py   # ~1-2 min, CPU

Under the default (Warpgroup) lowering, Mosaic GPU gives each (128, 64) float32 pad buffer of the "swizzled" variant
(ops/pallas_mosaic_gpu.py) tiles of one 128-byte row half and a 128-byte swizzle: the 16-byte group g of byte address
A lives at g ^ ((A >> 7) & 7). TMA and the stores at rows 0 and 64 place the data by absolute address; a load of
the window starting at a dynamic row r0 swizzles the offsets relative to the window's start
(fragmented_array.transfer_tiled: the XOR is taken of the offset from memref_ptr(subview)). Both agree only where
r0 * 256 bytes is a multiple of 1024.
This script makes interpret mode read those windows the way the hardware does and prints, per gate regime, the max
relative error of y and of every gradient, for the emulated "swizzled" kernel and for the plain one. On the H100
(experiments/results/mosaic_gpu_h100/mosaic_accuracy.json, d = 32) the kernel gave 0.2-1.5 in regimes 0, 2, 3 and
~1e-6 (y, dq, dk, dv) in regime 1.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))


def misswizzled_window(buf, row0):
    """buf[row0:row0 + 64] as the hardware's swizzled load reads it: element e of the window (e = 64 i + c) is fetched
    from element e ^ (((e >> 5) & 7) << 2) after the window start (the 16-byte groups, 4 float32, XORed with the
    128-byte row index mod 8, relative), and the element stored there is the one whose absolute swizzle maps to it."""
    import jax
    import jax.numpy as jnp

    rows, cols = buf.shape
    flat = buf[...].reshape(rows * cols)
    e = jax.lax.broadcasted_iota(jnp.int32, (64, cols), 0) * cols + jax.lax.broadcasted_iota(jnp.int32, (64, cols), 1)
    phys = row0 * cols + (e ^ (((e >> 5) & 7) << 2))
    logical = phys ^ (((phys >> 5) & 7) << 2)
    return flat[logical]


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from mosaic_gpu_test import _inputs
    from pallas_test import _oracle_grads_with_final
    from reference import gateloop_forward, max_rel_error

    from gateloop_jax.ops import mosaic_gpu_intra as intra
    from gateloop_jax.ops import pallas_mosaic_gpu as pm

    args = _inputs(np.random.default_rng(32032), 4, 131, 1, 32, 32)
    q, k, v, lr, th, h0, dy, dfinal = args
    y_ref, _ = gateloop_forward(q, k, v, lr, th, h0)
    ref = _oracle_grads_with_final(q, k, v, lr, th, h0, dy, dfinal)
    plain = intra._Ctx.shifted

    def emulated(self, buf, row0):
        return misswizzled_window(buf, row0)

    for name, shifted in (("interpret", plain), ("interpret + hardware swizzle addressing", emulated)):
        intra._Ctx.shifted = shifted

        def fn(q, k, v, lr, th, h0):
            return pm.gateloop_mosaic_gpu(q, k, v, lr, th, h0, interpret=True, variant="swizzled")

        (y, _), vjp = jax.vjp(jax.jit(fn), q, k, v, lr, th, h0)
        grads = vjp((jnp.asarray(dy), jnp.conj(jnp.asarray(dfinal))))
        print(f"{name}: max relative error per gate regime 0..3")
        for label, x, r in [("y", y, y_ref)] + list(zip(("dq", "dk", "dv", "dlog_r", "dtheta"), grads, ref)):
            errs = [max_rel_error(np.asarray(x)[i], r[i]) for i in range(4)]
            print(f"  {label:7s}" + "".join(f" {e:9.2e}" for e in errs), flush=True)
    intra._Ctx.shifted = plain


if __name__ == "__main__":
    main()
